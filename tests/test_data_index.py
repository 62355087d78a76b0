"""Tests of mmjax.data.index: the seeded permutation, streams, mixture quotas and global batch plans.

Each check compares against a reference: a brute-force numpy check, a set equality, a pure-Python
reimplementation of the Feistel network, or a one-process run."""

import json
from fractions import Fraction

import numpy as np
import pytest

from mmjax.data import index

M64 = 2**64 - 1


def _ref_mix(z):
    """splitmix64's finalizer, straight from its published definition (Python ints)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _ref_permute(x, n, key):
    """One value of the 4-round Feistel + cycle-walking permutation, as the module docstring specifies it."""
    bits = 2
    while (1 << bits) < n:
        bits += 2
    h = bits // 2
    mask = (1 << h) - 1
    round_keys = [_ref_mix((key + (r + 1) * 0x9E3779B97F4A7C15) & M64) for r in range(4)]

    def once(v):
        left, right = v >> h, v & mask
        for k in round_keys:
            left, right = right, left ^ (_ref_mix(right ^ k) & mask)
        return (left << h) | right

    y = once(x)
    while y >= n:
        y = once(y)
    return y


KEYS = [0, 1, 12345, 2**63 + 17, M64]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 1000, 3194, 100003])
def test_permute_is_a_bijection(n):
    for key in KEYS:
        out = index.permute(np.arange(n), n, key)
        assert out.dtype == np.int64 and out.shape == (n,)
        np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_permute_keys_and_epochs_change_the_order():
    n, i = 1000, np.arange(1000)
    orders = [index.permute(i, n, key) for key in KEYS]
    orders += [index.stream_index(i + e * n, n, seed=0, source=0) for e in range(4)]
    orders += [index.stream_index(i, n, seed=1, source=0), index.stream_index(i, n, seed=0, source=1)]
    for a in range(len(orders)):
        for b in range(a + 1, len(orders)):
            assert (orders[a] != orders[b]).mean() > 0.9, (a, b)
    assert not np.array_equal(orders[0], i)  # not the identity


def test_permute_large_domain():
    for n in (2_000_000_000, 2**40 + 7):
        i = np.concatenate([np.arange(2048), np.random.default_rng(0).integers(0, n, 2048)])
        i = np.unique(i)
        out = index.permute(i, n, 99)
        assert out.min() >= 0 and out.max() < n
        assert len(np.unique(out)) == len(i)


@pytest.mark.parametrize("n", [1, 10, 1000, 3194, 2_000_000_000, 2**40 + 7])
def test_permute_matches_pure_python_reference(n):
    for key in (3, 2**64 - 5):
        expected = [_ref_permute(x, n, key) for x in range(min(8, n))]
        assert index.permute(np.arange(min(8, n)), n, key).tolist() == expected
    assert index.permute(min(5, n - 1), n, 3).shape == ()  # scalar in, 0-d out


def test_permute_rejects_bad_input():
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        index.permute(np.array([0, 10]), 10, 0)
    with pytest.raises(ValueError, match="n must be"):
        index.permute(0, 0, 0)


def test_stream_index_every_record_once_per_epoch():
    n = 37
    k = np.arange(3 * n)
    records = index.stream_index(k, n, seed=5, source=2)
    epochs = records.reshape(3, n)
    for e in range(3):
        assert set(epochs[e].tolist()) == set(range(n))
        np.testing.assert_array_equal(epochs[e], index.permute(np.arange(n), n, index.stream_key(5, 2, e)))
    assert not np.array_equal(epochs[0], epochs[1])
    # element by element (scalar calls) gives the same as the vectorised call
    assert [int(index.stream_index(int(x), n, 5, 2)) for x in k[::7]] == records[::7].tolist()
    assert 0 <= index.stream_key(5, 2, 0) < 2**64


def test_replacement_positions_stay_in_the_epoch():
    n, seed = 10, 3
    for k in (0, 4, 9, 13, 19):
        pos = index.replacement_positions(k, n, limit=16)
        assert len(pos) == n - 1 and all(k // n == p // n for p in pos)
        assert pos[: (n - 1 - k % n)] == list(range(k + 1, k // n * n + n))  # k+1, k+2, ... up to the epoch end
        records = index.stream_index(np.array(pos), n, seed, 0).tolist()
        assert set(records) == set(range(n)) - {int(index.stream_index(k, n, seed, 0))}
    assert index.replacement_positions(5, 1000, limit=4) == [6, 7, 8, 9]
    assert index.replacement_positions(0, 1) == []


@pytest.mark.parametrize(
    "weights,G",
    [([0.6, 0.3, 0.1], 20), ([1, 1, 1], 10), ([0.5, 0.25, 0.25, 0.0], 7), ([3, 0.05, 2], 100), ([1], 5)],
)
def test_quotas_sum_and_closeness(weights, G):
    q = index.quotas(weights, G)
    assert sum(q) == G and len(q) == len(weights)
    total = sum(Fraction(w) for w in weights)
    for w, n in zip(weights, q):
        assert abs(n - G * Fraction(w) / total) < 1


def test_quotas_ties_and_errors():
    assert index.quotas([0.6, 0.3, 0.1], 20) == [12, 6, 2]
    assert index.quotas([1, 1, 1], 4) == [2, 1, 1]  # equal remainders: the earlier source first
    assert index.quotas([1, 1, 1], 5) == [2, 2, 1]
    with pytest.raises(ValueError) as err:
        index.quotas([0.6, 0.39, 0.01], 20)
    msg = str(err.value)
    assert "\n" not in msg and "source 2" in msg and "0.01" in msg and "20" in msg
    for bad in ([1, -1], [0, 0], [float("nan"), 1], []):
        with pytest.raises(ValueError, match="weights"):
            index.quotas(bad, 8)


SIZES, WEIGHTS, SEED, G, BATCHES = [1000, 300, 37], [0.6, 0.3, 0.1], 11, 20, 200


def _plans(order, batches=BATCHES):
    return [order.plan(g) for g in range(batches)]


def test_mixture_quotas_and_consecutive_streams():
    order = index.GlobalOrder(SIZES, WEIGHTS, SEED, G)
    assert order.quota == [12, 6, 2]
    plans = _plans(order)
    for g, p in enumerate(plans):
        assert all(a.shape == (G,) and a.dtype == np.int64 for a in p.values())
        np.testing.assert_array_equal(np.bincount(p["source"], minlength=3), order.quota)
        np.testing.assert_array_equal(p["pos"], g * G + np.arange(G))
    assert len({p["source"].tobytes() for p in plans}) > 100  # the slots are shuffled per batch
    for s, n in enumerate(SIZES):
        stream = np.concatenate([p["stream"][p["source"] == s] for p in plans])
        np.testing.assert_array_equal(stream, np.arange(BATCHES * order.quota[s]))  # no gap, no repeat
        record = np.concatenate([p["record"][p["source"] == s] for p in plans])
        np.testing.assert_array_equal(record, index.stream_index(stream, n, SEED, s))
        full = record[: len(record) // n * n].reshape(-1, n)  # whole epochs: every record once
        assert all(set(e.tolist()) == set(range(n)) for e in full)


def test_single_source_plan_is_the_stream():
    order = index.GlobalOrder([1000], None, SEED, 16)
    for g in (0, 1, 62, 63, 200):
        p = order.plan(g)
        k = g * 16 + np.arange(16)
        np.testing.assert_array_equal(p["source"], np.zeros(16))
        np.testing.assert_array_equal(p["stream"], k)
        np.testing.assert_array_equal(p["record"], index.stream_index(k, 1000, SEED, 0))
    assert index.GlobalOrder([300, 100], None, 0, 8).quota == [6, 2]  # no weights: proportional to sizes


@pytest.mark.parametrize("P", [1, 2, 4])
def test_process_rows_union_equals_one_process(P):
    order = index.GlobalOrder(SIZES, WEIGHTS, SEED, G)
    for g in range(0, BATCHES, 13):
        plan = order.plan(g)
        parts = [index.local_rows(plan, r, G // P) for r in range(P)]
        for name, whole in plan.items():
            np.testing.assert_array_equal(np.concatenate([part[name] for part in parts]), whole)
            for r in range(P):
                np.testing.assert_array_equal(parts[r][name], whole[index.process_slice(G, P, r)])


def test_local_rows_and_process_slice_errors():
    plan = index.GlobalOrder(SIZES, WEIGHTS, SEED, G).plan(0)
    with pytest.raises(ValueError, match="out of a global batch of 20"):
        index.local_rows(plan, 4, 5)
    with pytest.raises(ValueError, match="multiple of the process count"):
        index.process_slice(20, 3, 0)
    with pytest.raises(ValueError, match="out of range"):
        index.process_slice(20, 4, 4)


def test_state_round_trip_and_stateless_resume():
    order = index.GlobalOrder(SIZES, WEIGHTS, SEED, G)
    uninterrupted = _plans(order, 60)
    state = json.loads(json.dumps(order.state(37)))
    assert state["batch"] == 37 and state["drawn"] == [37 * q for q in order.quota]
    resumed = index.GlobalOrder(list(SIZES), list(WEIGHTS), SEED, G)  # a fresh process, any topology
    start = resumed.check_state(state)
    for g in range(start, 60):
        fresh = resumed.plan(g)
        for name in fresh:
            np.testing.assert_array_equal(fresh[name], uninterrupted[g][name])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"sizes": [1000, 301, 37]}, "sizes"),
        ({"weights": [0.5, 0.4, 0.1]}, "weights"),
        ({"seed": 12}, "seed"),
        ({"global_batch": 40}, "global_batch"),
    ],
)
def test_check_state_mismatch(kwargs, field):
    args = {"sizes": SIZES, "weights": WEIGHTS, "seed": SEED, "global_batch": G} | kwargs
    state = json.loads(json.dumps(index.GlobalOrder(SIZES, WEIGHTS, SEED, G).state(5)))
    with pytest.raises(ValueError) as err:
        index.GlobalOrder(**args).check_state(state)
    assert "\n" not in str(err.value) and field in str(err.value) and "cannot resume" in str(err.value)


def test_check_state_rejects_bad_versions_and_counts():
    order = index.GlobalOrder(SIZES, WEIGHTS, SEED, G)
    with pytest.raises(ValueError, match="version"):
        order.check_state(order.state(3) | {"version": 2})
    with pytest.raises(ValueError, match="inconsistent"):
        order.check_state(order.state(3) | {"drawn": [36, 18, 7]})
