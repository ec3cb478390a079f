"""Fault plans without processes: seeded schedules, firing at the declared step, the unfired check."""

import pytest

from swarmrt.localswarm.faults import (Fault, FaultError, FaultInjector, FaultPlan, Peer, RandomPeer,
                                    UnfiredFaults)


class FakeSwarm:
    """An executor that records what it was asked to do; peers are ``s<stage>p<i>``."""

    def __init__(self, peers_per_stage=(2, 3, 2)):
        self.started = {s: [f"s{s}p{i}" for i in range(n)] for s, n in enumerate(peers_per_stage)}
        self.dead: set[str] = set()
        self.calls: list[tuple] = []
        self.confirmed: dict[str, int] = {}
        self.step = 0

    def peer_names(self, stage, alive):
        return [n for n in self.started[stage] if not (alive and n in self.dead)]

    def fire(self, fault, targets):
        self.calls.append(("fire", self.step, fault.kind, tuple(targets)))
        if fault.kind in ("crash", "preempt"):
            self.dead.update(targets)
        if fault.kind in ("revive", "add_peer"):
            stage = fault.params.get("stage")
            if stage is None:
                stage = int(targets[0][1])
            name = f"s{stage}p{len(self.started[stage])}"
            self.started[stage].append(name)
            self.confirmed[fault.id] = 1  # a real swarm confirms once the new peer serves
            return f"started {name}", [name]
        return f"{fault.kind} {targets}"

    def end(self, fault):
        self.calls.append(("end", self.step, fault.kind, fault.resolved))
        return "ended"

    def effects(self):
        return dict(self.confirmed)


def run(plan, swarm, steps, seconds_per_step=1.0):
    injector = FaultInjector(plan, swarm)
    for step in range(steps + 1):
        swarm.step = step
        injector.tick(step, step * seconds_per_step)
    injector.finish(steps, steps * seconds_per_step)
    return injector


def declare(plan):
    plan.crash(RandomPeer(1), at_step=(5, 40))
    plan.hang(RandomPeer(2), duration_s=3.0, at_step=(10, 30))
    plan.preempt(RandomPeer(0), at_time=(2.0, 50.0))
    plan.slow(RandomPeer(1), factor=3, at_step=(1, 60))
    return plan


def test_same_seed_same_schedule_and_same_victims():
    a, b, c = declare(FaultPlan(seed=11)), declare(FaultPlan(seed=11)), declare(FaultPlan(seed=12))
    assert a.schedule() == b.schedule()
    assert a.schedule() != c.schedule()  # the ranges really are drawn from the seed
    run(a, FakeSwarm(), 80)
    run(b, FakeSwarm(), 80)
    assert [f.resolved for f in a] == [f.resolved for f in b]
    assert all(f.fired for f in a)


def test_random_victims_depend_on_the_seed():
    victims = set()
    for seed in range(20):
        plan = FaultPlan(seed)
        plan.crash(RandomPeer(1), at_step=0)
        run(plan, FakeSwarm(), 0)
        victims.add(plan.faults[0].resolved)
    assert victims == {("s1p0",), ("s1p1",), ("s1p2",)}


def test_faults_fire_at_their_declared_step_and_time():
    plan = FaultPlan(seed=0)
    crash = plan.crash(Peer(1, 1), at_step=7)
    hang = plan.hang(Peer(2, 0), duration_s=4.0, at_step=3)
    late = plan.preempt(Peer(0, 0), at_time=12.5)
    swarm = FakeSwarm()
    run(plan, swarm, 20)
    assert (crash.fired_step, crash.resolved) == (7, ("s1p1",))
    assert (hang.fired_step, hang.resolved) == (3, ("s2p0",))
    assert late.fired_step == 13 and late.fired_time == 13.0  # first tick at or after 12.5 s
    assert ("fire", 7, "crash", ("s1p1",)) in swarm.calls
    # the hang is undone 4 s later, not before
    assert ("end", 7, "hang", ("s2p0",)) in swarm.calls and hang.ended_time == 7.0
    assert [c for c in swarm.calls if c[0] == "fire" and c[1] < 3] == []
    plan.assert_all_fired()


def test_an_unfired_fault_fails_the_check_and_is_named():
    plan = FaultPlan(seed=3)
    plan.crash(Peer(1, 0), at_step=5)
    never = plan.hang(Peer(2, 0), duration_s=1.0, at_step=50)
    run(plan, FakeSwarm(), 10)
    assert plan.unfired() == [never]
    with pytest.raises(UnfiredFaults) as e:
        plan.assert_all_fired()
    assert "1 of 2" in str(e.value) and "f2: hang (SIGSTOP) peer 0 of stage 2" in str(e.value)
    assert "NOT FIRED" in str(e.value) and "f1" not in str(e.value)


def test_rpc_faults_count_only_when_the_peer_confirms_every_call():
    plan = FaultPlan(seed=0)
    drop = plan.drop_rpc(Peer(0, 0), "Forward", count=3, at_step=1)
    swarm = FakeSwarm()
    injector = FaultInjector(plan, swarm)
    injector.tick(1, 1.0)
    assert drop.fired and not drop.happened
    swarm.confirmed["f1"] = 2
    injector.tick(2, 2.0)
    with pytest.raises(UnfiredFaults, match="peer confirmed 2/3"):
        plan.assert_all_fired()
    swarm.confirmed["f1"] = 3
    events = injector.tick(3, 3.0)
    assert [e.what for e in events] == ["effect"] and "(3/3)" in events[0].text
    plan.assert_all_fired()


def test_random_target_never_takes_the_last_healthy_peer_and_says_why():
    plan = FaultPlan(seed=1)
    first = plan.crash(RandomPeer(0), at_step=1)
    second = plan.hang(RandomPeer(0), duration_s=5, at_step=2)  # stage 0 has 2 peers: must wait
    swarm = FakeSwarm()
    run(plan, swarm, 5)
    assert first.fired and not second.fired
    assert "1 healthy peer(s) and 1 must stay healthy" in second.waiting
    with pytest.raises(UnfiredFaults, match="must stay healthy"):
        plan.assert_all_fired()
    # a replacement makes room: the waiting fault fires on a healthy peer, not the dead one
    plan2 = FaultPlan(seed=1)
    crash = plan2.crash(RandomPeer(0), at_step=1)
    plan2.revive(crash, at_step=3)
    hang = plan2.hang(RandomPeer(0), duration_s=5, at_step=2)
    run(plan2, FakeSwarm(), 6)
    assert hang.fired_step == 3 and hang.resolved[0] not in crash.resolved


def test_revive_waits_for_its_fault_and_restarts_that_stage():
    plan = FaultPlan(seed=5)
    crash = plan.crash(RandomPeer(2), at_step=6)
    back = plan.revive(crash, at_step=2)  # declared earlier than the crash can happen
    added = plan.add_peer(stage=1, at_step=4)
    swarm = FakeSwarm()
    run(plan, swarm, 10)
    assert back.fired_step == 6 and back.resolved == ("s2p2",)
    assert added.resolved == ("s1p3",)
    plan.assert_all_fired()


def test_partition_and_slow_last_for_their_duration():
    plan = FaultPlan(seed=0)
    cut = plan.partition([Peer(0, 0), Peer(1, 1)], duration_s=5, at_time=2.0)
    slow = plan.slow(Peer(2, 1), factor=4, at_step=3)  # no duration: until the end of the run
    swarm = FakeSwarm()
    injector = run(plan, swarm, 10)
    assert cut.resolved == ("s0p0", "s1p1") and (cut.fired_time, cut.ended_time) == (2.0, 7.0)
    assert slow.ended_time == 10.0 and "run over" in injector.events[-1].text
    injector.record_effects({slow.id: 1}, 10, 10.0)
    plan.assert_all_fired()


@pytest.mark.parametrize("build, needle", [
    (lambda p: p.crash(Peer(1, 0)), "exactly one of at_step= or at_time="),
    (lambda p: p.crash(Peer(1, 0), at_step=1, at_time=2.0), "exactly one"),
    (lambda p: p.crash(Peer(1, 0), at_step=(9, 3)), "low <= high"),
    (lambda p: p.crash(Peer(1, 0), at_step=-1), "at_step=-1"),
    (lambda p: p.crash("peer3", at_step=1), "not a Peer(stage, index)"),
    (lambda p: p.drop_rpc(Peer(1, 0), "Average", at_step=1), "'Average' is not a stage RPC"),
    (lambda p: p.drop_rpc(Peer(1, 0), "Forward", count=0, at_step=1), "count must be"),
    (lambda p: p.slow(Peer(1, 0), factor=0.5, at_step=1), "factor must be"),
    (lambda p: p.corrupt_rpc(Peer(1, 0), "Forward", mode="flip", at_step=1), "mode 'flip'"),
    (lambda p: p.hang(Peer(1, 0), duration_s=0, at_step=1), "duration_s must be > 0"),
    (lambda p: p.revive(p.hang(Peer(1, 0), at_step=1), at_step=2), "f1 is a hang"),
    (lambda p: Peer(-1), "stage must be"),
])
def test_bad_declarations_name_what_is_wrong(build, needle):
    with pytest.raises(FaultError, match=None) as e:
        build(FaultPlan())
    assert needle in str(e.value)


def test_a_peer_index_that_never_existed_is_an_error_naming_it():
    plan = FaultPlan()
    plan.crash(Peer(1, 7), at_step=0)
    with pytest.raises(FaultError, match="peer 7 of stage 1 does not exist; stage 1 has had 3 peer"):
        run(plan, FakeSwarm(), 1)


def test_chaos_plans_are_seeded_and_replace_what_they_take_down():
    a = FaultPlan.chaos(seed=4, stages=3, steps=100, faults=6)
    assert a.schedule() == FaultPlan.chaos(seed=4, stages=3, steps=100, faults=6).schedule()
    assert a.schedule() != FaultPlan.chaos(seed=5, stages=3, steps=100, faults=6).schedule()
    kinds = [f.kind for f in a]
    for f in a:
        if f.kind in ("crash", "preempt"):
            revive = next(r for r in a if r.kind == "revive" and r.targets[0] is f)
            assert revive.at_step == f.at_step + 2
        assert f.at_step is None or 15 <= f.at_step <= 72
    assert kinds.count("revive") == kinds.count("crash") + kinds.count("preempt")
    assert isinstance(a.faults[0], Fault)


# -- slow_stage: a stage slowed, whoever serves it ---------------------------------------------------
def test_slow_stage_fires_when_written_lasts_its_duration_and_says_so():
    plan = FaultPlan(seed=0)
    fault = plan.slow_stage(1, 4.0, duration_s=3, at_step=2)
    assert fault.kind == "slow_stage" and fault.targets == () and fault.params == {"stage": 1, "factor": 4.0}
    assert fault.describe() == "f1: slow stage 1 x4 (whoever serves it) for 3 s at step 2"
    swarm = FakeSwarm()
    injector = run(plan, swarm, 10)
    assert ("fire", 2, "slow_stage", ()) in swarm.calls and ("end", 5, "slow_stage", ()) in swarm.calls
    assert (fault.fired_step, fault.fired_time, fault.ended_time) == (2, 2.0, 5.0)
    plan.assert_all_fired()  # fired when the rules were written; nothing to confirm
    injector.record_effects({fault.id: 2}, 10, 10.0)
    assert "2 peer(s) computed slower" in injector.events[-1].text
    assert "; 2 peer(s) computed slower on stage 1; ended at 5.0 s" in fault.outcome()


def test_slow_stage_without_duration_ends_with_the_run():
    plan = FaultPlan(seed=0)
    fault = plan.slow_stage(0, 2, at_time=1.0)
    assert fault.lasting is False
    injector = run(plan, FakeSwarm(), 4)
    assert fault.ended_time == 4.0 and "run over" in injector.events[-1].text


@pytest.mark.parametrize("build, needle", [
    (lambda p: p.slow_stage(-1, 4.0, at_step=1), "slow_stage: stage must be an integer >= 0, got -1"),
    (lambda p: p.slow_stage(True, 4.0, at_step=1), "stage must be an integer >= 0, got True"),
    (lambda p: p.slow_stage("1", 4.0, at_step=1), "stage must be an integer >= 0, got '1'"),
    (lambda p: p.slow_stage(1, 0.5, at_step=1), "slow_stage: factor must be a number >= 1"),
    (lambda p: p.slow_stage(1, 4.0), "exactly one of at_step= or at_time="),
    (lambda p: p.slow_stage(1, 4.0, duration_s=0, at_step=1), "duration_s must be > 0"),
])
def test_bad_slow_stage_declarations_name_what_is_wrong(build, needle):
    with pytest.raises(FaultError) as e:
        build(FaultPlan())
    assert needle in str(e.value)


class RulesSwarm:
    """Just what SwarmExecutor needs of a LocalSwarm for rule faults and joiners."""

    class Role:
        def __init__(self, name, stage):
            self.name, self.stage, self.rules = name, stage, f"{name}.rules.json"

    def __init__(self):
        self.roles = [self.Role(f"peer{i}", i % 3) for i in range(1, 5)]
        self._rules = {r.name: {"node": r.name} for r in self.roles}

    def peers(self, stage=None, alive=True):
        return [r for r in self.roles if stage is None or r.stage == stage]

    def role(self, name):
        return next(r for r in self.roles if r.name == name)

    def update_rules(self, role, **keys):
        rules = self._rules.setdefault(role.name, {"node": role.name})
        for key, value in keys.items():
            rules.pop(key, None) if value is None else rules.__setitem__(key, value)
        return rules

    def add_peer(self, stage=None, wait=True):
        role = self.Role(f"peer{len(self.roles) + 1}", stage)
        self.roles.append(role)
        self._rules[role.name] = {"node": role.name}
        return role


def test_the_swarm_executor_writes_a_stage_slowdown_for_every_peer_and_joiner_and_removes_only_its_own():
    from swarmrt.localswarm.inject import SwarmExecutor
    from swarmrt.wire.emulation import parse_rules

    swarm = RulesSwarm()
    executor = SwarmExecutor(swarm)
    plan = FaultPlan()
    fault = plan.slow_stage(1, 4.0, at_step=0)
    joiner = plan.add_peer(at_step=0)
    note = executor.fire(fault, [])
    assert "compute x4 on stage 1, whoever serves it (rule written for 4 peer(s))" == note
    for name, rules in swarm._rules.items():
        assert rules["slowdown"] == {"factor": 4.0, "id": "f1", "stage": 1}, name
        parsed = parse_rules(rules)
        assert (parsed.slowdown_for(1), parsed.slowdown_for(0)) == (4.0, None)
    _, (new,) = executor.fire(joiner, [])
    assert swarm._rules[new]["slowdown"]["id"] == "f1"  # started while the stage is slow: slow there too
    swarm.update_rules(swarm.role("peer2"), slowdown={"factor": 2.0, "id": "f9"})  # someone else's slowdown
    assert executor.end(fault) == "stage 1 back to normal speed (4 peer(s))"
    assert swarm._rules["peer2"]["slowdown"]["id"] == "f9"
    assert all("slowdown" not in r for n, r in swarm._rules.items() if n != "peer2")
    _, (later,) = executor.fire(plan.add_peer(at_step=0), [])
    assert "slowdown" not in swarm._rules[later]


def test_a_stage_slowdown_applies_to_the_worker_of_that_stage_only(tmp_path):
    """server_interceptors is built for each stage a peer serves; the stage rule follows the worker's stage."""
    import types

    from swarmrt.wire.emulation import events_path, read_effects, server_interceptors, write_rules

    path = tmp_path / "peer.rules.json"
    write_rules(path, {"slowdown": {"factor": 4, "id": "f3", "stage": 1}})
    on_stage_0 = types.SimpleNamespace(stage=0, slowdown=1.0)
    server_interceptors(path, on_stage_0)
    assert on_stage_0.slowdown == 1.0 and read_effects(events_path(path)) == {}
    moved_to_1 = types.SimpleNamespace(stage=1, slowdown=1.0)  # the same peer after a move: a new worker
    (interceptor,) = server_interceptors(path, moved_to_1)
    assert moved_to_1.slowdown == 4.0 and read_effects(events_path(path)) == {"f3": 1}
    write_rules(path, {})
    interceptor.rules.current()  # what the next call does
    assert moved_to_1.slowdown == 1.0
