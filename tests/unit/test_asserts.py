"""The swarm assertions on made-up ledgers and curves: they pass on good runs and name what is wrong."""

import types

import pytest

from swarmrt.config import config_from_dict
from swarmrt.localswarm.ledger import check_exactly_once
from swarmrt.testing.asserts import assert_exactly_once, assert_loss_close

CONFIG = config_from_dict({"model": {"stages": 3}, "data": {"batch_size": 8, "microbatch_size": 4}})


class FakeSwarm:
    def __init__(self, ledgers, died=None):
        self.config = CONFIG
        self.ledgers = ledgers
        self.died = died or {}

    def ledger(self, stage):
        return list(self.ledgers[stage])

    def died_with_peers(self, stage):
        return list(self.died.get(stage, ()))


def good_ledgers(trainer="t.1", steps=3):
    ids = [f"{trainer}:{s}:{i}:0" for s in range(steps) for i in range(2)]
    return {stage: list(ids) for stage in range(3)}


SUMMARY = {"steps": 3, "microbatches": 6, "applied": 6, "duplicates": 0, "partially_applied": 0}
TRAINER = types.SimpleNamespace(name="trainer1", trainer_id="t.1")


def test_a_clean_run_passes_and_returns_the_ledgers():
    ledgers = assert_exactly_once(FakeSwarm(good_ledgers()), SUMMARY, TRAINER)
    assert ledgers[2] == set(good_ledgers()[2])


def test_a_microbatch_applied_by_two_attempts_is_named():
    ledgers = good_ledgers()
    ledgers[1].append("t.1:2:1:1")  # a retry applied what attempt 0 had applied already
    with pytest.raises(AssertionError, match=r"stage 1: microbatch\(es\) \(step, index\) \[\(2, 1\)\] of trainer1"):
        assert_exactly_once(FakeSwarm(ledgers), SUMMARY, TRAINER)


def test_a_lost_microbatch_and_a_repeated_id_are_named():
    ledgers = good_ledgers()
    ledgers[0].remove("t.1:1:0:0")
    ledgers[2].append("t.1:0:0:0")
    with pytest.raises(AssertionError) as e:
        assert_exactly_once(FakeSwarm(ledgers), SUMMARY, TRAINER)
    assert "stage 0: 1 microbatch(es) (step, index) of trainer1 were never applied: [(1, 0)]" in str(e.value)
    assert "stage 2 applied 1 microbatch id(s) more than once: ['t.1:0:0:0']" in str(e.value)


def test_the_trainers_own_accounting_is_checked():
    with pytest.raises(AssertionError, match="applied 5 of 6 microbatches"):
        assert_exactly_once(FakeSwarm(good_ledgers()), {**SUMMARY, "applied": 5})
    with pytest.raises(AssertionError, match="counted 1 stage backward"):
        assert_exactly_once(FakeSwarm(good_ledgers()), {**SUMMARY, "duplicates": 1})


def test_the_product_check_reports_violations_without_raising():
    """The demo prints the report; only the testing wrapper turns it into an AssertionError."""
    clean = check_exactly_once(FakeSwarm(good_ledgers()), SUMMARY, TRAINER)
    assert clean.ok and clean.problems == () and clean.ledgers[0] == set(good_ledgers()[0])
    assert "every microbatch applied exactly once" in clean.describe()
    ledgers = good_ledgers()
    ledgers[2].remove("t.1:2:1:0")
    broken = check_exactly_once(FakeSwarm(ledgers), {**SUMMARY, "applied": 5}, TRAINER)
    assert not broken.ok
    assert broken.problems == ("the trainer applied 5 of 6 microbatches",
                               "stage 2: 1 microbatch(es) (step, index) of trainer1 were never applied: [(2, 1)]")
    assert broken.describe().startswith("exactly-once violated:\n  the trainer applied 5 of 6")


def test_a_resumed_trainer_is_checked_from_its_start_step():
    ledgers = {stage: [f"t.1:{s}:{i}:0" for s in (3, 4) for i in range(2)] for stage in range(3)}
    summary = {**SUMMARY, "steps": 2, "microbatches": 4, "applied": 4, "start_step": 3, "next_step": 5}
    assert check_exactly_once(FakeSwarm(ledgers), summary, TRAINER).ok
    ledgers[1].remove("t.1:3:0:0")
    assert check_exactly_once(FakeSwarm(ledgers), summary, TRAINER).problems == (
        "stage 1: 1 microbatch(es) (step, index) of trainer1 were never applied: [(3, 0)]",)


def test_loss_curves_within_tolerance_pass_and_a_deviation_names_its_step():
    reference = [{"step": s, "loss": 2.0 / (1 + s)} for s in range(20)]
    noisy = [{"step": s, "loss": r["loss"] + (0.02 if s % 2 else -0.02)} for s, r in enumerate(reference)]
    assert assert_loss_close(noisy, reference, atol=0.01, rtol=0.0, window=2) < 0.01  # smoothing cancels noise
    worse = [{"step": s, "loss": r["loss"] + (0.5 if s >= 12 else 0)} for s, r in enumerate(reference)]
    with pytest.raises(AssertionError, match=r"loss at step 12 \(mean of the last 1 steps\) is 0.6538"):
        assert_loss_close(worse, reference, atol=0.1, rtol=0.0, window=1)
    better = [max(0.0, r["loss"] - 0.5) for r in reference]
    assert_loss_close(better, [r["loss"] for r in reference], atol=0.1, rtol=0.0, window=3, allow_better=True)
    with pytest.raises(AssertionError, match="off by -0.5"):
        assert_loss_close(better, [r["loss"] for r in reference], atol=0.1, rtol=0.0, window=1)
    with pytest.raises(AssertionError, match="only 2 step"):
        assert_loss_close([1.0, 1.0], [1.0, 1.0, 1.0], window=5)


def test_a_reapply_of_what_died_with_a_killed_peer_is_recovery_not_a_double():
    """A peer killed after applying, before answering: its update is gone with it, and the
    sibling's apply is the only one the surviving model holds."""
    ledgers = good_ledgers()
    ledgers[1].append("t.1:2:1:0")  # the killed peer's copy (the sibling's is already in)
    report = check_exactly_once(FakeSwarm(ledgers, died={1: ["t.1:2:1:0"]}), SUMMARY, TRAINER)
    assert report.ok, report.describe()
    assert report.recovered == ("stage 1: 1 microbatch id(s) applied by a peer that died before its state left it "
                                "were applied again elsewhere (recovered, not doubled): ['t.1:2:1:0']",)
    assert "recovered, not doubled" in report.describe()
    # the same pair with both copies surviving (the dead peer had let its state out) is a double
    with pytest.raises(AssertionError, match=r"stage 1 applied 1 microbatch id\(s\) more than once"):
        assert_exactly_once(FakeSwarm(ledgers), SUMMARY, TRAINER)
    # and a third, surviving copy is still a double
    ledgers[1].append("t.1:2:1:0")
    assert not check_exactly_once(FakeSwarm(ledgers, died={1: ["t.1:2:1:0"]}), SUMMARY, TRAINER).ok


def test_what_died_with_a_peer_is_read_from_failed_peers_ledgers_only(tmp_path):
    """``LocalSwarm.died_with_peers``: applies after a peer's last state mark, by a peer that was
    killed or failed; a peer still running or one that exited cleanly loses nothing it counted."""
    import subprocess
    import sys

    from swarmrt.localswarm.swarm import LocalSwarm, Role

    def role(name, code, lines):
        proc = subprocess.Popen([sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), {code})"
                                 if code < 0 else f"raise SystemExit({code})"])
        proc.wait(timeout=30)
        ledger = tmp_path / f"{name}.ledger"
        ledger.write_text("".join(line + "\n" for line in lines))
        return Role(name, proc, tmp_path / f"{name}.log", stage=1, ledger=ledger)

    swarm = LocalSwarm.__new__(LocalSwarm)  # only its roles are read
    swarm.roles = [role("peer1-s1", -9, ["1 a", "1 -", "1 b", "0 c"]),   # SIGKILLed: b (stage 1) died with it
                   role("peer2-s1", 0, ["1 d"]),                       # drained and left cleanly
                   role("peer3-s1", 1, ["1 e", "1 -"])]                # failed, but after letting e out
    assert swarm.ledger(1) == ["a", "b", "d", "e"]
    assert swarm.died_with_peers(1) == ["b"]
    assert swarm.died_with_peers(0) == ["c"]
