"""``swarmrt simulate --rebalance|--compare|--waves|--peers|--duration``: the fleet simulation's flags.

:mod:`swarmrt.sim.cli` registers these on ``simulate`` and hands over to :func:`run_fleet` when one of
them is given; without them ``simulate`` is the microbatch-level simulator as before. The work is in
:mod:`swarmrt.sim.fleet`; this module, unlike it, reads the wall clock (the run's wall time).
"""

from __future__ import annotations

import argparse
import json
import random
import time

from swarmrt.routing.rebalance import RebalanceRules
from swarmrt.sim.fleet import FleetConfig, FleetReport, costs_from_scenario, parse_waves, simulate_fleet
from swarmrt.sim.scenario import Scenario

FLEET_FLAGS = ("rebalance", "compare", "waves", "peers", "duration")
"""Any of these switches ``simulate`` to the fleet simulation."""


def add_fleet_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet simulation (stage rebalancing over time; any of --rebalance, --compare, "
                             "--waves, --peers, --duration selects it)")
    g.add_argument("--rebalance", action="store_true",
                   help="peers move between stages by swarmrt.routing.rebalance.plan_moves (default: nobody moves)")
    g.add_argument("--compare", action="store_true", help="run without and with rebalancing, side by side")
    g.add_argument("--waves", default=None, metavar="SPEC",
                   help="preemption waves: T:SHARE (SHARE of all live peers at T s) or T:SHARE@STAGE, "
                        "comma-separated, e.g. 600:0.3,1800:0.5@2; preempted peers rejoin after --downtime "
                        "(mean, exponential; 0: never)")
    g.add_argument("--peers", default=None, metavar="N", help="peers in the fleet (default 1000)")
    g.add_argument("--duration", default=None, metavar="S", help="simulated seconds (default 3600)")
    g.add_argument("--period-s", default="5", metavar="S", help="seconds between balance checks (default 5)")
    g.add_argument("--move-s", default="30", metavar="S",
                   help="seconds a move or (re)join takes: drain and state download (default 30)")
    g.add_argument("--balance-quality", default="0.8", metavar="Q",
                   help="[rebalance] balance_quality: move only when bottleneck now < Q x after (default 0.8)")
    g.add_argument("--cooldown-s", default="30", metavar="S", help="[rebalance] cooldown_s (default 30)")
    g.add_argument("--noise", default="0.05", metavar="SIGMA",
                   help="measured throughput = true x exp(N(0, SIGMA)) (default 0.05)")
    g.add_argument("--sample-s", default=None, metavar="S", help="seconds between table rows (default duration/12)")


def fleet_selected(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) not in (None, False) for name in FLEET_FLAGS)


def _number(name: str, text: str, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"--{name}: not {'an integer' if integer else 'a number'}: {text!r}") from None
    return value


def fleet_config(args: argparse.Namespace, rebalance: bool) -> FleetConfig:
    """The run's :class:`FleetConfig`; a bad flag is a ValueError naming it."""
    duration = _number("duration", args.duration) if args.duration is not None else 3600.0
    values = {
        "peers": _number("peers", args.peers, integer=True) if args.peers is not None else 1000,
        "duration": duration,
        "period-s": _number("period-s", args.period_s),
        "move-s": _number("move-s", args.move_s),
        "noise": _number("noise", args.noise),
        "sample-s": _number("sample-s", args.sample_s) if args.sample_s is not None else duration / 12,
        "balance-quality": _number("balance-quality", args.balance_quality),
        "cooldown-s": _number("cooldown-s", args.cooldown_s),
    }
    for name in ("peers", "duration", "period-s", "sample-s"):
        if not values[name] > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name.replace('-', '_'))}")
    for name in ("move-s", "noise", "cooldown-s"):
        if not values[name] >= 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name.replace('-', '_'))}")
    if not 0 < values["balance-quality"] <= 1:
        raise ValueError(f"--balance-quality must be in (0, 1], got {args.balance_quality}")
    waves = ()
    if args.waves is not None:
        try:
            waves = parse_waves(args.waves)
        except ValueError as e:
            raise ValueError(f"--waves: {e}") from None
    return FleetConfig(peers=values["peers"], duration_s=values["duration"], rebalance=rebalance,
                       rules=RebalanceRules(balance_quality=values["balance-quality"], cooldown_s=values["cooldown-s"]),
                       period_s=values["period-s"], move_s=values["move-s"], downtime_s=args.downtime,
                       waves=waves, noise=values["noise"], sample_s=values["sample-s"])


def fleet_table(reports: list[FleetReport]) -> str:
    """Throughput over time, one column group per run (samples/s, balance quality, moves in flight)."""
    names = ["rebalance" if r.rebalance else "static" for r in reports]
    head = f"{'t (s)':>7} {'alive':>5} {'bound':>8}" + "".join(
        f" | {n + ' samples/s':>19} {'quality':>7} {'moving':>6} {'peers per stage':<24}" for n in names)
    lines = [head]
    for rows in zip(*(r.samples for r in reports)):
        line = f"{rows[0].t:7.0f} {rows[0].alive:5d} {rows[0].bound:8.2f}"
        for s in rows:
            line += (f" | {s.throughput:19.2f} {s.quality:7.2f} {s.moving:6d} "
                     f"{'/'.join(str(n) for n in s.per_stage):<24}")
        lines.append(line)
    lines.append("")
    lines.append(f"{'run':<10} {'mean samples/s':>14} {'vs bound':>8} {'samples':>10} {'< 50% of t=0 (s)':>16} "
                 f"{'moves':>6} {'preempted':>9} {'rejoined':>8}")
    for n, r in zip(names, reports):
        ratio = r.mean_throughput / r.mean_bound if r.mean_bound > 0 else 0.0
        lines.append(f"{n:<10} {r.mean_throughput:14.2f} {ratio:8.3f} {r.samples_processed:10.0f} "
                     f"{r.below_half_s:16.0f} {r.moves:6d} {r.preempted:9d} {r.rejoins:8d}")
    return "\n".join(lines)


def run_fleet(args: argparse.Namespace, scenario: Scenario, fail) -> int:
    """The fleet half of ``swarmrt simulate``; ``fail(message)`` prints one line and returns 2."""
    if args.generate_peers:
        return fail("--generate-peers does not apply to the fleet simulation (use --peers)")
    modes = (False, True) if args.compare else (args.rebalance,)
    try:
        configs = [fleet_config(args, m) for m in modes]
        costs = costs_from_scenario(scenario)
        reports, walls = [], []
        for cfg in configs:
            start = time.perf_counter()
            reports.append(simulate_fleet(costs, cfg, random.Random(args.seed)))
            walls.append(time.perf_counter() - start)
    except ValueError as e:
        return fail(str(e))
    cfg = configs[0]
    waves = ", ".join(f"{w.share:g} of {'all peers' if w.stage is None else f'stage {w.stage}'} at {w.at_s:g} s"
                      for w in cfg.waves) or "none"
    print(f"{scenario.name or args.scenario} fleet: {cfg.peers} peers, {costs.stages} stages (cost s/sample "
          f"{', '.join(f'{c:.2f}' for c in costs.stage_cost_s)}; demand {', '.join(f'{d:.2f}' for d in costs.demand)}), "
          f"{cfg.duration_s:g} s; waves: {waves}; downtime {cfg.downtime_s:g} s; move {cfg.move_s:g} s, "
          f"check every {cfg.period_s:g} s, balance_quality {cfg.rules.balance_quality:g}, "
          f"cooldown {cfg.rules.cooldown_s:g} s, noise {cfg.noise:g}; seed {args.seed}")
    print(fleet_table(reports))
    print("")
    print("wall time: " + ", ".join(f"{'rebalance' if r.rebalance else 'static'} {w:.2f} s"
                                    for r, w in zip(reports, walls)))
    if args.json:
        payload = [dict(r.to_json(), wall_s=w) for r, w in zip(reports, walls)]
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1)
        except OSError as e:
            return fail(f"cannot write {args.json}: {e.strerror or e}")
    return 0
