"""A stage peer's memory and speed against the same layers in plain PyTorch.

    python benchmarks/bench_stage.py memory --hidden 1024 --layers 8 --stages 4 --stage 1
    python benchmarks/bench_stage.py speed --hidden 1024 --layers 8 --stages 4 --stage 1 \\
        --precision bf16 --batch 8 --seq 512 --repeats 10 [--device cuda]

``memory``: peak RSS (``VmHWM`` from /proc) of a fresh process that builds the stage worker as
``swarmrt peer`` does, against the same process building a tiny model's stage; the difference is
the stage's cost, printed beside the stage's share and the whole model's size.

``speed``: tokens/s of forward + backward of one microbatch through the :class:`StageWorker` (input
from the CPU as it arrives from the wire, autocast, output and input gradient back on the CPU in
the compute dtype, gradients accumulated) against the same layers called directly (input already
on the device, the same autocast), interleaved, medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROBE = """
import json, sys
from swarmrt.config import config_from_dict
from swarmrt.roles.peer import PeerOptions, build_stage_worker
worker, _, _ = build_stage_worker(config_from_dict(json.loads(sys.argv[1])), int(sys.argv[2]),
                                  PeerOptions(initial_peers=(), device="cpu"))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"hwm": int(status["VmHWM"].split()[0]) * 1024}))
"""


def raw_config(args, hidden: int, layers: int) -> dict:
    return {"model": {"factory": "swarmrt.models:tiny_llama", "stages": args.stages, "precision": args.precision,
                      "kwargs": {"hidden_size": hidden, "layers": layers, "heads": max(1, hidden // 64)}},
            "data": {"seq_len": args.seq, "batch_size": args.batch, "microbatch_size": args.batch},
            "optimizer": {"samples_per_step": 10**9}}


def probe(raw: dict, stage: int) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(raw), str(stage)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["hwm"]


def memory(args) -> dict:
    from swarmrt.config import config_from_dict
    from swarmrt.models.build import shape_layers, stage_ranges

    raw = raw_config(args, args.hidden, args.layers)
    config = config_from_dict(raw)
    layers = shape_layers(config)
    start, end = stage_ranges(config, layers)[args.stage]
    size = lambda ls: sum(p.numel() * p.element_size() for layer in ls for p in layer.parameters())  # noqa: E731
    big, tiny = probe(raw, args.stage), probe(raw_config(args, 32, args.stages), args.stage)
    return {"whole_mib": size(layers) / 2**20, "stage_share_mib": size(layers[start:end]) / 2**20,
            "peak_above_tiny_mib": (big - tiny) / 2**20, "peak_mib": big / 2**20, "tiny_peak_mib": tiny / 2**20,
            "above_tiny_over_whole": (big - tiny) / size(layers)}


def speed(args) -> dict:
    import torch

    from swarmrt.config import config_from_dict
    from swarmrt.models.build import build_stage, stage_input_spec
    from swarmrt.models.precision import DTYPES
    from swarmrt.pipeline.worker import StageWorker

    config = config_from_dict(raw_config(args, args.hidden, args.layers))
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    worker = StageWorker(build_stage(config, args.stage, args.device), config, args.stage,
                         stage_input_spec(config, args.stage))
    plain = build_stage(config, args.stage, "cpu").to(device)  # the same layers, called directly
    plain.__dict__.pop("forward", None)  # no wire-side moves or casts: the layers themselves
    x = torch.randn(args.batch, args.seq, args.hidden).to(dtype if args.stage else torch.float32)
    if args.stage == 0:
        x = torch.randint(0, 256, (args.batch, args.seq))
    grad = torch.randn(args.batch, args.seq, 256 if args.stage == args.stages - 1 else args.hidden).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_worker(i):
        worker.forward(f"m{i}", x, keep_context=True)
        worker.backward(f"m{i}", grad, None, samples=args.batch, need_grad_input=args.stage > 0, deadline=None)

    xd, gd = x.to(device), grad.to(device)

    def run_plain(i):
        inp = xd.detach().requires_grad_(xd.is_floating_point())
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = plain(inp)
        out.to(dtype).backward(gd)

    times = {"worker": [], "plain": []}
    for i in range(args.repeats + 1):
        for name, fn in (("worker", run_worker), ("plain", run_plain)):
            sync()
            started = time.perf_counter()
            fn(i)
            sync()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    tokens = args.batch * args.seq
    out = {name: tokens / statistics.median(t) for name, t in times.items()}
    return {"device": str(device), "precision": args.precision, "tokens_per_s_worker": out["worker"],
            "tokens_per_s_plain": out["plain"], "worker_over_plain": out["worker"] / out["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("memory", "speed"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(memory(args) if args.what == "memory" else speed(args), indent=1))


if __name__ == "__main__":
    main()
