"""StageAverager over real hivemind DHTs and averagers on 127.0.0.1, in this process.

One swarm of four DHTs for the module (hivemind start-up costs seconds). Two peers average
different tensors, then with weights (1, 0), then a peer downloads the other's state. Four
peers average with one hostile groupmate: scaled 1e6x (trimmed mean, CenteredClip), NaN (the
mean). Every child process (averagers, DHTs, their p2pd) must be gone at the end.
"""

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import time

import hivemind
import pytest
import torch

from swarmrt.local_sgd.averaging import StageAverager, hivemind_compression
from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.diloco import DiLoCo
from swarmrt.roles import proc

pytestmark = pytest.mark.integration

# the run config's [local_sgd] section is the averager's config (request timeout derived: 0.5 s)
CONFIG = LocalSGDSection(
    inner_steps=1,
    matchmaking_time_s=1.0,
    matchmaking_timeout_s=15.0,
    next_chunk_timeout_s=2.0,
    allreduce_timeout_s=20.0,
)
CODECS = {"codec": "int8", "state_codec": "none"}  # int8 is lossy: shows that every peer still gets the same bytes
SHAPES = [(300_000,), (17, 33)]  # 1.2 MB: split into several parts, reduced by both peers


def descendants(pid):
    """Pids of every live descendant of `pid`, with torch's torch_shm_manager left out: torch
    starts that helper once per process for shared memory (hivemind shares the averaged
    tensors) and it exits with the process."""
    return proc.descendants(pid, live_only=True, ignore_programs=frozenset({"torch_shm_manager"}))


@pytest.fixture(scope="module")
def dhts():
    """Four DHT nodes on 127.0.0.1 for the module; afterwards no averager, DHT or p2pd is left."""
    before = set(descendants(os.getpid()))
    nodes = []
    try:
        nodes.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        for _ in range(3):
            nodes.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                      initial_peers=nodes[0].get_visible_maddrs()))
        yield nodes
    finally:
        for node in nodes:
            node.shutdown()
    children = multiprocessing.active_children()  # the averagers' and DHTs' processes
    assert proc.wait_for_exit([c.pid for c in children], 30) == [], "averager and DHT processes did not exit"
    for child in children:
        child.join(timeout=5)  # reap them
    assert proc.wait_for_exit(set(descendants(os.getpid())) - before, 30) == [], \
        "p2pd and other descendants did not exit"


def tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def both(averagers, calls):
    with concurrent.futures.ThreadPoolExecutor(len(averagers)) as pool:
        futures = [pool.submit(call, averager) for averager, call in zip(averagers, calls)]
        return [f.result(timeout=60) for f in futures]


def rel_error(got, expected):
    return float((got - expected).norm() / expected.norm())


# hivemind's uniform 8-bit has 256 levels over +-3 standard deviations and clips beyond, so
# no per-value bound holds; through two passes (to the reducer and back) the relative L2 error
# of a mean of two N(0, 1) tensors measured 0.022 (300k values, seed 1): allow 0.035
INT8_TWO_PASSES = 0.035


@pytest.mark.timeout(120)
def test_two_peers_average_weight_and_share_state(dhts):
    averagers = []
    try:
        templates = tensors(0)
        diloco_a = DiLoCo([torch.nn.Parameter(torch.ones(4))], CONFIG)
        averagers.append(StageAverager(dhts[0], "testrun_stage1", templates, CONFIG, **CODECS,
                                       state_provider=diloco_a.export_state))
        averagers.append(StageAverager(dhts[1], "testrun_stage1", templates, CONFIG, **CODECS))

        # round 1: different tensors, equal weights -> both peers get the mean, the same bytes
        a, b = tensors(1), tensors(2)
        results = both(averagers, [lambda av: av.average(a, 1.0, gather="hash-a"), lambda av: av.average(b, 1.0, gather="hash-b")])
        for result in results:
            assert result.succeeded, result.error
            assert result.group_size == 2 and result.contributors == 2
            assert sorted(result.gathered.values()) == ["hash-a", "hash-b"]
            for got, x, y in zip(result.tensors, a, b):
                mean = (x + y) / 2
                assert got.shape == mean.shape and got.dtype == torch.float32
                assert rel_error(got, mean) < INT8_TWO_PASSES
                assert rel_error(got, x) > 0.5  # really averaged, not a copy of one input
        for got_a, got_b in zip(results[0].tensors, results[1].tensors):
            assert torch.equal(got_a, got_b)  # identical on both peers despite the lossy codec
        assert set(results[0].gathered) == {averagers[0].peer_id, averagers[1].peer_id}

        # round 2: the second peer has weight 0 (e.g. it just joined): the result is the first's
        c, d = tensors(3), tensors(4)
        results = both(averagers, [lambda av: av.average(c, 1.0), lambda av: av.average(d, 0.0)])
        for result in results:
            assert result.succeeded, result.error
            assert result.group_size == 2 and result.contributors == 1
            for got, x in zip(result.tensors, c):
                assert rel_error(got, x) < INT8_TWO_PASSES
        for got_a, got_b in zip(results[0].tensors, results[1].tensors):
            assert torch.equal(got_a, got_b)

        # round 3: all weights 0 -> refused by the reducers, not a nan average
        results = both(averagers, [lambda av: av.average(c, 0.0), lambda av: av.average(d, 0.0)])
        assert [r.succeeded for r in results] == [False, False]
        assert all("(2 with weight 0, 0 left out)" in r.error and r.tensors is None for r in results), results

        # a joiner downloads the first peer's DiLoCo state and matches its hash
        diloco_a.apply([torch.full((4,), 0.5)])
        joiner = DiLoCo([torch.nn.Parameter(torch.zeros(4))], CONFIG)
        loaded = averagers[1].load_state()
        assert loaded is not None
        joiner.import_state(*loaded)
        assert joiner.params_hash() == diloco_a.params_hash() and joiner.round == 1

        # serving state can start later (the outer loop is handed a running averager): now both serve
        diloco_b = DiLoCo([torch.nn.Parameter(torch.zeros(4))], CONFIG)
        for _ in range(3):
            diloco_b.apply([torch.full((4,), -1.0)])
        averagers[1].serve_state(diloco_b.export_state)
        averagers[1].state_sharing_priority = float(diloco_b.round)  # round 3 beats the first peer's round 1
        deadline, loaded = time.monotonic() + 30, None
        while loaded is None and time.monotonic() < deadline:  # its announcement reaches the DHT in the background
            loaded = averagers[0].load_state(timeout=5.0)
        assert loaded is not None and loaded[0]["round"] == 3
        # from named donors only (those that held the agreed state), whatever the DHT's priorities say
        averagers[1].state_sharing_priority = 0.0
        loaded = averagers[1].load_state(timeout=5.0, donors=["not-a-peer-id", averagers[0].peer_id])
        assert loaded is not None and loaded[0]["round"] == 1 and joiner.check_import(*loaded) is None
        assert averagers[0].load_state(timeout=5.0, donors=[averagers[0].peer_id]) is None  # itself: nobody

        # alone (the other peer does not show up), a round fails within its bounds
        started = time.monotonic()
        lonely = averagers[0].average(a, 1.0, matchmaking_timeout=3.0)
        assert not lonely.succeeded and lonely.tensors is None and "could not find a group" in lonely.error
        assert lonely.group_size == 0 and time.monotonic() - started < 3.0 + 5
    finally:
        for averager in averagers:
            averager.shutdown()


def test_codec_mapping_refuses_what_the_allreduce_cannot_carry():
    assert type(hivemind_compression("none")).__name__ == "NoCompression"
    assert type(hivemind_compression("fp16")).__name__ == "Float16Compression"
    assert type(hivemind_compression("int8")).__name__ == "Uniform8BitQuantization"
    for codec in ("topk", "topk:0.1", "bf16", "int8_blockwise:1024"):
        with pytest.raises(ValueError, match="cannot be used in hivemind's all-reduce"):
            hivemind_compression(codec)
    with pytest.raises(ValueError, match="unknown codec 'zstd'"):
        hivemind_compression("zstd")
    # the config's timeout rules are the section's (tests/unit/test_local_sgd.py); the averager takes nothing else
    with pytest.raises(TypeError, match="must be a LocalSGDSection"):
        StageAverager(None, "run_stage0", [torch.zeros(2)], {"matchmaking_time": 1.0}, **CODECS)


# -- four peers, one of them hostile ---------------------------------------------------------------

GROUP_OF_4 = dataclasses.replace(CONFIG, min_group_size=4)  # all four in one group, every round
HONEST_SHAPES = [(40_000,)] * 4 + [(17,)]  # one part per tensor: each peer reduces about one


def pseudo_gradients(seed):
    """Three honest DiLoCo-like pseudo-gradients: a shared direction plus 10% of each peer's own noise."""
    gen = torch.Generator().manual_seed(seed)
    shared = [torch.randn(shape, generator=gen) for shape in HONEST_SHAPES]
    return [[s + 0.1 * torch.randn(s.shape, generator=gen) for s in shared] for _ in range(3)]


def flat(values):
    return torch.cat([v.reshape(-1) for v in values])


def group_round(averagers, sent, weights):
    results = both(averagers, [lambda av, x=x, w=w: av.average(x, w) for x, w in zip(sent, weights)])
    for result in results:
        assert result.succeeded, result.error
        assert result.group_size == 4
    for other in results[1:]:  # identical bytes on every peer, whatever was left out
        assert all(torch.equal(a, b) for a, b in zip(results[0].tensors, other.tensors))
    return results


def start_group(dhts, prefix, config):
    averagers = []
    try:
        for dht in dhts:
            averagers.append(StageAverager(dht, prefix, [torch.zeros(s) for s in HONEST_SHAPES], config,
                                           codec="none", state_codec="none"))
    except BaseException:
        for averager in averagers:
            averager.shutdown()
        raise
    return averagers


@pytest.mark.timeout(120)
@pytest.mark.parametrize("aggregation", ["trimmed_mean", "centered_clip"])
def test_a_1e6_scaled_sender_leaves_a_robust_group_within_10_percent(dhts, aggregation):
    """The fourth peer sends its pseudo-gradient scaled 1e6x with weight 1e6. The trimmed mean
    runs with the outlier filter off (the rule alone copes); CenteredClip with it on, so the
    sender is left out, named, and ignored in the next round."""
    outlier_factor = 0.0 if aggregation == "trimmed_mean" else 10.0
    config = dataclasses.replace(GROUP_OF_4, aggregation=aggregation, outlier_factor=outlier_factor)
    averagers = start_group(dhts, f"robust_{aggregation}", config)
    liar = averagers[3].peer_id
    try:
        honest = pseudo_gradients(1)
        target = flat([sum(parts) / 3 for parts in zip(*honest)])
        results = group_round(averagers, honest + [[h * 1e6 for h in honest[0]]], [1.0, 1.0, 1.0, 1e6])
        deviation = rel_error(flat(results[0].tensors), target)
        assert deviation < 0.10, deviation
        plain = flat([(a + b + c + 1e6 * a) / 4 for a, b, c in zip(*honest)])
        assert rel_error(plain, target) > 1e4  # what the mean would have made of it
        if aggregation == "trimmed_mean":
            assert all(r.excluded == {} for r in results)
            return
        # every peer reduces a 40,000-value part, and every one of them left the liar out of it
        for result in results:
            assert set(result.excluded) == {liar} and result.excluded[liar].startswith("outlier"), result.excluded
        # next round the liar sends something plausible: still ignored, for sender_ban_s
        honest = pseudo_gradients(2)
        results = group_round(averagers, honest + [honest[0]], [1.0] * 4)
        for result in results[:3]:
            assert result.excluded[liar].startswith("banned: outlier"), result.excluded
        target = flat([sum(parts) / 3 for parts in zip(*honest)])
        assert rel_error(flat(results[0].tensors), target) < 0.10
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.timeout(120)
def test_mean_is_the_plain_mean_and_a_nan_sender_is_left_out(dhts):
    averagers = start_group(dhts, "robust_mean", GROUP_OF_4)
    try:
        honest = pseudo_gradients(3)
        fourth = [h.flip(0) for h in honest[0]]
        results = group_round(averagers, honest + [fourth], [1.0] * 4)
        expected = flat([(a + b + c + d) / 4 for a, b, c, d in zip(*honest, fourth)])
        assert torch.allclose(flat(results[0].tensors), expected, atol=1e-6)  # the mean, as before
        assert all(r.excluded == {} and r.contributors == 4 for r in results)

        nan = [h.clone() for h in honest[1]]
        nan[2][7] = math.nan
        results = group_round(averagers, honest + [nan], [1.0] * 4)  # succeeds: nobody rolls back
        expected = flat([(a + b + c) / 3 for a, b, c in zip(*honest)])
        got = flat(results[0].tensors)
        # the part holding the nan is the mean of the other three; the others are the mean of all four
        part = slice(2 * 40_000, 3 * 40_000)
        assert torch.allclose(got[part], expected[part], atol=1e-6)
        with_fourth = flat([(a + b + c + b) / 4 for a, b, c in zip(*honest)])
        assert torch.allclose(got[:part.start], with_fourth[:part.start], atol=1e-6)
        liar = averagers[3].peer_id
        assert any(r.excluded.get(liar) == "part holds nan or inf" for r in results)
        assert torch.isfinite(got).all()
    finally:
        for averager in averagers:
            averager.shutdown()
