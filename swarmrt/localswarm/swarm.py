"""A local swarm of real processes on 127.0.0.1: bootstrap, stage peers and trainers.

Every role runs as ``python -m swarmrt ROLE`` in its own process session, so
stopping a role (or killing it to emulate a dead machine) takes its hivemind
DHT child and p2pd with it: no ghost peers. ``LocalSwarm`` is a context
manager; leaving it, by success, failure or timeout, reaps every process it
started and checks that none is left.

    with LocalSwarm(config, peers_per_stage=2) as swarm:
        result = swarm.train(steps=50)
        assert result["final_loss"] < result["first_loss"]

Faults and networks (see docs/testing.md): every peer and trainer gets a
rules file (``swarmrt.wire.emulation``) naming it, so links can be slowed and
RPCs dropped while it runs; :func:`swarmrt.localswarm.inject.run_with_faults` fires a
:class:`~swarmrt.localswarm.faults.FaultPlan` against a training run, and
:func:`swarmrt.localswarm.ledger.check_exactly_once` checks its ledgers
(``swarmrt.testing.LocalSwarm`` has both as methods). Every
child carries ``SWARMRT_SWARM_ID`` in its environment, and a small reaper
process kills them all if the owner dies without stopping the swarm (SIGKILL,
pytest-timeout's ``os._exit``).
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
import uuid
from typing import Any, Callable, Mapping, Sequence

from swarmrt.auth.credential import ENV_VAR as TOKEN_VAR
from swarmrt.config import RunConfig, load_config
from swarmrt.pipeline.ledger import LedgerEntry, read_ledger
from swarmrt.roles.proc import TAG_VAR, tagged_processes


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
    rules: pathlib.Path | None = None
    """Its net rules file (emulated links, RPC faults); see :meth:`LocalSwarm.update_rules`."""
    trainer_id: str | None = None
    """A trainer's microbatch id prefix (``TRAINER:step:index:attempt`` in the ledgers)."""

    @property
    def pgid(self) -> int:
        return self.proc.pid  # session leader: its group id is its pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int, group: bool = False) -> None:
        """Deliver ``sig`` the way the real world does.

        SIGTERM and SIGINT (a preemption notice, Ctrl-C) go to the role's main process
        only, as a container runtime delivers them, so it can drain and shut its DHT
        down in order; ``group=True`` sends them to the whole process group instead, as
        systemd (``KillMode=control-group``), Slurm's ``scancel``, ``tini -g`` and a
        terminal's Ctrl-C do. Everything else (SIGKILL: the machine is gone; SIGSTOP/SIGCONT:
        it hangs) hits the whole process group, hivemind's DHT child and p2pd included.
        """
        try:
            if sig in (signal.SIGTERM, signal.SIGINT) and not group:
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


def _write_rules(path: pathlib.Path, rules: Mapping[str, Any]) -> None:
    from swarmrt.wire.emulation import write_rules  # grpc: only when a swarm is really built

    write_rules(path, rules)


class LocalSwarm:
    """Bootstrap + ``peers_per_stage`` peers per stage as real processes on 127.0.0.1."""

    def __init__(self, config: RunConfig | str | os.PathLike, peers_per_stage: int | Sequence[int] = 2,
                 workdir: str | os.PathLike | None = None, start_timeout: float = 120.0,
                 peer_args: dict[int, Sequence[str]] | None = None, env: dict[str, str] | None = None,
                 launcher: Callable[[str], Sequence[str]] | None = None, bootstrap_args: Sequence[str] = ()):
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
        self.launcher = launcher
        """``launcher(role name)``: argv prefix for that role, e.g. ``ip netns exec NS`` (it must exec, not fork)."""
        self.bootstrap_args = list(bootstrap_args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.config_path = self.workdir / "run.json"
        self.config_path.write_text(json.dumps(self.config.to_dict(), indent=1))  # JSON: keeps inf
        self.roles: list[Role] = []
        self.maddr: str | None = None
        self._counter = 0
        self.swarm_id = uuid.uuid4().hex[:12]
        self.env[TAG_VAR] = self.swarm_id
        self.join_token = self.workdir / "join-token"
        """Written by the bootstrap (a run key of its own); every role finds it through the environment."""
        self.env[TOKEN_VAR] = str(self.join_token)
        self._rules: dict[str, dict] = {}
        self._reaper: subprocess.Popen | None = None
        atexit.register(self.stop)

    # -- starting ----------------------------------------------------------------------------
    def _spawn(self, name: str, args: Sequence[str]) -> Role:
        self._tell_reaper()
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            prefix = list(self.launcher(name)) if self.launcher else []
            proc = subprocess.Popen([*prefix, sys.executable, "-m", "swarmrt", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
        role = Role(name, proc, log)
        self.roles.append(role)
        self._tell_reaper(f"+{role.pgid}")
        return role

    def _tell_reaper(self, line: str | None = None) -> None:
        """Start the reaper on first use; tell it about a process group (see ``_reaper``)."""
        if self._reaper is None:
            env = {k: v for k, v in os.environ.items() if k != TAG_VAR}  # it must not kill itself
            self._reaper = subprocess.Popen([sys.executable, "-m", "swarmrt.localswarm.reaper", self.swarm_id],
                                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                                            env=env, text=True)
        if line is not None and self._reaper.poll() is None:
            try:
                self._reaper.stdin.write(line + "\n")
                self._reaper.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def _role_rules(self, name: str) -> pathlib.Path:
        path = self.workdir / f"{name}.rules.json"
        self._rules[name] = {"node": name}
        _write_rules(path, self._rules[name])
        return path

    def member_token(self):
        """The run's join token as the bootstrap wrote it (:class:`swarmrt.auth.token.JoinToken`), for
        calls a test makes into the swarm itself."""
        from swarmrt.auth.token import JoinToken  # hivemind: only when asked

        return JoinToken.load(self.join_token, time.time())

    def start(self) -> "LocalSwarm":
        addr_file = self.workdir / "bootstrap.addr"
        boot = self._spawn("bootstrap", ["bootstrap", "--addr-file", str(addr_file),
                                         "--join-token", str(self.join_token), *self.bootstrap_args])
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
        rules = self._role_rules(name)
        args = ["peer", "--config", str(self.config_path), "--initial-peers", self.maddr, "--ready-file", str(ready),
                "--ledger", str(ledger), "--net-rules", str(rules)]
        if stage is not None:
            args += ["--stage", str(stage)]
        args += list(self.peer_args.get(stage, ())) + list(extra_args)
        role = self._spawn(name, args)
        role.stage, role.ledger, role.rules = stage, ledger, rules
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
        trainer_id = f"{name}.{self._counter}"
        rules = self._role_rules(name)
        args = ["train", "--config", str(self.config_path), "--initial-peers", self.maddr, "--steps", str(steps),
                "--metrics-file", str(self.workdir / f"{name}.metrics.jsonl"),
                "--summary-file", str(self.workdir / f"{name}.summary.json"), "--trainer-id", trainer_id,
                "--net-rules", str(rules), *extra_args]
        role = self._spawn(name, args)
        role.trainer_id, role.rules = trainer_id, rules
        return role

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
        """Peer roles (alive ones by default), of ``stage`` if given: the stage each serves now, as its
        ready file says (a peer rewrites it when it moves)."""
        roles = [r for r in self.roles if r.name.startswith("peer") and (not alive or r.alive())]
        for role in roles:
            self._refresh_stage(role)
        return [r for r in roles if stage is None or r.stage == stage]

    def _refresh_stage(self, role: Role) -> None:
        if role.address is None:
            return
        try:
            stage, address, _ = (self.workdir / f"{role.name}.ready").read_text().split()
            role.stage, role.address = int(stage), address
        except (OSError, ValueError):
            pass  # being rewritten: keep what we knew

    def ledger(self, stage: int) -> list[str]:
        """Microbatch ids applied on ``stage`` by every peer (dead ones included). A peer's ledger has one
        ``STAGE MICROBATCH_ID`` line per applied microbatch, so a peer that moved counts on each stage it served."""
        return [entry.microbatch_id for _, entry in self._ledger_entries(stage)]

    def died_with_peers(self, stage: int) -> list[str]:
        """The ids in :meth:`ledger` whose update died with its peer: applied on ``stage`` by a peer that
        then failed (killed, or exited non-zero) without letting its state out after applying them
        (:mod:`swarmrt.pipeline.ledger`). Nothing of such an apply survives, so a sibling applying
        the same microbatch again is the run recovering it, not a double apply."""
        return [entry.microbatch_id for role, entry in self._ledger_entries(stage)
                if not entry.shared and not role.alive() and role.proc.returncode != 0]

    def _ledger_entries(self, stage: int) -> list[tuple[Role, LedgerEntry]]:
        return [(role, entry) for role in self.peers(alive=False)
                if role.ledger is not None and role.ledger.exists()
                for entry in read_ledger(role.ledger) if entry.stage == stage]

    # -- stopping ----------------------------------------------------------------------------
    def stop_role(self, role: Role, sig: int = signal.SIGTERM, timeout: float = 30.0, group: bool = False) -> int:
        """Signal a role (``group``: its whole process group, see :meth:`Role.signal`), wait for it,
        and make sure its whole process group is gone."""
        role.signal(sig, group=group)
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
        if not _alive_group(role.pgid):
            self._tell_reaper(f"-{role.pgid}")
        return role.proc.returncode

    def stop(self) -> None:
        """Stop every role (SIGTERM, then SIGKILL for stragglers) and reap every process group."""
        for role in self.roles:
            if role.alive():
                role.signal(signal.SIGCONT)  # a hung (SIGSTOPped) role could not act on SIGTERM
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
        for pid in tagged_processes(self.swarm_id):  # anything that left its group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._reaper is not None:
            self._tell_reaper("done")
            try:
                self._reaper.stdin.close()
                self._reaper.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
            self._reaper = None
        atexit.unregister(self.stop)

    def leftover_processes(self) -> list[int]:
        """Process groups of this swarm that are still alive, and any other live process carrying this
        swarm's ``SWARMRT_SWARM_ID`` (e.g. a p2pd that left its group); empty after :meth:`stop`."""
        groups = [r.pgid for r in self.roles if _alive_group(r.pgid)]
        return sorted(set(groups) | set(tagged_processes(self.swarm_id)))

    # -- networks and faults -------------------------------------------------------------------
    def role(self, name: str) -> Role:
        """The role called ``name`` (e.g. ``peer3-s1``, ``trainer7``)."""
        for role in self.roles:
            if role.name == name:
                return role
        raise KeyError(f"no role {name!r} in this swarm; roles: {', '.join(r.name for r in self.roles)}")

    def edit_rules(self, role: Role | str, edit: Callable[[dict], None]) -> dict:
        """Change a role's net rules in place (``edit(rules_dict)``) and write them; the peer picks
        them up on its next call. Returns the new rules."""
        role = self.role(role) if isinstance(role, str) else role
        if role.rules is None:
            raise ValueError(f"{role.name} has no rules file (only peers and trainers have one)")
        rules = self._rules.setdefault(role.name, {"node": role.name})
        edit(rules)
        _write_rules(role.rules, rules)
        return rules

    def update_rules(self, role: Role | str, **keys: Any) -> dict:
        """Set (or, with None, remove) top-level keys of a role's net rules, e.g.
        ``update_rules(peer, link={"latency_s": 0.05}, slowdown=3)``."""
        def edit(rules: dict) -> None:
            for key, value in keys.items():
                if value is None:
                    rules.pop(key, None)
                else:
                    rules[key] = value
        return self.edit_rules(role, edit)

    def emulate_network(self, link: Mapping[str, float] | None = None,
                        links: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
                        scenario: str | os.PathLike | Mapping | None = None, nodes: Mapping[str, int] | None = None,
                        latency_scale: float = 1.0, bandwidth_scale: float = 1.0) -> None:
        """Give the peers' links latency and bandwidth: ``link`` for every peer and caller,
        ``links`` per peer name ``{peer: {caller: link}}``, or a scenario file with ``nodes``
        mapping local names (peers, trainers) to its node ids (format: ``docs/scenarios.md``).
        Trainers started later are named ``trainerN``, N counting every role this swarm started (peers
        included): to map a trainer in advance, start it with ``start_trainer(..., name=...)``."""
        from swarmrt.wire.emulation import scenario_links

        per_peer: dict[str, dict] = {}
        if scenario is not None:
            if not nodes:
                raise ValueError("emulate_network(scenario=...): give nodes={local name: scenario node id}")
            per_peer = {name: {"links": v["links"]} for name, v in
                        scenario_links(scenario, nodes, latency_scale, bandwidth_scale).items()}
        for name, table in (links or {}).items():
            per_peer.setdefault(name, {"links": {}})["links"].update(table)
        for role in self.peers():
            self.update_rules(role, link=dict(link) if link else None,
                              links=per_peer.get(role.name, {}).get("links"))

    def poll_ready(self, role: Role) -> bool:
        """True once ``role`` serves (its ready file is written); never waits."""
        if role.address is not None:
            return True
        if not (self.workdir / f"{role.name}.ready").exists():
            return False
        self.wait_ready(role, timeout=5)
        return True

    def wait_for_steps(self, trainer: Role, steps: int, timeout: float = 120.0) -> list[dict]:
        """Poll the trainer's metrics until it has completed ``steps`` steps (fails if it exits first)."""
        return _wait_for(lambda: len(self.metrics(trainer)) >= steps and self.metrics(trainer), timeout,
                         f"{trainer.name} to complete {steps} steps", [trainer])

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
