"""A trainer's steps without a barrier: the next steps' microbatches start while the current step finishes.

With ``optimizer.staleness = k`` a trainer starts step ``s`` as soon as step ``s - k - 1`` has finished,
so at most ``k + 1`` steps are in flight, and the stage peers may compute a microbatch's gradient on
weights that do not yet hold the updates of up to ``k`` of this trainer's earlier steps (its bounded
staleness). ``k = 0`` is a barrier at every step: exactly the stepping of a synchronous trainer.
Each microbatch is still applied exactly once by each stage it visits: nothing here changes how a
microbatch runs, only when it starts. Steps are reported in order.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


async def run_steps(step_fn: Callable[[int], Awaitable[float]], start: int, stop_at: int, staleness: int,
                    finished: Callable[[int, float], Awaitable[None]], stop: asyncio.Event | None = None) -> int:
    """Run ``step_fn(s)`` for ``s`` in ``start .. stop_at - 1`` with up to ``staleness + 1`` steps in flight;
    ``finished(s, loss)`` for each, in step order. When ``stop`` is set no step starts any more and the
    ones in flight finish. Returns the next step to run. A failing step cancels the others and raises."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    running: dict[int, asyncio.Task] = {}
    next_step = oldest = start
    try:
        while True:
            while next_step < stop_at and next_step - oldest <= staleness and not (stop is not None and stop.is_set()):
                running[next_step] = asyncio.ensure_future(step_fn(next_step))
                next_step += 1
            if oldest not in running:
                return oldest
            if running[oldest].done():
                await finished(oldest, running.pop(oldest).result())
                oldest += 1
                continue
            done, _ = await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)
            for task in done:  # a later step that failed fails the run now, not when its turn comes
                if task.exception() is not None:
                    raise task.exception()
    finally:
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
