"""Addresses across networks, without processes: the reachability verdict (pure), the libp2p stage
transport's framing and error mapping (client and service joined by a fake libp2p host), multiaddrs
p2pd can parse, and the address flags and config keys."""

import asyncio
import random

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue
from hivemind.p2p import P2PHandlerError, PeerID

from swarmrt.cli.main import main
from swarmrt.config import ConfigError, NetworkSection, config_from_dict
from swarmrt.discovery.dht import dht_options
from swarmrt.discovery.reachability import (REACHABLE, UNCHECKED, UNREACHABLE, choose_dialers, peer_id_of_maddr,
                                            verdict)
from swarmrt.wire.context import rpc_error
from swarmrt.wire.p2p import (P2PStageClient, P2PStageService, RoutedClient, daemon_maddr, is_p2p_address,
                              p2p_address, parse_p2p_address)
from swarmrt.wire.proto import swarmrt_pb2 as pb

pytestmark = pytest.mark.timeout(30)

ID = "12D3KooWGsCLo9TAbwAe9Q5JLjxLZYmQEvEnRm95prQXMvDZp1oo"
ADDR = "10.0.0.9:31400"


# -- the verdict ---------------------------------------------------------------------------------
def test_reached_by_a_peer_of_the_run_is_reachable():
    status, line = verdict(ADDR, "me", {"a": {"error": "UNAVAILABLE: refused"}, "b": {"peer_id": "me"}})
    assert status == REACHABLE and "dialled back by b" in line


def test_nobody_reaching_it_is_one_line_with_the_fix():
    status, line = verdict(ADDR, "me", {"a": {"error": "DEADLINE_EXCEEDED: Deadline Exceeded"},
                                        "b": {"peer_id": "someone-else"}, "c": {"no_answer": "TimeoutError"}})
    assert status == UNREACHABLE and "\n" not in line
    assert line.startswith(f"nobody in the run can reach this peer at {ADDR} (2 asked: DEADLINE_EXCEEDED")
    assert "another peer (someone-else) answers there" in line  # the address leads to a different peer
    assert "--announce-host PUBLIC_IP" in line and "forward TCP port 31400" in line and "--use-auto-relay" in line


def test_unchecked_when_nobody_could_be_asked():
    assert verdict(ADDR, "me", {})[0] == UNCHECKED
    assert verdict(ADDR, "me", {"a": {"no_answer": "x"}})[0] == UNCHECKED


def test_a_bootstrap_counts_only_when_no_peer_of_the_run_answered():
    # a bootstrap may sit on both sides of a NAT: when peers answered, theirs is the word that counts
    answers = {"boot": {"peer_id": "me"}, "a": {"error": "UNAVAILABLE: no route"}}
    assert verdict(ADDR, "me", answers, bootstraps=["boot"])[0] == UNREACHABLE
    answers["a"] = {"no_answer": "could not ask"}
    assert verdict(ADDR, "me", answers, bootstraps=["boot"])[0] == REACHABLE


def test_dialers_are_a_sample_of_serving_peers_then_the_bootstraps():
    rng = random.Random(0)
    chosen = choose_dialers([f"p{i}" for i in range(10)] + ["me"], ["boot", "boot"], "me", rng, limit=3)
    assert len(chosen) == 4 and chosen[-1] == "boot" and "me" not in chosen and len(set(chosen)) == 4
    assert choose_dialers([], ["boot"], "me", rng) == ["boot"]
    assert peer_id_of_maddr(f"/ip4/1.2.3.4/tcp/5/p2p/{ID}") == ID and peer_id_of_maddr("/ip4/1.2.3.4/tcp/5") is None


# -- libp2p addresses ------------------------------------------------------------------------------
def test_p2p_addresses_round_trip_and_bad_ones_are_named():
    maddr = f"/ip4/10.0.0.1/tcp/31500/p2p/{ID}"
    address = p2p_address(ID, [maddr])
    assert is_p2p_address(address) and not is_p2p_address(ADDR)
    peer, maddrs = parse_p2p_address(address)
    assert peer == PeerID.from_base58(ID) and str(maddrs[0]) == maddr
    with pytest.raises(ValueError, match="bad libp2p stage address 'p2p:nonsense'"):
        parse_p2p_address("p2p:nonsense")


def test_daemon_multiaddrs_carry_the_raw_peer_id():
    # hivemind's multiaddr library writes /p2p/ as a CID, which p2pd rejects ("length greater than ...")
    raw = PeerID.from_base58(ID).to_bytes()
    encoded = daemon_maddr(f"/ip4/10.66.0.1/tcp/40400/p2p/{ID}/p2p-circuit").to_bytes()
    assert bytes.fromhex("a503") + bytes([len(raw)]) + raw + bytes.fromhex("a202") in encoded
    assert encoded.startswith(bytes.fromhex("040a420001069dd0"))  # /ip4/10.66.0.1/tcp/40400


# -- the transport, client and service joined in-process ---------------------------------------------
class Echo:
    async def Forward(self, request, context):
        if request.microbatch_id == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad microbatch")
        assert 0 < context.time_remaining() <= 5.0
        return pb.ForwardResponse(output=request.input, model_version=7)


class FakeHost:
    """A libp2p host whose streams reach ``service`` in this process; the handler's exception
    becomes a P2PHandlerError, as hivemind reports it to the caller."""

    def __init__(self, service: P2PStageService):
        self.service, self.connected = service, []
        self._client = self

    async def connect(self, peer_id, maddrs):
        self.connected.append((peer_id, maddrs))

    async def iterate_protobuf_handler(self, peer_id, name, requests, output_type):
        method = name.rsplit(".", 1)[1]

        async def responses():
            try:
                async for item in self.service.serve(method, requests):
                    yield item
            except Exception as e:
                raise P2PHandlerError(f"Failed to call handler `{name}` at {peer_id}: {e}") from None
        return responses()


def _pair(max_mb: int = 1):
    service = P2PStageService(max_tensor_mb=max_mb)
    service.servicer = Echo()
    host = FakeHost(service)
    return service, host, P2PStageClient(host, max_tensor_mb=max_mb)


def test_a_forward_crosses_libp2p_in_chunks_and_comes_back_whole():
    service, host, client = _pair(max_mb=4)
    data = bytes(range(256)) * (3 * 2**20 // 256)  # 3 MiB: more than one chunk each way
    request = pb.ForwardRequest(run_id="r", microbatch_id="m", input=pb.Tensor(dtype="uint8", shape=[len(data)],
                                                                                codec="none", data=data))
    response = asyncio.run(client.forward(p2p_address(ID, [f"/ip4/10.0.0.1/tcp/1/p2p/{ID}"]), request, timeout=5.0))
    assert response.output.data == data and response.model_version == 7
    assert service.calls == 1 and len(host.connected) == 1


def test_an_abort_keeps_its_grpc_code_across_libp2p():
    _, _, client = _pair()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(client.forward(p2p_address(ID), pb.ForwardRequest(microbatch_id="bad"), timeout=5.0))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == "bad microbatch"


def test_an_oversized_request_is_refused_before_it_is_kept():
    service, _, _ = _pair(max_mb=1)
    too_big = pb.ForwardRequest(input=pb.Tensor(data=b"x" * (3 * 2**20))).SerializeToString()

    async def frames():
        yield BytesValue(value=b"\x81\xa7timeout\xcb@\x14\x00\x00\x00\x00\x00\x00")  # msgpack {"timeout": 5.0}
        for i in range(0, len(too_big), 2**20):
            yield BytesValue(value=too_big[i:i + 2**20])

    async def run():
        return [item async for item in service.serve("Forward", frames())]

    with pytest.raises(RuntimeError, match="^RESOURCE_EXHAUSTED: Forward request over"):
        asyncio.run(run())
    assert service.calls == 0


def test_a_peer_serving_no_stage_is_unavailable_and_a_bad_header_is_invalid():
    service, _, client = _pair()
    service.servicer = None
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(client.forward(p2p_address(ID), pb.ForwardRequest(), timeout=5.0))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    async def bad_header():
        yield BytesValue(value=b"\x81\xa7timeout\xa3abc")  # {"timeout": "abc"}

    async def run():
        return [item async for item in service.serve("Forward", bad_header())]

    with pytest.raises(RuntimeError, match="^INVALID_ARGUMENT: bad call timeout 'abc'"):
        asyncio.run(run())


def test_the_routed_client_sends_each_address_its_way():
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        async def forward(self, address, request, timeout):
            calls.append((self.name, address))

        async def close(self):
            calls.append((self.name, "closed"))

    routed = RoutedClient(Recorder("grpc"), Recorder("p2p"))

    async def run():
        await routed.forward(ADDR, pb.ForwardRequest(), 1.0)
        await routed.forward(p2p_address(ID), pb.ForwardRequest(), 1.0)
        await routed.close()

    asyncio.run(run())
    assert calls == [("grpc", ADDR), ("p2p", p2p_address(ID)), ("grpc", "closed"), ("p2p", "closed")]
    assert rpc_error(grpc.StatusCode.UNAVAILABLE, "x").code() == grpc.StatusCode.UNAVAILABLE


# -- config keys and flags ---------------------------------------------------------------------------
def test_network_addresses_are_checked_with_the_fix_named():
    assert NetworkSection().public_host == "127.0.0.1"
    assert NetworkSection(host="0.0.0.0", announce_host="203.0.113.7", dht_port=31500).public_host == "203.0.113.7"
    with pytest.raises(ConfigError, match="network.announce_host: must be set when network.host is the wildcard"):
        NetworkSection(host="0.0.0.0")
    with pytest.raises(ConfigError, match="network.dht_port: must be a fixed port"):
        NetworkSection(host="0.0.0.0", announce_host="203.0.113.7")
    with pytest.raises(ConfigError, match="network.reachability: must be one of p2p, fail, off"):
        NetworkSection(reachability="maybe")
    with pytest.raises(ConfigError, match="network.dht_port: must be a TCP port"):
        config_from_dict({"network": {"dht_port": 70000}})


def test_dht_options_listen_announce_and_relay():
    options = dht_options("0.0.0.0", 31500, announce_host="203.0.113.7", identity_path="k")
    assert options["host_maddrs"] == ["/ip4/0.0.0.0/tcp/31500"]
    assert options["announce_maddrs"] == ["/ip4/203.0.113.7/tcp/31500"] and options["identity_path"] == "k"
    assert "announce_maddrs" not in dht_options()  # a laptop: listen on loopback, announce that
    relayed = dht_options("10.0.0.2", use_auto_relay=True, initial_peers=["/ip4/1.2.3.4/tcp/5/p2p/X"])
    assert relayed["use_auto_relay"] and relayed["force_reachability"] == "private"
    assert dht_options(public=True)["force_reachability"] == "public"
    with pytest.raises(ValueError, match="needs a fixed DHT port"):
        dht_options("10.0.0.2", 0, announce_host="203.0.113.7")


@pytest.mark.parametrize("argv, expected", [
    (["bootstrap", "--announce-host", "203.0.113.7"], "--dht-port (network.dht_port): must be a fixed port"),
    (["bootstrap", "--identity", "/"], "--identity /: is a directory"),
    (["peer", "--config", "CONFIG", "--initial-peers", "x", "--host", "0.0.0.0"],
     "--announce-host (network.announce_host): must be set when --host (network.host) is the wildcard"),
    (["peer", "--config", "CONFIG", "--initial-peers", "x", "--announce-host", "a b"],
     "--announce-host (network.announce_host): must be an IP address or host name"),
])
def test_bad_address_flags_are_one_line_naming_the_flag(argv, expected, capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\nstages = 2\n')
    assert main([str(config) if a == "CONFIG" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err


def test_dial_back_refuses_what_is_not_host_port_and_floods():
    from swarmrt.wire.p2p import MAX_WAITING, DialBack

    dial = DialBack(timeout=0.5)
    assert asyncio.run(dial.dial("/etc/passwd"))["error"].startswith("not a host:port address")
    dial.waiting = MAX_WAITING
    assert asyncio.run(dial.dial("127.0.0.1:9")) == {"error": "busy: too many dial-back requests"}
