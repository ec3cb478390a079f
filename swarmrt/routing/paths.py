"""The rules of a path: which routes a microbatch may take through the stages.

A *route* is the forward visit order of one microbatch: a tuple of hops
``(stage, peer)``. It starts on a stage-0 peer (its *origin*: the trainer or
the peer that holds the data). Backward retraces the forward hops in reverse.

Two shapes exist (``PathRules.first_stage_is_also_last``):

- ``False`` (a plain pipeline): ``(0, origin) -> middles... -> (S-1, last)``.
  Stage 0 and stage S-1 are never skipped; stages 1..S-2 are middle stages.
- ``True`` (embedding and head live together on stage 0, as in SkipPipe's
  LLaMa runs and the ``geo-aws18`` scenario):
  ``(0, origin) -> middles... -> (0, origin)``. Stage 0 is both first and
  last, the route returns to its origin, and every one of stages 1..S-1 is a
  middle stage that may be skipped.

In both shapes a microbatch visits exactly ``round((1 - skip_ratio) * S)``
*distinct* stages (stage 0 counted once; ``round`` rounds halves up). A
scenario's ``stages_visited_per_microbatch`` is that number:
``PathRules.from_visited`` turns it into a skip ratio.

Each rule is a small named function returning True when the route obeys it,
so a test, a log line or :func:`validate_route` can say exactly which rule a
route broke. Rules that are not about a single route live beside them:

- balance: over a window of microbatches every middle stage receives within
  ``balance_tolerance`` (10%) of the mean count (:func:`balance_violations`,
  and :func:`balance_feasible`, which a scheduler uses to keep the rule
  reachable while it routes one microbatch at a time);
- memory: a peer never holds more microbatch activations at once than its
  memory allows (:func:`memory_violations`, checked on a timeline of holds).

Pure: no clock, no randomness.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Hashable, Iterable, Mapping, NamedTuple, Sequence

PeerId = Hashable


class Hop(NamedTuple):
    """One visit of a route: the stage computed and the peer that computes it."""

    stage: int
    peer: PeerId


@dataclasses.dataclass(frozen=True)
class Route:
    """The forward visit order of one microbatch (backward is its reverse)."""

    origin: PeerId
    """The stage-0 peer where the microbatch starts (and, if stage 0 is also last, ends)."""
    hops: tuple[Hop, ...]
    """Forward visits in order, ``hops[0] == (0, origin)``."""
    microbatch: int = -1
    """Caller's id of the microbatch (-1: not set)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hops", tuple(Hop(int(s), p) for s, p in self.hops))
        if not self.hops:
            raise ValueError("Route.hops must not be empty")

    @property
    def stages(self) -> tuple[int, ...]:
        """Stage of each hop, in visit order."""
        return tuple(h.stage for h in self.hops)

    @property
    def path(self) -> tuple[PeerId, ...]:
        """Peer of each hop, in visit order (the ``path`` of the plan JSON)."""
        return tuple(h.peer for h in self.hops)

    def backward(self) -> tuple[Hop, ...]:
        """The backward visit order: the forward hops, reversed."""
        return tuple(reversed(self.hops))

    def middle_stages(self, rules: "PathRules") -> tuple[int, ...]:
        """The middle stages this route visits, in order."""
        middle = set(rules.middle_stages)
        return tuple(h.stage for h in self.hops if h.stage in middle)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


@dataclasses.dataclass(frozen=True)
class PathRules:
    """The static rules every route of a run obeys."""

    stages: int
    """Number of pipeline stages S (>= 2)."""
    skip_ratio: float = 0.0
    """Share of the S stages a microbatch skips; 0 is the full pipeline. In [0, 1)."""
    first_stage_is_also_last: bool = False
    """True when stage 0 computes both the first and the last layers (the route returns to its origin)."""
    balance_tolerance: float = 0.10
    """Largest relative deviation of a middle stage's count from the mean over a window."""

    def __post_init__(self) -> None:
        if not isinstance(self.stages, int) or self.stages < 2:
            raise ValueError(f"PathRules.stages must be an integer >= 2, got {self.stages!r}")
        if not (0.0 <= self.skip_ratio < 1.0):
            raise ValueError(f"PathRules.skip_ratio must be in [0, 1), got {self.skip_ratio!r}")
        if not (0.0 <= self.balance_tolerance < 1.0):
            raise ValueError(f"PathRules.balance_tolerance must be in [0, 1), got {self.balance_tolerance!r}")
        fixed = 1 if self.first_stage_is_also_last else 2
        if self.visited < fixed:
            raise ValueError(
                f"PathRules.skip_ratio {self.skip_ratio} leaves {self.visited} of {self.stages} stages, "
                f"but the first{'' if self.first_stage_is_also_last else ' and last'} stage can never be skipped "
                f"(need at least {fixed})")

    @classmethod
    def from_visited(cls, stages: int, visited: int, first_stage_is_also_last: bool,
                     balance_tolerance: float = 0.10) -> "PathRules":
        """Rules from a scenario's ``stages_visited_per_microbatch`` (skip ratio = 1 - visited / S)."""
        if not isinstance(visited, int) or not (1 <= visited <= stages):
            raise ValueError(f"stages_visited_per_microbatch must be an integer in [1, {stages}], got {visited!r}")
        rules = cls(stages=stages, skip_ratio=1.0 - visited / stages,
                    first_stage_is_also_last=first_stage_is_also_last, balance_tolerance=balance_tolerance)
        assert rules.visited == visited, (rules.visited, visited)
        return rules

    @property
    def visited(self) -> int:
        """Distinct stages each microbatch visits: ``round((1 - skip_ratio) * S)``, halves up."""
        return _round_half_up((1.0 - self.skip_ratio) * self.stages)

    @property
    def last_stage(self) -> int:
        """The stage that computes the loss: 0 when stage 0 is also last, else S-1."""
        return 0 if self.first_stage_is_also_last else self.stages - 1

    @property
    def middle_stages(self) -> tuple[int, ...]:
        """Stages that may be skipped."""
        if self.first_stage_is_also_last:
            return tuple(range(1, self.stages))
        return tuple(range(1, self.stages - 1))

    @property
    def middle_visits(self) -> int:
        """How many middle stages each microbatch visits."""
        return self.visited - (1 if self.first_stage_is_also_last else 2)


# --- rules about one route ---------------------------------------------------------------


def starts_at_origin(route: Route, rules: PathRules) -> bool:
    """The first hop is stage 0 on the route's origin."""
    return route.hops[0] == Hop(0, route.origin)


def ends_at_last_stage(route: Route, rules: PathRules) -> bool:
    """The last stage is never skipped: the route ends on it (on the origin when stage 0 is also last)."""
    last = route.hops[-1]
    if rules.first_stage_is_also_last:
        return len(route.hops) >= 2 and last == Hop(0, route.origin)
    return last.stage == rules.stages - 1 and len(route.hops) >= 2


def stages_increase(route: Route, rules: PathRules) -> bool:
    """Stages are valid and strictly increase between the first hop and the last stage (each visited once)."""
    stages = list(route.stages)
    if rules.first_stage_is_also_last and len(stages) >= 2 and stages[-1] == 0:
        stages = stages[:-1]  # the return to the origin is the last stage, checked by ends_at_last_stage
    if any(not (0 <= s < rules.stages) for s in stages):
        return False
    return all(a < b for a, b in zip(stages, stages[1:]))


def visits_required_count(route: Route, rules: PathRules) -> bool:
    """Exactly ``rules.visited`` distinct stages are visited (stage 0 counted once)."""
    return len(set(route.stages)) == rules.visited and len(route.hops) == (
        rules.visited + 1 if rules.first_stage_is_also_last else rules.visited)


ROUTE_RULES: dict[str, Callable[[Route, PathRules], bool]] = {
    "starts_at_origin": starts_at_origin,
    "ends_at_last_stage": ends_at_last_stage,
    "stages_increase": stages_increase,
    "visits_required_count": visits_required_count,
}
"""Every rule about a single route, by name."""


def peers_serve_their_stage(route: Route, peer_stage: Mapping[PeerId, int]) -> bool:
    """Every hop's peer serves that hop's stage (``peer_stage``: peer -> stage it serves)."""
    return all(peer_stage.get(h.peer) == h.stage for h in route.hops)


def backward_retraces_forward(route: Route, backward: Sequence[Hop]) -> bool:
    """The backward visits are exactly the forward hops in reverse order."""
    return tuple(Hop(int(s), p) for s, p in backward) == route.backward()


def validate_route(route: Route, rules: PathRules, peer_stage: Mapping[PeerId, int] | None = None,
                   backward: Sequence[Hop] | None = None) -> list[str]:
    """Names of the rules ``route`` breaks; an empty list means the route is legal.

    ``peer_stage`` (peer -> stage) adds the rule ``peers_serve_their_stage``;
    ``backward`` (the backward visit order actually taken) adds
    ``backward_retraces_forward``.
    """
    broken = [name for name, rule in ROUTE_RULES.items() if not rule(route, rules)]
    if peer_stage is not None and not peers_serve_their_stage(route, peer_stage):
        broken.append("peers_serve_their_stage")
    if backward is not None and not backward_retraces_forward(route, backward):
        broken.append("backward_retraces_forward")
    return broken


# --- balance of middle stages over a window ----------------------------------------------


def balance_bounds(mean: float, tolerance: float) -> tuple[int, int]:
    """Integer counts ``[lo, hi]`` a middle stage may receive when the mean is ``mean``.

    Within ``tolerance`` of the mean; when no integer lies in that band (small
    windows, e.g. a mean of 3.3), the nearest integers on either side of the
    mean are allowed so that some balanced assignment always exists.
    """
    lo = min(math.ceil(mean * (1.0 - tolerance) - 1e-9), math.floor(mean + 1e-9))
    hi = max(math.floor(mean * (1.0 + tolerance) + 1e-9), math.ceil(mean - 1e-9))
    return max(lo, 0), hi


def stage_counts(routes: Iterable[Route], rules: PathRules) -> dict[int, int]:
    """How many of ``routes`` visit each middle stage."""
    counts = {s: 0 for s in rules.middle_stages}
    for r in routes:
        for s in r.middle_stages(rules):
            counts[s] += 1
    return counts


def balance_violations(counts: Mapping[int, int], rules: PathRules) -> list[str]:
    """Middle stages whose count over a window is outside :func:`balance_bounds` of the mean.

    ``counts`` maps every middle stage to the microbatches it received in the
    window. Returns messages like ``"stage 2: 30 not in [22, 26] (mean 24.0)"``.
    """
    middle = rules.middle_stages
    if not middle:
        return []
    total = sum(counts.get(s, 0) for s in middle)
    mean = total / len(middle)
    lo, hi = balance_bounds(mean, rules.balance_tolerance)
    return [f"stage {s}: {counts.get(s, 0)} not in [{lo}, {hi}] (mean {mean:.1f})"
            for s in middle if not (lo <= counts.get(s, 0) <= hi)]


def balance_feasible(counts: Mapping[int, int], remaining: int, window: int, rules: PathRules) -> bool:
    """Can ``remaining`` more microbatches still bring ``counts`` within balance at the window's end?

    ``window`` microbatches in all, each visiting ``rules.middle_visits``
    middle stages, so the final mean is known in advance. Each stage needs
    ``d_s = max(0, lo - c_s)`` more visits and takes at most
    ``u_s = min(remaining, hi - c_s)``; since any microbatch may visit any
    ``k`` distinct middle stages, a completion exists exactly when every
    ``d_s <= u_s`` and ``sum d_s <= remaining * k <= sum u_s`` (a degree
    sequence of a complete bipartite graph).
    """
    middle = rules.middle_stages
    k = rules.middle_visits
    if not middle or k == 0:
        return True
    mean = window * k / len(middle)
    lo, hi = balance_bounds(mean, rules.balance_tolerance)
    need = take = 0
    for s in middle:
        c = counts.get(s, 0)
        d = max(0, lo - c)
        u = min(remaining, hi - c)
        if u < 0 or d > u:
            return False
        need += d
        take += u
    return need <= remaining * k <= take


# --- memory ---------------------------------------------------------------------------------


def memory_violations(holds: Mapping[PeerId, Iterable[tuple[float, float]]],
                      memory: Mapping[PeerId, int]) -> list[str]:
    """Peers that ever held more activations at once than their memory allows.

    ``holds[peer]`` lists ``(start, end)`` intervals during which the peer held
    one microbatch's activations (from its forward to the end of its backward).
    An interval ending exactly when another starts does not overlap it.
    """
    broken = []
    for peer, intervals in holds.items():
        events = []
        for start, end in intervals:
            events.append((start, 1))
            events.append((end, -1))
        events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at equal times
        level = peak = 0
        for _, delta in events:
            level += delta
            peak = max(peak, level)
        limit = memory.get(peer)
        if limit is not None and peak > limit:
            broken.append(f"peer {peer!r}: held {peak} microbatches, memory allows {limit}")
    return broken
