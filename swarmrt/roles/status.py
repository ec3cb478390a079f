"""``swarmrt status``: the runs, stages and peers announced in a DHT, as a report and as text."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from swarmrt.discovery.dht import read_runs, read_stage, start_dht, stop_dht


def read_status(dht, clock: Callable[[], float] = time.time) -> dict[str, dict[str, Any]]:
    """``{run id: {"config": hash, "stages": [[record dict + heartbeat_age_s, ...] per stage]}}``.
    Ages are taken on ``clock`` right after each stage is read (a heartbeat may land during the read)."""
    report = {}
    for run_id, meta in sorted(read_runs(dht).items()):
        stages = []
        for s in range(int(meta.get("stages", 0))):
            records = read_stage(dht, run_id, s)
            now = clock()
            stages.append([{**r.to_value(), "heartbeat_age_s": round(now - r.heartbeat, 2)} for r in records])
        report[run_id] = {"config": meta.get("config"), "stages": stages}
    return report


def swarm_status(initial_peers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Join the DHT as a client, read :func:`read_status`, leave."""
    dht = start_dht(list(initial_peers), client_mode=True)
    try:
        return read_status(dht)
    finally:
        stop_dht(dht)


def format_status(report: dict[str, dict[str, Any]]) -> list[str]:
    """The human-readable lines of a :func:`read_status` report."""
    if not report:
        return ["no runs announced in this DHT"]
    lines = []
    for run_id, info in report.items():
        lines.append(f"run {run_id} (config {info['config']}), {len(info['stages'])} stages")
        for s, peers in enumerate(info["stages"]):
            if not peers:
                lines.append(f"  stage {s}: no peers")
            for r in peers:
                lines.append(f"  stage {s}: {r['peer_id'][-12:]} {r['address']:<21} {r['state']:<8} "
                             f"{r['throughput']:8.1f} samples/s  load {r['load']}  version {r['version']}  "
                             f"heartbeat {r['heartbeat_age_s']:.1f} s ago")
    return lines
