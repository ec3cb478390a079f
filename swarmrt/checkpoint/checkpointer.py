"""A stage peer's checkpoints: resume from the newest, write periodically, write on leave.

The decisions are :mod:`swarmrt.checkpoint.policy`'s (when one is due, which
peer of a stage writes it, whether a leaving peer must write one); the files
are :mod:`swarmrt.checkpoint.store`'s. :class:`Checkpointer` joins them for
one stage and is handed everything else: the stage's worker (anything with
``stage``, ``version``, ``state_bytes()`` and ``load_state_bytes(data)``), a
coroutine function that runs a function on the stage's compute thread (the
state must not be read mid-update), a clock and where to print its lines, so a
unit test drives it with a fake worker and a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

from swarmrt.checkpoint import store
from swarmrt.checkpoint.policy import (checkpoint_due, is_checkpoint_writer, leave_checkpoint_due,
                                       training_config_hash)
from swarmrt.config import RunConfig

logger = logging.getLogger("swarmrt.checkpoint")


class StageState(Protocol):
    """What the checkpointer needs of a stage worker (``swarmrt.pipeline.worker.StageWorker``)."""

    stage: int
    version: int

    def state_bytes(self) -> bytes: ...

    def load_state_bytes(self, data: bytes) -> None: ...


def _print(line: str) -> None:
    print(line, flush=True)


class Checkpointer:
    """Periodic and on-leave checkpoints of one stage, per the run's ``[checkpoint]`` section.

    ``compute(fn, *args)``: awaits ``fn(*args)`` run where the worker's compute runs.
    ``clock``: monotonic seconds (``every_minutes`` is measured on it). ``say``: where the
    "checkpoint step N written" line goes (the peer's log, which tests read).
    """

    def __init__(self, config: RunConfig, worker: StageState, peer_id: str, partition: str,
                 compute: Callable[..., Awaitable[Any]], *, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = _print):
        self.section = config.checkpoint
        self.run_id = config.run.id
        self.worker, self.peer_id, self.partition = worker, peer_id, partition
        self.config_hash = training_config_hash(config)
        self.compute, self.clock, self.say = compute, clock, say
        self.last_step, self.last_time = worker.version, clock()

    def resume(self) -> str | None:
        """Load the newest checkpoint of the stage into the worker; returns what was loaded
        (for the peer's "serving" line), or None when there is none."""
        found = store.load_latest_checkpoint(self.section.location, self.run_id, self.worker.stage, self.partition)
        if found is None:
            return None
        meta, state, path = found
        if meta.config_hash != self.config_hash:
            logger.warning("checkpoint %s was written under config %s, this run's is %s", path, meta.config_hash,
                           self.config_hash)
        self.worker.load_state_bytes(state)
        self.last_step = self.worker.version
        return f"resumed from checkpoint {path} (step {meta.step})"

    async def write(self, reason: str) -> str:
        """Write the stage's state now (read on the compute thread); returns the path."""
        state = await self.compute(self.worker.state_bytes)
        step = self.worker.version
        path = await asyncio.to_thread(store.save_checkpoint, self.section.location, self.run_id,
                                       self.worker.stage, step, state, config_hash=self.config_hash,
                                       partition_hash=self.partition, writer=self.peer_id, keep=self.section.keep)
        self.last_step, self.last_time = step, self.clock()
        self.say(f"stage {self.worker.stage}: checkpoint step {step} written to {path} ({reason})")
        return path

    async def maybe_periodic(self, serving_ids: list[str]) -> str | None:
        """Write a periodic checkpoint if one is due and this peer is the stage's writer among
        ``serving_ids``; returns the path written, or None."""
        due, reason = checkpoint_due(self.worker.version, self.last_step, self.clock(), self.last_time,
                                     self.section)
        if not due:
            return None
        writer, why = is_checkpoint_writer(self.peer_id, serving_ids)
        if writer:
            return await self.write(reason)
        # another peer of the stage writes this one; move on together
        self.last_step, self.last_time = self.worker.version, self.clock()
        logger.info("checkpoint due (%s) but %s", reason, why)
        return None

    async def maybe_on_leave(self, serving_ids: list[str]) -> str | None:
        """Write a checkpoint before leaving if no other peer in ``serving_ids`` keeps the
        stage's state; returns the path written, or None."""
        due, reason = leave_checkpoint_due(self.peer_id, serving_ids, self.section)
        if not due:
            return None
        return await self.write(reason)
