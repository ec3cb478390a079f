"""pytest plugin registered through the ``pytest11`` entry point (``pip install swarmrt`` is enough).

Fixtures:

- ``local_swarm``: a factory. ``local_swarm(config_or_path, peers_per_stage=2, **LocalSwarm_kwargs)``
  starts a :class:`~swarmrt.testing.LocalSwarm` (logs under the test's ``tmp_path``) and returns it.
  Every swarm it started is stopped at teardown, whether the test passed, failed or timed out
  (pytest-timeout's signal method); a test process killed outright (its thread method, SIGKILL) is
  covered by the swarm's reaper process. A test that fails gets the tail of every role's log in
  its report, and teardown fails if any process of the swarm is left behind.
- ``fault_plan``: a factory. ``fault_plan(seed=0)`` returns a :class:`~swarmrt.testing.FaultPlan`
  that is checked when the test body returns: a planned fault that never fired fails the test
  (even if the test never calls ``assert_all_fired`` itself).

Imports are lazy so that installing swarmrt costs other projects' test sessions nothing.
"""

from __future__ import annotations

import pytest

_SWARMS = pytest.StashKey[list]()
_PLANS = pytest.StashKey[list]()


@pytest.fixture
def local_swarm(request, tmp_path):
    from swarmrt.testing.swarm import LocalSwarm

    swarms: list = []
    request.node.stash[_SWARMS] = swarms

    def start(config, peers_per_stage=2, **kwargs):
        kwargs.setdefault("workdir", tmp_path / f"swarm{len(swarms)}")
        swarm = LocalSwarm(config, peers_per_stage=peers_per_stage, **kwargs)
        swarms.append(swarm)  # before start(): a swarm that fails to start is still stopped
        return swarm.start()

    yield start
    left = []
    for swarm in reversed(swarms):
        swarm.stop()
        left += swarm.leftover_processes()
    if left:
        pytest.fail(f"local_swarm: processes left behind after stopping: {left}", pytrace=False)


@pytest.fixture
def fault_plan(request):
    from swarmrt.localswarm.faults import FaultPlan

    plans: list = request.node.stash.setdefault(_PLANS, [])

    def make(seed: int = 0) -> FaultPlan:
        plan = FaultPlan(seed)
        plans.append(plan)
        return plan

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # a test that already failed keeps its own failure
    for plan in item.stash.get(_PLANS, []):
        plan.assert_all_fired()
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    swarms = item.stash.get(_SWARMS, None)
    if swarms and report.when == "call" and report.failed:
        for i, swarm in enumerate(swarms):
            for role in swarm.roles:
                report.sections.append((f"swarm{i} {role.name} log (tail)", role.tail(20)))
    return report
