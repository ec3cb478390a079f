import collections
import random

import pytest

from swarmrt.routing.wiring import BanList, PeerView, choose_peer, choose_stage


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


def test_joiner_picks_the_stage_with_least_capacity():
    stage, reason = choose_stage({0: 5.0, 1: 1.0, 2: 3.0}, 3, random.Random(0))
    assert stage == 1 and "least capacity" in reason
    stage, _ = choose_stage({0: 5.0, 1: 1.0}, 3, random.Random(0))
    assert stage == 2  # no peers at all
    picks = {choose_stage({}, 3, random.Random(s))[0] for s in range(30)}
    assert picks == {0, 1, 2}  # ties broken at random
