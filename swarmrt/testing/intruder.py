"""The intruder fault: a process without the run's credentials that tries to take part, so users can
rehearse what membership keeps out (docs/security.md).

It serves a fake stage (a gRPC stage service that answers every call and counts them), then, every
``interval_s`` until stopped:

- **joins** the run's DHT (first as a normal node, then without insisting that the bootstrap
  answers);
- **announces** itself on every stage with a throughput of 1e13 samples/s (the bait that took
  every microbatch before membership);
- **overwrites** the records of the peers it was told about (``victims``: their bare peer ids as
  subkeys), pointing them at its fake stage;
- stores a **plain value** at every stage key, expiring in an hour;
- **reads** the stage keys;
- **calls** the peers' stage services (``calls``: addresses) without a credential.

:func:`start_intruder` runs it as its own process next to a :class:`~swarmrt.localswarm.swarm.LocalSwarm`
(reaped with the swarm); :func:`read_report` reads what it saw (also written after every round):
``joined``, ``stores_accepted`` (stores its own node reported done: a node alone in its DHT keeps
what it stores), ``records_seen``, ``calls`` (status code of each call, by
method), ``call_details`` (one refusal's text per method) and ``served`` (calls its fake stage
got: traffic the swarm sent it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Sequence

RECORD_BAIT = 1e13
"""The throughput the intruder announces."""


def start_intruder(swarm, calls: Sequence[str] = (), victims: Sequence[str] = (), interval_s: float = 1.0,
                   name: str = "intruder"):
    """Start the intruder against ``swarm`` (a LocalSwarm), without its join token; returns its
    :class:`~swarmrt.localswarm.swarm.Role` (stopped and reaped with the swarm). Its report is
    ``swarm.workdir / f"{name}.json"``, written first once its fake stage serves and its first
    round is done."""
    from swarmrt.auth.credential import ENV_VAR
    from swarmrt.localswarm.swarm import Role

    report = swarm.workdir / f"{name}.json"
    args = [sys.executable, "-m", "swarmrt.testing.intruder", "--initial-peers", swarm.maddr,
            "--run-id", swarm.config.run.id, "--stages", str(swarm.config.num_stages), "--report", str(report),
            "--interval", str(interval_s)]
    args += [a for address in calls for a in ("--call", address)]
    args += [a for peer in victims for a in ("--victim", peer)]
    env = {k: v for k, v in swarm.env.items() if k != ENV_VAR}  # no credentials: that is the point
    log = swarm.workdir / f"{name}.log"
    swarm._tell_reaper()
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    role = Role(name, proc, log)
    swarm.roles.append(role)
    swarm._tell_reaper(f"+{role.pgid}")
    return role


def read_report(path: str | os.PathLike) -> dict | None:
    """The intruder's last report, or None before its first round."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


# -- the intruder process ------------------------------------------------------------------------
class _Report:
    def __init__(self, path: str):
        self.path = path
        self.data = {"joined": False, "join_error": None, "rounds": 0, "stores_accepted": {}, "records_seen": 0,
                     "calls": {}, "call_details": {}, "served": 0, "fake_stage": None}

    def count(self, section: str, key: str) -> None:
        self.data[section][key] = self.data[section].get(key, 0) + 1

    def write(self) -> None:
        tmp = f"{self.path}.tmp"
        pathlib.Path(tmp).write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _fake_servicer(report: _Report):
    from swarmrt.wire.proto import swarmrt_pb2 as pb
    from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc

    class FakeStage(pb_grpc.StageServicer):  # answers everything; every call is traffic it was not due
        async def Forward(self, request, context):
            report.data["served"] += 1
            return pb.ForwardResponse()

        async def Backward(self, request, context):
            report.data["served"] += 1
            return pb.BackwardResponse()

        async def Info(self, request, context):
            report.data["served"] += 1
            return pb.InfoResponse(throughput=RECORD_BAIT, state="serving")

        async def GetState(self, request, context):
            report.data["served"] += 1
            yield pb.StateChunk()

    return FakeStage()


def _join(initial_peers: list[str], report: _Report):
    """Its DHT node: a normal join first (refused without a token), then one that does not insist."""
    from hivemind import DHT

    from swarmrt.discovery.dht import start_dht

    try:
        dht = start_dht(initial_peers)
        report.data["joined"] = True
        return dht
    except Exception as e:  # the expected outcome
        report.data["join_error"] = f"{type(e).__name__}: {e}"[:300]
    dht = DHT(initial_peers=initial_peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
              ensure_bootstrap_success=False)
    return dht


def _attack_dht(dht, args, address: str, report: _Report) -> None:
    from hivemind.utils import get_dht_time

    from swarmrt.discovery.records import StageRecord, stage_key

    now = get_dht_time()
    stores = []
    for stage in range(args.stages):
        key = stage_key(args.run_id, stage)
        bait = StageRecord(peer_id="intruder", stage=stage, address=address, throughput=RECORD_BAIT, load=0,
                           version=10**6, state="serving", heartbeat=time.time())
        stores.append(("announce", key, "intruder", bait.to_value(), now + 10))
        for victim in args.victim:
            fake = StageRecord(peer_id=victim, stage=stage, address=address, throughput=RECORD_BAIT, load=0,
                               version=10**6, state="serving", heartbeat=time.time())
            stores.append(("overwrite", key, victim, fake.to_value(), now + 10))
        stores.append(("plain_value", key, None, "gone", now + 3600))
    for kind, key, subkey, value, expiration in stores:
        try:
            ok = dht.store(key, value, expiration, subkey=subkey, return_future=True).result(timeout=5)
        except Exception:
            ok = False
        if ok:
            report.count("stores_accepted", kind)
    seen = 0
    for stage in range(args.stages):
        try:
            found = dht.get(stage_key(args.run_id, stage), latest=True, return_future=True).result(timeout=5)
        except Exception:
            found = None
        if found is not None and isinstance(found.value, dict):
            seen += len(found.value)
    report.data["records_seen"] = max(report.data["records_seen"], seen)


async def _call_peers(addresses: Sequence[str], run_id: str, report: _Report) -> None:
    import grpc

    from swarmrt.wire.client import StageClient
    from swarmrt.wire.proto import swarmrt_pb2 as pb

    client = StageClient(16)
    try:
        for address in addresses:
            calls = {"Info": lambda: client.info(address, timeout=5),
                     "Forward": lambda: client.forward(address, pb.ForwardRequest(run_id=run_id), timeout=5),
                     "GetState": lambda: client.get_state(address, run_id, 0, timeout=5)}
            for method, call in calls.items():
                try:
                    await call()
                    code, details = "OK", ""
                except grpc.aio.AioRpcError as e:
                    code, details = e.code().name, e.details()
                report.count("calls", f"{method}:{code}")
                report.data["call_details"][method] = details
    finally:
        await client.close()


async def _main(args) -> int:
    from swarmrt.discovery.dht import stop_dht
    from swarmrt.wire.server import start_server

    report = _Report(args.report)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server, port = await start_server(_fake_servicer(report), "127.0.0.1", 0, 16)
    address = report.data["fake_stage"] = f"127.0.0.1:{port}"
    dht = await asyncio.to_thread(_join, list(args.initial_peers), report)
    try:
        while not stop.is_set():
            await asyncio.to_thread(_attack_dht, dht, args, address, report)
            await _call_peers(args.call, args.run_id, report)
            report.data["rounds"] += 1
            report.write()
            try:
                await asyncio.wait_for(stop.wait(), args.interval)
            except asyncio.TimeoutError:
                pass
        report.write()
        return 0
    finally:
        await server.stop(grace=0.5)
        await asyncio.to_thread(stop_dht, dht)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swarmrt.testing.intruder", description=__doc__.split("\n\n")[0])
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--report", required=True, help="write what it saw here (JSON), after every round")
    p.add_argument("--call", action="append", default=[], metavar="HOST:PORT", help="a peer's stage service to call")
    p.add_argument("--victim", action="append", default=[], metavar="PEER_ID", help="a peer whose record to overwrite")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between rounds")
    return asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
