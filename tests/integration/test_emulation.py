"""Emulated links and RPC faults on a real grpc.aio server and client in this process (127.0.0.1)."""

import asyncio
import json
import statistics
import time

import grpc
import pytest
import torch

from swarmrt.config import config_from_dict
from swarmrt.data import sample_input
from swarmrt.models.build import build_layers, stage_ranges
from swarmrt.wire.client import StageClient
from swarmrt.wire.emulation import (LinkSpec, RulesError, client_interceptors, events_path, load_rules, parse_rules,
                                   read_effects, scenario_links, server_interceptors, transfer_time, watch_rules,
                                   write_rules)
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.proto import swarmrt_pb2_grpc as pb_grpc
from swarmrt.pipeline.service import StageServicer
from swarmrt.wire.server import start_server
from swarmrt.wire.tensors import to_proto
from swarmrt.pipeline.worker import StageWorker, infer_input_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MIB = 2**20


class Probe(pb_grpc.StageServicer):
    """Records when each call reached the handler; answers with a tiny message."""

    def __init__(self):
        self.arrivals: list[float] = []

    async def Forward(self, request, context):
        self.arrivals.append(time.monotonic())
        return pb.ForwardResponse(model_version=len(self.arrivals))

    async def GetState(self, request, context):
        for i in range(3):
            yield pb.StateChunk(data=bytes([i + 1]) * 1000, total_bytes=3000)


async def serve(servicer, rules_file):
    server, port = await start_server(servicer, "127.0.0.1", 0, max_tensor_mb=8,
                                      interceptors=server_interceptors(rules_file, getattr(servicer, "worker", None)))
    return server, f"127.0.0.1:{port}"


def forward_request(tensor, stage=0):
    return pb.ForwardRequest(run_id="emu", stage=stage, microbatch_id="m", input=to_proto(tensor))


async def timed_calls(client, address, probe, request, n=3):
    """(one-way request delays, whole-call times) of ``n`` sequential calls."""
    one_way, total = [], []
    for _ in range(n):
        sent = time.monotonic()
        await client.forward(address, request, timeout=10)
        total.append(time.monotonic() - sent)
        one_way.append(probe.arrivals[-1] - sent)
    return statistics.median(one_way), statistics.median(total)


async def test_emulated_link_delays_1mib_by_latency_plus_size_over_bandwidth(tmp_path):
    rules = tmp_path / "peer.rules.json"
    probe = Probe()
    server, address = await serve(probe, rules)
    client = StageClient(8)
    request = forward_request(torch.zeros(MIB // 4))  # 1 MiB of float32
    try:
        await client.forward(address, request, timeout=10)  # connect, warm up
        base_one_way, base_total = await timed_calls(client, address, probe, request)
        link = LinkSpec(latency_s=0.1, bandwidth_Bps=4 * MIB)
        write_rules(rules, {"link": {"latency_s": link.latency_s, "bandwidth_Bps": link.bandwidth_Bps}})
        one_way, total = await timed_calls(client, address, probe, request)  # re-read on the next call
    finally:
        await client.close()
        await server.stop(None)
    expected = transfer_time(request.ByteSize(), link)  # 0.1 + 1 MiB / 4 MiB/s = 0.35 s
    measured = one_way - base_one_way
    print(f"\n1 MiB request over latency 0.1 s, 4 MiB/s: expected {expected:.3f} s, measured {measured:.3f} s "
          f"(one way, minus {base_one_way * 1e3:.1f} ms on plain loopback)")
    assert abs(measured - expected) <= 0.2 * expected, (measured, expected)
    response_bytes = pb.ForwardResponse(model_version=1).ByteSize()
    expected_call = expected + transfer_time(response_bytes, link)  # the answer pays the latency too
    assert abs((total - base_total) - expected_call) <= 0.2 * expected_call, (total - base_total, expected_call)


async def test_concurrent_transfers_share_the_bandwidth(tmp_path):
    rules = tmp_path / "peer.rules.json"
    write_rules(rules, {"link": {"bandwidth_Bps": 4 * MIB}})
    probe = Probe()
    server, address = await serve(probe, rules)
    client = StageClient(8)
    request = forward_request(torch.zeros(MIB // 4))
    try:
        await client.forward(address, pb.ForwardRequest(), timeout=10)
        started = time.monotonic()
        await asyncio.gather(*[client.forward(address, request, timeout=10) for _ in range(4)])
        elapsed = time.monotonic() - started
    finally:
        await client.close()
        await server.stop(None)
    assert elapsed >= 4 * 0.25 * 0.9, f"4 MiB over a 4 MiB/s link took only {elapsed:.2f} s"


async def test_drop_delay_and_partition_rules_apply_to_exactly_the_calls_they_name(tmp_path):
    rules = tmp_path / "peer.rules.json"
    trainer_rules = tmp_path / "trainer.rules.json"
    write_rules(trainer_rules, {"node": "trainer7"})
    probe = Probe()
    server, address = await serve(probe, rules)
    client = StageClient(8, interceptors=client_interceptors(trainer_rules))
    anonymous = StageClient(8)
    request = forward_request(torch.zeros(4))

    async def outcome(c=client, timeout=5.0):
        try:
            await c.forward(address, request, timeout=timeout)
            return "ok"
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"

    try:
        write_rules(rules, {"faults": [{"id": "f1", "method": "Forward", "action": "drop", "count": 2},
                                       {"id": "f2", "method": "GetState", "action": "drop", "count": 5}]})
        results = [await outcome() for _ in range(3)]
        assert results[0] == "UNAVAILABLE: emulated drop f1 (1/2) of Forward"
        assert results[1].startswith("UNAVAILABLE") and results[2] == "ok"
        assert read_effects(events_path(rules)) == {"f1": 2}  # GetState was never called: f2 did nothing

        write_rules(rules, {"faults": [{"id": "f1", "method": "Forward", "action": "drop", "count": 2},
                                       {"id": "f3", "method": "Forward", "action": "delay", "delay_s": 1.0}]})
        assert (await outcome(timeout=0.4)).startswith("DEADLINE_EXCEEDED")  # f1 stays used up after re-reading
        started = time.monotonic()
        assert await outcome() == "ok"
        assert time.monotonic() - started < 0.5  # the delay applied to one call only

        write_rules(rules, {"partitions": [{"id": "f4", "deny": ["trainer7"]}]})
        assert await outcome() == "UNAVAILABLE: emulated partition f4: this peer is cut off from trainer7"
        assert await outcome(anonymous) == "ok"
        write_rules(rules, {"node": "peer1", "partitions": [{"id": "f5", "allow": ["peer1", "peer2"]}]})
        assert (await outcome()).endswith("peer1 is cut off from trainer7")
        write_rules(rules, {})
        assert await outcome() == "ok"  # healed
    finally:
        await client.close()
        await anonymous.close()
        await server.stop(None)
    assert read_effects(events_path(rules)) == {"f1": 2, "f3": 1, "f4": 1, "f5": 1}


def mlp_stage(stage=1):
    config = config_from_dict({"run": {"id": "emu"},
                               "model": {"factory": "swarmrt.models:mlp", "stages": 2,
                                         "kwargs": {"features": 8, "hidden": 16, "depth": 4}},
                               "data": {"kind": "regression", "features": 8, "batch_size": 8,
                                        "microbatch_size": 4}})
    layers = build_layers(config)
    a, b = stage_ranges(config, layers)[stage]
    spec = infer_input_spec(layers[:a], sample_input(config.data))
    worker = StageWorker(torch.nn.Sequential(*layers[a:b]), config, stage, spec)
    return StageServicer(worker, "emu", "peer-x", 8 * MIB), spec


async def test_corrupted_payloads_are_refused_by_the_receivers_checks(tmp_path):
    rules = tmp_path / "peer.rules.json"
    servicer, spec = mlp_stage()
    server, address = await serve(servicer, rules)
    client = StageClient(8)
    good = forward_request(torch.randn(4, *spec.trailing), stage=1)
    try:
        write_rules(rules, {"faults": [{"id": "f1", "method": "Forward", "action": "corrupt", "mode": "nan"},
                                       {"id": "f2", "method": "Forward", "action": "corrupt", "mode": "truncate"},
                                       {"id": "f3", "method": "GetState", "action": "corrupt"}]})
        errors = []
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.forward(address, good, timeout=10)
            errors.append((e.value.code(), e.value.details()))
        assert errors[0][0] == errors[1][0] == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN" in errors[0][1] and "bytes" in errors[1][1], errors
        response = await client.forward(address, good, timeout=10)  # the peer keeps serving
        assert response.output.dtype == "float32" and response.output.shape[0] == 4
        state = await client.get_state(address, "emu", 1, timeout=10)
        with pytest.raises(Exception, match="zip|archive|magic|load"):
            servicer.worker.load_state_bytes(state)  # what a joiner would try: refused
        servicer.worker.load_state_bytes(await client.get_state(address, "emu", 1, timeout=10))
    finally:
        await client.close()
        await server.stop(None)
        servicer.close()
    assert read_effects(events_path(rules)) == {"f1": 1, "f2": 1, "f3": 1}


async def test_slowdown_rule_changes_a_running_worker_and_is_confirmed(tmp_path):
    rules = tmp_path / "peer.rules.json"
    servicer, spec = mlp_stage()
    servicer.worker.slowdown = 1.5  # started with --slowdown 1.5
    server, address = await serve(servicer, rules)
    client = StageClient(8)
    try:
        write_rules(rules, {"slowdown": {"factor": 6, "id": "f9"}})
        await client.info(address)
        assert servicer.worker.slowdown == 6
        write_rules(rules, {})
        await client.info(address)
        assert servicer.worker.slowdown == 1.5  # back to what it started with
    finally:
        await client.close()
        await server.stop(None)
        servicer.close()
    assert read_effects(events_path(rules)) == {"f9": 1}


class SlowdownProbe:
    """The part of a stage worker the rules set, with an event set whenever its slowdown changes."""

    stage = 0
    announce_throughput = None

    def __init__(self):
        self._slowdown = 1.0
        self.changed = asyncio.Event()

    @property
    def slowdown(self) -> float:
        return self._slowdown

    @slowdown.setter
    def slowdown(self, factor: float) -> None:
        self._slowdown = factor
        self.changed.set()


async def test_a_slowdown_takes_effect_without_a_call_while_the_rules_are_watched(tmp_path):
    """A peer nobody calls still slows down (and reports it) within a poll of its rules file."""
    rules = tmp_path / "peer.rules.json"
    write_rules(rules, {})
    worker = SlowdownProbe()
    watch = asyncio.create_task(watch_rules(server_interceptors(rules, worker), every_s=0.02))
    try:
        write_rules(rules, {"slowdown": {"factor": 3, "id": "f4"}})
        await asyncio.wait_for(worker.changed.wait(), timeout=10.0)
        assert worker.slowdown == 3
        assert read_effects(events_path(rules)) == {"f4": 1}
    finally:
        watch.cancel()


def test_bad_rules_name_the_key(tmp_path):
    path = tmp_path / "r.json"
    cases = [({"lnk": {}}, "lnk: unknown key"),
             ({"link": {"latency_s": -1}}, "link.latency_s: must be a number >= 0"),
             ({"links": {"t": {"bandwidth_Bps": 0}}}, "links.t.bandwidth_Bps"),
             ({"faults": [{"method": "Forward", "action": "explode"}]}, "faults[0].action"),
             ({"faults": [{"method": "Forward", "action": "delay"}]}, "faults[0].delay_s"),
             ({"partitions": [{"id": "p"}]}, "partitions[0]"),
             ({"slowdown": {"factor": 4, "stage": -1}}, "slowdown.stage: must be an integer >= 0, got -1"),
             ({"slowdown": {"factor": 4, "stage": "1"}}, "slowdown.stage: must be an integer >= 0, got '1'"),
             ({"slowdown": {"factor": 4, "stage": True}}, "slowdown.stage: must be an integer >= 0, got True"),
             ({"slowdown": {"factor": 4, "stag": 1}}, "slowdown.stag: unknown key"),
             ({"slowdown": {"stage": 1}}, "slowdown.factor: missing"),
             ({"slowdown": {"factor": 0, "stage": 1}}, "slowdown: must be a factor > 0")]
    for raw, needle in cases:
        path.write_text(json.dumps(raw))
        with pytest.raises(RulesError) as e:
            load_rules(path)
        assert needle in str(e.value) and str(path) in str(e.value)
    path.write_text("{not json")
    with pytest.raises(RulesError, match="not valid JSON"):
        load_rules(path)


def test_a_stage_slowdown_applies_only_to_that_stage():
    rules = parse_rules({"slowdown": {"factor": 4, "id": "f3", "stage": 1}})
    assert (rules.slowdown, rules.slowdown_id, rules.slowdown_stage) == (4.0, "f3", 1)
    assert (rules.slowdown_for(1), rules.slowdown_for(0), rules.slowdown_for(None)) == (4.0, None, None)
    anywhere = parse_rules({"slowdown": 3})
    assert anywhere.slowdown_stage is None and anywhere.slowdown_for(0) == anywhere.slowdown_for(5) == 3.0


def test_scenario_file_maps_local_peers_to_links(tmp_path):
    scenario = {"latency_s": [[0, 0.3], [0.2, 0]], "bandwidth_Bps": [[0, 1e8], [5e7, 0]],
                "per_hop_overhead_s": 0.01}
    links = scenario_links(scenario, {"trainer1": 0, "peer2-s1": 1}, latency_scale=0.5)
    assert links["peer2-s1"] == {"links": {"trainer1": {"latency_s": pytest.approx(0.155), "bandwidth_Bps": 1e8}}}
    assert links["trainer1"]["links"]["peer2-s1"]["latency_s"] == pytest.approx(0.105)
    with pytest.raises(RulesError, match="node 5: the scenario has nodes 0..1"):
        scenario_links(scenario, {"peer": 5})
