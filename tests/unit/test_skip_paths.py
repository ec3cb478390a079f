"""Every rule of a path, on hand-made legal and illegal routes."""

from __future__ import annotations

import pytest

from swarmrt.routing.paths import (
    Hop,
    PathRules,
    Route,
    backward_retraces_forward,
    balance_bounds,
    balance_feasible,
    balance_violations,
    ends_at_last_stage,
    memory_violations,
    peers_serve_their_stage,
    stage_counts,
    stages_increase,
    starts_at_origin,
    validate_route,
    visits_required_count,
)

pytestmark = pytest.mark.timeout(30)

# 6 stages, skip 1/3: 4 of 6 stages visited; stages 0 and 5 kept; 2 of the 4 middle stages.
PLAIN = PathRules(stages=6, skip_ratio=1 / 3)
# geo-aws18's shape: 4 stages, 3 visited, stage 0 is also last: 2 of the middle stages 1..3.
RETURN = PathRules.from_visited(4, 3, first_stage_is_also_last=True)


def route(origin, *hops):
    return Route(origin=origin, hops=tuple(Hop(s, p) for s, p in hops))


def test_visited_count_follows_skip_ratio():
    assert PLAIN.visited == 4
    assert PLAIN.middle_stages == (1, 2, 3, 4)
    assert PLAIN.middle_visits == 2
    assert PathRules(stages=6, skip_ratio=0.0).visited == 6
    assert PathRules(stages=6, skip_ratio=0.33).visited == 4  # round(4.02)
    assert PathRules(stages=6, skip_ratio=0.25).visited == 5  # round(4.5), halves up


def test_scenario_visited_maps_to_skip_ratio_for_return_shape():
    assert RETURN.skip_ratio == pytest.approx(0.25)
    assert RETURN.visited == 3
    assert RETURN.middle_stages == (1, 2, 3)
    assert RETURN.middle_visits == 2
    assert RETURN.last_stage == 0


def test_rules_reject_skipping_first_or_last_stage():
    with pytest.raises(ValueError, match="never be skipped"):
        PathRules(stages=4, skip_ratio=0.9)
    with pytest.raises(ValueError, match="skip_ratio"):
        PathRules(stages=4, skip_ratio=1.0)
    with pytest.raises(ValueError, match="stages"):
        PathRules(stages=1)
    with pytest.raises(ValueError, match="stages_visited_per_microbatch"):
        PathRules.from_visited(4, 5, True)


def test_legal_plain_route_breaks_no_rule():
    r = route("a", (0, "a"), (2, "c"), (4, "e"), (5, "f"))
    assert validate_route(r, PLAIN) == []
    assert r.path == ("a", "c", "e", "f")
    assert r.middle_stages(PLAIN) == (2, 4)


def test_legal_return_route_breaks_no_rule():
    r = route(0, (0, 0), (1, 6), (3, 14), (0, 0))
    assert validate_route(r, RETURN) == []
    assert r.backward() == (Hop(0, 0), Hop(3, 14), Hop(1, 6), Hop(0, 0))


def test_starts_at_origin():
    assert starts_at_origin(route("a", (0, "a"), (5, "f")), PLAIN)
    assert not starts_at_origin(route("a", (0, "b"), (1, "x"), (2, "y"), (5, "f")), PLAIN)
    r = route("a", (1, "x"), (2, "y"), (3, "z"), (5, "f"))
    assert "starts_at_origin" in validate_route(r, PLAIN)


def test_ends_at_last_stage():
    skipped_last = route("a", (0, "a"), (1, "b"), (2, "c"), (4, "e"))
    assert not ends_at_last_stage(skipped_last, PLAIN)
    assert "ends_at_last_stage" in validate_route(skipped_last, PLAIN)
    no_return = route(0, (0, 0), (1, 6), (2, 10))
    assert not ends_at_last_stage(no_return, RETURN)
    other_origin = route(0, (0, 0), (1, 6), (2, 10), (0, 1))
    assert not ends_at_last_stage(other_origin, RETURN)
    assert ends_at_last_stage(route(0, (0, 0), (1, 6), (2, 10), (0, 0)), RETURN)


def test_stages_increase():
    assert not stages_increase(route("a", (0, "a"), (3, "d"), (2, "c"), (5, "f")), PLAIN)
    assert not stages_increase(route("a", (0, "a"), (2, "c"), (2, "c2"), (5, "f")), PLAIN)
    assert not stages_increase(route("a", (0, "a"), (2, "c"), (9, "z"), (5, "f")), PLAIN)
    assert not stages_increase(route(0, (0, 0), (2, 10), (1, 6), (0, 0)), RETURN)
    # a middle visit of stage 0 is a repeat, not the return
    assert not stages_increase(route(0, (0, 0), (0, 1), (2, 10), (0, 0)), RETURN)
    assert stages_increase(route(0, (0, 0), (1, 6), (2, 10), (0, 0)), RETURN)


def test_visits_required_count():
    too_many = route("a", (0, "a"), (1, "b"), (2, "c"), (3, "d"), (5, "f"))
    too_few = route("a", (0, "a"), (3, "d"), (5, "f"))
    assert not visits_required_count(too_many, PLAIN)
    assert not visits_required_count(too_few, PLAIN)
    assert validate_route(too_many, PLAIN) == ["visits_required_count"]
    assert not visits_required_count(route(0, (0, 0), (1, 6), (0, 0)), RETURN)
    assert not visits_required_count(route(0, (0, 0), (1, 6), (2, 10), (3, 14), (0, 0)), RETURN)


def test_peers_serve_their_stage():
    stage_of = {"a": 0, "c": 2, "e": 4, "f": 5}
    good = route("a", (0, "a"), (2, "c"), (4, "e"), (5, "f"))
    bad = route("a", (0, "a"), (2, "e"), (4, "c"), (5, "f"))
    assert peers_serve_their_stage(good, stage_of)
    assert not peers_serve_their_stage(bad, stage_of)
    assert validate_route(bad, PLAIN, peer_stage=stage_of) == ["peers_serve_their_stage"]


def test_backward_retraces_forward():
    r = route(0, (0, 0), (1, 6), (3, 14), (0, 0))
    assert backward_retraces_forward(r, [(0, 0), (3, 14), (1, 6), (0, 0)])
    assert not backward_retraces_forward(r, [(0, 0), (1, 6), (3, 14), (0, 0)])
    assert validate_route(r, RETURN, backward=[(0, 0), (3, 14), (0, 0)]) == ["backward_retraces_forward"]


def test_balance_bounds_are_ten_percent_with_integer_slack():
    assert balance_bounds(24.0, 0.10) == (22, 26)   # 21.6 .. 26.4
    assert balance_bounds(100.0, 0.10) == (90, 110)
    assert balance_bounds(10 / 3, 0.10) == (3, 4)   # no integer within 10% of 3.33


def test_balance_violations_name_the_stage():
    rules = RETURN
    assert balance_violations({1: 24, 2: 24, 3: 24}, rules) == []
    assert balance_violations({1: 22, 2: 26, 3: 24}, rules) == []
    broken = balance_violations({1: 30, 2: 21, 3: 21}, rules)
    assert len(broken) == 3 and broken[0].startswith("stage 1: 30")


def test_stage_counts():
    routes = [route(0, (0, 0), (1, 6), (3, 14), (0, 0)), route(1, (0, 1), (2, 10), (3, 15), (0, 1))]
    assert stage_counts(routes, RETURN) == {1: 1, 2: 1, 3: 2}


def test_balance_feasible():
    rules = RETURN  # k = 2 of 3 middle stages; window of 36 -> mean 24, bounds [22, 26]
    assert balance_feasible({1: 0, 2: 0, 3: 0}, 36, 36, rules)
    # stage 1 already has 27 > 26: never fixable
    assert not balance_feasible({1: 27, 2: 0, 3: 0}, 20, 36, rules)
    # 24 done, all on stages 1 and 2 -> (24, 24, 0); 12 left can give stage 3 at most 12 < 22
    assert not balance_feasible({1: 24, 2: 24, 3: 0}, 12, 36, rules)
    # (16, 16, 16) after 24; 12 left x 2 = 24 visits; each stage needs >= 6, takes <= 10
    assert balance_feasible({1: 16, 2: 16, 3: 16}, 12, 36, rules)
    # end of window: feasible iff balanced
    assert balance_feasible({1: 22, 2: 26, 3: 24}, 0, 36, rules)
    assert not balance_feasible({1: 21, 2: 27, 3: 24}, 0, 36, rules)


def test_memory_violations():
    holds = {"a": [(0.0, 5.0), (1.0, 6.0), (2.0, 3.0)], "b": [(0.0, 1.0), (1.0, 2.0)]}
    assert memory_violations(holds, {"a": 3, "b": 1}) == []
    broken = memory_violations(holds, {"a": 2, "b": 1})
    assert broken == ["peer 'a': held 3 microbatches, memory allows 2"]
