"""The user's data and loss: local files tokenized with a local tokenizer, a batch source from a
factory (resumed from the trainer's saved data position), and a custom loss."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from swarmrt.checkpoint.store import load_data_position
from swarmrt.config import ConfigError, config_from_dict
from swarmrt.data import Batches, loss_sum
from swarmrt.models.build import build_layers
from swarmrt.roles.trainer import Trainer
from swarmrt.testing.inprocess import InProcessSwarm

pytestmark = pytest.mark.timeout(60)

WORDS = ("the swarm trains a model on peers that come and go while the trainer feeds batches "
         "and every stage keeps its layers").split()


def make_tokenizer(directory):
    """A word-level tokenizer built here with the tokenizers library (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return tokenizer


def write_corpus(directory):
    rng = torch.Generator().manual_seed(0)
    directory.mkdir()
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=rng).tolist())
            for _ in range(30)]
    (directory / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[:20]) + "\n")
    (directory / "b.txt").write_text(docs[20])
    return docs


def test_local_files_are_tokenized_with_a_local_tokenizer(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    docs = write_corpus(tmp_path / "corpus")
    data = {"path": str(tmp_path / "corpus"), "tokenizer": str(tmp_path / "tok"), "text_field": "body",
            "seq_len": 12, "batch_size": 4, "microbatch_size": 2}
    batches = Batches(config_from_dict({"data": data}).data, seed=1)
    x, y = batches.batch(3)
    assert x.dtype == torch.long and x.shape == (4, 12) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, Batches(config_from_dict({"data": data}).data, seed=1).batch(3)[0])  # resumable
    eos = tokenizer.token_to_id("<eos>")
    whole = torch.tensor([i for d in docs[:21] for i in tokenizer.encode(d).ids + [eos]])
    window = x[0].tolist()
    assert any(whole[s:s + 12].tolist() == window for s in range(len(whole) - 11))  # a real window of the corpus
    assert eos in whole.tolist() and int(x.max()) < tokenizer.get_vocab_size()


def test_bad_data_settings_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer: needs data.path"):
        config_from_dict({"data": {"tokenizer": str(tmp_path)}})
    with pytest.raises(ConfigError, match="data.loss: must look like"):
        config_from_dict({"data": {"loss": "nocolon"}})
    make_tokenizer(tmp_path / "tok")
    (tmp_path / "c.jsonl").write_text('{"text": "the swarm"}\n{"other": 1}\n')
    with pytest.raises(ConfigError, match="c.jsonl line 2 has no string field 'text'"):
        Batches(config_from_dict({"data": {"path": str(tmp_path / "c.jsonl"), "tokenizer": str(tmp_path / "tok")}}).data, 0)


class Recorder:
    """A user's batch source: batches a pure function of the step; it records what it was asked for."""

    asked: list[int] = []

    def __init__(self, data, seed, stream, scale=1.0):
        self.data, self.seed, self.scale = data, seed, scale

    def batch(self, step):
        Recorder.asked.append(step)
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        x = torch.randn(self.data.batch_size, self.data.features, generator=g)
        return x, self.scale * x[:, :1]

    def eval_batch(self, n, index):
        return self.batch(-1 - index)


def recorder(data, seed, stream, **kwargs):
    return Recorder(data, seed, stream, **kwargs)


def l1(output, targets):
    return (output - targets).abs().mean(dim=1)


def bad_loss(output, targets):
    return (output - targets).abs().mean()


def regression(tmp_path, **data):
    return config_from_dict({
        "run": {"id": "datasrc", "seed": 2},
        "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 16, "depth": 3}, "stages": 2},
        "data": {"kind": "regression", "features": 8, "batch_size": 8, "microbatch_size": 4,
                 "factory": "tests.unit.test_data_sources:recorder", "factory_kwargs": {"scale": 2.0}, **data},
        "optimizer": {"name": "sgd", "lr": 0.1, "samples_per_step": 8},
        "compression": {"activations": "none", "gradients": "none"},  # the loss compared exactly below
        "checkpoint": {"location": str(tmp_path / "ckpt")}})


def run_trainer(config, steps, start_step=0):
    swarm = InProcessSwarm.build(config)
    try:
        trainer = Trainer(config, dht=None, client=swarm.client, trainer_id="t")
        trainer.view_peers(swarm.records)
        return asyncio.run(trainer.run(steps, start_step=start_step))
    finally:
        swarm.close()


def test_a_factory_source_resumes_from_the_saved_data_position_with_a_custom_loss(tmp_path):
    config = regression(tmp_path, loss="tests.unit.test_data_sources:l1")
    Recorder.asked.clear()
    first = run_trainer(config, 2)
    position = load_data_position(config.checkpoint.location, config.run.id, 0)
    assert position == 2 and Recorder.asked == [0, 1]
    Recorder.asked.clear()
    run_trainer(config, 4, start_step=position)
    assert Recorder.asked == [2, 3]  # resumed where it stopped, asking the source for those steps only
    # the custom loss is what the swarm reported: the unsplit model's L1 on the source's step-0 batch
    model = torch.nn.Sequential(*build_layers(config))
    x, y = recorder(config.data, config.run.seed, 0, scale=2.0).batch(0)
    with torch.no_grad():
        assert first["first_loss"] == pytest.approx(l1(model(x), y).mean().item(), abs=1e-6)
        assert loss_sum(config.data, model(x), y).item() == pytest.approx(l1(model(x), y).sum().item())


def test_a_loss_that_does_not_give_one_value_per_sample_is_refused(tmp_path):
    config = regression(tmp_path, loss="tests.unit.test_data_sources:bad_loss")
    with pytest.raises(ConfigError, match=r"one loss per sample \(shape \[4\]\), got \[\]"):
        loss_sum(config.data, torch.zeros(4, 1), torch.ones(4, 1))
