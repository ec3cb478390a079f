"""`swarmrt demo --chaos` end to end: it kills, hangs and preempts peers, replaces them, and says so."""

import os
import subprocess
import sys
import uuid

import pytest

from swarmrt.roles.proc import processes_with_env

pytestmark = pytest.mark.integration

CONFIG = """
[run]
id = "chaos"
[model]
factory = "swarmrt.models:tiny_llama"
kwargs = { hidden_size = 32, layers = 4, heads = 4 }
stages = 2
[data]
seq_len = 32
batch_size = 8
microbatch_size = 4
[optimizer]
lr = 3e-3
samples_per_step = 8
"""


@pytest.mark.timeout(420)
def test_demo_chaos_reports_each_fault_and_the_runs_response(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    marker = uuid.uuid4().hex
    env = {**os.environ, "SWARMRT_DEMO_TEST": marker,
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    # seed 34 plans: hang stage 0 at step 4, preempt stage 0 at step 5 (+ replacement), crash stage 1 at step 12
    # (+ replacement); none of them has to wait for a replacement to find a healthy victim
    result = subprocess.run([sys.executable, "-m", "swarmrt", "demo", "--chaos", "--config", str(tmp_path / "run.toml"),
                             "--stages", "2", "--peers-per-stage", "2", "--steps", "24", "--seed", "34",
                             "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, env=env, timeout=400)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    story = out.split("what happened, and what the run did about it", 1)[1]
    lines = {line.split()[2]: line for line in story.splitlines() if line.strip().startswith("step")}
    assert "SIGSTOP" in lines["f1"] and "resumed after" in lines["f1"], story
    assert "SIGTERM" in lines["f2"] and "exited with code 0 after applying" in lines["f2"], story
    assert "SIGKILL" in lines["f4"], story
    assert "serves stage 0: loaded state (version" in lines["f3"], story
    assert "serves stage 1: loaded state (version" in lines["f5"], story
    assert "every microbatch applied exactly once on every stage" in story
    assert "did not happen" not in story and "processes left behind: 0" in story
    assert processes_with_env("SWARMRT_DEMO_TEST", marker) == []
