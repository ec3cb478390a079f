"""Which stage a peer should serve: joins without races, and moves that raise the swarm's bottleneck.

Pure: the view of the swarm, the clock (``now``) and every threshold are arguments;
nothing here reads the DHT, a clock or a global random generator. The same functions
run in a live peer (:mod:`swarmrt.roles.peer`) and in the simulator
(``swarmrt simulate --rebalance``), so what is measured at 1,000 simulated peers is
what 8 real ones do.

The model. A pipeline is as fast as its slowest stage. A stage's *capacity* is
the sum of its peers' throughputs (samples/s each peer computes the stage at),
divided by the stage's *demand* (the share of microbatches that visit it: 1 for a
full pipeline; less for a middle stage that SkipPipe routes skip). The swarm's
*bottleneck* is the smallest capacity; its *balance quality* is bottleneck / mean
capacity (1.0: perfectly balanced).

Throughput is measured per peer per stage, and a peer that has not served a stage
has no figure there. A peer's figure elsewhere is estimated as its *speed* (its
throughput over the typical throughput of its current stage) times the typical
throughput of the other stage, where "typical" is the median of a stage's measured
peers (or of all stages, for a stage nobody has measured). Peers without any figure
count as typical.

Moves follow SWARM (peers of an over-served stage move to the bottleneck) and
Petals' block selection (move only when it raises the swarm's throughput by more
than a threshold; sum in a fixed order so that every peer computes the same
answer). :func:`plan_moves` is deterministic: every peer that sees the same
records computes the same list of moves, and only the peers named in it move.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Iterable, Mapping, Sequence

JOINING, SERVING, MOVING, LEAVING = "joining", "serving", "moving", "leaving"
STATES = (JOINING, SERVING, MOVING, LEAVING)


@dataclasses.dataclass(frozen=True)
class RebalanceRules:
    """When peers choose and change stages (the ``[rebalance]`` config section maps onto this)."""

    balance_quality: float = 0.8
    """The swarm rebalances only when its bottleneck is below this share of the bottleneck the same
    peers could reach (0.8: more than 25% is to be gained). In (0, 1]."""
    cooldown_s: float = 30.0
    """A peer that took its stage (joined or moved) less than this long ago does not move again."""
    max_moves: int = 0
    """Largest number of moves planned at once (one per source stage at most); 0: one per stage."""

    def __post_init__(self) -> None:
        if not 0 < self.balance_quality <= 1:
            raise ValueError(f"balance_quality must be in (0, 1], got {self.balance_quality!r}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s!r}")
        if self.max_moves < 0:
            raise ValueError(f"max_moves must be >= 0, got {self.max_moves!r}")


@dataclasses.dataclass(frozen=True)
class PeerState:
    """What the policy knows about one peer (its DHT record, read back)."""

    peer_id: str
    stage: int
    """The stage it serves (for a mover: the one it is leaving)."""
    state: str = SERVING
    """One of :data:`STATES`."""
    throughput: float = 0.0
    """Measured samples/s at ``stage``; 0 until measured."""
    pinned: bool = False
    """Started with ``--stage``: never moved by the policy."""
    target: int | None = None
    """For a ``moving`` peer: the stage it is moving to."""
    since: float = 0.0
    """When it took its current stage (joined or moved), on the caller's clock."""
    load: int = 0
    """Requests in flight (breaks ties between equally good targets: the busier stage first)."""
    settled: bool = False
    """A joiner that has made its choice: later joiners place themselves around it."""

    @property
    def serving_stage(self) -> int | None:
        """Where its capacity counts: its stage, a mover's target, nowhere while leaving."""
        if self.state == LEAVING:
            return None
        if self.state == MOVING:
            return self.target
        return self.stage


@dataclasses.dataclass(frozen=True)
class Move:
    peer_id: str
    source: int
    target: int
    bottleneck_before: float
    bottleneck_after: float
    reason: str


# -- the model ----------------------------------------------------------------------------------
def _demand(demand: Sequence[float] | None, num_stages: int) -> list[float]:
    if demand is None:
        return [1.0] * num_stages
    if len(demand) != num_stages or any(not d > 0 for d in demand):
        raise ValueError(f"demand must be {num_stages} positive numbers, got {list(demand)!r}")
    return [float(d) for d in demand]


@dataclasses.dataclass(frozen=True)
class SpeedModel:
    """Typical per-peer throughput of each stage, and each peer's speed relative to its stage."""

    typical: tuple[float, ...]

    @classmethod
    def fit(cls, peers: Iterable[PeerState], num_stages: int) -> "SpeedModel":
        measured: dict[int, list[float]] = {}
        for p in peers:
            if p.throughput > 0 and p.state in (SERVING, LEAVING) and 0 <= p.stage < num_stages:
                measured.setdefault(p.stage, []).append(p.throughput)
        overall = statistics.median([statistics.median(v) for v in measured.values()]) if measured else 1.0
        return cls(tuple(statistics.median(measured[s]) if s in measured else overall for s in range(num_stages)))

    def speed(self, peer: PeerState) -> float:
        """Its throughput over the typical one of its stage (1.0 when unmeasured)."""
        if peer.throughput > 0 and peer.state in (SERVING, LEAVING) and 0 <= peer.stage < len(self.typical):
            return peer.throughput / self.typical[peer.stage]
        return 1.0

    def at(self, peer: PeerState, stage: int) -> float:
        """Its throughput at ``stage``: measured there, or estimated from its speed."""
        if stage == peer.stage and peer.state == SERVING and peer.throughput > 0:
            return peer.throughput
        return self.speed(peer) * self.typical[stage]


def stage_capacity(peers: Sequence[PeerState], num_stages: int, model: SpeedModel | None = None
                   ) -> list[float]:
    """Samples/s each stage can take: the sum of its peers' throughputs (movers at their target),
    summed in peer-id order so every peer gets the same floating-point answer."""
    model = model or SpeedModel.fit(peers, num_stages)
    caps = [0.0] * num_stages
    for p in sorted(peers, key=lambda p: p.peer_id):
        s = p.serving_stage
        if s is not None and 0 <= s < num_stages:
            caps[s] += model.at(p, s)
    return caps


def bottleneck(caps: Sequence[float], demand: Sequence[float] | None = None) -> float:
    """The pipeline's throughput: its slowest stage's capacity over its demand."""
    return min(c / d for c, d in zip(caps, _demand(demand, len(caps))))


def balance_quality(caps: Sequence[float], demand: Sequence[float] | None = None) -> float:
    """Bottleneck / mean capacity (per unit of demand): 1.0 is a perfectly balanced swarm, 0 has an
    empty stage."""
    d = _demand(demand, len(caps))
    per = [c / x for c, x in zip(caps, d)]
    mean = sum(per) / len(per) if per else 0.0
    return min(per) / mean if mean > 0 else 0.0


# -- joins --------------------------------------------------------------------------------------
def plan_joins(peers: Sequence[PeerState], num_stages: int, demand: Sequence[float] | None = None
               ) -> dict[str, tuple[int, str]]:
    """Where every unpinned ``joining`` peer in ``peers`` should go: ``{peer_id: (stage, reason)}``.

    Peers that serve (or move, or joined pinned, or settled their choice) count where they are; the
    other joiners are
    then placed one at a time, in peer-id order, each on the stage with the least capacity
    (ties: the lowest stage). Every joiner that sees the same joiners computes the same
    placement, so peers started in the same second spread out instead of all taking the
    emptiest stage.
    """
    d = _demand(demand, num_stages)
    model = SpeedModel.fit(peers, num_stages)
    free = sorted((p for p in peers if p.state == JOINING and not (p.pinned or p.settled)), key=lambda p: p.peer_id)
    placed = [p for p in peers if not (p.state == JOINING and not (p.pinned or p.settled))]
    caps = stage_capacity(placed, num_stages, model)
    plan = {}
    for p in free:
        per = [c / x for c, x in zip(caps, d)]
        stage = min(range(num_stages), key=lambda s: (per[s], s))
        plan[p.peer_id] = (stage, f"stage {stage} has the least capacity ({per[stage]:.3g} samples/s per unit of "
                                  f"demand) of {num_stages} stages, counting {len(free)} joining peers")
        caps[stage] += model.at(p, stage)
    return plan


# -- moves --------------------------------------------------------------------------------------
def movable(peer: PeerState, serving_count: Mapping[int, int], now: float, rules: RebalanceRules,
            refill: bool = False) -> str | None:
    """Why ``peer`` may not move now (None: it may). ``refill``: to fill an empty stage, which the
    cooldown does not hold back."""
    if peer.pinned:
        return "pinned with --stage"
    if peer.state != SERVING:
        return f"it is {peer.state}"
    if not refill and now - peer.since < rules.cooldown_s:
        return f"cooling down ({now - peer.since:.0f} of {rules.cooldown_s:g} s)"
    if serving_count.get(peer.stage, 0) < 2:
        return f"it is the last peer of stage {peer.stage}"
    return None


def ideal_bottleneck(peers: Sequence[PeerState], num_stages: int, demand: Sequence[float] | None = None,
                     model: SpeedModel | None = None) -> float:
    """An upper bound on the bottleneck any placement of these peers reaches: pinned peers stay,
    every other peer's speed is poured where the swarm is lowest, as if peers were divisible
    (water-filling). Computed in closed form, so it is cheap at 1,000 peers."""
    d = _demand(demand, num_stages)
    model = model or SpeedModel.fit(peers, num_stages)
    fixed = [0.0] * num_stages
    free = 0.0
    for p in sorted(peers, key=lambda p: p.peer_id):
        s = p.serving_stage
        if s is None or not 0 <= s < num_stages:
            continue
        if p.pinned:
            fixed[s] += model.at(p, s)
        else:
            free += model.speed(p)
    # find B with sum_t max(0, B d_t - fixed_t) / typical_t = free: stages join the pool in order of fixed_t / d_t
    unit = [model.typical[t] for t in range(num_stages)]
    levels = sorted(range(num_stages), key=lambda t: fixed[t] / d[t])
    spent_rate, spent_base = 0.0, 0.0  # sum over joined stages of d_t / unit_t and fixed_t / unit_t
    for i, t in enumerate(levels):
        spent_rate += d[t] / unit[t]
        spent_base += fixed[t] / unit[t]
        level = (free + spent_base) / spent_rate
        nxt = fixed[levels[i + 1]] / d[levels[i + 1]] if i + 1 < num_stages else float("inf")
        if level <= nxt:
            return level
    return 0.0  # pragma: no cover - the last stage always stops the loop


CANDIDATES_PER_STAGE = 8
"""Peers of one stage a plan weighs as movers: spread over the stage's range of speeds (slowest,
fastest and evenly between). Keeps a plan of 1,000 peers in milliseconds; peers of equal speed
are interchangeable anyway."""


def _stage_candidates(peers: list[PeerState], model: SpeedModel) -> list[PeerState]:
    ranked = sorted(peers, key=lambda p: (model.speed(p), p.peer_id))
    if len(ranked) <= CANDIDATES_PER_STAGE:
        return ranked
    k = CANDIDATES_PER_STAGE - 1
    return [ranked[round(i * (len(ranked) - 1) / k)] for i in range(k + 1)]


def plan_moves(peers: Sequence[PeerState], num_stages: int, now: float, rules: RebalanceRules,
               demand: Sequence[float] | None = None) -> tuple[list[Move], str]:
    """The moves that raise the swarm's throughput, greedily, best first: ``(moves, reason)``.

    When a stage has no peer, the plan fills it: the move that leaves the best swarm behind (so
    from a crowded stage, the peer it misses least), cooldowns notwithstanding. Otherwise the
    swarm rebalances only when its bottleneck is below ``rules.balance_quality`` x the bottleneck
    the same peers could reach (:func:`ideal_bottleneck`, as Petals compares the swarm with its
    re-chosen self), and then each move must raise the sorted vector of stage capacities (the
    slowest stage first, then the next: two equally slow stages get one peer each) by more than
    half of what the moving peer adds or takes away (:func:`_improves`: noise must not trade peers
    back and forth).

    Each move takes one serving, unpinned peer off a stage that keeps at least one other serving
    peer and has no move in flight (and, unless it fills an empty stage, a peer past its cooldown).
    Among equally good moves the one that costs least wins: the busier target stage, then the
    slower peer, then the lowest peer id. At most one move leaves each stage; moves in flight count
    at their target. Every peer that sees the same records computes the same plan.
    """
    d = _demand(demand, num_stages)
    model = SpeedModel.fit(peers, num_stages)
    caps = stage_capacity(peers, num_stages, model)
    serving = {s: 0 for s in range(num_stages)}
    stage_load = [0] * num_stages
    for p in peers:
        if p.state == SERVING and 0 <= p.stage < num_stages:
            serving[p.stage] += 1
            stage_load[p.stage] += p.load
    busy_sources = {p.stage for p in peers if p.state == MOVING}
    eligible = [p for p in peers if movable(p, serving, now, rules, refill=True) is None and p.stage not in busy_sources]
    cooling = {p.peer_id for p in eligible if movable(p, serving, now, rules) is not None}
    ideal = ideal_bottleneck(peers, num_stages, d, model)
    if min(caps) > 0:  # no refill to make: only balance moves, and only when enough is to be gained
        eligible = [p for p in eligible if p.peer_id not in cooling]
        current = bottleneck(caps, d)
        if not current < rules.balance_quality * ideal:
            return [], (f"balance quality {balance_quality(caps, d):.2f}; bottleneck {current:.3g} samples/s is within "
                        f"{rules.balance_quality:g} of the {ideal:.3g} these peers could reach")
    by_stage: dict[int, list[PeerState]] = {}
    for p in eligible:
        by_stage.setdefault(p.stage, []).append(p)
    candidates = [c for s in sorted(by_stage) for c in _stage_candidates(by_stage[s], model)]
    id_keys = {p.peer_id: _neg_id(p.peer_id) for p in candidates}
    limit = rules.max_moves or num_stages
    moves: list[Move] = []
    while len(moves) < limit:
        before = _leximin(caps, d)
        best, best_key = None, None
        for p in candidates:
            s = p.stage
            if s in busy_sources or serving[s] < 2:
                continue
            here = model.at(p, s)
            for t in range(num_stages):
                if t == s or (p.peer_id in cooling and caps[t] > 0):
                    continue
                after_caps = list(caps)
                after_caps[s] -= here
                after_caps[t] += model.at(p, t)
                after = _leximin(after_caps, d)
                if not _improves(before, after, tolerance=0.5 * min(here / d[s], model.at(p, t) / d[t])):
                    continue
                key = (after, stage_load[t], -here, id_keys[p.peer_id], -t)
                if best_key is None or key > best_key:
                    best, best_key = (p, t, after_caps, after), key
        if best is None:
            break
        p, t, after_caps, after = best
        fills = caps[t] <= 0
        why = (f"stage {t} is empty" if fills else
               f"bottleneck {bottleneck(caps, d):.3g} -> {bottleneck(after_caps, d):.3g} samples/s "
               f"(these peers could reach {ideal:.3g})")
        moves.append(Move(p.peer_id, p.stage, t, bottleneck(caps, d), bottleneck(after_caps, d),
                          f"move {p.peer_id} from stage {p.stage} to stage {t}: {why}"))
        caps = after_caps
        serving[p.stage] -= 1
        busy_sources.add(p.stage)
        candidates = [c for c in candidates if c.peer_id != p.peer_id]
    if moves:
        return moves, "; ".join(m.reason for m in moves)
    return [], _why_no_move(peers, caps, d, serving, candidates, now, rules)


def _improves(before: tuple, after: tuple, tolerance: float) -> bool:
    """Whether ``after`` beats ``before`` (:func:`_leximin` vectors): fewer empty stages; else a
    bottleneck higher by more than ``tolerance``; else a bottleneck no lower, shared by fewer stages
    (within ``tolerance`` of it). The tolerance, half of what the moving peer adds or takes away
    (the smaller), keeps noisy figures from trading peers back and forth."""
    if after[0] != before[0]:
        return after[0] > before[0]
    b, a = before[1], after[1]
    if a > b + tolerance:
        return True
    if a < b - 1e-9 * max(1.0, abs(b)):
        return False
    return sum(1 for x in after[1:] if x <= a + tolerance) < sum(1 for x in before[1:] if x <= b + tolerance)


def _leximin(caps: Sequence[float], demand: Sequence[float]) -> tuple:
    """Fewer empty stages first, then the per-demand capacities from the slowest stage up."""
    per = sorted(c / x for c, x in zip(caps, demand))
    return (-sum(1 for c in caps if c <= 0), *per)


def _neg_id(peer_id: str) -> tuple[int, ...]:
    """Sort key under which a lower peer id compares greater (so ``max`` prefers it)."""
    return tuple(-ord(c) for c in peer_id)


def _why_no_move(peers, caps, demand, serving, candidates, now, rules) -> str:
    empty = [s for s, c in enumerate(caps) if c <= 0]
    if empty:
        if not candidates:
            return (f"stage {empty[0]} has no peer and no peer can move there "
                    f"({_blocked_summary(peers, serving, now, rules)})")
        return f"stage {empty[0]} has no peer and no move fills it"
    q = balance_quality(caps, demand)
    if not candidates:
        return f"balance quality {q:.2f}; no peer may move ({_blocked_summary(peers, serving, now, rules)})"
    return f"balance quality {q:.2f}; no single move raises the slowest stages"


def _blocked_summary(peers, serving, now, rules) -> str:
    reasons: dict[str, int] = {}
    for p in peers:
        why = movable(p, serving, now, rules)
        if why is not None:
            key = why.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())) or "no peers"


def can_serve_everything(peers: Sequence[PeerState], num_stages: int) -> tuple[bool, str]:
    """Can this swarm serve every stage, now or after moves? A trainer gives up only when not.

    True when every stage has a serving, joining or incoming peer, or when the empty stages can
    be filled by peers whose stage keeps another serving peer (pinned peers excluded).
    """
    holders = {s: 0 for s in range(num_stages)}
    for p in peers:
        s = p.serving_stage
        if s is not None and 0 <= s < num_stages:
            holders[s] += 1
    empty = [s for s, n in holders.items() if n == 0]
    if not empty:
        return True, "every stage has a peer"
    spare = 0
    for s in range(num_stages):
        unpinned = sum(1 for p in peers if p.state == SERVING and p.stage == s and not p.pinned)
        keep = 0 if holders[s] - unpinned >= 1 else 1  # a pinned or other holder keeps the stage served
        spare += max(0, unpinned - keep)
    if spare >= len(empty):
        return True, f"stage {empty[0]} has no peer; {spare} peer(s) elsewhere can move there"
    names = ", ".join(str(s) for s in empty)
    return False, (f"stage{'s' if len(empty) > 1 else ''} {names} ha{'ve' if len(empty) > 1 else 's'} no peer and "
                   f"no peer elsewhere can move there ({spare} spare of {len(peers)} peers)")
