"""``swarmrt status``'s figures and text, from records built by hand (no DHT): per-stage throughput and
peers by state, moves in flight, the swarm's balance quality, and the same figures in the JSON report."""

import json

from swarmrt.discovery.records import StageRecord
from swarmrt.roles import status


def rec(name, stage, throughput=10.0, state="serving", **fields):
    value = StageRecord(f"12D3KooW{name * 12}", stage, f"10.0.0.{ord(name) - 64}:50051", throughput, 1, 7, state,
                        100.0, **fields).to_value()
    return {**value, "heartbeat_age_s": 1.5}


def flat(lines):
    """The text with wrapped lines joined again."""
    return " ".join(line.strip() for line in lines)


def report_of(stages, monkeypatch):
    """read_status over ``stages`` (lists of record dicts) as a fake DHT would return them."""
    by_stage = {s: [StageRecord.from_value(d) for d in peers] for s, peers in enumerate(stages)}
    monkeypatch.setattr(status, "read_runs", lambda dht: {"r1": {"stages": len(stages), "config": "abc"}})
    monkeypatch.setattr(status, "read_stage", lambda dht, run_id, stage: by_stage[stage])
    return status.read_status(object(), clock=lambda: 101.5)


def test_a_balanced_swarm_shows_stage_totals_and_its_balance_quality(monkeypatch):
    report = report_of([[rec("A", 0, 30.0), rec("B", 0, 10.0)], [rec("C", 1, 20.0)], [rec("D", 2, 30.0)]],
                       monkeypatch)
    run = report["r1"]
    assert [t["throughput"] for t in run["stage_totals"]] == [40.0, 20.0, 30.0]
    assert run["stage_totals"][0]["peers"] == 2 and run["stage_totals"][0]["states"] == {"serving": 2}
    assert run["moves"] == [] and run["joining"] == []
    b = run["balance"]
    assert b["bottleneck"] == 20.0 and b["mean"] == 30.0 and b["quality"] == round(20 / 30, 3)
    assert b["empty_stages"] == [] and b["can_serve_everything"] is True
    lines = status.format_status(report)
    assert lines[1] == "  stage 0: 2 peers (2 serving), 40.0 samples/s"
    assert lines[-1] == "  balance quality 0.67 (bottleneck 20.0 of mean 30.0 samples/s)"
    assert not any("moves in flight" in line for line in lines)
    assert max(map(len, lines)) <= 100


def test_moves_in_flight_and_an_empty_stage_the_swarm_is_filling(monkeypatch):
    stages = [[rec("A", 0, 30.0, pinned=True), rec("B", 0, 30.0, "moving", target=2), rec("C", 0, 25.0)],
              [rec("D", 1, 40.0)],
              [rec("E", 2, 0.0, "joining")]]
    report = report_of(stages, monkeypatch)
    run = report["r1"]
    assert run["stage_totals"][0] == {"stage": 0, "throughput": 55.0, "peers": 3,
                                      "states": {"serving": 2, "moving": 1}}
    assert run["stage_totals"][2]["throughput"] == 0.0 and run["stage_totals"][2]["states"] == {"joining": 1}
    assert run["moves"] == [{"peer_id": "12D3KooW" + "B" * 12, "from": 0, "to": 2}]
    assert run["joining"] == [{"peer_id": "12D3KooW" + "E" * 12, "stage": 2}]
    b = run["balance"]
    assert b["quality"] == 0.0 and b["empty_stages"] == [2] and b["can_serve_everything"] is True
    assert b["quality_after_moves"] > 0.5
    lines = status.format_status(report)
    text = "\n".join(lines)
    assert "moving>2" in text and "pinned" in text
    assert "  moves in flight: BBBBBBBBBBBB stage 0 -> 2; EEEEEEEEEEEE joining stage 2" in lines
    assert "stage 2 has no peer (1 peer moving there, 1 peer joining it)" in text
    assert max(map(len, lines)) <= 100
    json.dumps(report)  # the --json report carries the same figures


def test_an_empty_stage_no_peer_can_fill_says_which_stage_to_start(monkeypatch):
    stages = [[rec("A", 0, pinned=True), rec("B", 0, pinned=True)], [rec("C", 1)], []]
    report = report_of(stages, monkeypatch)
    b = report["r1"]["balance"]
    assert b["empty_stages"] == [2] and b["can_serve_everything"] is False and "stage 2" in b["reason"]
    lines = status.format_status(report)
    assert "  stage 2: no peers" in lines
    assert "stage 2 has no peer (no peer elsewhere can move there: start a peer with --stage 2)" in flat(lines)
    # an unpinned spare peer elsewhere could fill it
    stages[0][1] = rec("B", 0)
    lines = status.format_status(report_of(stages, monkeypatch))
    assert "stage 2 has no peer (peers elsewhere can move there)" in flat(lines)


def test_a_report_without_the_summary_is_still_formatted():
    """An older report (JSON saved before the summary existed) gets the summary computed when formatted."""
    lines = status.format_status({"r1": {"config": "abc", "stages": [[rec("A", 0)], []]}})
    assert lines[1] == "  stage 0: 1 peer (1 serving), 10.0 samples/s" and "stage 1 has no peer" in flat(lines)
