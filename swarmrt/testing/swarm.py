"""A local swarm of real processes on 127.0.0.1: bootstrap, stage peers and trainers.

Every role runs as ``python -m swarmrt ROLE`` in its own process session, so
stopping a role (or killing it to emulate a dead machine) takes its hivemind
DHT child and p2pd with it: no ghost peers. ``LocalSwarm`` is a context
manager; leaving it, by success, failure or timeout, reaps every process it
started and checks that none is left.

    with LocalSwarm(config, peers_per_stage=2) as swarm:
        result = swarm.train(steps=50)
        assert result["final_loss"] < result["first_loss"]
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from swarmrt.core.config import RunConfig, load_config


class SwarmError(RuntimeError):
    """A role of the local swarm failed to start or exited badly; the message quotes its log."""


def _alive_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True


@dataclasses.dataclass
class Role:
    """One process of the swarm."""

    name: str
    proc: subprocess.Popen
    log: pathlib.Path
    stage: int | None = None
    address: str | None = None
    peer_id: str | None = None
    ledger: pathlib.Path | None = None
    stragglers: bool = False
    """Set by LocalSwarm.stop_role: some of its processes outlived the main one and had to be killed."""

    @property
    def pgid(self) -> int:
        return self.proc.pid  # session leader: its group id is its pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Deliver ``sig`` the way the real world does.

        SIGTERM and SIGINT (a preemption notice, Ctrl-C) go to the role's main process
        only, as a container runtime delivers them, so it can drain and shut its DHT
        down in order. Everything else (SIGKILL: the machine is gone; SIGSTOP/SIGCONT:
        it hangs) hits the whole process group, hivemind's DHT child and p2pd included.
        """
        try:
            if sig in (signal.SIGTERM, signal.SIGINT):
                os.kill(self.proc.pid, sig)
            else:
                os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _wait_for(predicate, timeout: float, what: str, roles: Sequence[Role] = (), poll: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for role in roles:
            if not role.alive():
                raise SwarmError(f"{role.name} exited with code {role.proc.returncode} while waiting for {what}:\n"
                                 f"{role.tail()}")
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {r.name}\n{r.tail(10)}" for r in roles)
            raise SwarmError(f"timed out after {timeout:g} s waiting for {what}\n{detail}")
        time.sleep(poll)


class LocalSwarm:
    """Bootstrap + ``peers_per_stage`` peers per stage as real processes on 127.0.0.1."""

    def __init__(self, config: RunConfig | str | os.PathLike, peers_per_stage: int | Sequence[int] = 2,
                 workdir: str | os.PathLike | None = None, start_timeout: float = 120.0,
                 peer_args: dict[int, Sequence[str]] | None = None, env: dict[str, str] | None = None):
        self.config = config if isinstance(config, RunConfig) else load_config(config)
        counts = [peers_per_stage] * self.config.num_stages if isinstance(peers_per_stage, int) else list(peers_per_stage)
        if len(counts) != self.config.num_stages:
            raise ValueError(f"peers_per_stage has {len(counts)} entries for {self.config.num_stages} stages")
        self.counts = counts
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="swarmrt-")
        self.workdir = pathlib.Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.peer_args = peer_args or {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.config_path = self.workdir / "run.yaml"
        self.config_path.write_text(json.dumps(self.config.to_dict(), indent=1))  # JSON is valid YAML
        self.roles: list[Role] = []
        self.maddr: str | None = None
        self._counter = 0
        atexit.register(self.stop)

    # -- starting ----------------------------------------------------------------------------
    def _spawn(self, name: str, args: Sequence[str]) -> Role:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "swarmrt", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
        role = Role(name, proc, log)
        self.roles.append(role)
        return role

    def start(self) -> "LocalSwarm":
        addr_file = self.workdir / "bootstrap.addr"
        boot = self._spawn("bootstrap", ["bootstrap", "--addr-file", str(addr_file)])
        self.maddr = _wait_for(lambda: addr_file.exists() and addr_file.read_text().split()[0],
                               self.start_timeout, "the bootstrap address", [boot])
        pending = [self.add_peer(stage, wait=False) for stage, n in enumerate(self.counts) for _ in range(n)]
        for role in pending:
            self.wait_ready(role)
        return self

    def add_peer(self, stage: int | None = None, wait: bool = True, extra_args: Sequence[str] = ()) -> Role:
        """Start one more stage peer (``stage=None``: it picks the stage with the least capacity)."""
        self._counter += 1
        name = f"peer{self._counter}" + (f"-s{stage}" if stage is not None else "")
        ready = self.workdir / f"{name}.ready"
        ledger = self.workdir / f"{name}.ledger"
        args = ["peer", "--config", str(self.config_path), "--initial-peers", self.maddr, "--ready-file", str(ready),
                "--ledger", str(ledger)]
        if stage is not None:
            args += ["--stage", str(stage)]
        args += list(self.peer_args.get(stage, ())) + list(extra_args)
        role = self._spawn(name, args)
        role.stage, role.ledger = stage, ledger
        if wait:
            self.wait_ready(role)
        return role

    def wait_ready(self, role: Role, timeout: float | None = None) -> Role:
        ready = self.workdir / f"{role.name}.ready"
        text = _wait_for(lambda: ready.exists() and ready.read_text(), timeout or self.start_timeout,
                         f"{role.name} to serve", [role])
        stage, address, peer_id = text.split()
        role.stage, role.address, role.peer_id = int(stage), address, peer_id
        return role

    # -- training ----------------------------------------------------------------------------
    def start_trainer(self, steps: int, extra_args: Sequence[str] = (), name: str | None = None) -> Role:
        self._counter += 1
        name = name or f"trainer{self._counter}"
        args = ["train", "--config", str(self.config_path), "--initial-peers", self.maddr, "--steps", str(steps),
                "--metrics-file", str(self.workdir / f"{name}.metrics.jsonl"),
                "--summary-file", str(self.workdir / f"{name}.summary.json"), *extra_args]
        return self._spawn(name, args)

    def wait_trainer(self, role: Role, timeout: float = 600.0) -> dict:
        try:
            code = role.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SwarmError(f"{role.name} did not finish in {timeout:g} s:\n{role.tail()}") from None
        if code != 0:
            raise SwarmError(f"{role.name} exited with code {code}:\n{role.tail()}")
        return json.loads((self.workdir / f"{role.name}.summary.json").read_text())

    def train(self, steps: int, timeout: float = 600.0, extra_args: Sequence[str] = ()) -> dict:
        return self.wait_trainer(self.start_trainer(steps, extra_args), timeout)

    def evaluate(self, stages: Sequence[int] | None = None, batches: int = 2, timeout: float = 300.0) -> dict:
        """Run ``swarmrt eval`` (held-out loss and perplexity through ``stages``, default all) and return its JSON."""
        self._counter += 1
        name = f"eval{self._counter}"
        args = ["eval", "--config", str(self.config_path), "--initial-peers", self.maddr, "--batches", str(batches),
                "--summary-file", str(self.workdir / f"{name}.summary.json")]
        if stages is not None:
            args += ["--stages", ",".join(map(str, stages))]
        return self.wait_trainer(self._spawn(name, args), timeout)

    def metrics(self, role: Role) -> list[dict]:
        path = self.workdir / f"{role.name}.metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- inspecting --------------------------------------------------------------------------
    def peers(self, stage: int | None = None, alive: bool = True) -> list[Role]:
        return [r for r in self.roles if r.name.startswith("peer") and (stage is None or r.stage == stage)
                and (not alive or r.alive())]

    def ledger(self, stage: int) -> list[str]:
        """Microbatch ids applied by every peer (dead ones included) that ever served ``stage``."""
        ids: list[str] = []
        for role in self.peers(stage, alive=False):
            if role.ledger is not None and role.ledger.exists():
                ids += [line for line in role.ledger.read_text().splitlines() if line]
        return ids

    # -- stopping ----------------------------------------------------------------------------
    def stop_role(self, role: Role, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal a role, wait for it, and make sure its whole process group is gone."""
        role.signal(sig)
        try:
            role.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            role.signal(signal.SIGKILL)
            role.proc.wait(timeout=10)
        # children (DHT process, p2pd) get a few seconds to finish on their own ...
        deadline = time.monotonic() + 5
        while _alive_group(role.pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        role.stragglers = _alive_group(role.pgid)
        # ... then whatever is left is killed
        deadline = time.monotonic() + 10
        while _alive_group(role.pgid) and time.monotonic() < deadline:
            role.signal(signal.SIGKILL)
            time.sleep(0.05)
        return role.proc.returncode

    def stop(self) -> None:
        """Stop every role (SIGTERM, then SIGKILL for stragglers) and reap every process group."""
        for role in self.roles:
            if role.alive():
                role.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for role in self.roles:
            try:
                role.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for role in self.roles:
            while _alive_group(role.pgid):
                role.signal(signal.SIGKILL)
                try:
                    role.proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
                if not _alive_group(role.pgid):
                    break
                time.sleep(0.05)
        atexit.unregister(self.stop)

    def leftover_processes(self) -> list[int]:
        """Process groups of this swarm that are still alive (should be empty after stop)."""
        return [r.pgid for r in self.roles if _alive_group(r.pgid)]

    def __enter__(self) -> "LocalSwarm":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
