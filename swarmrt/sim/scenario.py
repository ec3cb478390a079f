"""A swarm on paper: nodes, their stages and speeds, and the links between them.

The JSON format is described in ``docs/scenarios.md`` (this module is its
definition). It turns such a file into a frozen :class:`Scenario` and refuses bad
input with an error that names the bad field (``nodes[3].forward_s must be
> 0``). It can also *generate* a larger swarm over the regions of a given
scenario (:func:`generate_scenario`: e.g. 1,000 peers over geo-aws18's 11
regions), which the simulator uses to test scale.

Pure apart from reading the file in :func:`load_scenario`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
from typing import Any, Mapping

import numpy as np

from swarmrt.routing.links import Links, MatrixLinks, RegionLinks
from swarmrt.routing.paths import PathRules
from swarmrt.routing.peer_table import PeerTable


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the offending field."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ScenarioError(message)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One node (peer) of a scenario."""

    id: int
    """Node id; also its row/column in the link matrices."""
    stage: int
    """The pipeline stage this node serves."""
    forward_s: float
    """Seconds of one microbatch's forward pass on this node."""
    memory_microbatches: int
    """How many microbatches' activations the node can hold at once."""
    location: str = ""
    """Where the node is (region name); informational, and the region key of generated swarms."""

    def __post_init__(self) -> None:
        _check(_is_int(self.id) and self.id >= 0, f"id must be an integer >= 0, got {self.id!r}")
        _check(_is_int(self.stage) and self.stage >= 0, f"stage must be an integer >= 0, got {self.stage!r}")
        _check(_is_number(self.forward_s) and self.forward_s > 0, f"forward_s must be > 0, got {self.forward_s!r}")
        _check(_is_int(self.memory_microbatches) and self.memory_microbatches >= 1,
               f"memory_microbatches must be an integer >= 1, got {self.memory_microbatches!r}")
        _check(isinstance(self.location, str), f"location must be a string, got {self.location!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
    """A swarm: stages, nodes and links, plus the constants of one training iteration."""

    stages: int
    """Number of pipeline stages S."""
    stages_visited_per_microbatch: int
    """Distinct stages each microbatch visits, stage 0 included (S: no skipping)."""
    first_stage_is_also_last: bool
    """True when a microbatch returns to its stage-0 origin, which computes the loss."""
    microbatches_per_origin: int
    """Microbatches each stage-0 node starts per iteration."""
    activation_bytes: float
    """Bytes of one microbatch's activation between stages (its gradient has the same size)."""
    backward_factor: float
    """Backward time of a node = backward_factor x its forward_s."""
    per_hop_overhead_s: float
    """Fixed cost added to every transfer."""
    nodes: tuple[NodeSpec, ...]
    """The nodes; ``nodes[i].id == i``."""
    links: Links
    """Transfer times between nodes."""
    name: str = ""
    """A short name for tables and logs."""

    def __post_init__(self) -> None:
        _check(_is_int(self.stages) and self.stages >= 2, f"stages must be an integer >= 2, got {self.stages!r}")
        v = self.stages_visited_per_microbatch
        lowest = 1 if self.first_stage_is_also_last else 2
        _check(_is_int(v) and lowest <= v <= self.stages,
               f"stages_visited_per_microbatch must be an integer in [{lowest}, {self.stages}], got {v!r}")
        _check(isinstance(self.first_stage_is_also_last, bool),
               f"first_stage_is_also_last must be true or false, got {self.first_stage_is_also_last!r}")
        _check(_is_int(self.microbatches_per_origin) and self.microbatches_per_origin >= 1,
               f"microbatches_per_origin must be an integer >= 1, got {self.microbatches_per_origin!r}")
        _check(_is_number(self.activation_bytes) and self.activation_bytes >= 0,
               f"activation_bytes must be >= 0, got {self.activation_bytes!r}")
        _check(_is_number(self.backward_factor) and self.backward_factor > 0,
               f"backward_factor must be > 0, got {self.backward_factor!r}")
        _check(_is_number(self.per_hop_overhead_s) and self.per_hop_overhead_s >= 0,
               f"per_hop_overhead_s must be >= 0, got {self.per_hop_overhead_s!r}")
        _check(len(self.nodes) >= 1, "nodes must not be empty")
        for i, n in enumerate(self.nodes):
            _check(n.id == i, f"nodes[{i}].id must equal its position {i} (link matrices are indexed by it), got {n.id}")
            _check(n.stage < self.stages, f"nodes[{i}].stage must be < stages ({self.stages}), got {n.stage}")
        served = {n.stage for n in self.nodes}
        for s in range(self.stages):
            _check(s in served, f"stage {s} has no node (every stage needs at least one in nodes[])")

    @property
    def rules(self) -> PathRules:
        """The path rules of this scenario (skip ratio = 1 - visited / S)."""
        return PathRules.from_visited(self.stages, self.stages_visited_per_microbatch,
                                      self.first_stage_is_also_last)

    @functools.cached_property
    def origins(self) -> tuple[int, ...]:
        """Ids of the stage-0 nodes: each starts ``microbatches_per_origin`` microbatches per iteration
        (computed once: the simulator asks for every microbatch)."""
        return tuple(n.id for n in self.nodes if n.stage == 0)

    @property
    def microbatches_per_iteration(self) -> int:
        """All microbatches of one iteration."""
        return len(self.origins) * self.microbatches_per_origin

    def nodes_of(self, stage: int) -> tuple[int, ...]:
        """Ids of the nodes serving ``stage``."""
        return tuple(n.id for n in self.nodes if n.stage == stage)


_TOP_LEVEL = {"name", "source", "stages", "stages_visited_per_microbatch", "first_stage_is_also_last",
              "microbatches_per_origin", "activation_bytes", "backward_factor", "per_hop_overhead_s",
              "nodes", "latency_s", "bandwidth_Bps"}
_NODE_KEYS = {"id", "stage", "location", "forward_s", "memory_microbatches"}


def _matrix(obj: Mapping[str, Any], key: str, n: int, positive: bool) -> np.ndarray:
    rows = obj[key]
    _check(isinstance(rows, list) and len(rows) == n, f"{key} must be a list of {n} rows (one per node), "
           f"got {len(rows) if isinstance(rows, list) else type(rows).__name__}")
    out = np.zeros((n, n), dtype=np.float64)
    for i, row in enumerate(rows):
        _check(isinstance(row, list) and len(row) == n, f"{key}[{i}] must be a list of {n} numbers")
        for j, x in enumerate(row):
            _check(_is_number(x), f"{key}[{i}][{j}] must be a number, got {x!r}")
            if i != j:
                _check(x > 0 if positive else x >= 0, f"{key}[{i}][{j}] must be {'> 0' if positive else '>= 0'}, got {x!r}")
            out[i, j] = x
    return out


def parse_scenario(obj: Any) -> Scenario:
    """A :class:`Scenario` from the decoded JSON object; :class:`ScenarioError` names a bad field."""
    _check(isinstance(obj, dict), f"a scenario must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _TOP_LEVEL)
    if unknown:
        raise ScenarioError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_TOP_LEVEL))})")
    for key in sorted(_TOP_LEVEL - {"name", "source", "per_hop_overhead_s"}):
        _check(key in obj, f"missing field {key!r}")
    raw_nodes = obj["nodes"]
    _check(isinstance(raw_nodes, list) and raw_nodes, "nodes must be a non-empty list")
    nodes = []
    for i, raw in enumerate(raw_nodes):
        _check(isinstance(raw, dict), f"nodes[{i}] must be an object")
        unknown = sorted(set(raw) - _NODE_KEYS)
        if unknown:
            raise ScenarioError(f"nodes[{i}]: unknown field {unknown[0]!r}")
        for key in ("id", "stage", "forward_s", "memory_microbatches"):
            _check(key in raw, f"nodes[{i}]: missing field {key!r}")
        try:
            nodes.append(NodeSpec(id=raw["id"], stage=raw["stage"], forward_s=raw["forward_s"],
                                  memory_microbatches=raw["memory_microbatches"],
                                  location=raw.get("location", "")))
        except ScenarioError as e:
            raise ScenarioError(f"nodes[{i}].{e}") from None
    n = len(nodes)
    activation_bytes = obj["activation_bytes"]
    overhead = obj.get("per_hop_overhead_s", 0.0)
    lat = _matrix(obj, "latency_s", n, positive=False)
    bw = _matrix(obj, "bandwidth_Bps", n, positive=True)
    _check(_is_number(activation_bytes) and activation_bytes >= 0,
           f"activation_bytes must be >= 0, got {activation_bytes!r}")
    _check(_is_number(overhead) and overhead >= 0, f"per_hop_overhead_s must be >= 0, got {overhead!r}")
    name = obj.get("name", "")
    _check(isinstance(name, str), f"name must be a string, got {name!r}")
    return Scenario(
        stages=obj["stages"],
        stages_visited_per_microbatch=obj["stages_visited_per_microbatch"],
        first_stage_is_also_last=obj["first_stage_is_also_last"],
        microbatches_per_origin=obj["microbatches_per_origin"],
        activation_bytes=activation_bytes,
        backward_factor=obj["backward_factor"],
        per_hop_overhead_s=overhead,
        nodes=tuple(nodes),
        links=MatrixLinks(lat, bw, float(activation_bytes), float(overhead)),
        name=name,
    )


def load_scenario(path: str) -> Scenario:
    """Read and parse a scenario file; every problem is a :class:`ScenarioError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScenarioError(f"{path}: not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    return parse_scenario(obj)


def region_table(scenario: Scenario) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Regions of ``scenario`` (node locations) with mean latency and bandwidth between each pair.

    The diagonal (two nodes in one region) is the mean over node pairs that
    share a region, or, where a region has a single node, the mean over all
    such pairs in the scenario (geo-aws18: 0.01 s and ~429 MB/s).
    """
    if not isinstance(scenario.links, MatrixLinks):
        raise ScenarioError("region_table needs a scenario with link matrices")
    names = sorted({n.location or f"node{n.id}" for n in scenario.nodes})
    index = {name: i for i, name in enumerate(names)}
    region = [index[n.location or f"node{n.id}"] for n in scenario.nodes]
    r = len(names)
    lat_sum = np.zeros((r, r))
    bw_sum = np.zeros((r, r))
    count = np.zeros((r, r))
    lat = scenario.links.latency_matrix
    bw = scenario.links.bandwidth_matrix
    for i in range(len(scenario.nodes)):
        for j in range(len(scenario.nodes)):
            if i == j:
                continue
            a, b = region[i], region[j]
            lat_sum[a, b] += lat[i, j]
            bw_sum[a, b] += bw[i, j]
            count[a, b] += 1
    same = [(a, a) for a in range(r) if count[a, a] > 0]
    if same:
        intra_lat = float(np.mean([lat_sum[a, a] / count[a, a] for a, _ in same]))
        intra_bw = float(np.mean([bw_sum[a, a] / count[a, a] for a, _ in same]))
    else:
        intra_lat = float(np.min(lat_sum[count > 0] / count[count > 0]))
        intra_bw = float(np.max(bw_sum[count > 0] / count[count > 0]))
    latency = np.where(count > 0, lat_sum / np.maximum(count, 1), 0.0)
    bandwidth = np.where(count > 0, bw_sum / np.maximum(count, 1), 0.0)
    for a in range(r):
        if count[a, a] == 0:
            latency[a, a], bandwidth[a, a] = intra_lat, intra_bw
    missing = (count == 0) & ~np.eye(r, dtype=bool)
    if missing.any():  # unreachable for a full matrix; kept so a table is always complete
        latency[missing] = float(np.max(latency))
        bandwidth[missing] = float(np.min(bandwidth[bandwidth > 0]))
    return names, latency, bandwidth


def generate_scenario(base: Scenario, peers: int, rng: random.Random, speed_spread: float = 0.25,
                      stage0_share: float | None = None) -> Scenario:
    """A swarm of ``peers`` nodes over the regions of ``base`` (seeded by ``rng``).

    Stage 0 gets ``stage0_share`` of the peers (default: its share in
    ``base``), the other stages split the rest evenly. Each peer lands in a
    region drawn uniformly and computes at ``base``'s median ``forward_s``
    times a log-normal factor (sigma ``speed_spread``); memory and all
    iteration constants are ``base``'s. Links are :class:`RegionLinks` over
    :func:`region_table`.
    """
    if peers < base.stages:
        raise ScenarioError(f"generate: peers must be >= stages ({base.stages}), got {peers}")
    names, lat, bw = region_table(base)
    share = stage0_share if stage0_share is not None else len(base.origins) / len(base.nodes)
    n0 = min(max(1, round(peers * share)), peers - (base.stages - 1))
    rest = peers - n0
    per_stage = [n0] + [rest // (base.stages - 1) + (1 if s < rest % (base.stages - 1) else 0)
                        for s in range(base.stages - 1)]
    forward = float(np.median([n.forward_s for n in base.nodes]))
    memory = int(np.median([n.memory_microbatches for n in base.nodes]))
    nodes = []
    regions = []
    for stage, count in enumerate(per_stage):
        for _ in range(count):
            r = rng.randrange(len(names))
            regions.append(r)
            factor = math.exp(rng.gauss(0.0, speed_spread)) if speed_spread > 0 else 1.0
            nodes.append(NodeSpec(id=len(nodes), stage=stage, forward_s=forward * factor,
                                  memory_microbatches=memory, location=names[r]))
    return Scenario(
        stages=base.stages,
        stages_visited_per_microbatch=base.stages_visited_per_microbatch,
        first_stage_is_also_last=base.first_stage_is_also_last,
        microbatches_per_origin=base.microbatches_per_origin,
        activation_bytes=base.activation_bytes,
        backward_factor=base.backward_factor,
        per_hop_overhead_s=base.per_hop_overhead_s,
        nodes=tuple(nodes),
        links=RegionLinks(regions, lat, bw, base.activation_bytes, base.per_hop_overhead_s),
        name=f"{base.name or 'scenario'}-x{peers}",
    )


HEAD_FACTOR = 0.25
"""Loss head (forward + backward) on the origin, as a share of its ``forward_s``, when stage 0 is also
last. The scenario format has no field for it; 1/4 is what SkipPipe's own simulator charges
(``schedulers/com_sym.py``: ``comp / 4``)."""


def peer_table(scenario: Scenario, head_factor: float = HEAD_FACTOR) -> PeerTable:
    """A :class:`PeerTable` holding every node of ``scenario`` (all live, no load)."""
    table = PeerTable(scenario.stages, scenario.links)
    for n in scenario.nodes:
        head = head_factor * n.forward_s if (n.stage == 0 and scenario.first_stage_is_also_last) else 0.0
        table.upsert(n.id, n.stage, n.forward_s, scenario.backward_factor * n.forward_s,
                     n.memory_microbatches, head_s=head)
    return table
