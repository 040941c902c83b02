"""Compute cost of the reference pipeline's registration network, beside ours, on this machine.

The reference InBrainSyn code (Fjr9516/InBrainSyn, METHODS.md §1) registers with the registration
branch of an Atlas-GAN generator: concat(fixed, moving) at 208x176x160 -> 4 stride-2 convs (32 ch,
InstanceNorm, LeakyReLU 0.2) -> bottleneck -> 3 up-blocks with skips -> 3 convs -> SVF at half
resolution 104x88x80 -> scaling and squaring (5 steps) -> x2 upsampling -> warp.  Its weights are not
available here, so this rebuilds the architecture with random weights and times a forward pass
(compute cost only, no accuracy).  Ours is instance optimisation and needs no weights; its time is
measured by `bench_registration.py` / `bench_synthesize.py`.

Run:  python benchmarks/bench_reference_network.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from inbrainsyn import fields


def conv_block(cin, cout, stride):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.InstanceNorm3d(cout), nn.LeakyReLU(0.2))


class ReferenceRegistrationNet(nn.Module):
    """Architecture of the reference registration branch (shapes as in METHODS.md §1)."""

    def __init__(self, width=32):
        super().__init__()
        self.down = nn.ModuleList([conv_block(2 if i == 0 else width, width, 2) for i in range(4)])
        self.bottleneck = conv_block(width, width, 1)
        self.up = nn.ModuleList([conv_block(2 * width, width, 1) for _ in range(3)])
        self.head = nn.Sequential(conv_block(width, width, 1), conv_block(width, width, 1), nn.Conv3d(width, 3, 3, 1, 1))

    def forward(self, fixed, moving):
        x = torch.cat([fixed, moving], 1)
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        x = self.bottleneck(x)
        for layer, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = layer(torch.cat([x, skip], 1))
        return self.head(x)  # SVF at half resolution


def reference_forward(net, fixed, moving):
    v_half = net(fixed, moving)[0]
    disp_half = fields.exp(v_half, steps=5)
    disp = fields.resize_field(disp_half, fixed.shape[2:])
    return fields.warp(moving[0, 0], disp)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = ReferenceRegistrationNet().eval()
    fixed = torch.rand(1, 1, 208, 176, 160)
    moving = torch.rand(1, 1, 208, 176, 160)
    times = []
    with torch.no_grad():
        reference_forward(net, fixed, moving)  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            reference_forward(net, fixed, moving)
            times.append(time.perf_counter() - start)
    result = {
        "what": "reference registration network forward + 5-step scaling and squaring + x2 upsampling + warp, random weights",
        "input": [208, 176, 160],
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in net.parameters()),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": "cpu",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
