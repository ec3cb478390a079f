"""``swarmrt status``: the runs, stages and peers announced in a DHT, as a report and as text.

Per run the report holds each stage's records (as announced, plus the heartbeat's age) and
:func:`summarize_run`'s figures: each stage's summed throughput and peers by state, the moves
in flight (peers ``moving`` from one stage to another, peers ``joining`` a stage) and the swarm's
balance (:mod:`swarmrt.routing.rebalance`: bottleneck / mean stage capacity, now and once the
moves in flight land, and whether the swarm can fill its empty stages).
"""

from __future__ import annotations

import textwrap
import time
from typing import Any, Callable, Sequence

from swarmrt.auth import dht_kwargs
from swarmrt.discovery.dht import read_runs, read_stage, start_dht, stop_dht
from swarmrt.discovery.records import StageRecord
from swarmrt.routing.rebalance import (JOINING, MOVING, SERVING, STATES, SpeedModel, balance_quality, bottleneck,
                                       can_serve_everything, stage_capacity)


def read_status(dht, clock: Callable[[], float] = time.time) -> dict[str, dict[str, Any]]:
    """``{run id: {"config": hash, "stages": [[record dict + heartbeat_age_s, ...] per stage], **summary}}``,
    the summary being :func:`summarize_run`'s. Ages are taken on ``clock`` right after each stage is read
    (a heartbeat may land during the read)."""
    report = {}
    for run_id, meta in sorted(read_runs(dht).items()):
        stages = []
        for s in range(int(meta.get("stages", 0))):
            records = read_stage(dht, run_id, s)
            now = clock()
            stages.append([{**r.to_value(), "heartbeat_age_s": round(now - r.heartbeat, 2)} for r in records])
        report[run_id] = {"config": meta.get("config"), "stages": stages, **summarize_run(stages)}
    return report


def swarm_status(initial_peers: Sequence[str], join_token=None) -> dict[str, dict[str, Any]]:
    """Join the DHT as a client (a member, with ``join_token``), read :func:`read_status`, leave."""
    dht = start_dht(list(initial_peers), client_mode=True, **dht_kwargs(join_token))
    try:
        return read_status(dht)
    finally:
        stop_dht(dht)


def summarize_run(stages: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """The figures of one run, from its records per stage (record dicts, as :func:`read_status` lists them).

    - ``stage_totals``: per stage, ``throughput`` (samples/s summed over its serving peers, as they
      announce it), ``peers`` (records under the stage) and ``states`` (how many in each state);
    - ``moves``: ``{"peer_id", "from", "to"}`` of each peer moving between stages; ``joining``:
      ``{"peer_id", "stage"}`` of each peer joining one;
    - ``balance``: ``quality`` (bottleneck / mean stage capacity over the serving peers, 1.0 is
      balanced, 0 when a stage has no serving peer; a peer that has not measured itself counts as
      typical of its stage), ``bottleneck`` and ``mean`` (samples/s), ``empty_stages`` (no serving
      peer), ``quality_after_moves`` (counting movers at their target and joiners where they join),
      ``can_serve_everything`` and ``reason`` (:func:`~swarmrt.routing.rebalance.can_serve_everything`).
    """
    num = len(stages)
    records = [r for peers in stages for r in (StageRecord.from_value(d) for d in peers) if r is not None]
    totals = []
    for s, peers in enumerate(stages):
        states = {state: 0 for state in STATES}
        for d in peers:
            states[d.get("state", "?")] = states.get(d.get("state", "?"), 0) + 1
        totals.append({"stage": s, "throughput": round(sum((float(d.get("throughput") or 0) for d in peers
                                                            if d.get("state") == SERVING), 0.0), 3),
                       "peers": len(peers), "states": {k: v for k, v in states.items() if v}})
    moves = [{"peer_id": r.peer_id, "from": r.stage, "to": r.target} for r in records if r.state == MOVING]
    joining = [{"peer_id": r.peer_id, "stage": r.stage} for r in records if r.state == JOINING]
    balance: dict[str, Any] = {"quality": None, "bottleneck": None, "mean": None, "empty_stages": [],
                               "quality_after_moves": None, "can_serve_everything": None, "reason": "no stages"}
    if num:
        views = [r.policy_view() for r in records]
        model = SpeedModel.fit(views, num)
        caps = stage_capacity([v for v in views if v.state == SERVING], num, model)
        after = stage_capacity(views, num, model)
        ok, reason = can_serve_everything(views, num)
        balance = {"quality": round(balance_quality(caps), 3), "bottleneck": round(bottleneck(caps), 3),
                   "mean": round(sum(caps) / num, 3), "empty_stages": [s for s, c in enumerate(caps) if c <= 0],
                   "quality_after_moves": round(balance_quality(after), 3), "can_serve_everything": ok,
                   "reason": reason}
    return {"stage_totals": totals, "moves": moves, "joining": joining, "balance": balance}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _peer_line(r: dict[str, Any]) -> str:
    state = r["state"] + (f">{r['target']}" if r["state"] == MOVING and r.get("target") is not None else "")
    return (f"    {r['peer_id'][-12:]} {r['address']:<21} {state:<9} {r['throughput']:7.1f}/s  "
            f"load {r['load']:<3} v{r['version']:<6} beat {r['heartbeat_age_s']:.1f} s ago"
            + ("  pinned" if r.get("pinned") else ""))


def _incoming(info: dict[str, Any], stage: int) -> str:
    """What is on its way to an empty ``stage``: movers and joiners, else whether others can move there."""
    moving = sum(1 for m in info["moves"] if m["to"] == stage)
    joining = sum(1 for j in info["joining"] if j["stage"] == stage)
    parts = ([f"{_plural(moving, 'peer')} moving there"] if moving else []) + \
            ([f"{_plural(joining, 'peer')} joining it"] if joining else [])
    if parts:
        return ", ".join(parts)
    if info["balance"]["can_serve_everything"]:
        return "peers elsewhere can move there"
    return f"no peer elsewhere can move there: start a peer with --stage {stage}"


def _balance_line(info: dict[str, Any]) -> str:
    b = info["balance"]
    if b.get("quality") is None:
        return "  balance: no stages"
    later = (f"; {b['quality_after_moves']:.2f} after the moves in flight"
             if info["moves"] or info["joining"] else "")
    if b["empty_stages"]:
        empty = "; ".join(f"stage {s} has no peer ({_incoming(info, s)})" for s in b["empty_stages"])
        return f"  balance quality 0.00: {empty}{later}"
    return (f"  balance quality {b['quality']:.2f} (bottleneck {b['bottleneck']:.1f} of mean "
            f"{b['mean']:.1f} samples/s){later}")


def format_status(report: dict[str, dict[str, Any]]) -> list[str]:
    """The human-readable lines (under 100 columns) of a :func:`read_status` report."""
    if not report:
        return ["no runs announced in this DHT"]
    lines = []
    for run_id, info in report.items():
        if "balance" not in info:  # a report made without the summary
            info = {**info, **summarize_run(info["stages"])}
        lines.append(f"run {run_id} (config {info['config']}), {len(info['stages'])} stages")
        for s, peers in enumerate(info["stages"]):
            t = info["stage_totals"][s]
            if not peers:
                lines.append(f"  stage {s}: no peers")
                continue
            states = ", ".join(f"{n} {state}" for state, n in t["states"].items())
            lines.append(f"  stage {s}: {_plural(t['peers'], 'peer')} ({states}), {t['throughput']:.1f} samples/s")
            lines += [_peer_line(r) for r in peers]
        flights = ([f"{m['peer_id'][-12:]} stage {m['from']} -> {m['to']}" for m in info["moves"]]
                   + [f"{j['peer_id'][-12:]} joining stage {j['stage']}" for j in info["joining"]])
        if flights:
            lines += textwrap.wrap("; ".join(flights), width=96, initial_indent="  moves in flight: ",
                                   subsequent_indent="    ", break_on_hyphens=False)
        lines += textwrap.wrap(_balance_line(info), width=96, subsequent_indent="    ", break_on_hyphens=False)
    return lines
