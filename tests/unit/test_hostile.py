"""Hostile numbers and checked work, without processes: stage workers, codecs and the trainer over
in-process peers, some of which lie."""

import asyncio
import io
import random

import msgpack
import pytest
import torch

from swarmrt.config import config_from_dict
from swarmrt.data import sample_input
from swarmrt.models.build import build_layers, stage_ranges
from swarmrt.pipeline.worker import NonFiniteGradients, StageWorker, infer_input_spec
from swarmrt.roles.trainer import Trainer
from swarmrt.routing.verify import OutputScale, ThroughputMeter, judge, relative_gap
from swarmrt.testing.inprocess import InProcessSwarm
from swarmrt.wire.codecs import EncodedTensor, decode
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import BadTensor, from_proto
from tests.unit.test_trainer import swarms  # noqa: F401 (the fixture that closes in-process swarms)

pytestmark = pytest.mark.timeout(120)

MLP = {"run": {"id": "hostile", "seed": 5},
       "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 16, "depth": 4}, "stages": 3},
       "data": {"kind": "regression", "features": 8, "batch_size": 8, "microbatch_size": 4},
       "optimizer": {"name": "adamw", "lr": 0.001, "samples_per_step": 8},
       "network": {"max_retries": 6, "no_peers_timeout_s": 5.0},
       # uncompressed replies: a liar's float32 3e38 reaches the trainer as sent (an honest fp16 encoder would refuse it)
       "compression": {"activations": "none", "gradients": "none"}}


def workers_of(raw, samples_per_step=8):
    config = config_from_dict({**raw, "optimizer": {**raw["optimizer"], "samples_per_step": samples_per_step}})
    layers = build_layers(config)
    out = []
    for s, (a, b) in enumerate(stage_ranges(config, layers)):
        spec = infer_input_spec(layers[:a], sample_input(config.data))
        out.append(StageWorker(torch.nn.Sequential(*layers[a:b]), config, s, spec))
    return config, out


def all_finite(worker):
    return all(bool(torch.isfinite(p).all()) for p in worker.module.parameters())


# -- the stage worker ------------------------------------------------------------------------------
def test_one_3e38_backward_leaves_every_weight_finite():
    config, workers = workers_of(MLP, samples_per_step=4)
    w = workers[1]
    x = torch.randn(4, 16)
    out = w.forward("evil", x, keep_context=True)
    with pytest.raises(NonFiniteGradients, match="not finite"):
        w.backward("evil", torch.full_like(out, 3e38), None, 4, need_grad_input=True, deadline=None)
    assert w.dropped_nonfinite == 1 and w.microbatches_applied == 0
    # a huge but finite gradient is clipped (optimizer.max_grad_norm, on by default) before the step
    out = w.forward("big", x, keep_context=True)
    grad_input, stepped = w.backward("big", torch.full_like(out, 1e30), None, 4, need_grad_input=True, deadline=None)
    # then honest microbatches: the stage keeps stepping with finite weights
    for i in range(3):
        out = w.forward(f"ok{i}", x, keep_context=True)
        w.backward(f"ok{i}", torch.randn_like(out), None, 4, need_grad_input=True, deadline=None)
    assert w.version >= 3 and w.broken is None
    assert all_finite(w)
    w.state_bytes()  # servable: finite weights


def test_claimed_samples_are_ignored():
    config, workers = workers_of(MLP, samples_per_step=16)
    w = workers[2]
    x = torch.randn(4, 16)
    out = w.forward("mb", x, keep_context=True)
    _, stepped = w.backward("mb", torch.randn_like(out), None, 2**31 - 1, need_grad_input=True, deadline=None)
    assert not stepped and w.version == 0  # 4 samples of 16: no step forced
    assert w.samples_applied == 4 and w.samples_pending == 4


def test_non_finite_donor_state_is_refused():
    _, workers = workers_of(MLP)
    donor, joiner = workers_of(MLP)[1][1], workers[1]
    with torch.no_grad():
        next(donor.module.parameters())[0, 0] = float("nan")
    donor_bytes = io.BytesIO()
    torch.save({"stage": 1, "module": donor.module.state_dict(), "optimizer": None, "version": 9,
                "samples_applied": 0}, donor_bytes)
    with pytest.raises(ValueError, match="nan or inf"):
        joiner.load_state_bytes(donor_bytes.getvalue())
    assert all_finite(joiner) and joiner.version == 0
    with pytest.raises(RuntimeError, match="not finite"):
        donor.state_bytes()  # and a peer never hands such weights out


# -- codecs: refuse before allocating --------------------------------------------------------------
@pytest.fixture
def allocations(monkeypatch):
    """Element counts of every torch.zeros/empty call (the decoders' allocations)."""
    sizes = []
    for name in ("zeros", "empty"):
        real = getattr(torch, name)

        def spy(*shape, _real=real, **kw):
            dims = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
            n = 1
            for d in dims:
                n *= int(d)
            sizes.append(n)
            return _real(*shape, **kw)

        monkeypatch.setattr(torch, name, spy)
    return sizes


def test_int8_blockwise_block_of_2_27_in_a_16_kib_message_is_refused_before_allocating(allocations):
    numel = 16000
    msg = pb.Tensor(dtype="float32", shape=[numel], codec="int8_blockwise", data=b"\x00" * (4 + numel),
                    meta=msgpack.packb({"block": 2**27}))
    assert msg.ByteSize() < 17 * 1024
    with pytest.raises(BadTensor, match=r"meta\['block'\] = 134217728"):
        from_proto(msg, "input", max_bytes=256 << 20)
    assert max(allocations, default=0) < 2**20  # nothing near 2**27 floats (512 MiB)


def test_a_40_byte_topk_reply_cannot_claim_a_huge_tensor(allocations):
    # 5 int32 indices + 5 float32 values = 40 bytes, for a claimed 2**28-value tensor (1 GiB)
    data = torch.arange(5, dtype=torch.int32).numpy().tobytes() + torch.ones(5).numpy().tobytes()
    encoded = EncodedTensor("topk", "float32", (2**28,), data, {"k": 5, "index_bits": 32})
    assert len(data) == 40
    with pytest.raises(ValueError, match=r"meta\['k'\] = 5 but a \[268435456\] tensor keeps 2684355 values"):
        decode(encoded)
    assert max(allocations, default=0) < 2**20


# -- checked work: the pure rules ------------------------------------------------------------------
def test_judge_majority_two_peers_with_history_and_unresolved():
    honest = torch.randn(4, 16)
    near = honest + 0.01 * torch.randn(4, 16)
    zeros = torch.zeros(4, 16)
    assert judge({"a": honest, "b": near}, 0.1).agreed
    v = judge({"z": zeros, "a": honest, "b": near}, 0.1)
    assert v.liars == ("z",) and not v.agreed
    v = judge({"a": honest, "s": 3 * honest, "b": near}, 0.1)
    assert v.liars == ("s",)
    # two peers: the stage's typical output size decides, and only when it can
    scale = OutputScale()
    scale.update(1, float(honest.pow(2).mean().sqrt()))
    assert judge({"a": honest, "z": zeros}, 0.1, scale.get(1)).liars == ("z",)
    assert judge({"z": zeros, "a": honest}, 0.1, scale.get(1)).liars == ("z",)
    assert judge({"a": honest, "z": zeros}, 0.1, None).liars == ()
    assert judge({"a": honest, "n": -honest}, 0.1, scale.get(1)).liars == ()  # same size: cannot tell
    assert relative_gap(honest, zeros) == 1.0 and relative_gap(zeros, zeros) == 0.0


def test_throughput_meter_is_what_the_trainer_timed():
    meter = ThroughputMeter()
    assert meter.get("p") is None
    meter.observe_forward("p", 6, 0.1)  # 6 samples' forward in 0.1 s: 20 samples/s of forward + backward
    assert meter.get("p") == pytest.approx(20.0)


# -- the trainer over in-process peers that lie ----------------------------------------------------
def make(swarms, peers_per_stage, throughput=None, **network):
    config = config_from_dict({**MLP, "network": {**MLP["network"], **network}})
    swarm = InProcessSwarm.build(config, peers_per_stage, throughput)
    swarms.append(swarm)
    trainer = Trainer(config, dht=None, client=swarm.client, trainer_id="t", rng=random.Random(1))
    trainer.view_peers(swarm.records)
    return config, swarm, trainer


def lie(worker, how):
    real = worker.forward

    def forward(mb, x, keep_context):
        out = real(mb, x, keep_context)
        return {"zeros": torch.zeros_like(out), "nan": torch.full_like(out, float("nan")),
                "scale": out * 3, "shape": out[:, :-1]}[how]

    worker.forward = forward


def train(trainer, steps):
    async def go():
        return [await trainer.train_step(step) for step in range(steps)]

    return asyncio.run(go())


@pytest.mark.parametrize("how", ["nan", "shape"])
def test_a_bad_reply_bans_its_sender_and_the_hop_is_retried_elsewhere(swarms, how):
    config, swarm, trainer = make(swarms, peers_per_stage=2, verify_fraction=0.0)
    lie(swarm.workers["s1p0"], how)
    losses = train(trainer, 6)
    acc, checks = trainer.accounting, trainer.checks.counts
    n = 6 * config.data.microbatches_per_step
    assert acc.applied == n and acc.duplicates == 0 and acc.incomplete() == []
    assert checks.bad_replies == 1 and "s1p0" in trainer.bans.banned(trainer.clock())
    assert "stage 1 output" in trainer.bans.bad["s1p0"][1]
    # the next stage was never blamed, never fed garbage
    assert not any(p in trainer.bans.banned(trainer.clock()) for p in ("s2p0", "s2p1"))
    assert swarm.workers["s1p0"].microbatches_applied == 0
    assert all(all_finite(w) for w in swarm.workers.values())
    assert losses[-1] < losses[0]


def lie_in_grad_input(worker, value: float) -> None:
    """``worker`` answers every backward with a grad_input full of ``value`` (its own gradients stay honest)."""
    real = worker.gradients

    def lying(*args, **kwargs):
        pending = real(*args, **kwargs)
        pending.grad_input = torch.full_like(pending.grad_input, value)
        return pending

    worker.gradients = lying


def test_a_bad_grad_input_bans_its_sender_and_another_peer_applies(swarms):
    config, swarm, trainer = make(swarms, peers_per_stage=2, verify_fraction=0.0)
    worker = swarm.workers["s2p1"]
    lie_in_grad_input(worker, float("nan"))
    train(trainer, 4)
    acc = trainer.accounting
    assert acc.applied == 4 * config.data.microbatches_per_step and acc.incomplete() == [] and acc.duplicates == 0
    assert trainer.checks.counts.bad_replies == 1 and "grad_input" in trainer.bans.bad["s2p1"][1]


@pytest.mark.parametrize("how", ["zeros", "scale"])
def test_checked_work_bans_a_plausible_liar_by_majority(swarms, how):
    # honest peers of a stage train apart (no averaging here): after a few steps their outputs differ by
    # ~0.1; a liar's by 1 (zeros) or 2 (x3). The tolerance sits between, as docs/security-checks.md advises
    config, swarm, trainer = make(swarms, peers_per_stage=3, verify_fraction=1.0, verify_tolerance=0.5)
    lie(swarm.workers["s1p2"], how)
    losses = train(trainer, 6)
    counts = trainer.checks.counts
    assert counts.check_bans == 1 and counts.bad_replies == 0
    assert list(trainer.bans.bad) == ["s1p2"] and "checked work" in trainer.bans.bad["s1p2"][1]
    assert counts.checked_hops >= 6 * config.data.microbatches_per_step
    assert swarm.workers["s1p2"].microbatches_applied == 0  # its forwards never made it into a route
    assert losses[-1] < losses[0]
    summary = trainer.checks.summary()
    assert summary["check_bans"] == 1 and summary["check_mismatches"] >= 1


def test_a_peer_announcing_1e13_samples_per_s_gets_no_more_than_its_measured_share(swarms):
    config, swarm, trainer = make(swarms, peers_per_stage=2, verify_fraction=0.0,
                                  throughput=lambda stage, j: 1e13 if j == 0 else 50.0)
    for j in range(2):
        swarm.workers[f"s1p{j}"].compute_delay_s = 0.005  # equally fast in truth
    train(trainer, 8)
    fake, honest = swarm.client.forwards["s1p0"], swarm.client.forwards["s1p1"]
    assert honest >= 0.25 * (fake + honest), (fake, honest)  # announced figures would give it ~all


# -- caps on what a peer accepts -------------------------------------------------------------------
def test_a_sequence_over_the_cap_is_refused_before_decoding(swarms):
    raw = {**MLP, "model": {"factory": "swarmrt.models:tiny_llama", "kwargs": {"hidden_size": 16, "layers": 2},
                            "stages": 2},
           "data": {"seq_len": 8, "batch_size": 4, "microbatch_size": 4},
           "network": {**MLP["network"], "max_sequence_length": 8}}
    config = config_from_dict(raw)
    swarm = InProcessSwarm.build(config, 1)
    swarms.append(swarm)
    from swarmrt.wire.tensors import to_proto
    import grpc

    async def call(length):
        x = torch.zeros(1, length, dtype=torch.long)
        request = pb.ForwardRequest(run_id=config.run.id, stage=0, microbatch_id="m", input=to_proto(x))
        return await swarm.client.forward("s0p0", request, timeout=5.0)

    assert asyncio.run(call(8)).output.shape == [1, 8, 16]
    with pytest.raises(grpc.aio.AioRpcError, match="sequence length 9 exceeds network.max_sequence_length = 8") as e:
        asyncio.run(call(9))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_state_download_stops_at_the_cap():
    from swarmrt.wire.client import StageClient

    class Stub:
        def GetState(self, request, timeout, metadata=None):
            async def chunks():
                for _ in range(2000):
                    yield pb.StateChunk(data=b"x" * 1024, total_bytes=1024)  # lies about its size
            return chunks()

    client, capped = StageClient(), StageClient(max_state_mb=1)
    client.stub = capped.stub = lambda address: Stub()
    with pytest.raises(ValueError, match="over the 4096-byte limit"):
        asyncio.run(client.get_state("a", "run", 0, timeout=5.0, max_bytes=4096))
    with pytest.raises(ValueError, match="over the 1048576-byte limit"):  # network.max_state_mb, as a peer sets it
        asyncio.run(capped.get_state("a", "run", 0, timeout=5.0))
    assert len(asyncio.run(client.get_state("a", "run", 0, timeout=5.0))) == 2000 * 1024


# -- byzantine faults as rules-file lies -----------------------------------------------------------
def test_byzantine_rules_parse_and_rewrite_replies():
    from swarmrt.localswarm.faults import FaultError, FaultPlan, Peer
    from swarmrt.wire.byzantine import reply_lie, tamper
    from swarmrt.wire.emulation import RulesError, parse_rules
    from swarmrt.wire.tensors import to_proto

    rules = parse_rules({"byzantine": [{"id": "f1", "kind": "replies", "method": "Forward", "mode": "scale",
                                        "factor": 3}, {"id": "f2", "kind": "throughput", "value": 1e13}]})
    lie = reply_lie(rules.lies, "Forward")
    assert lie.factor == 3.0 and reply_lie(rules.lies, "Backward") is None
    true = torch.randn(2, 3)
    reply = pb.ForwardResponse(output=to_proto(true, "fp16"), model_version=4)
    lied = tamper(reply, lie)
    assert torch.allclose(from_proto(lied.output), 3 * true.half().float(), rtol=1e-3)
    assert lied.model_version == 4 and torch.equal(from_proto(reply.output), true.half().float())
    with pytest.raises(RulesError, match=r"byzantine\[0\].kind"):
        parse_rules({"byzantine": [{"kind": "lies"}]})
    plan = FaultPlan(seed=0)
    fault = plan.byzantine(Peer(1, 0), mode="nan", at_step=2)
    assert "lies in its Forward replies (nan)" in fault.describe() and fault.required_effects == 1
    assert "announces" in plan.lie_throughput(Peer(0), at_step=0).describe()
    with pytest.raises(FaultError, match="mode 'ones'"):
        plan.byzantine(Peer(1), mode="ones", at_step=0)


def test_a_finite_grad_input_that_overflows_the_stage_before_is_blamed_on_its_sender(swarms):
    config, swarm, trainer = make(swarms, peers_per_stage=2, verify_fraction=0.0)
    worker = swarm.workers["s2p1"]
    lie_in_grad_input(worker, 3e38)
    losses = train(trainer, 4)  # does not crash
    assert list(trainer.bans.bad) == ["s2p1"] and "refused by stage 1" in trainer.bans.bad["s2p1"][1]
    assert trainer.accounting.duplicates == 0 and len(trainer.accounting.incomplete()) == 1
    assert swarm.workers["s1p0"].dropped_nonfinite + swarm.workers["s1p1"].dropped_nonfinite == 1
    assert all(all_finite(w) for w in swarm.workers.values()) and len(losses) == 4
