"""Stage checkpoints and trainer data positions: atomic files in a directory or an fsspec URL.

Layout under a checkpoint root (``checkpoint.location`` of the run config)::

    <root>/<run_id>/stage<N>/step<000000123>.ckpt     one stage checkpoint per written step
    <root>/<run_id>/stage<N>/.step<...>.ckpt.<rand>.tmp   a write in progress (or a crashed one)
    <root>/<run_id>/trainers/stream<S>.json           a trainer's data position

A checkpoint file is, in order::

    b"SWRTCKPT"                    8 bytes, the magic
    header length                  8 bytes, unsigned big-endian
    header                         UTF-8 JSON: the CheckpointMeta fields
    payload                        the stage state (see below)
    sha256(everything above)       32 bytes

so a truncated file, a flipped bit anywhere, or a file that is not a
checkpoint at all is refused with a :class:`CheckpointCorrupt` error saying
which. The payload is either opaque bytes (what ``StageWorker.state_bytes()``
returns: ``torch.save`` of module, optimizer and counters; loaded back as the
same bytes for ``StageWorker.load_state_bytes``) or a mapping of tensors,
saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)``.

Atomic writes: the bytes go to a temporary file in the same directory, are
flushed and fsync'ed, and the file is renamed over the final name with
``os.replace`` (then the directory is fsync'ed). A crash before the rename
leaves only a temporary file: loaders never look at those
(:func:`list_checkpoints` matches ``step<N>.ckpt`` only) and
:func:`cleanup_temp_files` removes them once they are old enough not to be a
concurrent writer's. On an fsspec filesystem the temporary object is moved
into place (``fs.mv``); on object stores a move is a copy of a complete object,
so the final name again never holds a partial one.

Concurrent writers: :func:`swarmrt.checkpoint.policy.is_checkpoint_writer`
picks one writer per stage, but two peers whose views of the stage differ for a
heartbeat may both write the same step. Each writes its own temporary file and
renames it into place; the last rename wins and the file is always one
complete, checksummed checkpoint (identical content when both held the same
state). Pruning and cleanup ignore files that another writer already removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import secrets
import struct
import time
from typing import Any, Mapping

import swarmrt

logger = logging.getLogger("swarmrt.checkpoint")

MAGIC = b"SWRTCKPT"
FORMAT_VERSION = 1
_LEN = struct.Struct(">Q")
_DIGEST_BYTES = 32
_HEAD_BYTES = len(MAGIC) + _LEN.size
_STEP_FILE = re.compile(r"^step(\d+)\.ckpt$")
_TEMP_FILE = re.compile(r"^\..+\.tmp$")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class CheckpointError(ValueError):
    """A checkpoint (or data position) that cannot be used; the message says why."""


class CheckpointCorrupt(CheckpointError):
    """The file is not a complete, intact checkpoint: bad magic or header, truncated, checksum mismatch."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint of another run, stage, model partition or config."""


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint records besides the state itself (its header)."""

    run_id: str
    """Run the state belongs to (``run.id``)."""
    stage: int
    """Pipeline stage the state belongs to."""
    step: int
    """The stage's step: its optimizer version, or its outer step with local SGD."""
    config_hash: str
    """Hash of the training config (see ``checkpoint_policy.training_config_hash``)."""
    partition_hash: str
    """Hash of what the stage holds (``swarmrt.models.build.partition_hash``)."""
    swarmrt_version: str
    """Version of swarmrt that wrote it."""
    created: float
    """Unix time of the write."""
    payload: str
    """``bytes`` (opaque, e.g. ``StageWorker.state_bytes()``) or ``tensors`` (a torch-saved mapping)."""
    payload_bytes: int
    """Length of the payload."""
    sha256: str
    """sha256 of the payload (hex); the file's trailer also covers the header."""
    writer: str | None = None
    """Peer id of the writer, when given."""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Free-form JSON metadata of the caller (e.g. outer step, samples applied)."""
    format: int = FORMAT_VERSION
    """File format version."""


# -- storage: a local directory or an fsspec filesystem -------------------------------------------
class _LocalStore:
    """Plain files; atomic via temp file + fsync + os.replace + directory fsync."""

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def basename(self, path: str) -> str:
        return os.path.basename(path)

    def dirname(self, path: str) -> str:
        return os.path.dirname(path)

    def display(self, path: str) -> str:
        return path

    def write_atomic(self, path: str, data: bytes) -> None:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, _temp_name(os.path.basename(path)))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _ignore_missing(os.unlink, tmp)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:  # pragma: no cover - filesystems that cannot fsync a directory
            pass

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read_head(self, path: str, n: int) -> bytes:
        with open(path, "rb") as f:
            return f.read(n)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def listdir(self, directory: str) -> list[str]:
        try:
            return os.listdir(directory)
        except FileNotFoundError:
            return []

    def remove(self, path: str) -> bool:
        return _ignore_missing(os.unlink, path)

    def age_s(self, path: str, now: float) -> float | None:
        try:
            return now - os.stat(path).st_mtime
        except FileNotFoundError:
            return None


class _FsspecStore:
    """An fsspec filesystem; atomic via a temporary object moved into place."""

    def __init__(self, fs):
        self.fs = fs

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def basename(self, path: str) -> str:
        return posixpath.basename(path.rstrip("/"))

    def dirname(self, path: str) -> str:
        return posixpath.dirname(path.rstrip("/"))

    def display(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def write_atomic(self, path: str, data: bytes) -> None:
        directory = posixpath.dirname(path)
        self.fs.makedirs(directory, exist_ok=True)
        tmp = posixpath.join(directory, _temp_name(posixpath.basename(path)))
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            self.remove(tmp)
            raise

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_head(self, path: str, n: int) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read(n)

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def listdir(self, directory: str) -> list[str]:
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(directory, detail=False)]
        except FileNotFoundError:
            return []

    def remove(self, path: str) -> bool:
        try:
            self.fs.rm(path)
            return True
        except FileNotFoundError:
            return False

    def age_s(self, path: str, now: float) -> float | None:
        try:
            return now - self.fs.modified(path).timestamp()
        except (FileNotFoundError, NotImplementedError, AttributeError):
            return None


def _ignore_missing(fn, path: str) -> bool:
    try:
        fn(path)
        return True
    except FileNotFoundError:
        return False


def _temp_name(final_name: str) -> str:
    """Unique per writer, hidden (leading dot), and never matching ``step<N>.ckpt``."""
    return f".{final_name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _resolve(location: str | os.PathLike) -> tuple[_LocalStore | _FsspecStore, str]:
    """The store for a directory or URL, and the path within it."""
    location = os.fspath(location)
    if not location:
        raise CheckpointError("checkpoint location is empty: give a directory or a URL")
    if location.startswith("file://"):
        return _LocalStore(), location[len("file://"):]
    if not _is_url(location):
        return _LocalStore(), location
    scheme = location.split("://", 1)[0]
    try:
        import fsspec
    except ImportError:
        raise CheckpointError(f"checkpoint location {location!r} is a {scheme}:// URL, which needs fsspec "
                              f"(pip install fsspec, plus the package for {scheme}://, e.g. s3fs or gcsfs); "
                              f"or use a local directory") from None
    try:
        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"checkpoint location {location!r}: fsspec cannot open {scheme}:// URLs: {e}") from None
    return _FsspecStore(fs), path


def _check_count(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"{what} must be an integer >= 0, got {value!r}")


def _check_names(run_id: str, stage: int, step: int | None = None, stage_word: str = "stage") -> None:
    if not isinstance(run_id, str) or not _NAME.match(run_id):
        raise CheckpointError(f"run id must be letters, digits, '-' or '_', got {run_id!r}")
    _check_count(stage, stage_word)
    if step is not None:
        _check_count(step, "step")


def _stage_dir(store, base: str, run_id: str, stage: int) -> str:
    return store.join(base, run_id, f"stage{stage}")


def checkpoint_path(root: str | os.PathLike, run_id: str, stage: int, step: int) -> str:
    """Where the checkpoint of ``step`` of ``stage`` goes (a path, or a URL for fsspec roots)."""
    _check_names(run_id, stage, step)
    store, base = _resolve(root)
    return store.display(store.join(_stage_dir(store, base, run_id, stage), f"step{step:09d}.ckpt"))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (local or fsspec URL) so that readers see the old file or the
    whole new one, never a part: temp file in the same directory, fsync, rename."""
    store, p = _resolve(path)
    store.write_atomic(p, bytes(data))


# -- encode / decode ------------------------------------------------------------------------------
def _encode_state(state: Any) -> tuple[str, bytes]:
    if isinstance(state, (bytes, bytearray, memoryview)):
        return "bytes", bytes(state)
    if isinstance(state, Mapping):
        import torch

        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        return "tensors", buffer.getvalue()
    raise TypeError(f"state must be bytes (e.g. StageWorker.state_bytes()) or a mapping of tensors, "
                    f"got {type(state).__name__}")


def _decode_state(kind: str, payload: bytes, where: str) -> Any:
    if kind == "bytes":
        return payload
    import torch

    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as e:  # intact by checksum, so this is a payload torch cannot read
        raise CheckpointCorrupt(f"{where}: its tensors cannot be loaded: {e}") from None


def encode_checkpoint(meta_fields: Mapping[str, Any], payload: bytes) -> bytes:
    """The file bytes for a header (CheckpointMeta fields) and a payload."""
    header = json.dumps(dict(meta_fields), sort_keys=True).encode()
    body = MAGIC + _LEN.pack(len(header)) + header + payload
    return body + hashlib.sha256(body).digest()


def _parse_header(head: bytes, total: int | None, where: str) -> tuple[CheckpointMeta, int]:
    """Meta and the payload offset from the first bytes of a file (at least the whole header, or
    the whole file); ``total``: the file's size when known."""
    if not head.startswith(MAGIC):
        if MAGIC.startswith(head):
            raise CheckpointCorrupt(f"{where} is truncated: {len(head)} bytes, shorter than a checkpoint header")
        raise CheckpointCorrupt(f"{where} is not a swarmrt checkpoint (bad magic {head[:8]!r})")
    if len(head) < _HEAD_BYTES:
        raise CheckpointCorrupt(f"{where} is truncated: {len(head)} bytes, shorter than a checkpoint header")
    (header_len,) = _LEN.unpack(head[len(MAGIC):_HEAD_BYTES])
    if total is not None and _HEAD_BYTES + header_len + _DIGEST_BYTES > total:
        raise CheckpointCorrupt(f"{where} is truncated or has a bad header: header length {header_len} "
                                f"does not fit in {total} bytes")
    raw = head[_HEAD_BYTES:_HEAD_BYTES + header_len]
    if len(raw) < header_len:
        raise CheckpointCorrupt(f"{where} is truncated inside its header")
    try:
        fields = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorrupt(f"{where} has a bad header (not JSON: {e})") from None
    if not isinstance(fields, dict):
        raise CheckpointCorrupt(f"{where} has a bad header (not a JSON object)")
    fmt = fields.get("format")
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise CheckpointError(f"{where} has format {fmt}, written by a newer swarmrt "
                              f"({fields.get('swarmrt_version')}); this one ({swarmrt.__version__}) reads "
                              f"format {FORMAT_VERSION}")
    known = {f.name for f in dataclasses.fields(CheckpointMeta)}
    required = {f.name for f in dataclasses.fields(CheckpointMeta)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(fields))
    if missing:
        raise CheckpointCorrupt(f"{where} has a bad header: missing {', '.join(missing)}")
    types = {"run_id": str, "stage": int, "step": int, "config_hash": str, "partition_hash": str,
             "swarmrt_version": str, "created": (int, float), "payload": str, "payload_bytes": int,
             "sha256": str, "format": int, "extra": dict, "writer": (str, type(None))}
    for name, kind in types.items():
        if name in fields and (not isinstance(fields[name], kind) or isinstance(fields[name], bool)):
            raise CheckpointCorrupt(f"{where} has a bad header: {name} = {fields[name]!r}")
    if fields["payload"] not in ("bytes", "tensors"):
        raise CheckpointCorrupt(f"{where} has a bad header: payload kind {fields['payload']!r}")
    meta = CheckpointMeta(**{k: v for k, v in fields.items() if k in known})
    return meta, _HEAD_BYTES + header_len


def decode_checkpoint(data: bytes, where: str = "checkpoint") -> tuple[CheckpointMeta, bytes]:
    """Verify a whole checkpoint file's bytes; return its meta and raw payload."""
    meta, offset = _parse_header(data, len(data), where)
    expected = offset + meta.payload_bytes + _DIGEST_BYTES
    if len(data) < expected:
        raise CheckpointCorrupt(f"{where} is truncated: {len(data)} bytes, the header promises {expected}")
    if len(data) > expected:
        raise CheckpointCorrupt(f"{where} is corrupt: {len(data) - expected} unexpected bytes after the payload")
    view = memoryview(data)
    trailer = bytes(view[-_DIGEST_BYTES:])
    actual = hashlib.sha256(view[:-_DIGEST_BYTES]).digest()
    if actual != trailer:
        raise CheckpointCorrupt(f"{where} is corrupt: checksum mismatch (sha256 {actual.hex()[:16]}... "
                                f"!= recorded {trailer.hex()[:16]}...)")
    return meta, bytes(view[offset:-_DIGEST_BYTES])


# -- stage checkpoints ----------------------------------------------------------------------------
def save_checkpoint(root: str | os.PathLike, run_id: str, stage: int, step: int, state: Any, *,
                    config_hash: str, partition_hash: str, writer: str | None = None,
                    extra: Mapping[str, Any] | None = None, keep: int | None = None,
                    created: float | None = None) -> str:
    """Write the checkpoint of ``step`` of ``stage`` atomically; return its path (or URL).

    ``state``: bytes (``StageWorker.state_bytes()``; loaded back as bytes) or a mapping of
    tensors (loaded back with ``torch.load(weights_only=True)``). ``keep``: afterwards delete
    all but the newest ``keep`` checkpoints of the stage (None: keep all). ``created``: the
    write time to record (default: now). Also removes temporary files of crashed writers
    older than 10 minutes.
    """
    _check_names(run_id, stage, step)
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise CheckpointError(f"keep must be an integer >= 1 or None, got {keep!r}")
    kind, payload = _encode_state(state)
    meta = CheckpointMeta(run_id=run_id, stage=stage, step=step, config_hash=str(config_hash),
                          partition_hash=str(partition_hash), swarmrt_version=swarmrt.__version__,
                          created=time.time() if created is None else float(created), payload=kind,
                          payload_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                          writer=writer, extra=dict(extra or {}))
    store, base = _resolve(root)
    path = store.join(_stage_dir(store, base, run_id, stage), f"step{step:09d}.ckpt")
    try:
        data = encode_checkpoint(dataclasses.asdict(meta), payload)
    except TypeError as e:
        raise CheckpointError(f"extra metadata must be JSON-serialisable: {e}") from None
    store.write_atomic(path, data)
    if keep is not None:
        prune_checkpoints(root, run_id, stage, keep)
    cleanup_temp_files(root, run_id, stage)
    return store.display(path)


def list_checkpoints(root: str | os.PathLike, run_id: str, stage: int) -> list[tuple[int, str]]:
    """``(step, path)`` of every finished checkpoint of a stage, oldest first. Temporary files
    (writes in progress or crashed) are never listed."""
    _check_names(run_id, stage)
    store, base = _resolve(root)
    directory = _stage_dir(store, base, run_id, stage)
    found = []
    for name in store.listdir(directory):
        m = _STEP_FILE.match(name)
        if m:
            found.append((int(m.group(1)), store.display(store.join(directory, name))))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike, run_id: str, stage: int) -> str | None:
    """Path of the checkpoint with the highest step of a stage, or None when there is none."""
    found = list_checkpoints(root, run_id, stage)
    return found[-1][1] if found else None


def read_checkpoint_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The header of a checkpoint, without reading or verifying its payload (cheap; for
    listings). :func:`load_checkpoint` is what verifies the whole file."""
    store, p = _resolve(path)
    where = f"checkpoint {store.display(p)}"
    total = store.size(p)
    head = store.read_head(p, _HEAD_BYTES)
    if len(head) == _HEAD_BYTES and head.startswith(MAGIC):
        (header_len,) = _LEN.unpack(head[len(MAGIC):])
        if header_len <= total:
            head = store.read_head(p, _HEAD_BYTES + header_len)
    meta, _ = _parse_header(head, total, where)
    return meta


def check_meta(meta: CheckpointMeta, where: str, expect_run_id: str, expect_stage: int,
               expect_partition_hash: str, expect_config_hash: str | None = None) -> None:
    """Raise :class:`CheckpointMismatch` naming the first difference from what the caller serves."""
    if meta.run_id != expect_run_id:
        raise CheckpointMismatch(f"{where} is for run {meta.run_id!r}, this peer is in run {expect_run_id!r}")
    if meta.stage != expect_stage:
        raise CheckpointMismatch(f"{where} is for stage {meta.stage}, this peer serves stage {expect_stage}")
    if meta.partition_hash != expect_partition_hash:
        raise CheckpointMismatch(f"{where}: partition hash {meta.partition_hash} != {expect_partition_hash}: "
                                 f"the model or its cut changed")
    if expect_config_hash is not None and meta.config_hash != expect_config_hash:
        raise CheckpointMismatch(f"{where}: config hash {meta.config_hash} != {expect_config_hash}: "
                                 f"the training config changed since it was written")


def load_checkpoint(path: str | os.PathLike, expect_run_id: str, expect_stage: int, expect_partition_hash: str,
                    expect_config_hash: str | None = None) -> tuple[CheckpointMeta, Any]:
    """Read, verify and return ``(meta, state)`` of one checkpoint.

    Refuses with :class:`CheckpointCorrupt` a file that is truncated, fails its checksum or
    is not a checkpoint, and with :class:`CheckpointMismatch` one of another run, stage,
    model partition or (when ``expect_config_hash`` is given) training config; both are
    :class:`CheckpointError` (a ValueError) whose message names the problem.
    """
    store, p = _resolve(path)
    where = f"checkpoint {store.display(p)}"
    meta, payload = decode_checkpoint(store.read(p), where)
    check_meta(meta, where, expect_run_id, expect_stage, expect_partition_hash, expect_config_hash)
    return meta, _decode_state(meta.payload, payload, where)


def load_latest_checkpoint(root: str | os.PathLike, run_id: str, stage: int, expect_partition_hash: str,
                           expect_config_hash: str | None = None) -> tuple[CheckpointMeta, Any, str] | None:
    """``(meta, state, path)`` of the newest intact checkpoint of a stage, or None when there is none.

    A corrupt or vanished newest file is skipped (logged) for the next older one; a mismatch
    (another partition or config) is raised, not skipped: resuming from an older checkpoint
    would hide that the run changed. Raises :class:`CheckpointCorrupt` when every file is corrupt.
    """
    found = list_checkpoints(root, run_id, stage)
    problems = []
    for _, path in reversed(found):
        try:
            meta, state = load_checkpoint(path, run_id, stage, expect_partition_hash, expect_config_hash)
        except CheckpointCorrupt as e:
            logger.warning("skipping %s", e)
            problems.append(str(e))
            continue
        except FileNotFoundError:  # pruned by a concurrent writer since it was listed
            continue
        return meta, state, path
    if problems:
        raise CheckpointCorrupt(f"no intact checkpoint of stage {stage} of run {run_id!r}: " + "; ".join(problems))
    return None


def prune_checkpoints(root: str | os.PathLike, run_id: str, stage: int, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints of a stage; return what was deleted."""
    if not isinstance(keep, int) or keep < 1:
        raise CheckpointError(f"keep must be an integer >= 1, got {keep!r}")
    store, _ = _resolve(root)
    removed = []
    for _, path in list_checkpoints(root, run_id, stage)[:-keep]:
        _, p = _resolve(path)
        if store.remove(p):
            removed.append(path)
    return removed


def cleanup_temp_files(root: str | os.PathLike, run_id: str, stage: int, older_than_s: float = 600.0,
                       now: float | None = None) -> list[str]:
    """Remove temporary files that crashed writers left in a stage's directory.

    Only files older than ``older_than_s`` (by modification time; ``now`` defaults to the
    wall clock) are removed, so a concurrent writer's file in progress is left alone; with
    ``older_than_s=0`` every temporary file goes. Files whose age the filesystem cannot tell
    are removed only when ``older_than_s`` is 0.
    """
    _check_names(run_id, stage)
    store, base = _resolve(root)
    directory = _stage_dir(store, base, run_id, stage)
    now = time.time() if now is None else now
    removed = []
    for name in store.listdir(directory):
        if not _TEMP_FILE.match(name):
            continue
        path = store.join(directory, name)
        age = store.age_s(path, now)
        if older_than_s <= 0 or (age is not None and age >= older_than_s):
            if store.remove(path):
                removed.append(store.display(path))
    return removed


# -- trainer data position ------------------------------------------------------------------------
def data_position_path(root: str | os.PathLike, run_id: str, stream: int) -> str:
    """Where a trainer stream's data position goes."""
    _check_names(run_id, stream, stage_word="stream")
    store, base = _resolve(root)
    return store.display(store.join(base, run_id, "trainers", f"stream{stream}.json"))


def save_data_position(root: str | os.PathLike, run_id: str, stream: int, step: int) -> str:
    """Record atomically that trainer stream ``stream`` has finished steps ``0 .. step-1``:
    ``step`` is the next step to train (``Trainer.run(steps, start_step=step)`` resumes)."""
    _check_names(run_id, stream, step, stage_word="stream")
    path = data_position_path(root, run_id, stream)
    write_atomic(path, json.dumps({"run_id": run_id, "stream": stream, "step": step}).encode())
    return path


def load_data_position(root: str | os.PathLike, run_id: str, stream: int) -> int | None:
    """The next step of a trainer stream, or None when none was saved."""
    path = data_position_path(root, run_id, stream)
    store, p = _resolve(path)
    try:
        raw = store.read(p)
    except FileNotFoundError:
        return None
    where = f"data position {path}"
    try:
        value = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorrupt(f"{where} is corrupt (not JSON: {e})") from None
    if (not isinstance(value, dict) or not isinstance(value.get("step"), int) or isinstance(value.get("step"), bool)
            or value["step"] < 0):
        raise CheckpointCorrupt(f"{where} is corrupt: expected {{run_id, stream, step}}, got {value!r}")
    if value.get("run_id") != run_id:
        raise CheckpointMismatch(f"{where} is for run {value.get('run_id')!r}, this trainer is in run {run_id!r}")
    if value.get("stream") != stream:
        raise CheckpointMismatch(f"{where} is for stream {value.get('stream')!r}, this trainer feeds stream {stream}")
    return value["step"]
