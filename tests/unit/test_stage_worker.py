"""The stage worker without a network: reference gradients, recompute, exactly-once, bad input."""

import pytest
import torch

from swarmrt.config import config_from_dict
from swarmrt.data import Batches, loss_sum, sample_input
from swarmrt.models.build import build_layers, stage_ranges
from swarmrt.pipeline.worker import ContextMissing, DeadlineExpired, StageError, StageWorker, infer_input_spec

MLP = {"model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 16, "depth": 4}, "stages": 3},
       "data": {"kind": "regression", "features": 8, "batch_size": 8, "microbatch_size": 4}}
LLAMA = {"model": {"factory": "swarmrt.models:tiny_llama", "kwargs": {"hidden_size": 32, "layers": 3}, "stages": 3},
         "data": {"seq_len": 16, "batch_size": 8, "microbatch_size": 4}}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make_workers(raw, samples_per_step=8, clock=None, optimizer="sgd"):
    config = config_from_dict({**raw, "optimizer": {"samples_per_step": samples_per_step, "lr": 0.1, "name": optimizer,
                                                   "max_grad_norm": float("inf")}})  # the unsplit reference does not clip
    layers = build_layers(config)
    workers = []
    for s, (a, b) in enumerate(stage_ranges(config, layers)):
        spec = infer_input_spec(layers[:a], sample_input(config.data))
        workers.append(StageWorker(torch.nn.Sequential(*layers[a:b]), config, s, spec, clock=clock or Clock()))
    return config, workers


def run_microbatch(config, workers, mb_id, x, y, recompute_on=()):
    inputs, h = [], x
    for w in workers:
        inputs.append(h)
        h = w.forward(mb_id, h, keep_context=w.stage not in recompute_on)
    out = h.requires_grad_(True)
    loss = loss_sum(config.data, out, y)
    (grad,) = torch.autograd.grad(loss, out)
    loss = loss.detach()
    for w in reversed(workers):
        grad, _ = w.backward(mb_id, grad, inputs[w.stage] if w.stage in recompute_on else None, x.shape[0],
                             need_grad_input=w.stage > 0, deadline=None)
    return float(loss)


@pytest.mark.parametrize("raw", [MLP, LLAMA], ids=["sequential", "llama"])
def test_pipeline_matches_the_unsplit_model(raw):
    """Loss and three SGD steps equal the unsplit model's (1e-5). (SGD, because Adam's
    normalisation turns 1e-9 differences in near-zero gradients into lr-sized updates.)"""
    config, workers = make_workers(raw)
    reference = torch.nn.Sequential(*build_layers(config))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    batches = Batches(config.data, seed=0)
    for step in range(3):
        x, y = batches.batch(step)
        ref_opt.zero_grad()
        ref_loss = loss_sum(config.data, reference(x), y) / x.shape[0]
        ref_loss.backward()
        ref_grads = [p.grad.clone() for p in reference.parameters()]
        losses = [run_microbatch(config, workers, f"{step}:{i}", x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4],
                                 recompute_on={1} if step == 1 else ()) for i in range(2)]
        assert sum(losses) / x.shape[0] == pytest.approx(ref_loss.item(), abs=1e-5)
        ref_opt.step()
        swarm_params = [p for w in workers for p in w.module.parameters()]
        for p_ref, p_swarm in zip(reference.parameters(), swarm_params):
            torch.testing.assert_close(p_swarm, p_ref, rtol=0, atol=1e-5)
        assert all(w.version == step + 1 for w in workers)
    assert len(ref_grads) == len(swarm_params) > 0


@pytest.mark.parametrize("raw", [MLP, LLAMA], ids=["sequential", "llama"])
def test_gradients_match_before_the_step(raw):
    config, workers = make_workers(raw, samples_per_step=10**6)  # never steps: gradients stay in .grad
    reference = torch.nn.Sequential(*build_layers(config))
    x, y = Batches(config.data, seed=0).batch(0)
    (loss_sum(config.data, reference(x), y)).backward()
    for i in range(2):
        run_microbatch(config, workers, f"mb{i}", x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4])
    swarm_params = [p for w in workers for p in w.module.parameters()]
    for p_ref, p_swarm in zip(reference.parameters(), swarm_params):
        torch.testing.assert_close(p_swarm.grad, p_ref.grad, rtol=0, atol=1e-5)


def test_backward_without_context_or_input_asks_for_the_input():
    config, workers = make_workers(MLP)
    w = workers[1]
    with pytest.raises(ContextMissing):
        w.backward("never-forwarded", torch.zeros(4, 16), None, 4, True, None)


def test_expired_deadline_applies_nothing_and_a_repeat_is_not_applied_twice():
    clock = Clock()
    config, workers = make_workers(MLP, samples_per_step=10**6, clock=clock)
    w = workers[2]
    x = torch.randn(4, 16)
    w.forward("m", x, keep_context=True)
    clock.now = 10.0
    with pytest.raises(DeadlineExpired):
        w.backward("m", torch.ones(4, 1), x, 4, True, deadline=5.0)
    assert w.microbatches_applied == 0 and all(p.grad is None for p in w.params)
    w.backward("m", torch.ones(4, 1), x, 4, True, deadline=20.0)
    grads = [p.grad.clone() for p in w.params]
    w.backward("m", torch.ones(4, 1), x, 4, True, deadline=20.0)  # a retry that reached the same peer
    assert w.microbatches_applied == 1
    for g, p in zip(grads, w.params):
        assert torch.equal(g, p.grad)


def test_old_contexts_are_evicted_and_recomputed_from_the_input():
    clock = Clock()
    config, workers = make_workers(MLP, samples_per_step=10**6, clock=clock)
    w = workers[1]
    x = torch.randn(4, 16)
    w.forward("old", x, keep_context=True)
    clock.now = config.network.context_ttl_s + 1
    w.forward("new", x, keep_context=True)
    assert list(w.contexts) == ["new"]
    with pytest.raises(ContextMissing):
        w.backward("old", torch.ones(4, 16), None, 4, True, None)
    grad_in, _ = w.backward("old", torch.ones(4, 16), x, 4, True, None)
    assert grad_in.shape == x.shape


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 16, dtype=torch.float64), "dtype float64"),
    (torch.zeros(4, 15), "shape [4, 15]"),
    (torch.full((4, 16), float("nan")), "NaN"),
    (torch.zeros(0, 16), "empty batch"),
])
def test_bad_inputs_are_refused_by_name(bad, message):
    config, workers = make_workers(MLP)
    with pytest.raises(StageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        workers[1].forward("m", bad, keep_context=False)


def test_state_round_trips_between_peers_of_a_stage():
    config, workers = make_workers(MLP, samples_per_step=4)
    x, y = Batches(config.data, seed=0).batch(0)
    run_microbatch(config, workers, "m", x[:4], y[:4])
    _, fresh = make_workers(MLP, samples_per_step=4)
    fresh[1].load_state_bytes(workers[1].state_bytes())
    assert fresh[1].version == workers[1].version == 1
    for a, b in zip(fresh[1].module.parameters(), workers[1].module.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(StageError, match="stage 1"):
        fresh[2].load_state_bytes(workers[1].state_bytes())


@pytest.mark.parametrize("delay, slowdown, computed, expected", [
    (0.0, 1.0, 0.2, 0.0),    # nothing emulated
    (0.5, 1.0, 0.2, 0.5),    # the fixed delay only
    (0.0, 4.0, 0.2, 0.6),    # 4x the real compute: 0.8 in all
    (0.5, 4.0, 0.2, 2.6),    # 4x real + emulated: 4 * 0.7 = 2.8 in all, 0.2 of it computed
])
def test_the_slowdown_multiplies_real_and_emulated_compute_time(monkeypatch, delay, slowdown, computed, expected):
    clock = Clock()
    _, workers = make_workers(MLP, clock=clock)
    worker = workers[0]
    worker.compute_delay_s, worker.slowdown = delay, slowdown
    slept = []
    monkeypatch.setattr("swarmrt.pipeline.worker.time.sleep", slept.append)
    clock.now = computed
    worker._delay(0.0)
    assert sum(slept) == pytest.approx(expected)


def test_the_ledger_lists_each_apply_and_marks_when_the_state_leaves_the_peer(tmp_path):
    """What the exactly-once check reads: one line per applied microbatch, and a mark after which
    nothing applied lives outside the process (so it dies with a killed peer)."""
    from swarmrt.pipeline.ledger import read_ledger

    config, workers = make_workers(MLP)
    path = tmp_path / "peer.ledger"
    last = workers[-1]
    worker = StageWorker(last.module, config, last.stage, last.spec, clock=Clock(), ledger_path=str(path))
    x, y = Batches(config.data, seed=0).batch(0)
    h = x[:4]
    for w in workers[:-1]:
        h = w.forward("a", h, keep_context=False)

    def apply(mb):
        out = worker.forward(mb, h, keep_context=True).requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_sum(config.data, out, y[:4]), out)
        worker.backward(mb, grad, None, 4, need_grad_input=False, deadline=None)

    apply("t:0:0:0")
    worker.state_bytes()  # served to a joiner or checkpointed: "t:0:0:0" now lives on elsewhere
    apply("t:0:1:0")
    worker.close()
    assert path.read_text().splitlines() == [f"{last.stage} t:0:0:0", f"{last.stage} -", f"{last.stage} t:0:1:0"]
    assert [(e.microbatch_id, e.shared) for e in read_ledger(path)] == [("t:0:0:0", True), ("t:0:1:0", False)]


def test_a_ledger_is_read_per_stage_and_a_torn_line_is_skipped(tmp_path):
    from swarmrt.pipeline.ledger import read_ledger

    path = tmp_path / "moved.ledger"
    path.write_text("0 t:0:0:0\n0 t:0:1:0\n1 -\n0 -\n1 t:1:0:0\n1 t:1:1:0\n0 t:2:0:0\n1 -\n1")
    assert [(e.stage, e.microbatch_id, e.shared) for e in read_ledger(path)] == [
        (0, "t:0:0:0", True), (0, "t:0:1:0", True), (1, "t:1:0:0", True), (1, "t:1:1:0", True),
        (0, "t:2:0:0", False)]
