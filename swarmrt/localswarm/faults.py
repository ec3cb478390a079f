"""Fault plans: what goes wrong in a run, declared up front and fired deterministically.

A :class:`FaultPlan` is a list of faults, each with a trigger (a trainer step or
a time since the run started) and a target (a peer, or "a random peer of stage
S" chosen from the plan's seed). It is pure data plus bookkeeping: nothing here
starts, signals or talks to a process, reads a clock or draws from a global
random generator. Time and the live peers are arguments.

:class:`FaultInjector` walks a plan against a running system through an
*executor* (anything with the three methods of :class:`Executor`): the local
swarm driver in :mod:`swarmrt.localswarm.inject` sends real signals and writes
rule files; a test can pass a fake one. Every fault records whether it fired,
at which step and second, on which peer, and what it did, so a test can insist
that every planned fault really happened (:meth:`FaultPlan.assert_all_fired`):
a fault plan that silently did nothing would make a fault test pass for the
wrong reason.

What each fault does on a :class:`~swarmrt.localswarm.swarm.LocalSwarm`:

=============  ==============================================================
``crash``      SIGKILL the peer's process group (it, its DHT child, its p2pd).
``hang``       SIGSTOP the group; SIGCONT after ``duration_s`` (or at the end).
``preempt``    SIGTERM: the peer announces ``leaving``, drains, exits.
``slow``       multiply its compute time by ``factor`` (rule file, at once);
               back to normal after ``duration_s`` if given.
``slow_stage`` multiply the compute time of STAGE ``stage`` by ``factor``,
               whoever serves it: the rule (with ``"stage": S``) goes into
               every peer's rules file, so a peer that moves onto the stage
               computes slower and one that moves off it at normal speed;
               peers that faults start later get it too. Removed after
               ``duration_s`` if given.
``drop``       its next ``count`` calls of ``method`` fail with UNAVAILABLE.
``delay``      its next ``count`` calls of ``method`` wait ``delay_s`` first.
``corrupt``    its next ``count`` calls of ``method`` get NaN bytes written
               into their tensor payload (Forward/Backward requests, the
               first GetState chunk), so the receiver's checks refuse them.
``partition``  the peers in the set refuse calls from outside it and the
               others refuse calls from them, for ``duration_s``.
``revive``     start a new peer on the stage of a peer a fault took down.
``add_peer``   start a new peer on a stage (or on the one it picks).
``byzantine``  from then on the peer lies in its replies of ``method``
               (Forward outputs or Backward grad_inputs): ``zeros``, ``nan``
               or the true values times ``factor`` (``scale``); it computes
               and applies honestly, only its callers are lied to.
``lie_throughput``  it announces ``value`` samples/s instead of its measure.
``stale_state``  it snapshots its state and hands that snapshot to every
               later joiner (a replay of old weights).
=============  ==============================================================

Byzantine faults (byzantine, lie_throughput, stale_state) are rules-file lies
(:mod:`swarmrt.wire.byzantine`); they last until the end of the run and count
as fired once the peer reports the first lie told (a reply rewritten, the
figure announced, the snapshot taken).

RPC faults (drop, delay, corrupt) and ``slow`` count as fired only once the
peer reports that it applied them (``count`` calls affected, or the new
factor in force), ``revive`` and ``add_peer`` once the new peer serves; the
others fire when the signal is sent or the rule is installed (``slow_stage``:
when every peer's rules are written; its effects count the peers that
reported computing slower on the stage).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Protocol, Sequence, Union

KINDS = ("crash", "hang", "preempt", "slow", "slow_stage", "drop", "delay", "corrupt", "partition", "revive", "add_peer",
         "byzantine", "lie_throughput", "stale_state")
BYZANTINE_KINDS = ("byzantine", "lie_throughput", "stale_state")
"""Kinds where the target answers but lies (:mod:`swarmrt.wire.byzantine`)."""
RPC_KINDS = ("drop", "delay", "corrupt")
RPC_METHODS = ("Forward", "Backward", "GetState", "Info")
"""Methods of the stage service an RPC fault can target (the gRPC method names)."""
CORRUPT_MODES = ("nan", "truncate")
TAKES_DOWN = ("crash", "preempt")
"""Kinds after which the target is gone for good (a ``revive`` starts a new process)."""
DISRUPTS = ("crash", "preempt", "hang", "partition")
"""Kinds whose target does not count as healthy while the fault lasts."""
LASTING = ("hang", "slow", "slow_stage", "partition")
"""Kinds that last until ``duration_s`` is over (or the run ends)."""


class FaultError(ValueError):
    """A fault plan that cannot be built or fired as declared; the message says which fault and why."""


class UnfiredFaults(AssertionError):
    """Raised by :meth:`FaultPlan.assert_all_fired`; lists every planned fault that did not happen."""


# -- targets ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Peer:
    """The ``index``-th peer started on ``stage`` (0 = the first one, in start order, dead ones included)."""

    stage: int
    index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.stage, int) or self.stage < 0:
            raise FaultError(f"Peer(stage={self.stage!r}): stage must be an integer >= 0")
        if not isinstance(self.index, int) or self.index < 0:
            raise FaultError(f"Peer(index={self.index!r}): index must be an integer >= 0")

    def describe(self) -> str:
        return f"peer {self.index} of stage {self.stage}"


@dataclasses.dataclass(frozen=True)
class RandomPeer:
    """A healthy peer of ``stage`` chosen from the plan's seed when the fault fires.

    Healthy: alive, and not hung, partitioned or taken down by an earlier fault.
    The fault waits (stays due) while choosing would leave fewer than
    ``keep_healthy`` healthy peers on the stage, so a random fault never empties
    a stage unless asked to (``keep_healthy=0``).
    """

    stage: int
    keep_healthy: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.stage, int) or self.stage < 0:
            raise FaultError(f"RandomPeer(stage={self.stage!r}): stage must be an integer >= 0")
        if not isinstance(self.keep_healthy, int) or self.keep_healthy < 0:
            raise FaultError(f"RandomPeer(keep_healthy={self.keep_healthy!r}): must be an integer >= 0")

    def describe(self) -> str:
        return f"a random peer of stage {self.stage}"


Target = Union[Peer, RandomPeer]
Trigger = Union[int, float, tuple, None]


# -- one fault -------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)  # identity: a fault is one event, not a value
class Fault:
    """One planned fault and what became of it."""

    id: str
    """``f1``, ``f2``, ... in declaration order; rule files and events name faults by it."""
    kind: str
    targets: tuple[Any, ...]
    """Peer / RandomPeer targets (several for ``partition``; a Fault for ``revive`` of its victim)."""
    at_step: int | None
    """Fire once the trainer has completed this many steps (resolved from a range by the seed)."""
    at_time: float | None
    """Or: fire this many seconds after the run started."""
    duration_s: float | None = None
    """hang / slow / slow_stage / partition: how long it lasts (None: until the end of the run)."""
    params: dict = dataclasses.field(default_factory=dict)
    """factor, method, count, delay_s, mode, stage: whatever the kind takes."""

    # what happened
    fired: bool = False
    fired_step: int | None = None
    fired_time: float | None = None
    resolved: tuple[str, ...] = ()
    """Names of the peers it hit (or started)."""
    note: str = ""
    """What the executor did, in words."""
    ended: bool = False
    ended_time: float | None = None
    effects: int = 0
    """Calls the peer reports it affected (RPC faults, partition); 1 once a slowdown is in force or a
    started peer serves (revive, add_peer)."""
    waiting: str = ""
    """Why a due fault has not fired yet (e.g. no healthy peer to choose)."""

    @property
    def required_effects(self) -> int:
        if self.kind in RPC_KINDS:
            return int(self.params["count"])
        return 1 if self.kind in ("slow", "revive", "add_peer") + BYZANTINE_KINDS else 0

    @property
    def happened(self) -> bool:
        """Fired, and (for RPC faults and ``slow``) confirmed by the peer as many times as planned."""
        return self.fired and self.effects >= self.required_effects

    @property
    def lasting(self) -> bool:
        """A fault with an end (hang, slow, slow_stage, partition) that has fired and not ended yet."""
        return self.kind in LASTING and self.fired and not self.ended

    def trigger_text(self) -> str:
        return f"at step {self.at_step}" if self.at_step is not None else f"at {self.at_time:g} s"

    def describe(self) -> str:
        p = self.params
        if self.kind == "revive":
            source = self.targets[0]
            what = (f"revive the peer taken down by {source.id}" if isinstance(source, Fault)
                    else f"revive {source.describe()}")
        elif self.kind == "add_peer":
            stage = p.get("stage")
            what = "add a peer" + (f" to stage {stage}" if stage is not None else " (it picks its stage)")
        elif self.kind == "slow_stage":
            what = f"slow stage {p.get('stage')} x{p.get('factor'):g} (whoever serves it)"
        elif self.kind == "partition":
            what = "partition {" + ", ".join(t.describe() for t in self.targets) + "} from the rest"
        else:
            target = self.targets[0].describe()
            what = {
                "crash": f"crash (SIGKILL) {target}",
                "hang": f"hang (SIGSTOP) {target}",
                "preempt": f"preempt (SIGTERM) {target}",
                "slow": f"slow {target} x{p.get('factor')}",
                "drop": f"drop {p.get('count')} {p.get('method')} call(s) to {target}",
                "delay": f"delay {p.get('count')} {p.get('method')} call(s) to {target} by {p.get('delay_s')} s",
                "corrupt": f"corrupt ({p.get('mode')}) {p.get('count')} {p.get('method')} call(s) to {target}",
                "byzantine": f"{target} lies in its {p.get('method')} replies ({p.get('mode')}"
                             + (f" x{p.get('factor'):g})" if p.get("mode") == "scale" else ")"),
                "lie_throughput": f"{target} announces {p.get('value')} samples/s",
                "stale_state": f"{target} hands joiners a stale snapshot of its state",
            }[self.kind]
        if self.duration_s is not None:
            what += f" for {self.duration_s:g} s"
        return f"{self.id}: {what} {self.trigger_text()}"

    def outcome(self) -> str:
        """One line: the fault and whether / when / on whom it fired."""
        if not self.fired:
            return f"{self.describe()}: NOT FIRED" + (f" ({self.waiting})" if self.waiting else "")
        line = (f"{self.describe()}: fired at step {self.fired_step}, {self.fired_time:.1f} s on "
                f"{', '.join(self.resolved) or '-'}")
        if self.note:
            line += f" ({self.note})"
        if self.required_effects:
            line += f"; peer confirmed {self.effects}/{self.required_effects}"
        elif self.kind == "partition":
            line += f"; {self.effects} call(s) refused"
        elif self.kind == "slow_stage":
            line += f"; {self.effects} peer(s) computed slower on stage {self.params.get('stage')}"
        if self.ended:
            line += f"; ended at {self.ended_time:.1f} s"
        return line

    def record_fired(self, step: int, elapsed: float, resolved: Sequence[str], note: str = "") -> None:
        self.fired, self.fired_step, self.fired_time = True, step, elapsed
        self.resolved, self.note, self.waiting = tuple(resolved), note, ""

    def record_ended(self, elapsed: float) -> None:
        self.ended, self.ended_time = True, elapsed


def _resolve_trigger(value: Trigger, rng: random.Random, name: str, integer: bool):
    """A trigger may be a number or a ``(low, high)`` range resolved from the plan's seed."""
    if value is None:
        return None
    if isinstance(value, tuple):
        if len(value) != 2 or value[0] > value[1]:
            raise FaultError(f"{name}={value!r}: a range must be (low, high) with low <= high")
        low, high = value
        value = rng.randint(low, high) if integer else rng.uniform(low, high)
    if integer and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise FaultError(f"{name}={value!r}: must be an integer >= 0 (or a (low, high) range)")
    if not integer and (not isinstance(value, (int, float)) or value < 0):
        raise FaultError(f"{name}={value!r}: must be a number of seconds >= 0 (or a (low, high) range)")
    return value


# -- the plan --------------------------------------------------------------------------------------
class FaultPlan:
    """Faults declared up front; ranges and random targets are resolved from ``seed``.

    Same seed, same declarations: same schedule, and the same choice of random
    peer from the same set of candidates.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.faults: list[Fault] = []

    def __iter__(self):
        return iter(self.faults)

    def __len__(self) -> int:
        return len(self.faults)

    def _rng(self, fault_id: str, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}/{fault_id}/{purpose}")  # str seeds are stable across runs

    def _add(self, kind: str, targets: Sequence[Any], at_step: Trigger, at_time: Trigger,
             duration_s: float | None = None, **params) -> Fault:
        fault_id = f"f{len(self.faults) + 1}"
        if (at_step is None) == (at_time is None):
            raise FaultError(f"{fault_id} ({kind}): give exactly one of at_step= or at_time=")
        rng = self._rng(fault_id, "trigger")
        step = _resolve_trigger(at_step, rng, "at_step", integer=True)
        seconds = _resolve_trigger(at_time, rng, "at_time", integer=False)
        if duration_s is not None and (not isinstance(duration_s, (int, float)) or duration_s <= 0):
            raise FaultError(f"{fault_id} ({kind}): duration_s must be > 0 seconds, got {duration_s!r}")
        for target in targets:
            if not isinstance(target, (Peer, RandomPeer, Fault)):
                raise FaultError(f"{fault_id} ({kind}): target {target!r} is not a Peer(stage, index) or "
                                 f"RandomPeer(stage)")
        fault = Fault(fault_id, kind, tuple(targets), step, seconds, duration_s, dict(params))
        self.faults.append(fault)
        return fault

    # process faults
    def crash(self, target: Target, at_step: Trigger = None, at_time: Trigger = None) -> Fault:
        """SIGKILL the target's process group: a machine that vanishes."""
        return self._add("crash", [target], at_step, at_time)

    def hang(self, target: Target, duration_s: float | None = None, at_step: Trigger = None,
             at_time: Trigger = None) -> Fault:
        """SIGSTOP the target (it keeps its sockets but answers nothing), SIGCONT after ``duration_s``."""
        return self._add("hang", [target], at_step, at_time, duration_s)

    def preempt(self, target: Target, at_step: Trigger = None, at_time: Trigger = None) -> Fault:
        """SIGTERM: a preemption notice; the peer announces it is leaving, drains and exits."""
        return self._add("preempt", [target], at_step, at_time)

    def slow(self, target: Target, factor: float, duration_s: float | None = None, at_step: Trigger = None,
             at_time: Trigger = None) -> Fault:
        """Multiply the target's compute time by ``factor`` (>= 1) while it runs."""
        if not isinstance(factor, (int, float)) or factor < 1:
            raise FaultError(f"slow: factor must be a number >= 1, got {factor!r}")
        return self._add("slow", [target], at_step, at_time, duration_s, factor=float(factor))

    def slow_stage(self, stage: int, factor: float, duration_s: float | None = None, at_step: Trigger = None,
                   at_time: Trigger = None) -> Fault:
        """Multiply the compute time of stage ``stage`` by ``factor`` (>= 1), whoever serves it: a peer
        that moves onto the stage computes slower, one that moves off it at normal speed."""
        if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
            raise FaultError(f"slow_stage: stage must be an integer >= 0, got {stage!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
            raise FaultError(f"slow_stage: factor must be a number >= 1, got {factor!r}")
        return self._add("slow_stage", [], at_step, at_time, duration_s, stage=stage, factor=float(factor))

    # RPC faults
    def _rpc(self, kind: str, target: Target, method: str, count: int, at_step, at_time, **params) -> Fault:
        if method not in RPC_METHODS:
            raise FaultError(f"{kind}: method {method!r} is not a stage RPC; choose one of {', '.join(RPC_METHODS)} "
                             f"(averaging runs over hivemind P2P, not this service)")
        if not isinstance(count, int) or count < 1:
            raise FaultError(f"{kind}: count must be an integer >= 1, got {count!r}")
        return self._add(kind, [target], at_step, at_time, method=method, count=count, **params)

    def drop_rpc(self, target: Target, method: str, count: int = 1, at_step: Trigger = None,
                 at_time: Trigger = None) -> Fault:
        """The target's next ``count`` calls of ``method`` fail with UNAVAILABLE."""
        return self._rpc("drop", target, method, count, at_step, at_time)

    def delay_rpc(self, target: Target, method: str, delay_s: float, count: int = 1, at_step: Trigger = None,
                  at_time: Trigger = None) -> Fault:
        """The target's next ``count`` calls of ``method`` wait ``delay_s`` before they are served."""
        if not isinstance(delay_s, (int, float)) or delay_s <= 0:
            raise FaultError(f"delay: delay_s must be > 0 seconds, got {delay_s!r}")
        return self._rpc("delay", target, method, count, at_step, at_time, delay_s=float(delay_s))

    def corrupt_rpc(self, target: Target, method: str, count: int = 1, mode: str = "nan", at_step: Trigger = None,
                    at_time: Trigger = None) -> Fault:
        """The target's next ``count`` calls of ``method`` get a damaged tensor payload.

        ``mode="nan"`` writes 0xFF bytes at the start of the payload (NaN for
        float codecs, so the receiver's NaN check refuses it); ``"truncate"``
        drops its last byte (the size check refuses it).
        """
        if mode not in CORRUPT_MODES:
            raise FaultError(f"corrupt: mode {mode!r} is not one of {', '.join(CORRUPT_MODES)}")
        return self._rpc("corrupt", target, method, count, at_step, at_time, mode=mode)

    # byzantine faults: the target answers, but lies
    def byzantine(self, target: Target, mode: str = "zeros", method: str = "Forward", factor: float = 1.0,
                  at_step: Trigger = None, at_time: Trigger = None) -> Fault:
        """From then on the target's replies of ``method`` (``"Forward"``: outputs, ``"Backward"``:
        grad_inputs) are ``"zeros"``, ``"nan"``, or the true values times ``factor`` (``"scale"``)."""
        if mode not in ("zeros", "nan", "scale"):
            raise FaultError(f"byzantine: mode {mode!r} is not one of zeros, nan, scale")
        if method not in ("Forward", "Backward"):
            raise FaultError(f"byzantine: method {method!r} must be 'Forward' or 'Backward'")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise FaultError(f"byzantine: factor must be a finite number, got {factor!r}")
        return self._add("byzantine", [target], at_step, at_time, mode=mode, method=method, factor=float(factor))

    def lie_throughput(self, target: Target, value: float = 1e11, at_step: Trigger = None,
                       at_time: Trigger = None) -> Fault:
        """From then on the target announces ``value`` samples/s, whatever it measured. Above 1e12
        (the stage record's cap) every member refuses its records, so it drops out of the run
        instead of luring traffic: the default is an absurd value the cap lets through."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise FaultError(f"lie_throughput: value must be a number >= 0, got {value!r}")
        return self._add("lie_throughput", [target], at_step, at_time, value=float(value))

    def stale_state(self, target: Target, at_step: Trigger = None, at_time: Trigger = None) -> Fault:
        """The target snapshots its state now and hands that snapshot to every later joiner."""
        return self._add("stale_state", [target], at_step, at_time)

    # topology faults
    def partition(self, targets: Sequence[Target], duration_s: float | None = None, at_step: Trigger = None,
                  at_time: Trigger = None) -> Fault:
        """Cut the stage-service traffic between ``targets`` and everyone else for ``duration_s``."""
        if not targets:
            raise FaultError("partition: give at least one peer to cut off")
        return self._add("partition", list(targets), at_step, at_time, duration_s)

    def revive(self, taken_down_by: "Fault | Peer", at_step: Trigger = None, at_time: Trigger = None) -> Fault:
        """Bring a peer back: a new process on the stage of the peer that ``taken_down_by`` (a crash or
        preempt of this plan; the fault waits until that one fired) or a given ``Peer`` served. Like
        any joiner it downloads the stage's state (a restarted machine has lost its process)."""
        if isinstance(taken_down_by, Fault):
            if taken_down_by.kind not in TAKES_DOWN:
                raise FaultError(f"revive: {taken_down_by.id} is a {taken_down_by.kind}; give a crash or preempt")
            if taken_down_by not in self.faults:
                raise FaultError(f"revive: {taken_down_by.id} belongs to another plan")
        elif not isinstance(taken_down_by, Peer):
            raise FaultError(f"revive: give the crash/preempt fault or the Peer that comes back, "
                             f"got {taken_down_by!r}")
        return self._add("revive", [taken_down_by], at_step, at_time)

    def add_peer(self, stage: int | None = None, at_step: Trigger = None, at_time: Trigger = None) -> Fault:
        """Start a new peer on ``stage`` (None: the peer picks the stage with the least capacity)."""
        if stage is not None and (not isinstance(stage, int) or stage < 0):
            raise FaultError(f"add_peer: stage must be an integer >= 0 or None, got {stage!r}")
        return self._add("add_peer", [], at_step, at_time, stage=stage)

    # -- firing --------------------------------------------------------------------------------
    def due(self, step: int, elapsed: float) -> list[Fault]:
        """Faults not fired yet whose trigger has been reached, in declaration order."""
        return [f for f in self.faults if not f.fired and (
            (f.at_step is not None and step >= f.at_step) or (f.at_time is not None and elapsed >= f.at_time))]

    def ending(self, elapsed: float) -> list[Fault]:
        """Lasting faults whose duration is over."""
        return [f for f in self.faults if f.lasting and f.duration_s is not None
                and elapsed >= f.fired_time + f.duration_s]

    def disrupted(self) -> set[str]:
        """Peers that are not healthy because of this plan: taken down, or hung/partitioned right now."""
        out: set[str] = set()
        for f in self.faults:
            if f.fired and (f.kind in TAKES_DOWN or (f.kind in DISRUPTS and not f.ended)):
                out.update(f.resolved)
        return out

    def choose(self, fault: Fault, target: RandomPeer, candidates: Sequence[str]) -> str | None:
        """The plan's deterministic pick among ``candidates`` (healthy peers of the stage), or None
        when picking would leave fewer than ``target.keep_healthy`` healthy peers."""
        pool = sorted(set(candidates))
        if len(pool) <= target.keep_healthy:
            return None
        rng = self._rng(fault.id, f"target/{target.stage}")
        return rng.choice(pool)

    # -- checking ------------------------------------------------------------------------------
    def unfired(self) -> list[Fault]:
        return [f for f in self.faults if not f.happened]

    def assert_all_fired(self) -> None:
        """Raise :class:`UnfiredFaults` listing every planned fault that did not (fully) happen."""
        missing = self.unfired()
        if missing:
            lines = "\n".join("  " + f.outcome() for f in missing)
            raise UnfiredFaults(f"{len(missing)} of {len(self.faults)} planned fault(s) never fired "
                                f"(seed {self.seed}):\n{lines}")

    def schedule(self) -> list[tuple]:
        """The resolved schedule: ``(id, kind, at_step, at_time, duration_s, params)`` per fault."""
        return [(f.id, f.kind, f.at_step, f.at_time, f.duration_s, tuple(sorted(f.params.items())))
                for f in self.faults]

    def report(self) -> str:
        return "\n".join(f.outcome() for f in self.faults) or "(no faults planned)"

    # -- generated plans -----------------------------------------------------------------------
    @classmethod
    def chaos(cls, seed: int, stages: int, steps: int, faults: int = 3,
              kinds: Sequence[str] = ("crash", "hang", "preempt"), hang_s: tuple[float, float] = (2.0, 6.0),
              replace_after: int = 2, first_step: int | None = None) -> "FaultPlan":
        """A random plan: ``faults`` faults of ``kinds`` on random peers at random steps, each crash or
        preemption followed ``replace_after`` steps later by a replacement peer on the same stage.

        Faults are spread over steps ``first_step`` (default: 15% of the run) to 70% of the run,
        so the run has time to recover and show it. Same arguments, same plan.
        """
        for kind in kinds:
            if kind not in ("crash", "hang", "preempt", "slow"):
                raise FaultError(f"chaos: kind {kind!r} is not one of crash, hang, preempt, slow")
        if stages < 1 or steps < 4 or faults < 0:
            raise FaultError(f"chaos: needs stages >= 1, steps >= 4 and faults >= 0 "
                             f"(got {stages}, {steps}, {faults})")
        plan = cls(seed)
        rng = random.Random(f"{seed}/chaos")
        low = first_step if first_step is not None else max(1, steps * 15 // 100)
        high = max(low, steps * 70 // 100)
        at = sorted(rng.randint(low, high) for _ in range(faults))
        for step in at:
            kind = rng.choice(list(kinds))
            target = RandomPeer(rng.randrange(stages))
            if kind == "crash":
                plan.revive(plan.crash(target, at_step=step), at_step=step + replace_after)
            elif kind == "preempt":
                plan.revive(plan.preempt(target, at_step=step), at_step=step + replace_after)
            elif kind == "hang":
                plan.hang(target, duration_s=round(rng.uniform(*hang_s), 1), at_step=step)
            else:
                plan.slow(target, factor=4.0, duration_s=round(rng.uniform(*hang_s), 1), at_step=step)
        return plan


# -- firing a plan ---------------------------------------------------------------------------------
class Executor(Protocol):
    """What :class:`FaultInjector` needs from the system under test."""

    def peer_names(self, stage: int, alive: bool) -> list[str]:
        """Names of the peers started on ``stage``, in start order (``alive``: only running ones)."""

    def fire(self, fault: Fault, targets: list[str]) -> str | tuple[str, list[str]]:
        """Do the fault to ``targets``; return a note, or ``(note, names)`` when it started peers."""

    def end(self, fault: Fault) -> str:
        """Undo a lasting fault (resume a hung peer, restore speed, heal a partition); return a note."""

    def effects(self) -> dict[str, int]:
        """Confirmed effects so far per fault id (calls affected, a slowdown in force, a joiner serving;
        for ``slow_stage``: how many peers computed slower on the stage)."""


@dataclasses.dataclass(frozen=True)
class FaultEvent:
    """Something the injector did, for logs and the demo."""

    step: int
    elapsed: float
    fault: Fault
    what: str  # "fired" | "ended" | "effect"
    text: str


class FaultInjector:
    """Fires a :class:`FaultPlan` through an :class:`Executor` as steps and seconds go by.

    Call :meth:`tick` with the trainer's completed step count and the seconds
    since the run started, as often as you like; at the end call
    :meth:`finish` to end whatever still lasts (resume hung peers, heal).
    """

    def __init__(self, plan: FaultPlan, executor: Executor):
        self.plan = plan
        self.executor = executor
        self.events: list[FaultEvent] = []

    def _targets(self, fault: Fault) -> list[str] | None:
        names: list[str] = []
        disrupted = self.plan.disrupted()
        for target in fault.targets:
            if isinstance(target, Fault):  # revive: the victim of that fault, once it has fired
                if not target.fired:
                    fault.waiting = f"waiting for {target.id} to take its peer down"
                    return None
                names.extend(target.resolved)
            elif isinstance(target, Peer):
                started = self.executor.peer_names(target.stage, alive=False)
                if target.index >= len(started):
                    raise FaultError(f"{fault.id}: {target.describe()} does not exist; stage {target.stage} has "
                                     f"had {len(started)} peer(s)")
                names.append(started[target.index])
            else:
                alive = self.executor.peer_names(target.stage, alive=True)
                healthy = [n for n in alive if n not in disrupted and n not in names]
                choice = self.plan.choose(fault, target, healthy)
                if choice is None:
                    fault.waiting = (f"stage {target.stage} has {len(healthy)} healthy peer(s) and "
                                     f"{target.keep_healthy} must stay healthy")
                    return None
                names.append(choice)
        return names

    def tick(self, step: int, elapsed: float) -> list[FaultEvent]:
        """Fire every fault that is due, end every lasting fault whose time is up, collect effects."""
        new: list[FaultEvent] = self.record_effects(self.executor.effects(), step, elapsed)
        for fault in self.plan.ending(elapsed):
            note = self.executor.end(fault)
            fault.record_ended(elapsed)
            new.append(FaultEvent(step, elapsed, fault, "ended", note))
        for fault in self.plan.due(step, elapsed):
            names = self._targets(fault)
            if names is None:
                continue
            result = self.executor.fire(fault, names)
            note, started = (result, None) if isinstance(result, str) or result is None else result
            fault.record_fired(step, elapsed, started if started is not None else names, note or "")
            new.append(FaultEvent(step, elapsed, fault, "fired", note or ""))
        self.events.extend(e for e in new if e.what != "effect")  # effects were recorded already
        return new

    def record_effects(self, counts: dict[str, int], step: int, elapsed: float) -> list[FaultEvent]:
        """Update effect counts reported by peers (``{fault_id: calls affected so far}``)."""
        new = []
        by_id = {f.id: f for f in self.plan.faults}
        for fault_id, count in counts.items():
            fault = by_id.get(fault_id)
            if fault is None or count <= fault.effects:
                continue
            fault.effects = count
            text = (f"{fault.id} confirmed by the peer ({count}/{fault.required_effects})" if fault.required_effects
                    else f"{fault.id}: {count} peer(s) computed slower" if fault.kind == "slow_stage"
                    else f"{fault.id}: {count} call(s) affected")
            new.append(FaultEvent(step, elapsed, fault, "effect", text))
        self.events.extend(new)
        return new

    def finish(self, step: int, elapsed: float) -> list[FaultEvent]:
        """End every fault that still lasts (called once the run is over)."""
        new = []
        for fault in self.plan.faults:
            if fault.lasting:
                note = self.executor.end(fault)
                fault.record_ended(elapsed)
                new.append(FaultEvent(step, elapsed, fault, "ended", f"{note} (run over)"))
        self.events.extend(new)
        return new
