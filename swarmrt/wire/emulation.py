"""Emulated networks and RPC faults at the transport boundary: gRPC interceptors driven by a rules file.

A laptop cannot have a 300 ms link to Sydney, but a peer can behave as if it
had one: :class:`EmulationInterceptor` (a ``grpc.aio`` server interceptor on
the stage service) holds each call for ``latency + bytes / bandwidth`` on the
way in and again on the way out, per calling node, and can drop, delay or
corrupt the next N calls of a method. The real code paths run unchanged:
deadlines, retries, bans and the receivers' checks see what they would see on
a bad network. Applying it on the server side means a peer needs one flag and
the callers need nothing, except a name if links differ per caller
(:class:`NodeNameInterceptor` adds it as ``swarmrt-node`` metadata).

What is *not* emulated: hivemind's own traffic (DHT heartbeats, decentralized
averaging, state over P2P) runs over libp2p, not this service, so a partition
here cuts the stage service (trainer <-> peer, state downloads) while peers
still see each other in the DHT.

The rules are a JSON file (``swarmrt peer --net-rules FILE`` or the
``SWARMRT_NET_RULES`` environment variable), re-read whenever it changes (one
``stat`` per call; write it atomically, e.g. with :func:`write_rules`), so a
running test can change them. Every key is optional::

    {
      "node": "peer3-s1",                              # this process's name (callers send theirs)
      "link": {"latency_s": 0.05, "bandwidth_Bps": 1e7},   # default link to any caller
      "links": {"trainer1": {"latency_s": 0.3, "bandwidth_Bps": 1.3e8}},  # per calling node
      "slowdown": {"factor": 4, "id": "f7"},           # or a plain number: compute time x factor
                                                        # ("stage": 1 in it: only while serving stage 1)
      "faults": [                                       # each applies to the next `count` calls
        {"id": "f3", "method": "Forward", "action": "drop", "count": 2},
        {"id": "f4", "method": "Backward", "action": "delay", "delay_s": 5, "count": 1},
        {"id": "f5", "method": "GetState", "action": "corrupt", "mode": "nan", "count": 1}
      ],
      "partitions": [{"id": "f6", "allow": ["peer3-s1", "peer4-s2"]},   # refuse callers not listed
                     {"id": "f6", "deny": ["peer3-s1"]}],                # refuse callers listed
      "events": "/tmp/x.events.jsonl",                 # default: the rules path + ".events.jsonl"
      "byzantine": [{"id": "f8", "kind": "replies", "method": "Forward", "mode": "zeros"}]
                                                        # lies it tells (swarmrt.wire.byzantine)
    }

A link is a FIFO queue: concurrent transfers share its bandwidth. ``latency``
is one-way, so a unary call costs ``2 x latency + request/bw + response/bw``.
Every fault the peer applies is appended to the events file as one JSON line
(``{"fault": "f3", "kind": "drop", "method": "Forward", "n": 1, ...}``): that
is how a fault plan knows the fault really happened (:func:`read_effects`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import grpc
from google.protobuf.message import Message

from swarmrt.config import ConfigError
from swarmrt.wire.byzantine import parse_lies, reply_lie, tamper
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import Framed, read_frames, to_frames

logger = logging.getLogger(__name__)

ENV_VAR = "SWARMRT_NET_RULES"
NODE_METADATA = "swarmrt-node"
ACTIONS = ("drop", "delay", "corrupt")
_TOP_KEYS = ("node", "link", "links", "slowdown", "faults", "partitions", "events", "byzantine")


class RulesError(ConfigError):
    """A rules file that cannot be used; the message names the file and the key."""


# -- the rules ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LinkSpec:
    latency_s: float = 0.0
    """One-way latency added to every message."""
    bandwidth_Bps: float = math.inf
    """Bytes per second; a message of n bytes occupies the link for n / bandwidth."""

    @classmethod
    def parse(cls, raw: Any, where: str) -> "LinkSpec":
        if not isinstance(raw, Mapping):
            raise RulesError(f"{where}: must be an object with latency_s and/or bandwidth_Bps")
        unknown = set(raw) - {"latency_s", "bandwidth_Bps"}
        if unknown:
            raise RulesError(f"{where}.{sorted(unknown)[0]}: unknown key; known: bandwidth_Bps, latency_s")
        latency = raw.get("latency_s", 0.0)
        bandwidth = raw.get("bandwidth_Bps", math.inf)
        if not isinstance(latency, (int, float)) or latency < 0:
            raise RulesError(f"{where}.latency_s: must be a number >= 0, got {latency!r}")
        if not isinstance(bandwidth, (int, float)) or bandwidth <= 0:
            raise RulesError(f"{where}.bandwidth_Bps: must be a number > 0, got {bandwidth!r}")
        return cls(float(latency), float(bandwidth))


@dataclasses.dataclass(frozen=True)
class RpcFault:
    id: str
    method: str
    action: str
    count: int
    delay_s: float = 0.0
    mode: str = "nan"


@dataclasses.dataclass(frozen=True)
class Partition:
    id: str
    allow: frozenset[str] | None
    deny: frozenset[str]

    def blocks(self, caller: str) -> bool:
        if self.allow is not None and caller not in self.allow:
            return True
        return caller in self.deny


@dataclasses.dataclass(frozen=True)
class NetRules:
    node: str = ""
    link: LinkSpec | None = None
    links: Mapping[str, LinkSpec] = dataclasses.field(default_factory=dict)
    slowdown: float | None = None
    slowdown_id: str | None = None
    faults: tuple[RpcFault, ...] = ()
    partitions: tuple[Partition, ...] = ()
    events: str | None = None
    slowdown_stage: int | None = None
    """The slowdown applies only while the peer serves this stage (None: whatever it serves)."""
    lies: tuple = ()
    """Byzantine lies this peer tells (:mod:`swarmrt.wire.byzantine`)."""

    def link_for(self, caller: str) -> LinkSpec | None:
        return self.links.get(caller, self.link)

    def slowdown_for(self, stage: int | None) -> float | None:
        """The slowdown factor in force for a peer serving ``stage`` (None: no rule applies)."""
        if self.slowdown is None or (self.slowdown_stage is not None and stage != self.slowdown_stage):
            return None
        return self.slowdown


def parse_rules(raw: Any, source: str = "rules") -> NetRules:
    """Validate a rules object; :class:`RulesError` names the key that is wrong."""
    if not isinstance(raw, Mapping):
        raise RulesError(f"{source}: the top level must be a JSON object")
    for key in raw:
        if key not in _TOP_KEYS:
            raise RulesError(f"{source}: {key}: unknown key; known: {', '.join(_TOP_KEYS)}")
    node = raw.get("node", "")
    if not isinstance(node, str):
        raise RulesError(f"{source}: node: must be a string, got {node!r}")
    link = LinkSpec.parse(raw["link"], f"{source}: link") if "link" in raw else None
    links_raw = raw.get("links", {})
    if not isinstance(links_raw, Mapping):
        raise RulesError(f"{source}: links: must map caller names to links")
    links = {str(k): LinkSpec.parse(v, f"{source}: links.{k}") for k, v in links_raw.items()}
    slowdown, slowdown_id, slowdown_stage = raw.get("slowdown"), None, None
    if isinstance(slowdown, Mapping):
        unknown = set(slowdown) - {"factor", "id", "stage"}
        if unknown:
            raise RulesError(f"{source}: slowdown.{sorted(unknown)[0]}: unknown key; known: factor, id, stage")
        if "factor" not in slowdown:
            raise RulesError(f"{source}: slowdown.factor: missing (the compute time multiplier, > 0)")
        slowdown_id, slowdown_stage, slowdown = slowdown.get("id"), slowdown.get("stage"), slowdown["factor"]
        if slowdown_stage is not None and (not isinstance(slowdown_stage, int) or isinstance(slowdown_stage, bool)
                                           or slowdown_stage < 0):
            raise RulesError(f"{source}: slowdown.stage: must be an integer >= 0, got {slowdown_stage!r}")
    if slowdown is not None and (isinstance(slowdown, bool) or not isinstance(slowdown, (int, float))
                                 or slowdown <= 0):
        raise RulesError(f"{source}: slowdown: must be a factor > 0, got {slowdown!r}")
    faults = []
    for i, f in enumerate(raw.get("faults", [])):
        where = f"{source}: faults[{i}]"
        if not isinstance(f, Mapping):
            raise RulesError(f"{where}: must be an object")
        unknown = set(f) - {"id", "method", "action", "count", "delay_s", "mode"}
        if unknown:
            raise RulesError(f"{where}.{sorted(unknown)[0]}: unknown key")
        if f.get("action") not in ACTIONS:
            raise RulesError(f"{where}.action: must be one of {', '.join(ACTIONS)}, got {f.get('action')!r}")
        if not isinstance(f.get("method"), str) or not f["method"]:
            raise RulesError(f"{where}.method: must name a method, e.g. 'Forward'")
        count = f.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise RulesError(f"{where}.count: must be an integer >= 1, got {count!r}")
        delay = f.get("delay_s", 0.0)
        if f["action"] == "delay" and (not isinstance(delay, (int, float)) or delay <= 0):
            raise RulesError(f"{where}.delay_s: a delay needs delay_s > 0, got {delay!r}")
        mode = f.get("mode", "nan")
        if mode not in ("nan", "truncate"):
            raise RulesError(f"{where}.mode: must be 'nan' or 'truncate', got {mode!r}")
        faults.append(RpcFault(str(f.get("id", f"rule{i}")), f["method"], f["action"], count, float(delay), mode))
    partitions = []
    for i, p in enumerate(raw.get("partitions", [])):
        where = f"{source}: partitions[{i}]"
        if not isinstance(p, Mapping) or ("allow" not in p and "deny" not in p):
            raise RulesError(f"{where}: must be an object with 'allow' and/or 'deny' lists of node names")
        allow = frozenset(map(str, p["allow"])) if "allow" in p else None
        partitions.append(Partition(str(p.get("id", f"partition{i}")), allow, frozenset(map(str, p.get("deny", [])))))
    events = raw.get("events")
    lies = parse_lies(raw.get("byzantine", []), f"{source}: byzantine", RulesError)
    return NetRules(node, link, links, None if slowdown is None else float(slowdown), slowdown_id, tuple(faults),
                    tuple(partitions), events, slowdown_stage, lies)


def load_rules(path: str | os.PathLike) -> NetRules:
    """Read and validate a rules file (a missing file means no rules)."""
    path = pathlib.Path(path)
    if not path.exists():
        return NetRules()
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RulesError(f"{path}: not valid JSON: {e}") from None
    return parse_rules(raw, str(path))


def write_rules(path: str | os.PathLike, rules: Mapping[str, Any]) -> None:
    """Validate and write a rules file atomically (a peer never reads half a file)."""
    path = pathlib.Path(path)
    parse_rules(rules, str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rules, indent=1))
    os.replace(tmp, path)


class RulesFile:
    """The rules in a file, re-read when its (mtime, size, inode) changes.

    A file that turns invalid while running is logged and ignored (the last
    good rules stay in force): a typo must not take a serving peer down.
    """

    def __init__(self, path: str | os.PathLike, on_change: Callable[[NetRules], None] | None = None):
        self.path = pathlib.Path(path)
        self.on_change = on_change
        self.rules = NetRules()
        self._key: tuple | None = None
        self.current()

    def current(self) -> NetRules:
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            key = None
        if key != self._key:
            self._key = key
            try:
                self.rules = load_rules(self.path) if key is not None else NetRules()
            except (RulesError, OSError) as e:
                logger.error("ignoring changed net rules: %s", e)
                return self.rules
            if self.on_change is not None:
                self.on_change(self.rules)
        return self.rules

    @property
    def events_path(self) -> pathlib.Path:
        return pathlib.Path(self.rules.events) if self.rules.events else events_path(self.path)


def events_path(rules_path: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(str(rules_path) + ".events.jsonl")


def read_effects(path: str | os.PathLike) -> dict[str, int]:
    """``{fault_id: calls affected}`` from an events file (a slowdown counts 1 once applied)."""
    counts: dict[str, int] = {}
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except FileNotFoundError:
        return counts
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        fault = event.get("fault")
        if fault:
            counts[fault] = counts.get(fault, 0) + 1 if event.get("kind") != "slow" else 1
    return counts


# -- links ----------------------------------------------------------------------------------------
class Link:
    """One direction of an emulated link: a FIFO that holds each message for latency + bytes/bandwidth."""

    def __init__(self, spec: LinkSpec):
        self.spec = spec
        self.busy_until = 0.0

    def delay(self, nbytes: int, now: float) -> float:
        """Seconds to hold a message of ``nbytes`` sent at ``now`` (queues behind earlier messages)."""
        start = max(now, self.busy_until)
        done = start + (nbytes / self.spec.bandwidth_Bps if math.isfinite(self.spec.bandwidth_Bps) else 0.0)
        self.busy_until = done
        return done + self.spec.latency_s - now


def transfer_time(nbytes: int, spec: LinkSpec) -> float:
    """latency + bytes / bandwidth: what one message costs on an idle link."""
    return spec.latency_s + (nbytes / spec.bandwidth_Bps if math.isfinite(spec.bandwidth_Bps) else 0.0)


def scenario_links(scenario: str | os.PathLike | Mapping, nodes: Mapping[str, int],
                   latency_scale: float = 1.0, bandwidth_scale: float = 1.0) -> dict[str, dict]:
    """Per-peer ``links`` rules from a scenario file (format: ``docs/scenarios.md``).

    ``nodes`` maps local names (peers and trainers) to scenario node ids; the
    result maps each local name to the rules keys ``{"links": {caller: link}}``
    for every other mapped name, from ``latency_s[caller][node]`` (+
    ``per_hop_overhead_s``) and ``bandwidth_Bps[caller][node]``. The scales
    shrink a geo-distributed table to something a test can afford.
    """
    data = json.loads(pathlib.Path(scenario).read_text()) if not isinstance(scenario, Mapping) else scenario
    try:
        latency, bandwidth = data["latency_s"], data["bandwidth_Bps"]
    except KeyError as e:
        raise RulesError(f"scenario: missing {e.args[0]!r} table") from None
    n = len(latency)
    for name, node in nodes.items():
        if not isinstance(node, int) or not 0 <= node < n:
            raise RulesError(f"scenario: {name} -> node {node!r}: the scenario has nodes 0..{n - 1}")
    overhead = float(data.get("per_hop_overhead_s", 0.0))
    out: dict[str, dict] = {}
    for name, node in nodes.items():
        links = {}
        for caller, src in nodes.items():
            if caller == name:
                continue
            bw = bandwidth[src][node]
            links[caller] = {"latency_s": (latency[src][node] + overhead) * latency_scale,
                             **({"bandwidth_Bps": bw * bandwidth_scale} if bw > 0 else {})}
        out[name] = {"links": links}
    return out


# -- interceptors ---------------------------------------------------------------------------------
def _damage(message, mode: str):
    """A copy of ``message`` whose first non-empty bytes field (a tensor payload) is damaged."""
    copy = type(message)()
    copy.CopyFrom(message)

    def visit(msg) -> bool:
        for field, value in msg.ListFields():
            if field.type == field.TYPE_BYTES and value:
                if mode == "truncate":
                    setattr(msg, field.name, value[:-1])
                else:
                    k = min(8, len(value))
                    setattr(msg, field.name, b"\xff" * k + value[k:])
                return True
            if field.type == field.TYPE_MESSAGE and isinstance(value, Message) and visit(value):  # not repeated
                return True
        return False

    visit(copy)
    return copy


class EmulationInterceptor(grpc.aio.ServerInterceptor):
    """Applies a :class:`RulesFile` to every incoming call of a ``grpc.aio`` server."""

    def __init__(self, rules: RulesFile, clock: Callable[[], float] = time.monotonic):
        self.rules = rules
        self.clock = clock
        self._used: dict[str, int] = {}
        self._links: dict[tuple[str, str], Link] = {}
        self.stale_state: bytes | None = None
        """A ``stale_state`` lie in force: the state snapshot every GetState gets instead of the current one."""

    # bookkeeping
    def _event(self, rules: NetRules, **event) -> None:
        event.setdefault("time", time.time())
        try:
            with open(self.rules.events_path, "a") as out:
                out.write(json.dumps(event) + "\n")
        except OSError as e:
            logger.warning("cannot record emulation event %s: %s", event, e)

    def _link(self, caller: str, direction: str, spec: LinkSpec) -> Link:
        link = self._links.get((caller, direction))
        if link is None or link.spec != spec:
            link = self._links[(caller, direction)] = Link(spec)
        return link

    def _take(self, rules: NetRules, method: str) -> tuple[RpcFault, int] | None:
        for fault in rules.faults:
            if fault.method == method and self._used.get(fault.id, 0) < fault.count:
                n = self._used[fault.id] = self._used.get(fault.id, 0) + 1
                return fault, n
        return None

    async def _before(self, rules: NetRules, method: str, caller: str, request, context):
        """Partition, RPC fault and inbound link; returns ``(request, corrupt_stream_mode)``."""
        for partition in rules.partitions:
            if partition.blocks(caller):
                self._event(rules, fault=partition.id, kind="partition", method=method, caller=caller)
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"emulated partition {partition.id}: {rules.node or 'this peer'} is cut off from "
                                    f"{caller or 'an unnamed caller'}")
        stream_mode = None
        taken = self._take(rules, method)
        if taken is not None:
            fault, n = taken
            self._event(rules, fault=fault.id, kind=fault.action, method=method, n=n, count=fault.count,
                        caller=caller)
            if fault.action == "drop":
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"emulated drop {fault.id} ({n}/{fault.count}) of {method}")
            elif fault.action == "delay":
                await asyncio.sleep(fault.delay_s)
            elif request is not None and method != "GetState":
                request = _damage(request, fault.mode)
            else:
                stream_mode = fault.mode
        spec = rules.link_for(caller)
        if spec is not None and request is not None:
            await asyncio.sleep(self._link(caller, "in", spec).delay(request.ByteSize(), self.clock()))
        return request, stream_mode

    async def _after(self, rules: NetRules, caller: str, response) -> None:
        spec = rules.link_for(caller)
        if spec is not None and response is not None:
            await asyncio.sleep(self._link(caller, "out", spec).delay(response.ByteSize(), self.clock()))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        rules = self.rules.current()
        if not (rules.faults or rules.partitions or rules.link or rules.links or rules.lies):
            return handler  # nothing to emulate: the call runs untouched
        method = handler_call_details.method.rsplit("/", 1)[-1]
        caller = next((v for k, v in (handler_call_details.invocation_metadata or ()) if k == NODE_METADATA), "")

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                request, _ = await self._before(rules, method, caller, request, context)
                response = await inner(request, context)
                lie = reply_lie(rules.lies, method)
                if lie is not None and response is not None:
                    response = tamper(response, lie)
                    self._event(rules, fault=lie.id, kind="byzantine", method=method, mode=lie.mode, caller=caller)
                await self._after(rules, caller, response)
                return response

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                request, mode = await self._before(rules, method, caller, request, context)
                first = True
                stale = self.stale_state if method == "GetState" else None
                if stale is not None:
                    lie = next((lie for lie in rules.lies if lie.kind == "stale_state"), None)
                    self._event(rules, fault=lie.id if lie else None, kind="byzantine", method=method, mode="stale",
                                caller=caller)
                    source = _replay(stale)
                else:
                    source = inner_stream(request, context)
                async for chunk in source:
                    if first and mode is not None:
                        chunk = _damage(chunk, mode)
                    first = False
                    await self._after(rules, caller, chunk)
                    yield chunk

            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_stream is not None:  # the data plane: raw-bytes messages, a header then chunks
            inner_streams = handler.stream_stream

            async def stream_stream(messages, context):
                # the whole call crosses the link as one message; read before refusing, else the caller's
                # grpc reports its failed write (INTERNAL) instead of the emulated status
                incoming = [m async for m in messages]
                _, mode = await self._before(rules, method, caller, None, context)
                if mode is not None and incoming:
                    i = min(1, len(incoming) - 1)  # the first payload chunk
                    incoming[i] = incoming[i][:-1] if mode == "truncate" else b"\xff" * 8 + incoming[i][8:]
                await self._hold(rules, caller, "in", sum(map(len, incoming)))

                async def replay():
                    for m in incoming:
                        yield m

                outgoing = [m async for m in inner_streams(replay(), context)]
                lie = reply_lie(rules.lies, method)
                if lie is not None and outgoing:
                    outgoing = await _tamper_frames(outgoing, method, lie)
                    self._event(rules, fault=lie.id, kind="byzantine", method=method, mode=lie.mode, caller=caller)
                await self._hold(rules, caller, "out", sum(map(len, outgoing)))
                for m in outgoing:
                    yield m

            return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                         handler.response_serializer)
        return handler

    async def _hold(self, rules: NetRules, caller: str, direction: str, nbytes: int) -> None:
        spec = rules.link_for(caller)
        if spec is not None:
            await asyncio.sleep(self._link(caller, direction, spec).delay(nbytes, self.clock()))


async def _tamper_frames(outgoing: list, method: str, lie) -> list[bytes]:
    """A data-plane reply (header, then chunks) with the lie told in its tensor, framed again."""
    async def frames():
        for m in outgoing:
            yield bytes(m)

    kind = pb.ForwardResponse if method == "Forward" else pb.BackwardResponse
    reply = tamper((await read_frames(frames(), kind, f"{method} reply")).to_message(), lie)
    return [bytes(m) for m in to_frames(Framed.from_message(reply))]


class _NodeName:
    """Client side: sends this process's node name (``swarmrt-node`` metadata) with every call,
    so a peer can apply the link and partition rules for that caller (:class:`NodeNameInterceptor` and
    its siblings for the other call kinds). A ``grpc.aio`` channel files
    an interceptor under the first call kind it is an instance of, so each kind has its own class:
    :func:`node_name_interceptors` returns all three."""

    def __init__(self, node: str):
        self.node = node

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or ()) + [(NODE_METADATA, self.node)]
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class NodeNameInterceptor(_NodeName, grpc.aio.UnaryUnaryClientInterceptor):
    pass


class _NodeNameUnaryStream(_NodeName, grpc.aio.UnaryStreamClientInterceptor):
    pass


class _NodeNameStreamStream(_NodeName, grpc.aio.StreamStreamClientInterceptor):
    pass


def node_name_interceptors(node: str) -> tuple:
    """Interceptors that send ``node`` with unary, server-streaming (GetState) and data-plane calls."""
    return (NodeNameInterceptor(node), _NodeNameUnaryStream(node), _NodeNameStreamStream(node))


# -- wiring helpers for the runtime ---------------------------------------------------------------
def rules_path(cli_value: str | None) -> str | None:
    """The rules file from a CLI flag, else from ``SWARMRT_NET_RULES``, else None."""
    return cli_value or os.environ.get(ENV_VAR) or None


def server_interceptors(path: str | os.PathLike | None, worker=None) -> Sequence[grpc.aio.ServerInterceptor]:
    """Interceptors for a peer's stage service; with ``worker``, the rules' ``slowdown`` sets its
    ``slowdown`` (falling back to the value it started with when the rule goes away).

    A peer builds these anew for every stage it serves (a peer that moves gets a new worker), and
    the rules in force are applied at once, so a stage slowdown (``"stage": S`` in the rule) slows
    a peer that moves onto stage S and spares one that moves off it."""
    if not path:
        return ()
    load_rules(path)  # a bad file is a start-up error that names the key, not a silent no-op
    rules_file = RulesFile(path)
    interceptor = EmulationInterceptor(rules_file)
    if worker is not None:
        base = worker.slowdown

        def on_change(rules: NetRules) -> None:
            _apply_lies(rules, worker, interceptor)
            slowdown = rules.slowdown_for(getattr(worker, "stage", None))
            factor = slowdown if slowdown is not None else base
            if factor != worker.slowdown:
                worker.slowdown = factor
                logger.info("slowdown now x%g", factor)
                if rules.slowdown_id and slowdown is not None:
                    interceptor._event(rules, fault=rules.slowdown_id, kind="slow", factor=factor,
                                       stage=getattr(worker, "stage", None))

        rules_file.on_change = on_change
        on_change(rules_file.rules)
    return (interceptor,)


RULES_POLL_S = 0.2
"""How often a serving peer re-reads its rules file between calls (a slowdown or a lie needs no call to
take effect)."""


async def watch_rules(interceptors: Sequence, every_s: float = RULES_POLL_S) -> None:
    """Re-read the rules file behind each emulation interceptor in ``interceptors`` every ``every_s``
    seconds until cancelled. Calls re-read it too; this is for the rules that act without one: a
    slowdown is in force (and reported) at once, not at the peer's next call."""
    files = [i.rules for i in interceptors if isinstance(i, EmulationInterceptor)]
    if not files:
        return
    while True:
        for rules_file in files:
            rules_file.current()
        await asyncio.sleep(every_s)


def _apply_lies(rules: NetRules, worker, interceptor: EmulationInterceptor) -> None:
    """Throughput and stale-state lies take effect on the worker and the interceptor when they appear."""
    claim = next((lie for lie in reversed(rules.lies) if lie.kind == "throughput"), None)
    if getattr(worker, "announce_throughput", None) != (claim.value if claim else None):
        worker.announce_throughput = claim.value if claim else None
        if claim is not None:
            interceptor._event(rules, fault=claim.id, kind="byzantine", mode="throughput", value=claim.value)
    stale = next((lie for lie in rules.lies if lie.kind == "stale_state"), None)
    if stale is not None and interceptor.stale_state is None:
        interceptor.stale_state = worker.state_bytes()  # the state of this moment, replayed from now on
        interceptor._event(rules, fault=stale.id, kind="byzantine", mode="stale", version=worker.version)
    elif stale is None:
        interceptor.stale_state = None


async def _replay(data: bytes, size: int = 1 << 20):
    """A GetState stream of ``data`` (a stale snapshot), in 1 MiB chunks."""
    for offset in range(0, len(data), size):
        yield pb.StateChunk(data=data[offset:offset + size], total_bytes=len(data))


def client_interceptors(path: str | os.PathLike | None) -> Sequence:
    """Interceptors for a client (trainer) whose rules file names its node."""
    if not path:
        return ()
    node = load_rules(path).node
    return node_name_interceptors(node) if node else ()
