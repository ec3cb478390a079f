"""A peer's ledger file: what it applied, for checking exactly-once from outside the process.

A peer started with ``--ledger PATH`` appends one line per microbatch whose
gradients it adds, ``STAGE MICROBATCH_ID`` (a peer that moves between stages
writes each line under the stage it served then), and a line ``STAGE -``
whenever that stage's state may have left the process: served to a joiner,
written to a checkpoint, or sent into an averaging round. What a peer applied
after its last ``-`` exists nowhere else, so it dies with the peer; the
exactly-once check (:mod:`swarmrt.localswarm.ledger`) reads the mark to tell a
sibling's legitimate re-apply of such a microbatch from a real double apply.

The file is written line-buffered from the stage's one compute thread, so a
killed peer leaves every line it wrote whole.
"""

from __future__ import annotations

import dataclasses
import pathlib

__all__ = ["SHARED", "LedgerEntry", "LedgerWriter", "read_ledger"]

SHARED = "-"
"""The mark (``STAGE -``): everything applied above it may live on outside this peer."""


class LedgerWriter:
    """Appends to a ledger file (see the module docstring)."""

    def __init__(self, path: str | pathlib.Path):
        self._file = open(path, "a", buffering=1)

    def applied(self, stage: int, microbatch_id: str) -> None:
        self._file.write(f"{stage} {microbatch_id}\n")

    def shared(self, stage: int) -> None:
        self._file.write(f"{stage} {SHARED}\n")

    def close(self) -> None:
        self._file.close()


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    stage: int
    microbatch_id: str
    shared: bool
    """False when the peer never let its state out after applying it (no ``-`` line after it)."""


def read_ledger(path: str | pathlib.Path) -> list[LedgerEntry]:
    """Every applied microbatch in a ledger file, in order, each marked with whether a ``-`` for its
    stage followed. Lines that do not parse (a torn last line) are skipped."""
    rows: list[tuple[int, str]] = []
    for line in pathlib.Path(path).read_text().splitlines():
        stage, _, mb = line.partition(" ")
        if mb and stage.isdigit():
            rows.append((int(stage), mb))
    entries: list[LedgerEntry] = []
    shared_stages: set[int] = set()
    for stage, mb in reversed(rows):
        if mb == SHARED:
            shared_stages.add(stage)
        else:
            entries.append(LedgerEntry(stage, mb, stage in shared_stages))
    return entries[::-1]
