"""A stage peer holds its share of the model, not the whole model: peak RSS measured from /proc.

Each probe is a fresh Python process that builds a stage worker exactly as ``swarmrt peer`` does
(:func:`swarmrt.roles.peer.build_stage_worker`) and reports its ``VmHWM`` (peak resident set).
The big config is a ~537 MB (fp32) Llama cut into 4 stages; the baseline is the same runtime with
a tiny Llama, so the difference is what the big model's stage costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from swarmrt.config import config_from_dict
from swarmrt.models.build import shape_layers, stage_ranges

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROBE = """
import json, sys
from swarmrt.config import config_from_dict
from swarmrt.roles.peer import PeerOptions, build_stage_worker
worker, layers, _ = build_stage_worker(config_from_dict(json.loads(sys.argv[1])), int(sys.argv[2]),
                                       PeerOptions(initial_peers=()))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"hwm": int(status["VmHWM"].split()[0]) * 1024,
                  "params": sum(p.numel() for p in worker.module.parameters())}))
"""

BIG = {"model": {"factory": "swarmrt.models:tiny_llama", "kwargs": {"hidden_size": 1024, "layers": 8, "heads": 16},
                 "stages": 4}}
TINY = {"model": {"factory": "swarmrt.models:tiny_llama", "kwargs": {"hidden_size": 32, "layers": 4}, "stages": 4}}


def probe(raw: dict, stage: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(raw), str(stage)], env=env, capture_output=True,
                         text=True, timeout=150, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_stage_peer_holds_its_share_of_the_model_not_all_of_it():
    config = config_from_dict(BIG)
    layers = shape_layers(config)
    whole = sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
    start, end = stage_ranges(config, layers)[1]
    share = sum(p.numel() * p.element_size() for layer in layers[start:end] for p in layer.parameters())
    assert whole > 400e6 and share < 0.3 * whole
    big, tiny = probe(BIG, 1), probe(TINY, 1)
    assert big["params"] * 4 == share  # the stage really holds its layers, materialized
    above = big["hwm"] - tiny["hwm"]
    detail = (f"peak RSS {big['hwm'] / 2**20:.0f} MiB vs tiny-model peer {tiny['hwm'] / 2**20:.0f} MiB: "
              f"{above / 2**20:.0f} MiB above it; the stage's share is {share / 2**20:.0f} MiB "
              f"of a {whole / 2**20:.0f} MiB model")
    assert above < 0.5 * whole, detail
    assert above >= 0.8 * share, detail  # the probe measures something: the stage's weights are in the peak
