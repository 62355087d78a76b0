"""Contrastive losses: numpy references, clamp, and 8-device equivalence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.objectives import itc_loss, sigmoid_loss

N_DEV = 8


def _unit(rng, b, d):
    x = rng.normal(size=(b, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]


def np_itc(img, txt, log_scale, max_scale=100.0):
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    s = min(np.exp(log_scale), max_scale)
    logits = s * img @ txt.T
    idx = np.arange(len(img))
    i2t = _logsumexp(logits) - logits[idx, idx]
    t2i = _logsumexp(logits.T) - logits[idx, idx]
    return 0.5 * (i2t.mean() + t2i.mean())


def np_sigmoid(img, txt, log_scale, bias):
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    logits = np.exp(log_scale) * img @ txt.T + bias
    z = 2 * np.eye(len(img)) - 1
    return np.mean(np.sum(np.log1p(np.exp(-z * logits)), axis=1))


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(0)
    return _unit(rng, 16, 32), _unit(rng, 16, 32)


@pytest.mark.parametrize("log_scale", [np.log(1 / 0.07), 2.0, 0.0])
def test_itc_matches_numpy(embeddings, log_scale):
    img, txt = embeddings
    loss, metrics = jax.jit(itc_loss)(img, txt, log_scale)
    np.testing.assert_allclose(loss, np_itc(img, txt, log_scale), rtol=1e-5)
    assert set(metrics) >= {"loss", "logit_scale", "i2t_acc", "t2i_acc"}


@pytest.mark.parametrize("log_scale,bias", [(np.log(10.0), -10.0), (1.0, 0.5)])
def test_sigmoid_matches_numpy(embeddings, log_scale, bias):
    img, txt = embeddings
    loss, metrics = jax.jit(sigmoid_loss)(img, txt, log_scale, bias)
    np.testing.assert_allclose(loss, np_sigmoid(img, txt, log_scale, bias), rtol=1e-5)
    assert set(metrics) >= {"loss", "logit_scale", "logit_bias", "i2t_acc"}


def test_accuracy_perfect_and_zero():
    eye = np.eye(8, dtype=np.float32)
    _, m = itc_loss(eye, eye, 2.0)
    assert m["i2t_acc"] == 1.0 and m["t2i_acc"] == 1.0
    _, m = itc_loss(eye, np.roll(eye, 1, axis=0), 2.0)
    assert m["i2t_acc"] == 0.0 and m["t2i_acc"] == 0.0


def test_scale_clamp_and_gradient(embeddings):
    """The scale is used as it is (the families project t after each update, issue
    14.1): trainable on both sides of 100. An explicit max_scale still clips the
    forward value, with zero gradient beyond it."""
    img, txt = embeddings
    grad_t = jax.grad(lambda t: itc_loss(img, txt, t)[0])
    assert abs(grad_t(jnp.log(50.0))) > 1e-6  # trainable
    assert abs(grad_t(jnp.log(200.0))) > 1e-6  # also past 100: no clamp in the forward
    _, m = itc_loss(img, txt, jnp.log(200.0))
    np.testing.assert_allclose(m["logit_scale"], 200.0, rtol=1e-6)
    assert jax.grad(lambda t: itc_loss(img, txt, t, max_scale=100.0)[0])(jnp.log(200.0)) == 0.0
    _, m = itc_loss(img, txt, jnp.log(200.0), max_scale=100.0)
    np.testing.assert_allclose(m["logit_scale"], 100.0, rtol=1e-6)
    g_sig = jax.grad(lambda t, b: sigmoid_loss(img, txt, t, b)[0], argnums=(0, 1))
    assert all(abs(g) > 1e-6 for g in g_sig(jnp.log(10.0), -10.0))


def _mesh():
    return jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


LOSSES = {
    "itc": lambda img, txt, gather=lambda x: x: itc_loss(img, txt, 2.5, gather=gather)[0],
    "sigmoid": lambda img, txt, gather=lambda x: x: sigmoid_loss(img, txt, 1.5, -2.0, gather=gather)[0],
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sharded_jit_equals_single_device(embeddings, name):
    fn = LOSSES[name]
    img, txt = embeddings
    want = fn(img, txt)
    want_grad = jax.grad(fn, argnums=(0, 1))(img, txt)
    sharding = NamedSharding(_mesh(), P("data"))
    img_s, txt_s = jax.device_put(img, sharding), jax.device_put(txt, sharding)
    got = jax.jit(fn)(img_s, txt_s)
    got_grad = jax.jit(jax.grad(fn, argnums=(0, 1)))(img_s, txt_s)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grad, want_grad):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_pmap_all_gather_equals_single_device(embeddings, name):
    fn = LOSSES[name]
    img, txt = embeddings
    want = fn(img, txt)
    want_grad = jax.grad(fn, argnums=(0, 1))(img, txt)
    gather = lambda x: jax.lax.all_gather(x, "data", tiled=True)

    def per_device(i, t):
        loss, grads = jax.value_and_grad(functools.partial(fn, gather=gather), argnums=(0, 1))(i, t)
        # all_gather transposes to a sum over devices: each device's embedding
        # gradient is N x its share of d(global)/d(local); pmean-style scaling.
        return jax.lax.pmean(loss, "data"), jax.tree.map(lambda g: g / N_DEV, grads)

    split = lambda x: x.reshape(N_DEV, -1, x.shape[-1])
    loss, grads = jax.pmap(per_device, axis_name="data")(split(img), split(txt))
    np.testing.assert_allclose(loss, np.full(N_DEV, want), rtol=1e-5)
    for g, w in zip(grads, want_grad):
        np.testing.assert_allclose(g.reshape(w.shape), w, rtol=1e-4, atol=1e-6)


def test_hard_negatives_match_numpy():
    """NegCLIP, neg_scope='own': each image's K swapped-attribute captions join its i2t
    candidates (softmax) or add z=-1 terms (sigmoid); checked against a loop in numpy."""
    rng = np.random.default_rng(3)
    b, k, d = 8, 3, 16
    img, txt = _unit(rng, b, d), _unit(rng, b, d)
    neg = _unit(rng, b * k, d).reshape(b, k, d)
    log_scale, bias = 1.5, -0.5
    s = np.exp(log_scale)
    i2t, t2i = [], []
    for i in range(b):
        cand = np.concatenate([s * img[i] @ txt.T, s * neg[i] @ img[i]]).astype(np.float64)
        i2t.append(_logsumexp(cand[None])[0] - cand[i])
        col = (s * txt[i] @ img.T).astype(np.float64)
        t2i.append(_logsumexp(col[None])[0] - col[i])
    want = 0.5 * (np.mean(i2t) + np.mean(t2i))
    own = functools.partial(itc_loss, neg_scope="own")  # each image's own K (the batch-wide rule: test_audit_models)
    got, _ = jax.jit(own)(img, txt, log_scale, txt_neg=neg)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got > jax.jit(itc_loss)(img, txt, log_scale)[0]  # more negatives, more loss

    hard = s * np.einsum("bd,bkd->bk", img, neg) + bias
    want_sig = np_sigmoid(img, txt, log_scale, bias) + np.mean(np.sum(np.log1p(np.exp(hard)), axis=1))
    got_sig, _ = jax.jit(functools.partial(sigmoid_loss, neg_scope="own"))(img, txt, log_scale, bias, txt_neg=neg)
    np.testing.assert_allclose(got_sig, want_sig, rtol=1e-5)
