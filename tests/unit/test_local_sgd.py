"""DiLoCo outer-step arithmetic: golden trajectories, rollback, state and hashes; its config section."""

import dataclasses
import re

import pytest
import torch

from swarmrt.config import ConfigError, config_from_dict
from swarmrt.local_sgd.config import ALLREDUCE_CODECS, LocalSGDSection, check_allreduce_codec
from swarmrt.local_sgd.diloco import DiLoCo
from swarmrt.wire.codecs import CODEC_NAMES

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_paper_defaults():
    config = LocalSGDSection()
    assert (config.outer_lr, config.outer_momentum, config.nesterov) == (0.7, 0.9, True)
    assert config.inner_steps == 0 and not config.enabled  # local SGD is off unless asked for
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.outer_lr = 1.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"inner_steps": -1}, "inner_steps"),
        ({"inner_steps": 2.0}, "inner_steps"),
        ({"inner_steps": True}, "inner_steps"),
        ({"outer_lr": 0.0}, "outer_lr"),
        ({"outer_lr": float("inf")}, "outer_lr"),
        ({"outer_lr": "0.7"}, "outer_lr"),
        ({"outer_momentum": 1.0}, "outer_momentum"),
        ({"outer_momentum": -0.1}, "outer_momentum"),
        ({"nesterov": 1}, "nesterov"),
        ({"min_group_size": 0}, "min_group_size"),
        ({"next_chunk_timeout_s": float("inf")}, "next_chunk_timeout_s"),
        ({"matchmaking_time_s": 0}, "matchmaking_time_s"),
        ({"matchmaking_time_s": 5.0, "matchmaking_timeout_s": 5.0}, "matchmaking_timeout_s"),
        ({"next_chunk_timeout_s": 5.0, "allreduce_timeout_s": 8.0}, "allreduce_timeout_s"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"local_sgd\.{field}"):
        LocalSGDSection(**kwargs)
    with pytest.raises(ConfigError, match=rf"local_sgd\.{field}"):  # and so does the run config
        config_from_dict({"local_sgd": kwargs})


def test_diloco_refuses_a_section_with_local_sgd_off():
    with pytest.raises(ValueError, match=r"local_sgd\.inner_steps is 0: local SGD is off"):
        DiLoCo([torch.nn.Parameter(torch.ones(2))], LocalSGDSection(inner_steps=0))


def test_the_keys_in_use_keep_their_names():
    raw = {"local_sgd": {"inner_steps": 4, "outer_lr": 0.5, "outer_momentum": 0.8, "nesterov": False,
                         "min_group_size": 3, "matchmaking_time_s": 2.0, "matchmaking_timeout_s": 8.0,
                         "next_chunk_timeout_s": 1.0, "allreduce_timeout_s": 10.0},
           "compression": {"pseudo_gradients": "int8", "state": "fp16"}}
    config = config_from_dict(raw)
    assert config.local_sgd == LocalSGDSection(**raw["local_sgd"])
    assert (config.compression.pseudo_gradients, config.compression.state) == ("int8", "fp16")
    with pytest.raises(ConfigError, match=r"local_sgd\.matchmaking_time: unknown key; known: .*matchmaking_time_s"):
        config_from_dict({"local_sgd": {"matchmaking_time": 2.0}})  # the averager's old name is not a key


def test_request_timeout_is_derived_below_the_matchmaking_time():
    # what the outer loop used to compute by hand: half the matchmaking time, at most 3 s
    for matchmaking_time_s, expected in ((0.2, 0.1), (1.0, 0.5), (3.0, 1.5), (6.0, 3.0), (60.0, 3.0)):
        section = LocalSGDSection(matchmaking_time_s=matchmaking_time_s, matchmaking_timeout_s=100.0)
        assert section.request_timeout_s == expected
        assert section.request_timeout_s < section.matchmaking_time_s  # hivemind deadlocks otherwise


def test_nesterov_has_no_effect_without_momentum():
    # a config that says outer_momentum = 0 and leaves nesterov at its default runs plain outer SGD
    # (torch refuses Nesterov without momentum); replicas exchange state with that setting
    section = LocalSGDSection(inner_steps=1, outer_lr=0.5, outer_momentum=0.0)
    assert section.nesterov and not section.uses_nesterov
    assert LocalSGDSection(inner_steps=1).uses_nesterov
    a = DiLoCo([torch.nn.Parameter(torch.ones(2))], section)
    assert a.outer_optimizer.param_groups[0]["nesterov"] is False
    a.apply([torch.full((2,), 0.5)])
    assert a.global_params[0].tolist() == [0.75, 0.75]  # 1 - 0.5 x 0.5, no momentum
    b = DiLoCo([torch.nn.Parameter(torch.zeros(2))],
               LocalSGDSection(inner_steps=1, outer_lr=0.5, outer_momentum=0.0, nesterov=False))
    b.import_state(*a.export_state())
    assert b.params_hash() == a.params_hash()


def test_one_codec_list_checked_against_the_swarmrt_codecs():
    assert set(ALLREDUCE_CODECS) <= set(CODEC_NAMES)
    for codec in ALLREDUCE_CODECS:
        check_allreduce_codec(codec, "compression.pseudo_gradients")
        config = config_from_dict({"compression": {"pseudo_gradients": codec, "state": codec}})
        assert config.compression.pseudo_gradients == codec
    for key in ("pseudo_gradients", "state"):
        with pytest.raises(ConfigError, match=rf"compression\.{key}: codec 'bf16' cannot be used in hivemind's all-reduce"):
            config_from_dict({"compression": {key: "bf16"}})
        with pytest.raises(ConfigError, match=rf"compression\.{key}: unknown codec 'zstd'"):
            config_from_dict({"compression": {key: "zstd"}})


def test_constructor_refuses_bad_params():
    config = LocalSGDSection(inner_steps=1)
    with pytest.raises(ValueError, match="at least one"):
        DiLoCo([], config)
    with pytest.raises(ValueError, match=r"params\[1\] must be a floating-point tensor"):
        DiLoCo([torch.zeros(2), torch.zeros(2, dtype=torch.int64)], config)
    p = torch.zeros(2)
    with pytest.raises(ValueError, match="repeat"):
        DiLoCo([p, p], config)
    with pytest.raises(TypeError, match="must be a LocalSGDSection"):
        DiLoCo([p], {"inner_steps": 1})


# ------------------------------------------------------------------------------------ golden


PLAIN_SGD = LocalSGDSection(inner_steps=6, outer_lr=2.0, outer_momentum=0.0, nesterov=False)


def run_fixed_gradient(config, rounds, fail=()):
    """Weights start at 1; every inner step sees gradient 2 with inner SGD lr 1, so each
    inner step moves a weight by -2. Returns the global params after each round."""
    weights = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.SGD([weights], lr=1.0)
    diloco = DiLoCo([weights], config)
    trajectory = []
    for round_index in range(1, rounds + 1):
        while True:
            weights.grad = torch.full((3,), 2.0)
            inner.step()
            if diloco.record_inner_step():
                break
        delta = diloco.pseudo_gradient()
        if round_index in fail:
            diloco.rollback()
        else:
            diloco.apply(delta)  # one peer: the average is its own pseudo-gradient
        trajectory.append((diloco.global_params[0][0].item(), weights[0].item()))
    return trajectory, diloco


def test_fixed_gradient_mock_by_hand():
    # H = 6 inner steps of -2 each: local = global - 12, so the pseudo-gradient is 12.
    # outer SGD, lr 2, no momentum: global -= 2 * 12 = 24 each round; local := global.
    # round 1: 1 - 24 = -23; round 2: -47; round 3: -71; round 4: -95; round 5: -119
    trajectory, diloco = run_fixed_gradient(PLAIN_SGD, rounds=5)
    assert trajectory == [(-23.0, -23.0), (-47.0, -47.0), (-71.0, -71.0), (-95.0, -95.0), (-119.0, -119.0)]
    assert diloco.round == 5 and diloco.failed_rounds == 0


def test_fixed_gradient_mock_with_a_failed_round():
    # rounds 1-2 as above: global -23, then -47.
    # round 3 fails: global stays -47; local keeps its 6 steps: -47 - 12 = -59.
    # round 4: local -59 - 12 = -71, pseudo-gradient -47 - (-71) = 24, global = -47 - 2 * 24 = -95.
    # round 5: local -95 - 12 = -107, pseudo-gradient 12, global -119: without momentum
    # the failed round only delays its update by one round, nothing is lost.
    trajectory, diloco = run_fixed_gradient(PLAIN_SGD, rounds=5, fail={3})
    assert trajectory == [(-23.0, -23.0), (-47.0, -47.0), (-47.0, -59.0), (-95.0, -95.0), (-119.0, -119.0)]
    assert diloco.round == 4 and diloco.failed_rounds == 1


NESTEROV = LocalSGDSection(inner_steps=6, outer_lr=0.5, outer_momentum=0.5, nesterov=True)


def test_fixed_gradient_mock_with_nesterov_by_hand():
    # torch SGD with Nesterov: buf = m * buf + g (buf = g at the first step), step = g + m * buf
    # pseudo-gradient g = 12 each round, lr 0.5, m 0.5:
    # round 1: buf 12,           step 12 + 6    = 18,   global 1 - 9        = -8
    # round 2: buf 6 + 12 = 18,  step 12 + 9    = 21,   global -8 - 10.5    = -18.5
    # round 3: buf 9 + 12 = 21,  step 12 + 10.5 = 22.5, global -18.5 - 11.25 = -29.75
    trajectory, diloco = run_fixed_gradient(NESTEROV, rounds=3)
    assert [g for g, _ in trajectory] == [-8.0, -18.5, -29.75]
    buffer = diloco.outer_optimizer.state[diloco.global_params[0]]["momentum_buffer"]
    assert buffer.tolist() == [21.0, 21.0, 21.0]


def test_fixed_gradient_mock_with_nesterov_and_a_failed_round():
    # rounds 1-2 as above: global -18.5, buf 18.
    # round 3 fails: global -18.5 and buf 18 unchanged; local -18.5 - 12 = -30.5.
    # round 4: local -42.5, g = 24: buf 9 + 24 = 33, step 24 + 16.5 = 40.5, global -18.5 - 20.25 = -38.75
    trajectory, diloco = run_fixed_gradient(NESTEROV, rounds=4, fail={3})
    assert trajectory == [(-8.0, -8.0), (-18.5, -18.5), (-18.5, -30.5), (-38.75, -38.75)]
    buffer = diloco.outer_optimizer.state[diloco.global_params[0]]["momentum_buffer"]
    assert buffer.tolist() == [33.0, 33.0, 33.0]


def make_model_and_data(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)) for _ in range(24)]
    return model, batches


def train(model, batches, diloco=None):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        inner.zero_grad()
        loss.backward()
        inner.step()
        losses.append(loss.item())
        if diloco is not None and diloco.record_inner_step():
            diloco.apply(diloco.pseudo_gradient())
    return losses


def test_one_peer_with_outer_sgd_lr1_no_momentum_equals_plain_training():
    plain_model, batches = make_model_and_data(seed=0)
    plain_losses = train(plain_model, batches)

    model, same_batches = make_model_and_data(seed=0)
    config = LocalSGDSection(inner_steps=4, outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    diloco = DiLoCo(model.parameters(), config)
    losses = train(model, same_batches, diloco)

    assert diloco.round == 6  # 24 steps / H = 4: the outer step really ran six times
    # global - (global - local) can differ from local by one float32 rounding per round:
    # measured max deviation after 24 steps 7.5e-9 (params of magnitude ~0.5)
    assert losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7)
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)
    for g, q in zip(diloco.global_params, plain_model.parameters()):
        assert torch.allclose(g, q, rtol=0, atol=1e-7)


def test_outer_momentum_changes_the_trajectory():
    # the same run with the default outer optimizer must NOT match plain training,
    # otherwise the previous test would not show that the outer step is applied
    plain_model, batches = make_model_and_data(seed=0)
    train(plain_model, batches)
    model, same_batches = make_model_and_data(seed=0)
    diloco = DiLoCo(model.parameters(), LocalSGDSection(inner_steps=4))
    train(model, same_batches, diloco)
    with torch.no_grad():
        gap = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), plain_model.parameters()))
    assert gap > 1e-3


# ------------------------------------------------------------------------------------ round mechanics


def test_schedule_and_weight():
    w = torch.nn.Parameter(torch.zeros(2))
    diloco = DiLoCo([w], LocalSGDSection(inner_steps=3))
    assert diloco.weight == 0.0  # nothing trained yet: contributes nothing
    assert [diloco.record_inner_step() for _ in range(3)] == [False, False, True]
    assert diloco.weight == 1.0 and diloco.round_due
    diloco.rollback()
    assert not diloco.round_due and diloco.weight == 1.0  # local progress kept
    assert [diloco.record_inner_step() for _ in range(3)] == [False, False, True]
    diloco.apply([torch.zeros(2)])
    assert diloco.weight == 0.0 and not diloco.round_due


def test_pseudo_gradient_is_global_minus_local_and_apply_validates():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    diloco = DiLoCo([w], LocalSGDSection(inner_steps=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False))
    with torch.no_grad():
        w.sub_(torch.tensor([0.5, -1.0]))
    assert diloco.pseudo_gradient()[0].tolist() == [0.5, -1.0]
    before = diloco.params_hash()
    with pytest.raises(ValueError, match="has 2 tensors, expected 1"):
        diloco.apply([torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match=r"should have shape \[2\], got float32 tensor of shape \[3\]"):
        diloco.apply([torch.zeros(3)])
    with pytest.raises(ValueError, match="nan or inf"):
        diloco.apply([torch.tensor([0.0, float("nan")])])
    assert diloco.params_hash() == before and diloco.round == 0  # refused rounds change nothing
    diloco.apply([torch.tensor([0.25, 0.25], dtype=torch.float64)])  # other dtypes are converted
    assert w.tolist() == [0.75, 1.75] and diloco.global_params[0].dtype == torch.float32


def two_peer_round(peers):
    deltas = [peer.pseudo_gradient() for peer in peers]
    averaged = [torch.stack(parts).mean(0) for parts in zip(*deltas)]
    for peer in peers:
        peer.apply([a.clone() for a in averaged])


def test_peers_applying_the_same_average_share_the_hash():
    peers, inners = [], []
    for seed in (1, 2):
        model, _ = make_model_and_data(seed=0)  # same initial params on both peers
        peers.append(DiLoCo(model.parameters(), LocalSGDSection(inner_steps=2)))
        inners.append((model, torch.optim.AdamW(model.parameters(), lr=1e-2), torch.Generator().manual_seed(seed)))
    assert peers[0].params_hash() == peers[1].params_hash()
    for _ in range(3):
        for model, inner, gen in inners:  # each peer trains on its own data
            for _ in range(2):
                loss = model(torch.randn(4, 8, generator=gen)).pow(2).mean()
                inner.zero_grad()
                loss.backward()
                inner.step()
        local_hashes = [p.params_hash() for p in peers]
        two_peer_round(peers)
        assert peers[0].params_hash() == peers[1].params_hash() == peers[0].params_hash()
        assert peers[0].params_hash() not in local_hashes  # the round moved the params
        for a, b in zip(inners[0][0].parameters(), inners[1][0].parameters()):
            assert torch.equal(a, b)  # and both local models restart from the same params


def test_hash_covers_params_and_momentum():
    w = torch.nn.Parameter(torch.ones(4))
    diloco = DiLoCo([w], LocalSGDSection(inner_steps=1))
    first = diloco.params_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", first), first
    twin = DiLoCo([torch.nn.Parameter(torch.ones(4))], LocalSGDSection(inner_steps=1))
    assert twin.params_hash() == first  # a function of the values, not of the tensor objects
    other = DiLoCo([torch.nn.Parameter(torch.full((4,), 2.0))], LocalSGDSection(inner_steps=1))
    assert other.params_hash() != first
    diloco.apply([torch.ones(4)])
    after_step = diloco.params_hash()
    assert after_step != first
    diloco.outer_optimizer.state[diloco.global_params[0]]["momentum_buffer"][0] += 1e-6
    assert diloco.params_hash() != after_step
    diloco.outer_optimizer.state[diloco.global_params[0]]["momentum_buffer"][0] -= 1e-6
    diloco.global_params[0][3] = torch.nextafter(torch.tensor(diloco.global_params[0][3].item()), torch.tensor(10.0))
    assert diloco.params_hash() != after_step  # one ulp in one param is visible


def test_state_dict_round_trip_makes_a_joiner_identical():
    model, _ = make_model_and_data(seed=0)
    veteran = DiLoCo(model.parameters(), LocalSGDSection(inner_steps=1))
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        veteran.record_inner_step()
        veteran.apply(veteran.pseudo_gradient())
    state = veteran.state_dict()

    joiner_model, _ = make_model_and_data(seed=7)  # different initial params
    joiner = DiLoCo(joiner_model.parameters(), LocalSGDSection(inner_steps=1))
    joiner.record_inner_step()
    assert joiner.params_hash() != veteran.params_hash()
    joiner.load_state_dict(state)
    assert joiner.params_hash() == veteran.params_hash() and joiner.round == 3
    assert joiner.weight == 0.0  # a fresh joiner does not dilute the next average
    for a, b in zip(joiner_model.parameters(), model.parameters()):
        assert torch.equal(a, b)  # local params are the loaded global params

    # the state is a copy: later rounds of the veteran do not leak into it
    veteran.apply([torch.ones_like(g) for g in veteran.global_params])
    assert torch.equal(state["global_params"][0], joiner.global_params[0])
    # and both now take identical outer steps
    joiner.apply([torch.ones_like(g) for g in joiner.global_params])
    assert joiner.params_hash() == veteran.params_hash()


def test_load_state_dict_refuses_mismatches():
    w = torch.nn.Parameter(torch.ones(4))
    diloco = DiLoCo([w], LocalSGDSection(inner_steps=1))
    state = diloco.state_dict()
    other = DiLoCo([torch.nn.Parameter(torch.ones(5))], LocalSGDSection(inner_steps=1))
    with pytest.raises(ValueError, match=r"global_params\[0\]: expected shape \[5\]"):
        other.load_state_dict(state)
    other_lr = DiLoCo([torch.nn.Parameter(torch.ones(4))], LocalSGDSection(inner_steps=1, outer_lr=0.5))
    with pytest.raises(ValueError, match=r"outer optimizer lr is \[0.7\], this replica uses \[0.5\]"):
        other_lr.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks 'round'"):
        diloco.load_state_dict({"global_params": [], "outer_optimizer": {}})


def test_export_import_state_for_flat_transport():
    model, _ = make_model_and_data(seed=0)
    veteran = DiLoCo(model.parameters(), LocalSGDSection(inner_steps=1))
    joiner_model, _ = make_model_and_data(seed=3)
    joiner = DiLoCo(joiner_model.parameters(), LocalSGDSection(inner_steps=1))

    metadata, tensors = veteran.export_state()  # before any round: no momentum yet
    assert metadata["has_momentum"] is False and len(tensors) == 4
    joiner.import_state(metadata, tensors)
    assert joiner.params_hash() == veteran.params_hash()

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    veteran.apply(veteran.pseudo_gradient())
    metadata, tensors = veteran.export_state()
    assert metadata["has_momentum"] is True and metadata["round"] == 1 and len(tensors) == 8
    joiner.import_state(metadata, [t.clone() for t in tensors])
    assert joiner.params_hash() == veteran.params_hash() and joiner.round == 1
    for a, b in zip(joiner_model.parameters(), model.parameters()):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match="has 4 params and 7 tensors, this replica expects 4 params and 8 tensors"):
        joiner.import_state(metadata, tensors[:7])
    with pytest.raises(ValueError, match=r"outer optimizer momentum is \[0.5\]"):
        joiner.import_state({**metadata, "outer_momentum": 0.5}, tensors)
    with pytest.raises(ValueError, match=r"lacks \['nesterov'\]"):
        joiner.import_state({k: v for k, v in metadata.items() if k != "nesterov"}, tensors)
