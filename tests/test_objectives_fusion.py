"""Fusion-model objectives (ALBEF / BLIP / BEiT-3 style) against numpy references:
queues, momentum distillation, hard negatives + ITM, MLM, masked image modelling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_objectives import N_DEV, _unit  # shared helpers

from mmjax.objectives import (
    alpha_at,
    blockwise_mask,
    ema_update,
    enqueue,
    init_queues,
    itc_distill_loss,
    itc_loss,
    itm_loss,
    mask_tokens,
    mdm_loss,
    mlm_loss,
    momentum_at,
    patch_targets,
    queue_valid,
    sample_hard_negatives,
)


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _softmax(x):
    return np.exp(_log_softmax(x))


# ---------------------------------------------------------------- queues


def np_ring(size, dim, batches, ptr=0, state=None):
    """Row-by-row ring buffer: each valid row overwrites slot ptr, ptr += 1."""
    if state is None:
        state = (np.zeros((size, dim), np.float32), np.zeros((size, dim), np.float32), np.full(size, -1, np.int64))
    img, txt, ids = (a.copy() for a in state)
    for bi, bt, bid, bv in batches:
        for r in range(len(bid)):
            if bv[r]:
                img[ptr], txt[ptr], ids[ptr] = bi[r], bt[r], bid[r]
                ptr = (ptr + 1) % size
    return img, txt, ids, ptr


def _batches(rng, n_steps, b, d, valid_p=1.0):
    out, next_id = [], 0
    for _ in range(n_steps):
        bv = rng.random(b) < valid_p
        out.append(
            (
                rng.normal(size=(b, d)).astype(np.float32),
                rng.normal(size=(b, d)).astype(np.float32),
                np.arange(next_id, next_id + b),
                bv,
            )
        )
        next_id += b
    return out


def _run_queue(size, d, batches, use_valid):
    q = init_queues(size, d)
    step = jax.jit(enqueue)
    for bi, bt, bid, bv in batches:
        q = step(q, bi, bt, bid, bv if use_valid else None)
    return q


def _assert_queue(q, ref):
    img, txt, ids, ptr = ref
    np.testing.assert_array_equal(q["img"], img)
    np.testing.assert_array_equal(q["txt"], txt)
    np.testing.assert_array_equal(q["ids"], ids)
    assert int(q["ptr"]) == ptr


def test_init_queues():
    q = init_queues(5, 3)
    assert q["img"].shape == (5, 3) and q["img"].dtype == jnp.float32
    assert q["ids"].dtype == jnp.int32 and q["ptr"].dtype == jnp.int32 and q["ptr"].shape == ()
    assert not np.any(queue_valid(q))


def test_enqueue_wraparound_matches_ring_buffer():
    rng = np.random.default_rng(0)
    size, b, d = 10, 4, 3  # 10 is not a multiple of 4
    batches = _batches(rng, 6, b, d)
    q = init_queues(size, d)
    for step, (bi, bt, bid, _) in enumerate(batches):
        q = jax.jit(enqueue)(q, bi, bt, bid)
        _assert_queue(q, np_ring(size, d, batches[: step + 1]))
        # The rows just written hold exactly the features passed.
        pos = (np.arange(b) + b * step) % size
        np.testing.assert_array_equal(q["img"][pos], bi)
        np.testing.assert_array_equal(q["txt"][pos], bt)
        np.testing.assert_array_equal(q["ids"][pos], bid)
    np.testing.assert_array_equal(queue_valid(q), np.ones(size, bool))
    q = jax.jit(enqueue)(init_queues(size, d), *batches[0][:3])
    np.testing.assert_array_equal(queue_valid(q), np.arange(size) < b)


def test_enqueue_valid_mask():
    rng = np.random.default_rng(1)
    size, b, d = 10, 4, 3
    batches = _batches(rng, 8, b, d, valid_p=0.6)
    batches[2] = batches[2][:3] + (np.zeros(b, bool),)  # nothing valid
    batches[-1] = batches[-1][:3] + (np.array([1, 1, 0, 0], bool),)  # short last batch
    q = _run_queue(size, d, batches, use_valid=True)
    _assert_queue(q, np_ring(size, d, batches))
    # Ignoring the mask gives a different queue (the test can fail).
    assert int(_run_queue(size, d, batches, use_valid=False)["ptr"]) != int(q["ptr"])


@pytest.mark.parametrize("start_ptr", [0, 2])
def test_enqueue_batch_larger_than_queue(start_ptr):
    rng = np.random.default_rng(2)
    size, b, d = 3, 8, 2
    ((bi, bt, bid, _),) = _batches(rng, 1, b, d)
    bv = np.array([1, 1, 0, 1, 1, 0, 1, 0], bool)  # 5 valid rows > size
    q = dict(init_queues(size, d), ptr=jnp.asarray(start_ptr, jnp.int32))
    q = jax.jit(enqueue)(q, bi, bt, bid, bv)
    _assert_queue(q, np_ring(size, d, [(bi, bt, bid, bv)], ptr=start_ptr))
    assert set(np.asarray(q["ids"]).tolist()) == set(bid[bv][-size:].tolist())
    q = jax.jit(enqueue)(dict(init_queues(size, d), ptr=jnp.asarray(start_ptr, jnp.int32)), bi, bt, bid)
    _assert_queue(q, np_ring(size, d, [(bi, bt, bid, np.ones(b, bool))], ptr=start_ptr))


# ---------------------------------------------------------------- EMA / schedules


def test_ema_update_closed_form():
    rng = np.random.default_rng(3)
    m, n = 0.9, 6
    e0 = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    ps = [
        {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
        for _ in range(n)
    ]
    ema = e0
    step = jax.jit(ema_update)
    for p in ps:
        ema = step(ema, p, m)
    for k in e0:
        want = m**n * e0[k].astype(np.float64) + sum(
            (1 - m) * m ** (n - 1 - j) * ps[j][k].astype(np.float64) for j in range(n)
        )
        np.testing.assert_allclose(ema[k], want, rtol=1e-5, atol=1e-6)
    bf = jax.jit(ema_update)({"w": jnp.ones(3, jnp.bfloat16)}, {"w": jnp.zeros(3, jnp.float32)}, 0.5)
    assert bf["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(bf["w"].astype(np.float32), 0.5)


def test_momentum_and_alpha_schedules():
    np.testing.assert_allclose(momentum_at(123), 0.995, rtol=1e-7)
    f = jax.jit(lambda s: momentum_at(s, base=0.99, final=1.0, total_steps=100))
    np.testing.assert_allclose([f(0), f(50), f(100), f(500)], [0.99, 0.995, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(f(25), 1.0 - 0.01 * (np.cos(np.pi / 4) + 1) / 2, atol=1e-6)
    np.testing.assert_allclose(alpha_at(7, 0.4), 0.4, rtol=1e-7)
    g = jax.jit(lambda s: alpha_at(s, 0.4, ramp_steps=1000))
    np.testing.assert_allclose([g(0), g(250), g(1000), g(5000)], [0.0, 0.1, 0.4, 0.4], atol=1e-7)


# ---------------------------------------------------------------- ITC distillation


def np_itc_distill(img, txt, ids, t_img, t_txt, q, temp, alpha, valid=None):
    f = lambda x: np.asarray(x, np.float64)
    img, txt, t_img, t_txt = map(f, (img, txt, t_img, t_txt))
    q_img, q_txt, q_ids = f(q["img"]), f(q["txt"]), np.asarray(q["ids"])
    b = len(ids)
    valid = np.ones(b, bool) if valid is None else np.asarray(valid)
    cand_ids = np.concatenate([ids, q_ids])
    ok = np.concatenate([valid, q_ids >= 0])
    cols = np.flatnonzero(ok)

    def ce(x, tx, cand):
        s = x @ cand[cols].T / temp
        t = tx @ cand[cols].T / temp
        pos = (cand_ids[cols] == row_id).astype(np.float64)
        target = alpha * _softmax(t) + (1 - alpha) * pos / pos.sum()
        return -(target * _log_softmax(s)).sum()

    losses = []
    for i in np.flatnonzero(valid):
        row_id = ids[i]
        l_i2t = ce(img[i], t_img[i], np.concatenate([t_txt, q_txt]))
        l_t2i = ce(txt[i], t_txt[i], np.concatenate([t_img, q_img]))
        losses.append(0.5 * (l_i2t + l_t2i))
    return np.mean(losses)


@pytest.fixture(scope="module")
def distill_inputs():
    rng = np.random.default_rng(4)
    b, d, size = 16, 8, 12
    img, txt = _unit(rng, b, d), _unit(rng, b, d)
    # Teacher: a perturbed copy of the student, so soft targets are informative.
    t_img = img + 0.3 * _unit(rng, b, d)
    t_txt = txt + 0.3 * _unit(rng, b, d)
    t_img /= np.linalg.norm(t_img, axis=-1, keepdims=True)
    t_txt /= np.linalg.norm(t_txt, axis=-1, keepdims=True)
    ids = np.arange(100, 100 + b)
    ids[3], ids[9], ids[12] = ids[1], ids[1], ids[5]  # duplicate ids in the batch
    q = init_queues(size, d)
    q_ids = np.array([200, 201, ids[0], 203, ids[7], 205, ids[1]])  # 7 of 12 slots filled
    q = jax.jit(enqueue)(q, _unit(rng, 7, d), _unit(rng, 7, d), q_ids)
    return img, txt, ids, t_img, t_txt, q


@pytest.mark.parametrize("alpha,use_valid", [(0.4, False), (0.0, False), (1.0, False), (0.4, True)])
def test_itc_distill_matches_numpy(distill_inputs, alpha, use_valid):
    img, txt, ids, t_img, t_txt, q = distill_inputs
    valid = np.ones(len(ids), bool)
    if use_valid:
        valid[[2, 9, 15]] = False
    temp = 0.07
    loss, m = jax.jit(lambda *a: itc_distill_loss(*a, valid_b=jnp.asarray(valid)))(
        img, txt, ids, t_img, t_txt, q, temp, alpha
    )
    want = np_itc_distill(img, txt, ids, t_img, t_txt, q, temp, alpha, valid)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert set(m) >= {"loss_itc", "temp", "i2t_acc", "t2i_acc"}
    np.testing.assert_allclose(m["temp"], temp, rtol=1e-7)
    assert 0.0 <= m["i2t_acc"] <= 1.0 and 0.0 <= m["t2i_acc"] <= 1.0
    # The queue and same-id positives matter (the reference can tell the difference).
    other = np_itc_distill(img, txt, np.arange(len(ids)), t_img, t_txt, init_queues(12, 8), temp, alpha, valid)
    assert abs(other - want) > 1e-3


def test_itc_distill_reduces_to_clip(distill_inputs):
    img, txt, _, _, _, _ = distill_inputs
    ids = np.arange(len(img))
    log_scale = 2.5
    temp = float(np.exp(-log_scale))
    got, m = jax.jit(itc_distill_loss)(img, txt, ids, img, txt, init_queues(5, img.shape[1]), temp, 0.0)
    want, m_clip = jax.jit(itc_loss)(img, txt, log_scale)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(m["i2t_acc"], m_clip["i2t_acc"])


def test_itc_distill_accuracy_and_gradient_flow(distill_inputs):
    img, txt, ids, t_img, t_txt, q = distill_inputs
    eye = np.eye(8, dtype=np.float32)
    _, m = jax.jit(itc_distill_loss)(eye, eye, np.arange(8), eye, eye, init_queues(4, 8), 0.1, 0.4)
    assert m["i2t_acc"] == 1.0 and m["t2i_acc"] == 1.0
    _, m = jax.jit(itc_distill_loss)(
        eye, np.roll(eye, 1, 0), np.arange(8), eye, np.roll(eye, 1, 0), init_queues(4, 8), 0.1, 0.4
    )
    assert m["i2t_acc"] == 0.0 and m["t2i_acc"] == 0.0
    fn = lambda *a: itc_distill_loss(*a[:5], q, a[5], 0.4)[0]
    g = jax.jit(jax.grad(fn, argnums=(0, 1, 3, 4, 5)))(img, txt, ids, t_img, t_txt, 0.07)
    assert np.abs(g[0]).max() > 1e-4 and np.abs(g[1]).max() > 1e-4 and abs(g[4]) > 1e-4
    assert np.all(g[2] == 0) and np.all(g[3] == 0)  # teacher: stop_gradient
    assert all(np.all(np.isfinite(x)) for x in g)


def test_itc_distill_shard_map_equals_single_device(distill_inputs):
    img, txt, ids, t_img, t_txt, q = distill_inputs
    valid = np.ones(len(ids), bool)
    valid[[0, 1, 2, 13]] = False  # devices own different numbers of real rows
    valid = jnp.asarray(valid)
    temp, alpha = 0.07, 0.4

    def single(img, txt, temp):
        return itc_distill_loss(img, txt, ids, t_img, t_txt, q, temp, alpha, valid_b=valid)

    gather = lambda x: jax.lax.all_gather(x, "data", tiled=True)

    def per_device(img, txt, ids, t_img, t_txt, valid, q, temp):
        loss, m = itc_distill_loss(img, txt, ids, t_img, t_txt, q, temp, alpha, gather=gather, valid_b=valid)
        return jax.lax.pmean(loss, "data"), jax.lax.pmean(m, "data")

    mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 6 + (P(), P()), out_specs=(P(), P()))

    def dist(img, txt, temp):
        return sharded(img, txt, ids, t_img, t_txt, valid, q, temp)

    (want, want_m), (got, got_m) = jax.jit(single)(img, txt, temp), jax.jit(dist)(img, txt, temp)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for k in ("i2t_acc", "t2i_acc"):
        np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5)
    want_g = jax.jit(jax.grad(lambda *a: single(*a)[0], argnums=(0, 1, 2)))(img, txt, temp)
    got_g = jax.jit(jax.grad(lambda *a: dist(*a)[0], argnums=(0, 1, 2)))(img, txt, temp)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- hard negatives / ITM


def test_hard_negatives_distribution():
    ids_B = np.array([0, 1, 1, 2, 3, 4])
    valid_B = np.array([1, 1, 1, 1, 1, 0], bool)  # column 5 is padding
    ids_b = ids_B[:3]
    sim = np.array(
        [[5.0, 2.0, 0.0, 1.0, -1.0, 9.0], [1.0, 9.0, 9.0, 0.5, 2.0, 9.0], [-2.0, 9.0, 9.0, 1.5, 1.0, 0.0]], np.float32
    )
    allowed = (ids_b[:, None] != ids_B[None, :]) & valid_B[None, :]
    p = np.where(allowed, np.exp(sim - sim.max()), 0.0)
    p /= p.sum(-1, keepdims=True)
    uniform = allowed / allowed.sum(-1, keepdims=True)
    assert np.abs(p - uniform).max() > 0.15  # a uniform sampler would fail below
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: sample_hard_negatives(k, sim, ids_b, ids_B, valid_B)))
    idx, has_neg = draw(keys)
    idx, has_neg = np.asarray(idx), np.asarray(has_neg)
    assert idx.shape == (n, 3) and idx.dtype == np.int32 and has_neg.all()
    assert allowed[np.arange(3)[None, :], idx].all()  # never a same-id / invalid column
    freq = np.stack([np.bincount(idx[:, i], minlength=6) / n for i in range(3)])
    np.testing.assert_allclose(freq, p, atol=0.015)


def test_hard_negatives_edge_cases():
    # Batch size 1: no negative exists.
    idx, has_neg = jax.jit(sample_hard_negatives)(jax.random.key(1), jnp.array([[3.0]]), jnp.array([7]), jnp.array([7]))
    assert idx.shape == (1,) and int(idx[0]) == 0 and not bool(has_neg[0])
    # bf16 with huge / infinite logits: finite, in range, picks the best allowed column.
    sim = jnp.array([[jnp.inf, 1e30, -jnp.inf, 3e38], [1.0, 2.0, 3.0, 4.0]], jnp.bfloat16)
    ids_b, ids_B = jnp.array([0, 9]), jnp.array([0, 1, 2, 0])
    keys = jax.random.split(jax.random.key(2), 200)
    idx, has_neg = jax.jit(jax.vmap(lambda k: sample_hard_negatives(k, sim, ids_b, ids_B)))(keys)
    idx = np.asarray(idx)
    assert np.all(has_neg) and np.all((idx >= 0) & (idx < 4))
    assert np.all(idx[:, 0] == 1)
    assert len(set(idx[:, 1].tolist())) > 1
    # Padding columns are never drawn.
    idx, has_neg = jax.jit(sample_hard_negatives)(
        jax.random.key(3), jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.array([0, 1, 2]), jnp.array([1, 1, 0], bool)
    )
    assert np.all(has_neg)
    np.testing.assert_array_equal(idx, [1, 0])


def test_itm_loss_matches_numpy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(10, 2)).astype(np.float32) * 2
    labels = rng.integers(0, 2, size=10)
    w = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], np.float32)
    ce = -_log_softmax(logits.astype(np.float64))[np.arange(10), labels]
    acc = logits.argmax(-1) == labels
    loss, m = jax.jit(itm_loss)(logits, labels, w)
    np.testing.assert_allclose(loss, (w * ce).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["itm_acc"], (w * acc).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(itm_loss)(logits, labels)[0], ce.mean(), rtol=1e-5)
    logits2 = logits.copy()
    logits2[[2, 6]] = 50.0 * np.array([1, -1])  # dropped rows do not matter
    np.testing.assert_allclose(jax.jit(itm_loss)(logits2, labels, w)[0], loss, rtol=1e-6)
    zero, _ = jax.jit(itm_loss)(logits, labels, np.zeros(10, np.float32))
    assert zero == 0.0


# ---------------------------------------------------------------- MLM


# prob is traced, so both probabilities share one compiled program.
_mask_fn = jax.jit(lambda k, x, prob: mask_tokens(k, x, vocab_size=1000, mask_id=4, prob=prob))


@pytest.mark.parametrize("prob", [0.15, 0.5])
def test_mask_tokens_statistics(prob):
    vocab, mask_id, special = 1000, 4, (0, 1, 2, 3, 4, 5)
    rng = np.random.default_rng(6)
    ids = rng.integers(6, vocab, size=(64, 256))
    ids[rng.random(ids.shape) < 0.2] = rng.choice(special, size=1)[0]
    ids[:, 0], ids[:, -8:] = 5, 0  # cls, padding
    out, sel = _mask_fn(jax.random.key(7), jnp.asarray(ids, jnp.int32), prob)
    out, sel = np.asarray(out), np.asarray(sel)
    assert out.dtype == np.int32 and sel.dtype == bool
    is_special = np.isin(ids, special)
    assert not sel[is_special].any()
    np.testing.assert_array_equal(out[~sel], ids[~sel])  # unselected tokens untouched
    assert abs(sel[~is_special].mean() - prob) < 0.01
    o, t = out[sel], ids[sel]
    n_mask, n_same = (o == mask_id).mean(), (o == t).mean()
    n_rand = ((o != mask_id) & (o != t)).mean()
    assert abs(n_mask - 0.8) < 0.03 and abs(n_same - 0.1) < 0.02 and abs(n_rand - 0.1) < 0.02
    rand = o[o != mask_id]
    assert rand.min() >= 6 and rand.max() < vocab
    out2, _ = _mask_fn(jax.random.key(8), jnp.asarray(ids, jnp.int32), prob)
    assert (np.asarray(out2) != out).any()


def np_mlm(logits, targets, mask, teacher=None, alpha=0.0):
    lp = _log_softmax(logits.astype(np.float64))
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    ce = nll[mask].mean()
    if teacher is None:
        return ce
    soft = -(_softmax(teacher.astype(np.float64)) * lp).sum(-1)
    return (1 - alpha) * ce + alpha * soft[mask].mean()


def test_mlm_loss_matches_numpy():
    rng = np.random.default_rng(9)
    b, l, v = 3, 7, 11
    logits = rng.normal(size=(b, l, v)).astype(np.float32) * 3
    teacher = rng.normal(size=(b, l, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, size=(b, l))
    mask = rng.random((b, l)) < 0.4
    mask[0, 0] = True
    loss, m = jax.jit(mlm_loss)(logits, targets, mask)
    np.testing.assert_allclose(loss, np_mlm(logits, targets, mask), rtol=1e-5)
    acc = (logits.argmax(-1) == targets)[mask].mean()
    np.testing.assert_allclose(m["mlm_acc"], acc, rtol=1e-6)
    # Unmasked positions do not count.
    logits2 = logits.copy()
    logits2[~mask] = 0.0
    np.testing.assert_allclose(jax.jit(mlm_loss)(logits2, targets, mask)[0], loss, rtol=1e-6)
    # bf16 logits are taken in f32.
    lb = jax.jit(mlm_loss)(jnp.asarray(logits, jnp.bfloat16), targets, mask)[0]
    assert lb.dtype == jnp.float32
    # Distillation.
    fn = jax.jit(lambda lg, tl, a: mlm_loss(lg, targets, mask, teacher_logits_BxLxV=tl, alpha=a)[0])
    np.testing.assert_allclose(fn(logits, teacher, 0.4), np_mlm(logits, targets, mask, teacher, 0.4), rtol=1e-5)
    np.testing.assert_allclose(fn(logits, teacher, 0.0), loss, rtol=1e-6)
    g_teacher = jax.jit(jax.grad(fn, argnums=1))(logits, teacher, 0.4)
    assert np.all(np.asarray(g_teacher) == 0)


def test_mlm_loss_nothing_masked():
    logits = jnp.ones((2, 3, 5))
    targets = jnp.zeros((2, 3), jnp.int32)
    none = jnp.zeros((2, 3), bool)
    loss, m = jax.jit(mlm_loss)(logits, targets, none, teacher_logits_BxLxV=logits, alpha=0.5)
    assert loss == 0.0 and np.isfinite(m["mlm_acc"])
    g = jax.jit(jax.grad(lambda x: mlm_loss(x, targets, none)[0]))(logits)
    assert np.all(np.asarray(g) == 0)


# ---------------------------------------------------------------- masked image modelling


def _boundary_edges(mask_bxN, gh, gw):
    m = mask_bxN.reshape(-1, gh, gw)
    return (m[:, 1:] != m[:, :-1]).sum((1, 2)) + (m[:, :, 1:] != m[:, :, :-1]).sum((1, 2))


@pytest.mark.parametrize("gh,gw,ratio", [(14, 14, 0.4), (5, 7, 0.75), (3, 3, 0.0)])
def test_blockwise_mask_exact_count(gh, gw, ratio):
    b = 32
    mask = jax.jit(blockwise_mask, static_argnums=(1, 2, 3, 4))(jax.random.key(10), b, gh, gw, ratio)
    mask = np.asarray(mask)
    assert mask.shape == (b, gh * gw) and mask.dtype == bool
    np.testing.assert_array_equal(mask.sum(-1), round(ratio * gh * gw))
    if ratio > 0:
        assert len({r.tobytes() for r in mask}) > b // 2  # rows differ


def test_blockwise_mask_is_blocky():
    gh = gw = 14
    b, n = 64, round(0.4 * 196)
    mask_fn = jax.jit(blockwise_mask, static_argnums=(1, 2, 3, 4))
    mask = np.asarray(mask_fn(jax.random.key(11), b, gh, gw, 0.4))
    rng = np.random.default_rng(12)
    rand = np.zeros((b, gh * gw), bool)
    for r in rand:
        r[rng.choice(gh * gw, n, replace=False)] = True
    blocky, scattered = _boundary_edges(mask, gh, gw).mean(), _boundary_edges(rand, gh, gw).mean()
    assert blocky < 0.5 * scattered, (blocky, scattered)


def np_patchify(images, p):
    b, h, w, c = images.shape
    out = np.zeros((b, (h // p) * (w // p), p * p * c), np.float64)
    for i in range(h // p):
        for j in range(w // p):
            out[:, i * (w // p) + j] = images[:, i * p : (i + 1) * p, j * p : (j + 1) * p, :].reshape(b, -1)
    return out


def test_patch_targets_matches_numpy_and_inverts():
    rng = np.random.default_rng(13)
    b, h, w, c, p = 2, 8, 12, 3, 4
    images = rng.normal(size=(b, h, w, c)).astype(np.float32) * 3 + 1
    got = np.asarray(jax.jit(patch_targets, static_argnums=1)(images, p))
    raw = np_patchify(images.astype(np.float64), p)
    mean, var = raw.mean(-1, keepdims=True), raw.var(-1, keepdims=True)
    assert got.shape == (b, (h // p) * (w // p), p * p * c)
    np.testing.assert_allclose(got, (raw - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(got.std(-1), 1, atol=1e-4)
    # Undo the normalisation and the patch reshape: back to the images.
    back = (got * np.sqrt(var + 1e-6) + mean).reshape(b, h // p, w // p, p, p, c)
    back = back.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    np.testing.assert_allclose(back, images, rtol=1e-4, atol=1e-4)
    # Same patch order as a stride-p conv whose kernel copies each pixel out.
    k = np.eye(p * p * c, dtype=np.float32).reshape(p, p, c, p * p * c)
    conv = jax.lax.conv_general_dilated(images, k, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(conv).reshape(b, -1, p * p * c), raw, rtol=1e-5, atol=1e-5)


def test_mdm_loss_masked_only():
    rng = np.random.default_rng(14)
    b, n, k = 3, 10, 6
    pred = rng.normal(size=(b, n, k)).astype(np.float32)
    target = rng.normal(size=(b, n, k)).astype(np.float32)
    mask = rng.random((b, n)) < 0.5
    mask[0, 0] = True
    loss, m = jax.jit(mdm_loss)(pred, target, mask)
    want = ((pred.astype(np.float64) - target) ** 2).mean(-1)[mask].mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["loss_mdm"], want, rtol=1e-5)
    pred2 = pred.copy()
    pred2[~mask] = 100.0
    np.testing.assert_allclose(jax.jit(mdm_loss)(pred2, target, mask)[0], loss, rtol=1e-6)
    assert jax.jit(mdm_loss)(pred, target, np.zeros((b, n), bool))[0] == 0.0
