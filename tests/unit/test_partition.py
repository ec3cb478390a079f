import pytest
import torch

from swarmrt.config import ConfigError, config_from_dict
from swarmrt.models.partition import balanced_ranges, validate_ranges
from swarmrt.models import tiny_gpt2, tiny_llama
from swarmrt.models.build import build_stage
from swarmrt.models.layers import as_layers


def test_balanced_ranges_minimise_the_largest_stage():
    assert balanced_ranges([1, 1, 1, 1, 1, 1], 3) == [(0, 2), (2, 4), (4, 6)]
    assert balanced_ranges([10, 1, 1, 1, 1, 10], 3) == [(0, 1), (1, 5), (5, 6)]
    assert balanced_ranges([5], 1) == [(0, 1)]
    with pytest.raises(ValueError, match="at least one layer"):
        balanced_ranges([1, 1], 3)


def test_explicit_ranges_must_cover_every_layer():
    assert validate_ranges([[0, 2], [2, 4]], 4) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="cover"):
        validate_ranges([[0, 2], [2, 3]], 4)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_hf_models_cut_into_layers_compute_the_same_logits(factory):
    torch.manual_seed(0)
    model = factory(layers=3).eval()
    x = torch.randint(0, 256, (2, 12))
    h = x
    for layer in as_layers(model):
        h = layer(h)
    torch.testing.assert_close(h, model(x).logits, rtol=0, atol=1e-6)


def test_causal_masking_is_kept_when_cut():
    torch.manual_seed(0)
    layers = as_layers(tiny_llama(layers=2).eval())
    x = torch.randint(0, 256, (1, 10))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 256  # changing the last token must not change earlier outputs

    def run(t):
        for layer in layers:
            t = layer(t)
        return t

    torch.testing.assert_close(run(x)[:, :-1], run(y)[:, :-1])


def test_embedding_blocks_head_modules_are_accepted():
    model = torch.nn.Module()
    model.embedding = torch.nn.Linear(4, 8)
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
    model.head = torch.nn.Linear(8, 2)
    assert len(as_layers(model)) == 5
    with pytest.raises(TypeError, match="cannot cut"):
        as_layers(torch.nn.Linear(2, 2))


def test_build_stage_reports_bad_factories():
    with pytest.raises(ConfigError, match="cannot import module"):
        build_stage(config_from_dict({"model": {"factory": "no_such_pkg:f"}}), 0)
    with pytest.raises(ConfigError, match="rejected"):
        build_stage(config_from_dict({"model": {"kwargs": {"bogus": 1}}}), 0)
    with pytest.raises(ConfigError, match="stage 7 does not exist"):
        build_stage(config_from_dict({}), 7)
