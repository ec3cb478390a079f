"""Average tensors inside one stage group over hivemind's decentralized all-reduce.

The peers that serve one stage meet every ``H`` inner steps to average their
DiLoCo pseudo-gradients (``swarmrt.local_sgd.diloco``). :class:`StageAverager`
wraps ``hivemind.averaging.DecentralizedAverager`` for that, and adds what
the raw averager lacks for this use:

- **Bounded waits.** Matchmaking is bounded by ``step(timeout=)``, every
  chunk by ``local_sgd.next_chunk_timeout_s`` and the whole all-reduce by
  ``local_sgd.allreduce_timeout_s``; the host side waits at most the sum plus a margin.
  With hivemind 1.1.12's defaults an averager whose groupmate died hangs for
  minutes (150-300 s on 127.0.0.1). :meth:`StageAverager.average` returns an
  :class:`AveragingResult` saying whether the round succeeded, with whom,
  and why not, instead of raising or hanging.
- **Identical results on every peer.** hivemind's reducers send each sender
  ``average - its_part`` (compressed) and the sender adds that to its own
  part, so peers end up with slightly different "averages" (compression
  error of different deltas, float rounding): DiLoCo replicas would drift
  apart. Here the reducers send the averaged part itself, and the reducer's
  own copy goes through the same codec, so every peer of a successful round
  holds the same bytes and applies the same outer step. Measured, 2 peers,
  300,561 values: stock hivemind left 79,517 values different between the
  peers with no codec (max 2.4e-7), 300,528 with fp16 (max 2.4e-3) and
  300,552 with int8 (max 1.67); this class: 0 in all three. This changes two
  methods of hivemind 1.1.12's ``AllReduceRunner`` and one of
  ``DecentralizedAverager`` (pinned version; hivemind still does the
  matchmaking, the butterfly partitioning, the streaming and the timeouts).
- **No partial rounds.** If a reducer fails mid-round hivemind silently
  keeps the local values for its parts ("received 66.7% results"); here that
  round fails and the averaged tensors are left untouched.
- **Codec names.** The all-reduce codec is chosen by a swarmrt codec name
  (one of ``swarmrt.local_sgd.config.ALLREDUCE_CODECS``: ``none``, ``fp16``,
  ``int8``, ``int8_blockwise``) and mapped to hivemind's own codec (its wire
  format needs them); any other name is refused.

What a single peer cannot know: in a group where a peer dies mid-round, some
survivors may have received all their parts (success) and others not
(failure). The runtime compares :meth:`~swarmrt.local_sgd.diloco.DiLoCo.params_hash`
(e.g. through ``gather``) and lets a peer that disagrees load state.

- **Robust aggregation.** Each reducer sees every sender's copy of its part; it
  keeps them and combines them with :func:`swarmrt.local_sgd.robust.aggregate`
  (``local_sgd.aggregation``: ``mean``, ``trimmed_mean`` or ``centered_clip``,
  BTARD's butterfly clipping). A sender whose part holds NaN/inf, has the wrong
  shape or dtype, carries a negative or non-finite weight or (robust rules) is an
  outlier is left out of that part, named in :attr:`AveragingResult.excluded`, and
  ignored by this peer's reducers for ``local_sgd.sender_ban_s``; the round goes
  on for the others. A peer clips its own tensors to ``local_sgd.clip_norm``
  before sending.
- **Donors by agreement.** :meth:`StageAverager.load_state` with ``donors``
  downloads only from the named peers (those that held the state the group agreed
  on), bounded in bytes and tensors, instead of from whoever declared the highest
  priority in the DHT.

Weights: each peer passes its weight (1 for a peer that trained, 0 for one
that just joined). The reducers bound every sender's weight to 0 or 1, so a
joiner does not dilute the average and a claimed weight of 1e6 counts once. A
part that no sender could contribute to fails the round on every peer (a
group whose weights are all 0, for instance).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, get_logger
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, azip
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import get_dht_time

from swarmrt.local_sgd.config import LocalSGDSection, check_allreduce_codec
from swarmrt.local_sgd.robust import SenderBans, aggregate, clip_by_norm
from swarmrt.local_sgd.rounds import AveragingResult, StateProvider
from swarmrt.discovery.dht import node_usable
from swarmrt.procs import die_with_parent, stop_child, stop_signals_blocked

__all__ = ["AveragingResult", "StageAverager", "hivemind_compression"]

logger = get_logger(__name__)

RESULT_MARGIN_S = 10.0
"""The caller waits at most matchmaking timeout + all-reduce timeout + this for a round's result."""


def hivemind_compression(codec: str) -> CompressionBase:
    """hivemind's codec for a swarmrt codec name usable in the all-reduce (one of
    :data:`~swarmrt.local_sgd.config.ALLREDUCE_CODECS`); ``ValueError`` for any other."""
    check_allreduce_codec(codec, "all-reduce codec")
    if codec == "none":
        return NoCompression()
    if codec == "fp16":
        return Float16Compression()
    if codec == "int8":
        return Uniform8BitQuantization()
    if codec == "int8_blockwise":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError(
                "codec 'int8_blockwise' in hivemind's all-reduce needs bitsandbytes (pip install bitsandbytes); "
                "or use 'int8' or 'fp16'"
            ) from None
        return BlockwiseQuantization()
    raise AssertionError(f"ALLREDUCE_CODECS lists {codec!r} but it has no hivemind codec here")  # pragma: no cover


REPORT_KEY = "swarmrt:report"
"""Key of this peer's own report (who its reducer left out) in what the averager process returns
for a round, beside the groupmates' gathered data (keyed by PeerID, so it cannot collide)."""


def _claimed_weight(data: dict) -> float:
    """A groupmate's gathered weight: a finite number > 0, else 0 (the reducers bound it to 0 or 1)."""
    weight = data.get("weight")
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight < math.inf
    return float(weight) if ok else 0.0


class _RobustPartReducer(TensorPartReducer):
    """hivemind's TensorPartReducer, except that it keeps each sender's copy of the current part
    and, once every current sender has sent it, combines them with
    :func:`swarmrt.local_sgd.robust.aggregate` (the ``[local_sgd]`` rule: weights 0 or 1, nan/inf
    and outliers left out, mean / trimmed mean / CenteredClip). A part of the wrong shape or dtype
    is left out too; senders in ``ignored`` (banned earlier) are received but never used. When no
    part is usable, every sender of that part gets an error and the round fails everywhere."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, rule: LocalSGDSection,
                 ignored: dict[int, str], on_excluded: Any):
        self.rule, self.ignored, self.on_excluded = rule, ignored, on_excluded
        self.contributions: dict[int, tuple[torch.Tensor | None, Any]] = {}
        self.failures: list[str] = []  # why parts could not be aggregated
        self._combining: asyncio.Task | None = None  # the current part's aggregation, while it runs
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        self.accumulator = None  # parts are kept in contributions, not summed
        self.contributions = {}

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        # hivemind 1.1.12's method, keeping the sender's part (checked) instead of adding it to a sum
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        shape = self.part_shapes[part_index]
        if tuple(tensor_part.shape) != tuple(shape) or not tensor_part.is_floating_point():
            self.contributions[sender_index] = (None, f"part of {tensor_part.dtype} {list(tensor_part.shape)}, "
                                                      f"expected float {list(shape)}")
        else:
            self.contributions[sender_index] = (tensor_part.to(torch.float32), weight)
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders or self._combining is not None:
            return
        # combining takes milliseconds to seconds (sorts, norms): off the event loop, so that no
        # stream of this round misses its next_chunk_timeout meanwhile
        self._combining = asyncio.get_running_loop().create_task(self._finish_part(self.contributions))

    async def _finish_part(self, contributions: dict[int, tuple[torch.Tensor | None, Any]]) -> None:
        future, shape = self.current_part_future, self.part_shapes[self.current_part_index]
        try:
            outcome, excluded = await asyncio.get_running_loop().run_in_executor(None, self._combine, contributions)
        except Exception as error:  # a bug, not a sender's doing: fail the part, never hang it
            outcome, excluded = None, {}
            reason = f"aggregation failed: {error!r}"
        else:
            reason = outcome.reason
        self._combining = None
        if self.finished.is_set():
            return
        if excluded:
            self.on_excluded(excluded)
        if outcome is None or outcome.value is None:
            self.failures.append(reason)
            future.set_exception(AllreduceException(f"part {self.current_part_index}: {reason}"))
        else:
            future.set_result(outcome.value.reshape(shape))
        self.reset_accumulators()

    def _combine(self, contributions: dict[int, tuple[torch.Tensor | None, Any]]) -> tuple[Any, dict[int, str]]:
        senders, parts, weights, excluded = [], [], [], {}
        for sender in sorted(contributions):
            part, weight = contributions[sender]
            if sender in self.ignored:
                continue
            if part is None:
                excluded[sender] = weight  # the reason, for a part of the wrong shape or dtype
                continue
            senders.append(sender)
            parts.append(part)
            weights.append(weight)
        outcome = aggregate(parts, weights, self.rule)
        excluded.update({senders[index]: why for index, why in outcome.excluded.items()})
        return outcome, excluded


class _AverageReturningRunner(AllReduceRunner):
    """hivemind's AllReduceRunner, except that each reducer aggregates its part robustly
    (:class:`_RobustPartReducer`) and returns the aggregated part itself (not ``average -
    sender's part``), passing its own copy through the same codec, so that every peer ends the
    round with identical bytes. ``banned`` peers' parts are received and ignored; the senders
    this peer's reducer left out are in ``excluded`` (peer id base58 -> why)."""

    def __init__(self, *args: Any, rule: LocalSGDSection, banned: dict[Any, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        # for a failed reducer, keep the local part (the round is then refused as a whole)
        self.tensor_part_container.return_deltas = False
        self.tensor_part_reducer.finished.set()  # the stock reducer is replaced unused (and silent)
        self.excluded: dict[str, str] = {}
        ignored = {index: why for index, peer in enumerate(self.sender_peer_ids) if (why := banned.get(peer))}
        self.tensor_part_reducer = _RobustPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids), rule,
            ignored, self._record_excluded,
        )

    def _record_excluded(self, excluded: dict[int, str]) -> None:
        for index, why in excluded.items():
            self.excluded.setdefault(self.sender_peer_ids[index].to_base58(), why)

    async def _communicate_with_peer(self, peer_id: Any) -> None:
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        compression_type = self.tensor_part_container.compression.compression_type
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            try:
                averaged_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight
                )
            except AllreduceException:  # no usable part: the round fails (every sender hears so)
                self.tensor_part_container.register_failed_reducer(peer_index)
                raise
            as_sent = deserialize_torch_tensor(serialize_torch_tensor(averaged_part, compression_type))
            self.tensor_part_container.register_processed_part(peer_index, part_index, as_sent)

    async def _accumulate_parts_streaming(self, stream: Any, sender_index: int) -> Any:
        # hivemind 1.1.12's method with `averaged_part - tensor_part` replaced by `averaged_part`
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    break  # the sender was banned in background; it no longer needs results
                serialized = await loop.run_in_executor(
                    None, lambda: serialize_torch_tensor(averaged_part, part_compression)
                )
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class _StageDecentralizedAverager(DecentralizedAverager):
    """DecentralizedAverager with :class:`_AverageReturningRunner`, all-or-nothing updates and
    a state provider for ``load_state_from_peers``. Every peer of a group must use this class
    (hivemind names its RPC handlers after the class)."""

    state_provider: StateProvider | None = None
    rule: LocalSGDSection = LocalSGDSection()
    """The aggregation rule each of this peer's reducers applies (set before the process starts)."""
    bans: SenderBans | None = None
    """Senders this peer's reducers left out for cause, ignored for ``rule.sender_ban_s``."""
    _reports: dict[bytes, dict[str, str]]
    """Group id -> who this peer's reducers left out in that round (until the round returns)."""

    def run(self) -> None:
        die_with_parent()  # a SIGKILLed peer takes its averager process with it
        super().run()

    async def _aggregate_with_group(self, group_info: Any, min_vector_size: int, **kwargs: Any) -> Any:
        try:
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        finally:
            report = self._reports.pop(group_info.group_id, {})
        return {**gathered, REPORT_KEY: report}

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: Any, group_id: bytes | None = None, **kwargs: Any
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        now = time.monotonic()
        banned = {peer: f"banned: {why}" for peer in group_info.peer_ids
                  if peer != self.peer_id and (why := self.bans.banned(peer.to_base58(), now))}
        runner = _AverageReturningRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            rule=self.rule,
            banned=banned,
            **kwargs,
        )
        try:
            await self._run_runner(runner, tensors, group_info, group_id)
        finally:
            me = self.peer_id.to_base58()
            for peer, why in runner.excluded.items():
                if peer != me:  # our own bad part is the host's problem, not a groupmate's
                    self.bans.ban(peer, time.monotonic(), why)
            self._reports[group_id] = {**{p.to_base58(): why for p, why in banned.items()}, **runner.excluded}

    async def _run_runner(self, runner: _AverageReturningRunner, tensors: Sequence[torch.Tensor],
                          group_info: Any, group_id: bytes) -> None:
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)

        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
            return
        averaged = [part async for _, part in azip(as_aiter(*tensors), runner)]
        container = runner.tensor_part_container
        if container.failed_size:
            failures = runner.tensor_part_reducer.failures
            raise AllreduceException(
                f"{container.failed_size} of {container.total_size} values were not averaged (a reducer failed"
                + (f"; here: {failures[0]})" if failures else ")")
            )
        if len(averaged) != len(tensors):
            raise AllreduceException(f"all-reduce returned {len(averaged)} of {len(tensors)} tensors")
        for tensor, value in zip(tensors, averaged):
            tensor.copy_(value)  # all or nothing: only a complete round touches the tensors
        self.last_updated = get_dht_time()
        self._state_updated.set()

    async def _load_state_from_donors(self, donors: Sequence[str], timeout: float, max_bytes: int,
                                      max_tensors: int, future: MPFuture) -> None:
        """Download state from the first of ``donors`` (peer ids, base58, tried in order) that
        delivers within ``timeout`` seconds in all, at most ``max_bytes`` and ``max_tensors``;
        sets the future to ``(donor, (metadata, tensors))``, or None. Unlike hivemind's
        ``load_state_from_peers``, the donors are the caller's (who held the agreed state), not
        whoever declared the highest priority in the DHT."""
        deadline = time.monotonic() + timeout
        try:
            for donor in donors:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    peer = PeerID.from_base58(donor)
                    if peer == self.peer_id:
                        continue
                    loaded = await asyncio.wait_for(self._download_state(peer, max_bytes, max_tensors), remaining)
                except Exception as error:  # a bad id, a dead or lying donor: try the next one
                    logger.info(f"state download from {donor} failed: {error!r}")
                    continue
                future.set_result((donor, loaded))
                return
        finally:
            if not future.done():
                future.set_result(None)

    async def _download_state(self, peer: Any, max_bytes: int, max_tensors: int) -> tuple[Any, list[torch.Tensor]]:
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata, current, tensors, received = None, [], [], 0
        async for message in aiter_with_timeout(stream, timeout=self.next_chunk_timeout):
            received += message.ByteSize()
            if received > max_bytes:
                raise ValueError(f"the donor sent more than {max_bytes} bytes")
            if message.metadata:
                if metadata is not None:
                    raise ValueError("the donor sent its metadata twice")
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and current:  # a dtype starts the next tensor
                tensors.append(deserialize_torch_tensor(combine_from_streaming(current)))
                current = []
                if len(tensors) >= max_tensors:
                    raise ValueError(f"the donor sent more than {max_tensors} tensors")
            current.append(message.tensor_part)
        if current:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(current)))
        if metadata is None:
            raise ValueError("the donor sent no state")
        return metadata, tensors

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        if self.state_provider is None:
            return None, (), None  # no metadata: a downloading peer moves on to the next one
        metadata, tensors = self.state_provider()
        return metadata, list(tensors), None


class StageAverager:
    """Averages a fixed list of tensors (shapes given at construction) with the other peers
    of a stage group that use the same ``prefix`` (e.g. ``f"{run_id}_stage{n}"``).

    Starts a hivemind averager process (it shares ``dht``'s p2p daemon); call
    :meth:`shutdown` (or use it as a context manager) to stop it.

    ``config`` is the run's ``[local_sgd]`` section (group size and every timeout);
    ``codec`` and ``state_codec`` are the all-reduce's and the state download's codecs
    (the run config's ``compression.pseudo_gradients`` and ``compression.state``).

    ``state_provider`` (here or later through :meth:`serve_state`) is called in this
    process when another peer downloads state and returns ``(metadata, tensors)``:
    metadata a small msgpack-able object, tensors a list (e.g. DiLoCo's global params and
    outer momentum). Without one this peer serves no state.
    """

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        tensors: Sequence[torch.Tensor],
        config: LocalSGDSection,
        *,
        codec: str,
        state_codec: str,
        state_provider: StateProvider | None = None,
    ):
        if not isinstance(config, LocalSGDSection):
            raise TypeError(f"StageAverager config must be a LocalSGDSection, got {type(config).__name__}")
        self.config = config
        if not isinstance(prefix, str) or not prefix or "." in prefix:
            raise ValueError(f"averaging prefix must be a non-empty str without '.', got {prefix!r}")
        templates = list(tensors)
        if not templates or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in templates):
            raise ValueError("StageAverager needs a non-empty list of floating-point tensors")
        self.prefix, self._dht = prefix, dht
        self.shapes = [tuple(t.shape) for t in templates]
        buffers = [torch.zeros(shape, dtype=torch.float32) for shape in self.shapes]
        self._averager = _StageDecentralizedAverager(
            buffers,
            dht,
            start=False,
            prefix=prefix,
            target_group_size=None,  # everyone of the stage who shows up within matchmaking_time_s
            min_group_size=config.min_group_size,
            min_matchmaking_time=config.matchmaking_time_s,
            request_timeout=config.request_timeout_s,
            next_chunk_timeout=config.next_chunk_timeout_s,
            allreduce_timeout=config.allreduce_timeout_s,
            compression=hivemind_compression(codec),
            state_compression=hivemind_compression(state_codec),
            allow_state_sharing=state_provider is not None,
            shutdown_timeout=5,
        )
        self._averager.state_provider = state_provider
        self._averager.rule = config
        self._averager.bans = SenderBans(config.sender_ban_s)  # lives in the averager process
        self._averager._reports = {}
        # forked with SIGTERM/SIGINT blocked: a signal to the whole process group must not reach it
        # (it would inherit this process's handlers and swallow SIGTERM); shutdown() stops it for sure.
        # Not hivemind's run_in_background: that also sets SIGINT to SIG_IGN in *this* process, which
        # would leave a peer deaf to Ctrl-C.
        with stop_signals_blocked():
            self._averager.start()
        try:
            self._averager.wait_until_ready()
        except BaseException:
            self.shutdown()
            raise

    def serve_state(self, provider: StateProvider | None) -> None:
        """Serve ``provider()`` to peers that download state from now on (None: serve nothing)."""
        self._averager.state_provider = provider
        self._averager.allow_state_sharing = provider is not None

    @property
    def peer_id(self) -> str:
        """This peer's id (base58), as used in ``AveragingResult.gathered``."""
        return self._averager.peer_id.to_base58()

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        weight: float = 1.0,
        gather: Any = None,
        *,
        matchmaking_timeout: float | None = None,
    ) -> AveragingResult:
        """Average ``tensors`` with the group; never raises for network trouble, never blocks
        longer than ``matchmaking_timeout + local_sgd.allreduce_timeout_s + RESULT_MARGIN_S`` seconds.

        ``weight`` is this peer's share (0 for a peer with nothing to contribute); ``gather``
        is a small msgpack-able object delivered to every groupmate (e.g. a params hash);
        ``matchmaking_timeout`` overrides ``local_sgd.matchmaking_timeout_s`` for this round
        (it must exceed ``local_sgd.matchmaking_time_s``).
        Raises ``ValueError`` only for arguments that could never work (shapes, weight).
        """
        started = time.monotonic()
        values = list(tensors)
        if [tuple(t.shape) for t in values] != self.shapes:
            raise ValueError(f"StageAverager.average: shapes {[list(t.shape) for t in values]} differ from {self.shapes}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < math.inf:
            raise ValueError(f"StageAverager.average: weight must be a finite number >= 0, got {weight!r}")
        config = self.config
        if matchmaking_timeout is None:
            matchmaking_timeout = config.matchmaking_timeout_s
        elif (
            not isinstance(matchmaking_timeout, (int, float))
            or not config.matchmaking_time_s < matchmaking_timeout < math.inf
        ):
            raise ValueError(
                f"StageAverager.average: matchmaking_timeout must be finite and > local_sgd.matchmaking_time_s "
                f"({config.matchmaking_time_s}), got {matchmaking_timeout!r}"
            )

        def failed(error: str, group_size: int = 0, contributors: int = 0, gathered: dict | None = None) -> AveragingResult:
            return AveragingResult(False, group_size, contributors, None, gathered or {}, error, time.monotonic() - started)

        values, _ = clip_by_norm(values, config.clip_norm)
        with self._averager.get_tensors() as buffers:
            for buffer, value in zip(buffers, values):
                buffer.copy_(value.detach())
        try:
            control = self._averager.step(
                gather={"weight": float(weight), "user": gather},
                weight=float(weight),
                timeout=matchmaking_timeout,
                allow_retries=False,  # a retry could pair the peers that failed into a second, different average
                wait=False,
            )
        except Exception as error:  # the averager process is gone or refused the request
            return failed(f"could not start the round: {error!r}")
        try:
            outcome = control.result(timeout=matchmaking_timeout + config.allreduce_timeout_s + RESULT_MARGIN_S)
        except Exception as error:  # TimeoutError, AllreduceException, MatchmakingException, ...
            control.cancel()
            return failed(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        if not outcome:
            return failed("no group formed")
        report = outcome.pop(REPORT_KEY, None) or {}
        # what groupmates gathered is theirs to say: anything but {"weight": w, "user": x} reads as nothing
        gathered = {peer.to_base58(): data if isinstance(data, dict) else {} for peer, data in outcome.items()}
        contributors = sum(_claimed_weight(data) > 0 for data in gathered.values())
        users = {peer: data.get("user") for peer, data in gathered.items()}
        if contributors == 0:
            return failed("every peer of the group had weight 0", len(gathered), 0, users)
        with self._averager.get_tensors() as buffers:
            averaged = [buffer.clone() for buffer in buffers]
        if not all(bool(torch.isfinite(t).all()) for t in averaged):
            return failed("the average holds nan or inf", len(gathered), contributors, users)
        return AveragingResult(True, len(gathered), contributors, averaged, users, None, time.monotonic() - started,
                               excluded=dict(report))

    def load_state(self, timeout: float | None = None,
                   donors: Sequence[str] | None = None) -> tuple[Any, list[torch.Tensor]] | None:
        """Download ``(metadata, tensors)`` from a peer that serves state; None if no peer could
        deliver within ``timeout`` (default ``LocalSGDSection.state_timeout_s``).

        ``donors`` (peer ids, base58): only these, in this order, and no more than twice the
        averaged tensors' float32 bytes (e.g. DiLoCo's global params and momentum) plus 1 MiB.
        Without: hivemind's choice, the peer that declared the highest priority first (a joiner
        that knows no group yet)."""
        timeout = self.config.state_timeout_s if timeout is None else timeout
        if donors is not None:
            future = MPFuture()
            values = sum(math.prod(shape) for shape in self.shapes)
            self._averager._outer_pipe.send(("_load_state_from_donors", [], dict(
                donors=[str(d) for d in donors], timeout=timeout, max_bytes=8 * values + 2**20,
                max_tensors=2 * len(self.shapes), future=future)))
            try:
                found = future.result(timeout=timeout + RESULT_MARGIN_S)
            except Exception:  # TimeoutError, or the averager process is gone
                return None
            if found is None:
                return None
            _, (metadata, tensors) = found
            return metadata, list(tensors)
        try:
            loaded = self._averager.load_state_from_peers(wait=True, timeout=timeout)
        except Exception:  # TimeoutError, or the averager process is gone
            return None
        if loaded is None:
            return None
        metadata, tensors = loaded
        return metadata, list(tensors)

    @property
    def state_sharing_priority(self) -> float:
        """Peers download state from the donor with the highest priority (e.g. its round number)."""
        return self._averager.state_sharing_priority

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        self._averager.state_sharing_priority = value

    def shutdown(self, timeout: float = 7.0) -> None:
        """Stop the averager process (the DHT is the caller's to shut down): ask it, and SIGKILL it
        if it is still alive after ``timeout`` seconds (:func:`swarmrt.procs.stop_child`); 1 s
        when the DHT's p2pd (which the averager talks through) is already gone."""
        if self._averager.is_alive():
            if not node_usable(self._dht):
                timeout = min(timeout, 1.0)
            stop_child(self._averager, self._averager.shutdown, timeout, name="averager")

    def __enter__(self) -> StageAverager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
