"""The pytest plugin as a user meets it: run a user's test file in a separate pytest process.

Processes are counted through /proc by a marker variable this test puts in the
inner pytest's environment: every process the inner run starts (roles, DHT
children, p2pd) inherits it, and nothing else on the machine has it.
"""

import os
import pathlib
import signal
import time
import uuid

import pytest

import swarmrt
from swarmrt.roles.proc import processes_with_env, wait_for_exit

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.integration

MARK = "SWARMRT_PLUGIN_TEST"

USER_TESTS = '''
import json, os, pathlib, signal, time
import pytest
from swarmrt.roles.proc import processes_with_env

CONFIG = {"run": {"id": "plugin", "seed": 0},
          "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 16, "depth": 2},
                    "stages": 1},
          "data": {"kind": "regression", "features": 8, "batch_size": 4, "microbatch_size": 4},
          "network": {"heartbeat_s": 0.5, "record_ttl_s": 2.0}}

def write_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(CONFIG))  # JSON is valid YAML
    return path

def count(name):
    n = len(processes_with_env("{mark}", os.environ["{mark}"]))
    pathlib.Path(os.environ["{mark}_DIR"], name).write_text(str(n))

def test_users_assertion_fails_inside_the_fixture(local_swarm, tmp_path):
    swarm = local_swarm(write_config(tmp_path), peers_per_stage=1)
    count("assertion.during")
    assert swarm.peers() == [], "the user's assertion"

def test_user_test_times_out(local_swarm, tmp_path):
    count("timeout.before")  # the previous test's swarm is gone
    local_swarm(write_config(tmp_path), peers_per_stage=1)
    count("timeout.during")
    signal.setitimer(signal.ITIMER_REAL, 0.2)  # pytest-timeout's alarm, armed at 120 s, goes off now
    while True:  # a test stuck waiting for something that never comes
        signal.pause()
test_user_test_times_out = pytest.mark.timeout(120, method="signal")(test_user_test_times_out)

def test_test_process_is_killed_outright(local_swarm, tmp_path):
    count("kill.before")
    local_swarm(write_config(tmp_path), peers_per_stage=1)
    count("kill.during")
    os.kill(os.getpid(), signal.SIGKILL)  # what pytest-timeout's thread method or a CI runner does
'''


def wait_until_gone(marker, timeout=30.0):
    """The marked processes still running after waiting up to ``timeout`` s for them to exit
    (looked up again after each wait, in case one had started a child in the meantime)."""
    deadline = time.monotonic() + timeout
    while (left := processes_with_env(MARK, marker)) and time.monotonic() < deadline:
        wait_for_exit(left, deadline - time.monotonic())
    return processes_with_env(MARK, marker)


@pytest.fixture
def user_env(monkeypatch):
    """The inner pytest runs in another directory: it must import this checkout's swarmrt."""
    root = pathlib.Path(swarmrt.__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.timeout(240)
def test_fixture_reaps_every_process_when_the_users_test_fails_times_out_or_is_killed(pytester, monkeypatch,
                                                                                     tmp_path, user_env):
    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARK, marker)
    monkeypatch.setenv(MARK + "_DIR", str(tmp_path))
    pytester.makepyfile(test_user=USER_TESTS.replace("{mark}", MARK))
    assert processes_with_env(MARK, marker) == []
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-k", "not killed")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*AssertionError: the user's assertion*", "*Timeout (>120.0s)*"])
    killed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-k", "killed")
    assert killed.ret == -signal.SIGKILL
    counts = {p.name: int(p.read_text()) for p in tmp_path.iterdir()}
    # a bootstrap and a peer, each with its DHT child and p2pd, were really running
    assert min(counts["assertion.during"], counts["timeout.during"], counts["kill.during"]) >= 4, counts
    assert counts["timeout.before"] == 0, counts  # the failed test's teardown reaped its swarm
    assert counts["kill.before"] == 0, counts  # and so did the timed-out one's
    # the inner pytest died by SIGKILL: no teardown ran, only the reaper was left to clean up
    assert wait_until_gone(marker) == [], "processes of the killed test run were left behind"


@pytest.mark.timeout(60)
def test_a_planned_fault_that_never_fires_fails_the_test(pytester, user_env):
    pytester.makepyfile(test_plans='''
from swarmrt.testing import Peer
from swarmrt.localswarm.faults import FaultInjector

class NoSwarm:
    def peer_names(self, stage, alive): return ["p0", "p1"]
    def fire(self, fault, targets): return "done"
    def end(self, fault): return ""
    def effects(self): return {}

def test_fault_never_fires(fault_plan):
    plan = fault_plan(seed=3)
    plan.crash(Peer(1, 0), at_step=5)
    injector = FaultInjector(plan, NoSwarm())
    for step in range(3):  # the run ends before step 5
        injector.tick(step, float(step))

def test_fault_fires(fault_plan):
    plan = fault_plan(seed=3)
    plan.crash(Peer(1, 0), at_step=2)
    injector = FaultInjector(plan, NoSwarm())
    for step in range(3):
        injector.tick(step, float(step))
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*UnfiredFaults: 1 of 1 planned fault(s) never fired (seed 3)*",
                                 "*f1: crash (SIGKILL) peer 0 of stage 1 at step 5: NOT FIRED*",
                                 "FAILED test_plans.py::test_fault_never_fires*"])
