"""Assertions a fault test needs, with failure messages that say what went wrong where.

- :func:`assert_exactly_once`: no microbatch lost, none applied twice, by the
  trainer's own accounting and by the ledgers of every peer (dead ones too).
- :func:`assert_loss_close`: the loss curve of a faulty run stays within a
  tolerance of a fault-free one.
- :func:`assert_outer_rounds_agree`: every peer of a DiLoCo all-reduce group
  ends the round with the same global params (hash), read from the peers' logs.
- :func:`assert_no_leftovers`: nothing a swarm started is still running.
"""

from __future__ import annotations

import collections
import re
from typing import Sequence

from swarmrt.localswarm.ledger import check_exactly_once
from swarmrt.localswarm.swarm import LocalSwarm, Role


def assert_exactly_once(swarm: LocalSwarm, summary: dict, trainer: Role | None = None) -> dict[int, set[str]]:
    """Every microbatch the trainer applied shows up exactly once in each stage's ledgers.

    Checks the trainer's summary (no duplicates, no partially applied
    microbatch, applied == started) and the ledgers of every peer that ever
    served each stage (a ledger is appended when a peer adds a microbatch's
    gradients): no id twice. With ``trainer`` (a role from
    :meth:`LocalSwarm.start_trainer`) it also checks that microbatch
    ``(step, index)`` of that trainer was applied exactly once per stage over
    all its attempts, for every step it ran: nothing lost, nothing applied by
    two attempts. (With stage skipping on, middle stages may legitimately miss
    a microbatch; then only "not twice" is checked for them.) The check itself
    is :func:`swarmrt.localswarm.ledger.check_exactly_once`; this raises
    ``AssertionError`` listing every violation.

    Returns ``{stage: set of microbatch ids in its ledgers}``.
    """
    report = check_exactly_once(swarm, summary, trainer)
    if not report.ok:
        raise AssertionError(report.describe())
    return report.ledgers


def _losses(curve: Sequence) -> dict[int, float]:
    if curve and isinstance(curve[0], dict):
        return {int(r["step"]): float(r["loss"]) for r in curve}
    return {i: float(v) for i, v in enumerate(curve)}


def assert_loss_close(faulty: Sequence, reference: Sequence, atol: float = 0.1, rtol: float = 0.05,
                      window: int = 5, allow_better: bool = False) -> float:
    """The faulty run's loss curve stays within ``atol + rtol * |reference|`` of the reference's.

    Curves are metrics records (``{"step", "loss"}``, as in a metrics file or
    :attr:`FaultRun.metrics`) or plain lists of losses. Both are smoothed with
    a trailing mean over ``window`` steps (single steps are noisy) and compared
    at every step both have. ``allow_better``: only fail when the faulty run
    is worse. Returns the largest deviation seen.
    """
    a, b = _losses(faulty), _losses(reference)
    steps = sorted(set(a) & set(b))
    if len(steps) < window:
        raise AssertionError(f"only {len(steps)} step(s) in common between the curves; need at least {window}")
    worst = 0.0
    for k in range(window - 1, len(steps)):
        span = steps[k - window + 1:k + 1]
        fa = sum(a[s] for s in span) / window
        fb = sum(b[s] for s in span) / window
        diff = fa - fb if allow_better else abs(fa - fb)
        tolerance = atol + rtol * abs(fb)
        if diff > tolerance:
            raise AssertionError(f"loss at step {steps[k]} (mean of the last {window} steps) is {fa:.4f} in the faulty "
                                 f"run vs {fb:.4f} without faults: off by {fa - fb:+.4f}, tolerance {tolerance:.4f}")
        if diff > worst:
            worst = diff
    return worst


def assert_no_leftovers(swarm: LocalSwarm) -> None:
    """Nothing the swarm started (roles, DHT children, p2pd) is still alive; call after stopping it."""
    left = swarm.leftover_processes()
    if left:
        raise AssertionError(f"{len(left)} process(es)/group(s) of swarm {swarm.swarm_id} still alive: {left}")


# The line swarmrt.local_sgd.outer logs after every outer round (its format is this helper's contract).
OUTER_ROUND_OK = re.compile(r"stage (\d+): outer round (\d+) ok: group (\d+), contributors (\d+), ([\d.]+) s, "
                            r"hash (\w+), members ([\w,]+)")


def outer_rounds(swarm: LocalSwarm, pattern: re.Pattern = OUTER_ROUND_OK) -> dict[tuple, dict[str, re.Match]]:
    """Successful outer rounds in every peer's log (dead peers too):
    ``{(stage, round, members): {peer name: match}}`` (groups: hash = ``match.group(6)``).
    With another ``pattern``, keys are ``(int(group 1), int(group 2))``."""
    found: dict[tuple, dict[str, re.Match]] = collections.defaultdict(dict)
    for role in swarm.peers(alive=False):
        for m in pattern.finditer(role.log.read_text(errors="replace")):
            key = (int(m.group(1)), int(m.group(2))) + ((m.group(7),) if pattern is OUTER_ROUND_OK else ())
            found[key][role.name] = m
    return found


def assert_outer_rounds_agree(swarm: LocalSwarm) -> tuple[dict, int]:
    """Every peer of one all-reduce group ends the round with the same global-params hash.
    (A stage whose peers reach a round at different times may average in two groups.)

    Returns ``(rounds, shared)``: :func:`outer_rounds` and how many groups had 2+ peers.
    """
    ok = outer_rounds(swarm)
    shared = 0
    for (stage, rnd, members), by_peer in ok.items():
        hashes = {m.group(6) for m in by_peer.values()}
        if len(hashes) != 1:
            raise AssertionError(f"stage {stage} outer round {rnd} group {members}: peers ended with different "
                                 f"params: " + str({name: m.group(0) for name, m in by_peer.items()}))
        shared += len(by_peer) >= 2
    return ok, shared
