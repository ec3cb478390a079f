"""Bottleneck assignment with disjoint resources: the search the planner and the replay's bounds share.

Each slot (an origin, a pipeline position) takes one option (a path, a
pipeline); an option uses a set of resources (peers), and no resource may
serve two slots. :func:`bottleneck_assign` finds the smallest threshold
for which every slot has an option costing at most that much and the
options can be chosen disjoint: a binary search over the distinct costs,
each step a backtracking search (slots with the fewest options first,
each slot's cheapest options first). Pure and deterministic.
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

Slot = Hashable
Option = Hashable


def bottleneck_assign(slots: Sequence[Slot], options: Mapping[Slot, Sequence[Option]],
                      cost: Callable[[Slot, Option], float], uses: Callable[[Option], frozenset],
                      max_steps: int | None = None) -> tuple[float, dict[Slot, Option]] | None:
    """``(threshold, slot -> option)``, or None when no disjoint choice exists or the search runs past
    ``max_steps`` backtracking steps (None: no limit)."""
    table = {s: sorted(((cost(s, o), i, o) for i, o in enumerate(options[s])), key=lambda c: c[:2]) for s in slots}
    steps = 0

    def assign(threshold: float) -> dict | None:
        allowed = {s: [o for c, _, o in table[s] if c <= threshold] for s in slots}
        order = sorted(range(len(slots)), key=lambda k: (len(allowed[slots[k]]), k))

        def extend(k: int, used: frozenset) -> dict | None:
            nonlocal steps
            if k == len(order):
                return {}
            slot = slots[order[k]]
            for option in allowed[slot]:
                steps += 1
                if max_steps is not None and steps > max_steps:
                    return None
                mine = uses(option)
                if used.isdisjoint(mine):
                    rest = extend(k + 1, used | mine)
                    if rest is not None:
                        rest[slot] = option
                        return rest
            return None
        return extend(0, frozenset())

    values = sorted({c for s in slots for c, _, _ in table[s]})
    if not values:
        return None
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if assign(values[mid]) is not None:
            hi = mid
        elif max_steps is not None and steps > max_steps:
            return None
        else:
            lo = mid + 1
    found = assign(values[lo])
    return None if found is None else (values[lo], found)
