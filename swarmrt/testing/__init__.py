"""Local swarms and fault injection, for users' tests and ours.

- :class:`LocalSwarm`: bootstrap + peers + trainers as real processes on 127.0.0.1, all reaped on exit.
- :class:`FaultPlan` with targets :class:`Peer` / :class:`RandomPeer`: faults declared up front, fired
  from a seed by :meth:`LocalSwarm.run_with_faults`, each checked to have really happened.
- :func:`assert_exactly_once`, :func:`assert_loss_close`, :func:`assert_no_leftovers`.
- :func:`start_intruder`: a process without the run's join token that tries to join, announce,
  overwrite records and call peers; :func:`read_intruder_report` says what it got (docs/security.md).
- The pytest plugin (``swarmrt.testing.pytest_plugin``, installed with swarmrt) adds the ``local_swarm``
  and ``fault_plan`` fixtures.

See docs/testing.md for a complete example.
"""

from swarmrt.localswarm.faults import FaultError, FaultPlan, Peer, RandomPeer, UnfiredFaults
from swarmrt.localswarm.swarm import Role, SwarmError
from swarmrt.testing.asserts import assert_exactly_once, assert_loss_close, assert_no_leftovers
from swarmrt.testing.intruder import read_report as read_intruder_report
from swarmrt.testing.intruder import start_intruder
from swarmrt.testing.swarm import LocalSwarm

__all__ = ["LocalSwarm", "Role", "SwarmError", "FaultPlan", "Peer", "RandomPeer", "FaultError", "UnfiredFaults",
           "assert_exactly_once", "assert_loss_close", "assert_no_leftovers", "run_with_faults", "FaultRun",
           "start_intruder", "read_intruder_report"]


def __getattr__(name):  # grpc-backed parts load on first use, so `import swarmrt.testing` stays light
    if name in ("run_with_faults", "FaultRun"):
        from swarmrt.localswarm import inject

        return getattr(inject, name)
    raise AttributeError(f"module 'swarmrt.testing' has no attribute {name!r}")
