"""Time, peak memory and accuracy of each transport method on a 1 mm-sized grid; error vs ladder steps.

Fields are smooth synthetic SVFs (sums of plane sinusoids; see Testing/test_transport.py):
u = template ageing (max |u| 3 voxels, wavelength 24 voxels), v = template-to-subject
(max |v| 15 voxels, wavelength 120 voxels, so |Dv| < 1: a plausible diffeomorphism).
Reference: the exact half-conjugation Ad_exp(-v/2) u (push-forward, no series) for SVFs, and the
three-map composition exp(-v/2) o exp(u) o exp(v/2) for displacements.  Errors are vector
lengths in voxels over the grid minus a 10-voxel border, and "rel" divides the mean error by the
mean size of the correction |Ad u - u| (what the transport is supposed to add to u).

    /work/venv/bin/python benchmarks/bench_transport.py --shape 160 190 160 --json /tmp/bench_transport.json

Peak memory: CPU = peak resident memory above the level before the call (sampled every 5 ms);
CUDA = torch.cuda.max_memory_allocated above the level before the call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

from inbrainsyn import fields  # noqa: E402
from inbrainsyn import transport as tr  # noqa: E402


def fourier_field(shape, max_norm, wavelength, modes=6, seed=0, device="cpu"):
    """Smooth random ``(3, Z, Y, X)`` float32 field: sum of plane sinusoids of one wavelength."""
    gen = torch.Generator().manual_seed(seed)
    x = fields.voxel_coordinates(shape, device=device, dtype=torch.float32)
    out = torch.zeros((3, *shape), device=device)
    for _ in range(modes):
        k = torch.randn(3, generator=gen, dtype=torch.float64)
        k = (k / k.norm() * (2 * math.pi / wavelength)).float().to(device)
        amplitude = torch.randn(3, generator=gen).to(device)
        phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
        out += amplitude.view(3, 1, 1, 1) * torch.sin(torch.einsum("i,i...->...", k, x) + phase)
    return out / out.norm(dim=0).max() * max_norm


class PeakMemory:
    """Peak memory above the starting level during a ``with`` block (CPU RSS sampling or CUDA stats)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def _rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._rss_bytes()
            self._peak = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss_bytes())
            self.peak_mb = (self._peak - self._start) / 2**20
        return False


def timed(device, fn):
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return result, seconds, memory.peak_mb


def error_stats(field, reference, margin, correction):
    err = (field - reference).norm(dim=0)[margin:-margin, margin:-margin, margin:-margin].flatten()
    sample = err[:: max(1, err.numel() // 2_000_000)]  # quantile() refuses very large tensors
    return {
        "mean": float(err.mean()),
        "p99": float(torch.quantile(sample.double(), 0.99)),
        "max": float(err.max()),
        "rel": float(err.mean()) / correction,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 190, 160], metavar=("Z", "Y", "X"))
    parser.add_argument("--u-max", type=float, default=3.0)
    parser.add_argument("--u-wavelength", type=float, default=24.0)
    parser.add_argument("--v-max", type=float, default=15.0)
    parser.add_argument("--v-wavelength", type=float, default=120.0)
    parser.add_argument("--methods", nargs="+", default=list(tr.METHODS), choices=tr.METHODS)
    parser.add_argument("--pole-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--schild-steps", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--schild-default-steps", type=int, default=16,
                        help="steps for the schild row of the method table (its automatic choice, 2 max|v|, is slow)")
    parser.add_argument("--margin", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = fields.resolve_device(args.device)
    shape = tuple(args.shape)
    u = fourier_field(shape, args.u_max, args.u_wavelength, seed=1, device=device)
    v = fourier_field(shape, args.v_max, args.v_wavelength, seed=2, device=device)
    max_dv = float(fields.spatial_gradient(v[0:1]).abs().max())
    print(f"grid {shape} ({math.prod(shape) / 1e6:.2f} M voxels), device {device}, threads {torch.get_num_threads()}, "
          f"max|u| {args.u_max} vox, max|v| {args.v_max} vox, max|dv_x/dx| {max_dv:.2f}", flush=True)

    reference, ref_s, ref_mb = timed(device, lambda: tr.conjugate(u, v, 0.5))
    correction = float((reference - u).norm(dim=0)[args.margin:-args.margin, args.margin:-args.margin,
                                                    args.margin:-args.margin].mean())
    reference_disp = tr.conjugated_displacement(u, v, 0.5)
    print(f"mean correction |Ad u - u| = {correction:.4f} voxel", flush=True)

    rows = []
    for method in args.methods:
        steps = args.schild_default_steps if method == "schild" else tr.default_steps(method, v)
        if method == "half-conjugation":
            w, seconds, peak = reference, ref_s, ref_mb
        else:
            w, seconds, peak = timed(device, lambda: tr.transport(u, v, method, steps=steps))
        disp, disp_s, disp_mb = timed(device, lambda: tr.transported_displacement(u, v, method, steps=steps, transported=w))
        row = {
            "method": method, "steps": steps, "svf_s": round(seconds, 2), "svf_peak_mb": round(peak),
            "displacement_s": round(disp_s, 2), "displacement_peak_mb": round(disp_mb),
            "svf_error": error_stats(w, reference, args.margin, correction),
            "displacement_error": error_stats(disp, reference_disp, args.margin, correction),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del w, disp

    ladder = []
    for method, steps_list in (("pole", args.pole_steps), ("schild", args.schild_steps)):
        for steps in steps_list:
            w, seconds, peak = timed(device, lambda: tr.transport(u, v, method, steps=steps))
            entry = {"method": method, "steps": steps, "s": round(seconds, 2), "peak_mb": round(peak),
                     "svf_error": error_stats(w, reference, args.margin, correction)}
            ladder.append(entry)
            print(json.dumps(entry), flush=True)
            del w

    print("\n| method | steps | SVF time (s) | SVF peak (MB) | SVF err mean / p99 / max (vox) | rel | "
          "disp. time (s) | disp. err mean / p99 (vox) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, d = r["svf_error"], r["displacement_error"]
        print(f"| {r['method']} | {r['steps'] or '-'} | {r['svf_s']} | {r['svf_peak_mb']} | "
              f"{e['mean']:.4f} / {e['p99']:.4f} / {e['max']:.4f} | {e['rel']:.1%} | {r['displacement_s']} | "
              f"{d['mean']:.4f} / {d['p99']:.4f} |")
    print("\n| ladder | n | time (s) | peak (MB) | SVF err mean / p99 / max (vox) | rel |")
    print("|---|---|---|---|---|---|")
    for r in ladder:
        e = r["svf_error"]
        print(f"| {r['method']} | {r['steps']} | {r['s']} | {r['peak_mb']} | "
              f"{e['mean']:.4f} / {e['p99']:.4f} / {e['max']:.4f} | {e['rel']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "correction": correction,
                                               "methods": rows, "ladder": ladder}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
