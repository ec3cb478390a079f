"""The run config: one file (TOML or YAML) a user can read.

Every section is a small frozen dataclass with a docstring under each field and
validation in ``__post_init__`` (torchtitan's habit). Unknown keys are an error
that names the key; a bad value is an error that names the field. Parsing the
file lives in :func:`load_config`; everything else is plain data. A section that
belongs to one feature is defined beside it and composed here: ``[local_sgd]`` is
:class:`swarmrt.local_sgd.config.LocalSGDSection`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import tomllib
from typing import Any, Mapping

from swarmrt.local_sgd.config import LocalSGDSection, check_allreduce_codec
from swarmrt.routing.paths import PathRules
from swarmrt.routing.rebalance import RebalanceRules


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the offending key."""


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class RunSection:
    id: str = "swarmrt"
    """Name of the run; peers and trainers of one run share it. Letters, digits, '-' and '_'."""
    seed: int = 0
    """Seed for model initialisation and data order."""

    def __post_init__(self) -> None:
        _check(bool(self.id) and all(c.isalnum() or c in "-_" for c in self.id), "run.id",
               f"must be letters, digits, '-' or '_', got {self.id!r}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    factory: str = "swarmrt.models:tiny_llama"
    """``package.module:function`` returning a standard ``nn.Module``."""
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments passed to the factory."""
    stages: int = 3
    """Number of pipeline stages to cut the model into (ignored when ``layer_ranges`` is set)."""
    layer_ranges: tuple[tuple[int, int], ...] | None = None
    """Explicit ``[start, end)`` layer ranges, one per stage, covering every layer in order."""
    pretrained: str | None = None
    """A local Hugging Face model directory (``config.json`` + safetensors): the model is built from its
    config (``factory`` and ``kwargs`` are then not used) and each peer reads only its stage's tensors."""

    precision: str = "fp32"
    """Compute precision of the stage peers: ``fp32``, or ``bf16``/``fp16`` autocast with fp32 master weights
    and optimizer state; activations and their gradients cross the wire in this precision. ``fp16`` has no
    loss scaling: prefer ``bf16``."""

    def __post_init__(self) -> None:
        _check(self.precision in ("fp32", "bf16", "fp16"), "model.precision",
               f"must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        _check(":" in self.factory and all(self.factory.split(":", 1)), "model.factory",
               f"must look like 'package.module:function', got {self.factory!r}")
        _check(isinstance(self.kwargs, Mapping), "model.kwargs", "must be a table of keyword arguments")
        _check(self.pretrained is None or (isinstance(self.pretrained, str) and self.pretrained.strip() != ""),
               "model.pretrained", f"must be a local model directory, got {self.pretrained!r}")
        if self.layer_ranges is not None:
            ranges = tuple(tuple(r) for r in self.layer_ranges)
            object.__setattr__(self, "layer_ranges", ranges)
            _check(len(ranges) >= 1, "model.layer_ranges", "needs at least one range")
            for i, r in enumerate(ranges):
                _check(len(r) == 2 and all(isinstance(x, int) for x in r) and r[0] < r[1],
                       f"model.layer_ranges[{i}]", f"must be [start, end) with start < end, got {list(r)}")
            _check(ranges[0][0] == 0, "model.layer_ranges[0]", "must start at layer 0")
            for i in range(1, len(ranges)):
                _check(ranges[i][0] == ranges[i - 1][1], f"model.layer_ranges[{i}]",
                       f"must start where the previous range ends ({ranges[i - 1][1]}), got {ranges[i][0]}")
            object.__setattr__(self, "stages", len(ranges))
        _check(isinstance(self.stages, int) and self.stages >= 1, "model.stages", f"must be an integer >= 1, got {self.stages!r}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    kind: str = "text"
    """``text``: byte-level language modelling; ``regression``: seeded random features -> targets."""
    path: str | None = None
    """Text file to train on; default: the Python standard library's own source, present on every install."""
    max_bytes: int = 4_000_000
    """Cap on how much text is read."""
    seq_len: int = 64
    """Tokens per sample (text)."""
    features: int = 16
    """Input width (regression)."""
    targets: int = 1
    """Output width (regression)."""
    batch_size: int = 16
    """Samples per optimizer step of the trainer."""
    microbatch_size: int = 4
    """Samples per microbatch; each microbatch takes its own route."""
    tokenizer: str | None = None
    """A local tokenizer directory (its ``tokenizer.json``): ``path`` (a ``.txt`` or ``.jsonl`` file, or a
    directory of them) is tokenized with it instead of read as bytes (text)."""
    text_field: str = "text"
    """The field of each ``.jsonl`` record that holds its text."""
    factory: str | None = None
    """``package.module:function`` called as ``function(data_section, seed, stream, **factory_kwargs)``; it
    returns a batch source: ``batch(step) -> (inputs, targets)``, a pure function of the step (the trainer
    saves its step as the data position, so resuming needs nothing else), and optionally
    ``eval_batch(n, index)`` for held-out batches. ``kind`` still says what the inputs are (token ids
    ``[B, T]`` for text, ``[B, features]`` floats for regression)."""
    factory_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments passed to ``factory``."""
    loss: str | None = None
    """``package.module:function`` called as ``function(output, targets)``; returns one loss per sample
    (shape ``[B]``). Default: cross-entropy per token averaged per sample (text), or MSE (regression)."""

    def __post_init__(self) -> None:
        _check(self.kind in ("text", "regression"), "data.kind", f"must be 'text' or 'regression', got {self.kind!r}")
        for name in ("factory", "loss"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and ":" in value and all(value.split(":", 1))),
                   f"data.{name}", f"must look like 'package.module:function', got {value!r}")
        _check(isinstance(self.factory_kwargs, Mapping), "data.factory_kwargs", "must be a table of keyword arguments")
        _check(self.tokenizer is None or (isinstance(self.tokenizer, str) and self.tokenizer.strip() != ""),
               "data.tokenizer", f"must be a local tokenizer directory, got {self.tokenizer!r}")
        _check(self.tokenizer is None or (self.path is not None and self.kind == "text"), "data.tokenizer",
               "needs data.path (the files to tokenize) and data.kind = 'text'")
        _check(isinstance(self.text_field, str) and self.text_field != "", "data.text_field",
               f"must be a field name, got {self.text_field!r}")
        for name in ("max_bytes", "seq_len", "features", "targets", "batch_size", "microbatch_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"data.{name}", f"must be an integer >= 1, got {value!r}")
        _check(self.batch_size % self.microbatch_size == 0, "data.batch_size",
               f"must be a multiple of data.microbatch_size ({self.microbatch_size}), got {self.batch_size}")

    @property
    def microbatches_per_step(self) -> int:
        return self.batch_size // self.microbatch_size


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    name: str = "adamw"
    """Inner optimizer of each stage peer: ``adamw`` or ``sgd``."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """Weight decay."""
    momentum: float = 0.0
    """Momentum (sgd only)."""
    samples_per_step: int = 16
    """A stage peer steps its optimizer after accumulating gradients of this many samples."""
    max_grad_norm: float | None = 10.0
    """Clip the accumulated gradient to this norm before a step (on by default: one hostile or
    exploding gradient cannot blow up a stage's weights; ``inf`` or None: no clipping)."""
    warmup_steps: int = 0
    """The learning rate rises linearly over a stage's first ``warmup_steps`` optimizer steps (step n,
    counted from 0 by the stage's model version, uses ``lr * (n + 1) / warmup_steps``). 0: none."""
    decay_steps: int = 0
    """After the warmup, the learning rate follows a cosine from ``lr`` down to ``lr * min_lr_ratio``
    over this many steps and stays there. 0: constant after the warmup."""
    min_lr_ratio: float = 0.1
    """Where the cosine decay ends, as a fraction of ``lr``."""
    staleness: int = 0
    """Steps a trainer may start beyond its oldest unfinished one: with k, step s starts once step
    s - k - 1 has finished, so up to k + 1 steps are in flight and a microbatch's gradient may be
    computed on weights that miss up to k of this trainer's steps. 0: a barrier at every step (the
    trainer waits for all of a step's microbatches before it starts the next). Exactly-once holds
    either way."""

    def __post_init__(self) -> None:
        _check(self.name in ("adamw", "sgd"), "optimizer.name", f"must be 'adamw' or 'sgd', got {self.name!r}")
        _check(isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr), "optimizer.lr",
               f"must be a positive number, got {self.lr!r}")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        _check(0 <= self.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {self.momentum!r}")
        _check(isinstance(self.samples_per_step, int) and self.samples_per_step >= 1, "optimizer.samples_per_step",
               f"must be an integer >= 1, got {self.samples_per_step!r}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "optimizer.max_grad_norm",
               f"must be > 0, got {self.max_grad_norm!r}")
        _check(isinstance(self.staleness, int) and not isinstance(self.staleness, bool) and 0 <= self.staleness <= 8,
               "optimizer.staleness", f"must be an integer in 0..8, got {self.staleness!r}")
        for key in ("warmup_steps", "decay_steps"):
            value = getattr(self, key)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"optimizer.{key}",
                   f"must be an integer >= 0, got {value!r}")
        _check(isinstance(self.min_lr_ratio, (int, float)) and not isinstance(self.min_lr_ratio, bool)
               and 0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes from step to step (a warmup or a decay)."""
        return self.warmup_steps > 0 or self.decay_steps > 0

    def lr_at(self, step: int) -> float:
        """The learning rate of a stage's optimizer step ``step`` (its model version before the step)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_steps == 0:
            return self.lr
        done = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


@dataclasses.dataclass(frozen=True)
class NetworkSection:
    host: str = "127.0.0.1"
    """Address a stage peer listens on (gRPC and DHT). Loopback by default (one machine); ``0.0.0.0``
    listens on every interface, and then needs ``announce_host``."""
    announce_host: str | None = None
    """Address other machines use to reach this peer, announced in the DHT (gRPC ``host:port`` and the
    DHT's multiaddr); default: ``host``. A cloud VM whose public IP is NATed listens on ``0.0.0.0`` and
    announces its public IP (and opens or forwards the gRPC ``--port`` and ``dht_port``)."""
    dht_port: int = 0
    """TCP port of the peer's DHT node (0: any free port). Fix it to open one port in a firewall;
    needed when ``announce_host`` differs from ``host`` (libp2p cannot announce port 0)."""
    use_auto_relay: bool = False
    """Look for libp2p relays among the DHT peers and announce a relayed address (a peer behind NAT
    whose DHT port nobody can dial)."""
    reachability: str = "p2p"
    """What a joining peer does when no peer in the run can dial its announced gRPC address (checked
    before it announces ``serving``): ``p2p``: serve the stage over libp2p instead (through a relay if
    needed; slower), ``fail``: exit with one line saying how to fix the address, ``off``: do not check."""
    heartbeat_s: float = 1.0
    """How often a peer re-announces itself in the DHT."""
    record_ttl_s: float = 4.0
    """How long an announcement lives without a heartbeat; a dead peer vanishes after this."""
    forward_timeout_s: float = 10.0
    """Deadline of one Forward call."""
    backward_timeout_s: float = 10.0
    """Deadline of one Backward call."""
    max_retries: int = 6
    """How many times one hop is retried on other peers before the microbatch gives up and restarts."""
    ban_after_failures: int = 2
    """Consecutive failures after which a trainer stops routing to a peer for ``ban_s``."""
    ban_s: float = 10.0
    """How long a failing peer is banned before it is tried again."""
    max_tensor_mb: int = 256
    """Largest tensor message accepted (MiB); gRPC's 4 MiB default is raised to this deliberately."""
    context_ttl_s: float = 30.0
    """How long a peer keeps a forward's autograd context for the backward."""
    context_max_mb: int = 512
    """Memory cap on kept autograd contexts; the oldest are evicted (then recomputed from inputs)."""
    no_peers_timeout_s: float = 120.0
    """How long a trainer waits for a stage that has no peer and that no peer can fill (none joins or
    moves there, and no peer elsewhere is free to move: all pinned with ``--stage`` or the last of their
    stage) before it fails the run (``swarmrt train``/``eval`` exit 3 with one line naming the stage).
    While the swarm can fill the stage (a peer is moving or joining there, or could), the trainer waits
    up to 3x this long (``swarmrt.roles.trainer.HEAL_FACTOR``): moves take seconds, so a stage empty
    that long means its peers do not rebalance. Also how long a stage whose peers are all banned, or a
    backward that keeps failing, is retried."""
    verify_fraction: float = 0.0
    """Checked work: the fraction of forward hops a trainer re-runs on a second peer of the same stage
    and compares (0: never; 0.05 costs about 1% of step time). Off by default because peers of a stage
    drift apart between averaging rounds: set it with a ``verify_tolerance`` above that drift
    (docs/security-checks.md). A stage with one peer cannot be checked."""
    verify_tolerance: float = 0.1
    """Checked work: largest relative L2 gap ``||a - b|| / max(||a||, ||b||)`` between two peers' outputs
    that still counts as agreement (peers of a stage drift apart a little between averaging rounds)."""
    bad_reply_ban_s: float = 300.0
    """How long a peer that sent a bad reply (wrong shape/dtype, NaN, a failed check) is banned."""
    max_sequence_length: int = 65536
    """Longest sequence (tokens) a stage peer accepts in one request."""
    max_concurrent_rpcs: int = 64
    """Calls a stage peer serves at once; gRPC refuses more with RESOURCE_EXHAUSTED."""
    max_state_mb: int = 16384
    """Largest stage state (MiB) a joiner downloads from a peer (GetState)."""
    chain_hops: bool = False
    """Peer-to-peer hops: each peer sends its output (forward) or input gradient (backward) straight to
    the next peer of the route, so activations cross the trainer's link once per microbatch instead of
    twice per hop (``swarmrt.pipeline.chain``). Off: the trainer relays every hop, measures every peer
    and can check their work. Cannot be combined with ``verify_fraction`` > 0."""

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "record_ttl_s", "forward_timeout_s", "backward_timeout_s", "ban_s",
                     "context_ttl_s", "no_peers_timeout_s"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value > 0, f"network.{name}", f"must be > 0, got {value!r}")
        _check(self.record_ttl_s > self.heartbeat_s, "network.record_ttl_s",
               f"must exceed network.heartbeat_s ({self.heartbeat_s}), got {self.record_ttl_s}")
        for name in ("max_retries", "ban_after_failures", "max_tensor_mb", "context_max_mb", "max_sequence_length",
                     "max_concurrent_rpcs", "max_state_mb"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"network.{name}", f"must be an integer >= 1, got {value!r}")
        _check(isinstance(self.verify_fraction, (int, float)) and 0 <= self.verify_fraction <= 1,
               "network.verify_fraction", f"must be in [0, 1], got {self.verify_fraction!r}")
        _check(isinstance(self.chain_hops, bool), "network.chain_hops", f"must be true or false, got {self.chain_hops!r}")
        _check(not (self.chain_hops and self.verify_fraction > 0), "network.chain_hops",
               "cannot be combined with network.verify_fraction > 0: checked work compares each stage's output, "
               "which a chained route does not bring back to the trainer")
        for name in ("verify_tolerance", "bad_reply_ban_s"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value > 0 and math.isfinite(value), f"network.{name}",
                   f"must be a finite number > 0, got {value!r}")
        for name in ("host", "announce_host"):
            value = getattr(self, name)
            _check(value is None and name == "announce_host" or isinstance(value, str) and value.strip() == value
                   and value != "" and "/" not in value and " " not in value, f"network.{name}",
                   f"must be an IP address or host name, got {value!r}")
        _check(self.announce_host not in WILDCARDS, "network.announce_host",
               f"must be an address others can dial, not the wildcard {self.announce_host!r}")
        _check(self.host not in WILDCARDS or self.announce_host is not None, "network.announce_host",
               f"must be set when network.host is the wildcard {self.host!r} (it cannot be dialled): "
               "the address other machines reach this one at")
        _check(isinstance(self.dht_port, int) and not isinstance(self.dht_port, bool) and 0 <= self.dht_port < 65536,
               "network.dht_port", f"must be a TCP port 0..65535, got {self.dht_port!r}")
        _check(self.dht_port != 0 or self.announce_host in (None, self.host), "network.dht_port",
               f"must be a fixed port when network.announce_host ({self.announce_host}) differs from network.host "
               f"({self.host}): libp2p cannot announce port 0")
        _check(isinstance(self.use_auto_relay, bool), "network.use_auto_relay",
               f"must be true or false, got {self.use_auto_relay!r}")
        _check(self.reachability in REACHABILITY, "network.reachability",
               f"must be one of {', '.join(REACHABILITY)}, got {self.reachability!r}")

    @property
    def public_host(self) -> str:
        """The address announced to others: ``announce_host``, else ``host``."""
        return self.announce_host or self.host


WILDCARDS = ("0.0.0.0", "::", "[::]")
REACHABILITY = ("p2p", "fail", "off")


@dataclasses.dataclass(frozen=True)
class CompressionSection:
    activations: str = "fp16"
    """Codec for activations sent forward (see swarmrt.wire.codecs: none, fp16, bf16, int8, ...). fp16 by
    default: half the bytes of none, with held-out loss within 1% of none on the demo model and a larger one
    (benchmarks/bench_activation_codecs.py, docs/benchmarks.md). Integer tensors (token ids) always go as none."""
    gradients: str = "fp16"
    """Codec for activation gradients sent backward (fp16 by default, chosen with ``activations``)."""
    pseudo_gradients: str = "fp16"
    """Codec of the stage group's pseudo-gradient all-reduce ([local_sgd]): one of
    ``swarmrt.local_sgd.config.ALLREDUCE_CODECS`` (none, fp16, int8, int8_blockwise)."""
    state: str = "none"
    """Codec of DiLoCo state a peer downloads through the averager: one of ``ALLREDUCE_CODECS`` (lossy
    codecs make the downloaded global params differ from the group's, so its hash will not match)."""

    def __post_init__(self) -> None:
        from swarmrt.wire.codecs import get_codec

        for name in ("activations", "gradients"):
            try:
                get_codec(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"compression.{name}: {e}") from None
        for name in ("pseudo_gradients", "state"):
            try:
                check_allreduce_codec(getattr(self, name), f"compression.{name}")
            except ValueError as e:
                raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class RoutingSection:
    skip_ratio: float = 0.0
    """Fraction of stages a microbatch skips (never the first or last); 0 = full pipeline. Each microbatch
    visits ``round((1 - skip_ratio) x stages)`` stages, routed by the path scheduler. Needs at least 3
    stages and a model whose middle stages take and return what stage 0 puts out (residual blocks do)."""
    plan_ahead: bool = False
    """With skipping: plan each balance window of microbatches ahead with the whole-iteration planner (the
    one ``swarmrt plan`` runs, over the live peers) instead of routing each microbatch as it starts."""

    def __post_init__(self) -> None:
        _check(0 <= self.skip_ratio < 1, "routing.skip_ratio", f"must be in [0, 1), got {self.skip_ratio!r}")
        _check(isinstance(self.plan_ahead, bool), "routing.plan_ahead", f"must be true or false, got {self.plan_ahead!r}")


@dataclasses.dataclass(frozen=True)
class RebalanceSection:
    """How peers started without ``--stage`` choose a stage and move between stages
    (:mod:`swarmrt.routing.rebalance` decides; pinned peers never move)."""

    enabled: bool = True
    """Peers without ``--stage`` move to where the swarm needs them; false: they stay where they joined."""
    period_s: float = 5.0
    """How often a peer re-checks the balance. A stage that has no peer is checked on every heartbeat."""
    balance_quality: float = 0.8
    """Peers move only while the swarm's bottleneck throughput is below this share of what the same
    peers could reach (Petals' rule; 0.8: when more than 25% is to be gained), and then only by moves
    that raise the slowest stages. In (0, 1]."""
    cooldown_s: float = 30.0
    """A peer that joined or moved less than this long ago does not move again, except to fill a
    stage that has no peer at all."""
    join_settle_s: float = 1.0
    """A joining peer announces where it means to go, waits a seeded random time up to this, re-reads
    the other joiners and re-picks, so peers started in the same second spread over the stages."""

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "rebalance.enabled", f"must be true or false, got {self.enabled!r}")
        for name in ("period_s", "join_settle_s"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                   and value > 0, f"rebalance.{name}", f"must be > 0, got {value!r}")
        _check(isinstance(self.cooldown_s, (int, float)) and not isinstance(self.cooldown_s, bool)
               and math.isfinite(self.cooldown_s) and self.cooldown_s >= 0, "rebalance.cooldown_s",
               f"must be >= 0, got {self.cooldown_s!r}")
        _check(isinstance(self.balance_quality, (int, float)) and 0 < self.balance_quality <= 1,
               "rebalance.balance_quality", f"must be in (0, 1], got {self.balance_quality!r}")

    def rules(self) -> RebalanceRules:
        return RebalanceRules(balance_quality=float(self.balance_quality), cooldown_s=float(self.cooldown_s))


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    location: str | None = None
    """Where checkpoints go: a local directory, or an fsspec URL (``s3://bucket/runs``,
    ``gs://...``; needs ``fsspec`` and the scheme's package). None: no checkpoints."""
    every_steps: int = 0
    """Write when a stage's step (optimizer version, or outer step with local SGD) crosses a
    multiple of this; 0: not by steps."""
    every_minutes: float = 0.0
    """Write when this many minutes passed since the last checkpoint of this peer; 0: not by time."""
    keep: int = 3
    """Keep the newest this many checkpoints per stage; older ones are deleted after a write."""
    on_leave: bool = True
    """A peer that drains (SIGTERM/SIGINT) while no other peer serves its stage writes a
    checkpoint before it leaves, so the next peer of the stage can resume from it."""

    def __post_init__(self) -> None:
        _check(self.location is None or (isinstance(self.location, str) and self.location.strip() != ""),
               "checkpoint.location", f"must be a directory or URL, got {self.location!r}")
        _check(isinstance(self.every_steps, int) and not isinstance(self.every_steps, bool)
               and self.every_steps >= 0, "checkpoint.every_steps",
               f"must be an integer >= 0, got {self.every_steps!r}")
        _check(isinstance(self.every_minutes, (int, float)) and not isinstance(self.every_minutes, bool)
               and math.isfinite(self.every_minutes) and self.every_minutes >= 0, "checkpoint.every_minutes",
               f"must be a number >= 0, got {self.every_minutes!r}")
        _check(isinstance(self.keep, int) and not isinstance(self.keep, bool) and self.keep >= 1,
               "checkpoint.keep", f"must be an integer >= 1, got {self.keep!r}")
        _check(isinstance(self.on_leave, bool), "checkpoint.on_leave", f"must be true or false, got {self.on_leave!r}")
        if self.location is None:
            for name in ("every_steps", "every_minutes"):
                _check(not getattr(self, name), f"checkpoint.{name}",
                       "is set but checkpoint.location is not: say where checkpoints go")

    @property
    def enabled(self) -> bool:
        """True when checkpoints have somewhere to go."""
        return self.location is not None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run: RunSection = dataclasses.field(default_factory=RunSection)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    network: NetworkSection = dataclasses.field(default_factory=NetworkSection)
    compression: CompressionSection = dataclasses.field(default_factory=CompressionSection)
    local_sgd: LocalSGDSection = dataclasses.field(default_factory=LocalSGDSection)
    routing: RoutingSection = dataclasses.field(default_factory=RoutingSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    rebalance: RebalanceSection = dataclasses.field(default_factory=RebalanceSection)

    def __post_init__(self) -> None:
        ratio = self.routing.skip_ratio
        if ratio > 0:
            S = self.num_stages
            _check(S >= 3, "routing.skip_ratio",
                   f"{ratio} needs at least 3 stages (the first and the last stage are never skipped), "
                   f"but model.stages is {S}; set routing.skip_ratio = 0 or cut the model into more stages")
            try:
                visited = PathRules(stages=S, skip_ratio=ratio).visited
            except ValueError as e:
                raise ConfigError(f"routing.skip_ratio: {e}") from None
            _check(visited < S, "routing.skip_ratio",
                   f"{ratio} of {S} stages skips no stage (each microbatch would visit round((1 - {ratio}) x {S}) "
                   f"= {visited} stages); set it to 0, or above {0.5 / S:.3f} to skip one")

    @property
    def num_stages(self) -> int:
        return self.model.stages

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """Short hash of the whole config, to tell runs apart."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts; unknown sections or keys are errors naming them."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a table of sections")
    sections: dict[str, Any] = {}
    for section_name, values in raw.items():
        field = next((f for f in dataclasses.fields(RunConfig) if f.name == section_name), None)
        if field is None:
            raise ConfigError(f"{source}: unknown section [{section_name}]; known: {', '.join(_SECTIONS)}")
        cls = field.default_factory  # the section dataclass
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section_name}: must be a table of keys")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{section_name}.{key}: unknown key; known: {', '.join(sorted(known))}")
        try:
            sections[section_name] = cls(**values)
        except ConfigError:
            raise
        except ValueError as e:  # sections defined beside their feature (local_sgd) raise ValueError naming the key
            raise ConfigError(str(e)) from None
        except TypeError as e:  # pragma: no cover - guarded by the key check above
            raise ConfigError(f"{section_name}: {e}") from None
    return RunConfig(**sections)


def load_config(path: str | pathlib.Path) -> RunConfig:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``: what ``LocalSwarm``
    writes; it keeps ``inf``, as in ``optimizer.max_grad_norm = inf``) run config."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = tomllib.loads(text)
    except Exception as e:  # parse errors of either format
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    return config_from_dict(raw, source=str(path))


def with_overrides(config: RunConfig, **sections: Mapping[str, Any]) -> RunConfig:
    """A copy of ``config`` with some keys of some sections replaced (validated again)."""
    raw = config.to_dict()
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)
