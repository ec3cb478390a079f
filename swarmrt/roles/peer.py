"""A stage peer: joins the DHT, serves one stage over gRPC, heartbeats, drains on SIGTERM.

Lifecycle (:func:`serve_peer`): start the DHT node -> :meth:`Peer.join`: pick a
stage (given with ``--stage``, which pins the peer there; else where the swarm
needs it, without racing other joiners: :meth:`Organizer.choose_stage
<swarmrt.roles.organizer.Organizer.choose_stage>`) -> build the stage module
(:func:`build_stage_worker`) -> start the gRPC service -> take over the stage's
state (:meth:`Peer.take_over_state`: from a serving peer of the stage,
:func:`download_state`; else, or with ``--resume``, from the newest checkpoint)
-> announce ``serving`` -> :func:`heartbeat` until stopped (re-announcing,
writing periodic checkpoints if this peer is the stage's writer, and asking the
rebalancing policy whether this peer should move: :meth:`Peer.move` drains the
old stage as on SIGTERM, then serves the new one the same way it joined)
-> on SIGTERM/SIGINT :func:`drain`: announce ``leaving`` (routers stop
picking it at once), refuse new forwards, finish what is in flight (up to the
grace period), write a checkpoint if it is the last peer of its stage -> leave,
exit 0. A second signal exits at once, still reaping the DHT child and p2pd
(:func:`swarmrt.roles.proc.install_stop_handlers`).

Each part is handed its collaborators (the DHT, the servicer, the announcer,
the checkpointer), so it can be driven with fakes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time

import torch

from swarmrt import auth
from swarmrt.auth.token import JoinToken
from swarmrt.checkpoint.checkpointer import Checkpointer
from swarmrt.checkpoint.policy import training_config_hash
from swarmrt.checkpoint.store import CheckpointError
from swarmrt.config import ConfigError, RunConfig
from swarmrt.discovery import dht as dht_records
from swarmrt.models.build import build_stage, partition_hash, shape_layers, stage_input_spec, stage_ranges
from swarmrt.pipeline.chain import DhtDirectory, Relay
from swarmrt.pipeline.service import StageServicer
from swarmrt.pipeline.worker import StageWorker
from swarmrt.roles.organizer import Organizer
from swarmrt.roles.proc import install_stop_handlers, write_atomically
from swarmrt.roles.reach import PeerNetwork
from swarmrt.routing.rebalance import Move
from swarmrt.wire.client import StageClient
from swarmrt.wire.emulation import client_interceptors, rules_path, server_interceptors, watch_rules
from swarmrt.wire.p2p import P2PStageClient, RoutedClient
from swarmrt.wire.server import start_server

logger = logging.getLogger("swarmrt.peer")


@dataclasses.dataclass(frozen=True)
class PeerOptions:
    initial_peers: tuple[str, ...]
    """Multiaddrs of DHT peers to join through."""
    stage: int | None = None
    """Stage to serve, pinned (never moved by rebalancing); None: the swarm places and moves the peer."""
    port: int = 0
    """gRPC port (0: any free port)."""
    grace_s: float = 20.0
    """How long a draining peer finishes in-flight work before it leaves."""
    ready_file: str | None = None
    """Written (with the gRPC address) once the peer serves."""
    ledger: str | None = None
    """Append ``STAGE MICROBATCH_ID`` for every applied microbatch here (tests count exactly-once with it)."""
    compute_delay_s: float = 0.0
    """Emulated extra compute time per forward and per backward (benchmarks)."""
    slowdown: float = 1.0
    """Multiply real compute time by this factor (fault tests)."""
    resume: bool = False
    """Load the stage's newest checkpoint even if other peers serve the stage (fail if none)."""
    net_rules: str | None = None
    """Emulated links and RPC faults (``swarmrt.wire.emulation``), re-read when the file changes."""
    join_token: JoinToken | None = None
    """The run's join token (``swarmrt.auth``); None: an open run (in-process tests)."""
    device: str | None = None
    """Torch device the stage computes on (``--device``); None: CUDA when present, else the CPU."""

    def check(self, config: RunConfig) -> None:
        """Raise :class:`ConfigError` naming the flag when these options cannot serve ``config``."""
        if self.stage is not None and not 0 <= self.stage < config.num_stages:
            raise ConfigError(f"--stage {self.stage}: the run has stages 0..{config.num_stages - 1}")
        if self.resume and not config.checkpoint.enabled:
            raise ConfigError("--resume needs [checkpoint] location in the run config")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError as e:
                raise ConfigError(f"--device {self.device}: {e}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: this machine has no CUDA device")


def say(message: str) -> None:
    """A line of the peer's log (stdout); tests and LocalSwarm read some of them."""
    print(message, flush=True)


# -- the parts ----------------------------------------------------------------------------------
def build_stage_worker(config: RunConfig, stage: int, options: PeerOptions) -> tuple[StageWorker, range, str]:
    """The stage's module and optimizer: ``(worker, its layer indices, the partition hash)``."""
    module = build_stage(config, stage, options.device)  # only the stage's layers get real weights
    worker = StageWorker(module, config, stage, stage_input_spec(config, stage),
                         compute_delay_s=options.compute_delay_s, slowdown=options.slowdown,
                         ledger_path=options.ledger)
    start, end = stage_ranges(config, shape_layers(config))[stage]
    return worker, range(start, end), partition_hash(config)


async def download_state(worker: StageWorker, client: StageClient, run_id: str,
                         donors: list[dht_records.StageRecord]) -> str | None:
    """Load the stage's state from the donor with the highest version that answers; returns what
    was loaded, or None when every donor failed."""
    for donor in sorted(donors, key=lambda r: -r.version):
        try:
            data = await client.get_state(donor.address, run_id, worker.stage, timeout=60.0)
            worker.load_state_bytes(data)
            return f"loaded state (version {worker.version}, {len(data)} bytes) from {donor.peer_id}"
        except Exception as e:  # try the next donor
            logger.warning("state download from %s failed: %s", donor.peer_id, e)
    return None


class StageAnnouncer:
    """This peer's record in the DHT (``serving`` on every heartbeat, ``leaving`` when it drains),
    and which peers serve its stage (:attr:`last_serving`: as last read, for when the DHT is gone)."""

    def __init__(self, dht, config: RunConfig, peer_id: str, stage: int, address: str, worker: StageWorker,
                 servicer: StageServicer, pinned: bool = False, since: float | None = None):
        self.dht, self.config, self.peer_id, self.stage, self.address = dht, config, peer_id, stage, address
        self.worker, self.servicer, self.pinned = worker, servicer, pinned
        self.since = time.time() if since is None else since
        self.config_hash = training_config_hash(config)
        self.last_serving: list[str] = []
        """Peer ids announced ``serving`` at the last successful read of the stage's records."""

    def record(self, state: str, target: int | None = None) -> dht_records.StageRecord:
        stats = self.worker.stats()
        return dht_records.StageRecord(peer_id=self.peer_id, stage=self.stage, address=self.address,
                                       throughput=float(stats["throughput"]), load=self.servicer.inflight,
                                       version=int(stats["version"]), state=state, heartbeat=time.time(),
                                       pinned=self.pinned, target=target, since=self.since)

    async def announce(self, state: str, target: int | None = None, timeout: float = 5.0) -> None:
        """Store this peer's record, then the run's; each store waits at most ``timeout`` seconds."""
        ttl = self.config.network.record_ttl_s
        await asyncio.to_thread(dht_records.announce, self.dht, self.config.run.id, self.record(state, target), ttl,
                                timeout)
        await asyncio.to_thread(dht_records.announce_run, self.dht, self.config.run.id, self.config.num_stages,
                                self.config_hash, ttl, timeout)

    async def stage_records(self, timeout: float = 5.0) -> list[dht_records.StageRecord]:
        records = await asyncio.to_thread(dht_records.read_stage, self.dht, self.config.run.id, self.stage, timeout)
        self.last_serving = [r.peer_id for r in records if r.state == "serving"]
        return records

    async def serving_ids(self, timeout: float = 5.0) -> list[str]:
        await self.stage_records(timeout)
        return list(self.last_serving)

    def dht_usable(self) -> bool:
        return dht_records.node_usable(self.dht)


async def heartbeat(stop: asyncio.Event, interval_s: float, announcer: StageAnnouncer,
                    checkpoints: Checkpointer | None, after_beat=None) -> None:
    """Until ``stop`` is set: every ``interval_s``, announce ``serving``, write a periodic
    checkpoint if one is due, then await ``after_beat()`` (if given); a truthy answer ends the
    loop (the peer moved: its announcer and checkpointer changed). A failed beat is logged, not
    fatal: the next one may pass."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except asyncio.TimeoutError:
            pass
        if stop.is_set():
            return
        try:
            await announcer.announce("serving")
            if checkpoints is not None:
                await checkpoints.maybe_periodic(await announcer.serving_ids())
        except Exception as e:
            logger.warning("heartbeat failed: %s", e)
        if after_beat is not None:
            try:
                if await after_beat():
                    return
            except Exception as e:
                logger.warning("rebalancing check failed: %s", e)


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__  # asyncio's TimeoutError has no message


async def while_dht_usable(announcer: StageAnnouncer, call, timeout: float, check_s: float = 0.1):
    """Await the DHT ``call`` for at most ``timeout`` seconds, and give up (ConnectionError) as soon
    as the node's p2pd is gone: a group signal may kill it just after the drain started."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(call)
    deadline = loop.time() + timeout
    try:
        while not task.done():
            if not announcer.dht_usable():
                raise ConnectionError("the DHT node's p2pd is gone")
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError()
            await asyncio.wait({task}, timeout=min(check_s, left))
        return task.result()
    finally:
        if not task.done():
            task.cancel()


def drain_dht_timeout(grace_s: float) -> float:
    """How long one DHT call of :func:`drain` may wait: a quarter of the grace period, 0.5..2 s
    (its p2pd may be dead: a signal to the whole process group kills it at once)."""
    return min(2.0, max(0.5, grace_s / 4))


async def drain(servicer: StageServicer, announcer: StageAnnouncer, checkpoints: Checkpointer | None,
                grace_s: float) -> None:
    """Leave cleanly: refuse new forwards and announce ``leaving`` (routers stop picking this peer
    at once), finish in-flight work within ``grace_s``, then write the stage's checkpoint if no
    other peer serves it (within what is left of the grace period, at least 1 s).

    Works without a DHT (its p2pd killed with the process group): each DHT call waits at most
    :func:`drain_dht_timeout`, and "does another peer serve the stage?" falls back to the
    heartbeat's last read (:attr:`StageAnnouncer.last_serving`)."""
    servicer.state = "leaving"
    started = time.monotonic()
    dht_timeout = drain_dht_timeout(grace_s)
    try:
        await while_dht_usable(announcer, announcer.announce("leaving", timeout=dht_timeout), 2 * dht_timeout + 0.5)
    except Exception as e:
        logger.warning("could not announce leaving: %s", _why(e))
    try:
        await asyncio.wait_for(servicer.idle.wait(), timeout=max(0.0, grace_s - (time.monotonic() - started)))
    except asyncio.TimeoutError:
        logger.warning("grace period over with %d requests in flight", servicer.inflight)
    if checkpoints is None:
        return
    try:
        serving = await while_dht_usable(announcer, announcer.serving_ids(timeout=dht_timeout), dht_timeout + 0.5)
    except Exception as e:
        serving = list(announcer.last_serving)
        logger.warning("could not read the stage's peers (%s); deciding on the last heartbeat's read: %s",
                       _why(e), serving)
    try:
        await asyncio.wait_for(checkpoints.maybe_on_leave(serving),
                               timeout=max(1.0, grace_s - (time.monotonic() - started)))
    except Exception as e:
        logger.error("could not write the leaving checkpoint: %s", e)


# -- the peer -----------------------------------------------------------------------------------
class Peer:
    """One stage peer over a started DHT node: :meth:`join`, then :func:`heartbeat` and
    :func:`drain` over its parts, then :meth:`close`."""

    def __init__(self, config: RunConfig, options: PeerOptions, dht, network: PeerNetwork | None = None):
        self.config, self.options, self.dht = config, options, dht
        self.peer_id = str(dht.peer_id)
        self.network = network
        """The libp2p side (stage service, dial-backs, the reachability check); None: gRPC only, unchecked."""
        self.stage: int | None = None
        self.worker: StageWorker | None = None
        self.servicer: StageServicer | None = None
        self.server = None
        self.checkpoints: Checkpointer | None = None
        self.announcer: StageAnnouncer | None = None
        self.organizer = Organizer(dht, config, self.peer_id, pinned=options.stage is not None,
                                   rng=random.Random(self.peer_id))
        self._relay: Relay | None = None
        self._rules_watch: asyncio.Task | None = None
        """Re-reads the emulation rules file while serving (only under emulation)."""

    def relay(self) -> Relay:
        """How this peer passes chained work on (peer-to-peer hops): the run's DHT says who serves what, and
        a client with this peer's own credential (and, under emulation, its node name) calls them."""
        if self._relay is None:
            config, options, net = self.config, self.options, self.config.network
            credentials = auth.call_credentials(options.join_token)
            client = StageClient(net.max_tensor_mb, interceptors=client_interceptors(rules_path(options.net_rules)),
                                 credentials=credentials)
            if self.network is not None:  # the next peer may serve over libp2p only
                client = RoutedClient(client, P2PStageClient(self.network.p2p, net.max_tensor_mb,
                                                             credentials=credentials))
            directory = DhtDirectory(lambda stage: dht_records.read_stage(self.dht, config.run.id, stage, 5.0),
                                     fresh_s=net.heartbeat_s)
            self._relay = Relay(directory, client, config.num_stages)
        return self._relay

    async def join(self) -> None:
        """Pick the stage (announcing the intent, so concurrent joiners spread), then serve it."""
        if self.options.stage is None:
            stage, reason = await self.organizer.choose_stage()
            say(f"picked stage {stage}: {reason}")
        else:
            stage = self.options.stage
            await self.organizer.announce_intent(stage)
        await self.serve(stage)

    async def organize(self) -> bool:
        """One rebalancing check (after a heartbeat): move if the policy names this peer. True when it moved."""
        move = await self.organizer.check()
        return move is not None and await self.move(move)

    async def move(self, move: Move) -> bool:
        """Drain this stage (as on SIGTERM: refuse new work, finish what is in flight, nothing lost),
        free it, then serve ``move.target`` the way a joiner does (state from a live peer of the
        stage, else its newest checkpoint). False when the move was withdrawn for a rival's."""
        old = self.stage
        say(f"stage {old}: {move.reason}")
        await self.announcer.announce("moving", target=move.target)
        ok, why = await self.organizer.confirm(move)
        if not ok:
            say(f"stage {old}: move to stage {move.target} {why}")
            await self.announcer.announce("serving")
            return False
        await self.organizer.announce_intent(move.target)
        self.servicer.state = "leaving"
        try:
            await asyncio.wait_for(self.servicer.idle.wait(), timeout=self.options.grace_s)
        except asyncio.TimeoutError:
            logger.warning("move: grace period over with %d requests in flight", self.servicer.inflight)
        applied = self.worker.microbatches_applied
        await self.close()
        say(f"stage {old} peer {self.peer_id} moves to stage {move.target} after applying {applied} microbatches")
        await self.serve(move.target, moved_from=old)
        return True

    async def serve(self, stage: int, moved_from: int | None = None) -> None:
        """Build ``stage``, serve it over gRPC, take over its state, announce ``serving``."""
        config, options, net = self.config, self.options, self.config.network
        self.stage = stage
        self.worker, layers, partition = build_stage_worker(config, self.stage, options)
        self.servicer = StageServicer(self.worker, config.run.id, self.peer_id, net.max_tensor_mb * 2**20)
        self.servicer.relay = self.relay()
        self.start_outer_sync()
        if config.checkpoint.enabled:
            self.checkpoints = Checkpointer(config, self.worker, self.peer_id, partition, self.on_compute_thread)
        emulated = server_interceptors(options.net_rules, self.worker)
        self.server, port = await start_server(self.servicer, net.host, options.port, net.max_tensor_mb,
                                               interceptors=(*auth.server_interceptors(options.join_token), *emulated),
                                               max_concurrent_rpcs=net.max_concurrent_rpcs)
        self._rules_watch = asyncio.create_task(watch_rules(emulated)) if emulated else None
        address = f"{net.public_host}:{port}"
        if self.network is not None:
            address = await self.network.checked_address(address, self.servicer)
        self.announcer = StageAnnouncer(self.dht, config, self.peer_id, self.stage, address, self.worker,
                                        self.servicer, pinned=options.stage is not None)
        note = await self.take_over_state()
        self.servicer.state = "serving"
        await self.announcer.announce("serving")
        self.organizer.arrived()
        if options.ready_file:
            write_atomically(options.ready_file, f"{self.stage} {address} {self.peer_id}\n")
        moved = "" if moved_from is None else f" (moved from stage {moved_from})"
        say(f"serving stage {self.stage} (layers {layers.start}..{layers.stop - 1}) at {address} as {self.peer_id}"
            f"{moved}; {note}")

    def start_outer_sync(self) -> None:
        """Local SGD's outer loop, before the gRPC server starts: the averager forks."""
        worker, servicer, stage, config = self.worker, self.servicer, self.stage, self.config
        if config.local_sgd.enabled and worker.params:
            from swarmrt.local_sgd.averaging import StageAverager
            from swarmrt.local_sgd.outer import OuterSync, averaged_templates

            averager = StageAverager(self.dht, f"{config.run.id}_stage{stage}",
                                     averaged_templates(worker.params, config.local_sgd), config.local_sgd,
                                     codec=config.compression.pseudo_gradients, state_codec=config.compression.state)
            worker.attach("outer", OuterSync(worker, averager, config.local_sgd,
                                             submit_to_compute=servicer.executor.submit,
                                             log=lambda line: say(f"stage {stage}: {line}")))

    async def on_compute_thread(self, fn, *args):
        """Run ``fn(*args)`` on the stage's compute thread (where forwards and backwards run)."""
        return await asyncio.get_running_loop().run_in_executor(self.servicer.executor, fn, *args)

    async def take_over_state(self) -> str:
        """The stage's state: a live peer of the stage first, else (or with ``--resume``) the newest
        checkpoint, else the initial weights. Returns what happened, for the ``serving`` line."""
        donors = [r for r in await self.announcer.stage_records()
                  if r.state == "serving" and r.peer_id != self.peer_id]
        note = None
        if self.checkpoints is not None and (self.options.resume or not donors):
            note = self.checkpoints.resume()
            if note is None and self.options.resume:
                raise CheckpointError(f"--resume: no checkpoint of stage {self.stage} of run {self.config.run.id!r} "
                                      f"under {self.config.checkpoint.location}")
        if note is None and donors:
            credentials = auth.call_credentials(self.options.join_token)
            client = StageClient(self.config.network.max_tensor_mb, credentials=credentials,
                                 max_state_mb=self.config.network.max_state_mb)
            if self.network is not None:  # a donor may serve over libp2p only
                client = RoutedClient(client, P2PStageClient(self.network.p2p, self.config.network.max_tensor_mb,
                                                             credentials=credentials))
            try:
                note = await download_state(self.worker, client, self.config.run.id, donors)
            finally:
                await client.close()
        return note or "first peer of its stage: starts from the initial weights"

    async def close_relay(self) -> None:
        """Close the client chained work went out through (when the peer leaves for good)."""
        if self._relay is not None:
            await self._relay.client.close()
            self._relay = None

    async def close(self) -> None:
        """Stop serving and free the stage (the DHT node is the caller's)."""
        self.organizer.arrived()
        server, servicer = self.server, self.servicer
        self.server = self.servicer = None
        if self._rules_watch is not None:
            self._rules_watch.cancel()
            self._rules_watch = None
        if server is not None:
            await server.stop(grace=1.0)
        if servicer is not None:
            servicer.close()
            servicer.worker.close()


async def serve_peer(config: RunConfig, options: PeerOptions) -> int:
    """Run one stage peer until SIGTERM/SIGINT, then drain and leave; returns the exit code (0)."""
    options.check(config)
    stop = asyncio.Event()
    install_stop_handlers(asyncio.get_running_loop(), stop)
    net = config.network
    security = auth.dht_kwargs(options.join_token, config.run.id, net.record_ttl_s)
    dht = await asyncio.to_thread(lambda: dht_records.start_dht(
        list(options.initial_peers), net.host, net.dht_port, announce_host=net.announce_host,
        use_auto_relay=net.use_auto_relay, **security))
    network = PeerNetwork(dht, config, str(dht.peer_id), options.initial_peers, say, token=options.join_token)
    peer = Peer(config, options, dht, network)
    stopping = None
    try:
        await network.start()
        await peer.join()
        while not stop.is_set():  # a move returns from the heartbeat: beat on with the new stage's parts
            await heartbeat(stop, config.network.heartbeat_s, peer.announcer, peer.checkpoints,
                            after_beat=peer.organize)
        stopping = time.monotonic()
        await drain(peer.servicer, peer.announcer, peer.checkpoints, options.grace_s)
        say(f"stage {peer.stage} peer {peer.peer_id} left after applying {peer.worker.microbatches_applied} "
            f"microbatches")
        return 0
    finally:
        await peer.close()
        await peer.close_relay()
        await network.close()
        # the DHT child (forked with SIGTERM/SIGINT blocked) gets what is left of the grace period, 1..3 s
        left = 3.0 if stopping is None else options.grace_s - (time.monotonic() - stopping)
        await asyncio.to_thread(dht_records.stop_dht, dht, min(3.0, max(1.0, left)))
