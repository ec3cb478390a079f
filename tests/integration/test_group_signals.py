"""SIGTERM/SIGINT to a role's WHOLE process group (systemd ``KillMode=control-group``, Slurm's
``scancel``, ``tini -g``, Ctrl-C in a terminal): the main process, hivemind's DHT child and
its p2pd all get the signal at once. A peer still drains (nothing lost) and exits 0 within its
``--grace``; a trainer stops after its step; a bootstrap exits at once; nothing of the group
is left behind.

(test_preemption.py signals the main process only, as a container runtime does.)
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from swarmrt.config import config_from_dict
from swarmrt.localswarm.swarm import _wait_for
from swarmrt.roles.proc import descendants, process_table, wait_for_exit
from swarmrt.testing import LocalSwarm, assert_exactly_once

from .conftest import FAST

pytestmark = pytest.mark.integration

GRACE_S = 5.0
MARGIN_S = 3.0
"""Exit within the peer's --grace plus this (interpreter teardown, a loaded 2-core machine)."""

SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]


def live_members(pgid: int) -> list[tuple[int, str]]:
    """Processes of group ``pgid`` that still run (zombies are dead: a reparented p2pd may wait
    a moment for its new parent to reap it)."""
    members = []
    for pid, info in process_table().items():
        if info.state == "Z":
            continue
        try:
            if os.getpgid(pid) == pgid:
                members.append((pid, info.program))
        except ProcessLookupError:
            continue
    return members


def exit_of_group(proc: subprocess.Popen, pgid: int, sig: int, timeout: float) -> tuple[int | None, float]:
    """Send ``sig`` to the whole group, wait (pidfd) for the main process; ``(exit code, seconds)``."""
    started = time.monotonic()
    os.killpg(pgid, sig)
    wait_for_exit([proc.pid], timeout)
    took = time.monotonic() - started
    return proc.poll(), took


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    config = config_from_dict({**FAST, "run": {"id": "groupsig", "seed": 3},
                               "checkpoint": {"location": str(tmp_path_factory.mktemp("ckpt"))}})
    with LocalSwarm(config, peers_per_stage=[1, 1, 1], workdir=tmp_path_factory.mktemp("groupsig")) as s:
        yield s
    assert s.leftover_processes() == []


@pytest.mark.timeout(300)  # includes starting the module swarm
@pytest.mark.parametrize("sig", SIGNALS)
def test_group_signal_drains_a_peer_exits_0_within_grace_and_leaves_nothing(swarm, sig):
    # a second peer of stage 1, so the run goes on without it
    leaving = swarm.add_peer(stage=1, extra_args=["--grace", str(GRACE_S)])
    trainer = swarm.start_trainer(steps=30)
    swarm.wait_for_steps(trainer, 6, timeout=120)
    code, took = exit_of_group(leaving.proc, leaving.pgid, sig, GRACE_S + MARGIN_S)
    left = live_members(leaving.pgid)
    swarm.stop_role(leaving, signal.SIGKILL, timeout=10, group=True)  # reap (a no-op when it worked)
    assert code == 0, f"exit {code} after {took:.1f} s:\n{leaving.tail()}"
    assert took < GRACE_S + MARGIN_S, f"took {took:.1f} s"
    assert left == [], f"left in its process group: {left}"
    assert "left after applying" in leaving.log.read_text()
    summary = swarm.wait_trainer(trainer)
    assert summary["steps"] == 30
    assert_exactly_once(swarm, summary, trainer)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", SIGNALS)
def test_group_signal_stops_a_trainer_after_its_step(swarm, sig):
    trainer = swarm.start_trainer(steps=500)
    _wait_for(lambda: len(swarm.metrics(trainer)) >= 3, 120, "3 steps", [trainer])
    code, took = exit_of_group(trainer.proc, trainer.pgid, sig, 30)
    left = live_members(trainer.pgid)
    swarm.stop_role(trainer, signal.SIGKILL, timeout=10, group=True)
    assert code == 0, f"exit {code} after {took:.1f} s:\n{trainer.tail()}"
    assert left == [], f"left in its process group: {left}"
    summary = swarm.wait_trainer(trainer, timeout=10)
    assert summary["stopped_early"] and summary["next_step"] < 500
    assert summary["duplicates"] == 0 and summary["partially_applied"] == 0


@contextlib.contextmanager
def bootstrap(tmp_path, output: list[str]):
    """A ``swarmrt bootstrap`` in its own session, once its address file is written; its whole group
    is SIGKILLed and reaped on leaving, and what it printed is appended to ``output``."""
    addr = tmp_path / "addr"
    proc = subprocess.Popen([sys.executable, "-m", "swarmrt", "bootstrap", "--addr-file", str(addr),
                             "--join-token", str(tmp_path / "join-token")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(addr.exists, 60, "the bootstrap's address file")
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output.append(proc.communicate(timeout=10)[0].decode(errors="replace"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", SIGNALS)
def test_group_signal_stops_a_bootstrap_at_once(tmp_path, sig):
    output: list[str] = []
    with bootstrap(tmp_path, output) as proc:
        code, took = exit_of_group(proc, proc.pid, sig, 10)
        left = live_members(proc.pid)
    out = output[0]
    assert code == 0, f"exit {code} after {took:.1f} s:\n{out[-3000:]}"
    assert took < 5, f"took {took:.1f} s"
    assert left == [], f"left in its process group: {left}"


@pytest.mark.timeout(120)
def test_sigkill_of_the_main_process_alone_takes_its_dht_node_and_p2pd_with_it(tmp_path):
    """``kill -9 PID`` (not the group): the main process runs no cleanup, yet the DHT node it forked
    (which blocks SIGTERM) and that node's p2pd must not outlive it."""
    with bootstrap(tmp_path, []) as proc:
        below = descendants(proc.pid, live_only=True)
        table = process_table()
        programs = sorted(table[pid].program for pid in below if pid in table)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        left = wait_for_exit(below, 15.0)
    assert len(below) >= 2 and "p2pd" in programs, f"expected the DHT node and its p2pd below it: {programs}"
    assert left == [], f"still running after the main process was SIGKILLed: {left}"
