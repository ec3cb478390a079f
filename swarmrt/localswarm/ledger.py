"""Exactly-once accounting of a run: the trainer's summary against the peers' ledgers.

Every peer started with ``--ledger`` appends the id of each microbatch whose
gradients it adds (``TRAINER:step:index:attempt``; the file format is
:mod:`swarmrt.pipeline.ledger`). :func:`check_exactly_once` reads those ledgers
through the swarm and returns an :class:`ExactlyOnceReport` listing every
violation; it never raises for a violation, so the demo can print it and
``swarmrt.testing.assert_exactly_once`` can turn it into a test failure.

"Exactly once" is about the model that survives. A peer killed after applying
a microbatch but before answering takes that update with it (its state had
not left the process since), and the trainer, told nothing, rightly has a
sibling apply it again. Such a pair is not a double apply; the report lists
it as recovered. A pair where both copies survive is a violation.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Protocol

from swarmrt.config import RunConfig


class LedgerSource(Protocol):
    """What the check reads: a :class:`~swarmrt.localswarm.swarm.LocalSwarm` (or a fake in a unit test)."""

    config: RunConfig

    def ledger(self, stage: int) -> list[str]: ...

    def died_with_peers(self, stage: int) -> list[str]:
        """The ids of :meth:`ledger` whose update died with a failed peer before its state left it."""
        ...


@dataclasses.dataclass(frozen=True)
class ExactlyOnceReport:
    ledgers: dict[int, set[str]]
    """``{stage: set of microbatch ids in the ledgers of every peer that ever served it}``."""
    problems: tuple[str, ...]
    """One line per violation; empty when every microbatch was applied exactly once."""
    recovered: tuple[str, ...] = ()
    """One line per stage where a microbatch whose update died with a killed peer was applied again."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        recovered = "".join(f"\n  {line}" for line in self.recovered)
        if self.ok:
            return "every microbatch applied exactly once on every stage (trainer and peer ledgers agree)" + recovered
        return "exactly-once violated:\n  " + "\n  ".join(self.problems) + recovered


def check_exactly_once(swarm: LedgerSource, summary: dict, trainer=None) -> ExactlyOnceReport:
    """Every microbatch the trainer applied shows up exactly once in each stage's ledgers.

    Checks the trainer's summary (no duplicates, no partially applied
    microbatch, applied == started) and the ledgers of every peer that ever
    served each stage: no id twice. With ``trainer`` (a role with ``name`` and
    ``trainer_id``, from ``LocalSwarm.start_trainer``) it also checks that
    microbatch ``(step, index)`` of that trainer was applied exactly once per
    stage over all its attempts, for every step it ran: nothing lost, nothing
    applied by two attempts. (With stage skipping on, middle stages may
    legitimately miss a microbatch; then only "not twice" is checked for them.)
    An apply whose update died with its peer (``swarm.died_with_peers``) does
    not count towards "twice"; a stage where one was applied again gets a line
    in ``recovered``.
    """
    problems, recovered = [], []
    if summary.get("duplicates"):
        problems.append(f"the trainer counted {summary['duplicates']} stage backward(s) applied twice")
    if summary.get("partially_applied"):
        problems.append(f"{summary['partially_applied']} microbatch(es) were applied on some stages only")
    if summary.get("applied") != summary.get("microbatches"):
        problems.append(f"the trainer applied {summary.get('applied')} of {summary.get('microbatches')} microbatches")
    config = swarm.config
    last = config.num_stages - 1
    skipping = getattr(config.routing, "skip_ratio", 0.0) > 0
    ledgers = {}
    for stage in range(config.num_stages):
        ids = swarm.ledger(stage)
        ledgers[stage] = set(ids)
        died = collections.Counter(swarm.died_with_peers(stage))
        surviving = collections.Counter(ids) - died
        repeated = [mb for mb, n in surviving.items() if n > 1]
        if repeated:
            problems.append(f"stage {stage} applied {len(repeated)} microbatch id(s) more than once: {repeated[:5]}")
        again = sorted(mb for mb in died if mb in surviving or died[mb] > 1)
        if again:
            recovered.append(f"stage {stage}: {len(again)} microbatch id(s) applied by a peer that died before its "
                             f"state left it were applied again elsewhere (recovered, not doubled): {again[:5]}")
        if trainer is None or trainer.trainer_id is None:
            continue
        per_slot = _slots(ids, trainer.trainer_id)
        twice = sorted(slot for slot, n in _slots(surviving.elements(), trainer.trainer_id).items() if n > 1)
        if twice:
            problems.append(f"stage {stage}: microbatch(es) (step, index) {twice[:5]} of {trainer.name} were applied "
                            f"by more than one attempt")
        if skipping and 0 < stage < last:
            continue
        first = summary.get("start_step", 0)  # a resumed trainer starts past 0
        expected = {(step, i) for step in range(first, summary.get("next_step", first + summary.get("steps", 0)))
                    for i in range(config.data.microbatches_per_step)}
        lost = sorted(expected - set(per_slot))
        if lost:
            problems.append(f"stage {stage}: {len(lost)} microbatch(es) (step, index) of {trainer.name} were never "
                            f"applied: {lost[:5]}")
    return ExactlyOnceReport(ledgers, tuple(problems), tuple(recovered))


def _slots(ids, trainer_id: str) -> collections.Counter:
    """``{(step, index): number of ids}`` over ``trainer_id``'s microbatch ids (``TRAINER:step:index:attempt``)."""
    prefix = trainer_id + ":"
    return collections.Counter(tuple(int(x) for x in mb[len(prefix):].split(":")[:2])
                               for mb in ids if mb.startswith(prefix))
