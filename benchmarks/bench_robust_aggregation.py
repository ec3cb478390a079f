"""Robust aggregation of one all-reduce part: how far one hostile sender moves it, and what it costs.

    PYTHONPATH=. python benchmarks/bench_robust_aggregation.py [--senders 4] [--values 131072] [--noise 0.1] [--repeats 5]

A part of ``--values`` float32 values (131,072 is hivemind's default part: 512 KiB) from
``--senders`` senders: the honest ones send a shared N(0, 1) direction plus ``--noise`` times
their own N(0, 1) (DiLoCo peers' pseudo-gradients are alike), the last one sends the first
honest part scaled 1e6x (seed 0). Prints, per rule and with the outlier filter on (factor 10,
the default) and off: the relative L2 distance of the result from the honest senders' mean,
and the median seconds of one :func:`swarmrt.local_sgd.robust.aggregate` call over the repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from swarmrt.local_sgd.config import AGGREGATIONS, LocalSGDSection
from swarmrt.local_sgd.robust import aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--values", type=int, default=131_072)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(args.values, generator=gen)
    honest = [shared + args.noise * torch.randn(args.values, generator=gen) for _ in range(args.senders - 1)]
    target = torch.stack(honest).mean(dim=0)
    parts = honest + [honest[0] * 1e6]
    weights = [1.0] * len(parts)
    print(f"{args.senders} senders (1 scaled 1e6x), {args.values} values, honest noise {args.noise}")
    print(f"{'rule':<14} {'outliers':<9} {'distance':>10} {'seconds':>9}  left out")
    for name in AGGREGATIONS:
        for factor in (10.0, 0.0):
            rule = dataclasses.replace(LocalSGDSection(), aggregation=name, outlier_factor=factor)
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                result = aggregate(parts, weights, rule)
                seconds.append(time.perf_counter() - started)
            distance = float((result.value - target).norm() / target.norm())
            label = "n/a" if name == "mean" else ("on" if factor else "off")
            print(f"{name:<14} {label:<9} {distance:>10.3g} {statistics.median(seconds):>9.4f}  "
                  f"{sorted(result.excluded)}")
            if name == "mean":
                break  # the mean never filters outliers


if __name__ == "__main__":
    main()
