"""Reference check through real processes: one peer per stage, no compression, one trainer
with one microbatch per step, equals the unsplit model trained in this process (1e-5)."""

import json

import pytest
import torch

from swarmrt.config import config_from_dict
from swarmrt.data import Batches, loss_sum
from swarmrt.models.build import build_layers
from swarmrt.localswarm.swarm import LocalSwarm

pytestmark = pytest.mark.integration

CASES = {
    "sequential": {"model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 32, "depth": 5},
                             "stages": 3},
                   "data": {"kind": "regression", "features": 8, "batch_size": 8, "microbatch_size": 8}},
    "llama": {"model": {"factory": "swarmrt.models:tiny_llama", "kwargs": {"hidden_size": 32, "layers": 2},
                        "stages": 3},
              "data": {"seq_len": 16, "batch_size": 4, "microbatch_size": 4}},
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(CASES))
def test_swarm_loss_matches_the_unsplit_model(case, tmp_path):
    raw = {**CASES[case], "run": {"id": f"ref-{case}", "seed": 3},
           "optimizer": {"name": "sgd", "lr": 0.05, "samples_per_step": CASES[case]["data"]["batch_size"],
                         "max_grad_norm": float("inf")},  # the unsplit reference does not clip
           "compression": {"activations": "none", "gradients": "none"}}
    config = config_from_dict(raw)
    steps = 6
    with LocalSwarm(config, peers_per_stage=1, workdir=tmp_path) as swarm:
        trainer = swarm.start_trainer(steps)
        swarm.wait_trainer(trainer)
        swarm_losses = [m["loss"] for m in swarm.metrics(trainer)]
    model = torch.nn.Sequential(*build_layers(config))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = Batches(config.data, config.run.seed, stream=0)
    reference = []
    for step in range(steps):
        x, y = batches.batch(step)
        opt.zero_grad()
        loss = loss_sum(config.data, model(x), y) / x.shape[0]
        loss.backward()
        opt.step()
        reference.append(loss.item())
    assert len(swarm_losses) == steps
    assert swarm_losses == pytest.approx(reference, abs=1e-5), json.dumps({"swarm": swarm_losses, "ref": reference})
    assert reference[-1] < reference[0]
