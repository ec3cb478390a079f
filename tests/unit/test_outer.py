"""OuterSync, DiLoCo's outer loop, without processes or sockets.

A scripted averager stands in for hivemind (each round's reply is scripted: success with a
given average, failure, a group that is ahead, a round held open by the test); the test
thread plays the worker's compute thread (it runs what OuterSync submits to it). Outer SGD
with lr 1 and no momentum keeps the numbers checkable by hand: global -= average.
"""

import ast
import io
import math
import pathlib
import queue
import re
import threading

import pytest
import torch
from torch import nn

from swarmrt.config import OptimizerSection, RunConfig
from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.diloco import DiLoCo
from swarmrt.local_sgd.outer import OuterSync, averaged_templates, canonical_state
from swarmrt.local_sgd.rounds import AveragingResult
from swarmrt.pipeline.worker import InputSpec, StageWorker
from swarmrt.testing.asserts import OUTER_ROUND_OK

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0
PLAIN = LocalSGDSection(inner_steps=2, outer_lr=1.0, outer_momentum=0.0, nesterov=False)
ME, MATE, THIRD = "QmPeerAAAAAA", "QmPeerBBBBBB", "QmPeerCCCCCC"


# ------------------------------------------------------------------------------------ fakes


class Compute:
    """The worker's compute thread, played by the test: OuterSync submits, the test runs."""

    def __init__(self):
        self.jobs = queue.Queue()

    def submit(self, fn, *args):
        self.jobs.put((fn, args))

    def run_next(self):
        fn, args = self.jobs.get(timeout=WAIT_S)
        fn(*args)


class Params:
    """The part of a stage worker OuterSync uses: its parameters and the changed-in-place signal."""

    def __init__(self, *values):
        self.params = [nn.Parameter(torch.tensor(values))]
        self.changes = 0

    def params_changed(self):
        self.changes += 1

    def values(self):
        return self.params[0].detach().tolist()


class ScriptedAverager:
    """Round ``i`` returns ``replies[i](tensors, weight, gather)``; a gated round waits for its
    event first (a slow round). ``load_state`` hands out ``states`` in order, then None."""

    def __init__(self, *replies, states=()):
        self.replies = list(replies)
        self.states = list(states)
        self.calls = []  # (pseudo-gradient copies, weight, gather), in order
        self.started = threading.Semaphore(0)  # released once per round that began
        self.gates = {}
        self.load_calls = []  # the timeout of each state download
        self.donors = []  # the donors each state download was limited to
        self.provider = None
        self.state_sharing_priority = 0.0
        self.shut_down = False

    def gate(self, index):
        self.gates[index] = threading.Event()
        return self.gates[index]

    def average(self, tensors, weight=1.0, gather=None):
        index = len(self.calls)
        self.calls.append(([t.clone() for t in tensors], weight, gather))
        self.started.release()
        if index in self.gates:
            assert self.gates[index].wait(WAIT_S), "the test never released this round"
        return self.replies[index](tensors, weight, gather)

    def load_state(self, timeout=None, donors=None):
        self.load_calls.append(timeout)
        self.donors.append(donors)
        return self.states.pop(0) if self.states else None

    def serve_state(self, provider):
        self.provider = provider

    def shutdown(self):
        self.shut_down = True

    def wait_for_round(self, index):
        assert self.started.acquire(timeout=WAIT_S), f"round {index} never started"
        assert len(self.calls) == index + 1
        return self.calls[index]


def ok(average=None, mates=(MATE,)):
    """A successful round with groupmates at the same pre-round state; the average is given,
    or (None) this peer's own pseudo-gradient."""
    def reply(tensors, weight, gather):
        result = [torch.tensor(average)] if average is not None else [t.clone() for t in tensors]
        gathered = {ME: gather, **{mate: dict(gather) for mate in mates}}
        return AveragingResult(True, len(gathered), len(gathered), result, gathered, None, 1.25)
    return reply


def failed(error):
    return lambda tensors, weight, gather: AveragingResult(False, 0, 0, None, {}, error, 15.0)


def group_at(digest, round_no, average):
    """A successful round whose two other peers started it from (digest, round_no)."""
    def reply(tensors, weight, gather):
        gathered = {ME: gather, MATE: {"hash": digest, "round": round_no}, THIRD: {"hash": digest, "round": round_no}}
        return AveragingResult(True, 3, 3, [torch.tensor(average)], gathered, None, 2.0)
    return reply


def inner_step(worker, outer, *delta):
    """What the inner optimizer does to the local params, then the worker's after-step hook."""
    with torch.no_grad():
        worker.params[0].sub_(torch.tensor(delta))
    outer.after_step()


def finish_first_round(worker, outer, averager, compute, *delta):
    """Two inner steps of ``delta`` (H = 2 starts round 0), the averager's round, then its outcome
    applied on the compute thread."""
    inner_step(worker, outer, *delta)
    inner_step(worker, outer, *delta)
    averager.wait_for_round(0)
    compute.run_next()


def make(worker, averager, config=PLAIN):
    compute, lines = Compute(), []
    outer = OuterSync(worker, averager, config, submit_to_compute=compute.submit,
                      log=lambda line: lines.append(f"stage 0: {line}"))  # the peer's prefix
    return outer, compute, lines


# ------------------------------------------------------------------------------------ rounds


def test_round_overlaps_inner_steps_and_a_late_one_is_applied_when_it_returns():
    worker = Params(1.0, 1.0)
    averager = ScriptedAverager(ok([0.75, 0.5]), ok())
    gate = averager.gate(0)
    outer, compute, lines = make(worker, averager)
    assert averager.provider is not None  # the outer loop serves its state through the averager it was handed
    pre_hash = outer.diloco.params_hash()

    inner_step(worker, outer, 0.5, 0.5)
    inner_step(worker, outer, 0.5, 0.5)  # H = 2: round 0 starts from local [0, 0]
    delta, weight, gather = averager.wait_for_round(0)
    assert [t.tolist() for t in delta] == [[1.0, 1.0]]  # global - local
    assert weight == 1.0 and gather == {"hash": pre_hash, "round": 0}

    # the round is slow: the peer keeps training, the parameters are untouched by the outer
    # loop, and no other round starts while this one is open (the schedule waits for it)
    for _ in range(4):
        inner_step(worker, outer, 0.125, 0.125)
    assert worker.values() == [-0.5, -0.5] and compute.jobs.empty() and worker.changes == 0
    assert len(averager.calls) == 1

    gate.set()
    compute.run_next()  # the round's result is applied on the compute thread as soon as it is in
    # global = 1 - average = [0.25, 0.5]; alpha 0 (torchft's merge): local := the new global
    assert outer.diloco.global_params[0].tolist() == [0.25, 0.5]
    assert worker.values() == [0.25, 0.5]
    assert outer.diloco.round == 1 and worker.changes == 1  # kept autograd contexts are now stale

    # the log line, in the format assert_outer_rounds_agree reads across peers
    post_hash = outer.diloco.params_hash()
    (line,) = lines
    match = OUTER_ROUND_OK.fullmatch(line)
    assert match, line
    assert match.groups() == ("0", "1", "2", "2", "1.25", post_hash, "AAAAAA,BBBBBB")
    assert outer.history[-1] == {"round": 1, "fragment": 0, "outcome": "ok", "group": 2, "members": "AAAAAA,BBBBBB",
                                 "contributors": 2, "seconds": 1.25, "hash": post_hash, "pre_hash": pre_hash,
                                 "error": None}

    # a joiner downloading state now gets round 1, and finds donors by that priority
    joiner = DiLoCo([nn.Parameter(torch.zeros(2))], PLAIN)
    joiner.import_state(*averager.provider())
    assert joiner.round == 1 and joiner.params_hash() == post_hash
    assert averager.state_sharing_priority == 1.0

    # the next round starts H steps after the apply, from round 1
    inner_step(worker, outer, 0.5, 0.5)
    inner_step(worker, outer, 0.25, 0.5)
    delta, _, gather = averager.wait_for_round(1)
    assert gather == {"hash": post_hash, "round": 1}
    assert [t.tolist() for t in delta] == [[0.75, 1.0]]  # [0.25, 0.5] - [-0.5, -0.5]


def test_sync_delay_applies_an_early_result_exactly_delay_steps_later_merged_with_alpha():
    # H = 4, tau = 1, alpha = 0.5, outer SGD lr 1: torchft's schedule, step for step
    config = LocalSGDSection(inner_steps=4, outer_lr=1.0, outer_momentum=0.0, sync_delay=1, alpha=0.5)
    worker = Params(8.0)
    averager = ScriptedAverager(ok([1.0]), ok())
    outer, compute, _ = make(worker, averager, config)
    for _ in range(3):
        inner_step(worker, outer, 1.0)  # step 3 = 4 - tau: the round starts from local 5
    (delta,), _, _ = averager.wait_for_round(0)
    assert delta.tolist() == [3.0]
    compute.run_next()  # the result is in before the apply is due: it waits
    assert outer.diloco.round == 0 and worker.values() == [5.0] and worker.changes == 0
    inner_step(worker, outer, 1.0)  # step 4: applied now: global 8 - 1 = 7, local lerp(7, 4, 0.5)
    assert outer.diloco.global_params[0].tolist() == [7.0] and worker.values() == [5.5]
    assert outer.diloco.round == 1 and worker.changes == 1
    for _ in range(3):
        inner_step(worker, outer, 1.0)  # the next window: its round starts at its step 3, from 2.5
    (delta,), _, _ = averager.wait_for_round(1)
    assert delta.tolist() == [4.5]


class TwoTensors(Params):
    def __init__(self):
        self.params = [nn.Parameter(torch.tensor([1.0, 1.0])), nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))]
        self.changes = 0

    def values(self):
        return [p.detach().tolist() for p in self.params]


def test_fragments_take_turns_through_one_flat_buffer_the_size_of_the_largest():
    config = LocalSGDSection(inner_steps=4, outer_lr=1.0, outer_momentum=0.0, fragments=2)
    worker = TwoTensors()
    assert [t.shape for t in averaged_templates(worker.params, config)] == [(3,)]
    assert averaged_templates(worker.params, PLAIN) == worker.params  # one fragment: the params themselves
    averager = ScriptedAverager(ok([0.5, 0.25, 0.0]), ok([1.0, 2.0, 3.0]))
    outer, compute, lines = make(worker, averager, config)

    def step():
        with torch.no_grad():
            for p in worker.params:
                p.sub_(0.5)
        outer.after_step()

    step(), step()  # every H / F = 2 steps a fragment: fragment 0 (the first tensor), zero-padded
    (flat,), _, _ = averager.wait_for_round(0)
    assert flat.tolist() == [1.0, 1.0, 0.0]
    compute.run_next()
    assert worker.values() == [[0.5, 0.75], [0.0, 0.0, 0.0]]  # only fragment 0 moved: 1 - [0.5, 0.25]
    step(), step()  # fragment 1, which trained 4 steps since the start
    (flat,), _, _ = averager.wait_for_round(1)
    assert flat.tolist() == [2.0, 2.0, 2.0]
    compute.run_next()
    assert worker.values() == [[-0.5, -0.25], [0.0, -1.0, -2.0]]
    assert [entry["fragment"] for entry in outer.history] == [0, 1] and outer.diloco.round == 2


def test_failed_round_rolls_back_and_the_next_round_carries_its_steps():
    worker = Params(1.0)
    averager = ScriptedAverager(failed("MatchmakingException: could not find a group"), ok())
    outer, compute, lines = make(worker, averager)
    pre_hash = outer.diloco.params_hash()

    finish_first_round(worker, outer, averager, compute, 0.5)
    # nothing moved: global stays (every peer of the group rolls back alike), local keeps its steps
    assert outer.diloco.global_params[0].tolist() == [1.0] and worker.values() == [0.0]
    assert outer.diloco.params_hash() == pre_hash and outer.diloco.round == 0
    assert lines == [f"stage 0: outer round 0 rolled back: group 0, contributors 0, 15.00 s, hash {pre_hash}, "
                     f"members - (MatchmakingException: could not find a group)"]
    assert not OUTER_ROUND_OK.search(lines[0])  # not counted as a successful round
    assert outer.history[-1]["outcome"] == "rolled back"

    # the next round's pseudo-gradient covers the steps of both rounds
    inner_step(worker, outer, 0.5)
    inner_step(worker, outer, 0.5)
    delta, weight, gather = averager.wait_for_round(1)
    assert [t.tolist() for t in delta] == [[2.0]] and weight == 1.0
    assert gather == {"hash": pre_hash, "round": 0}
    compute.run_next()
    assert outer.diloco.global_params[0].tolist() == [-1.0] and worker.values() == [-1.0]
    assert outer.diloco.round == 1


def test_an_unusable_average_is_rolled_back_and_the_schedule_goes_on():
    worker = Params(1.0)
    averager = ScriptedAverager(ok([float("nan")]), ok())
    outer, compute, lines = make(worker, averager)
    pre_hash = outer.diloco.params_hash()
    finish_first_round(worker, outer, averager, compute, 0.5)
    assert outer.diloco.params_hash() == pre_hash and worker.values() == [0.0] and outer.diloco.round == 0
    assert outer.history[-1]["outcome"] == "rolled back" and "nan or inf" in outer.history[-1]["error"]
    assert not OUTER_ROUND_OK.search(lines[0]) and lines[0].endswith("roll the round back)")
    inner_step(worker, outer, 0.5)
    inner_step(worker, outer, 0.5)
    (delta,), _, _ = averager.wait_for_round(1)
    assert delta.tolist() == [2.0]  # the next round covers both windows


def group_state(rounds):
    """A groupmate's DiLoCo state before and after its latest round: (hash, round, exported)."""
    donor = DiLoCo([nn.Parameter(torch.tensor([3.0, 3.0]))], PLAIN)
    states = []
    for step in range(rounds):
        donor.apply([torch.tensor([0.5, -0.25 * step])])
        states.append((donor.params_hash(), donor.round, donor.export_state(), donor.global_params[0].tolist()))
    return states


def test_out_of_step_peer_loads_the_groups_post_round_state():
    *_, before, after = group_state(5)  # the group starts the round at round 4 and ends it at round 5
    worker = Params(1.0, 1.0)
    # the first download reaches a groupmate still applying the round (round 4): the loop tries again
    averager = ScriptedAverager(group_at(before[0], before[1], [9.0, 9.0]), states=[before[2], after[2]])
    outer, compute, lines = make(worker, averager)
    pre_hash = outer.diloco.params_hash()

    finish_first_round(worker, outer, averager, compute, 0.5, 0.5)
    # the average (9) was not applied to stale global params: the group's post-round state was loaded
    assert averager.load_calls == [PLAIN.state_timeout_s] * 2
    assert outer.diloco.round == 5 and outer.diloco.params_hash() == after[0]
    assert outer.diloco.global_params[0].tolist() == after[3] and worker.values() == after[3]  # local := global
    assert outer.diloco.weight == 0.0  # it has trained nothing since it caught up
    assert worker.changes == 1 and averager.state_sharing_priority == 5.0
    assert lines == [f"stage 0: outer round 5 out of step; loaded group state: group 3, contributors 3, 2.00 s, "
                     f"hash {after[0]}, members AAAAAA,BBBBBB,CCCCCC"]
    assert outer.history[-1]["pre_hash"] == pre_hash


def test_out_of_step_peer_whose_download_fails_rolls_back():
    *_, before = group_state(2)
    worker = Params(1.0, 1.0)
    averager = ScriptedAverager(group_at(before[0], before[1], [9.0, 9.0]), states=[before[2]] * 10)  # never newer
    outer, compute, lines = make(worker, averager)
    pre_hash = outer.diloco.params_hash()

    finish_first_round(worker, outer, averager, compute, 0.5, 0.5)
    assert averager.load_calls == [PLAIN.state_timeout_s] * PLAIN.state_attempts
    assert outer.diloco.round == 0 and outer.diloco.params_hash() == pre_hash
    assert worker.values() == [0.0, 0.0]  # local progress kept, as in any rolled-back round
    assert re.fullmatch(r"stage 0: outer round 0 out of step; state download failed: group 3, .* hash "
                        + pre_hash + ", members AAAAAA,BBBBBB,CCCCCC", lines[0]), lines[0]


def test_a_peer_that_holds_the_canonical_state_applies_despite_a_disagreeing_mate():
    worker = Params(1.0)
    averager = ScriptedAverager(group_at("0" * 16, 0, [0.5]))  # two mates on a lower hash... but see below
    outer, compute, _ = make(worker, averager)
    pre_hash = outer.diloco.params_hash()
    # two mates agree on another state, so they are canonical: this peer is the one out of step
    assert canonical_state({ME: {"hash": pre_hash, "round": 0}, MATE: {"hash": "0" * 16, "round": 0},
                            THIRD: {"hash": "0" * 16, "round": 0}}) == ("0" * 16, 0)
    # with one disagreeing mate the tie goes to the larger hash (ours, here): this peer applies
    averager.replies = [lambda tensors, weight, gather: AveragingResult(
        True, 2, 2, [torch.tensor([0.5])], {ME: gather, MATE: {"hash": "0" * 16, "round": 0}}, None, 1.0)]
    finish_first_round(worker, outer, averager, compute, 0.5)
    assert averager.load_calls == [] and outer.diloco.round == 1
    assert outer.diloco.global_params[0].tolist() == [0.5] and worker.values() == [0.5]


def test_canonical_state_majority_then_round_then_hash_whatever_the_order():
    cases = [
        ({"a": ("h1", 3), "b": ("h1", 3), "c": ("h2", 4)}, ("h1", 3)),  # most peers beat a higher round
        ({"a": ("h1", 3), "b": ("h2", 4)}, ("h2", 4)),  # a tie goes to the higher round
        ({"a": ("aa", 3), "b": ("bb", 3)}, ("bb", 3)),  # then to the larger hash
        ({"a": None, "b": ("h", 2)}, ("h", 2)),  # a peer that gathered nothing counts as round -1
    ]
    for held, expected in cases:
        gathered = {peer: (None if v is None else {"hash": v[0], "round": v[1]}) for peer, v in held.items()}
        assert canonical_state(gathered) == expected
        assert canonical_state(dict(reversed(list(gathered.items())))) == expected


def test_a_mate_claiming_round_1e9_does_not_put_this_peer_out_of_step():
    worker = Params(1.0)
    liar = lambda tensors, weight, gather: AveragingResult(  # noqa: E731
        True, 2, 2, [torch.tensor([0.5])], {ME: gather, MATE: {"hash": "f" * 16, "round": 10**9}}, None, 1.0,
        excluded={MATE: "part holds nan or inf"})
    averager = ScriptedAverager(liar)
    outer, compute, lines = make(worker, averager)
    finish_first_round(worker, outer, averager, compute, 0.5)
    assert averager.load_calls == [] and outer.diloco.round == 1  # applied; downloaded nothing
    assert outer.diloco.global_params[0].tolist() == [0.5] and lines[0].startswith("stage 0: outer round 1 ok")
    assert lines[0].endswith("members AAAAAA,BBBBBB; left out BBBBBB: part holds nan or inf"), lines[0]
    assert OUTER_ROUND_OK.match(lines[0]).group(7) == "AAAAAA,BBBBBB"


def test_out_of_step_peer_downloads_only_from_the_agreeing_mates_and_checks_their_state():
    *_, before, after = group_state(5)
    nan_metadata, nan_tensors = after[2]
    poisoned = (nan_metadata, [torch.full_like(nan_tensors[0], math.nan), *nan_tensors[1:]])
    lying_round = ({**after[2][0], "round": 10**9}, after[2][1])
    other_lr = ({**after[2][0], "outer_lr": 70.0}, after[2][1])
    worker = Params(1.0, 1.0)
    averager = ScriptedAverager(group_at(before[0], before[1], [9.0, 9.0]),
                                states=[poisoned, lying_round, other_lr, after[2]])
    outer, compute, lines = make(worker, averager)
    finish_first_round(worker, outer, averager, compute, 0.5, 0.5)
    # the two mates that held the agreed state are the only donors asked
    assert averager.donors == [(MATE, THIRD)] * 4
    # nan, a round far ahead and another outer lr were refused; the fourth download was loaded
    assert outer.diloco.round == 5 and outer.diloco.params_hash() == after[0]
    assert outer.diloco.outer_optimizer.param_groups[0]["lr"] == PLAIN.outer_lr
    assert "out of step; loaded group state" in lines[0]


def test_close_abandons_a_running_round():
    worker = Params(1.0)
    averager = ScriptedAverager(ok([0.5]))
    gate = averager.gate(0)
    outer, compute, _ = make(worker, averager)
    inner_step(worker, outer, 0.5)
    inner_step(worker, outer, 0.5)
    averager.wait_for_round(0)
    outer.close()
    assert averager.shut_down
    gate.set()
    outer._rounds.shutdown(wait=True)  # let the round thread finish: it must not hand the result over
    assert compute.jobs.empty() and worker.values() == [0.0] and outer.diloco.round == 0


# ------------------------------------------------------------------------------------ with a real stage worker


def make_worker(seed):
    torch.manual_seed(seed)
    config = RunConfig(optimizer=OptimizerSection(name="sgd", lr=0.5, samples_per_step=2), local_sgd=PLAIN)
    return StageWorker(nn.Sequential(nn.Linear(3, 1, bias=False)), config, 0, InputSpec(torch.float32, 1, (3,)))


def train_step(worker, name):
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    worker.forward(name, x, keep_context=True)
    _, stepped = worker.backward(name, torch.ones(2, 1), None, samples=2, need_grad_input=False, deadline=None)
    assert stepped


def test_the_worker_drives_the_outer_loop_through_its_hooks_and_carries_its_state():
    worker = make_worker(seed=0)
    averager = ScriptedAverager(ok())
    compute = Compute()
    outer = OuterSync(worker, averager, PLAIN, submit_to_compute=compute.submit, log=lambda line: None)
    worker.attach("outer", outer)
    start = worker.params[0].detach().clone()

    train_step(worker, "mb0")
    train_step(worker, "mb1")  # the second inner step: the worker's after-step hook starts round 0
    (delta,), weight, _ = averager.wait_for_round(0)
    trained = worker.params[0].detach().clone()
    assert torch.equal(delta, start - trained) and weight == 1.0
    epoch = worker.epoch
    compute.run_next()
    # one peer: the average is its own pseudo-gradient, so the outer step lands where it trained
    assert torch.allclose(worker.params[0], trained, rtol=0, atol=1e-6)
    assert outer.diloco.round == 1 and worker.epoch == epoch + 1

    # the stage's state carries the outer loop's under the name it was attached with
    data = worker.state_bytes()
    assert torch.load(io.BytesIO(data), weights_only=True)["outer"]["round"] == 1
    joiner = make_worker(seed=1)
    joiner_averager = ScriptedAverager()
    joiner.attach("outer", OuterSync(joiner, joiner_averager, PLAIN, submit_to_compute=Compute().submit,
                                     log=lambda line: None))
    joiner.load_state_bytes(data)
    joined = joiner.extensions["outer"].diloco
    assert joined.round == 1 and joined.params_hash() == outer.diloco.params_hash()
    assert torch.equal(joiner.params[0], worker.params[0]) and joiner_averager.state_sharing_priority == 1.0
    plain = make_worker(seed=2)  # a worker without local SGD takes the same state and ignores the outer part
    plain.load_state_bytes(data)
    assert torch.equal(plain.params[0], worker.params[0])

    with pytest.raises(ValueError, match="extension name 'outer' is taken"):
        worker.attach("outer", outer)
    worker.close()
    assert averager.shut_down


def test_the_worker_does_not_know_local_sgd():
    path = pathlib.Path(__file__).resolve().parents[2] / "swarmrt" / "pipeline" / "worker.py"
    tree = ast.parse(path.read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if m and "local_sgd" in m]
    assert "OuterSync" not in path.read_text() and not hasattr(make_worker(0), "outer")
