"""swarmrt.local_sgd.robust: robust aggregation, bans, agreement on the round, state checks.

Small hand-worked examples (each number in a comment can be checked on paper), then the
1e6x-scaled sender on realistic sizes.
"""

import dataclasses
import math

import pytest
import torch

from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.robust import (
    OUTLIER_MIN_NUMEL,
    SenderBans,
    agree_on_state,
    aggregate,
    centered_clip,
    check_state,
    clip_by_norm,
    outliers,
    trim_count,
    trimmed_mean,
)

pytestmark = pytest.mark.timeout(30)

MEAN = LocalSGDSection()
TRIMMED = LocalSGDSection(aggregation="trimmed_mean")
CLIPPED = LocalSGDSection(aggregation="centered_clip")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# -- the rules, by hand ---------------------------------------------------------------------------


def test_trimmed_mean_drops_the_extremes_of_every_coordinate():
    # coordinate 0: 1 2 3 100 -> drop 1 and 100 -> 2.5; coordinate 1: -50 4 6 8 -> drop -50, 8 -> 5
    parts = [t(1, 8), t(2, -50), t(3, 4), t(100, 6)]
    assert trimmed_mean(parts, 0.25).tolist() == [2.5, 5.0]
    # three senders: the median; two: nothing to trim, the mean
    assert trimmed_mean([t(1.0), t(7.0), t(1e9)], 0.25).tolist() == [7.0]
    assert trimmed_mean([t(1.0), t(3.0)], 0.25).tolist() == [2.0]


def test_trim_count():
    assert [trim_count(n, 0.25) for n in range(1, 10)] == [0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert [trim_count(n, 0.45) for n in (3, 5, 10)] == [1, 2, 4]  # never everything: (n - 1) // 2 at most


def test_centered_clip_by_hand():
    # three senders at 0, one at 10, radius 1, from the median 0:
    # v1 = 0 + (0 + 0 + 0 + 10 * 1/10) / 4 = 0.25
    # v2 = 0.25 + (3 * -0.25 + 9.75 * 1/9.75) / 4 = 0.25 + 0.0625 = 0.3125
    parts = [t(0.0), t(0.0), t(0.0), t(10.0)]
    assert centered_clip(parts, radius=1.0, iterations=1).item() == pytest.approx(0.25)
    assert centered_clip(parts, radius=1.0, iterations=2).item() == pytest.approx(0.3125)
    # the fixed point: 3 * (-v) + 1 = 0 -> v = 1/3, however far away the fourth sender is
    for far in (10.0, 1e6, 1e30):
        got = centered_clip([t(0.0), t(0.0), t(0.0), t(far)], radius=1.0, iterations=60).item()
        assert got == pytest.approx(1 / 3, rel=1e-4)
    # within the radius nothing is clipped: the plain mean (1 + 2 + 3 + 6) / 4 = 3
    near = [t(1.0), t(2.0), t(3.0), t(6.0)]
    assert centered_clip(near, radius=100.0, iterations=1).item() == pytest.approx(3.0)


def test_centered_clip_automatic_radius_is_the_median_distance():
    # 2-d: start at the coordinate-wise median (1.5, 0); distances 1.5, 0.5, 0.5, 99.5, whose
    # median (0.5 + 1.5) / 2 = 1 is the radius; one step moves by (-1 - 0.5 + 0.5 + 1) / 4 = 0
    parts = [t(0.0, 0.0), t(1.0, 0.0), t(2.0, 0.0), t(101.0, 0.0)]
    assert centered_clip(parts, radius=0.0, iterations=1).tolist() == pytest.approx([1.5, 0.0])
    # with a radius of 0.5 instead: (-0.5 - 0.5 + 0.5 + 0.5) / 4 = 0 as well; radius 0.25: also
    # symmetric; radius 2: (-1.5 - 0.5 + 0.5 + 2) / 4 = 0.125 -> 1.625
    assert centered_clip(parts, radius=2.0, iterations=1).tolist() == pytest.approx([1.625, 0.0])


def test_outliers_need_a_majority_and_enough_values():
    gen = torch.Generator().manual_seed(0)
    honest = [torch.randn(OUTLIER_MIN_NUMEL, generator=gen) for _ in range(3)]
    liar = honest[0] * 1e6
    assert set(outliers(honest + [liar], 10.0)) == {3}
    assert outliers(honest, 10.0) == {}  # honest scatter is not an outlier
    assert outliers([honest[0], liar], 10.0) == {}  # two senders: no majority to tell who lies
    assert outliers([h[:10] for h in honest] + [liar[:10]], 10.0) == {}  # too few values to judge
    assert outliers(honest + [liar], 0.0) == {}  # off
    # near-identical honest parts and one merely 3x larger (it trained longer): not an outlier
    alike = [torch.ones(OUTLIER_MIN_NUMEL) + 1e-4 * h for h in honest[:2]]
    assert outliers(alike + [3 * alike[0]], 10.0) == {}
    assert set(outliers(alike + [20 * alike[0]], 10.0)) == {2}  # 19 x the agreed norm: beyond 10 x


# -- aggregate: weights, nan, outliers -----------------------------------------------------------


def test_weights_count_zero_or_one():
    parts = [t(1.0, 2.0), t(3.0, 4.0), t(5.0, 12.0)]
    # a claimed weight of 1e6 counts once: (1 + 3 + 5) / 3 = 3, (2 + 4 + 12) / 3 = 6
    got = aggregate(parts, [1.0, 1e6, 1.0], MEAN)
    assert got.value.tolist() == [3.0, 6.0] and got.used == (0, 1, 2) and got.excluded == {}
    # weight 0 (a joiner): not used, not blamed
    got = aggregate(parts, [1.0, 0.0, 1.0], MEAN)
    assert got.value.tolist() == [3.0, 7.0] and got.used == (0, 2) and got.excluded == {}
    # a negative or non-finite weight: excluded for cause
    got = aggregate(parts, [1.0, -1.0, math.nan], MEAN)
    assert got.value.tolist() == [1.0, 2.0] and set(got.excluded) == {1, 2}
    assert "invalid weight" in got.excluded[1]


@pytest.mark.parametrize("rule", [MEAN, TRIMMED, CLIPPED], ids=lambda r: r.aggregation)
def test_a_nan_or_inf_part_is_left_out_whatever_the_rule(rule):
    parts = [t(1.0, 1.0), t(math.nan, 0.0), t(3.0, 3.0), t(math.inf, 1.0)]
    got = aggregate(parts, [1.0] * 4, rule)
    assert set(got.excluded) == {1, 3} and "nan or inf" in got.excluded[1]
    assert got.used == (0, 2) and got.value.tolist() == [2.0, 2.0]  # two left: every rule gives the mean
    nothing = aggregate([t(math.nan)], [1.0], rule)
    assert nothing.value is None and nothing.used == () and "no usable part" in nothing.reason


def test_mean_keeps_an_outlier_and_robust_rules_leave_it_out():
    gen = torch.Generator().manual_seed(1)
    honest = [torch.randn(4096, generator=gen) for _ in range(3)]
    parts = honest + [honest[0] * 1e6]
    assert aggregate(parts, [1.0] * 4, MEAN).used == (0, 1, 2, 3)  # the mean is the mean, as before
    for rule in (TRIMMED, CLIPPED):
        got = aggregate(parts, [1.0] * 4, rule)
        assert got.used == (0, 1, 2) and set(got.excluded) == {3} and got.excluded[3].startswith("outlier")


@pytest.mark.parametrize("rule", [TRIMMED, CLIPPED], ids=lambda r: r.aggregation)
def test_a_1e6_scaled_sender_moves_a_robust_rule_by_under_10_percent(rule):
    """Four DiLoCo-like pseudo-gradients (a shared direction plus each peer's noise), one of
    them scaled 1e6x: with the outlier filter off, the rule itself keeps the result within 10%
    of the honest mean; the plain mean is off by orders of magnitude."""
    gen = torch.Generator().manual_seed(2)
    shared = torch.randn(20_000, generator=gen)
    honest = [shared + 0.1 * torch.randn(20_000, generator=gen) for _ in range(3)]
    target = torch.stack(honest).mean(dim=0)
    parts = honest + [honest[1] * 1e6]
    no_filter = dataclasses.replace(rule, outlier_factor=0.0)
    got = aggregate(parts, [1.0] * 4, no_filter)
    assert got.used == (0, 1, 2, 3)
    deviation = float((got.value - target).norm() / target.norm())
    assert deviation < 0.10, deviation
    plain = aggregate(parts, [1.0] * 4, MEAN).value
    assert float((plain - target).norm() / target.norm()) > 1e4


def test_clip_by_norm():
    tensors = [t(3.0), t(4.0)]  # joint norm 5
    clipped, factor = clip_by_norm(tensors, 1.0)
    assert factor == pytest.approx(0.2) and [x.item() for x in clipped] == pytest.approx([0.6, 0.8])
    same, factor = clip_by_norm(tensors, 10.0)
    assert factor == 1.0 and same[0] is tensors[0]
    assert clip_by_norm(tensors, 0.0)[1] == 1.0  # 0: off


def test_bans_expire():
    bans = SenderBans(ban_s=60.0)
    bans.ban("QmA", now=100.0, reason="part holds nan or inf")
    assert bans.banned("QmA", 100.0) == "part holds nan or inf"
    assert bans.banned("QmA", 159.9) is not None and bans.banned("QmB", 120.0) is None
    assert bans.banned("QmA", 160.0) is None and bans.banned("QmA", 100.0) is None  # forgotten
    with pytest.raises(ValueError, match="ban_s"):
        SenderBans(0)


# -- agreement on the round ----------------------------------------------------------------------


def claims(**held):
    return {peer: (v if not isinstance(v, tuple) else {"hash": v[0], "round": v[1]}) for peer, v in held.items()}


def test_a_peer_claiming_round_1e9_is_not_followed():
    # with an honest majority: the majority
    got = agree_on_state(claims(a=("h5", 5), b=("h5", 5), liar=("evil", 10**9)))
    assert (got.hash, got.round, got.donors) == ("h5", 5, ("a", "b")) and got.reason.startswith("majority")
    # two peers, one lying: no majority; 10**9 is far above the median round 5, so it is ignored
    got = agree_on_state(claims(a=("h5", 5), liar=("evil", 10**9)))
    assert (got.hash, got.round, got.donors) == ("h5", 5, ("a",)) and "too far ahead ignored" in got.reason
    # garbage claims do not vote (and do not crash)
    got = agree_on_state({"a": {"hash": "h", "round": 2}, "b": "x", "c": {"hash": 7, "round": 3},
                          "d": {"hash": "h2", "round": 2**80}, "e": {"hash": "h3", "round": True}, "f": None})
    assert (got.hash, got.round, got.donors) == ("h", 2, ("a",)) and "5 invalid" in got.reason
    assert agree_on_state({"a": None}).round == -1


def test_without_a_majority_the_legitimate_leader_one_round_ahead_still_wins():
    # a peer that missed a round (4) and one that did not (5): the one ahead is followed
    got = agree_on_state(claims(a=("h4", 4), b=("h5", 5)))
    assert (got.hash, got.round, got.donors) == ("h5", 5, ("b",))
    # same round, different hashes: the larger hash, whatever the order
    for held in (claims(a=("aa", 3), b=("bb", 3)), claims(b=("bb", 3), a=("aa", 3))):
        assert agree_on_state(held).hash == "bb"
    # most claims beat a higher round
    assert agree_on_state(claims(a=("h1", 3), b=("h1", 3), c=("h2", 4))).hash == "h1"


# -- a donor's state -----------------------------------------------------------------------------


def test_check_state_names_what_is_wrong():
    shapes = [(2, 3), (4,)]
    meta = {"round": 5, "num_params": 2, "has_momentum": True, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}
    good = [torch.zeros(2, 3), torch.zeros(4), torch.ones(2, 3), torch.ones(4)]
    hyper = {"outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}
    check_state(meta, good, shapes, min_round=5, max_round=6, hyperparameters=hyper)  # fine
    bad_nan = [*good[:3], torch.tensor([0.0, math.nan, 0.0, 0.0])]
    cases = [
        ("not a dict", good, {}, "metadata must be a dict"),
        ({**meta, "round": 10**9}, good, {}, r"round 1000000000 is outside the expected \[5, 6\]"),
        ({**meta, "round": 4}, good, {}, "outside the expected"),
        ({**meta, "round": "5"}, good, {}, "round must be an integer"),
        ({**meta, "num_params": 3}, good, {}, "num_params is 3, this replica has 2"),
        (meta, good[:2], {}, "has 2 tensors, expected 4"),
        (meta, [torch.zeros(3, 2), *good[1:]], {}, r"global_params\[0\] has shape \[3, 2\], expected \[2, 3\]"),
        (meta, bad_nan, {}, r"momentum\[1\] holds nan or inf"),
        (meta, [torch.zeros(2, 3, dtype=torch.int64), *good[1:]], {}, "must be a floating-point tensor"),
        ({**meta, "outer_lr": 70.0}, good, hyper, "outer_lr is 70.0, this replica uses 0.7"),
    ]
    for metadata, tensors, hyperparameters, message in cases:
        with pytest.raises(ValueError, match=message):
            check_state(metadata, tensors, shapes, min_round=5, max_round=6, hyperparameters=hyperparameters)


def test_config_validates_the_robust_keys():
    for key, value, message in [
        ("aggregation", "median", "must be one of mean, trimmed_mean, centered_clip"),
        ("trim_fraction", 0.5, r"must be in \(0, 0.5\)"),
        ("clip_radius", -1.0, "finite number >= 0"),
        ("clip_iterations", 0, r"\[1, 100\]"),
        ("outlier_factor", 0.5, "0 \\(off\\) or a finite number > 1"),
        ("clip_norm", math.inf, "finite number >= 0"),
        ("sender_ban_s", 0, "seconds > 0"),
    ]:
        with pytest.raises(ValueError, match=f"local_sgd.{key}: .*{message}"):
            LocalSGDSection(**{key: value})


# -- a joiner's stage state (GetState) ---------------------------------------------------------------


def test_a_joiner_refuses_a_nan_donor_state_and_keeps_its_own_optimizer_hyperparameters():
    import io

    from swarmrt.config import RunConfig, with_overrides
    from swarmrt.pipeline.worker import InputSpec, StageError, StageWorker

    def worker(lr):
        torch.manual_seed(0)
        config = with_overrides(RunConfig(), optimizer={"name": "adamw", "lr": lr, "samples_per_step": 2})
        return StageWorker(torch.nn.Sequential(torch.nn.Linear(3, 2)), config, 0, InputSpec(torch.float32, 1, (3,)))

    donor, joiner = worker(lr=5.0), worker(lr=1e-3)
    joiner.load_state_bytes(donor.state_bytes())
    assert joiner.optimizer.param_groups[0]["lr"] == 1e-3  # the donor's 5.0 is not adopted
    state = torch.load(io.BytesIO(donor.state_bytes()), weights_only=True)
    state["module"]["0.weight"][0, 1] = math.nan
    buffer = io.BytesIO()
    torch.save(state, buffer)
    before = [p.detach().clone() for p in joiner.params]
    with pytest.raises(StageError, match=r"nan or inf in state\.module\.0\.weight"):
        joiner.load_state_bytes(buffer.getvalue())
    assert all(torch.equal(a, b) for a, b in zip(before, joiner.params))  # nothing loaded
