"""The trainer's one microbatch loop, over in-process peers running the real handler.

:class:`swarmrt.testing.inprocess.InProcessClient` serves every call with a
real StageServicer over real StageWorkers, so what is checked here is what a
real swarm does, minus sockets: gradients equal the unsplit model's, failed
hops move to another peer without a duplicate, evicted contexts are
recomputed, evaluation runs forward only through a stage subset.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random

import grpc
import pytest
import torch

from swarmrt.config import config_from_dict
from swarmrt.data import Batches, loss_sum
from swarmrt.models.build import build_layers
from swarmrt.pipeline.worker import DeadlineExpired
from swarmrt.roles.trainer import NoPeers, Trainer
from swarmrt.routing.live import LiveRouting
from swarmrt.testing.inprocess import FakeContext, InProcessSwarm, rpc_error
from swarmrt.wire.context import NOT_APPLIED
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import to_proto

pytestmark = pytest.mark.timeout(120)

MLP = {"run": {"id": "trainerunit", "seed": 3},
       "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 16, "depth": 4}, "stages": 3},
       "data": {"kind": "regression", "features": 8, "batch_size": 8, "microbatch_size": 4},
       "optimizer": {"name": "sgd", "lr": 0.1, "samples_per_step": 8,
                     "max_grad_norm": float("inf")},  # the unsplit reference does not clip
       "network": {"max_retries": 4, "no_peers_timeout_s": 2.0},
       "compression": {"activations": "none", "gradients": "none"}}  # exact parity with the unsplit model
LLAMA = {**MLP, "model": {"factory": "swarmrt.models:tiny_llama", "kwargs": {"hidden_size": 32, "layers": 3},
                          "stages": 3},
         "data": {"seq_len": 16, "batch_size": 8, "microbatch_size": 4}}
SIX = {**MLP, "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 16, "depth": 6},
                        "layer_ranges": [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10], [10, 11]]}}


@pytest.fixture
def swarms():
    made = []
    yield made
    for swarm in made:
        swarm.close()


def make(swarms, raw, peers_per_stage=1, throughput=None, **network):
    config = config_from_dict({**raw, "network": {**raw["network"], **network}})
    swarm = InProcessSwarm.build(config, peers_per_stage, throughput)
    swarms.append(swarm)
    trainer = Trainer(config, dht=None, client=swarm.client, trainer_id="t")
    trainer.view_peers(swarm.records)
    return config, swarm, trainer


def train(trainer, steps, start=0):
    async def go():
        return [await trainer.train_step(step) for step in range(start, start + steps)]

    return asyncio.run(go())


def train_until(trainer, seen: list, steps: range, what: str) -> None:
    """Train ``steps`` one at a time until a fault hook has appended to ``seen``; fail if none did."""
    for step in steps:
        train(trainer, 1, start=step)
        if seen:
            return
    raise AssertionError(f"no {what} in {len(steps)} steps")


def assert_exactly_once(trainer, microbatches, stages):
    acc = trainer.accounting
    assert acc.started == acc.applied == microbatches
    assert acc.duplicates == 0 and acc.incomplete() == []
    assert acc.per_stage(stages) == [microbatches] * stages


def reference_run(config, steps, lrs=None):
    """The unsplit model trained on the same batches with the same optimizer (at learning rate
    ``lrs[step]`` when given): its losses and parameters."""
    model = torch.nn.Sequential(*build_layers(config))
    opt = torch.optim.SGD(model.parameters(), lr=config.optimizer.lr)
    batches, losses = Batches(config.data, config.run.seed, 0), []
    for step in range(steps):
        x, y = batches.batch(step)
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[step]
        opt.zero_grad()
        loss = loss_sum(config.data, model(x), y) / x.shape[0]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, list(model.parameters())


def assert_matches_reference(config, swarm, losses, steps, lrs=None):
    ref_losses, ref_params = reference_run(config, steps, lrs)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    params = [p for stage in range(config.num_stages) for p in swarm.workers[f"s{stage}p0"].module.parameters()]
    assert len(params) == len(ref_params) > 0
    for p_swarm, p_ref in zip(params, ref_params):
        torch.testing.assert_close(p_swarm, p_ref, rtol=0, atol=1e-5)


# -- the in-process client is the real handler ---------------------------------------------------
def test_in_process_errors_are_grpc_errors_with_the_handlers_code(swarms):
    config, swarm, _ = make(swarms, MLP)
    bad = pb.ForwardRequest(run_id=config.run.id, stage=2, microbatch_id="m", input=to_proto(torch.zeros(4, 16)))

    async def call(request, address="s1p0"):
        return await swarm.client.forward(address, request, timeout=5.0)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(call(bad))  # stage 2's request sent to stage 1's peer
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stage 2 is not served here" in e.value.details()
    no_context = pb.BackwardRequest(run_id=config.run.id, stage=1, microbatch_id="never",
                                    grad_output=to_proto(torch.zeros(4, 16)), samples=4, need_grad_input=True)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(swarm.client.backward("s1p0", no_context, timeout=5.0))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    swarm.client.kill("s1p0")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(call(bad))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    swarm.client.revive("s1p0")
    swarm.client.delay("s1p0", 1.0)
    good = pb.ForwardRequest(run_id=config.run.id, stage=1, microbatch_id="m", input=to_proto(torch.zeros(4, 16)))

    async def short():
        return await swarm.client.forward("s1p0", good, timeout=0.05)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(short())
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_backward_read_after_its_callers_wall_clock_deadline_is_refused_and_not_applied(swarms):
    """A peer frozen with a Backward in its socket reads it late, when gRPC's own deadline starts
    afresh; the caller's wall-clock deadline in the request still tells it the work is stale."""
    import time

    from swarmrt.pipeline.service import STALE_ALLOWANCE_S

    config, swarm, _ = make(swarms, MLP)
    worker = swarm.client.servicers["s1p0"].worker
    forward = pb.ForwardRequest(run_id=config.run.id, stage=1, microbatch_id="late", keep_context=True,
                                input=to_proto(torch.zeros(4, 16)))
    asyncio.run(swarm.client.forward("s1p0", forward, timeout=5.0))

    def backward(deadline_unix):  # with the input: a refused call may have dropped the kept context
        request = pb.BackwardRequest(run_id=config.run.id, stage=1, microbatch_id="late",
                                     grad_output=to_proto(torch.ones(4, 16)), samples=4, need_grad_input=True,
                                     input=to_proto(torch.zeros(4, 16)), deadline_unix=deadline_unix)
        return asyncio.run(swarm.client.backward("s1p0", request, timeout=5.0))

    applied = worker.microbatches_applied
    with pytest.raises(grpc.aio.AioRpcError) as e:
        backward(time.time() - STALE_ALLOWANCE_S - 5.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert worker.microbatches_applied == applied  # nothing applied
    backward(time.time() + 5.0)  # the same work on time is applied
    assert worker.microbatches_applied == applied + 1


def test_fake_context_counts_down_and_aborts_like_grpc():
    now = [10.0]
    context = FakeContext(2.0, clock=lambda: now[0])
    now[0] = 11.5
    assert context.time_remaining() == pytest.approx(0.5)
    assert FakeContext(None).time_remaining() is None
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(context.abort(grpc.StatusCode.UNAVAILABLE, "leaving"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and e.value.details() == "leaving"
    assert rpc_error(grpc.StatusCode.INTERNAL, "x").code() == grpc.StatusCode.INTERNAL


# -- the full SWARM pipeline ---------------------------------------------------------------------
@pytest.mark.parametrize("raw", [MLP, LLAMA], ids=["sequential", "llama"])
def test_full_pipeline_trains_exactly_like_the_unsplit_model(swarms, raw):
    config, swarm, trainer = make(swarms, raw)
    losses = train(trainer, 3)
    assert_matches_reference(config, swarm, losses, 3)
    assert_exactly_once(trainer, 3 * config.data.microbatches_per_step, config.num_stages)
    assert all(w.version == 3 for w in swarm.workers.values())


def test_a_warmup_and_decay_schedule_trains_exactly_like_the_unsplit_model_at_those_rates(swarms):
    raw = {**MLP, "optimizer": {**MLP["optimizer"], "warmup_steps": 2, "decay_steps": 2, "min_lr_ratio": 0.5}}
    config, swarm, trainer = make(swarms, raw)
    losses = train(trainer, 5)
    # lr 0.1: warmup 0.05, 0.1; then the cosine from 0.1 down to 0.05 over 2 steps; then its floor
    assert_matches_reference(config, swarm, losses, 5, lrs=[0.05, 0.1, 0.1, 0.075, 0.05])


def test_a_backward_whose_context_was_evicted_is_recomputed_from_the_input(swarms):
    config, swarm, trainer = make(swarms, MLP)
    evicted = collections.Counter()
    backward = swarm.client.backward

    async def evict_then_backward(address, request, timeout):
        if not request.HasField("input"):  # every first try finds its context gone
            swarm.client.evict(address)
            evicted[address] += 1
        return await backward(address, request, timeout)

    swarm.client.backward = evict_then_backward
    losses = train(trainer, 2)
    n = 2 * config.data.microbatches_per_step
    assert evicted == {"s0p0": n, "s1p0": n, "s2p0": n}
    assert trainer.accounting.hop_retries == 3 * n  # each FAILED_PRECONDITION, resent to the same peer
    assert trainer.accounting.forward_restarts == 0
    assert_exactly_once(trainer, n, 3)
    assert_matches_reference(config, swarm, losses, 2)  # the recomputed gradients are the same


def test_a_peer_killed_mid_forward_is_replaced_by_its_stage_sibling_exactly_once(swarms):
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=2)
    train(trainer, 1)
    applied_before = swarm.workers["s1p0"].microbatches_applied
    forward = swarm.client.forward
    killed = []

    async def kill_on_first_stage1_forward(address, request, timeout):
        if address == "s1p0" and not killed:  # dies while the microbatch is between stage 0 and stage 1
            killed.append(request.microbatch_id)
            swarm.client.kill("s1p0")
        return await forward(address, request, timeout)

    swarm.client.forward = kill_on_first_stage1_forward
    train_until(trainer, killed, range(1, 6), "microbatch went to s1p0")
    acc = trainer.accounting
    n = acc.started
    assert_exactly_once(trainer, n, 3)
    assert acc.forward_restarts == 0  # only the failed hop was redone, on the sibling
    assert acc.hop_retries >= 1 and acc.replans >= 1
    calls = swarm.client.calls[killed[0]]
    assert calls.forward[0] in ("s0p0", "s0p1") and calls.forward[1:] in (["s1p1", "s2p0"], ["s1p1", "s2p1"])
    assert calls.backward == list(reversed(calls.forward))
    assert swarm.workers["s1p0"].microbatches_applied == applied_before
    # after the kill, everything at stage 1 goes to the sibling
    train(trainer, 3, start=10)
    assert_exactly_once(trainer, acc.started, 3)
    assert swarm.workers["s1p1"].microbatches_applied + applied_before == acc.per_stage(3)[1]


def test_a_backward_applied_whose_answer_never_came_is_asked_again_on_the_same_peer(swarms):
    """A peer that applies a backward and then freezes before replying: the trainer times out knowing
    nothing. Retrying on the sibling would apply the microbatch twice; asking the same peer again
    gets its answer (it never applies twice). A peer's own refusal (too late, not applied) still
    goes to the sibling at once."""
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=2)
    backward = swarm.client.backward
    lost, refused = [], []

    async def freeze_after_applying(address, request, timeout):
        response = await backward(address, request, timeout)
        if address == "s1p0" and not lost:  # applied there; the answer comes after the caller gave up
            lost.append(request.microbatch_id)
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return response

    swarm.client.backward = freeze_after_applying
    train_until(trainer, lost, range(5), "backward went to s1p0")
    acc = trainer.accounting
    assert_exactly_once(trainer, acc.started, 3)
    applied = [sum(w.microbatches_applied for name, w in swarm.workers.items() if w.stage == s) for s in range(3)]
    assert applied == [acc.started] * 3  # the workers' own counts: nothing applied twice
    assert swarm.client.calls[lost[0]].backward.count("s1p0") == 2  # asked again, on the same peer
    assert "s1p1" not in swarm.client.calls[lost[0]].backward

    async def too_late_on_s1p0(address, request, timeout):
        if address == "s1p0" and not refused:
            refused.append(request.microbatch_id)
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed before applying{NOT_APPLIED}")
        return await backward(address, request, timeout)

    swarm.client.backward = too_late_on_s1p0
    train_until(trainer, refused, range(5, 10), "backward went to s1p0")
    assert_exactly_once(trainer, acc.started, 3)
    assert swarm.client.calls[refused[0]].backward[1] == "s1p1"  # refused: straight to the sibling


def test_a_microbatch_asked_again_after_its_deadline_is_answered_not_applied_twice(swarms):
    config, swarm, _ = make(swarms, MLP)
    worker = swarm.workers["s1p0"]
    x, grad = torch.randn(4, 16), torch.ones(4, 16)
    worker.forward("m", x, keep_context=True)
    worker.apply(worker.gradients("m", grad, None, True), deadline=None)
    applied = worker.microbatches_applied
    again = worker.gradients("m", grad, x, True)  # recomputed from its input, as a second ask sends it
    assert worker.apply(again, deadline=worker.clock() - 1.0) is False  # no DeadlineExpired: nothing to apply
    assert worker.microbatches_applied == applied
    with pytest.raises(DeadlineExpired):
        worker.apply(worker.gradients("n", grad, x, True), deadline=worker.clock() - 1.0)
    assert worker.microbatches_applied == applied


def test_a_failed_first_hop_moves_to_another_stage0_peer(swarms):
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=2)
    swarm.client.kill("s0p0")
    train(trainer, 3)
    acc = trainer.accounting
    assert_exactly_once(trainer, 3 * config.data.microbatches_per_step, 3)
    assert acc.forward_restarts == 0
    assert swarm.workers["s0p0"].microbatches_applied == 0
    assert swarm.client.forwards["s0p0"] >= 1 and acc.bans == 1  # tried, failed twice, banned
    assert "s0p0" not in trainer.routing.table


def test_a_stage_no_peer_can_fill_waits_with_a_status_line_then_raises_no_peers(swarms):
    config, swarm, trainer = make(swarms, MLP, no_peers_timeout_s=0.3)
    trainer.view_peers([r for r in swarm.records if r.stage != 1])  # 1 peer per stage: none can move
    statuses = []

    async def go():
        task = asyncio.create_task(trainer.train_step(0))
        await asyncio.wait_for(trainer.waiting.wait(), timeout=5)
        statuses.append(trainer.status)
        return await task

    with pytest.raises(NoPeers) as e:
        asyncio.run(go())
    assert str(e.value).startswith("stage 1 has no peer and no peer elsewhere can move there (the other 2 peers "
                                   "are pinned, leaving or the last of their stage; waited 0.3")
    assert str(e.value).endswith("start a peer with --stage 1") and "\n" not in str(e.value)
    assert statuses[0].startswith("waiting for stage 1 (no peer serves it and no peer elsewhere can move there")


def test_a_peer_that_joins_while_the_trainer_waits_is_used(swarms):
    config, swarm, trainer = make(swarms, MLP)
    trainer.view_peers([r for r in swarm.records if r.stage != 2])

    async def go():
        task = asyncio.create_task(trainer.train_step(0))
        await asyncio.wait_for(trainer.waiting.wait(), timeout=5)
        assert trainer.status.startswith("waiting for stage 2")
        trainer.view_peers(swarm.records)
        return await task

    asyncio.run(go())
    assert_exactly_once(trainer, config.data.microbatches_per_step, 3)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def healing_view(swarm):
    """Stage 2 has no serving peer; s0p1 is on its way there (stage 0 keeps s0p0)."""
    return [dataclasses.replace(r, state="moving", target=2) if r.peer_id == "s0p1" else r
            for r in swarm.records if r.stage != 2]


def healing_trainer(swarms, timeout):
    config, swarm, _ = make(swarms, MLP, peers_per_stage=2, no_peers_timeout_s=timeout)
    clock, said = FakeClock(), []
    trainer = Trainer(config, dht=None, client=swarm.client, trainer_id="t", clock=clock, say=said.append)
    trainer.view_peers(healing_view(swarm))
    return config, swarm, trainer, clock, said


async def still_waiting(trainer, view):
    """Give the trainer ``view`` and return once it looked at it and waits again."""
    trainer.view_peers(view)
    await asyncio.wait_for(trainer.waiting.wait(), timeout=5)


def test_a_stage_the_swarm_is_filling_waits_past_the_timeout_and_resumes_when_the_mover_arrives(swarms):
    config, swarm, trainer, clock, said = healing_trainer(swarms, timeout=1.0)

    async def go():
        task = asyncio.create_task(trainer.train_step(0))
        await asyncio.wait_for(trainer.waiting.wait(), timeout=5)
        assert trainer.status == "waiting for stage 2 (no peer serves it; 1 peer is moving there)"
        assert said == []  # a short wait prints nothing
        clock.now = 2.5  # past no_peers_timeout_s: a stage the swarm can fill is waited for
        await still_waiting(trainer, healing_view(swarm))
        clock.now = 2.6
        await still_waiting(trainer, healing_view(swarm))
        assert not task.done()
        assert said == ["trainer: waiting for stage 2 (no peer serves it; 1 peer is moving there)"]  # not a flood
        arrived = [dataclasses.replace(r, stage=2) if r.peer_id == "s0p1" else r for r in healing_view(swarm)]
        arrived = [r for r in arrived if r.peer_id != "s0p1"] + [r for r in swarm.records if r.stage == 2]
        clock.now = 3.0
        trainer.view_peers(arrived)
        return await task

    asyncio.run(go())
    assert_exactly_once(trainer, config.data.microbatches_per_step, 3)
    assert said[-1] == "trainer: resuming (waited 3 s for peers)" and len(said) == 2


def test_a_stage_the_swarm_could_fill_but_does_not_fails_after_three_timeouts(swarms):
    config, swarm, trainer, clock, said = healing_trainer(swarms, timeout=1.0)

    async def go():
        task = asyncio.create_task(trainer.train_step(0))
        await asyncio.wait_for(trainer.waiting.wait(), timeout=5)
        clock.now = 2.9
        await still_waiting(trainer, healing_view(swarm))
        clock.now = 3.5
        trainer.view_peers(healing_view(swarm))
        return await task

    with pytest.raises(NoPeers) as e:
        asyncio.run(go())
    assert str(e.value) == ("stage 2 has had no peer for 3.5 s although 1 peer is moving there (do its peers "
                            "rebalance? [rebalance] enabled); start a peer with --stage 2")


def test_an_unpinned_spare_peer_makes_a_stage_fillable_and_pinned_ones_do_not(swarms):
    config, swarm, trainer = make(swarms, MLP, peers_per_stage=2)
    trainer.view_peers([r for r in swarm.records if r.stage != 2])
    assert trainer._outlook(2) == (True, "peers elsewhere can move there")
    trainer.view_peers([dataclasses.replace(r, pinned=True) for r in swarm.records if r.stage != 2])
    assert trainer._outlook(2) == (False, "the other 4 peers are pinned, leaving or the last of their stage")
    trainer.view_peers([dataclasses.replace(r, state="joining", stage=2) if r.peer_id == "s1p1" else r
                        for r in swarm.records if r.stage != 2])
    assert trainer._outlook(2) == (True, "1 peer is joining it")


def test_swarm_routes_draw_each_hop_with_the_current_load():
    """SWARM picks a stage's peer when its input is ready: re-picking the rest of a route sees load
    that appeared after the route was made (here: this trainer's own requests in flight)."""
    config = config_from_dict(MLP)
    routing = LiveRouting(config)
    assert routing.policy == "swarm" and routing.pick_per_hop
    records = InProcessSwarm.build(config, peers_per_stage=2).records
    routing.sync(records, banned=())
    rng = random.Random(0)
    picks = collections.Counter()
    for mb in range(200):
        route, why = routing.route(0.0, rng, mb)
        assert route is not None, why
        routing.set_own_load({"s1p0": 50})  # what the trainer does before each hop's draw
        route, _ = routing.repick(route, 1, (), 0.0, rng)
        picks[route.hops[1].peer] += 1
        routing.finished(route)
        routing.set_own_load({"s1p0": 0})
    assert picks["s1p1"] > 180, picks


def test_own_load_adds_to_the_load_a_peer_announced():
    config = config_from_dict(MLP)
    routing = LiveRouting(config)
    records = [dataclasses.replace(r, load=2) if r.peer_id == "s1p0" else r
               for r in InProcessSwarm.build(config, peers_per_stage=2).records]
    routing.sync(records, banned=())
    assert routing.table.in_flight("s1p0") == 2
    routing.set_own_load({"s1p0": 3, "gone": 1})  # a peer not in the view is ignored
    assert routing.table.in_flight("s1p0") == 5 and "gone" not in routing.table
    routing.set_own_load({"s1p0": 0})
    assert routing.table.in_flight("s1p0") == 2


# -- evaluation ------------------------------------------------------------------------------------
def test_evaluation_runs_forward_only_through_the_given_stages(swarms):
    config, swarm, trainer = make(swarms, SIX)
    subset = (0, 2, 3, 5)
    result = asyncio.run(trainer.evaluate(subset, batches=2))
    expected, samples = 0.0, 0
    for b in range(2):
        x, y = trainer.batches.eval_batch(config.data.batch_size, index=b)
        h = x
        with torch.no_grad():
            for stage in subset:
                h = swarm.workers[f"s{stage}p0"].module(h)
        expected += float(loss_sum(config.data, h, y))
        samples += x.shape[0]
    assert result["samples"] == samples and result["skipped"] == [1, 4]
    assert result["loss"] == pytest.approx(expected / samples, rel=1e-5)
    microbatches = [mb for mb in swarm.client.calls if mb.startswith("eval:")]
    assert len(microbatches) == 2 * config.data.microbatches_per_step
    for mb in microbatches:
        assert swarm.client.calls[mb].forward == [f"s{s}p0" for s in subset] and swarm.client.calls[mb].backward == []
    assert all(not w.contexts and w.microbatches_applied == 0 for w in swarm.workers.values())
    assert trainer.accounting.started == 0 and swarm.client.closed


def test_evaluation_retries_a_failed_hop_on_another_peer(swarms):
    # this trainer has measured s2p1 as by far the fastest (announced figures are not trusted), so
    # SWARM's draw sends the first microbatch to it
    config, swarm, trainer = make(swarms, SIX, peers_per_stage=2)
    for peer in (r.peer_id for r in swarm.records):
        trainer.checks.observe_forward(peer, 3_000_000 if peer == "s2p1" else 3, 1.0)
    swarm.client.kill("s2p1")
    full = asyncio.run(trainer.evaluate(None, batches=1))
    assert swarm.client.forwards["s2p1"] >= 1
    for mb, calls in swarm.client.calls.items():
        assert [int(a[1]) for a in calls.forward] == list(range(6)) and "s2p1" not in calls.forward, mb
    assert full["samples"] == config.data.batch_size


def test_evaluation_needs_no_peer_at_the_stages_it_leaves_out(swarms):
    config, swarm, trainer = make(swarms, SIX, no_peers_timeout_s=0.3)
    trainer.view_peers([r for r in swarm.records if r.stage not in (1, 4)])
    result = asyncio.run(trainer.evaluate((0, 2, 3, 5), batches=1))
    assert result["samples"] == config.data.batch_size and result["skipped"] == [1, 4]
    with pytest.raises(NoPeers, match=r"stage 1 has no peer and no peer elsewhere can move there"):
        asyncio.run(trainer.evaluate((0, 1, 5), batches=1))
