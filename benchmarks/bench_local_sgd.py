"""Communication vs quality of local SGD (issues 3 and 15), in one process.

K replicas of the demo model (tiny Llama, byte-level text on the Python standard
library's sources) each train on their own data stream with AdamW (linear warmup,
then constant lr, or cosine decay with --schedule cosine); every H inner steps they
average their pseudo-gradients as the runtime's all-reduce does
(swarmrt.local_sgd.averaging.StageAverager over hivemind): each replica's tensors go
through hivemind's codec for the configuration (``int8``: hivemind's uniform 8-bit,
a 256-value codebook per tensor part), the reducer averages what it decoded, and
the average goes through the codec again on its way back (every peer applies those
same bytes). Then the outer step: swarmrt.local_sgd.diloco.DiLoCo, driven as the
runtime drives it (record the inner step, start a round when due, apply it
sync_delay steps later). Same number of tokens in every configuration.

Bytes = one serialized copy of what a replica sends per round (hivemind's payloads,
codebooks included), summed over the run. In a K-peer all-reduce a peer sends
(K-1)/K of its tensors out and (K-1)/K of the averages back, the same factor for
every configuration, so the ratios hold. "peak/sync" = the largest single sync
(Streaming DiLoCo's fragments make it F times smaller). The final loss is the
held-out loss of the global (averaged) params after the last round, over
--eval-batches batches of 64.

Two per-step references: (a) H=1, outer SGD lr 1 without momentum, fp32, which is
averaging the replicas' params after every step (each replica keeps its own AdamW
state), the "per-step averaging" the targets compare with; (ddp) the data-parallel
baseline of the DiLoCo papers: the replicas' gradients averaged every step, one
AdamW on the average (same bytes per step as (a)). --custom adds configurations
(H,codec,outer_lr,momentum; Nesterov when momentum > 0) for tuning.

This isolates the algorithm from the network: the processes, hivemind's all-reduce
and its timeouts are exercised by tests/integration/test_local_sgd_swarm.py.

    python benchmarks/bench_local_sgd.py [--steps 1800] [--replicas 2] [--only n60,s60,...]
        [--custom 60,int8,0.35,0.5] [--schedule cosine] [--trace 10] [--jobs 3]

--trace N prints every N outer rounds the norms of the averaged pseudo-gradient, the outer
momentum, the outer step and the global params (docs/benchmarks.md explains why they matter).

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
import warnings

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

from swarmrt.config import config_from_dict
from swarmrt.data import Batches, loss_sum
from swarmrt.local_sgd.averaging import hivemind_compression
from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.diloco import DiLoCo
from swarmrt.models.build import build_layers


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
    ddp: bool = False


CONFIGS = [
    Setup("a", "H=1 fp32, per-step averaging", 1, "none", 1.0, 0.0),
    Setup("ddp", "fp32 gradient all-reduce every step (DDP)", 1, "none", 1.0, 0.0, ddp=True),
    Setup("n10", "H=10 int8, Nesterov 0.7/0.9", 10, "int8", 0.7, 0.9),
    Setup("n50", "H=50 int8, Nesterov 0.7/0.9", 50, "int8", 0.7, 0.9),
    Setup("n60", "H=60 int8, Nesterov 0.7/0.9", 60, "int8", 0.7, 0.9),
    Setup("s10", "H=10 int8, outer SGD 0.7", 10, "int8", 0.7, 0.0),
    Setup("s50", "H=50 int8, outer SGD 0.7", 50, "int8", 0.7, 0.0),
    Setup("s60", "H=60 int8, outer SGD 0.7", 60, "int8", 0.7, 0.0),
    Setup("s100", "H=100 int8, outer SGD 0.7", 100, "int8", 0.7, 0.0),
    Setup("f50", "H=50 int8, SGD 0.7, F=5 tau=2 alpha=0.5", 50, "int8", 0.7, 0.0, 5, 2, 0.5),
]


def custom_setup(index: int, spec: str) -> Setup:
    """``H,codec,outer_lr,momentum`` -> a Setup tagged ``c<index>``."""
    try:
        h, codec, lr, momentum = spec.split(",")
        setup = Setup(f"c{index}", "", int(h), codec, float(lr), float(momentum))
    except ValueError:
        raise ValueError(f"--custom {spec!r}: expected H,codec,outer_lr,momentum, e.g. 60,int8,0.7,0.5") from None
    kind = f"Nesterov {setup.outer_lr}/{setup.momentum}" if setup.momentum else f"outer SGD {setup.outer_lr}"
    return dataclasses.replace(setup, label=f"H={setup.H} {setup.codec}, {kind}")


def all_reduce(parts: list[list[torch.Tensor]], codec: str) -> tuple[list[torch.Tensor], int]:
    """What StageAverager delivers for these replicas' tensors: each through hivemind's codec,
    averaged, the average through the codec again. Returns (average, one replica's payload bytes)."""
    kind = hivemind_compression(codec).compression_type
    sent = [[serialize_torch_tensor(t, kind) for t in tensors] for tensors in parts]
    decoded = [[deserialize_torch_tensor(s) for s in replica] for replica in sent]
    averaged = [torch.stack(column).mean(0) for column in zip(*decoded)]
    returned = [deserialize_torch_tensor(serialize_torch_tensor(a, kind)) for a in averaged]
    return returned, sum(len(s.buffer) for s in sent[0])


def lr_factor(schedule: str, warmup: int, steps: int):
    """Inner lr multiplier by inner step: linear warmup, then constant or cosine down to 10%."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def run(config, setup: Setup, args: argparse.Namespace) -> tuple[int, int, float, int]:
    replicas = 1 if setup.ddp else args.replicas
    models = [torch.nn.Sequential(*build_layers(config)) for _ in range(replicas)]  # same seed: identical init
    opts = [torch.optim.AdamW(model.parameters(), lr=args.lr) for model in models]
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.schedule, args.warmup, args.steps)) for opt in opts]
    data = [Batches(config.data, config.run.seed, stream=r) for r in range(args.replicas)]
    section = LocalSGDSection(inner_steps=setup.H, outer_lr=setup.outer_lr, outer_momentum=setup.momentum,
                              fragments=setup.fragments, sync_delay=setup.delay, alpha=setup.alpha)
    dilocos = [DiLoCo(list(model.parameters()), section) for model in models]
    sent, peak, averaged = 0, 0, None
    for step in range(args.steps):
        if setup.ddp:  # one model, the mean of the replicas' gradients
            opts[0].zero_grad()
            for stream in data:
                x, y = stream.batch(step)
                (loss_sum(config.data, models[0](x), y) / x.shape[0] / len(data)).backward()
            opts[0].step()
            schedules[0].step()
            size = sum(p.numel() * 4 for p in models[0].parameters())
            sent, peak = sent + size, size
            continue
        for model, opt, schedule, stream in zip(models, opts, schedules, data):
            x, y = stream.batch(step)
            opt.zero_grad()
            (loss_sum(config.data, model(x), y) / x.shape[0]).backward()
            opt.step()
            schedule.step()
        if [d.record_inner_step() for d in dilocos][0]:
            averaged, size = all_reduce([d.start_round() for d in dilocos], setup.codec)
            sent, peak = sent + size, max(peak, size)
        if dilocos[0].apply_due:
            before = [g.clone() for g in dilocos[0].global_params] if args.trace else None
            for d in dilocos:
                d.apply([a.clone() for a in averaged])
            if args.trace and dilocos[0].round % args.trace == 0:
                trace_round(setup, dilocos[0], averaged, before)
    assert len({d.params_hash() for d in dilocos}) == 1, "replicas diverged"
    final = [p.detach() for p in models[0].parameters()] if setup.ddp else dilocos[0].global_params
    if args.trace:
        fresh = torch.nn.Sequential(*build_layers(config))
        growth = sorted(((float(g.norm() / p.detach().norm()), name, float(p.detach().norm()), float(g.norm()))
                         for g, (name, p) in zip(final, fresh.named_parameters())), reverse=True)
        print(f"[{setup.tag}] largest norm growth: " + "; ".join(f"{n} {i:.1f} -> {g:.1f}" for _, n, i, g in growth[:4]),
              flush=True)
    consensus = copy.deepcopy(models[0])
    with torch.no_grad():
        for param, global_param in zip(consensus.parameters(), final):
            param.copy_(global_param)
        losses = []
        for index in range(args.eval_batches):
            x, y = data[0].eval_batch(64, index=index)
            losses.append(float(loss_sum(config.data, consensus(x), y) / x.shape[0]))
    return sent, peak, sum(losses) / len(losses), args.steps if setup.ddp else dilocos[0].round


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def trace_round(setup: Setup, diloco: DiLoCo, averaged: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """One line per traced round: norms of the averaged pseudo-gradient, the outer momentum buffer,
    the outer step actually taken and the global params."""
    buffers = [diloco.outer_optimizer.state.get(g, {}).get("momentum_buffer") for g in diloco.global_params]
    step = _norm(b - g for b, g in zip(before, diloco.global_params))
    print(f"[{setup.tag}] round {diloco.round:4d}: |pseudo-grad| {_norm(averaged):.3f}  "
          f"|momentum| {_norm(b for b in buffers if b is not None):.3f}  |outer step| {step:.3f} "
          f"({step / max(_norm(averaged), 1e-12):.2f} x pseudo-grad)  |global params| {_norm(diloco.global_params):.2f}",
          flush=True)


def demo_config():
    return config_from_dict({"model": {"kwargs": {"hidden_size": 64, "layers": 4}, "stages": 1},
                             "data": {"seq_len": 64, "batch_size": 16, "microbatch_size": 16}})


def measure(setup: Setup, args: argparse.Namespace):
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")  # inside hivemind's 8-bit codec
    t0 = time.time()
    return (*run(demo_config(), setup, args), time.time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50, help="inner AdamW linear warmup steps")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="inner lr after the warmup: constant, or cosine decay to 10%% at the last step")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated tags (default: all); (a) always runs")
    parser.add_argument("--custom", action="append", default=[], metavar="H,CODEC,OUTER_LR,MOMENTUM",
                        help="one more configuration, tagged c1, c2, ... (repeatable)")
    parser.add_argument("--trace", type=int, default=0, metavar="N",
                        help="print norms every N outer rounds and the params whose norm grew most (one job)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once, one process each")
    args = parser.parse_args()
    try:
        custom = [custom_setup(index + 1, spec) for index, spec in enumerate(args.custom)]
        for setup in custom:
            LocalSGDSection(inner_steps=setup.H, outer_lr=setup.outer_lr, outer_momentum=setup.momentum)
            hivemind_compression(setup.codec)
    except ValueError as error:
        parser.error(str(error))
    wanted = {t for t in args.only.split(",") if t}
    unknown = wanted - {s.tag for s in CONFIGS}
    if unknown:
        parser.error(f"unknown tags {sorted(unknown)}; known: {[s.tag for s in CONFIGS]}")
    setups = [s for s in CONFIGS if not wanted or s.tag in wanted or s.tag == "a"] + custom
    config = demo_config()
    print(f"{args.replicas} replicas x {args.steps} inner steps x {config.data.batch_size} x {config.data.seq_len} "
          f"tokens each, AdamW lr {args.lr} ({args.warmup} warmup steps, then {args.schedule}); held-out loss of "
          f"the global params over {args.eval_batches} batches of 64 (ln 256 = {math.log(256):.3f} untrained)", flush=True)
    print(f"{'':6} {'configuration':44} {'rounds':>6} {'bytes/peer':>13} {'x fewer':>8} {'peak/sync':>10} "
          f"{'final loss':>10} {'vs (a)':>8} {'s':>5}", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(measure, setup, args) for setup in setups]
        base = None
        for setup, future in zip(setups, futures):  # in table order, as each is done
            sent, peak, final, rounds, seconds = future.result()
            base = base or (sent, final)
            print(f"({setup.tag:4}) {setup.label:44} {rounds:6d} {sent:13,d} {base[0] / max(sent, 1):8.1f} "
                  f"{peak:10,d} {final:10.4f} {(final / base[1] - 1) * 100:+7.2f}% {seconds:5.0f}", flush=True)


if __name__ == "__main__":
    main()
