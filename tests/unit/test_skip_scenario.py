"""Scenario files: parsing, errors that name the bad field, generated swarms, link models."""

from __future__ import annotations

import copy
import json
import os
import random

import numpy as np
import pytest

from swarmrt.sim import scenarios
from swarmrt.routing.links import FunctionLinks, MatrixLinks, RegionLinks
from swarmrt.sim.scenario import ScenarioError, generate_scenario, load_scenario, parse_scenario, region_table

pytestmark = pytest.mark.timeout(30)

GEO = scenarios.path("geo-aws18")


@pytest.fixture(scope="module")
def raw():
    with open(GEO) as f:
        return json.load(f)


def test_geo_aws18_parses(raw):
    s = parse_scenario(raw)
    assert (s.stages, s.stages_visited_per_microbatch, s.first_stage_is_also_last) == (4, 3, True)
    assert s.origins == (0, 1, 2, 3, 4, 5)
    assert s.microbatches_per_iteration == 36
    assert s.rules.skip_ratio == pytest.approx(0.25)
    # Sofia (0) -> Singapore (1): 0.301 s + 67109296 B / 129386497 B/s
    assert s.links.transfer_s(0, 1) == pytest.approx(raw["latency_s"][0][1] + 67109296 / raw["bandwidth_Bps"][0][1])
    assert s.links.transfer_s(3, 3) == 0.0


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["nodes"][3].update(forward_s=0), "nodes[3].forward_s must be > 0, got 0"),
    (lambda d: d["nodes"][3].update(forward_s="fast"), "nodes[3].forward_s must be > 0, got 'fast'"),
    (lambda d: d["nodes"][5].update(memory_microbatches=0), "nodes[5].memory_microbatches must be an integer >= 1"),
    (lambda d: d["nodes"][2].pop("stage"), "nodes[2]: missing field 'stage'"),
    (lambda d: d["nodes"][2].update(speed=1), "nodes[2]: unknown field 'speed'"),
    (lambda d: d["nodes"][4].update(id=7), "nodes[4].id must equal its position 4"),
    (lambda d: d["nodes"][4].update(stage=4), "nodes[4].stage must be < stages (4), got 4"),
    (lambda d: d.pop("microbatches_per_origin"), "missing field 'microbatches_per_origin'"),
    (lambda d: d.update(skip_ratio=0.3), "unknown field 'skip_ratio'"),
    (lambda d: d.update(stages_visited_per_microbatch=5), "stages_visited_per_microbatch must be an integer in [1, 4]"),
    (lambda d: d.update(backward_factor=-1), "backward_factor must be > 0"),
    (lambda d: d["latency_s"].pop(), "latency_s must be a list of 18 rows"),
    (lambda d: d["latency_s"][2].pop(), "latency_s[2] must be a list of 18 numbers"),
    (lambda d: d["latency_s"][1].__setitem__(2, -0.1), "latency_s[1][2] must be >= 0, got -0.1"),
    (lambda d: d["bandwidth_Bps"][0].__setitem__(1, 0), "bandwidth_Bps[0][1] must be > 0, got 0"),
    (lambda d: [n.update(stage=0) for n in d["nodes"] if n["stage"] == 2], "stage 2 has no node"),
])
def test_errors_name_the_bad_field(raw, edit, message):
    bad = copy.deepcopy(raw)
    edit(bad)
    with pytest.raises(ScenarioError) as e:
        parse_scenario(bad)
    assert message in str(e.value)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"stages": 4,,}')
    with pytest.raises(ScenarioError, match=r"not valid JSON: line 1 column 14"):
        load_scenario(str(broken))
    with pytest.raises(ScenarioError, match="must be a JSON object"):
        parse_scenario([1, 2])


def test_region_table_of_geo(raw):
    names, lat, bw = region_table(parse_scenario(raw))
    assert len(names) == 11 and "Sofia" in names
    sofia, singapore = names.index("Sofia"), names.index("Singapore")
    assert lat[sofia, singapore] == pytest.approx(0.301)
    assert lat[sofia, sofia] == pytest.approx(0.01)      # nodes 0 and 11 are both in Sofia
    assert bw[sofia, sofia] == pytest.approx(429496729.6)


def test_generated_swarm_is_seeded_and_shaped_like_its_base(raw):
    base = parse_scenario(raw)
    a = generate_scenario(base, 1000, random.Random(7))
    b = generate_scenario(base, 1000, random.Random(7))
    c = generate_scenario(base, 1000, random.Random(8))
    assert len(a.nodes) == 1000
    assert [len(a.nodes_of(s)) for s in range(4)] == [333, 223, 222, 222]
    assert [n.forward_s for n in a.nodes] == [n.forward_s for n in b.nodes]
    assert [n.forward_s for n in a.nodes] != [n.forward_s for n in c.nodes]
    assert isinstance(a.links, RegionLinks)
    assert a.rules == base.rules and a.microbatches_per_origin == 6
    with pytest.raises(ScenarioError, match="peers must be >= stages"):
        generate_scenario(base, 3, random.Random(0))


def test_link_models_agree():
    lat = np.array([[0.0, 0.1, 0.2], [0.1, 0.0, 0.3], [0.2, 0.3, 0.0]])
    bw = np.array([[1.0, 100.0, 50.0], [100.0, 1.0, 25.0], [50.0, 25.0, 1.0]])
    m = MatrixLinks(lat, bw, activation_bytes=100.0, per_hop_overhead_s=0.05)
    assert m.transfer_s(0, 2) == pytest.approx(0.2 + 2.0 + 0.05)
    assert m.latency_s(0, 2) == pytest.approx(0.2) and m.serialization_s(0, 2) == pytest.approx(2.05)
    assert list(m.transfer_row(1, [0, 1, 2])) == pytest.approx([1.15, 0.0, 4.35])
    r = RegionLinks([0, 1, 2], lat + np.eye(3) * 0.01, bw + np.eye(3) * 99, 100.0, 0.05)
    assert list(r.transfer_row(1, [0, 1, 2])) == pytest.approx([1.15, 0.0, 4.35])
    f = FunctionLinks(lambda a, b: m.transfer_s(a, b), latency_fn=lambda a, b: m.latency_s(a, b))
    assert list(f.transfer_row(1, [0, 1, 2])) == pytest.approx([1.15, 0.0, 4.35])
    assert f.serialization_s(0, 2) == pytest.approx(2.05)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        MatrixLinks(lat, np.zeros((3, 3)), 1.0)
