"""Communication vs quality of local SGD (issues 3 and 15), in one process.

K replicas of the demo model (tiny Llama, byte-level text on the Python standard
library's sources) each train on their own data stream with AdamW (linear warmup,
then constant lr); every H inner steps they average their pseudo-gradients (the
exact mean of what each replica's codec decodes to, which is what a lossless
all-reduce of the compressed payloads delivers) and apply the outer step
(swarmrt.local_sgd.diloco.DiLoCo, driven as the runtime drives it: record the inner
step, start a round when due, apply it sync_delay steps later). Same number of
tokens in every configuration. Bytes = the codec payloads one replica sends, summed
over the run; "peak/sync" = the largest single sync (Streaming DiLoCo's fragments
make it F times smaller). An all-reduce multiplies every configuration by the same
factor, so the ratios hold. The final loss is the held-out loss of the global
(averaged) params after the last round, over --eval-batches batches of 64.

This isolates the algorithm from the network: the processes, hivemind's all-reduce
and its timeouts are exercised by tests/integration/test_local_sgd_swarm.py.

    python benchmarks/bench_local_sgd.py [--steps 1500] [--replicas 2] [--only n50,s50,...] [--jobs 3]

(a) always runs (it is the reference); --jobs runs configurations in parallel processes
(one torch thread each).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import math
import time

import torch

from swarmrt.config import config_from_dict
from swarmrt.data import Batches, loss_sum
from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.diloco import DiLoCo
from swarmrt.models.build import build_layers
from swarmrt.wire.codecs import decode, encode


@dataclasses.dataclass(frozen=True)
class Setup:
    tag: str
    label: str
    H: int
    codec: str
    outer_lr: float
    momentum: float
    fragments: int = 1
    delay: int = 0
    alpha: float = 0.0


CONFIGS = [
    Setup("a", "H=1 fp32, per-step averaging", 1, "none", 1.0, 0.0),
    Setup("n10", "H=10 int8, Nesterov 0.7/0.9", 10, "int8", 0.7, 0.9),
    Setup("n50", "H=50 int8, Nesterov 0.7/0.9", 50, "int8", 0.7, 0.9),
    Setup("s10", "H=10 int8, outer SGD 0.7", 10, "int8", 0.7, 0.0),
    Setup("s50", "H=50 int8, outer SGD 0.7", 50, "int8", 0.7, 0.0),
    Setup("s100", "H=100 int8, outer SGD 0.7", 100, "int8", 0.7, 0.0),
    Setup("f50", "H=50 int8, SGD 0.7, F=5 tau=2 alpha=0.5", 50, "int8", 0.7, 0.0, 5, 2, 0.5),
]


def run(config, setup: Setup, steps: int, replicas: int, lr: float, warmup: int, eval_batches: int):
    models, opts, schedules, dilocos, data = [], [], [], [], []
    section = LocalSGDSection(inner_steps=setup.H, outer_lr=setup.outer_lr, outer_momentum=setup.momentum,
                              fragments=setup.fragments, sync_delay=setup.delay, alpha=setup.alpha)
    for r in range(replicas):
        model = torch.nn.Sequential(*build_layers(config))  # same seed: identical init
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        models.append(model)
        opts.append(opt)
        schedules.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1))))
        dilocos.append(DiLoCo(list(model.parameters()), section))
        data.append(Batches(config.data, config.run.seed, stream=r))
    sent, peak, averaged = 0, 0, None
    for step in range(steps):
        for r in range(replicas):
            x, y = data[r].batch(step)
            opts[r].zero_grad()
            (loss_sum(config.data, models[r](x), y) / x.shape[0]).backward()
            opts[r].step()
            schedules[r].step()
        if [d.record_inner_step() for d in dilocos][0]:
            decoded = []
            for r, d in enumerate(dilocos):
                payloads = [encode(g, setup.codec) for g in d.start_round()]
                if r == 0:
                    size = sum(len(p.data) for p in payloads)
                    sent, peak = sent + size, max(peak, size)
                decoded.append([decode(p) for p in payloads])
            averaged = [torch.stack(parts).mean(0) for parts in zip(*decoded)]
        if dilocos[0].apply_due:
            for d in dilocos:
                d.apply([a.clone() for a in averaged])
    assert len({d.params_hash() for d in dilocos}) == 1, "replicas diverged"
    consensus = copy.deepcopy(models[0])
    with torch.no_grad():
        for param, global_param in zip(consensus.parameters(), dilocos[0].global_params):
            param.copy_(global_param)
        losses = []
        for index in range(eval_batches):
            x, y = data[0].eval_batch(64, index=index)
            losses.append(float(loss_sum(config.data, consensus(x), y) / x.shape[0]))
    return sent, peak, sum(losses) / len(losses), dilocos[0].round


def demo_config():
    return config_from_dict({"model": {"kwargs": {"hidden_size": 64, "layers": 4}, "stages": 1},
                             "data": {"seq_len": 64, "batch_size": 16, "microbatch_size": 16}})


def measure(setup: Setup, args: argparse.Namespace):
    torch.set_num_threads(args.threads)
    t0 = time.time()
    return (*run(demo_config(), setup, args.steps, args.replicas, args.lr, args.warmup, args.eval_batches),
            time.time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50, help="inner AdamW linear warmup steps")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated tags (default: all); (a) always runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once, one process each")
    args = parser.parse_args()
    wanted = {t for t in args.only.split(",") if t}
    unknown = wanted - {s.tag for s in CONFIGS}
    if unknown:
        parser.error(f"unknown tags {sorted(unknown)}; known: {[s.tag for s in CONFIGS]}")
    setups = [s for s in CONFIGS if not wanted or s.tag in wanted or s.tag == "a"]
    config = demo_config()
    print(f"{args.replicas} replicas x {args.steps} inner steps x {config.data.batch_size} x {config.data.seq_len} "
          f"tokens each, AdamW lr {args.lr} ({args.warmup} warmup steps); held-out loss of the global params "
          f"(ln 256 = {math.log(256):.3f} untrained)", flush=True)
    print(f"{'':6} {'configuration':42} {'rounds':>6} {'bytes/peer':>12} {'x fewer':>8} {'peak/sync':>10} "
          f"{'final loss':>10} {'vs (a)':>8} {'s':>5}", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(measure, setup, args) for setup in setups]
        base = None
        for setup, future in zip(setups, futures):  # in table order, as each is done
            sent, peak, final, rounds, seconds = future.result()
            base = base or (sent, final)
            print(f"({setup.tag:4}) {setup.label:42} {rounds:6d} {sent:12,d} {base[0] / max(sent, 1):8.0f} "
                  f"{peak:10,d} {final:10.4f} {(final / base[1] - 1) * 100:+7.2f}% {seconds:5.0f}", flush=True)


if __name__ == "__main__":
    main()
