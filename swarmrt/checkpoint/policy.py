"""When and by whom a stage checkpoint is written (pure).

The I/O lives in :mod:`swarmrt.checkpoint.store`; this module only decides.
Like every decision module, each function returns what it decided
and why, and time is an argument (``now``), never read from a clock.

- It reads :class:`swarmrt.config.CheckpointSection`, the ``[checkpoint]`` section of the run config.
- :func:`checkpoint_due`: is a periodic checkpoint due at this step and time?
- :func:`is_checkpoint_writer`: which one of a stage's live peers writes it.
- :func:`leave_checkpoint_due`: must a peer that is leaving write one first?
- :func:`training_config_hash`: the config hash a checkpoint records.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

from swarmrt.config import CheckpointSection, ConfigError


CheckpointConfigError = ConfigError  # kept as a name: the section lives in swarmrt.config


def checkpoint_due(step: int, last_step: int, now: float, last_time: float,
                   section: CheckpointSection) -> tuple[bool, str]:
    """Is a periodic checkpoint due?

    ``step``: the stage's step now; ``last_step``: the step of the last checkpoint this peer
    wrote or loaded (its starting step if none); ``now`` / ``last_time``: seconds on any one
    clock, ``last_time`` being when that checkpoint was written (or when the peer started).

    By steps, a checkpoint is due when ``step`` crossed a multiple of ``every_steps`` since
    ``last_step``: every peer of a stage then agrees on which steps are written. Nothing is
    due when the step did not advance (a checkpoint would repeat the last one).
    """
    if not section.enabled:
        return False, "checkpoints are off (checkpoint.location is not set)"
    if step <= last_step:
        return False, f"step {step} has not advanced past the last checkpoint (step {last_step})"
    every = section.every_steps
    if every and step // every > last_step // every:
        return True, f"step {step} crossed a multiple of checkpoint.every_steps={every} since step {last_step}"
    if section.every_minutes:
        elapsed = now - last_time
        if elapsed >= section.every_minutes * 60:
            return True, (f"{elapsed / 60:.1f} min since the last checkpoint >= "
                          f"checkpoint.every_minutes={section.every_minutes:g}")
    if not every and not section.every_minutes:
        return False, "no periodic checkpoints (checkpoint.every_steps and every_minutes are 0)"
    waits = []
    if every:
        waits.append(f"next at step {(last_step // every + 1) * every}")
    if section.every_minutes:
        waits.append(f"or in {(section.every_minutes * 60 - (now - last_time)) / 60:.1f} min")
    return False, "not due yet: " + " ".join(waits).removeprefix("or ")


def is_checkpoint_writer(self_id: str, live_peer_ids: Iterable[str]) -> tuple[bool, str]:
    """Only one peer per stage writes a periodic checkpoint: the one with the smallest peer id
    among the stage's live peers (``live_peer_ids``, e.g. its serving DHT records; ``self_id``
    counts as live whether or not it is listed).

    Peers whose views of the stage differ for a heartbeat may both think they are the
    writer; the writer in :mod:`swarmrt.checkpoint.store` tolerates that (each writes a
    complete file and renames it into place; the last rename wins).
    """
    ids = set(live_peer_ids) | {self_id}
    writer = min(ids)
    if writer == self_id:
        return True, f"smallest peer id of {len(ids)} live peer(s) of the stage"
    return False, f"peer {writer} writes this stage's checkpoints (smallest peer id of {len(ids)})"


def leave_checkpoint_due(self_id: str, serving_peer_ids: Iterable[str],
                         section: CheckpointSection) -> tuple[bool, str]:
    """Must a draining peer write a checkpoint before it leaves?

    Yes when checkpoints are on, ``on_leave`` is set and no *other* peer still serves the
    stage (``serving_peer_ids``: peers announced as serving, not leaving), since then the
    stage's state would be lost with this peer.
    """
    if not section.enabled:
        return False, "checkpoints are off (checkpoint.location is not set)"
    if not section.on_leave:
        return False, "checkpoint.on_leave is false"
    others = sorted(set(serving_peer_ids) - {self_id})
    if others:
        return False, f"{len(others)} other peer(s) still serve the stage and keep its state"
    return True, "last serving peer of its stage: its state would be lost"


def training_config_hash(config: Any, operational: Iterable[str] = ("network", "checkpoint")) -> str:
    """Short sha256 of the parts of a run config that shape training, for checkpoint metadata.

    ``config``: a ``RunConfig`` (anything with ``to_dict()``) or a plain mapping of sections.
    Sections in ``operational`` are left out: where a node listens, its timeouts or where
    checkpoints go may differ between nodes and between restarts of the same run.
    """
    raw = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(raw, Mapping):
        raise TypeError(f"config must be a RunConfig or a mapping of sections, got {type(config).__name__}")
    skip = set(operational)
    kept = {name: value for name, value in raw.items() if name not in skip}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
