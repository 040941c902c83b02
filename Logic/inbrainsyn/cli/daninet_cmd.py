"""``inbrainsyn daninet train | preview | evaluate``: the DaniNet 2D slice mode."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from inbrainsyn.errors import InputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("daninet", help="DaniNet 2D slice mode: train, preview, evaluate",
                              description="DaniNet (Ravi et al. 2019/2022) slice mode: a 2D conditional "
                                          "adversarial autoencoder predicting an axial slice at other ages.")
    sub = p.add_subparsers(dest="daninet_command", metavar="ACTION")

    t = sub.add_parser("train", help="train DaniNet on a longitudinal cohort (cohort.csv)")
    t.add_argument("--data", required=True, help="cohort.csv (subject, scan, age, group, path[, transition_age])")
    t.add_argument("-o", "--output", required=True, help="output folder (checkpoints, weights, curves)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--bins-per-sample", type=int, default=4, help="age bins generated per sample and step (paper: 10)")
    t.add_argument("--slice-band", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                   help="axial slice band (default: 30%%-65%% of the depth)")
    t.add_argument("--slice-stride", type=int, default=3, help="use every n-th slice of the band")
    t.add_argument("--holdout", type=int, default=0, help="subjects held out for evaluation (listed in split.json)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    t.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch that passes this time")
    t.add_argument("--tiny", action="store_true", help="a very small network (tests)")
    t.add_argument("--model", choices=["flow", "daninet"], default="flow",
                   help="flow: the slice-ageing model shipped (displacement + residual per year, starts at the copy; "
                        "default); daninet: the adversarial autoencoder of the paper")
    t.add_argument("--steps", type=int, default=4000, help="flow: optimiser steps")
    t.add_argument("--identity-alignment", action="store_true",
                   help="flow: the scans are already aligned with the template (skip the coarse affine)")
    t.set_defaults(func=run_train)

    v = sub.add_parser("preview", help="predict one axial slice at target ages (PNG strip + manifest)")
    v.add_argument("input", help="T1 volume (NIfTI/NRRD/...); native space is affinely aligned to the template")
    v.add_argument("--age", type=float, required=True)
    v.add_argument("--cohort", required=True, choices=["HC", "AD"])
    v.add_argument("--targets", type=float, nargs="+", required=True)
    where = v.add_mutually_exclusive_group(required=True)
    where.add_argument("--slice", type=int, help="axial slice index in template space (the model's grid)")
    where.add_argument("--native-slice", type=int, metavar="K",
                       help="axial slice index K of the INPUT volume; mapped to the nearest template slice "
                            "through the affine alignment")
    v.add_argument("-o", "--output", required=True)
    v.add_argument("--weights", default=None, help="DaniNet weights (default: the shipped model)")
    v.add_argument("--finetune-steps", type=int, default=0, help="test-time transfer steps (0: none)")
    v.add_argument("--assembly", choices=["residual", "blend"], default="residual")
    v.add_argument("--in-template-space", action="store_true",
                   help="the input is already on the model's template grid (skip the affine alignment)")
    v.add_argument("--alignment", default=None, metavar="FILE",
                   help="reuse an alignment instead of registering: the manifest.json of an earlier "
                        "'inbrainsyn synthesize' or 'daninet preview' run of this scan, or an ITK transform file "
                        "(template mm -> input mm); without it a coarse (8/4 mm) affine is computed")
    v.set_defaults(func=run_preview)

    e = sub.add_parser("evaluate", help="held-out subjects: predicted slices vs true follow-ups")
    e.add_argument("--data", required=True, help="cohort.csv (mask_path column used when present)")
    e.add_argument("--weights", default=None)
    e.add_argument("--split", default=None, help="split.json from 'daninet train' (its held-out subjects)")
    e.add_argument("--subjects", nargs="*", default=None, help="subjects to evaluate (instead of --split)")
    e.add_argument("--slice-stride", type=int, default=None, help="default: the training stride")
    e.add_argument("--with-inbrainsyn", action="store_true",
                   help="also predict with InBrainSyn (pole ladder) and score it on the same slices")
    e.add_argument("--inbrainsyn-cache", default=None,
                   help="folder to keep/reuse InBrainSyn's predicted volumes (slice-ageing model: scored "
                        "when present there, never computed)")
    e.add_argument("--inputs", choices=["stripped", "head"], default="stripped",
                   help="slice-ageing model on a phantom: the baseline the preview gets, skull-stripped or with "
                        "skull and scalp (the truth is the clean stripped follow-up either way)")
    e.add_argument("-o", "--output", required=True)
    e.set_defaults(func=run_evaluate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from inbrainsyn.daninet import data, train
    from inbrainsyn.daninet.model import DaniNet, DaniNetConfig, count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    scans = data.read_cohort(args.data)
    train_subj, held = data.split_subjects([s.subject for s in scans], args.holdout, args.seed)
    train_scans = [s for s in scans if s.subject in train_subj]
    if args.model == "flow":
        return _train_flow(args, out, train_scans, train_subj, held)
    band = tuple(args.slice_band) if args.slice_band else None
    t0 = time.time()
    frame_size = 32 if args.tiny else 128
    slices, reference, band = data.build_slice_set(train_scans, band, args.slice_stride, progress=True,
                                                   frame_size=frame_size)
    print(f"{len(slices)} slices from {len(train_scans)} scans of {len(train_subj)} subjects, band {band} "
          f"({time.time() - t0:.0f}s)")
    cfg = DaniNetConfig(slice_band=band)
    if args.tiny:
        cfg = DaniNetConfig(slice_band=band, frame_size=32, enc_channels=(4, 8, 8, 16, 16), gen_channels=(16, 16, 8, 8, 4),
                            disc_channels=(4, 8, 8, 8), z_dim=16, disc_fc=16)
    model = DaniNet(cfg)
    model.meta = {
        "grid_size_zyx": list(reversed(reference.GetSize())), "spacing": list(reference.GetSpacing()),
        "origin": list(reference.GetOrigin()), "direction": list(reference.GetDirection()),
        "slice_stride": args.slice_stride, "train_subjects": train_subj, "heldout_subjects": held,
        "data": str(Path(args.data).absolute()), "frames": len(slices), "trained_on": "see MODEL_CARD.md",
        "age_range": [float(slices.age.min()), float(slices.age.max())],
    }
    with open(out / "split.json", "w") as f:
        json.dump({"train": train_subj, "heldout": held, "seed": args.seed, "data": str(Path(args.data).absolute())}, f, indent=2)
    tcfg = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             bins_per_sample=args.bins_per_sample, seed=args.seed)
    t1 = time.time()
    history = train.train(model, slices, out, tcfg, resume=args.resume, max_seconds=(args.max_minutes or 0) * 60 or None)
    model.meta["epochs"] = history[-1]["epoch"] if history else 0
    model.meta["train_seconds"] = round(time.time() - t1, 1)
    model.meta["final_losses"] = {k: history[-1][k] for k in train.LOSS_NAMES} if history else {}
    model.save(out / "daninet.pt")
    print(f"trained {model.meta['epochs']} epochs in {model.meta['train_seconds']:.0f}s; "
          f"parameters E {count_parameters(model.E)}, G {count_parameters(model.G)}, "
          f"D_z {count_parameters(model.Dz)}, D_b {count_parameters(model.Db)}; weights {out / 'daninet.pt'}")
    return 0


def _train_flow(args: argparse.Namespace, out: Path, train_scans, train_subj, held) -> int:
    from inbrainsyn.daninet import flow_train
    from inbrainsyn.templates import load_bank

    band = tuple(args.slice_band) if args.slice_band else flow_train.brain_band(load_bank(None).mask)
    t0 = time.time()
    prepared = flow_train.prepare(train_scans, band, out / "frames.pt", 32 if args.tiny else 128,
                                  identity=args.identity_alignment)
    print(f"{len(prepared['subject'])} scans of {len(train_subj)} subjects, slices {band[0]} .. {band[1]} "
          f"({time.time() - t0:.0f}s)", flush=True)
    model = flow_train.new_model(band, prepared["grid_size_zyx"], tiny=args.tiny,
                                 grid_geometry=prepared.get("grid_geometry"))
    model.meta.update({"train_subjects": train_subj, "heldout_subjects": held, "data": str(Path(args.data).absolute()),
                       "slice_stride": 1, "age_range": [float(prepared["age"].min()), float(prepared["age"].max())],
                       "trained_on": "synthetic phantom cohort; see MODEL_CARD.md"})
    with open(out / "split.json", "w") as f:
        json.dump({"train": train_subj, "heldout": held, "seed": args.seed, "data": str(Path(args.data).absolute())}, f, indent=2)
    cfg = flow_train.FlowTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    history = flow_train.train(model, prepared, out, cfg, resume=args.resume,
                               max_seconds=(args.max_minutes or 0) * 60 or None)
    model.meta["final_losses"] = dict(history[-1]) if history else {}
    model.save(out / "daninet.pt")
    print(f"trained {model.meta['steps']} steps; {sum(p.numel() for p in model.parameters())} parameters; "
          f"weights {out / 'daninet.pt'}")
    return 0


def _reporter(args):
    from inbrainsyn.cli.common import make_reporter

    return make_reporter(args)


def run_preview(args: argparse.Namespace) -> int:
    """``daninet preview``; with ``--json`` every failure also ends the stream with an error event."""
    from inbrainsyn.progress import errors_reported

    reporter = _reporter(args)
    with errors_reported(reporter, args.json):
        manifest = _preview(args, reporter)
    if args.json:
        reporter.result(str(manifest))
    return 0


def _preview(args: argparse.Namespace, reporter) -> "Path":
    import SimpleITK as sitk

    from inbrainsyn import io
    from inbrainsyn.daninet import preview

    io.check_output_path(args.output, args.overwrite)
    t0 = time.perf_counter()
    reporter.progress("load", 0.0, f"reading {args.input}")
    native = io.read_image(args.input)  # errors name the file itself
    model = preview.load_model(args.weights)
    grid = tuple(model.meta.get("grid_size_zyx") or ())
    band = tuple(model.cfg.slice_band)
    if args.native_slice is not None:  # refuse a slice outside the input before the (slow) alignment
        preview.check_native_slice(args.native_slice, native, args.input)
    alignment = "none (input on the template grid)"
    diagnostics = None
    # the default bank's mask, read from its file alone (importing and validating the bank costs a
    # fresh process ~0.5 s): the template grid of a reused alignment and the brain the change is kept near
    template_mask = preview.template_brain_mask()
    on_bank_grid = tuple(reversed(template_mask.GetSize())) == grid
    if args.in_template_space or tuple(reversed(native.GetSize())) == grid:
        image, reference, transform = native, native, sitk.Transform(3, sitk.sitkIdentity)
    else:
        from inbrainsyn.daninet import alignment as align

        if args.alignment:
            reporter.progress("align", 0.1, f"reusing the alignment in {args.alignment}")
            transform = align.read_alignment(args.alignment, native)
            alignment = f"reused from {Path(args.alignment).absolute()}"
            # only the template grid is needed: the bank's, or the one weights on another grid record
            reference = None if on_bank_grid else preview.template_grid(model)
            if reference is None:
                reference = template_mask
        else:
            from inbrainsyn.templates import load_bank

            bank = load_bank(None)
            lo, hi = bank.age_range(args.cohort)
            reference = bank.template(args.cohort, min(max(args.age, lo), hi))
            reporter.progress("align", 0.1, "coarse affine alignment to the template")
            transform = align.coarse_alignment(native, reference, template_mask)  # the bank's mask, read above
            alignment = "coarse affine (8/4 mm)"
        image = align.to_template_grid(native, reference, transform)
        diagnostics = align.alignment_record(transform, native)  # lets the next preview of this scan reuse it
    t_align = time.perf_counter() - t0
    slice_index = args.slice
    inputs = {"image": str(Path(args.input).absolute())}
    if args.native_slice is not None:
        slice_index = preview.template_slice_for_native_slice(args.native_slice, native, reference, transform,
                                                              band, args.input)
        inputs["native_slice"] = int(args.native_slice)
        reporter.log(f"native slice {args.native_slice} -> template slice {slice_index}")
    reporter.progress("predict", 0.6, f"DaniNet on template slice {slice_index}")
    from inbrainsyn import fields
    from inbrainsyn.daninet import geometry

    # the slice-ageing model's change is kept near the template brain when the model is on the bank's grid
    brain_mask = template_mask if preview.is_flow(model) and on_bank_grid else None
    result = preview.preview_slices(image, slice_index, args.age, args.cohort, args.targets, model=model,
                                    device=fields.resolve_device(args.device),
                                    finetune_steps=args.finetune_steps, assembly=args.assembly, brain_mask=brain_mask)
    reporter.progress("write", 0.9, f"writing {args.output}")
    manifest = preview.write_preview(
        result, args.output, inputs=inputs,
        parameters={"weights": str(Path(args.weights).absolute()) if args.weights else "shipped",
                    "alignment": alignment,
                    "change_within_mm_of_template_brain": geometry.BRAIN_MARGIN_MM if brain_mask is not None else None},
        reference=reference, overwrite=args.overwrite, extra_timings={"load_and_align": t_align},
        diagnostics=diagnostics)
    reporter.progress("write", 1.0, "done")
    if not args.json:
        print(f"slice {result['slice_index']} at {', '.join(f'{t:g}' for t in result['targets'])} y: {manifest}")
    return manifest


def run_evaluate(args: argparse.Namespace) -> int:
    from inbrainsyn import evaluate as ev
    from inbrainsyn.daninet import data, preview
    from inbrainsyn.daninet.evaluate import METHODS, evaluate_subject, markdown_table

    model = preview.load_model(args.weights)
    if preview.is_flow(model):
        return _evaluate_flow(args, model)
    scans = data.read_cohort(args.data)
    if args.subjects:
        chosen = list(args.subjects)
    elif args.split:
        chosen = json.loads(Path(args.split).read_text())["heldout"]
    else:
        chosen = model.meta.get("heldout_subjects") or []
    if not chosen:
        raise InputError("no subjects to evaluate: give --subjects or --split (train with --holdout N)")
    masks = {}
    with open(args.data, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("mask_path"):
                masks[str(Path(args.data).parent / row["path"])] = str(Path(args.data).parent / row["mask_path"])
    reference = data.load_on_grid(scans[0].path, None)
    stride = args.slice_stride or int(model.meta.get("slice_stride", 3))
    rows = []
    for subj in chosen:
        sub_scans = [s for s in scans if s.subject == subj]
        if len(sub_scans) < 2:
            raise InputError(f"subject {subj!r} has fewer than 2 scans in {args.data}")
        print(f"evaluating {subj} ({len(sub_scans) - 1} follow-ups)", flush=True)
        rows += evaluate_subject(model, sub_scans, masks, reference, stride, with_inbrainsyn=args.with_inbrainsyn,
                                 cache_dir=args.inbrainsyn_cache)
    summary = ev.summarise(rows, list(METHODS) + (["inbrainsyn"] if args.with_inbrainsyn else []))
    table = markdown_table(summary)
    return _write_evaluation(args, rows, table, {"subjects": chosen, "summary": summary})


def _evaluate_flow(args: argparse.Namespace, model) -> int:
    """``daninet evaluate`` for the slice-ageing model: a phantom folder, clean truths, ventricle areas."""
    from inbrainsyn import evaluate as ev
    from inbrainsyn.daninet import flow_evaluate
    from inbrainsyn.templates import load_bank

    folder = Path(args.data).parent
    cohort = ev.read_cohort(folder)
    if args.subjects:
        chosen = list(args.subjects)
    elif args.split:
        chosen = json.loads(Path(args.split).read_text())["heldout"]
    else:
        trained_here = Path(model.meta.get("data", "")).resolve() == Path(args.data).resolve()
        chosen = [s for s in cohort if not (trained_here and s in model.meta.get("train_subjects", []))]
    missing = [s for s in chosen if s not in cohort]
    if missing or not chosen:
        raise InputError(f"no such subjects in {args.data}: {', '.join(missing) or '(none chosen)'}")
    bank = load_bank(None)
    stride = args.slice_stride or 3
    rows = []
    for name in chosen:
        print(f"evaluating {name} ({len(cohort[name]) - 1} follow-ups)", flush=True)
        rows += flow_evaluate.evaluate_subject(model, cohort[name], bank, stride=stride,
                                               inbrainsyn_cache=args.inbrainsyn_cache, inputs=args.inputs)
    summary = flow_evaluate.summary(rows)
    table = flow_evaluate.markdown(summary)
    return _write_evaluation(args, rows, table, {"subjects": chosen, "slice_stride": stride, "inputs": args.inputs,
                                                 "summary": summary})


def _write_evaluation(args, rows: list, table: str, manifest: dict) -> int:
    """Publish an evaluation (metrics.csv, table.md, manifest.json) atomically and print the table."""
    from inbrainsyn import io

    with io.staged_output_dir(args.output, args.overwrite) as stage:
        with open(stage / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        (stage / "table.md").write_text(table, encoding="utf-8")
        io.write_json({"tool": "inbrainsyn", "command": "daninet evaluate", "data": str(Path(args.data).absolute()),
                       **manifest,
                       "outputs": [{"kind": "metrics", "path": "metrics.csv"}, {"kind": "table", "path": "table.md"}]},
                      stage / "manifest.json")
    print(table)
    return 0
