"""``swarmrt demo``: a whole swarm on 127.0.0.1, trained end to end, then torn down.

Bootstrap, ``stages x peers_per_stage`` stage peers and the trainers run as
separate OS processes (via :class:`swarmrt.localswarm.swarm.LocalSwarm`); the trainer's
progress bar shows loss, samples/s and live peers per stage; every process,
hivemind's p2pd included, is gone when it returns.

``--chaos``: while it trains, a seeded :class:`~swarmrt.localswarm.faults.FaultPlan`
kills (SIGKILL), hangs (SIGSTOP, then SIGCONT) and preempts (SIGTERM) random
peers, and starts a replacement a few steps after each peer it takes down. The
demo prints each fault as it fires and, at the end, what the run did about
it: hops retried, peers banned, joiners serving with downloaded state, and
whether every microbatch was still applied exactly once.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import sys
import time

from swarmrt.config import load_config, with_overrides
from swarmrt.localswarm.ledger import check_exactly_once
from swarmrt.localswarm.swarm import LocalSwarm


def default_config_path() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("swarmrt") / "examples" / "tiny_llama.toml"))


CHAOS_NETWORK = {"heartbeat_s": 0.5, "record_ttl_s": 2.0, "forward_timeout_s": 3.0, "backward_timeout_s": 3.0,
                 "ban_s": 5.0}
"""Chaos mode notices dead and hung peers within seconds, not the defaults' tens of seconds."""


def run_demo(args) -> int:
    config = load_config(args.config or default_config_path())
    if args.stages != config.num_stages and config.model.layer_ranges is None:
        config = with_overrides(config, model={"stages": args.stages})
    if getattr(args, "chaos", False):
        return run_chaos(args, with_overrides(config, network=CHAOS_NETWORK))
    print(f"swarmrt demo: run '{config.run.id}', model {config.model.factory}, {config.num_stages} stages x "
          f"{args.peers_per_stage} peers, {args.trainers} trainer(s), {args.steps} steps", flush=True)
    started = time.time()
    with LocalSwarm(config, peers_per_stage=args.peers_per_stage, workdir=args.workdir) as swarm:
        print(f"bootstrap at {swarm.maddr}; {len(swarm.peers())} peers serving after "
              f"{time.time() - started:.1f} s (logs in {swarm.workdir})", flush=True)
        trainers = []
        for i in range(args.trainers):
            extra = ["--stream", str(i), "--no-progress"]
            trainers.append(swarm.start_trainer(args.steps, extra_args=extra, name=f"trainer{i}"))
        summaries = [_follow(swarm, t, args.steps, show=(i == 0)) for i, t in enumerate(trainers)]
        peers = len(swarm.peers())
    leftovers = swarm.leftover_processes()
    print("\nsummary")
    for i, s in enumerate(summaries):
        print(f"  trainer{i}: {s['steps']} steps, {s['samples']} samples in {s['seconds']:.1f} s "
              f"({s['samples'] / max(s['seconds'], 1e-9):.1f} samples/s); loss {s['first_loss']:.3f} -> "
              f"{s['final_loss']:.3f}; microbatches applied {s['applied']}/{s['microbatches']}, "
              f"duplicates {s['duplicates']}, hop retries {s['hop_retries']}")
    print(f"  peers serving at the end: {peers}; processes left behind: {len(leftovers)}")
    return 0 if not leftovers else 1


def _follow(swarm: LocalSwarm, role, steps: int, show: bool) -> dict:
    """Wait for a trainer, drawing a progress bar from its metrics file."""
    from tqdm import tqdm

    bar = tqdm(total=steps, desc=role.name, unit="step", dynamic_ncols=True, disable=not show, file=sys.stdout)
    seen = 0
    try:
        while role.alive():
            records = swarm.metrics(role)
            if len(records) > seen:
                last = records[-1]
                bar.update(len(records) - seen)
                seen = len(records)
                bar.set_postfix_str(f"loss {last['loss']:.3f} | {last['samples_per_s']:.1f} samples/s | "
                                    f"peers/stage {'/'.join(map(str, last['peers']))}")
            time.sleep(0.2)
        records = swarm.metrics(role)
        bar.update(len(records) - seen)
    finally:
        bar.close()
    return swarm.wait_trainer(role, timeout=60)


# -- chaos -------------------------------------------------------------------------------------
def run_chaos(args, config) -> int:
    from swarmrt.localswarm.faults import FaultPlan
    from swarmrt.localswarm.inject import run_with_faults

    plan = FaultPlan.chaos(seed=args.seed, stages=config.num_stages, steps=args.steps, faults=args.faults)
    net = config.network
    print(f"swarmrt demo --chaos: run '{config.run.id}', {config.num_stages} stages x {args.peers_per_stage} peers, "
          f"{args.steps} steps, seed {args.seed}; deadlines {net.forward_timeout_s:g} s, bans {net.ban_s:g} s", flush=True)
    print("planned faults:")
    for fault in plan:
        print(f"  {fault.describe()}")
    started = time.time()
    failed = None
    with LocalSwarm(config, peers_per_stage=args.peers_per_stage, workdir=args.workdir) as swarm:
        print(f"{len(swarm.peers())} peers serving after {time.time() - started:.1f} s (logs in {swarm.workdir})",
              flush=True)
        others = [swarm.start_trainer(args.steps, extra_args=["--stream", str(i), "--no-progress"], name=f"trainer{i}")
                  for i in range(1, args.trainers)]
        trainer = swarm.start_trainer(args.steps, extra_args=["--no-progress"], name="trainer0")
        every = max(1, args.steps // 10)

        def on_step(record: dict) -> None:
            step = record["step"] + 1
            if step % every == 0 or step == args.steps:
                print(f"  step {step:>4}/{args.steps}  loss {record['loss']:.3f}  peers/stage "
                      f"{'/'.join(map(str, record['peers']))}  hop retries {record['hop_retries']}  "
                      f"bans {record.get('bans', 0)}", flush=True)

        def on_event(event) -> None:
            if event.what != "effect":
                text = event.text.replace("\n", "\n      ")
                print(f"  [{event.elapsed:6.1f} s, step {event.step:>4}] {event.fault.id} {event.what}: {text}",
                      flush=True)

        try:
            run = run_with_faults(swarm, plan, trainer=trainer, timeout=max(600.0, args.steps * 5.0), check=False,
                                  on_event=on_event, on_step=on_step)
            summaries = [run.summary] + [swarm.wait_trainer(t) for t in others]
            ledgers = check_exactly_once(swarm, run.summary, trainer)
            exactly_once = ledgers.describe() if ledgers.ok else f"EXACTLY-ONCE VIOLATED: {ledgers.describe()}"
            failed = None if ledgers.ok else "exactly-once"
        except Exception as e:  # the trainer failed: say so, still tear down and report
            print(f"\nthe run failed: {e}", flush=True)
            run, summaries, exactly_once, failed = None, [], "", "run"
        peers = len(swarm.peers())
    leftovers = swarm.leftover_processes()
    if run is not None:
        print("\nwhat happened, and what the run did about it")
        for line in _chaos_story(run):
            print("  " + line)
        for i, s in enumerate(summaries):
            print(f"  trainer{i}: {s['steps']} steps in {s['seconds']:.1f} s; loss {s['first_loss']:.3f} -> "
                  f"{s['final_loss']:.3f}; microbatches applied {s['applied']}/{s['microbatches']}, hop retries "
                  f"{s['hop_retries']}, forward restarts {s['forward_restarts']}, bans {s.get('bans', 0)}")
        print(f"  {exactly_once}")
        unfired = plan.unfired()
        if unfired:
            print(f"  {len(unfired)} planned fault(s) did not happen: " + "; ".join(f.outcome() for f in unfired))
    print(f"  peers serving at the end: {peers}; processes left behind: {len(leftovers)}")
    return 0 if not leftovers and failed is None else 1


def _chaos_story(run) -> list[str]:
    """One line per fault: what it did, and the run's response in the steps after it."""
    metrics = run.metrics
    lines = []

    def counter(step: int, key: str) -> int:
        if not metrics:
            return 0
        return metrics[max(0, min(step, len(metrics)) - 1)].get(key, 0) if step > 0 else 0

    infos = {}
    for event in run.events:
        if event.what == "info":
            infos.setdefault(event.fault.id, []).append(event.text.splitlines()[0])
    for fault in run.plan:
        if not fault.fired:
            lines.append(f"{fault.describe()}: did not fire ({fault.waiting or 'the run ended first'})")
            continue
        if fault.kind in ("revive", "add_peer"):
            detail = "; ".join(infos.get(fault.id, [])) or "started, never served"
            lines.append(f"step {fault.fired_step:>4}  {fault.id} replacement: {detail}")
            continue
        after = fault.fired_step + 3
        retries = counter(after, "hop_retries") - counter(fault.fired_step, "hop_retries")
        bans = counter(after, "bans") - counter(fault.fired_step, "bans")
        what = {"crash": "SIGKILL", "hang": "SIGSTOP", "preempt": "SIGTERM", "slow": "slowed"}.get(fault.kind,
                                                                                                fault.kind)
        line = (f"step {fault.fired_step:>4}  {fault.id} {what} {', '.join(fault.resolved)}: "
                f"{retries} hop(s) retried and {bans} ban(s) in the next 3 steps")
        if fault.kind == "hang" and fault.ended:
            line += f"; resumed after {fault.ended_time - fault.fired_time:.1f} s"
        if fault.id in infos:
            line += "; " + "; ".join(infos[fault.id])
        lines.append(line)
    return lines
