"""``swarmrt plan`` and ``swarmrt simulate``, driven through their argparse parsers."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from swarmrt.sim import scenarios
from swarmrt.routing.paths import PathRules, Route, balance_violations, stage_counts, validate_route
from swarmrt.sim.scenario import load_scenario
from swarmrt.sim.cli import add_plan_parser, add_simulate_parser

pytestmark = pytest.mark.timeout(60)

GEO = scenarios.path("geo-aws18")


def run(*argv):
    parser = argparse.ArgumentParser(prog="swarmrt")
    sub = parser.add_subparsers()
    add_plan_parser(sub)
    add_simulate_parser(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


def routes_of(data, scenario):
    stage = {n.id: n.stage for n in scenario.nodes}
    return [Route(origin=r["origin"], hops=tuple((0 if i in (0, len(r["path"]) - 1) and scenario.first_stage_is_also_last
                                                  else stage[p], p) for i, p in enumerate(r["path"])))
            for r in data["routes"]]


@pytest.mark.parametrize("policy", ["swarmrt", "random-skip", "full"])
def test_plan_writes_legal_routes(tmp_path, capsys, policy):
    out = tmp_path / "routes.json"
    assert run("plan", GEO, "--out", str(out), "--policy", policy, "--seed", "3", "--budget-s", "0.2") == 0
    data = json.loads(out.read_text())
    scenario = load_scenario(GEO)
    assert set(data) >= {"routes", "predicted_iteration_s", "planning_s"}
    assert [r["microbatch"] for r in data["routes"]] == list(range(36))
    assert data["predicted_iteration_s"] > 0 and data["planning_s"] > 0
    rules = scenario.rules if policy != "full" else PathRules(4, 0.0, True)
    stage_of = {n.id: n.stage for n in scenario.nodes}
    routes = routes_of(data, scenario)
    for r in routes:
        assert validate_route(r, rules, peer_stage=stage_of) == []
        assert r.path[0] == r.path[-1] == r.origin
    if policy != "full":
        assert balance_violations(stage_counts(routes, rules), rules) == []
    assert "36 routes" in capsys.readouterr().out


def test_plan_is_reproducible_without_a_search_budget(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run("plan", GEO, "--out", str(a), "--budget-s", "0") == 0
    assert run("plan", GEO, "--out", str(b), "--budget-s", "0") == 0
    assert json.loads(a.read_text())["routes"] == json.loads(b.read_text())["routes"]


def test_bad_scenario_field_gives_rc_2_and_names_it(tmp_path, capsys):
    with open(GEO) as f:
        data = json.load(f)
    data["nodes"][3]["forward_s"] = -2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert run("plan", str(bad), "--out", str(tmp_path / "r.json")) == 2
    err = capsys.readouterr().err
    assert err.strip() == "swarmrt plan: error: nodes[3].forward_s must be > 0, got -2"
    assert not (tmp_path / "r.json").exists()
    assert run("simulate", str(bad)) == 2
    assert "nodes[3].forward_s must be > 0" in capsys.readouterr().err


def test_missing_file_and_bad_json_give_rc_2(tmp_path, capsys):
    assert run("plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r.json")) == 2
    assert "cannot read" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert run("simulate", str(broken)) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and len(err.strip().splitlines()) == 1


def test_simulate_prints_a_table_per_policy(tmp_path, capsys):
    out = tmp_path / "reports.json"
    assert run("simulate", GEO, "--iterations", "1", "--plan-budget-s", "0.1", "--json", str(out)) == 0
    text = capsys.readouterr().out
    for policy in ("full", "swarm", "random-skip", "swarmrt"):
        assert any(line.startswith(policy + " ") for line in text.splitlines()), policy
    assert "idle fraction" in text and "microbatches" in text and "retried" in text
    reports = {r["policy"]: r for r in json.loads(out.read_text())}
    assert reports["swarmrt"]["mean_iteration_s"] < reports["full"]["mean_iteration_s"]
    assert all(r["completed"] == 36 and r["lost"] == 0 for r in reports.values())


def test_simulate_with_preemptions_and_generated_peers(capsys):
    assert run("simulate", GEO, "--policy", "swarmrt", "--iterations", "2", "--preempt-mtbf", "120",
               "--downtime", "30", "--generate-peers", "60", "--plan-budget-s", "0.1") == 0
    text = capsys.readouterr().out
    assert "60 nodes" in text and "preemption MTBF 120.0 s" in text


def test_bad_numbers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as e:
        run("simulate", GEO, "--iterations", "0")
    assert e.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err
