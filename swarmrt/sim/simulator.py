"""An event-driven simulator of a swarm training iteration, driving the real schedulers.

The simulator executes what a policy from :mod:`swarmrt.routing.policies`
decides, made by the same :func:`~swarmrt.routing.policies.make_policy` and
with the same calls a trainer makes (``begin_iteration``, ``route``,
``replan``, ``finished``, ``aborted``; swarmrt's scheduler may instead have
each iteration planned ahead by :func:`swarmrt.sim.planner.plan_iteration`) and a
:class:`~swarmrt.routing.peer_table.PeerTable` it keeps current (membership,
in-flight load). Time is simulated: a heap of events, never fixed steps, and
no wall clock (a caller may pass one for the planning budget only).

The model
---------

- **Nodes** compute one task at a time. Per microbatch and node: forward
  ``forward_s``, backward ``backward_factor x forward_s``; when stage 0 is
  also last, the origin also runs the loss head (``head_factor x
  forward_s``, forward and backward of the head together) between the two
  passes. A node picks its next task by priority: backward, then loss head,
  then forwards in arrival order, then (an origin) a new microbatch. This is
  1F1B's rule: finish what frees memory first.
- **Memory**: a forward may start on a node only while it holds fewer
  activations than ``memory_microbatches``; the activation is held from the
  start of the forward until the end of that node's backward. Waiting
  arrivals do not count (they sit in the sender's buffer).
- **Links**: each node has one uplink and sends one transfer at a time, in
  FIFO order (no bandwidth sharing): the uplink is busy for ``bytes /
  bandwidth + per_hop_overhead_s``, and the data arrives ``latency`` later.
  Downlinks are not modelled. Gradients travel like activations.
- **Routes**: a new microbatch asks the policy for its route when its origin
  starts its forward (online). Backward retraces the forward route.
- **Preemptions** (optional): each node fails after an exponential time of
  mean ``preempt_mtbf_s`` and comes back after an exponential downtime of
  mean ``downtime_s`` (with no memory, empty queues), then may fail again.
  When a node dies, every microbatch that needs it is handled:

  - its *forward* was about to run there (queued, running, in transit, or
    about to be sent): the previous hop resends after ``policy.replan``
    (counted *rerouted*);
  - the node held its activations for backward, was sending for it, or was
    its origin: the microbatch is restarted from scratch at its origin (or,
    if the origin is gone, at the live origin with the fewest microbatches
    waiting), after ``policy.aborted`` (counted *retried*);
  - after ``max_retries`` restarts, or if no route exists and no node will
    come back, it is counted *lost*. Every microbatch ends completed or
    lost: none disappears silently.
- **Outer sync**: every ``outer_sync_every`` iterations the stage groups
  average (DiLoCo's outer step) for ``outer_sync_s`` seconds, added to that
  iteration's time.

Iterations are synchronous: the next starts when every microbatch of the
previous one has completed or been lost (and the outer sync is done).

:func:`plan_evaluator` turns the simulator into a scorer of whole plans (one
iteration of fixed routes, :class:`~swarmrt.sim.scoring.ReplayPolicy`, no failures,
optionally averaged with seeded noisy runs; :mod:`swarmrt.sim.scoring`): swarmrt's
planner (:mod:`swarmrt.sim.planner`) uses it to choose and repair plans, and ``swarmrt plan``
to predict the iteration time it writes.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math
import random
from typing import Callable, Sequence

from swarmrt.routing.paths import Hop, Route
from swarmrt.routing.peer_table import PeerTable
from swarmrt.sim.scenario import HEAD_FACTOR, Scenario, peer_table
from swarmrt.routing.policies import Policy, SchedulerConfig, SkipScheduler, make_policy
from swarmrt.sim.planner import plan_iteration
from swarmrt.sim.scoring import PlanEvaluator, ReplayPolicy

_FWD, _HEAD, _BWD = 0, 1, 2
_EV_DONE, _EV_SENT, _EV_ARRIVE, _EV_FAIL, _EV_RECOVER = range(5)


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """What to simulate besides the scenario itself."""

    iterations: int = 1
    """Training iterations to run."""
    head_factor: float = HEAD_FACTOR
    """Loss head on the origin (stage 0 also last), as a share of its forward_s."""
    preempt_mtbf_s: float = 0.0
    """Mean time between failures of each node, seconds; 0 disables preemptions."""
    downtime_s: float = 300.0
    """Mean time a preempted node stays away before it comes back, seconds (exponential)."""
    max_retries: int = 10
    """Restarts from scratch a microbatch may take in one iteration before it is counted lost."""
    outer_sync_s: float = 0.0
    """Seconds of the stage groups' outer synchronisation (pseudo-gradient all-reduce)."""
    outer_sync_every: int = 1
    """Iterations between outer synchronisations (DiLoCo's H, counted in iterations)."""
    samples_per_microbatch: int = 1
    """Samples in one microbatch, for samples/s."""
    plan_ahead: bool = True
    """Let policies that can (swarmrt's) plan each iteration at its start; routes are then served from the plan."""
    plan_budget_s: float = 0.0
    """Wall-clock budget for that planning's restarts (needs a ``clock`` passed to :func:`simulate`)."""
    jitter: float = 0.0
    """Noise on compute: every task takes its time x exp(N(0, jitter)) (seeded); 0: exact figures."""
    start_s: float = 0.0
    """Simulated clock at the start (times are relative to it in the report)."""
    record: bool = False
    """Keep every activation hold and executed backward order (for tests of memory and backward rules)."""
    trace_waits: bool = False
    """Keep, per microbatch, every wait of a task that arrived at a busy node (the planner's repair reads them)."""
    plan_work: int | None = None
    """Work budget of each iteration's planning (:func:`swarmrt.sim.planner.plan_iteration`'s ``work``;
    None: its default). The plan depends on it, not on the machine's speed."""
    plan_jitter: float = 0.02
    """Compute noise the planner scores its candidate plans under (:class:`PlanEvaluator`'s ``jitter``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"SimConfig.iterations must be an integer >= 1, got {self.iterations!r}")
        for name in ("head_factor", "preempt_mtbf_s", "outer_sync_s", "plan_budget_s", "jitter", "start_s",
                     "plan_jitter"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"SimConfig.{name} must be a number >= 0, got {v!r}")
        if not (isinstance(self.downtime_s, (int, float)) and self.downtime_s > 0):
            raise ValueError(f"SimConfig.downtime_s must be > 0, got {self.downtime_s!r}")
        if self.plan_work is not None and (not isinstance(self.plan_work, int) or self.plan_work < 0):
            raise ValueError(f"SimConfig.plan_work must be an integer >= 0 or None, got {self.plan_work!r}")
        for name in ("max_retries", "outer_sync_every", "samples_per_microbatch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "max_retries" else 1):
                raise ValueError(f"SimConfig.{name} must be an integer >= {0 if name == 'max_retries' else 1}, "
                                 f"got {v!r}")


@dataclasses.dataclass(frozen=True)
class SimReport:
    """What one policy did over the simulated iterations."""

    policy: str
    """The policy's name."""
    iteration_s: tuple[float, ...]
    """Simulated seconds of each iteration (outer sync included)."""
    samples_per_s: float
    """Completed samples per simulated second, over all iterations."""
    idle_fraction: dict[int, float]
    """Per stage: share of its nodes' live time spent not computing."""
    microbatches_per_stage: dict[int, int]
    """Per stage: completed microbatches whose route visited it (all iterations)."""
    microbatches: int
    """Microbatches started (all iterations)."""
    completed: int
    """Microbatches that finished their backward."""
    lost: int
    """Microbatches given up (out of retries, or no route ever again)."""
    retried: int
    """Restarts from scratch after a node that held their activations died."""
    rerouted: int
    """Forward hops re-planned around a dead peer."""
    preemptions: int
    """Node failures that happened."""
    forecast_s: float | None = None
    """The policy's own forecast of the first iteration, when it planned ahead."""
    holds: dict | None = None
    """With ``record``: node -> list of (start, end) activation holds."""
    backward_orders: list | None = None
    """With ``record``: (route, backward visits executed, the loss head first) per completed microbatch."""

    @property
    def mean_iteration_s(self) -> float:
        """Mean simulated seconds per iteration."""
        return sum(self.iteration_s) / len(self.iteration_s)


class _Node:
    __slots__ = ("id", "stage", "fwd", "bwd", "head", "memory", "alive", "inc", "busy", "task_start",
                 "bwd_q", "head_q", "fwd_q", "pending", "held", "up_busy", "up_q", "busy_s", "alive_s",
                 "alive_since", "is_origin", "current")

    def __init__(self, spec, bwd: float, head: float, is_origin: bool) -> None:
        self.id = spec.id
        self.stage = spec.stage
        self.fwd = spec.forward_s
        self.bwd = bwd
        self.head = head
        self.memory = spec.memory_microbatches
        self.alive = True
        self.inc = 0
        self.busy = False
        self.task_start = 0.0
        self.bwd_q: collections.deque = collections.deque()
        self.head_q: collections.deque = collections.deque()
        self.fwd_q: collections.deque = collections.deque()
        self.pending: collections.deque = collections.deque()
        self.held = 0
        self.up_busy = False
        self.up_q: collections.deque = collections.deque()
        self.busy_s = 0.0
        self.alive_s = 0.0
        self.alive_since = 0.0
        self.is_origin = is_origin
        self.current: int | None = None  # the microbatch of the task running (or that ran last) here


class _MB:
    __slots__ = ("id", "origin", "route", "fwd_hops", "gen", "phase", "at", "holding", "fwd_done_on",
                 "sending_from", "restarts", "bwd_trace", "arrivals", "waits")

    def __init__(self, mb_id: int, origin: int) -> None:
        self.id = mb_id
        self.origin = origin
        self.route: Route | None = None
        self.fwd_hops: tuple = ()
        self.gen = 0
        self.phase = _FWD
        self.at = origin
        self.holding: set = set()
        self.fwd_done_on: set = set()
        self.sending_from = None
        self.restarts = 0
        self.bwd_trace: list = []
        self.arrivals: dict = {}  # (node, kind, pos) -> (arrival time, microbatch running there then)
        self.waits: list = []  # (seconds waited, node, arrival, start, blocking microbatch id)


class Simulation:
    """One policy on one scenario; :meth:`run` returns a :class:`SimReport`."""

    def __init__(self, scenario: Scenario, policy: str | Callable[[PeerTable], Policy], config: SimConfig,
                 rng: random.Random, clock: Callable[[], float] | None = None,
                 scheduler_config: SchedulerConfig | None = None) -> None:
        self.sc = scenario
        self.cfg = config
        self.rng = rng
        self.fail_rng = random.Random(rng.random())
        self.jitter_rng = random.Random(rng.random())
        self.clock = clock
        self.table = peer_table(scenario, config.head_factor)
        if isinstance(policy, str):
            self.policy = make_policy(policy, scenario.rules, self.table, scheduler_config)
        else:
            self.policy = policy(self.table)
        self.track_load = getattr(self.policy, "reads_load", True)
        """Keep the table's in-flight figures current (a policy that reads none says so: ``reads_load``)."""
        self.rules = scenario.rules
        self.ret = scenario.first_stage_is_also_last
        self.links = scenario.links
        self.nodes = [
            _Node(n, scenario.backward_factor * n.forward_s,
                  config.head_factor * n.forward_s if (self.ret and n.stage == 0) else 0.0, n.stage == 0)
            for n in scenario.nodes]
        self.events: list = []
        self.seq = itertools.count()
        self.now = config.start_s
        self.mb_ids = itertools.count()
        self.outstanding = 0
        self.orphans: collections.deque = collections.deque()
        self.blocked = False
        self.stats = collections.Counter()
        self.stage_visits = collections.Counter()
        self.holds: dict = collections.defaultdict(list) if config.record else None
        self.hold_start: dict = {}
        self.backward_orders: list | None = [] if config.record else None
        self.forecast: float | None = None
        self.live_mbs: dict[int, _MB] = {}
        self.finish_by_origin: dict = {}
        self.finished: dict[int, tuple[float, list]] = {}
        """With ``trace_waits``: microbatch id -> (when it completed, its waits)."""
        self.busy_log: dict[int, list] = collections.defaultdict(list)
        """With ``trace_waits``: node -> its compute intervals (start, end)."""

    # --- event plumbing ------------------------------------------------------------------

    def _at(self, t: float, kind: int, *payload) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def _set_load(self, node: _Node) -> None:
        if self.track_load:
            self.table.set_in_flight(node.id, node.held + len(node.fwd_q))

    # --- compute -------------------------------------------------------------------------

    def _dispatch(self, node: _Node) -> None:
        """Start the node's next task if it is idle (priority: backward, head, forward, new microbatch)."""
        if node.busy or not node.alive:
            return
        while True:
            if node.bwd_q:
                task = node.bwd_q.popleft()
            elif node.head_q:
                task = node.head_q.popleft()
            elif node.fwd_q and node.held < node.memory:
                task = node.fwd_q.popleft()
            elif node.pending and node.held < node.memory and not self.blocked:
                mb = node.pending.popleft()
                if not self._admit(node, mb):
                    node.pending.appendleft(mb)
                    return
                task = (_FWD, mb, mb.gen, 0)
            else:
                return
            kind, mb, gen, pos = task
            if mb.gen != gen:
                continue  # stale: the microbatch was restarted
            break
        if self.cfg.trace_waits:
            self._note_wait(node, mb, (node.id, kind, pos))
        node.current = mb.id
        if kind == _FWD:
            dur = node.fwd
            node.held += 1
            mb.holding.add(node.id)
            if self.holds is not None:
                self.hold_start[(mb.id, mb.gen, node.id)] = self.now
        elif kind == _HEAD:
            dur = node.head
        else:
            dur = node.bwd
        if self.cfg.jitter > 0:
            dur *= math.exp(self.jitter_rng.gauss(0.0, self.cfg.jitter))
        node.busy = True
        node.task_start = self.now
        self._set_load(node)
        self._at(self.now + dur, _EV_DONE, node.id, node.inc, task)

    def _note_wait(self, node: _Node, mb: _MB, key: tuple) -> None:
        """A task of ``mb`` starts on ``node`` now: if it had to wait there, note how long and behind whom."""
        arrived = mb.arrivals.pop(key, None)
        if arrived is not None and self.now > arrived[0]:
            blocker = arrived[1] if arrived[1] is not None else node.current
            mb.waits.append((self.now - arrived[0], node.id, arrived[0], self.now, blocker))

    def _admit(self, origin: _Node, mb: _MB) -> bool:
        """Ask the policy for a route for a new microbatch starting on ``origin`` now."""
        mb.origin = origin.id
        route, why = self.policy.route(origin.id, self.now, self.rng, microbatch=mb.id)
        if route is None:
            self.blocked = True  # nothing can be routed until a node comes back
            return False
        self._set_route(mb, route)
        mb.phase = _FWD
        mb.at = origin.id
        return True

    def _set_route(self, mb: _MB, route: Route) -> None:
        mb.route = route
        mb.fwd_hops = tuple(h.peer for h in (route.hops[:-1] if self.ret else route.hops))

    def _on_done(self, node_id: int, inc: int, task) -> None:
        node = self.nodes[node_id]
        if node.inc != inc:
            return  # the node died meanwhile
        node.busy = False
        node.busy_s += self.now - node.task_start
        if self.cfg.trace_waits:
            self.busy_log[node_id].append((node.task_start, self.now))
        kind, mb, gen, pos = task
        if mb.gen == gen:
            if kind == _FWD:
                mb.fwd_done_on.add(node_id)
                if pos + 1 < len(mb.fwd_hops):
                    self._send(mb, node_id, pos + 1, _FWD)
                elif self.ret:
                    mb.phase = _HEAD
                    self._send(mb, node_id, pos, _HEAD)
                else:
                    mb.phase = _BWD
                    mb.at = node_id
                    node.bwd_q.append((_BWD, mb, mb.gen, pos))
            elif kind == _HEAD:
                mb.phase = _BWD
                if self.backward_orders is not None:
                    mb.bwd_trace.append(Hop(0, node_id))
                self._send(mb, node_id, len(mb.fwd_hops) - 1, _BWD)
            else:
                node.held -= 1
                mb.holding.discard(node_id)
                self._record_hold_end(mb, node_id)
                if self.backward_orders is not None:
                    mb.bwd_trace.append(Hop(node.stage, node_id))
                if pos > 0:
                    self._send(mb, node_id, pos - 1, _BWD)
                else:
                    self._complete(mb)
        self._set_load(node)
        self._dispatch(node)

    def _record_hold_end(self, mb: _MB, node_id: int) -> None:
        if self.holds is not None:
            start = self.hold_start.pop((mb.id, mb.gen, node_id), None)
            if start is not None:
                self.holds[node_id].append((start, self.now))

    # --- transfers -----------------------------------------------------------------------

    def _send(self, mb: _MB, src: int, pos: int, kind: int) -> None:
        """Move ``mb`` from ``src`` to the node of hop ``pos`` for a task of ``kind``."""
        if kind == _HEAD:
            dst = mb.origin
        else:
            dst = mb.fwd_hops[pos]
        if kind == _FWD and not self.nodes[dst].alive:
            if not self._reroute(mb, pos):
                return
            dst = mb.fwd_hops[pos]
        if kind != _FWD and not self.nodes[dst].alive:
            self._restart(mb, f"node {dst} is gone")
            return
        mb.at = dst
        if src == dst:
            self._deliver(mb, dst, (kind, mb, mb.gen, pos))
            return
        mb.sending_from = src
        self.nodes[src].up_q.append((mb, mb.gen, dst, (kind, mb, mb.gen, pos)))
        self._pump(self.nodes[src])

    def _pump(self, node: _Node) -> None:
        while not node.up_busy and node.up_q:
            mb, gen, dst, task = node.up_q.popleft()
            if mb.gen != gen:
                continue
            ser = self.links.serialization_s(node.id, dst)
            lat = self.links.latency_s(node.id, dst)
            node.up_busy = True
            self._at(self.now + ser, _EV_SENT, node.id, node.inc, mb, gen)
            self._at(self.now + ser + lat, _EV_ARRIVE, dst, task)

    def _on_sent(self, node_id: int, inc: int, mb: _MB, gen: int) -> None:
        node = self.nodes[node_id]
        if node.inc != inc:
            return
        node.up_busy = False
        if mb.gen == gen and mb.sending_from == node_id:
            mb.sending_from = None
        self._pump(node)

    def _on_arrive(self, dst: int, task) -> None:
        kind, mb, gen, pos = task
        if mb.gen != gen:
            return
        node = self.nodes[dst]
        if not node.alive:
            if kind == _FWD:
                src = mb.fwd_hops[pos - 1]
                if self._reroute(mb, pos):
                    self._send(mb, src, pos, _FWD)
            else:
                self._restart(mb, f"node {dst} is gone")
            return
        self._deliver(mb, dst, task)

    def _deliver(self, mb: _MB, dst: int, task) -> None:
        node = self.nodes[dst]
        kind = task[0]
        if self.cfg.trace_waits:
            mb.arrivals[(dst, kind, task[3])] = (self.now, node.current if node.busy else None)
        (node.bwd_q if kind == _BWD else node.head_q if kind == _HEAD else node.fwd_q).append(task)
        self._set_load(node)
        self._dispatch(node)

    # --- failures ------------------------------------------------------------------------

    def _reroute(self, mb: _MB, pos: int) -> bool:
        """The forward hop ``pos`` of ``mb`` is dead: re-plan the rest of its route, or restart it."""
        dead = {n.id for n in self.nodes if not n.alive}
        route, why = self.policy.replan(mb.route, pos, dead, self.now, self.rng)
        if route is None:
            self._restart(mb, why)
            return False
        self._set_route(mb, route)
        self.stats["rerouted"] += 1
        return True

    def _restart(self, mb: _MB, why: str) -> None:
        """Drop everything ``mb`` holds and start it again at an origin (or count it lost)."""
        for nid in mb.holding:
            node = self.nodes[nid]
            self._record_hold_end(mb, nid)
            if node.alive:
                node.held -= 1
                self._set_load(node)
        touched = list(mb.holding)
        mb.holding = set()
        mb.fwd_done_on = set()
        mb.sending_from = None
        mb.bwd_trace = []
        mb.gen += 1
        if mb.route is not None:
            self.policy.aborted(mb.route)
        mb.route = None
        mb.restarts += 1
        self.stats["retried"] += 1
        if mb.restarts > self.cfg.max_retries:
            self._lose(mb)
        else:
            self._queue_at_origin(mb, front=True)
        for nid in touched:
            self._dispatch(self.nodes[nid])

    def _lose(self, mb: _MB) -> None:
        self.stats["lost"] += 1
        self.outstanding -= 1
        self.live_mbs.pop(mb.id, None)

    def _queue_at_origin(self, mb: _MB, front: bool = False) -> None:
        origin = self.nodes[mb.origin]
        if not origin.alive:
            live = [n for n in self.nodes if n.is_origin and n.alive]
            if not live:
                self.orphans.append(mb)
                return
            origin = min(live, key=lambda n: (len(n.pending), n.id))
            mb.origin = origin.id
        if front:
            origin.pending.appendleft(mb)
        else:
            origin.pending.append(mb)
        self._dispatch(origin)

    def _on_fail(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if not node.alive:
            return
        self.stats["preemptions"] += 1
        if node.busy:
            node.busy_s += self.now - node.task_start
        node.alive_s += self.now - node.alive_since
        node.alive = False
        node.inc += 1
        node.busy = False
        node.up_busy = False
        node.held = 0
        waiting = list(node.pending)
        for q in (node.bwd_q, node.head_q, node.fwd_q, node.pending, node.up_q):
            q.clear()
        self.table.remove(node_id)
        self.policy.forget_peer(node_id)
        for mb in self._active():
            if node_id in mb.fwd_done_on or mb.sending_from == node_id or mb.origin == node_id or (
                    mb.at == node_id and mb.phase != _FWD):
                self._restart(mb, f"node {node_id} died holding its state")
            elif mb.at == node_id:
                # its forward was on its way, waiting or running here: the previous hop resends elsewhere
                if node_id in mb.holding:
                    mb.holding.discard(node_id)
                    self._record_hold_end(mb, node_id)
                pos = mb.fwd_hops.index(node_id)
                src = mb.fwd_hops[pos - 1]
                mb.gen += 1  # drop the stale task and its events
                if self._reroute(mb, pos):
                    self._send(mb, src, pos, _FWD)
        for mb in waiting:
            self._queue_at_origin(mb)
        self._at(self.now + self.fail_rng.expovariate(1.0 / self.cfg.downtime_s), _EV_RECOVER, node_id)

    def _active(self) -> list[_MB]:
        return [mb for mb in self.live_mbs.values() if mb.route is not None]

    def _on_recover(self, node_id: int) -> None:
        node = self.nodes[node_id]
        node.alive = True
        node.alive_since = self.now
        spec = self.sc.nodes[node_id]
        self.table.upsert(node_id, spec.stage, node.fwd, node.bwd, node.memory, head_s=node.head)
        self.blocked = False
        if node.is_origin:
            while self.orphans:
                mb = self.orphans.popleft()
                mb.origin = node_id
                node.pending.append(mb)
        self._at(self.now + self.fail_rng.expovariate(1.0 / self.cfg.preempt_mtbf_s), _EV_FAIL, node_id)
        for n in self.nodes:
            if n.is_origin:
                self._dispatch(n)

    # --- iterations ----------------------------------------------------------------------

    def _complete(self, mb: _MB) -> None:
        self.policy.finished(mb.route)
        self.finish_by_origin[mb.origin] = self.now
        if self.cfg.trace_waits:
            self.finished[mb.id] = (self.now, mb.waits)
        self.stats["completed"] += 1
        for s in set(mb.route.stages):
            self.stage_visits[s] += 1
        if self.backward_orders is not None:
            self.backward_orders.append((mb.route, tuple(mb.bwd_trace)))
        self.live_mbs.pop(mb.id, None)
        self.outstanding -= 1

    def _start_iteration(self, it: int) -> None:
        """Each live origin gets its microbatches; a dead origin's share is dealt to the live ones."""
        per = self.sc.microbatches_per_origin
        total = len(self.sc.origins) * per
        origins = [n for n in self.nodes if n.is_origin and n.alive]
        counts = {n.id: per for n in origins}
        for i in range(total - per * len(origins) if origins else 0):
            counts[origins[i % len(origins)].id] += 1
        counts = self.policy.deal(counts)
        origins = sorted((self.nodes[o] for o in counts if counts[o] > 0), key=lambda n: n.id)
        if origins:
            total = sum(counts.values())
            if self.cfg.plan_ahead and isinstance(self.policy, SkipScheduler):
                plan = plan_iteration(self.policy, counts, self.now, self.rng, clock=self.clock,
                                      budget_s=self.cfg.plan_budget_s or None, work=self.cfg.plan_work,
                                      evaluate=plan_evaluator(self.sc, self.cfg.head_factor, self.now,
                                                              self.cfg.plan_jitter))
                if it == 0:
                    self.forecast = plan.predicted_iteration_s
            else:
                self.policy.begin_iteration(counts, self.now, self.rng)
        first_origin = self.sc.origins[0]
        for i in range(total):
            mb = _MB(next(self.mb_ids), first_origin)
            self.live_mbs[mb.id] = mb
            self.stats["microbatches"] += 1
            self.outstanding += 1
            if not origins:
                self.orphans.append(mb)
        fresh = iter(sorted(self.live_mbs)[-total:])
        for n in origins:
            for _ in range(counts[n.id]):
                mb = self.live_mbs[next(fresh)]
                mb.origin = n.id
                n.pending.append(mb)
        for n in origins:
            self._dispatch(n)

    def run(self) -> SimReport:
        """Simulate ``config.iterations`` iterations and report."""
        if self.cfg.preempt_mtbf_s > 0:
            for n in self.nodes:
                self._at(self.fail_rng.expovariate(1.0 / self.cfg.preempt_mtbf_s), _EV_FAIL, n.id)
        iteration_s = []
        busy = collections.defaultdict(float)
        alive = collections.defaultdict(float)
        for it in range(self.cfg.iterations):
            start = self.now
            for n in self.nodes:
                n.busy_s = 0.0
                n.alive_s = 0.0
                n.alive_since = start
            self._start_iteration(it)
            while self.outstanding > 0:
                if not self.events:  # nothing will ever happen again: the rest cannot finish
                    for mb in list(self.live_mbs.values()):
                        self._lose(mb)
                    self.live_mbs.clear()
                    break
                t, _, kind, payload = heapq.heappop(self.events)
                self.now = t
                if kind == _EV_DONE:
                    self._on_done(*payload)
                elif kind == _EV_SENT:
                    self._on_sent(*payload)
                elif kind == _EV_ARRIVE:
                    self._on_arrive(*payload)
                elif kind == _EV_FAIL:
                    self._on_fail(*payload)
                else:
                    self._on_recover(*payload)
            for n in self.nodes:
                if n.alive:
                    n.alive_s += self.now - n.alive_since
                busy[n.stage] += n.busy_s
                alive[n.stage] += n.alive_s
            if self.cfg.outer_sync_s > 0 and (it + 1) % self.cfg.outer_sync_every == 0:
                self._advance(self.now + self.cfg.outer_sync_s)
            iteration_s.append(self.now - start)
        total = sum(iteration_s)
        return SimReport(
            policy=self.policy.name,
            iteration_s=tuple(iteration_s),
            samples_per_s=self.stats["completed"] * self.cfg.samples_per_microbatch / total if total > 0 else 0.0,
            idle_fraction={s: (1.0 - busy[s] / alive[s]) if alive[s] > 0 else 1.0 for s in range(self.sc.stages)},
            microbatches_per_stage={s: self.stage_visits[s] for s in range(self.sc.stages)},
            microbatches=self.stats["microbatches"],
            completed=self.stats["completed"],
            lost=self.stats["lost"],
            retried=self.stats["retried"],
            rerouted=self.stats["rerouted"],
            preemptions=self.stats["preemptions"],
            forecast_s=self.forecast,
            holds=dict(self.holds) if self.holds is not None else None,
            backward_orders=self.backward_orders,
        )

    def _advance(self, until: float) -> None:
        """Let failures and recoveries happen while no microbatch is in flight (outer sync)."""
        while self.events and self.events[0][0] <= until:
            t, _, kind, payload = heapq.heappop(self.events)
            self.now = t
            if kind == _EV_FAIL:
                self._on_fail(*payload)
            elif kind == _EV_RECOVER:
                self._on_recover(*payload)
        self.now = until


def plan_evaluator(scenario: Scenario, head_factor: float = HEAD_FACTOR, start_s: float = 0.0,
                   jitter: float = 0.0, draws: int = 2) -> PlanEvaluator:
    """A :class:`~swarmrt.sim.scoring.PlanEvaluator` for ``scenario``: it simulates one iteration of a plan.

    ``start_s`` is the simulated time the plan starts at: the simulator
    passes its own clock so that the replay does the very same float
    arithmetic as the execution (simultaneous events are ordered
    identically; without it a plan can tie-break differently when it
    runs). ``jitter`` and ``draws``: the noisy runs the score averages in.
    """

    def replay_once(routes: Sequence[Route], noise: float, seed: int, trace: bool):
        config = SimConfig(iterations=1, head_factor=head_factor, plan_ahead=False, start_s=start_s,
                           jitter=noise, trace_waits=trace)
        policies = []

        def factory(table: PeerTable) -> ReplayPolicy:
            policies.append(ReplayPolicy(scenario.rules, table, routes))
            return policies[0]
        sim = Simulation(scenario, factory, config, random.Random(seed))
        seconds = sim.run().iteration_s[0]
        return seconds, dict(sim.finish_by_origin), sim.finished, policies[0].plan_index, dict(sim.busy_log)

    return PlanEvaluator(replay_once, jitter, draws, start_s)


def simulate(scenario: Scenario, policy: str | Callable[[PeerTable], Policy], config: SimConfig | None = None,
             rng: random.Random | None = None, clock: Callable[[], float] | None = None,
             scheduler_config: SchedulerConfig | None = None) -> SimReport:
    """Run ``policy`` (a name, or a factory taking the simulator's PeerTable) on ``scenario``."""
    return Simulation(scenario, policy, config or SimConfig(), rng or random.Random(0), clock,
                      scheduler_config).run()
