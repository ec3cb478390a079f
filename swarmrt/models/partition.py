"""Cutting a model's layer list into contiguous pipeline stages (pure)."""

from __future__ import annotations

from typing import Sequence


def balanced_ranges(costs: Sequence[float], stages: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges, one per stage, minimising the largest stage cost.

    ``costs[i]`` is the cost of layer ``i`` (parameter count works well). Exact
    dynamic programme, O(stages * n^2): fine for the hundreds of layers a model has.
    Ties prefer putting more layers early.
    """
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if n < stages:
        raise ValueError(f"cannot cut {n} layers into {stages} stages: every stage needs at least one layer")
    prefix = [0.0]
    for c in costs:
        if c < 0:
            raise ValueError(f"layer costs must be >= 0, got {c}")
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[s][i]: minimal max-cost of cutting the first i layers into s stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges: list[tuple[int, int]] = []
    end = n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


def validate_ranges(ranges: Sequence[Sequence[int]], num_layers: int) -> list[tuple[int, int]]:
    """Check explicit ranges cover ``0..num_layers`` contiguously; return them as tuples."""
    out = [(int(a), int(b)) for a, b in ranges]
    if not out or out[0][0] != 0 or out[-1][1] != num_layers:
        raise ValueError(f"layer ranges {out} must cover layers 0..{num_layers} (the model has {num_layers} layers)")
    for (a0, b0), (a1, b1) in zip(out, out[1:]):
        if b0 != a1:
            raise ValueError(f"layer ranges must be contiguous: {(a0, b0)} is followed by {(a1, b1)}")
    if any(a >= b for a, b in out):
        raise ValueError(f"every layer range must be non-empty: {out}")
    return out
