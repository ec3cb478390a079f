"""A fleet-level simulation of stage rebalancing over time, driving the real policy.

:mod:`swarmrt.sim.simulator` follows every microbatch, which is right for a few
iterations of a few hundred peers and far too slow for an hour of 1,000. This
module follows *peers* instead: which stage each serves, when it moves, when
it is preempted and when it comes back. The swarm's throughput at any time is
the bottleneck of its stages' true capacities
(:func:`swarmrt.routing.rebalance.bottleneck`), and the rebalancing decisions
are made by the very functions a live peer runs:
:func:`~swarmrt.routing.rebalance.plan_moves` for moves and
:func:`~swarmrt.routing.rebalance.plan_joins` for (re)joining peers.

The model
---------

- **Peers** have a true speed: peer p computes stage s at
  ``1 / (stage_cost_s[s] x factor_p)`` samples/s, ``factor_p`` log-normal
  (sigma ``speed_spread``), so a peer fast at one stage is fast at all of them
  and stages may differ in cost (stage 0 also runs the loss head when it is
  also last). :func:`costs_from_scenario` takes the costs and the demand
  (share of microbatches visiting each stage: below 1 for middle stages that
  SkipPipe routes skip) from a scenario file.
- **What the policy sees** is each peer's DHT record
  (:class:`~swarmrt.routing.rebalance.PeerState`): a serving peer's measured
  throughput is its true one times ``exp(N(0, noise))``, drawn afresh at every
  check; ``since`` is when it took its stage; movers are ``moving`` with their
  target; a peer loading a stage after a (re)join is ``joining`` there.
- **At t=0** every peer joins at once, unmeasured, and :func:`plan_joins`
  places them all (so the stages hold equal counts, whatever they cost); they
  serve from t=0.
- **Rebalancing** (``rebalance=True``): every ``period_s`` the policy plans moves
  from the records (every peer computes the same plan; here it is computed
  once). A move, and a (re)join, takes ``move_s`` (drain, then download the
  stage's state), during which the peer serves no stage. Without rebalancing
  no peer ever moves.
- **Preemption waves**: at ``Wave.at_s`` a share of the live peers vanish, drawn
  from all of them or only from those of one stage (serving, loading or moving
  there). Each comes back after an exponential downtime of mean ``downtime_s``
  (0: never) as an unpinned joiner placed by :func:`plan_joins`, *with or
  without* rebalancing: the runtime places every peer started without
  ``--stage`` that way, and ``[rebalance] enabled = false`` only stops moves.
  Joiners arriving at the same instant are placed together (race-free);
  joiners still loading count, for later joiners, where they chose.

Not modelled: routing, links, memory and iteration barriers (the microbatch
simulator's business: tests/unit/test_sim_rebalance.py checks this model
against it on a small full pipeline), a draining peer's last requests, and
the time a real peer needs to measure itself.

:func:`fluid_bound` is the best any assignment of the live peers could do
(peers split fractionally between stages), the yardstick of the report.

Pure: the clock is simulated and randomness comes from the ``random.Random``
passed in.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from typing import Sequence

from swarmrt.routing.rebalance import (JOINING, MOVING, SERVING, PeerState, RebalanceRules, balance_quality,
                                       bottleneck, plan_joins, plan_moves)
from swarmrt.sim.scenario import HEAD_FACTOR, Scenario


@dataclasses.dataclass(frozen=True)
class Wave:
    """At ``at_s``, ``share`` of the live peers (of ``stage`` only, when given) are preempted."""

    at_s: float
    share: float
    stage: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.at_s) and self.at_s >= 0):
            raise ValueError(f"a wave's time must be >= 0, got {self.at_s!r}")
        if not 0 < self.share <= 1:
            raise ValueError(f"a wave's share must be in (0, 1], got {self.share!r}")
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"a wave's stage must be >= 0, got {self.stage!r}")


def parse_waves(text: str) -> tuple[Wave, ...]:
    """``"600:0.3,1800:0.5@2"``: at t=600 s 30% of all peers, at t=1800 s 50% of stage 2's peers."""
    waves = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        at, sep, rest = item.partition(":")
        share, _, stage = rest.partition("@")
        try:
            if not sep:
                raise ValueError
            wave = Wave(float(at), float(share), int(stage) if stage else None)
        except ValueError as e:
            detail = f": {e}" if str(e) else ""
            raise ValueError(f"bad wave {item!r} (want SECONDS:SHARE or SECONDS:SHARE@STAGE, "
                             f"e.g. 600:0.3,1800:0.5@2){detail}") from None
        waves.append(wave)
    if not waves:
        raise ValueError(f"no wave in {text!r} (want e.g. 600:0.3,1800:0.5@2)")
    return tuple(sorted(waves, key=lambda w: w.at_s))


@dataclasses.dataclass(frozen=True)
class FleetCosts:
    """Per stage: seconds per sample of a peer of factor 1, and the share of samples visiting it."""

    stage_cost_s: tuple[float, ...]
    demand: tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.stage_cost_s)


def costs_from_scenario(scenario: Scenario, head_factor: float = HEAD_FACTOR) -> FleetCosts:
    """A scenario's stages at its median ``forward_s``: forward + backward (+ the loss head on stage 0
    when it is also last) per microbatch; demand 1 for the fixed stages, visits / candidates for the
    middle ones."""
    forward = sorted(n.forward_s for n in scenario.nodes)[len(scenario.nodes) // 2]
    rules = scenario.rules
    middle = rules.middle_stages
    cost, demand = [], []
    for s in range(scenario.stages):
        head = head_factor if (s == 0 and scenario.first_stage_is_also_last) else 0.0
        cost.append(forward * (1.0 + scenario.backward_factor + head))
        demand.append(rules.middle_visits / len(middle) if s in middle else 1.0)
    return FleetCosts(tuple(cost), tuple(demand))


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    peers: int = 1000
    duration_s: float = 3600.0
    rebalance: bool = False
    rules: RebalanceRules = RebalanceRules()
    """Defaults are the ``[rebalance]`` config section's."""
    period_s: float = 5.0
    """How often the policy checks the balance (``[rebalance] period_s``)."""
    move_s: float = 30.0
    """Seconds a move or a (re)join takes before the peer serves its new stage (drain + state download)."""
    downtime_s: float = 300.0
    """Mean (exponential) seconds a preempted peer stays away; 0: it never comes back."""
    waves: tuple[Wave, ...] = ()
    speed_spread: float = 0.25
    noise: float = 0.05
    sample_s: float = 60.0
    """Seconds between the rows of the time series."""

    def __post_init__(self) -> None:
        if not isinstance(self.peers, int) or self.peers < 1:
            raise ValueError(f"peers must be an integer >= 1, got {self.peers!r}")
        for name in ("duration_s", "period_s", "sample_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        for name in ("move_s", "downtime_s", "speed_spread", "noise"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class FleetSample:
    t: float
    throughput: float
    """Samples/s: the bottleneck of the true stage capacities."""
    bound: float
    """:func:`fluid_bound` of the live peers."""
    quality: float
    """Balance quality of the true capacities."""
    per_stage: tuple[int, ...]
    """Serving peers per stage."""
    moving: int
    joining: int
    alive: int


@dataclasses.dataclass(frozen=True)
class FleetReport:
    rebalance: bool
    samples: tuple[FleetSample, ...]
    mean_throughput: float
    """Time-averaged samples/s over the run."""
    samples_processed: float
    mean_bound: float
    """Time-averaged :func:`fluid_bound`."""
    below_half_s: float
    """Seconds the throughput spent below half its value at t=0."""
    moves: int
    rejoins: int
    preempted: int

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["samples"] = [dataclasses.asdict(s) for s in self.samples]
        return d


def fluid_bound(rates: Sequence[float], costs: FleetCosts) -> float:
    """The highest throughput any split of these peers over the stages reaches, even fractional.

    ``rates[p]`` is 1 / factor_p. Peer p computes stage s at rates[p] / cost[s]; serving a throughput T
    needs stage-seconds T x demand[s] x cost[s] at each stage, so T <= sum(rates) / sum(demand x cost).
    """
    return sum(rates) / sum(d * c for d, c in zip(costs.demand, costs.stage_cost_s))


class _Peer:
    __slots__ = ("id", "rate", "stage", "state", "target", "since", "gen", "alive")

    def __init__(self, pid: str, rate: float) -> None:
        self.id, self.rate = pid, rate
        self.stage, self.state, self.target, self.since = 0, JOINING, None, 0.0
        self.gen, self.alive = 0, True


_TICK, _WAVE, _READY, _REJOIN, _SAMPLE = range(5)


class FleetSim:
    def __init__(self, costs: FleetCosts, config: FleetConfig, rng: random.Random) -> None:
        for w in config.waves:
            if w.stage is not None and w.stage >= costs.stages:
                raise ValueError(f"a wave's stage must be < {costs.stages} (stages), got {w.stage}")
        self.costs, self.cfg = costs, config
        # independent streams, so that runs with and without rebalancing draw the same peers and waves
        seeds = [rng.getrandbits(64) for _ in range(2 + len(config.waves))]
        speeds = random.Random(seeds[0])
        self.noise_rng = random.Random(seeds[1])
        self.wave_rngs = [random.Random(s) for s in seeds[2:]]
        width = len(str(config.peers - 1))
        self.peers = [_Peer(f"p{i:0{width}d}", math.exp(-speeds.gauss(0.0, config.speed_spread))
                            if config.speed_spread > 0 else 1.0) for i in range(config.peers)]
        self.by_id = {p.id: p for p in self.peers}
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.moves = self.rejoins = self.preempted = 0

    # -- the view the policy gets ---------------------------------------------------------------
    def _true_rate(self, p: _Peer, stage: int) -> float:
        return p.rate / self.costs.stage_cost_s[stage]

    def _view(self, placed_joiners_pinned: bool = False) -> list[PeerState]:
        out = []
        sigma = self.cfg.noise
        for p in self.peers:
            if not p.alive:
                continue
            tp = 0.0
            if p.state == SERVING:
                tp = self._true_rate(p, p.stage) * (math.exp(self.noise_rng.gauss(0.0, sigma)) if sigma > 0 else 1.0)
            out.append(PeerState(p.id, p.stage, p.state, tp, pinned=placed_joiners_pinned and p.state == JOINING,
                                 target=p.target, since=p.since))
        return out

    def _true_caps(self) -> list[float]:
        caps = [0.0] * self.costs.stages
        for p in self.peers:
            if p.alive and p.state == SERVING:
                caps[p.stage] += self._true_rate(p, p.stage)
        return caps

    def _at(self, t: float, kind: int, *payload) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    # -- events ---------------------------------------------------------------------------------
    def _place(self, joiners: list[_Peer], serve_now: bool) -> None:
        for p in joiners:
            p.alive, p.state, p.target = True, JOINING, None
        view = self._view(placed_joiners_pinned=True)
        ids = {p.id for p in joiners}
        view = [dataclasses.replace(v, pinned=False) if v.peer_id in ids else v for v in view]
        plan = plan_joins(view, self.costs.stages, self.costs.demand)
        for p in joiners:
            p.stage = plan[p.id][0]
            p.since = self.now
            p.gen += 1
            if serve_now:
                p.state = SERVING
            else:
                self._at(self.now + self.cfg.move_s, _READY, p.id, p.gen)

    def _tick(self) -> None:
        moves, _ = plan_moves(self._view(), self.costs.stages, self.now, self.cfg.rules, self.costs.demand)
        for m in moves:
            p = self.by_id[m.peer_id]
            p.state, p.target = MOVING, m.target
            p.gen += 1
            self.moves += 1
            self._at(self.now + self.cfg.move_s, _READY, p.id, p.gen)

    def _ready(self, pid: str, gen: int) -> None:
        p = self.by_id[pid]
        if not p.alive or p.gen != gen:
            return
        if p.state == MOVING:
            p.stage, p.target = p.target, None
        p.state, p.since = SERVING, self.now

    def _wave(self, index: int) -> None:
        wave = self.cfg.waves[index]
        rng = self.wave_rngs[index]
        pool = [p for p in self.peers if p.alive and (
            wave.stage is None or (p.target if p.state == MOVING else p.stage) == wave.stage)]
        hit = rng.sample(pool, round(wave.share * len(pool)))
        for p in hit:
            p.alive = False
            p.gen += 1
            self.preempted += 1
            if self.cfg.downtime_s > 0:
                self._at(self.now + rng.expovariate(1.0 / self.cfg.downtime_s), _REJOIN, p.id)

    def run(self) -> FleetReport:
        cfg = self.cfg
        self._place(list(self.peers), serve_now=True)
        if cfg.rebalance:
            for k in range(1, int(cfg.duration_s / cfg.period_s) + 1):
                self._at(k * cfg.period_s, _TICK)
        for i, w in enumerate(cfg.waves):
            if w.at_s <= cfg.duration_s:
                self._at(w.at_s, _WAVE, i)
        for k in range(int(cfg.duration_s / cfg.sample_s) + 1):
            self._at(k * cfg.sample_s, _SAMPLE)
        rows = []
        area = bound_area = below = 0.0
        first = None
        last_t, tp, bound = 0.0, 0.0, 0.0
        while self.events and self.events[0][0] <= cfg.duration_s:
            t = self.events[0][0]
            dt = t - last_t
            area += tp * dt
            bound_area += bound * dt
            if first is not None and tp < 0.5 * first:
                below += dt
            self.now, last_t = t, t
            samples, rejoining = [], []
            while self.events and self.events[0][0] == t:  # everything at t, then measure
                _, _, kind, payload = heapq.heappop(self.events)
                if kind == _TICK:
                    self._tick()
                elif kind == _WAVE:
                    self._wave(*payload)
                elif kind == _READY:
                    self._ready(*payload)
                elif kind == _REJOIN:
                    rejoining.append(self.by_id[payload[0]])
                else:
                    samples.append(t)
            if rejoining:
                self.rejoins += len(rejoining)
                self._place(rejoining, serve_now=False)
            caps = self._true_caps()
            tp = bottleneck(caps, self.costs.demand)
            bound = fluid_bound([p.rate for p in self.peers if p.alive], self.costs)
            if first is None:
                first = tp
            for ts in samples:
                rows.append(self._sample(ts, caps, tp, bound))
        dt = cfg.duration_s - last_t
        area += tp * dt
        bound_area += bound * dt
        if first is not None and tp < 0.5 * first:
            below += dt
        return FleetReport(cfg.rebalance, tuple(rows), area / cfg.duration_s, area, bound_area / cfg.duration_s,
                           below, self.moves, self.rejoins, self.preempted)

    def _sample(self, t: float, caps: list[float], tp: float, bound: float) -> FleetSample:
        per = [0] * self.costs.stages
        moving = joining = alive = 0
        for p in self.peers:
            if not p.alive:
                continue
            alive += 1
            if p.state == SERVING:
                per[p.stage] += 1
            elif p.state == MOVING:
                moving += 1
            else:
                joining += 1
        return FleetSample(t, tp, bound, balance_quality(caps, self.costs.demand), tuple(per), moving, joining, alive)


def simulate_fleet(costs: FleetCosts, config: FleetConfig, rng: random.Random) -> FleetReport:
    """Run one fleet simulation (see the module docstring)."""
    return FleetSim(costs, config, rng).run()


def scenario_throughput(scenario: Scenario, head_factor: float = HEAD_FACTOR) -> float:
    """The fleet model's samples/s for a scenario's own nodes where they stand: the bottleneck of the
    stages' summed per-node rates (what :class:`FleetSim` computes at every instant)."""
    costs = costs_from_scenario(scenario, head_factor)
    caps = [0.0] * scenario.stages
    for n in scenario.nodes:
        head = head_factor if (n.stage == 0 and scenario.first_stage_is_also_last) else 0.0
        caps[n.stage] += 1.0 / (n.forward_s * (1.0 + scenario.backward_factor + head))
    return bottleneck(caps, costs.demand)
