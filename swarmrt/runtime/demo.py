"""``swarmrt demo``: a whole swarm on 127.0.0.1, trained end to end, then torn down.

Bootstrap, ``stages x peers_per_stage`` stage peers and the trainers run as
separate OS processes (via :class:`swarmrt.testing.LocalSwarm`); the trainer's
progress bar shows loss, samples/s and live peers per stage; every process,
hivemind's p2pd included, is gone when it returns.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import sys
import time

from swarmrt.core.config import load_config, with_overrides
from swarmrt.testing.swarm import LocalSwarm


def default_config_path() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("swarmrt") / "examples" / "tiny_llama.toml"))


def run_demo(args) -> int:
    config = load_config(args.config or default_config_path())
    if args.stages != config.num_stages and config.model.layer_ranges is None:
        config = with_overrides(config, model={"stages": args.stages})
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
