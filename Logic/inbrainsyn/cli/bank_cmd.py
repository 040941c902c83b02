"""``inbrainsyn bank``: inspect, validate or (re)build template banks."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bank", help="inspect, validate or build template banks",
                                   description="Inspect, validate or build template banks (docs/templates.md).")
    actions = parser.add_subparsers(dest="bank_action", metavar="ACTION")

    info = actions.add_parser("info", help="describe a bank (default: the shipped one)")
    info.add_argument("path", nargs="?", default=None, help="bank folder (default: shipped default bank)")
    info.set_defaults(func=run_info)

    validate = actions.add_parser("validate", help="check a bank folder and report every problem")
    validate.add_argument("path", help="bank folder holding bank.json")
    validate.set_defaults(func=run_validate)

    build = actions.add_parser("build", help="rebuild the default model bank from MNI152 2009a (nilearn) and AAL")
    build.add_argument("-o", "--output", required=True, help="output folder")
    build.add_argument("--mni-dir", default=None, help="folder of the MNI152 2009a maps (default: the nilearn package's)")
    build.add_argument("--aal", default="/tmp/mricron/usr/share/mricron/templates/aal.nii.gz",
                       help="AAL atlas NIfTI (Debian mricron-data templates/aal.nii.gz)")
    build.add_argument("--spacing", type=float, default=1.5, help="voxel size of the bank in mm (default 1.5)")
    build.set_defaults(func=run_build)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_info(args: argparse.Namespace) -> int:
    from inbrainsyn.templates.bank import load_bank

    print(load_bank(args.path).describe())
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from inbrainsyn.templates.bank import load_bank

    bank = load_bank(args.path)
    print(f"{bank.root}: valid template bank '{bank.name}' ({', '.join(bank.cohorts)})")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from inbrainsyn import io
    from inbrainsyn.templates.default_bank import build_default_bank

    with io.staged_output_dir(args.output, args.overwrite) as staging:
        build_default_bank(staging, mni_dir=args.mni_dir, aal_path=args.aal, spacing=args.spacing)
    print(f"default bank written to {args.output}")
    return 0
