"""Real models: each stage materializes only its layers, tied weights stay tied, and a swarm trains
the user's own model exactly as the user's unsplit model trains through its own forward.

The factories below stand for a user's code outside swarmrt: tiny Hugging Face configs of the
four families people bring (Llama, Qwen2, Mistral, GPT-2), tied and untied. Nothing is downloaded.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarmrt.config import ConfigError, config_from_dict
from swarmrt.data import Batches
from swarmrt.models.build import build_model, build_stage, shape_layers, stage_ranges
from swarmrt.models.layers import TiedEnds, as_layers
from swarmrt.roles.trainer import Trainer
from swarmrt.testing.inprocess import InProcessSwarm

pytestmark = pytest.mark.timeout(120)

SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")


def llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tie))


def qwen2(tie: bool = True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=tie))


def mistral(tie: bool = False):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**SMALL, tie_word_embeddings=tie, sliding_window=None))


def gpt2(tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
                                      attn_implementation="sdpa"))


class Shared(torch.nn.Module):
    """A model whose middle block reuses the first block's weights: cannot be kept tied across stages."""

    def __init__(self):
        super().__init__()
        first = torch.nn.Linear(8, 8)
        self.embedding = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList([first, torch.nn.Linear(8, 8), first, torch.nn.Linear(8, 8)])
        self.head = torch.nn.Linear(8, 1)


def shared():
    return Shared()


def config(factory: str, tie: bool, stages: int = 3, **extra):
    return config_from_dict({
        "run": {"id": "models", "seed": 5},
        "model": {"factory": f"tests.unit.test_models:{factory}", "kwargs": {"tie": tie}, "stages": stages},
        "data": {"seq_len": 16, "batch_size": 8, "microbatch_size": 4},
        # exact parity with the user's own model: no clipping, no lossy activation codec
        "optimizer": {"name": "sgd", "lr": 0.5, "samples_per_step": 8, "max_grad_norm": float("inf")},
        "compression": {"activations": "none", "gradients": "none"}, **extra})


# -- materialization ------------------------------------------------------------------------------
def test_each_stage_materializes_its_layers_with_the_runs_seeded_init():
    cfg = config("llama", tie=False)
    whole = build_model(cfg)
    reference = torch.nn.Sequential(*as_layers(whole))
    full = reference.state_dict()
    layers, offset = shape_layers(cfg), 0
    for stage, (start, end) in enumerate(stage_ranges(cfg, layers)):
        module = build_stage(cfg, stage)
        again = build_stage(cfg, stage)  # another peer of the stage: identical weights
        assert len(module) == end - start
        for key, value in module.state_dict().items():
            index, rest = key.split(".", 1)
            assert torch.equal(value, full[f"{int(index) + start}.{rest}"]), key
            assert torch.equal(value, again.state_dict()[key])
        offset += len(module)
    assert offset == len(layers)
    other_seed = build_model(config_from_dict({**cfg.to_dict(), "run": {"id": "models", "seed": 6}}))
    assert not torch.equal(other_seed.model.layers[0].mlp.up_proj.weight, whole.model.layers[0].mlp.up_proj.weight)
    # the family's own init, layer by layer: normal(0, initializer_range) weights, unit norms
    assert abs(whole.model.layers[1].mlp.up_proj.weight.std().item() - 0.02) < 0.003
    assert torch.equal(whole.model.norm.weight, torch.ones(32))


class Scale(torch.nn.Module):
    """Owns a parameter and has no reset_parameters(): cannot be initialised from the meta device."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return x * self.weight


def custom():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), Scale(), torch.nn.Linear(8, 1))


def test_a_model_that_cannot_be_initialised_from_meta_is_built_for_real_alike_everywhere():
    cfg = config_from_dict({"run": {"seed": 4}, "model": {"factory": "tests.unit.test_models:custom", "stages": 3},
                            "data": {"kind": "regression", "features": 8}})
    torch.manual_seed(4)
    users = custom()  # the factory's own init, as before materialization existed
    whole = build_model(cfg)
    for stage in range(3):
        for key, value in build_stage(cfg, stage).state_dict().items():
            assert torch.equal(value, users[stage].state_dict()[key.split(".", 1)[1]])
            assert torch.equal(value, whole[stage].state_dict()[key.split(".", 1)[1]])


def test_gpt2_keeps_its_scaled_residual_init():
    model = build_model(config("gpt2", tie=False))
    std = 0.02 / (2 * 3) ** 0.5
    assert abs(model.transformer.h[2].attn.c_proj.weight.std().item() - std) < 0.2 * std
    assert abs(model.transformer.h[2].attn.c_attn.weight.std().item() - 0.02) < 0.2 * 0.02


def test_a_stage_reads_only_its_tensors_from_a_pretrained_directory(tmp_path, monkeypatch):
    from safetensors import safe_open

    source = llama(tie=False)
    source.save_pretrained(tmp_path / "hf")
    cfg = config_from_dict({"model": {"pretrained": str(tmp_path / "hf"), "stages": 3},
                            "data": {"seq_len": 16, "batch_size": 8, "microbatch_size": 4}})
    read: list[str] = []
    real_open = safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.inner = real_open(*a, **k)

        def __enter__(self):
            handle = self.inner.__enter__()

            class Handle:
                def keys(self):
                    return handle.keys()

                def get_tensor(self, name):
                    read.append(name)
                    return handle.get_tensor(name)

            return Handle()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr("safetensors.safe_open", Counting)
    stage = build_stage(cfg, 1)
    expected = {f"model.layers.{i}." for i in range(3)}
    assert read and all(any(name.startswith(p) for p in expected) for name in read), read
    state = source.state_dict()
    start = stage_ranges(cfg, shape_layers(cfg))[1][0]
    for key, value in stage.state_dict().items():
        index, rest = key.split(".", 1)
        layer = int(index) + start - 1  # layer 0 is the embedding
        assert torch.equal(value, state[f"model.layers.{layer}.{rest.removeprefix('layer.')}"]), key
    assert len(set(read)) == len(read) == len(list(stage.parameters()))
    whole = build_model(cfg)  # every stage together: the directory's model, weight for weight
    assert all(torch.equal(value, state[key]) for key, value in whole.state_dict().items())


def test_a_tied_pretrained_model_reads_its_one_matrix_for_embedding_and_head(tmp_path):
    source = qwen2(tie=True)
    source.save_pretrained(tmp_path / "hf")
    cfg = config_from_dict({"model": {"pretrained": str(tmp_path / "hf"), "stages": 3},
                            "data": {"seq_len": 16, "batch_size": 8, "microbatch_size": 4}})
    first = build_stage(cfg, 0)
    assert isinstance(first, TiedEnds) and first.head.head.weight is first.body[0].embed.weight
    assert torch.equal(first.head.head.weight, source.get_input_embeddings().weight)


def test_a_pretrained_directory_without_the_tensor_is_a_clear_error(tmp_path):
    llama(tie=False).save_pretrained(tmp_path / "hf")
    cfg = config_from_dict({"model": {"pretrained": str(tmp_path / "hf"), "stages": 3}})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        build_stage(config_from_dict({"model": {"pretrained": str(tmp_path / "empty"), "stages": 3}}), 0)
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        build_stage(config_from_dict({"model": {"pretrained": str(tmp_path / "nowhere"), "stages": 3}}), 0)
    assert len(build_stage(cfg, 2)) >= 1


# -- tied weights ---------------------------------------------------------------------------------
def test_a_tied_head_runs_on_stage_0_with_the_one_embedding_weight():
    cfg = config("qwen2", tie=True)
    first, last = build_stage(cfg, 0), build_stage(cfg, 2)
    assert isinstance(first, TiedEnds)
    assert first.head.head.weight is first.body[0].embed.weight
    assert all(p.dim() < 2 or p.shape[0] != 256 for p in last.parameters())  # no copy of the vocabulary matrix


def test_weights_that_cannot_be_kept_tied_are_a_clear_error():
    cfg = config_from_dict({"model": {"factory": "tests.unit.test_models:shared", "stages": 3},
                            "data": {"kind": "regression", "features": 8}})
    with pytest.raises(ConfigError, match=r"blocks.0.weight = blocks.2.weight is shared by layers \[1, 3\]"):
        build_stage(cfg, 0)
    with pytest.raises(ConfigError, match="last stage .* empty"):
        build_stage(config_from_dict({**config("gpt2", tie=True).to_dict(),
                                      "model": {"factory": "tests.unit.test_models:gpt2", "kwargs": {"tie": True},
                                                "layer_ranges": [[0, 2], [2, 4], [4, 5]]}}), 0)


# -- parity with the user's own unsplit model -----------------------------------------------------
def own_forward_losses(cfg, steps):
    """The user's model, with the run's initial weights, trained through its own forward."""
    model = build_model(cfg)
    kind = torch.optim.SGD if cfg.optimizer.name == "sgd" else torch.optim.AdamW
    opt = kind(model.parameters(), lr=cfg.optimizer.lr)
    batches, losses = Batches(cfg.data, cfg.run.seed, 0), []
    for step in range(steps):
        x, y = batches.batch(step)
        opt.zero_grad()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def train_in_process(cfg, steps, after=None):
    """Train ``steps`` steps through one in-process peer per stage; the losses, and ``after(swarm, trainer)``."""
    swarm = InProcessSwarm.build(cfg, peers_per_stage=1)
    try:
        trainer = Trainer(cfg, dht=None, client=swarm.client, trainer_id="t")
        trainer.view_peers(swarm.records)

        async def go():
            losses = [await trainer.train_step(step) for step in range(steps)]
            return losses, (await after(swarm, trainer) if after else None)

        return asyncio.run(go())
    finally:
        swarm.close()


@pytest.mark.parametrize("factory,tie", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False),
                                         ("mistral", False), ("mistral", True), ("gpt2", True), ("gpt2", False)])
def test_the_swarm_trains_the_users_own_model(factory, tie):
    cfg, steps = config(factory, tie), 3

    async def inspect(swarm, trainer):
        assert trainer.tied == tie
        return swarm.workers["s0p0"].module

    swarm_losses, served = train_in_process(cfg, steps, inspect)
    reference, model = own_forward_losses(cfg, steps)
    assert reference[-1] < reference[0] - 0.05  # it trains: the comparison is not between two constants
    assert swarm_losses == pytest.approx(reference, abs=1e-4)
    if tie:  # the one embedding/head weight moved exactly as the user's tied weight did
        assert served.head.head.weight is served.body[0].embed.weight
        assert torch.allclose(served.body[0].embed.weight, model.get_input_embeddings().weight, atol=1e-5)


# -- export ---------------------------------------------------------------------------------------
def test_export_merges_the_stage_checkpoints_into_the_users_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from swarmrt.checkpoint.policy import training_config_hash
    from swarmrt.checkpoint.store import save_checkpoint
    from swarmrt.cli.main import main
    from swarmrt.models.build import partition_hash

    cfg = config("qwen2", True)

    async def checkpoint_and_evaluate(swarm, trainer):
        for peer, worker in swarm.workers.items():
            save_checkpoint(tmp_path / "ckpt", cfg.run.id, worker.stage, worker.version, worker.state_bytes(),
                            config_hash=training_config_hash(cfg), partition_hash=partition_hash(cfg), writer=peer)
        return await trainer.evaluate(batches=1)

    _, held_out = train_in_process(cfg, 2, checkpoint_and_evaluate)
    (tmp_path / "run.toml").write_text(
        '[run]\nid = "models"\nseed = 5\n[model]\nfactory = "tests.unit.test_models:qwen2"\nstages = 3\n'
        '[model.kwargs]\ntie = true\n[data]\nseq_len = 16\nbatch_size = 8\nmicrobatch_size = 4\n'
        '[optimizer]\nname = "sgd"\nlr = 0.5\nsamples_per_step = 8\nmax_grad_norm = inf\n'
        '[compression]\nactivations = "none"\ngradients = "none"\n')
    assert main(["export", "--config", str(tmp_path / "run.toml"), "--checkpoints", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "hf")]) == 0
    assert '"step": 2' in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    x, y = Batches(cfg.data, cfg.run.seed, 0).eval_batch(cfg.data.batch_size, index=0)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert loss == pytest.approx(held_out["loss"], abs=1e-5)
    fresh = own_forward_losses(cfg, 0)[1]  # the untrained model: export really wrote the trained weights
    with torch.no_grad():
        untrained = fresh(input_ids=x).logits
    assert not torch.allclose(untrained, logits, atol=1e-3)


def test_export_without_every_stage_checkpointed_says_which_is_missing(tmp_path, capsys):
    from swarmrt.cli.main import main

    (tmp_path / "run.toml").write_text('[model]\nfactory = "tests.unit.test_models:gpt2"\nstages = 2\n')
    assert main(["export", "--config", str(tmp_path / "run.toml"), "--checkpoints", str(tmp_path),
                 "--out", str(tmp_path / "hf")]) == 2
    assert "no checkpoint of stage 0" in capsys.readouterr().err


# -- device and precision -------------------------------------------------------------------------
@pytest.mark.parametrize("precision,dtype,tol", [("bf16", torch.bfloat16, 0.03), ("fp16", torch.float16, 0.01)])
def test_mixed_precision_keeps_fp32_master_weights_and_sends_the_compute_dtype(precision, dtype, tol):
    cfg = config_from_dict({**config("llama", tie=True).to_dict(),
                            "model": {"factory": "tests.unit.test_models:llama", "kwargs": {"tie": True},
                                      "stages": 3, "precision": precision},
                            "optimizer": {"name": "adamw", "lr": 1e-2, "samples_per_step": 8,
                                          "max_grad_norm": float("inf")}})

    async def inspect(swarm, trainer):
        x = Batches(cfg.data, cfg.run.seed, 0).batch(0)[0][:2]
        hidden = swarm.workers["s0p0"].forward("probe", x, keep_context=False)
        logits = swarm.workers["s2p0"].forward("probe", hidden, keep_context=False)
        return hidden, logits, swarm.workers

    losses, (hidden, logits, workers) = train_in_process(cfg, 3, inspect)
    assert hidden.dtype == dtype and logits.dtype == dtype  # what crosses the wire
    for worker in workers.values():
        assert all(p.dtype == torch.float32 for p in worker.params)  # master weights
        state = worker.optimizer.state_dict()["state"]
        assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    reference = own_forward_losses(cfg, 3)[0]  # the user's model in fp32
    assert losses == pytest.approx(reference, abs=tol)
    assert losses != reference  # it really computed in the lower precision


def test_a_wire_input_in_another_dtype_is_refused():
    from swarmrt.pipeline.worker import StageError, StageWorker
    from swarmrt.models.build import stage_input_spec

    cfg = config_from_dict({**config("gpt2", tie=False).to_dict(),
                            "model": {"factory": "tests.unit.test_models:gpt2", "kwargs": {"tie": False},
                                      "stages": 3, "precision": "bf16"}})
    worker = StageWorker(build_stage(cfg, 1), cfg, 1, stage_input_spec(cfg, 1))
    with pytest.raises(StageError, match="dtype float32 but this stage takes bfloat16"):
        worker.forward("m", torch.zeros(1, 4, 32), keep_context=False)
    assert worker.forward("m", torch.zeros(1, 4, 32, dtype=torch.bfloat16), keep_context=False).dtype == torch.bfloat16
