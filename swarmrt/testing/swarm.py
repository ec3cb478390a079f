"""The ``LocalSwarm`` users' tests get: the product launcher plus the test conveniences.

:class:`swarmrt.localswarm.swarm.LocalSwarm` starts and stops the processes
and knows nothing about fault plans or assertions; this subclass adds the two
methods docs/testing.md shows, each a thin call of a function that takes the
swarm (:func:`swarmrt.localswarm.inject.run_with_faults`,
:func:`swarmrt.testing.asserts.assert_exactly_once`).
"""

from __future__ import annotations

from swarmrt.localswarm import swarm as launcher
from swarmrt.localswarm.swarm import Role
from swarmrt.testing.asserts import assert_exactly_once


class LocalSwarm(launcher.LocalSwarm):
    __doc__ = launcher.LocalSwarm.__doc__

    def run_with_faults(self, plan, trainer: Role | None = None, steps: int | None = None, **kwargs):
        """Train (or follow a started ``trainer``) while firing ``plan``; see
        :func:`swarmrt.localswarm.inject.run_with_faults` for the keyword arguments."""
        from swarmrt.localswarm.inject import run_with_faults  # grpc: only when faults are really fired

        return run_with_faults(self, plan, trainer=trainer, steps=steps, **kwargs)

    def assert_exactly_once(self, summary: dict, trainer: Role | None = None) -> dict[int, set[str]]:
        """See :func:`swarmrt.testing.asserts.assert_exactly_once`."""
        return assert_exactly_once(self, summary, trainer)
