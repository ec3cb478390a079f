"""Peer-to-peer hops (``network.chain_hops``) over in-process peers running the real handler.

Each peer passes its output (forward) and its input gradient (backward) straight to the next peer
through the same :class:`~swarmrt.testing.inprocess.InProcessClient` the trainer uses, so the chain,
its breaks and the trainer's fallback run the product code end to end, minus sockets. A
:class:`Counting` wrapper around the trainer's own client sees only what crosses the trainer's link.
"""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
import torch

from swarmrt.config import ConfigError, config_from_dict
from swarmrt.pipeline.worker import DeadlineExpired
from swarmrt.roles.trainer import Trainer
from swarmrt.testing.inprocess import CountingClient, FakeContext, InProcessSwarm, rpc_error
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import Framed
from tests.unit.test_models import config as model_config, own_forward_losses
from tests.unit.test_trainer import LLAMA, MLP, assert_exactly_once, assert_matches_reference, swarms, train  # noqa: F401

pytestmark = pytest.mark.timeout(120)


class Counting(CountingClient):
    """The trainer's client (counting what crosses its link), whose replies can be lost on the way back."""

    def __init__(self, inner):
        super().__init__(inner)
        self.fail_after: set[str] = set()
        """Addresses whose next backward runs on the peer but whose reply is lost (UNAVAILABLE)."""

    async def backward(self, address, request, timeout):
        response = await super().backward(address, request, timeout)
        if address in self.fail_after:
            self.fail_after.discard(address)
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "the reply was lost")
        return response


def make(swarms, raw, peers_per_stage=1, chain=True, **network):
    config = config_from_dict({**raw, "network": {**raw.get("network", {}), "chain_hops": chain, **network}})
    swarm = InProcessSwarm.build(config, peers_per_stage)
    swarms.append(swarm)
    trainer = Trainer(config, dht=None, client=Counting(swarm.client), trainer_id="t")
    trainer.view_peers(swarm.records)
    return config, swarm, trainer


def applied_per_stage(swarm, stages):
    return [sum(w.microbatches_applied for w in swarm.workers.values() if w.stage == s) for s in range(stages)]


# -- parity and what crosses the trainer's link -------------------------------------------------------
@pytest.mark.parametrize("raw", [MLP, LLAMA], ids=["sequential", "llama"])
def test_chained_hops_train_exactly_like_the_unsplit_model_with_one_call_each_way(swarms, raw):
    config, swarm, trainer = make(swarms, raw)
    losses = train(trainer, 3)
    assert_matches_reference(config, swarm, losses, 3)
    n = 3 * config.data.microbatches_per_step
    assert_exactly_once(trainer, n, config.num_stages)
    assert trainer.client.calls == {"forward": n, "backward": n}  # one call each way per microbatch
    # every hop still ran on its peer: the peers called each other
    assert [len(swarm.client.calls[f"t:{s}:{i}:0"].forward) for s in range(3) for i in range(2)] == [3] * n


def test_a_tied_head_ends_the_chain_on_the_stage0_peer_like_the_users_model():
    cfg = config_from_dict({**model_config("qwen2", True).to_dict(), "network": {"chain_hops": True}})
    swarm = InProcessSwarm.build(cfg, peers_per_stage=1)
    try:
        trainer = Trainer(cfg, dht=None, client=Counting(swarm.client), trainer_id="t")
        trainer.view_peers(swarm.records)
        assert trainer.tied
        losses = train(trainer, 3)
    finally:
        swarm.close()
    reference, _ = own_forward_losses(cfg, 3)
    assert losses == pytest.approx(reference, abs=1e-4)
    assert trainer.client.calls == {"forward": 6, "backward": 6}
    assert swarm.client.calls["t:0:0:0/head"].forward == ["s0p0"]  # the head's pass, chained after stage 2


def test_chaining_cuts_the_bytes_through_the_trainers_link_at_least_in_half(swarms):
    llama = {**LLAMA, "compression": {"activations": "fp16", "gradients": "fp16"}}
    sent = {}
    for chain in (False, True):
        _, _, trainer = make(swarms, llama, chain=chain)
        train(trainer, 2)
        sent[chain] = trainer.client.bytes
    assert sent[True] * 2 <= sent[False], sent


# -- breaks -----------------------------------------------------------------------------------
def test_a_dead_peer_mid_chain_is_reported_and_the_trainer_replans_from_its_input(swarms):
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=2)
    swarm.client.kill("s1p0")
    train(trainer, 4)
    n = 4 * config.data.microbatches_per_step
    assert_exactly_once(trainer, n, 3)
    acc = trainer.accounting
    assert acc.forward_restarts == 0  # the chain came back with stage 0's output; only stage 1 was redone
    assert swarm.workers["s1p0"].microbatches_applied == 0
    assert applied_per_stage(swarm, 3) == [n] * 3
    assert acc.replans >= 1  # a chain broke at stage 1 and went on from stage 0's output


def test_a_hop_that_cannot_apply_in_time_is_redone_from_the_gradient_it_was_given(swarms):
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=2)
    worker = swarm.workers["s1p0"]
    real, refused = worker.apply, []

    def too_late(pending, deadline):
        if not refused:
            refused.append(pending.microbatch_id)
            raise DeadlineExpired("deadline passed before applying; not applied")
        return real(pending, deadline)

    worker.apply = too_late
    train(trainer, 4)
    n = 4 * config.data.microbatches_per_step
    assert refused, "no microbatch went through s1p0"
    assert_exactly_once(trainer, n, 3)
    assert applied_per_stage(swarm, 3) == [n] * 3  # stage 0 below it applied once, stage 1 once elsewhere
    assert trainer.accounting.hop_retries >= 1


def test_a_lost_chained_reply_asks_the_peers_again_and_applies_nothing_twice(swarms):
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=1)
    trainer.client.fail_after.add("s2p0")  # the whole chain applied, then the reply to the trainer was lost
    train(trainer, 2)
    n = 2 * config.data.microbatches_per_step
    assert_exactly_once(trainer, n, 3)
    assert applied_per_stage(swarm, 3) == [n] * 3
    assert trainer.client.calls["backward"] > n  # the peers were asked again, and applied nothing twice


def test_a_dead_peer_in_a_backward_chain_leaves_the_stages_below_unapplied_until_relayed(swarms):
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=2)
    killed = []
    backward = swarm.client.backward

    async def kill_stage1_on_its_first_backward(address, request, timeout):
        if address.startswith("s1") and not killed:  # after the forward used it: dies before the backward
            killed.append(address)
            swarm.client.kill(address)
        return await backward(address, request, timeout)

    swarm.client.backward = kill_stage1_on_its_first_backward
    train(trainer, 3)
    n = 3 * config.data.microbatches_per_step
    assert killed
    assert_exactly_once(trainer, n, 3)
    assert applied_per_stage(swarm, 3) == [n] * 3
    assert swarm.workers[killed[0]].microbatches_applied == 0


# -- refusals -----------------------------------------------------------------------------------
def chained_forward(config, stage, next_hops):
    x = torch.randn(4, 8)
    return Framed(pb.ForwardRequest(run_id=config.run.id, stage=stage, microbatch_id="m", keep_context=True,
                                    next=next_hops)).attach("input", x)


@pytest.mark.parametrize("hop,why", [
    (pb.ChainHop(stage=1, peer_id="intruder"), "peer intruder does not serve stage 1 .*DHT does not vouch"),
    (pb.ChainHop(stage=2, peer_id="s1p0"), "peer s1p0 does not serve stage 2"),
])
def test_a_next_hop_the_runs_dht_does_not_vouch_for_is_never_called(swarms, hop, why):
    config, swarm, _ = make(swarms, MLP)
    servicer = swarm.servicers["s0p0"]

    async def call():
        return await servicer.forward_framed(chained_forward(config, 0, [hop]), FakeContext(5.0))

    response = asyncio.run(call())
    assert response.HasField("broken") and response.broken.code == "NOT_FOUND"
    assert re.search(why, response.broken.details), response.broken.details
    assert (response.broken.stage, response.broken.peer_id) == (hop.stage, hop.peer_id)
    assert [(d.stage, d.peer_id) for d in response.done] == [(0, "s0p0")]  # its own output comes back
    assert tuple(response.output.shape) == (4, 16)
    assert sum(len(c.forward) for c in swarm.client.calls.values()) == 0  # nobody was called


def test_a_route_longer_than_the_run_and_a_peer_without_a_relay_are_refused(swarms):
    config, swarm, _ = make(swarms, MLP)
    servicer = swarm.servicers["s0p0"]
    hops = [pb.ChainHop(stage=1, peer_id="s1p0")] * 4

    async def call(hops):
        return await servicer.forward_framed(chained_forward(config, 0, hops), FakeContext(5.0))

    with pytest.raises(grpc.aio.AioRpcError, match="4 later hops, a route of this run has at most 3"):
        asyncio.run(call(hops))
    with pytest.raises(grpc.aio.AioRpcError, match=r"next\[0\]: stage 7 is not a stage of this run"):
        asyncio.run(call([pb.ChainHop(stage=7, peer_id="s1p0")]))
    assert not swarm.workers["s0p0"].contexts  # refused before any compute
    servicer.relay = None
    with pytest.raises(grpc.aio.AioRpcError, match="does not pass work on"):
        asyncio.run(call(hops[:1]))


def test_chaining_and_checked_work_cannot_be_combined():
    with pytest.raises(ConfigError, match="network.chain_hops: cannot be combined with network.verify_fraction"):
        config_from_dict({**MLP, "network": {"chain_hops": True, "verify_fraction": 0.05}})


def test_a_first_peer_whose_reply_does_not_match_the_route_is_banned(swarms):
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=2)
    servicer = swarm.servicers["s0p0"]
    real = servicer.forward_framed

    async def skips_a_hop(request, context):
        response = await real(request, context)
        del response.message.done[1:]  # claims the chain ended at stage 0 without saying why
        return response

    servicer.forward_framed = skips_a_hop
    train(trainer, 3)
    assert "not the route it was given" in trainer.bans.bad["s0p0"][1]
    assert_exactly_once(trainer, 3 * config.data.microbatches_per_step, 3)



# -- the peers' directory -----------------------------------------------------------------------
def test_the_directory_answers_known_peers_at_once_and_reads_the_dht_at_most_every_half_second():
    from swarmrt.discovery.records import StageRecord
    from swarmrt.pipeline.chain import DhtDirectory

    now, reads = [0.0], []
    table = {1: [StageRecord(peer_id="a", stage=1, address="h:1", throughput=1.0, load=0, version=0,
                             state="serving", heartbeat=0.0),
                 StageRecord(peer_id="gone", stage=1, address="h:2", throughput=1.0, load=0, version=0,
                             state="leaving", heartbeat=0.0)]}

    def read_stage(stage):
        reads.append((now[0], stage))
        return table.get(stage, [])

    directory = DhtDirectory(read_stage, fresh_s=1.0, min_refresh_s=0.5, clock=lambda: now[0])

    async def scenario():
        assert await directory.address(1, "a") == "h:1"  # a first lookup waits for one read
        assert await directory.address(1, "gone") is None  # leaving: not vouched for
        assert await directory.address(1, "made-up") is None
        assert len(reads) == 1  # the unknown ones did not read again within 0.5 s
        now[0] = 0.6
        assert await directory.address(1, "made-up") is None
        assert len(reads) == 2
        assert await directory.address(2, "a") is None  # a peer of another stage is not one of this stage
        now[0] = 5.0  # stale: answered from memory at once, re-read in the background
        table[1] = []
        assert await directory.address(1, "a") == "h:1"
        await asyncio.gather(*directory._reads.values())
        assert await directory.address(1, "a") is None  # the read saw it gone

    asyncio.run(scenario())


def test_a_tied_chain_that_breaks_goes_on_from_the_break_exactly_once(swarms):
    raw = {**model_config("qwen2", True).to_dict(), "network": {"chain_hops": True, "max_retries": 4,
                                                                   "no_peers_timeout_s": 2.0}}
    config, swarm, trainer = make(swarms, raw, peers_per_stage=2)
    assert trainer.tied
    swarm.client.kill("s2p0")  # routes through it break after stage 1
    dropped = []
    backward = swarm.client.backward

    async def drop_first_stage1_backward(address, request, timeout):
        if address.startswith("s1") and not dropped:  # a backward chain breaks below stage 2
            dropped.append(address)
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "dropped")
        return await backward(address, request, timeout)

    swarm.client.backward = drop_first_stage1_backward
    losses = train(trainer, 3)
    n = 3 * config.data.microbatches_per_step
    assert dropped and trainer.accounting.replans >= 1
    assert_exactly_once(trainer, n, 3)
    assert applied_per_stage(swarm, 3) == [n] * 3
    assert losses[-1] < losses[0]
