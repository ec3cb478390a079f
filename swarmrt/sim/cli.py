"""The ``swarmrt plan`` and ``swarmrt simulate`` subcommands.

``plan`` routes one iteration of a scenario and writes the routes as JSON;
``simulate`` runs the event-driven simulator for one or more policies and
prints a table. Both are thin: the work is in :mod:`swarmrt.routing.policies`,
:mod:`swarmrt.sim.planner` and :mod:`swarmrt.sim.simulator`. This module, unlike the pure planner and simulator, may
read the wall clock (planning budgets and timings).

The main CLI wires them in with::

    sub = parser.add_subparsers()
    add_plan_parser(sub)
    add_simulate_parser(sub)
    args = parser.parse_args()
    sys.exit(args.func(args))

Bad input (missing file, bad JSON, a bad field) prints one line on stderr
and returns 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Sequence

from swarmrt.routing.paths import PathRules, validate_route
from swarmrt.sim.scenario import Scenario, ScenarioError, generate_scenario, load_scenario, peer_table
from swarmrt.routing.policies import POLICIES, SkipScheduler, make_policy
from swarmrt.sim.moves import propose_moves, rebalance_moves
from swarmrt.sim.planner import PLAN_WORK, plan_iteration
from swarmrt.sim.replay import replay
from swarmrt.sim.simulator import SimConfig, SimReport, plan_evaluator, simulate
from swarmrt.sim.fleet_cli import add_fleet_flags, fleet_selected, run_fleet

POLICY_ORDER = ("full", "swarm", "random-skip", "swarmrt")
"""Policies in the order tables list them (the first is the baseline of the ``vs full`` column)."""


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _fail(command: str, message: str) -> int:
    print(f"swarmrt {command}: error: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> Scenario:
    scenario = load_scenario(args.scenario)
    if getattr(args, "generate_peers", None):
        scenario = generate_scenario(scenario, args.generate_peers, random.Random(args.seed))
    return scenario


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario JSON (format: docs/scenarios.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--generate-peers", type=_positive_int, default=None, metavar="N",
                   help="instead of the scenario's nodes, N peers spread over its regions (seeded)")


# --- plan -----------------------------------------------------------------------------------


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plan SCENARIO.json --out routes.json [--policy P] [--seed N]``."""
    p = subparsers.add_parser("plan", help="route one iteration of a scenario and write the routes as JSON",
                              description="Route one iteration of a scenario with a path policy and write "
                                          "the routes, the predicted iteration time and the planning time.")
    _add_common(p)
    p.add_argument("--out", required=True, help="where to write the routes JSON ('-': stdout)")
    p.add_argument("--policy", choices=sorted(POLICIES), default="swarmrt", help="path policy (default swarmrt)")
    p.add_argument("--work", type=_positive_int, default=PLAN_WORK,
                   help=f"swarmrt's work budget (plans built and scored, in microbatch-steps; default {PLAN_WORK}): "
                        "the plan depends on it, never on the machine's speed")
    p.add_argument("--budget-s", type=_non_negative, default=10.0,
                   help="wall-clock cap on swarmrt's planning, a safety net for an overloaded machine (default 10; "
                        "the default --work takes about 0.5 s on an idle core)")
    p.add_argument("--jitter", type=_non_negative, default=0.02, metavar="SIGMA",
                   help="compute noise swarmrt scores candidate plans under (default 0.02)")
    p.add_argument("--propose-moves", type=int, default=0, metavar="N",
                   help="also propose up to N moves of a node to another stage that make an iteration faster, "
                        "and what the live rebalancing policy would do (default 0: off)")
    p.set_defaults(func=run_plan)
    return p


def plan_routes(scenario: Scenario, policy: str, seed: int, budget_s: float | None, work: int | None = None,
                jitter: float = 0.02) -> dict:
    """The ``plan`` output for ``scenario`` (a JSON-ready dict)."""
    table = peer_table(scenario)
    sched = make_policy(policy, scenario.rules, table)
    counts = sched.deal({o: scenario.microbatches_per_origin for o in scenario.origins})
    rng = random.Random(seed)
    evaluate = plan_evaluator(scenario)
    start, cpu = time.perf_counter(), time.process_time()
    if isinstance(sched, SkipScheduler):
        plan = plan_iteration(sched, counts, 0.0, rng, clock=time.perf_counter, budget_s=budget_s,
                              evaluate=plan_evaluator(scenario, jitter=jitter), work=work)
    else:
        plan = plan_iteration(sched, counts, 0.0, rng)
    planning_s, planning_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    rules = scenario.rules if sched.skips else PathRules(scenario.stages, 0.0, scenario.first_stage_is_also_last)
    stage_of = {n.id: n.stage for n in scenario.nodes}
    for r in plan.routes:
        broken = validate_route(r, rules, peer_stage=stage_of)
        if broken:
            raise AssertionError(f"{policy} produced an illegal route {r.path}: {broken}")
    predicted = plan.predicted_iteration_s if isinstance(sched, SkipScheduler) else evaluate(plan.routes)
    return {
        "scenario": scenario.name,
        "policy": policy,
        "seed": seed,
        "routes": [{"microbatch": i, "origin": r.origin, "path": list(r.path)} for i, r in enumerate(plan.routes)],
        "predicted_iteration_s": round(predicted, 6),
        "replay_iteration_s": round(replay(scenario, plan.routes).makespan_s, 6),
        "planning_s": round(planning_s, 6),
        "planning_cpu_s": round(planning_cpu_s, 6),
        "work": plan.work,
        "method": plan.method,
    }


def _plan_json(result: dict) -> str:
    """JSON with one route per line (readable, and still plain JSON)."""
    head = {k: v for k, v in result.items() if k != "routes"}
    routes = ",\n  ".join(json.dumps(r) for r in result["routes"])
    body = json.dumps(head, indent=1)[:-2]
    return body + ',\n "routes": [\n  ' + routes + "\n ]\n}"


def run_plan(args: argparse.Namespace) -> int:
    """``swarmrt plan``: returns the exit code."""
    try:
        scenario = _load(args)
    except ScenarioError as e:
        return _fail("plan", str(e))
    try:
        result = plan_routes(scenario, args.policy, args.seed, args.budget_s, args.work, args.jitter)
        if args.propose_moves > 0:
            result.update(_moves(scenario, args.seed, args.propose_moves))
    except RuntimeError as e:
        return _fail("plan", str(e))
    text = _plan_json(result)
    if args.out == "-":
        print(text)
    else:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            return _fail("plan", f"cannot write {args.out}: {e.strerror or e}")
        print(f"{len(result['routes'])} routes ({args.policy}) -> {args.out}: predicted "
              f"{result['predicted_iteration_s']:.2f} s per iteration (independent replay "
              f"{result['replay_iteration_s']:.2f} s), planned in {result['planning_s']:.3f} s")
        for m in result.get("moves", []):
            print(f"move node {m['node']} from stage {m['source']} to stage {m['target']}: predicted "
                  f"{m['predicted_s']:.2f} s ({-m['gain']:+.1%})")
        if "rebalance" in result:
            print(f"the live rebalancing policy: {result['rebalance']['reason']}")
    return 0


def _moves(scenario: Scenario, seed: int, top: int) -> dict:
    """The ``moves`` and ``rebalance`` entries of ``swarmrt plan --propose-moves``."""
    base, found = propose_moves(scenario, seed, top=top)
    live, reason = rebalance_moves(scenario)
    return {
        "moves_baseline_s": round(base, 6),
        "moves": [{"node": m.node, "source": m.source, "target": m.target, "predicted_s": round(m.predicted_s, 6),
                   "gain": round(m.gain, 6)} for m in found],
        "rebalance": {"moves": [{"node": int(m.peer_id), "source": m.source, "target": m.target} for m in live],
                      "reason": reason},
    }


# --- simulate -------------------------------------------------------------------------------


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``simulate SCENARIO.json [--policy all|...] [--preempt-mtbf S] [--iterations N] ...``."""
    p = subparsers.add_parser("simulate", help="simulate training iterations of a scenario, policy by policy",
                              description="Event-driven simulation of a scenario under one or all path "
                                          "policies; prints seconds per iteration, samples/s, idle fraction "
                                          "and microbatches per stage, and microbatches lost or retried.")
    _add_common(p)
    p.add_argument("--policy", choices=("all",) + POLICY_ORDER, default="all", help="policy to run (default all)")
    p.add_argument("--iterations", type=_positive_int, default=3, help="iterations to simulate (default 3)")
    p.add_argument("--preempt-mtbf", type=_non_negative, default=0.0, metavar="S",
                   help="mean seconds between failures of each node (default 0: no failures)")
    p.add_argument("--downtime", type=_non_negative, default=300.0, metavar="S",
                   help="mean seconds a failed node stays away (default 300; fleet simulation: 0 = never comes back)")
    p.add_argument("--outer-sync-s", type=_non_negative, default=0.0, metavar="S",
                   help="seconds of the stage groups' outer sync (default 0)")
    p.add_argument("--outer-sync-every", type=_positive_int, default=1, metavar="N",
                   help="iterations between outer syncs (default 1)")
    p.add_argument("--jitter", type=_non_negative, default=0.0, metavar="SIGMA",
                   help="noise on compute: each task takes its time x exp(N(0, SIGMA)) (default 0: exact)")
    p.add_argument("--plan-budget-s", type=_non_negative, default=0.0, metavar="S",
                   help="wall-clock cap on swarmrt's planning of each iteration (default 0: none; the plan "
                        "depends on its work budget, --plan-work, not on the clock)")
    p.add_argument("--plan-work", type=_positive_int, default=PLAN_WORK, metavar="N",
                   help=f"swarmrt's work budget per iteration (default {PLAN_WORK})")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the reports as JSON")
    add_fleet_flags(p)
    p.set_defaults(func=run_simulate)
    return p


def _table(reports: Sequence[SimReport], stages: int) -> str:
    base = next((r.mean_iteration_s for r in reports if r.policy == "full"), None)
    lines = [f"{'policy':<12} {'s/iteration':>11} {'samples/s':>9} {'vs full':>7} {'done':>6} {'lost':>5} "
             f"{'retried':>7} {'rerouted':>8} {'failures':>8}"]
    for r in reports:
        ratio = f"{r.mean_iteration_s / base:7.3f}" if base else f"{'-':>7}"
        lines.append(f"{r.policy:<12} {r.mean_iteration_s:11.2f} {r.samples_per_s:9.3f} {ratio} "
                     f"{r.completed:6d} {r.lost:5d} {r.retried:7d} {r.rerouted:8d} {r.preemptions:8d}")
    head = " ".join(f"{'s' + str(s):>6}" for s in range(stages))
    lines.append("")
    lines.append(f"{'idle fraction':<14}{head}")
    for r in reports:
        lines.append(f"{r.policy:<14}" + " ".join(f"{r.idle_fraction[s]:6.2f}" for s in range(stages)))
    lines.append("")
    lines.append(f"{'microbatches':<14}{head}")
    for r in reports:
        lines.append(f"{r.policy:<14}" + " ".join(f"{r.microbatches_per_stage[s]:6d}" for s in range(stages)))
    return "\n".join(lines)


def run_simulate(args: argparse.Namespace) -> int:
    """``swarmrt simulate``: returns the exit code."""
    if fleet_selected(args):
        try:
            scenario = load_scenario(args.scenario)
        except ScenarioError as e:
            return _fail("simulate", str(e))
        return run_fleet(args, scenario, lambda message: _fail("simulate", message))
    try:
        scenario = _load(args)
        config = SimConfig(iterations=args.iterations, preempt_mtbf_s=args.preempt_mtbf,
                           downtime_s=args.downtime if args.downtime > 0 else 300.0,
                           outer_sync_s=args.outer_sync_s, outer_sync_every=args.outer_sync_every,
                           plan_budget_s=args.plan_budget_s, plan_work=args.plan_work, jitter=args.jitter)
    except (ScenarioError, ValueError) as e:
        return _fail("simulate", str(e))
    policies = POLICY_ORDER if args.policy == "all" else (args.policy,)
    reports, walls = [], []
    for name in policies:
        start = time.perf_counter()
        reports.append(simulate(scenario, name, config, random.Random(args.seed), clock=time.perf_counter))
        walls.append(time.perf_counter() - start)
    print(f"{scenario.name or args.scenario}: {len(scenario.nodes)} nodes, {scenario.stages} stages, "
          f"{scenario.stages_visited_per_microbatch} visited, {scenario.microbatches_per_iteration} microbatches "
          f"per iteration; {args.iterations} iterations, preemption MTBF "
          f"{args.preempt_mtbf or 'off'}{' s' if args.preempt_mtbf else ''}, seed {args.seed}")
    print(_table(reports, scenario.stages))
    print("")
    print("wall time: " + ", ".join(f"{r.policy} {w:.2f} s" for r, w in zip(reports, walls)))
    if args.json:
        payload = [{
            "policy": r.policy, "iteration_s": list(r.iteration_s), "mean_iteration_s": r.mean_iteration_s,
            "samples_per_s": r.samples_per_s, "idle_fraction": r.idle_fraction,
            "microbatches_per_stage": r.microbatches_per_stage, "microbatches": r.microbatches,
            "completed": r.completed, "lost": r.lost, "retried": r.retried, "rerouted": r.rerouted,
            "preemptions": r.preemptions, "wall_s": w,
        } for r, w in zip(reports, walls)]
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1)
        except OSError as e:
            return _fail("simulate", f"cannot write {args.json}: {e.strerror or e}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m swarmrt.sim.cli plan|simulate ...``) until the main CLI wires these in."""
    parser = argparse.ArgumentParser(prog="swarmrt")
    sub = parser.add_subparsers(required=True)
    add_plan_parser(sub)
    add_simulate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
