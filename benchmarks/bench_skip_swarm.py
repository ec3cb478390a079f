"""Stage skipping on a real local swarm: iteration time and loss, skip ratio 0.33 vs 0.

A 6-stage tiny Llama (8 decoder blocks; stage 0 = embedding + block 0, stage 5 =
block 7 + head, one or two blocks per middle stage), peers as real processes on
127.0.0.1 (gRPC + hivemind DHT), slowed to two speeds with ``swarmrt peer
--compute-delay``: a fast peer adds ``--fast-delay`` seconds to each forward
and each backward, a slow one ``--slow-delay`` (a sleep, so the shared cores
do not decide the figures). ``--layout``:

- ``alternate`` (default): one peer per stage; stages 0, 2, 4 fast, 1, 3, 5
  slow (the last stage, which every microbatch visits, is a slow one);
- ``slow-middle``: one peer per stage; stages 0 and 5 fast, the middle slow;
- ``pairs``: ``--peers-per-stage`` peers per stage, one fast and the rest
  slow in every stage. Without ``[local_sgd]`` the peers of a stage are
  independent replicas, each trained on the microbatches routed to it, and
  ``swarmrt eval`` draws one per stage: its losses vary with the draw.

For each skip ratio (a fresh swarm each, same seed, same data): one trainer
trains ``--steps`` steps of ``--batch`` samples; then ``swarmrt eval`` reports
the held-out loss through all stages and through half the middle stages
(0,1,3,5). Iteration time is the median step time after ``--warmup`` steps (the
first steps run before peers have announced a measured throughput).

    python benchmarks/bench_skip_swarm.py [--layout alternate|slow-middle|pairs] [--steps 40]
        [--fast-delay 0.1] [--slow-delay 0.3] [--skip 0 0.33] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from swarmrt.config import config_from_dict
from swarmrt.localswarm.swarm import LocalSwarm

LAYER_RANGES = [[0, 2], [2, 3], [3, 5], [5, 6], [6, 8], [8, 10]]
HALF_THE_MIDDLE = [0, 1, 3, 5]


def make_config(skip_ratio: float, args) -> dict:
    return {
        "run": {"id": f"bench-skip-{int(skip_ratio * 100)}", "seed": 0},
        "model": {"factory": "swarmrt.models:tiny_llama",
                  "kwargs": {"hidden_size": args.hidden, "layers": 8, "heads": 4}, "layer_ranges": LAYER_RANGES},
        "data": {"seq_len": 32, "batch_size": args.batch, "microbatch_size": args.microbatch},
        "optimizer": {"lr": 3e-3, "samples_per_step": args.batch},
        "network": {"forward_timeout_s": 30.0, "backward_timeout_s": 30.0},
        "routing": {"skip_ratio": skip_ratio},
    }


def stage_delays(stage: int, stages: int, args) -> list[float]:
    """The ``--compute-delay`` of each peer of ``stage`` under ``--layout``."""
    fast, slow = args.fast_delay, args.slow_delay
    if args.layout == "pairs":
        return [fast] + [slow] * (args.peers_per_stage - 1)
    if args.layout == "slow-middle":
        return [fast if stage in (0, stages - 1) else slow]
    return [fast if stage % 2 == 0 else slow]


def run_one(skip_ratio: float, args) -> dict:
    config = config_from_dict(make_config(skip_ratio, args))
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(config, peers_per_stage=0, workdir=tmp) as swarm:
        started = time.time()
        for stage in range(config.num_stages):
            for d in stage_delays(stage, config.num_stages, args):
                swarm.add_peer(stage, wait=False, extra_args=["--compute-delay", str(d)])
        for role in swarm.peers():
            swarm.wait_ready(role)
        start_s = time.time() - started
        load_before = os.getloadavg()[0]
        trainer = swarm.start_trainer(args.steps)
        summary = swarm.wait_trainer(trainer, timeout=1800)
        load_after = os.getloadavg()[0]
        metrics = swarm.metrics(trainer)
        step_s = [b["time"] - a["time"] for a, b in zip(metrics, metrics[1:])][args.warmup:]
        full = swarm.evaluate(batches=args.eval_batches)
        half = swarm.evaluate(stages=HALF_THE_MIDDLE, batches=args.eval_batches)
    losses = [m["loss"] for m in metrics]
    return {
        "skip_ratio": skip_ratio, "layout": args.layout,
        "swarm_start_s": round(start_s, 1),
        "load_avg_1m": [round(load_before, 1), round(load_after, 1)],  # the machine's load before/after training
        "steps": summary["steps"], "samples": summary["samples"],
        "median_step_s": statistics.median(step_s), "mean_step_s": statistics.fmean(step_s),
        "train_seconds": summary["seconds"],
        "first_loss": losses[0], "last5_train_loss": statistics.fmean(losses[-5:]),
        "eval_loss_all_stages": full["loss"], "eval_ppl_all_stages": full["perplexity"],
        "eval_loss_half_middle": half["loss"], "eval_ppl_half_middle": half["perplexity"],
        "microbatches_per_stage": summary["microbatches_per_stage"], "stages_visited": summary["stages_visited"],
        "hop_retries": summary["hop_retries"], "replans": summary["replans"],
        "duplicates": summary["duplicates"], "partially_applied": summary["partially_applied"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the step-time figures")
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--microbatch", type=int, default=4, help="samples per microbatch")
    parser.add_argument("--hidden", type=int, default=32, help="hidden size of the tiny Llama")
    parser.add_argument("--layout", choices=["alternate", "slow-middle", "pairs"], default="alternate",
                        help="which peers are fast and which slow (see above)")
    parser.add_argument("--peers-per-stage", type=int, default=2, help="peers per stage of --layout pairs (>= 2)")
    parser.add_argument("--fast-delay", type=float, default=0.1, help="seconds added per forward and per backward")
    parser.add_argument("--slow-delay", type=float, default=0.3, help="seconds added per forward and per backward")
    parser.add_argument("--skip", type=float, nargs="+", default=[0.0, 0.33], help="skip ratios to compare")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    for ratio in args.skip:
        result = run_one(ratio, args)
        results.append(result)
        print(json.dumps(result), flush=True)
    base = results[0]
    print(f"\n{'skip':>5} {'s/step (median)':>16} {'vs first':>9} {'train loss (last 5)':>20} "
          f"{'eval loss all':>14} {'eval loss 0,1,3,5':>18}  microbatches per stage")
    for r in results:
        print(f"{r['skip_ratio']:>5.2f} {r['median_step_s']:>16.3f} {r['median_step_s'] / base['median_step_s'] - 1:>+9.1%} "
              f"{r['last5_train_loss']:>20.3f} {r['eval_loss_all_stages']:>14.3f} {r['eval_loss_half_middle']:>18.3f}  "
              f"{r['microbatches_per_stage']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
