import pytest

from swarmrt.config import ConfigError, RunConfig, config_from_dict, load_config, with_overrides


def test_defaults_are_valid_and_digest_is_stable():
    assert RunConfig().digest() == RunConfig().digest()
    assert RunConfig().digest() != with_overrides(RunConfig(), optimizer={"lr": 0.5}).digest()


@pytest.mark.parametrize("raw, names", [
    ({"modle": {}}, "[modle]"),
    ({"model": {"stagez": 3}}, "model.stagez"),
    ({"data": {"batch_size": 6, "microbatch_size": 4}}, "data.batch_size"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr"),
    ({"optimizer": {"name": "lamb"}}, "optimizer.name"),
    ({"network": {"heartbeat_s": 5, "record_ttl_s": 2}}, "network.record_ttl_s"),
    ({"model": {"factory": "nocolon"}}, "model.factory"),
    ({"model": {"layer_ranges": [[0, 2], [3, 5]]}}, "model.layer_ranges[1]"),
    ({"routing": {"skip_ratio": 1.5}}, "routing.skip_ratio"),
    ({"run": {"id": "has space"}}, "run.id"),
    ({"local_sgd": {"inner_steps": -1}}, "local_sgd.inner_steps"),
    ({"local_sgd": {"matchmaking_time_s": 20.0}}, "local_sgd.matchmaking_timeout_s"),
    ({"local_sgd": {"inner_steps": 4, "lr": 0.7}}, "local_sgd.lr"),
    ({"compression": {"pseudo_gradients": "topk"}}, "compression.pseudo_gradients"),
    ({"compression": {"state": "bf16"}}, "compression.state"),
    ({"optimizer": {"warmup_steps": -1}}, "optimizer.warmup_steps"),
    ({"optimizer": {"decay_steps": 2.5}}, "optimizer.decay_steps"),
    ({"optimizer": {"min_lr_ratio": 1.5}}, "optimizer.min_lr_ratio"),
])
def test_bad_values_name_the_field(raw, names):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert names in str(e.value)


def test_layer_ranges_set_the_stage_count():
    config = config_from_dict({"model": {"layer_ranges": [[0, 2], [2, 5], [5, 6]]}})
    assert config.num_stages == 3
    assert config.model.layer_ranges == ((0, 2), (2, 5), (5, 6))


def test_toml_and_yaml_load_the_same(tmp_path):
    (tmp_path / "a.toml").write_text('[model]\nstages = 4\n[optimizer]\nlr = 0.01\n')
    (tmp_path / "a.yaml").write_text('model:\n  stages: 4\noptimizer:\n  lr: 0.01\n')
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "a.yaml")


def test_missing_and_unparsable_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "bad.toml")


def test_local_sgd_section_is_composed_from_its_package():
    from swarmrt.local_sgd.config import LocalSGDSection

    config = config_from_dict({"local_sgd": {"inner_steps": 5}})
    assert type(config.local_sgd) is LocalSGDSection and config.local_sgd.inner_steps == 5
    # the section's keys are exactly the user-facing ones (derived values and fixed limits are
    # not keys, so the training-config hash that peers and checkpoints compare is unchanged)
    assert sorted(config.to_dict()["local_sgd"]) == [
        "aggregation", "allreduce_timeout_s", "alpha", "clip_iterations", "clip_norm", "clip_radius", "fragments",
        "inner_steps", "matchmaking_time_s", "matchmaking_timeout_s", "min_group_size", "nesterov", "next_chunk_timeout_s",
        "outer_lr", "outer_momentum", "outlier_factor", "sender_ban_s", "sync_delay", "trim_fraction"]
    assert with_overrides(config, local_sgd={"outer_lr": 0.5}).local_sgd == LocalSGDSection(inner_steps=5, outer_lr=0.5)


def test_the_learning_rate_warms_up_linearly_then_decays_on_a_cosine_to_its_floor():
    opt = config_from_dict({"optimizer": {"lr": 1.0, "warmup_steps": 4, "decay_steps": 10, "min_lr_ratio": 0.1}}).optimizer
    assert [opt.lr_at(n) for n in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert opt.lr_at(9) == pytest.approx(0.55)  # half way down: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2
    assert opt.lr_at(14) == pytest.approx(0.1) and opt.lr_at(1000) == pytest.approx(0.1)
    assert opt.scheduled
    plain = config_from_dict({"optimizer": {"lr": 0.3}}).optimizer
    assert not plain.scheduled and plain.lr_at(0) == plain.lr_at(10**6) == 0.3
