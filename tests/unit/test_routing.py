import collections
import random

import pytest

from swarmrt.routing.links import FunctionLinks
from swarmrt.routing.paths import PathRules
from swarmrt.routing.peer_table import PeerTable
from swarmrt.routing.policies import SchedulerConfig, make_policy
from swarmrt.routing.wiring import BanList, PeerView, choose_peer


def _split(peers, draws=21000, seed=0, banned=None, now=0.0):
    rng = random.Random(seed)
    counts = collections.Counter()
    for _ in range(draws):
        peer, _ = choose_peer(peers, banned, now, rng)
        counts[peer.peer_id] += 1
    return counts


def test_throughputs_1_2_4_split_1_2_4():
    peers = [PeerView("a", 1.0), PeerView("b", 2.0), PeerView("c", 4.0)]
    counts = _split(peers)
    total = sum(counts.values())
    for pid, expected in (("a", 1 / 7), ("b", 2 / 7), ("c", 4 / 7)):
        assert counts[pid] / total == pytest.approx(expected, abs=0.015)


def test_in_flight_load_shifts_work_away():
    peers = [PeerView("a", 2.0, load=3), PeerView("b", 2.0, load=0)]
    counts = _split(peers, draws=5000)
    # weights 2/4 and 2/1: b gets 4x as much
    assert counts["b"] / counts["a"] == pytest.approx(4.0, rel=0.15)


def test_banned_peers_are_never_chosen_until_the_ban_expires():
    peers = [PeerView("a", 1.0), PeerView("b", 100.0)]
    counts = _split(peers, draws=500, banned={"b": 10.0}, now=5.0)
    assert counts == {"a": 500}
    counts = _split(peers, draws=500, banned={"b": 10.0}, now=10.5)
    assert counts["b"] > 400


def test_no_eligible_peer_says_why():
    rng = random.Random(0)
    assert choose_peer([], None, 0.0, rng) == (None, "no peers")
    peer, reason = choose_peer([PeerView("a", 1.0)], {"a": 5.0}, 0.0, rng)
    assert peer is None and "banned" in reason


def test_new_peer_gets_work_at_once_with_an_optimistic_prior():
    peers = [PeerView("old", 3.0), PeerView("new", None)]
    counts = _split(peers, draws=4000)
    assert counts["new"] / 4000 == pytest.approx(0.5, abs=0.04)
    peer, reason = choose_peer([PeerView("new", None)], None, 0.0, random.Random(1))
    assert peer.peer_id == "new" and "new peer" in reason


def test_ban_list_bans_after_consecutive_failures_and_forgives_on_success():
    bans = BanList(after=2, ban_s=10.0)
    assert not bans.failure("a", now=0.0)
    assert bans.failure("a", now=1.0)
    assert bans.banned(now=5.0) == {"a": 11.0}
    assert bans.banned(now=11.5) == {}
    assert bans.failure("a", now=12.0)  # still failing after the ban: banned again at once
    bans.success("a")
    assert bans.banned(now=12.5) == {} and not bans.failure("a", now=13.0)


# --- the "swarm" routing policy runs this very rule --------------------------------------------


def _wiring_table():
    """Stage 0: origins "o" and "o2" (throughput 1:3). Stage 1: a, b, c with throughput 1:2:4 (seconds of forward + backward 4, 2, 1,
    split 1:2) and d, whose figures are a slow stand-in (not measured yet). Stage 2: e and f, equally fast
    in total but with different forward / backward splits."""
    table = PeerTable(3, FunctionLinks(lambda src, dst: 0.01))
    table.upsert("o", 0, 1.0, 2.0, 4)
    table.upsert("o2", 0, 1.0 / 3, 2.0 / 3, 4)
    for peer, seconds in (("a", 4.0), ("b", 2.0), ("c", 1.0)):
        table.upsert(peer, 1, seconds / 3, 2 * seconds / 3, 4)
    table.upsert("d", 1, 9.0, 18.0, 4, measured=False)
    table.upsert("e", 2, 1.0, 1.0, 4)
    table.upsert("f", 2, 0.5, 1.5, 4)
    return table


def _route_many(policy, n, rng):
    counts = collections.Counter()
    for i in range(n):
        route, _ = policy.route("o", 0.0, rng, microbatch=i)
        counts.update(route.path[1:])
        policy.finished(route)
    return counts


def _rule_pick(table, stage, rng, load):
    """The peer choose_peer draws for ``stage`` over the views a trainer builds from ``table``: throughput
    from the compute times (None when unmeasured), ``load(peer)`` as the load."""
    views = []
    for p in table.peers_of(stage):
        info = table.get(p)
        throughput = 1.0 / (info.forward_s + info.backward_s) if info.measured else None
        views.append(PeerView(p, throughput, load(p)))
    return choose_peer(views, None, 0.0, rng)[0].peer_id


def test_the_swarm_policy_draws_exactly_what_choose_peer_draws():
    """Same table, same seeded rng: every peer SwarmWiring picks is choose_peer's pick over the views the
    trainer would build (throughput from the compute times, None when unmeasured; load = the table's
    in-flight count, or this router's own unfinished routes through the peer when those are more: whole
    routes drawn ahead, as the simulator does), the stage-0 peer included when the policy picks it."""
    table = _wiring_table()
    table.set_in_flight("b", 2)
    table.set_in_flight("e", 1)
    policy = make_policy("swarm", PathRules(stages=3), table)
    ours, theirs = random.Random(5), random.Random(5)
    own = collections.Counter()
    live = []
    for i in range(300):
        route, _ = policy.route(None, 0.0, ours, microbatch=i)
        expected = [_rule_pick(table, stage, theirs, lambda p: max(table.in_flight(p), own[p])) for stage in (0, 1, 2)]
        assert list(route.path) == expected, f"microbatch {i}: policy {route.path}, rule {expected}"
        own.update(expected)
        live.append(route)
        if i % 3 == 2:  # finish the oldest now and then: loads go up and down
            done = live.pop(0)
            policy.finished(done)
            own.subtract(done.path)
    assert {p for r in live for p in r.path} >= {"o", "o2", "a", "b", "c", "d"}  # every kind of peer was drawn


def test_a_trainer_that_redraws_each_hop_adds_nothing_to_the_tables_load():
    """routes_ahead=False (the trainer: it re-draws each hop when its input is ready and keeps the table's
    in-flight figure current itself): the policy's own unfinished routes add no load, so the draws equal
    choose_peer over the table alone, however many routes are open."""
    table = _wiring_table()
    table.set_in_flight("b", 3)
    policy = make_policy("swarm", PathRules(stages=3), table, SchedulerConfig(routes_ahead=False))
    ours, theirs = random.Random(9), random.Random(9)
    for i in range(200):  # none finished: with routes counted, a and c would soon look busy
        route, _ = policy.route(None, 0.0, ours, microbatch=i)
        expected = [_rule_pick(table, stage, theirs, table.in_flight) for stage in (0, 1, 2)]
        assert list(route.path) == expected, f"microbatch {i}: policy {route.path}, rule {expected}"


def test_the_swarm_policy_splits_work_1_2_4_by_throughput():
    table = _wiring_table()
    table.remove("d")
    counts = _route_many(make_policy("swarm", PathRules(stages=3), table), 7000, random.Random(0))
    for peer, expected in (("a", 1 / 7), ("b", 2 / 7), ("c", 4 / 7)):
        assert counts[peer] / 7000 == pytest.approx(expected, abs=0.015), (peer, counts)
    assert counts["e"] / 7000 == pytest.approx(0.5, abs=0.02)  # same seconds in total: same throughput


def test_the_swarm_policy_gives_an_unmeasured_peer_the_optimistic_prior():
    table = _wiring_table()  # d's stand-in figures are 27 s; as unmeasured it counts as fast as c
    counts = _route_many(make_policy("swarm", PathRules(stages=3), table), 5500, random.Random(1))
    assert counts["d"] / 5500 == pytest.approx(4 / 11, abs=0.02), counts
    table.observe("d", forward_s=9.0, backward_s=18.0)  # once measured, its own figure counts
    assert table.get("d").measured
    counts = _route_many(make_policy("swarm", PathRules(stages=3), table), 2000, random.Random(2))
    assert counts["d"] / 2000 < 0.02, counts


def test_routing_never_imports_the_simulator_or_the_planner():
    """The planner (swarmrt.sim.planner) is built on the routing policies, never the other way round."""
    import ast
    import pathlib

    import swarmrt.routing

    problems = []
    for path in sorted(pathlib.Path(swarmrt.routing.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]  # from swarmrt import sim: swarmrt.sim
            else:
                continue
            problems += [f"{path.name} line {node.lineno}: {n}" for n in names if n.startswith("swarmrt.sim")]
    assert not problems, problems
