"""A multi-host rehearsal: bootstrap, peers and trainer each in its own network namespace.

Every role runs in a namespace of its own (``tests/integration/netns.py``), with
its own address on a bridge (10.66.0.0/24), so nothing here works only because
everything is 127.0.0.1. The swarm (2 stages) has:

- the bootstrap (listens on 0.0.0.0, announces 10.66.0.1 on a fixed port);
- stage 0: a peer whose announced address is right: dialled back at join,
  served over gRPC;
- stage 1: a peer announcing an address nobody can reach (10.66.0.250, a VM
  with a wrong public IP): caught at join with its one-line fix, it serves
  over libp2p instead (``network.reachability = "p2p"``), and the trainer
  reaches it that way: every microbatch crosses the libp2p path;
- the same mistake with ``--reachability fail``: the peer exits 4 with the
  one line, before announcing anything.

The trainer trains, and every stage applies every microbatch exactly once
(the peers' ledgers). Not here, and why: a peer behind NAT reached through a
libp2p relay (this machine has no iptables/nft binary to build NAT rules, and a
private link without forwarding did not get a circuit-relay reservation from
hivemind 1.1.12's p2pd: the relay answered NO_RESERVATION), and netem delays
(the kernel has no netem).
"""

import json
import pytest

from swarmrt.config import config_from_dict
from swarmrt.localswarm.swarm import LocalSwarm
from swarmrt.testing import assert_exactly_once, assert_no_leftovers
from tests.integration.conftest import FAST
from tests.integration.netns import Hosts, NetnsUnavailable

pytestmark = pytest.mark.timeout(240)

WRONG = "10.66.0.250"  # on the bridge's subnet, held by nobody


@pytest.fixture(scope="module")
def hosts():
    try:
        made = Hosts()
    except NetnsUnavailable as e:
        pytest.skip(f"kernel/machine feature missing: {e}")
    try:
        yield made
    finally:
        made.close()


def _config(reachability: str = "p2p"):
    raw = json.loads(json.dumps(FAST))
    raw["model"]["stages"] = 2
    raw["network"]["reachability"] = reachability
    return config_from_dict(raw)


def test_a_namespace_swarm_trains_exactly_once_and_catches_wrong_addresses(hosts, tmp_path):
    for name in ("boot", "right", "wrong", "failing", "trainer"):
        hosts.add(name)
    places = iter(["boot", "right", "wrong", "failing", "trainer"])
    swarm = LocalSwarm(_config(), peers_per_stage=0, workdir=tmp_path,
                       launcher=lambda role: hosts.exec_prefix(next(places)),
                       bootstrap_args=["--host", "0.0.0.0", "--announce-host", "10.66.0.1", "--port", "40311"])
    with swarm:
        assert swarm.maddr.startswith("/ip4/10.66.0.1/tcp/40311/")
        right = swarm.add_peer(0, wait=False, extra_args=["--host", hosts.hosts["right"][1]])
        wrong = swarm.add_peer(1, wait=False, extra_args=["--host", hosts.hosts["wrong"][1], "--announce-host", WRONG,
                                                          "--dht-port", "40312"])
        failing = swarm.add_peer(1, wait=False, extra_args=["--host", hosts.hosts["failing"][1], "--announce-host",
                                                            WRONG, "--dht-port", "40313", "--reachability", "fail"])
        swarm.wait_ready(right)
        swarm.wait_ready(wrong)
        assert right.address.startswith(hosts.hosts["right"][1] + ":")
        assert wrong.address.startswith("p2p:"), wrong.address
        log = wrong.log.read_text()
        assert f"nobody in the run can reach this peer at {WRONG}:" in log
        assert "fix: announce an address others can dial (--announce-host" in log
        assert "serving over libp2p instead" in log
        assert "nobody in the run can reach" not in right.log.read_text()

        trainer = swarm.start_trainer(3)
        summary = swarm.wait_trainer(trainer, timeout=150)
        assert summary["steps"] == 3
        applied = assert_exactly_once(swarm, summary, trainer)
        # stage 1 is the libp2p peer alone: every microbatch crossed that path, forward and backward
        assert summary["applied"] == 3 * 2 and len(applied[1]) == 3 * 2

        # network.reachability = "fail": the same mistake is one line and exit 4, before it announces anything
        assert failing.proc.wait(timeout=60) == 4
        lines = [line for line in failing.log.read_text().splitlines() if "nobody in the run" in line]
        assert len(lines) == 1 and lines[0].startswith("swarmrt peer: network error: nobody in the run can reach "
                                                       f"this peer at {WRONG}:"), failing.log.read_text()[-2000:]
        assert "--announce-host PUBLIC_IP" in lines[0]
        assert failing.address is None
    assert_no_leftovers(swarm)
