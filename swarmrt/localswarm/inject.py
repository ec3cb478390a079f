"""Firing a :class:`~swarmrt.localswarm.faults.FaultPlan` at a real :class:`~swarmrt.localswarm.swarm.LocalSwarm`.

:class:`SwarmExecutor` turns faults into what a real swarm suffers: signals to
a peer's process group (crash, hang, preempt), rules in its net rules file
(slow, slow_stage, drop, delay, corrupt, partition; see :mod:`swarmrt.wire.emulation`) and
new peer processes (revive, add_peer). :func:`run_with_faults` follows a
trainer's metrics file and fires the plan as its steps complete, polling with
a deadline; it never sleeps to wait for something to happen, and whatever
happens it resumes hung peers and heals partitions before it returns, so the
swarm can be stopped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import time
from typing import Callable

from swarmrt.wire.emulation import events_path, read_effects
from swarmrt.localswarm.faults import BYZANTINE_KINDS, Fault, FaultEvent, FaultInjector, FaultPlan
from swarmrt.localswarm.swarm import LocalSwarm, Role, SwarmError


class SwarmExecutor:
    """The :class:`~swarmrt.localswarm.faults.Executor` of a :class:`LocalSwarm`."""

    def __init__(self, swarm: LocalSwarm):
        self.swarm = swarm
        self.joiners: dict[str, tuple[Role, Fault]] = {}
        self.watch_exit: dict[str, tuple[Role, Fault]] = {}
        self.confirmed: dict[str, int] = {}
        self.info: list[tuple[Fault, str]] = []
        self.stage_slowdowns: dict[str, dict] = {}
        """Stage slowdowns in force (fault id -> rule): peers that faults start get them too."""
        self._effects_cache: dict[pathlib.Path, tuple[int, dict[str, int]]] = {}

    # -- the Executor protocol -------------------------------------------------------------------
    def peer_names(self, stage: int, alive: bool) -> list[str]:
        roles = self.swarm.peers(stage, alive=alive)
        if alive:
            roles = [r for r in roles if r.address is not None]  # serving, not still starting
        return [r.name for r in roles]

    def fire(self, fault: Fault, targets: list[str]):
        swarm, kind = self.swarm, fault.kind
        roles = [swarm.role(name) for name in targets]
        if kind in ("revive", "add_peer"):
            stage = roles[0].stage if kind == "revive" else fault.params.get("stage")
            joiner = swarm.add_peer(stage, wait=False)
            self.joiners[joiner.name] = (joiner, fault)
            for rule in self.stage_slowdowns.values():  # a stage slowdown in force slows it there too
                swarm.update_rules(joiner, slowdown=dict(rule))
            where = f"stage {stage}" if stage is not None else "the stage it picks"
            return f"started {joiner.name} on {where}", [joiner.name]
        if kind == "slow_stage":
            stage, factor = fault.params["stage"], fault.params["factor"]
            rule = {"factor": factor, "id": fault.id, "stage": stage}
            self.stage_slowdowns[fault.id] = rule
            peers = swarm.peers(alive=False)
            for peer in peers:
                swarm.update_rules(peer, slowdown=dict(rule))
            return f"compute x{factor:g} on stage {stage}, whoever serves it (rule written for {len(peers)} peer(s))"
        role = roles[0]
        where = f"{role.name} (stage {role.stage}, pid {role.proc.pid})"
        if kind == "crash":
            code = swarm.stop_role(role, signal.SIGKILL, timeout=10)
            return f"SIGKILL {where}; exit code {code}, process group gone"
        if kind == "hang":
            role.signal(signal.SIGSTOP)
            return f"SIGSTOP {where}"
        if kind == "preempt":
            role.signal(signal.SIGTERM)  # the main process only: a preemption notice
            self.watch_exit[role.name] = (role, fault)
            return f"SIGTERM {where}: it drains and leaves"
        if kind == "slow":
            swarm.update_rules(role, slowdown={"factor": fault.params["factor"], "id": fault.id})
            return f"compute x{fault.params['factor']:g} on {where}"
        if kind in ("drop", "delay", "corrupt"):
            rule = {"id": fault.id, "method": fault.params["method"], "action": kind, "count": fault.params["count"]}
            if kind == "delay":
                rule["delay_s"] = fault.params["delay_s"]
            if kind == "corrupt":
                rule["mode"] = fault.params["mode"]
            swarm.edit_rules(role, lambda rules: rules.setdefault("faults", []).append(rule))
            return f"{kind} rule for the next {rule['count']} {rule['method']} call(s) on {where}"
        if kind in BYZANTINE_KINDS:
            p = fault.params
            lie = {"id": fault.id, "kind": {"byzantine": "replies", "lie_throughput": "throughput"}.get(kind, kind)}
            lie.update({"method": p["method"], "mode": p["mode"], "factor": p["factor"]} if kind == "byzantine"
                       else {"value": p["value"]} if kind == "lie_throughput" else {})
            swarm.edit_rules(role, lambda rules: rules.setdefault("byzantine", []).append(lie))
            return f"{kind} rule on {where}: {fault.describe().split(': ', 1)[1]}"
        if kind == "partition":
            members = sorted(targets)
            for peer in swarm.peers():
                entry = {"id": fault.id, "allow": members} if peer.name in members else {"id": fault.id,
                                                                                          "deny": members}
                swarm.edit_rules(peer, lambda rules, e=entry: rules.setdefault("partitions", []).append(e))
            return f"cut {', '.join(members)} off from the other peers and the trainers"
        raise ValueError(f"{fault.id}: unknown fault kind {kind!r}")

    def end(self, fault: Fault) -> str:
        swarm = self.swarm
        if fault.kind == "hang":
            role = swarm.role(fault.resolved[0])
            role.signal(signal.SIGCONT)
            return f"SIGCONT {role.name}"
        if fault.kind == "slow":
            swarm.update_rules(fault.resolved[0], slowdown=None)
            return f"{fault.resolved[0]} back to normal speed"
        if fault.kind == "slow_stage":
            self.stage_slowdowns.pop(fault.id, None)
            cleared = 0
            for peer in swarm.peers(alive=False):
                rule = swarm._rules.get(peer.name, {}).get("slowdown")
                if isinstance(rule, dict) and rule.get("id") == fault.id:
                    swarm.update_rules(peer, slowdown=None)
                    cleared += 1
            return f"stage {fault.params['stage']} back to normal speed ({cleared} peer(s))"
        if fault.kind == "partition":
            for peer in swarm.peers(alive=False):
                rules = swarm._rules.get(peer.name, {})
                if any(p.get("id") == fault.id for p in rules.get("partitions", [])):
                    swarm.edit_rules(peer, lambda r: r.__setitem__(
                        "partitions", [p for p in r["partitions"] if p.get("id") != fault.id]))
            return "partition healed"
        return ""

    def effects(self) -> dict[str, int]:
        counts = dict(self.confirmed)
        for peer in self.swarm.peers(alive=False):
            if peer.rules is None:
                continue
            path = events_path(peer.rules)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            cached = self._effects_cache.get(path)
            if cached is None or cached[0] != size:
                cached = self._effects_cache[path] = (size, read_effects(path))
            for fault_id, n in cached[1].items():
                counts[fault_id] = counts.get(fault_id, 0) + n
        return counts

    # -- what else to watch ----------------------------------------------------------------------
    def poll(self) -> list[tuple[Fault, str]]:
        """Joiners that now serve or died, preempted peers that exited: ``(fault, text)`` pairs."""
        out = []
        for name, (role, fault) in list(self.joiners.items()):
            if self.swarm.poll_ready(role):
                del self.joiners[name]
                self.confirmed[fault.id] = 1
                note = next((line.split("; ", 1)[-1] for line in role.log.read_text(errors="replace").splitlines()
                             if line.startswith("serving stage")), "")
                out.append((fault, f"{name} serves stage {role.stage}" + (f": {note}" if note else "")))
            elif not role.alive():
                del self.joiners[name]
                out.append((fault, f"{name} exited with code {role.proc.returncode} before serving:\n"
                                   f"{role.tail(10)}"))
        for name, (role, fault) in list(self.watch_exit.items()):
            if not role.alive():
                del self.watch_exit[name]
                left = next((line for line in role.log.read_text(errors="replace").splitlines()
                             if " left after applying " in line), "")
                out.append((fault, f"{name} exited with code {role.proc.returncode}"
                                   + (f" after {left.split(' left after ', 1)[1]}" if left else "")))
        return out


@dataclasses.dataclass
class FaultRun:
    """What :func:`run_with_faults` saw."""

    summary: dict
    """The trainer's summary (``swarmrt train --summary-file``)."""
    plan: FaultPlan
    events: list[FaultEvent]
    """Every fault fired, ended, confirmed; joiners serving; preempted peers leaving; in order."""
    metrics: list[dict]
    """The trainer's per-step metrics."""
    trainer: Role
    seconds: float

    def report(self) -> str:
        lines = ["fault plan (seed %s):" % self.plan.seed] + ["  " + line for line in self.plan.report().splitlines()]
        lines.append("events:")
        lines += [f"  {e.elapsed:6.1f} s  step {e.step:>4}  {e.fault.id} {e.what}: {e.text}" for e in self.events]
        return "\n".join(lines)


def run_with_faults(swarm: LocalSwarm, plan: FaultPlan, trainer: Role | None = None, steps: int | None = None,
                    extra_args=(), timeout: float = 600.0, poll_s: float = 0.05, check: bool = True,
                    on_event: Callable[[FaultEvent], None] | None = None,
                    on_step: Callable[[dict], None] | None = None) -> FaultRun:
    """Run a trainer to the end while firing ``plan``; returns a :class:`FaultRun`.

    ``trainer``: a trainer already started with :meth:`LocalSwarm.start_trainer`,
    or ``steps`` (and ``extra_args``) to start one. Step triggers count the
    steps this trainer has completed (lines of its metrics file); time
    triggers count seconds from this call. After the trainer exits, peers
    that faults started are given up to the swarm's start timeout to serve.
    ``check``: raise :class:`~swarmrt.localswarm.faults.UnfiredFaults` if a
    planned fault did not happen. A trainer that fails or outlives
    ``timeout`` raises :class:`SwarmError` carrying the plan's report.
    """
    if trainer is None:
        if steps is None:
            raise ValueError("run_with_faults: give a started trainer or steps=")
        trainer = swarm.start_trainer(steps, extra_args)
    executor = SwarmExecutor(swarm)
    injector = FaultInjector(plan, executor)
    metrics_path = swarm.workdir / f"{trainer.name}.metrics.jsonl"
    records: list[dict] = []
    offset = 0
    started = time.monotonic()
    deadline = started + timeout
    step, elapsed = 0, 0.0

    def read_metrics() -> None:
        nonlocal offset
        try:
            with open(metrics_path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[:chunk.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            if line.strip():
                records.append(json.loads(line))
                if on_step is not None:
                    on_step(records[-1])

    def emit(events: list[FaultEvent]) -> None:
        if on_event is not None:
            for event in events:
                on_event(event)

    def observe() -> None:
        nonlocal step, elapsed
        read_metrics()
        step, elapsed = len(records), time.monotonic() - started
        extra = [FaultEvent(step, elapsed, fault, "info", text) for fault, text in executor.poll()]
        injector.events.extend(extra)
        emit(extra)
        emit(injector.tick(step, elapsed))

    try:
        while trainer.alive():
            observe()
            if time.monotonic() > deadline:
                raise SwarmError(f"{trainer.name} did not finish in {timeout:g} s\n{plan.report()}\n{trainer.tail()}")
            time.sleep(poll_s)
        observe()
        # peers that faults started get their chance to serve (a revive at the last step counts)
        join_deadline = time.monotonic() + swarm.start_timeout
        while executor.joiners and time.monotonic() < join_deadline:
            time.sleep(poll_s)
            observe()
    finally:
        emit(injector.finish(step, time.monotonic() - started))
    try:
        summary = swarm.wait_trainer(trainer, timeout=30)
    except SwarmError as e:
        raise SwarmError(f"{e}\nfaults:\n{plan.report()}") from None
    run = FaultRun(summary, plan, injector.events, records, trainer, time.monotonic() - started)
    if check:
        plan.assert_all_fired()
    return run
