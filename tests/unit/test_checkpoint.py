"""Stage checkpoints: round trips, atomicity, refusals that name the problem, pruning,
the one-writer rule and the checkpoint policy."""

import hashlib
import json
import os
import sys
import uuid

import pytest
import torch

from swarmrt.checkpoint.policy import (CheckpointConfigError, CheckpointSection, checkpoint_due,
                                            is_checkpoint_writer, leave_checkpoint_due, training_config_hash)
from swarmrt.config import ConfigError, RunConfig, with_overrides
from swarmrt.checkpoint import store as ckpt
from swarmrt.checkpoint.store import (CheckpointCorrupt, CheckpointError, CheckpointMismatch, checkpoint_path,
                                        cleanup_temp_files, latest_checkpoint, list_checkpoints, load_checkpoint,
                                        load_data_position, load_latest_checkpoint, read_checkpoint_meta,
                                        save_checkpoint, save_data_position)

RUN, PART, CONF = "run-a", "part0123abcd", "conf0123abcd"


def save(root, step, state=b"state", stage=1, **kw):
    kw.setdefault("config_hash", CONF)
    kw.setdefault("partition_hash", PART)
    return save_checkpoint(root, kw.pop("run_id", RUN), stage, step, state, **kw)


def load(path, stage=1, **kw):
    return load_checkpoint(path, kw.pop("run_id", RUN), stage, kw.pop("partition", PART), **kw)


def temp_files(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


# -- round trips ----------------------------------------------------------------------------------
def test_bytes_round_trip_keeps_state_and_metadata(tmp_path):
    state = os.urandom(10_000)
    path = save(tmp_path, 123, state, writer="peerA", extra={"outer_step": 4}, created=1700000000.5)
    assert path == os.path.join(tmp_path, RUN, "stage1", "step000000123.ckpt")
    assert path == checkpoint_path(tmp_path, RUN, 1, 123)
    assert latest_checkpoint(tmp_path, RUN, 1) == path
    meta, loaded = load(path, expect_config_hash=CONF)
    assert loaded == state and isinstance(loaded, bytes)
    assert (meta.run_id, meta.stage, meta.step, meta.config_hash, meta.partition_hash) == (RUN, 1, 123, CONF, PART)
    assert meta.created == 1700000000.5 and meta.writer == "peerA" and meta.extra == {"outer_step": 4}
    assert meta.sha256 == hashlib.sha256(state).hexdigest() and meta.payload_bytes == len(state)
    assert meta.swarmrt_version and meta.payload == "bytes"
    assert read_checkpoint_meta(path) == meta
    assert temp_files(os.path.dirname(path)) == []


def test_tensor_mapping_round_trip(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(5), "nested": {"m": torch.ones(2)}}
    meta, loaded = load(save(tmp_path, 7, state))
    assert meta.payload == "tensors"
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    assert torch.equal(loaded["nested"]["m"], state["nested"]["m"])


def test_stage_worker_state_resumes_exactly(tmp_path):
    from swarmrt.pipeline.worker import InputSpec, StageWorker

    config = RunConfig()
    spec = InputSpec(torch.float32, 1, (4,))
    torch.manual_seed(0)
    worker = StageWorker(torch.nn.Sequential(torch.nn.Linear(4, 3)), config, 1, spec)
    x = torch.randn(16, 4)
    worker.forward("mb0", x, keep_context=True)
    _, stepped = worker.backward("mb0", torch.ones(16, 3), None, samples=16, need_grad_input=False, deadline=None)
    assert stepped and worker.version == 1
    path = save(tmp_path, worker.version, worker.state_bytes())

    torch.manual_seed(1)
    fresh = StageWorker(torch.nn.Sequential(torch.nn.Linear(4, 3)), config, 1, spec)
    assert not torch.equal(fresh.module[0].weight, worker.module[0].weight)
    meta, state = load(path)
    fresh.load_state_bytes(state)
    assert meta.step == 1
    assert torch.equal(fresh.module[0].weight, worker.module[0].weight) and torch.equal(fresh.module[0].bias, worker.module[0].bias)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == worker.optimizer.state_dict()["state"][0]["step"]


def test_fsspec_url_round_trip_and_listing():
    root = f"memory://ckpt-{uuid.uuid4().hex}"
    first = save(root, 1, b"one")
    second = save(root, 2, b"two", keep=1)
    assert second.startswith("memory://") and second.endswith("/run-a/stage1/step000000002.ckpt")
    assert [s for s, _ in list_checkpoints(root, RUN, 1)] == [2]  # keep=1 pruned step 1
    assert latest_checkpoint(root, RUN, 1) == second
    assert load(second)[1] == b"two"
    with pytest.raises(FileNotFoundError):
        load(first)
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    assert not [p for p in fs.find(path) if p.endswith(".tmp")]
    save_data_position(root, RUN, 0, 42)
    assert load_data_position(root, RUN, 0) == 42


def test_url_without_fsspec_names_the_scheme(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec now raises ImportError
    with pytest.raises(CheckpointError, match=r"s3:// URL, which needs fsspec"):
        save("s3://bucket/runs", 1, b"x")
    assert latest_checkpoint(tmp_path, RUN, 1) is None  # local directories need no fsspec
    assert save(f"file://{tmp_path}", 1, b"x") == os.path.join(tmp_path, RUN, "stage1", "step000000001.ckpt")


# -- atomicity ------------------------------------------------------------------------------------
def test_crash_before_rename_leaves_only_a_temp_file_that_is_never_loaded(tmp_path):
    good = save(tmp_path, 1, b"good")
    pid = os.fork()
    if pid == 0:  # the child dies (no cleanup handlers, like SIGKILL) right before the rename
        try:
            ckpt.os.replace = lambda *a: os._exit(0)
            save(tmp_path, 2, b"x" * 100_000)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child did not reach the rename"
    stage_dir = os.path.dirname(good)
    leftovers = temp_files(stage_dir)
    assert len(leftovers) == 1 and leftovers[0].startswith(".step000000002.ckpt.")
    assert os.path.getsize(os.path.join(stage_dir, leftovers[0])) > 100_000  # a real, complete-looking file
    assert list_checkpoints(tmp_path, RUN, 1) == [(1, good)]
    assert latest_checkpoint(tmp_path, RUN, 1) == good
    assert load_latest_checkpoint(tmp_path, RUN, 1, PART)[1] == b"good"
    # cleanup leaves a fresh temp file alone (it may be a concurrent writer's) and removes an old one
    mtime = os.path.getmtime(os.path.join(stage_dir, leftovers[0]))
    assert cleanup_temp_files(tmp_path, RUN, 1, older_than_s=600, now=mtime + 10) == []
    removed = cleanup_temp_files(tmp_path, RUN, 1, older_than_s=600, now=mtime + 601)
    assert [os.path.basename(p) for p in removed] == leftovers and temp_files(stage_dir) == []


def test_failed_rename_removes_its_temp_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    good = save(tmp_path, 1, b"good")

    def fail(*a):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, b"new")
    monkeypatch.undo()
    assert temp_files(os.path.dirname(good)) == [] and latest_checkpoint(tmp_path, RUN, 1) == good


def test_concurrent_writers_of_one_step_leave_one_intact_file(tmp_path, monkeypatch):
    real_replace, calls = os.replace, []

    def interleaved(src, dst):  # writer A is about to rename when writer B writes the same step
        calls.append(dst)
        if len(calls) == 1:
            save(tmp_path, 5, b"same state", writer="B")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", interleaved)
    path = save(tmp_path, 5, b"same state", writer="A")
    monkeypatch.undo()
    assert calls == [path, path]
    assert list_checkpoints(tmp_path, RUN, 1) == [(5, path)] and temp_files(os.path.dirname(path)) == []
    meta, state = load(path)
    assert state == b"same state" and meta.writer == "A"  # the last rename wins, whole


# -- refusals -------------------------------------------------------------------------------------
def rewrite(path, fn):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(fn(data))


def test_corrupt_payload_is_refused(tmp_path):
    path = save(tmp_path, 3, bytes(5000))
    rewrite(path, lambda d: d[:3000] + bytes([d[3000] ^ 1]) + d[3001:])
    with pytest.raises(CheckpointCorrupt, match=r"is corrupt: checksum mismatch"):
        load(path)


def test_tampered_header_is_refused(tmp_path):
    path = save(tmp_path, 3, b"payload")
    rewrite(path, lambda d: d.replace(b'"step": 3', b'"step": 4'))
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch"):
        load(path)


@pytest.mark.parametrize("cut", [1, 100, 2000])
def test_truncated_file_is_refused(tmp_path, cut):
    path = save(tmp_path, 3, bytes(1000))
    rewrite(path, lambda d: d[:-cut] if cut < 2000 else d[:5])
    with pytest.raises(CheckpointCorrupt, match="truncated"):
        load(path)


def test_not_a_checkpoint_and_bad_headers_are_refused(tmp_path):
    path = save(tmp_path, 3, b"x")
    rewrite(path, lambda d: b"PK\x03\x04 a zip file, not a checkpoint at all")
    with pytest.raises(CheckpointCorrupt, match="not a swarmrt checkpoint"):
        load(path)
    rewrite(path, lambda d: ckpt.MAGIC + ckpt._LEN.pack(7) + b"{nope!}" + bytes(32))
    with pytest.raises(CheckpointCorrupt, match=r"bad header \(not JSON"):
        load(path)
    rewrite(path, lambda d: ckpt.encode_checkpoint({"run_id": RUN, "stage": 1}, b""))
    with pytest.raises(CheckpointCorrupt, match="bad header: missing config_hash"):
        load(path)
    with pytest.raises(CheckpointCorrupt, match="bad header: missing config_hash"):
        read_checkpoint_meta(path)
    rewrite(path, lambda d: ckpt.MAGIC + ckpt._LEN.pack(10**9) + b"{}")
    with pytest.raises(CheckpointCorrupt, match="truncated or has a bad header"):
        load(path)


def test_newer_format_is_refused_naming_versions(tmp_path):
    path = save(tmp_path, 3, b"x")
    meta = read_checkpoint_meta(path)
    fields = {**meta.__dict__, "format": ckpt.FORMAT_VERSION + 1, "swarmrt_version": "9.9"}
    rewrite(path, lambda d: ckpt.encode_checkpoint(fields, b"x"))
    with pytest.raises(CheckpointError, match=r"format 2, written by a newer swarmrt \(9.9\)"):
        load(path)


def test_mismatches_are_refused_naming_them(tmp_path):
    path = save(tmp_path, 3, b"x", stage=2)
    with pytest.raises(CheckpointMismatch, match="is for stage 2, this peer serves stage 1"):
        load(path, stage=1)
    with pytest.raises(CheckpointMismatch, match="is for run 'run-a', this peer is in run 'run-b'"):
        load(path, stage=2, run_id="run-b")
    with pytest.raises(CheckpointMismatch, match=f"partition hash {PART} != deadbeef: the model or its cut changed"):
        load(path, stage=2, partition="deadbeef")
    with pytest.raises(CheckpointMismatch, match=f"config hash {CONF} != other: the training config changed"):
        load(path, stage=2, expect_config_hash="other")
    assert load(path, stage=2)[1] == b"x"  # no config hash given: not checked
    assert issubclass(CheckpointMismatch, CheckpointError) and issubclass(CheckpointError, ValueError)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="run id"):
        save(tmp_path, 1, run_id="../escape")
    with pytest.raises(CheckpointError, match="step must be an integer >= 0"):
        save(tmp_path, -1)
    with pytest.raises(TypeError, match="state must be bytes"):
        save(tmp_path, 1, state=[1, 2])
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save(tmp_path, 1, extra={"x": object()})
    assert latest_checkpoint(tmp_path, RUN, 1) is None and not any(tmp_path.rglob("*.tmp"))


# -- listing, pruning, resume ---------------------------------------------------------------------
def test_latest_is_the_highest_step_not_the_newest_file_or_name(tmp_path):
    for step in (10, 1_000_000_000, 2, 99):  # the 10-digit name sorts before the others as text
        save(tmp_path, step, str(step).encode())
    assert [s for s, _ in list_checkpoints(tmp_path, RUN, 1)] == [2, 10, 99, 1_000_000_000]
    assert latest_checkpoint(tmp_path, RUN, 1).endswith("step1000000000.ckpt")
    assert latest_checkpoint(tmp_path, RUN, 0) is None and latest_checkpoint(tmp_path, "other", 1) is None


def test_keep_prunes_to_the_newest_k(tmp_path):
    for step in (10, 3, 7, 12, 1):
        save(tmp_path, step, keep=3)
    assert [s for s, _ in list_checkpoints(tmp_path, RUN, 1)] == [7, 10, 12]
    save(tmp_path, 13, keep=1, stage=0)
    assert [s for s, _ in list_checkpoints(tmp_path, RUN, 1)] == [7, 10, 12]  # other stages untouched
    with pytest.raises(CheckpointError, match="keep"):
        save(tmp_path, 14, keep=0)


def test_load_latest_skips_a_corrupt_newest_but_not_a_mismatch(tmp_path):
    assert load_latest_checkpoint(tmp_path, RUN, 1, PART) is None
    save(tmp_path, 1, b"one")
    newest = save(tmp_path, 2, b"two")
    rewrite(newest, lambda d: d[:-10])
    meta, state, path = load_latest_checkpoint(tmp_path, RUN, 1, PART)
    assert (meta.step, state) == (1, b"one")
    with pytest.raises(CheckpointMismatch, match="partition hash"):
        load_latest_checkpoint(tmp_path, RUN, 1, "otherpart")
    rewrite(path, lambda d: d[:-10])
    with pytest.raises(CheckpointCorrupt, match="no intact checkpoint of stage 1"):
        load_latest_checkpoint(tmp_path, RUN, 1, PART)


def test_data_position_round_trip_and_refusals(tmp_path):
    assert load_data_position(tmp_path, RUN, 0) is None
    path = save_data_position(tmp_path, RUN, 0, 17)
    save_data_position(tmp_path, RUN, 1, 5)
    assert load_data_position(tmp_path, RUN, 0) == 17 and load_data_position(tmp_path, RUN, 1) == 5
    save_data_position(tmp_path, RUN, 0, 18)
    assert load_data_position(tmp_path, RUN, 0) == 18
    assert json.loads(open(path).read()) == {"run_id": RUN, "stream": 0, "step": 18}
    assert temp_files(os.path.dirname(path)) == []
    open(path, "w").write('{"run_id": "run-a", "stream": 0, "st')
    with pytest.raises(CheckpointCorrupt, match="data position .* is corrupt"):
        load_data_position(tmp_path, RUN, 0)
    open(path, "w").write(json.dumps({"run_id": "run-z", "stream": 0, "step": 3}))
    with pytest.raises(CheckpointMismatch, match="is for run 'run-z', this trainer is in run 'run-a'"):
        load_data_position(tmp_path, RUN, 0)
    with pytest.raises(CheckpointError, match="stream must be an integer >= 0"):
        save_data_position(tmp_path, RUN, -1, 3)


# -- the pure policy ------------------------------------------------------------------------------
def test_checkpoint_section_validation_names_the_field():
    assert CheckpointSection().enabled is False
    assert CheckpointSection(location="/ckpt", every_steps=100, every_minutes=30, keep=2).enabled
    for kwargs, field in [({"location": ""}, "checkpoint.location"),
                          ({"location": "/c", "every_steps": -1}, "checkpoint.every_steps"),
                          ({"location": "/c", "every_steps": 1.5}, "checkpoint.every_steps"),
                          ({"location": "/c", "every_minutes": float("nan")}, "checkpoint.every_minutes"),
                          ({"location": "/c", "every_minutes": -1}, "checkpoint.every_minutes"),
                          ({"location": "/c", "keep": 0}, "checkpoint.keep"),
                          ({"location": "/c", "on_leave": "yes"}, "checkpoint.on_leave"),
                          ({"every_steps": 10}, "checkpoint.every_steps")]:
        with pytest.raises(ConfigError, match=field):  # a ConfigError: the CLI reports it in one line
            CheckpointSection(**kwargs)
    with pytest.raises(CheckpointConfigError, match="checkpoint.location is not"):
        CheckpointSection(every_minutes=5)


def test_checkpoint_due_by_steps_and_by_time():
    by_steps = CheckpointSection(location="/c", every_steps=100)
    assert checkpoint_due(99, 0, 0.0, 0.0, by_steps)[0] is False
    due, reason = checkpoint_due(100, 0, 0.0, 0.0, by_steps)
    assert due and "every_steps=100" in reason
    assert checkpoint_due(150, 100, 0.0, 0.0, by_steps) == (False, "not due yet: next at step 200")
    assert checkpoint_due(205, 195, 0.0, 0.0, by_steps)[0] is True  # a jump across 200 counts
    assert checkpoint_due(100, 100, 1e9, 0.0, by_steps) == (False, "step 100 has not advanced past the last "
                                                                   "checkpoint (step 100)")
    by_time = CheckpointSection(location="/c", every_minutes=5)
    assert checkpoint_due(1, 0, 1270.0, 1000.0, by_time) == (False, "not due yet: in 0.5 min")
    due, reason = checkpoint_due(1, 0, 1300.0, 1000.0, by_time)
    assert due and "every_minutes=5" in reason
    both = CheckpointSection(location="/c", every_steps=100, every_minutes=5)
    assert checkpoint_due(50, 0, 1300.0, 1000.0, both)[0] is True
    assert checkpoint_due(100, 0, 1000.0, 1000.0, both)[0] is True
    assert checkpoint_due(50, 0, 1060.0, 1000.0, both) == (False, "not due yet: next at step 100 or in 4.0 min")
    assert checkpoint_due(10**6, 0, 1e9, 0.0, CheckpointSection()) == (
        False, "checkpoints are off (checkpoint.location is not set)")
    assert checkpoint_due(10**6, 0, 1e9, 0.0, CheckpointSection(location="/c"))[0] is False


def test_exactly_one_live_peer_is_the_writer():
    peers = ["QmZed", "QmAlpha", "QmMid"]
    verdicts = {p: is_checkpoint_writer(p, peers) for p in peers}
    assert [p for p, (w, _) in verdicts.items() if w] == ["QmAlpha"]
    assert "QmAlpha writes" in verdicts["QmZed"][1]
    assert is_checkpoint_writer("QmAardvark", peers)[0] is True  # self counts even if not yet listed
    assert is_checkpoint_writer("QmOnly", [])[0] is True


def test_leave_checkpoint_only_for_the_last_serving_peer():
    on = CheckpointSection(location="/c")
    assert leave_checkpoint_due("me", ["me"], on)[0] is True
    assert leave_checkpoint_due("me", [], on)[0] is True
    assert leave_checkpoint_due("me", ["me", "other"], on) == (
        False, "1 other peer(s) still serve the stage and keep its state")
    assert leave_checkpoint_due("me", [], CheckpointSection())[0] is False
    assert leave_checkpoint_due("me", [], CheckpointSection(location="/c", on_leave=False))[0] is False


def test_training_config_hash_ignores_where_a_node_listens():
    base = RunConfig()
    moved = with_overrides(base, network={"host": "10.0.0.7", "forward_timeout_s": 30.0})
    changed = with_overrides(base, optimizer={"lr": 0.5})
    assert training_config_hash(base) == training_config_hash(moved) == training_config_hash(base.to_dict())
    assert training_config_hash(base) != training_config_hash(changed)
    assert len(training_config_hash(base)) == 12


# -- the Checkpointer (one stage peer's checkpoints), with a fake worker and a fake clock ----------
class FakeWorker:
    """A stage whose state is its version, as bytes: enough to see which state went where."""

    def __init__(self, stage=1, version=0):
        self.stage, self.version = stage, version
        self.loaded = []

    def state_bytes(self):
        return f"state@{self.version}".encode()

    def load_state_bytes(self, data):
        self.loaded.append(data)
        self.version = int(data.decode().split("@")[1])


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def checkpointer(tmp_path, worker, peer_id="peerB", lines=None, clock=None, **section):
    from swarmrt.checkpoint.checkpointer import Checkpointer

    config = with_overrides(RunConfig(), checkpoint={"location": str(tmp_path), **section})
    computed = []

    async def compute(fn, *args):  # records that the state was read through the compute thread
        computed.append(fn)
        return fn(*args)

    ckp = Checkpointer(config, worker, peer_id, PART, compute, clock=clock or FakeClock(),
                       say=(lines if lines is not None else []).append)
    ckp.computed = computed
    return ckp


def run_async(coro):
    import asyncio

    return asyncio.run(coro)


def test_checkpointer_writes_periodically_only_when_due_and_only_as_the_stages_writer(tmp_path):
    worker, lines = FakeWorker(version=0), []
    ckp = checkpointer(tmp_path, worker, lines=lines, every_steps=2)
    worker.version = 1
    assert run_async(ckp.maybe_periodic(["peerB", "peerC"])) is None  # step 1: not due
    worker.version = 2
    path = run_async(ckp.maybe_periodic(["peerB", "peerC"]))  # due, and peerB < peerC writes it
    assert path == checkpoint_path(tmp_path, RunConfig().run.id, 1, 2)
    meta, state = load_checkpoint(path, RunConfig().run.id, 1, PART)
    assert state == b"state@2" and meta.writer == "peerB" and meta.step == 2
    assert ckp.computed == [worker.state_bytes]
    assert lines == [f"stage 1: checkpoint step 2 written to {path} (step 2 crossed a multiple of "
                     f"checkpoint.every_steps=2 since step 0)"]
    assert run_async(ckp.maybe_periodic(["peerB"])) is None  # same step again: nothing to write
    worker.version = 4
    assert run_async(ckp.maybe_periodic(["peerA", "peerB"])) is None  # due, but peerA writes this one
    assert [s for s, _ in list_checkpoints(tmp_path, RunConfig().run.id, 1)] == [2]
    assert ckp.last_step == 4  # ... and peerB moves on with it rather than writing step 4 late
    worker.version = 5
    assert run_async(ckp.maybe_periodic(["peerB"])) is None


def test_checkpointer_writes_by_time_on_its_clock(tmp_path):
    worker, clock = FakeWorker(version=3), FakeClock()
    ckp = checkpointer(tmp_path, worker, clock=clock, every_minutes=1.0)
    worker.version = 4
    clock.now += 59
    assert run_async(ckp.maybe_periodic([])) is None
    clock.now += 1
    assert run_async(ckp.maybe_periodic([])).endswith("step000000004.ckpt")
    assert ckp.last_time == clock.now


def test_checkpointer_writes_on_leave_only_as_the_last_serving_peer(tmp_path):
    worker = FakeWorker(version=7)
    ckp = checkpointer(tmp_path, worker)
    assert run_async(ckp.maybe_on_leave(["peerB", "peerC"])) is None  # peerC keeps the state
    assert latest_checkpoint(tmp_path, RunConfig().run.id, 1) is None
    path = run_async(ckp.maybe_on_leave(["peerB"]))
    assert path == latest_checkpoint(tmp_path, RunConfig().run.id, 1)
    assert load_checkpoint(path, RunConfig().run.id, 1, PART)[1] == b"state@7"
    off = checkpointer(tmp_path / "off", FakeWorker(version=7), on_leave=False)
    assert run_async(off.maybe_on_leave([])) is None


def test_checkpointer_resumes_from_the_newest_and_says_so(tmp_path):
    fresh = FakeWorker(version=0)
    assert checkpointer(tmp_path, fresh).resume() is None and fresh.loaded == []
    writer = checkpointer(tmp_path, FakeWorker(version=5))
    run_async(writer.write("test"))
    writer.worker.version = 9
    newest = run_async(writer.write("test"))
    ckp = checkpointer(tmp_path, fresh, every_steps=10)
    assert ckp.resume() == f"resumed from checkpoint {newest} (step 9)"
    assert fresh.loaded == [b"state@9"] and ckp.last_step == 9
    fresh.version = 10
    assert run_async(ckp.maybe_periodic([])) is not None  # counted from the resumed step, not from 0


def test_checkpointer_resume_warns_about_another_config_but_loads(tmp_path, caplog):
    from swarmrt.checkpoint.checkpointer import Checkpointer

    run_async(checkpointer(tmp_path, FakeWorker(version=2)).write("test"))
    other = with_overrides(RunConfig(), checkpoint={"location": str(tmp_path)}, optimizer={"lr": 0.5})
    worker = FakeWorker()

    async def compute(fn, *args):
        return fn(*args)

    with caplog.at_level("WARNING", logger="swarmrt.checkpoint"):
        note = Checkpointer(other, worker, "peerB", PART, compute).resume()
    assert note.startswith("resumed from checkpoint") and worker.version == 2
    assert "was written under config" in caplog.text
