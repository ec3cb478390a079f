"""Streaming DiLoCo (fragments, sync_delay, alpha): trajectories worked out by hand, and the same
runs against a straight-line restatement of torchft's DiLoCo schedule (``torchft/local_sgd.py``:
``sync_every``, ``fragment_sync_delay``, ``fragment_update_alpha``)."""

import pytest
import torch

from swarmrt.config import ConfigError, config_from_dict
from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.diloco import DiLoCo, fragment_bounds

pytestmark = pytest.mark.timeout(60)


def drive(diloco, steps, move):
    """One peer, inner SGD lr 1 with a fixed gradient per tensor (``move`` per step), each round's
    average being its own pseudo-gradient; returns (globals, locals) after every applied round."""
    trajectory = []
    for _ in range(steps):
        with torch.no_grad():
            for param, delta in zip(diloco.params, move):
                param.sub_(delta)
        if diloco.record_inner_step():
            pending = diloco.start_round()
        if diloco.apply_due:
            diloco.apply(pending)
            trajectory.append(([g.item() for g in diloco.global_params], [p.item() for p in diloco.params]))
    return trajectory


def scalars(*values):
    return [torch.nn.Parameter(torch.tensor([v])) for v in values]


def test_two_fragments_take_turns_by_hand():
    # a and b start at 1 and move by -2 per inner step; H = 4, F = 2: a fragment every 2 steps;
    # outer SGD lr 2, no momentum: global -= 2 x pseudo-gradient; alpha 0: local := global
    # step 2, fragment 0 (a): a = -3, delta 4, global a = 1 - 8 = -7, a = -7; b = -3 untouched
    # step 4, fragment 1 (b): b = -7, delta 8, global b = 1 - 16 = -15, b = -15; a = -11
    # step 6, fragment 0: a = -15, delta -7 + 15 = 8, global a = -23, a = -23; b = -19
    # step 8, fragment 1: b = -23, delta -15 + 23 = 8, global b = -31, b = -31; a = -27
    config = LocalSGDSection(inner_steps=4, fragments=2, outer_lr=2.0, outer_momentum=0.0)
    diloco = DiLoCo(scalars(1.0, 1.0), config)
    assert diloco.fragments == [(0, 1), (1, 2)]
    assert drive(diloco, 8, [2.0, 2.0]) == [
        ([-7.0, 1.0], [-7.0, -3.0]),
        ([-7.0, -15.0], [-11.0, -15.0]),
        ([-23.0, -15.0], [-23.0, -19.0]),
        ([-23.0, -31.0], [-27.0, -31.0]),
    ]
    assert diloco.round == 4 and diloco.fragment == 0


def test_sync_delay_and_alpha_by_hand():
    # w starts at 1 and moves by -2 per step; H = 4, tau = 1: the pseudo-gradient is taken at
    # step 3 of each window, the outer step (lr 2) applied at step 4 with local := lerp(global, local, 0.5)
    # window 1: step 3 w = -5, delta 6; step 4 w = -7; global 1 - 12 = -11; w = (-11 - 7) / 2 = -9
    # window 2: step 7 w = -15, delta -11 + 15 = 4; step 8 w = -17; global -19; w = -18
    # window 3: step 11 w = -24, delta 5; step 12 w = -26; global -29; w = -27.5
    config = LocalSGDSection(inner_steps=4, sync_delay=1, alpha=0.5, outer_lr=2.0, outer_momentum=0.0)
    assert drive(DiLoCo(scalars(1.0), config), 12, [2.0]) == [
        ([-11.0], [-9.0]), ([-19.0], [-18.0]), ([-29.0], [-27.5])]
    # alpha 0 drops the tau steps trained while the sync ran: window 2 starts from the global -11
    # step 7 w = -17, delta 6; step 8 w = -19; global -11 - 12 = -23; w = -23
    alpha0 = LocalSGDSection(inner_steps=4, sync_delay=1, alpha=0.0, outer_lr=2.0, outer_momentum=0.0)
    assert drive(DiLoCo(scalars(1.0), alpha0), 8, [2.0]) == [([-11.0], [-11.0]), ([-23.0], [-23.0])]
    # alpha 1 keeps local: the outer step only moves the global copy
    alpha1 = LocalSGDSection(inner_steps=4, sync_delay=1, alpha=1.0, outer_lr=2.0, outer_momentum=0.0)
    assert drive(DiLoCo(scalars(1.0), alpha1), 4, [2.0]) == [([-11.0], [-7.0])]


def test_fragments_delay_alpha_and_nesterov_by_hand():
    # a, b start at 0 and move by -1 per step; H = 4, F = 2 (period 2), tau = 1, alpha 0.5,
    # outer lr 1 and Nesterov momentum 0.5 (step = g + 0.5 buf, buf = 0.5 buf + g; buf = g at first)
    # step 1: fragment 0 starts, a = -1, delta 1; step 2: a = -2; buf 1, step 1.5: global a = -1.5;
    #         a = lerp(-1.5, -2, 0.5) = -1.75; b = -2
    # step 3: fragment 1 starts, b = -3, delta 3; step 4: b = -4; buf 3, step 4.5: global b = -4.5;
    #         b = -4.25; a = -3.75
    # step 5: fragment 0 starts, a = -4.75, delta -1.5 + 4.75 = 3.25; step 6: a = -5.75;
    #         buf 0.5 + 3.25 = 3.75, step 3.25 + 1.875 = 5.125: global a = -6.625; a = -6.1875; b = -6.25
    config = LocalSGDSection(inner_steps=4, fragments=2, sync_delay=1, alpha=0.5, outer_lr=1.0, outer_momentum=0.5)
    assert drive(DiLoCo(scalars(0.0, 0.0), config), 6, [1.0, 1.0]) == [
        ([-1.5, 0.0], [-1.75, -2.0]),
        ([-1.5, -4.5], [-3.75, -4.25]),
        ([-6.625, -4.5], [-6.1875, -6.25]),
    ]


def test_rollback_retries_the_same_fragment_after_a_window():
    config = LocalSGDSection(inner_steps=4, fragments=2, outer_lr=1.0, outer_momentum=0.0)
    diloco = DiLoCo(scalars(1.0, 1.0), config)
    for _ in range(2):
        diloco.record_inner_step()
    assert diloco.fragment == 0 and diloco.start_round()[0].tolist() == [0.0]
    with pytest.raises(RuntimeError, match="round of fragment 0 is still open"):
        diloco.start_round()
    diloco.rollback()
    assert diloco.fragment == 0 and not diloco.round_due and diloco.failed_rounds == 1
    assert [diloco.record_inner_step() for _ in range(2)] == [False, True]
    assert diloco.fragment == 0


def test_fragment_bounds_balance_sizes_and_keep_every_fragment_non_empty():
    assert fragment_bounds([4, 4, 4, 4], 2) == [(0, 2), (2, 4)]
    assert fragment_bounds([10, 1, 1, 1, 1, 10], 2) == [(0, 3), (3, 6)]
    assert fragment_bounds([100, 1, 1], 3) == [(0, 1), (1, 2), (2, 3)]  # one tensor each at least
    assert fragment_bounds([5], 1) == [(0, 1)]
    with pytest.raises(ValueError, match="fragments is 3, but the stage has 2 parameter tensors"):
        fragment_bounds([1, 1], 3)


@pytest.mark.parametrize("kwargs, field, message", [
    ({"inner_steps": 6, "fragments": 4}, "fragments", "must divide local_sgd.inner_steps"),
    ({"fragments": 0}, "fragments", "integer >= 1"),
    ({"inner_steps": 6, "fragments": 2, "sync_delay": 3}, "sync_delay", r"below .* \(3\)"),
    ({"sync_delay": -1}, "sync_delay", "integer >= 0"),
    ({"alpha": 1.5}, "alpha", r"in \[0, 1\]"),
    ({"alpha": float("nan")}, "alpha", r"in \[0, 1\]"),
])
def test_config_refuses_bad_streaming_knobs(kwargs, field, message):
    with pytest.raises(ValueError, match=rf"local_sgd\.{field}: .*{message}"):
        LocalSGDSection(**kwargs)
    with pytest.raises(ConfigError, match=rf"local_sgd\.{field}"):
        config_from_dict({"local_sgd": kwargs})
    assert config_from_dict({"local_sgd": {"inner_steps": 6, "fragments": 3, "sync_delay": 1, "alpha": 0.5}}).local_sgd.sync_period == 2


def test_state_carries_the_momentum_of_the_fragments_synced_so_far():
    config = LocalSGDSection(inner_steps=2, fragments=2)
    veteran = DiLoCo(scalars(1.0, 2.0), config)
    veteran.record_inner_step()
    veteran.start_round()
    veteran.apply([torch.tensor([0.5])])  # fragment 0 has a momentum buffer, fragment 1 not yet
    metadata, tensors = veteran.export_state()
    assert metadata["momentum_params"] == [0] and len(tensors) == 3 and metadata["fragments"] == 2
    joiner = DiLoCo(scalars(0.0, 0.0), config)
    joiner.import_state(metadata, tensors)
    assert joiner.params_hash() == veteran.params_hash() and joiner.round == 1 and joiner.fragment == 1
    with pytest.raises(ValueError, match="has 2 fragments, this replica uses 1"):
        DiLoCo(scalars(0.0, 0.0), LocalSGDSection(inner_steps=2)).import_state(metadata, tensors)
    with pytest.raises(ValueError, match="momentum_params must list distinct param indices below 2"):
        joiner.import_state({**metadata, "momentum_params": [5]}, tensors)


# ------------------------------------------------------------------------------------ torchft, restated


def torchft_reference(models, inner, data, config, bounds, steps):
    """torchft's DiLoCo step hook, restated: each fragment keeps its ``original`` (global) params;
    at ``local_step == sync_every - delay`` the current fragment (``commits % F``) takes
    ``original - local`` and all-reduces it (here: the mean over replicas); at ``local_step ==
    sync_every`` each replica saves its local params, restores the original ones, steps its outer
    optimizer with the average, saves the result as original and lerps towards the saved local
    params by alpha; ``local_step`` restarts. Returns every replica's params after each step."""
    period, delay, alpha = config.inner_steps // len(bounds), config.sync_delay, config.alpha
    original = [[p.detach().clone() for p in m.parameters()] for m in models]
    outer = [[torch.optim.SGD(list(m.parameters())[start:end], lr=config.outer_lr, momentum=config.outer_momentum,
                              nesterov=config.uses_nesterov) for start, end in bounds] for m in models]  # one per fragment
    local_step, commits, averaged, trace = 0, 0, None, []
    for step in range(steps):
        for model, opt, (x, y) in zip(models, inner, data[step]):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        local_step += 1
        fragment = commits % len(bounds)
        start, end = bounds[fragment]
        with torch.no_grad():
            if local_step == period - delay:
                grads = [[o - p for o, p in zip(orig[start:end], list(m.parameters())[start:end])]
                         for orig, m in zip(original, models)]
                averaged = [torch.stack(parts).mean(0) for parts in zip(*grads)]
            if local_step == period:
                for model, orig, opts in zip(models, original, outer):
                    params = list(model.parameters())[start:end]
                    saved = [p.detach().clone() for p in params]
                    for p, o, g in zip(params, orig[start:end], averaged):
                        p.copy_(o)
                        p.grad = g.clone()
                    opts[fragment].step()
                    for index, p in enumerate(params):
                        orig[start + index].copy_(p)
                    for p, s in zip(params, saved):
                        p.lerp_(s, alpha)
                    opts[fragment].zero_grad(set_to_none=True)
                commits += 1
                local_step = 0
        trace.append([[p.detach().clone() for p in m.parameters()] for m in models])
    return trace


def swarmrt_run(models, inner, data, config, steps):
    """The same replicas under swarmrt's DiLoCo, as the runtime drives it (record, start, apply)."""
    dilocos = [DiLoCo(list(m.parameters()), config) for m in models]
    averaged, trace = None, []
    for step in range(steps):
        for model, opt, (x, y) in zip(models, inner, data[step]):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        due = [d.record_inner_step() for d in dilocos]
        if any(due):
            assert all(due)
            averaged = [torch.stack(parts).mean(0) for parts in zip(*[d.start_round() for d in dilocos])]
        if dilocos[0].apply_due:
            for d in dilocos:
                d.apply([a.clone() for a in averaged])
        trace.append([[p.detach().clone() for p in m.parameters()] for m in models])
    return trace, dilocos


def replicas(seed, count=2, steps=36):
    models, inner = [], []
    for _ in range(count):
        torch.manual_seed(seed)  # same init on every replica
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        models.append(model)
        inner.append(torch.optim.AdamW(model.parameters(), lr=1e-2))
    gen = torch.Generator().manual_seed(seed + 1)
    data = [[(torch.randn(3, 4, generator=gen), torch.randn(3, 2, generator=gen)) for _ in range(count)]
            for _ in range(steps)]
    return models, inner, data


@pytest.mark.parametrize("fragments, delay, alpha, momentum", [
    (1, 0, 0.0, 0.9), (2, 0, 0.0, 0.9), (2, 2, 0.5, 0.9), (3, 1, 0.0, 0.0), (3, 1, 1.0, 0.9), (4, 0, 0.25, 0.5),
])
def test_matches_torchft_step_for_step(fragments, delay, alpha, momentum):
    H, steps = 12 if fragments != 4 else 8, 36
    config = LocalSGDSection(inner_steps=H, fragments=fragments, sync_delay=delay, alpha=alpha,
                             outer_lr=0.7, outer_momentum=momentum)
    ours, dilocos = swarmrt_run(*replicas(seed=3), config, steps)
    models, inner, data = replicas(seed=3)
    theirs = torchft_reference(models, inner, data, config, dilocos[0].fragments, steps)
    assert dilocos[0].round == steps // (H // fragments)  # every window ended in an applied sync
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for replica_a, replica_b in zip(a, b):
            for x, y in zip(replica_a, replica_b):
                assert torch.allclose(x, y, rtol=0, atol=1e-6), f"step {step + 1} differs"
