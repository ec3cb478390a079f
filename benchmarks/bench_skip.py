"""Stage skipping on a scenario: iteration time per path policy, planning time, preemptions, scale.

Run from the repository root:

    python benchmarks/bench_skip.py [SCENARIO.json] [--seeds 3] [--budget-s 0.8]

The scenario (format: docs/scenarios.md) defaults to the shipped
swarmrt/sim/scenarios/geo-aws18.json.

Prints markdown tables (paste them into the benchmarks doc):

1. no failures: simulated seconds per iteration for the full pipeline (DT-FM
   style fixed pipelines), SWARM wiring without skipping, random skipping
   and swarmrt's scheduler, each as a ratio to the full pipeline, plus
   swarmrt's planning time (``swarmrt plan``) and the time of one online
   ``route()`` call;
2. compute noise: the same with every task's time multiplied by a seeded
   log-normal factor (sigma ``--jitter``, 2% by default), which the
   planner does not know about;
3. preemptions (each node fails after an exponential time of mean
   ``--mtbf``, 10 minutes by default, and comes back after ``--downtime``):
   samples/s kept relative to the same policy without failures, with the
   microbatches retried and re-routed;
4. scale: ``--peers`` peers generated over the scenario's regions,
   ``--scale-iterations`` iterations per policy, with the wall time of each
   simulation.

5. replay: swarmrt's plans (``swarmrt plan``, seeds 0..``--seeds``-1)
   and the full pipeline's routes played in the independent replay
   (swarmrt/sim/replay.py), with the cut
   against both the ``full`` policy's routes and the best full pipeline
   (swarmrt/sim/bounds.py: exhaustive over disjoint pipelines);
6. bound: for each origin alone (every other origin idle), the fastest
   set of its routes simulated annealing finds in the replay
   (``--bound-iterations`` x ``--bound-restarts``): how far the replay lets
   one origin go at all;
7. planning cost: wall and CPU seconds, work and plans scored, on the
   scenario and on ``--plan-peers`` generated swarms (default 1000, 2000,
   3000);
8. anneal: a whole plan annealed directly in the replay from swarmrt's
   plan (``--anneal-iterations``): how far the replay lets an iteration
   go with every origin sharing the middle nodes;
9. assign: stage assignment as a lever (swaps of two nodes' stages the
   planner predicts faster), each policy then replayed on the same
   assignment.

``--sections`` picks some of them (default: all). Simulated times are
deterministic for a seed: swarmrt's planner counts its work
(``--work``), and the wall clock (``--budget-s``) only caps it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from swarmrt.sim import scenarios
from swarmrt.sim.scenario import generate_scenario, load_scenario, parse_scenario, peer_table  # noqa: E402
from swarmrt.routing.paths import Hop, Route  # noqa: E402
from swarmrt.routing.policies import SkipScheduler  # noqa: E402
from swarmrt.sim.planner import PLAN_WORK  # noqa: E402
from swarmrt.sim.bounds import anneal_plan, best_disjoint_paths, best_full_pipelines, origin_alone_best  # noqa: E402
from swarmrt.sim.replay import replay  # noqa: E402
from swarmrt.sim.simulator import SimConfig, plan_evaluator, simulate  # noqa: E402
from swarmrt.sim.cli import POLICY_ORDER, plan_routes  # noqa: E402

SECTIONS = ("sim", "noise", "plan", "failures", "scale", "replay", "cost", "bound", "assign", "anneal")


def as_routes(scenario, result):
    """The routes of a ``plan_routes`` result."""
    return [Route(r["origin"], tuple(Hop(scenario.nodes[p].stage, p) for p in r["path"]), r["microbatch"])
            for r in result["routes"]]


def replay_section(scenario, seeds, budget_s, work):
    full = plan_routes(scenario, "full", 0, budget_s)
    full_s = replay(scenario, as_routes(scenario, full)).makespan_s
    best = best_full_pipelines(scenario)
    print("\n### Independent replay (first come first served, no link contention; swarmrt/sim/replay.py)\n")
    print(f"Full pipeline's routes (the `full` policy, greedy matching) in the replay: {full_s:.2f} s "
          f"(the simulator: {full['predicted_iteration_s']:.2f} s)  ")
    print(f"Best full pipeline (exhaustive, {best.combinations} combinations timed alone): {best.makespan_s:.2f} s, "
          f"pipelines {', '.join('-'.join(map(str, p)) for p in best.pipelines)}\n")
    print("| seed | swarmrt simulator (exact) s | swarmrt replay s | vs `full` policy | vs best full pipeline | method |")
    print("|---|---|---|---|---|---|")
    for jitter in (0.02, 0.0):
        for seed in range(seeds):
            p = plan_routes(scenario, "swarmrt", seed, budget_s, work, jitter)
            print(f"| {seed}, scored {'exactly' if jitter == 0 else f'under {jitter:.0%} noise'} | "
                  f"{p['predicted_iteration_s']:.2f} | {p['replay_iteration_s']:.2f} | "
                  f"{p['replay_iteration_s'] / full_s - 1:+.1%} | {p['replay_iteration_s'] / best.makespan_s - 1:+.1%} | "
                  f"{p['method']} |")


def bound_section(scenario, iterations, restarts):
    """How fast each origin's microbatches could be with every other origin idle (annealing in the replay)."""
    full_s = replay(scenario, as_routes(scenario, plan_routes(scenario, "full", 0, None))).makespan_s
    best_full = best_full_pipelines(scenario).makespan_s
    print(f"\n### One origin alone in the replay (every other origin idle; simulated annealing, {restarts} x "
          f"{iterations} steps, seed 0)\n")
    print("| origin | best replay s, alone | vs `full` policy | vs best full pipeline | any middle nodes, any order: "
          "best s | CPU s |")
    print("|---|---|---|---|---|---|")
    for o in scenario.origins:
        cpu = time.process_time()
        best, _ = origin_alone_best(scenario, o, random.Random(0), iterations, restarts)
        free, _ = origin_alone_best(scenario, o, random.Random(0), iterations, restarts, any_middle=True)
        print(f"| {o} | {best:.2f} | {best / full_s - 1:+.1%} | {best / best_full - 1:+.1%} | {free:.2f} | "
              f"{time.process_time() - cpu:.1f} |")


def anneal_section(scenario, budget_s, work, iterations):
    """A whole plan searched directly in the replay, from swarmrt's plan (seed 0): how far the replay goes."""
    p = plan_routes(scenario, "swarmrt", 0, budget_s, work)
    full_s = replay(scenario, as_routes(scenario, plan_routes(scenario, "full", 0, None))).makespan_s
    best_full = best_full_pipelines(scenario).makespan_s
    cpu = time.process_time()
    seconds, routes = anneal_plan(scenario, as_routes(scenario, p), random.Random(0), iterations)
    cpu = time.process_time() - cpu
    simulated = plan_evaluator(scenario)(routes)
    print(f"\n### A whole plan annealed in the replay ({iterations} steps from swarmrt's seed-0 plan, seed 0)\n")
    print("| plan | replay s | vs `full` policy | vs best full pipeline | simulator s |")
    print("|---|---|---|---|---|")
    print(f"| swarmrt's plan | {p['replay_iteration_s']:.2f} | {p['replay_iteration_s'] / full_s - 1:+.1%} | "
          f"{p['replay_iteration_s'] / best_full - 1:+.1%} | {p['predicted_iteration_s']:.2f} |")
    print(f"| annealed in the replay ({cpu:.0f} CPU s) | {seconds:.2f} | {seconds / full_s - 1:+.1%} | "
          f"{seconds / best_full - 1:+.1%} | {simulated:.2f} |")
    disjoint_s, paths = best_disjoint_paths(scenario)
    routes = [Route(o, (Hop(0, o),) + tuple(Hop(scenario.nodes[p].stage, p) for p in paths[o]) +
                    ((Hop(0, o),) if scenario.first_stage_is_also_last else ()), 0)
              for _ in range(scenario.microbatches_per_origin) for o in paths]
    routes = [Route(r.origin, r.hops, i) for i, r in enumerate(routes)]
    print(f"| SkipPipe's shape: one path per origin, no middle node shared (exhaustive) | {disjoint_s:.2f} | "
          f"{disjoint_s / full_s - 1:+.1%} | {disjoint_s / best_full - 1:+.1%} | {plan_evaluator(scenario)(routes):.2f} |")
    print("\nThose paths: " + ", ".join(f"{o}: {'-'.join(map(str, p))}" for o, p in paths.items()))


def assign_section(scenario, seeds, budget_s, work):
    """Stage assignment as a lever: swaps of two nodes' stages the planner predicts faster, then the cut
    against the full pipeline on the same assignment."""
    from swarmrt.sim.moves import improve_assignment

    print("\n### Stage assignment: swaps kept by `improve_assignment` (planner work 2000, seed 0), then each "
          "policy on the same assignment\n")
    reached, kept = improve_assignment(scenario, 0, 2000)
    print("Swaps kept (node a, node b, predicted s after): " + (", ".join(f"{a}<->{b} {s:.2f}" for a, b, s in kept)
                                                               or "none"))
    print("Stages after: " + ", ".join(f"{s}: {list(reached.nodes_of(s))}" for s in range(1, reached.stages)) + "\n")
    print("| assignment | seed | swarmrt simulator s | swarmrt replay s | `full` policy replay s | best full replay s "
          "| vs `full` | vs best full |")
    print("|---|---|---|---|---|---|---|---|")
    for name, sc in (("as shipped", scenario), ("after swaps", reached)):
        full_s = replay(sc, as_routes(sc, plan_routes(sc, "full", 0, None))).makespan_s
        best = best_full_pipelines(sc).makespan_s
        for seed in range(seeds):
            p = plan_routes(sc, "swarmrt", seed, budget_s, work)
            r = p["replay_iteration_s"]
            print(f"| {name} | {seed} | {p['predicted_iteration_s']:.2f} | {r:.2f} | {full_s:.2f} | {best:.2f} | "
                  f"{r / full_s - 1:+.1%} | {r / best - 1:+.1%} |")


def cost_section(scenario, peers, budget_s, work):
    print(f"\n### Planning cost (swarmrt, work budget {work}, wall-clock cap {budget_s} s, seed 0)\n")
    print("| swarm | microbatches | wall s | CPU s | work | plans scored |")
    print("|---|---|---|---|---|---|")
    for n in [0] + peers:
        sc = scenario if n == 0 else generate_scenario(scenario, n, random.Random(0))
        p = plan_routes(sc, "swarmrt", 0, budget_s, work)
        name = f"{len(sc.nodes)} nodes" + (" (generated)" if n else "")
        print(f"| {name} | {len(p['routes'])} | {p['planning_s']:.3f} | {p['planning_cpu_s']:.3f} | {p['work']} | "
              f"{p['method'].split('; ')[1].split(' plans')[0]} |")


def no_failures(scenario, seeds, iterations, budget_s, work):
    rows = {}
    for policy in POLICY_ORDER:
        runs = [simulate(scenario, policy, SimConfig(iterations=iterations, plan_budget_s=budget_s, plan_work=work),
                         random.Random(seed), clock=time.perf_counter) for seed in range(seeds)]
        rows[policy] = runs
    return rows


def planning(scenario, seeds, budget_s, work):
    plans = [plan_routes(scenario, "swarmrt", seed, budget_s, work) for seed in range(seeds)]
    table = peer_table(scenario)
    sched = SkipScheduler(scenario.rules, table)
    sched.begin_iteration({o: scenario.microbatches_per_origin for o in scenario.origins}, 0.0, random.Random(0))
    rng = random.Random(0)
    start = time.perf_counter()
    n = 0
    for _ in range(scenario.microbatches_per_origin):
        for o in scenario.origins:
            sched.route(o, 0.0, rng)
            n += 1
    per_route = (time.perf_counter() - start) / n
    return plans, per_route


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default=scenarios.path("geo-aws18"))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per measurement (default 3)")
    parser.add_argument("--iterations", type=int, default=10, help="iterations per run without failures (default 10)")
    parser.add_argument("--budget-s", type=float, default=10.0,
                        help="wall-clock cap on swarmrt's planning of an iteration (default 10; a safety net)")
    parser.add_argument("--work", type=int, default=PLAN_WORK, help=f"swarmrt's work budget (default {PLAN_WORK})")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which tables to print, comma-separated (default all: {','.join(SECTIONS)})")
    parser.add_argument("--bound-iterations", type=int, default=15000,
                        help="annealing steps per restart of the one-origin bound (default 15000)")
    parser.add_argument("--bound-restarts", type=int, default=4,
                        help="annealing restarts per origin of the one-origin bound (default 4)")
    parser.add_argument("--anneal-iterations", type=int, default=40000,
                        help="annealing steps of the whole-plan search in the replay (default 40000)")
    parser.add_argument("--per-hop-overhead", type=float, default=None, metavar="S",
                        help="replace the scenario's per_hop_overhead_s (SkipPipe's schedule adds 0.35 s per transfer)")
    parser.add_argument("--plan-peers", default="1000,2000,3000",
                        help="generated swarm sizes of the planning-cost table (default 1000,2000,3000)")
    parser.add_argument("--jitter", type=float, default=0.02, help="compute noise sigma of the noisy run (default 0.02)")
    parser.add_argument("--mtbf", type=float, default=600.0, help="mean time between failures per node, s (default 600)")
    parser.add_argument("--downtime", default="60,300",
                        help="mean downtimes of a failed node to try, s, comma-separated (default 60,300)")
    parser.add_argument("--failure-iterations", type=int, default=20, help="iterations per run with failures (default 20)")
    parser.add_argument("--peers", type=int, default=1000, help="peers of the generated swarm (default 1000; 0 skips)")
    parser.add_argument("--scale-iterations", type=int, default=10, help="iterations at scale (default 10)")
    args = parser.parse_args(argv)

    scenario = load_scenario(args.scenario)
    if args.per_hop_overhead is not None:  # e.g. SkipPipe's schedule's 0.35 s per transfer
        import json

        with open(args.scenario, encoding="utf-8") as f:
            obj = json.load(f)
        obj["per_hop_overhead_s"] = args.per_hop_overhead
        scenario = parse_scenario(obj)
    print(f"## {scenario.name or args.scenario}: {len(scenario.nodes)} nodes, {scenario.stages} stages, "
          f"{scenario.stages_visited_per_microbatch} visited (skip {scenario.rules.skip_ratio:.0%}), "
          f"{scenario.microbatches_per_iteration} microbatches per iteration\n")

    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if "replay" in sections:
        replay_section(scenario, args.seeds, args.budget_s, args.work)
    if "bound" in sections:
        bound_section(scenario, args.bound_iterations, args.bound_restarts)
    if "anneal" in sections:
        anneal_section(scenario, args.budget_s, args.work, args.anneal_iterations)
    if "assign" in sections:
        assign_section(scenario, args.seeds, args.budget_s, args.work)
    if "cost" in sections:
        cost_section(scenario, [int(x) for x in args.plan_peers.split(",") if x], args.budget_s, args.work)
    if sections & {"sim", "failures"}:
        rows = no_failures(scenario, args.seeds, args.iterations, args.budget_s, args.work)
    if "sim" in sections:
        sim_section(scenario, args, rows)
    if "noise" in sections:
        noise_section(scenario, args)
    if "plan" in sections:
        plan_section(scenario, args)
    if "failures" in sections:
        failures_section(scenario, args, rows)
    if "scale" in sections and args.peers:
        scale_section(scenario, args)
    return 0


def sim_section(scenario, args, rows):
    full = statistics.mean(r.mean_iteration_s for r in rows["full"])
    print(f"### No failures ({args.seeds} seeds x {args.iterations} iterations)\n")
    full_last = statistics.mean(r.iteration_s[-1] for r in rows["full"])
    print("| policy | s / iteration (mean, min-max over seeds) | vs full pipeline | first iteration | "
          "last iteration (vs full) | samples/s |")
    print("|---|---|---|---|---|---|")
    for policy, runs in rows.items():
        its = [r.mean_iteration_s for r in runs]
        first = statistics.mean(r.iteration_s[0] for r in runs)
        last = statistics.mean(r.iteration_s[-1] for r in runs)
        print(f"| {policy} | {statistics.mean(its):.2f} ({min(its):.2f}-{max(its):.2f}) | "
              f"{statistics.mean(its) / full:.3f} ({statistics.mean(its) / full - 1:+.1%}) | {first:.2f} | "
              f"{last:.2f} ({last / full_last - 1:+.1%}) | {statistics.mean(r.samples_per_s for r in runs):.3f} |")


def noise_section(scenario, args):
    noisy = {policy: [simulate(scenario, policy, SimConfig(iterations=args.iterations, plan_budget_s=args.budget_s,
                                                           plan_work=args.work, jitter=args.jitter),
                               random.Random(seed), clock=time.perf_counter)
                      for seed in range(args.seeds)] for policy in POLICY_ORDER}
    noisy_full = statistics.mean(r.mean_iteration_s for r in noisy["full"])
    print(f"\n### Compute noise: every task takes its time x exp(N(0, {args.jitter})) "
          f"({args.seeds} seeds x {args.iterations} iterations; the planner scores plans under its own, "
          "differently seeded noise)\n")
    print("| policy | s / iteration | vs full pipeline |")
    print("|---|---|---|")
    for policy, runs in noisy.items():
        m = statistics.mean(r.mean_iteration_s for r in runs)
        print(f"| {policy} | {m:.2f} | {m / noisy_full:.3f} ({m / noisy_full - 1:+.1%}) |")


def plan_section(scenario, args):
    plans, per_route = planning(scenario, args.seeds, args.budget_s, args.work)
    print(f"\n### Planning (swarmrt, work {args.work}, wall-clock cap {args.budget_s} s)\n")
    print("| seed | predicted s / iteration | planning s | method |")
    print("|---|---|---|---|")
    for seed, p in enumerate(plans):
        print(f"| {seed} | {p['predicted_iteration_s']:.2f} | {p['planning_s']:.3f} | {p['method']} |")
    print(f"\nOne online `route()` (per-microbatch EFT, no plan): {per_route * 1e3:.2f} ms")


def failures_section(scenario, args, rows):
    for downtime in [float(x) for x in args.downtime.split(",")]:
        print(f"\n### Preemptions: MTBF {args.mtbf:.0f} s per node, mean downtime {downtime:.0f} s "
              f"({args.seeds} seeds x {args.failure_iterations} iterations)\n")
        print("| policy | s / iteration | samples/s | kept vs no failures | failures | retried | re-routed | lost |")
        print("|---|---|---|---|---|---|---|---|")
        for policy in POLICY_ORDER:
            config = SimConfig(iterations=args.failure_iterations, preempt_mtbf_s=args.mtbf, downtime_s=downtime,
                               plan_budget_s=args.budget_s, plan_work=args.work)
            runs = [simulate(scenario, policy, config, random.Random(seed), clock=time.perf_counter)
                    for seed in range(args.seeds)]
            clean = statistics.mean(r.samples_per_s for r in rows[policy])
            sps = statistics.mean(r.samples_per_s for r in runs)
            print(f"| {policy} | {statistics.mean(r.mean_iteration_s for r in runs):.2f} | {sps:.3f} | "
                  f"{sps / clean:.0%} | {sum(r.preemptions for r in runs)} | {sum(r.retried for r in runs)} | "
                  f"{sum(r.rerouted for r in runs)} | {sum(r.lost for r in runs)} |")


def scale_section(scenario, args):
    if args.peers:
        big = generate_scenario(scenario, args.peers, random.Random(0))
        print(f"\n### Scale: {args.peers} peers over the regions of {scenario.name or 'the scenario'} "
              f"({len(big.origins)} origins, {big.microbatches_per_iteration} microbatches per iteration), "
              f"{args.scale_iterations} iterations, seed 0\n")
        print("| policy | s / iteration | vs full pipeline | wall time of the simulation |")
        print("|---|---|---|---|")
        base = None
        for policy in POLICY_ORDER:
            start = time.perf_counter()
            r = simulate(big, policy, SimConfig(iterations=args.scale_iterations, plan_budget_s=args.budget_s,
                                                plan_work=args.work),
                         random.Random(0), clock=time.perf_counter)
            wall = time.perf_counter() - start
            base = base or r.mean_iteration_s
            print(f"| {policy} | {r.mean_iteration_s:.2f} | {r.mean_iteration_s / base:.3f} | {wall:.1f} s |")


if __name__ == "__main__":
    sys.exit(main())
