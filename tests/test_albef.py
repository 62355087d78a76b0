"""ALBEF in the generic step and loop: EMA teacher, queues, global-batch ITM,
freezing, ITM re-ranking, and the exact resume of a run with all of that state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.eval import retrieval
from mmjax.models import zoo
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import loop, optim
from mmjax.train import step as step_lib
from tiny import albef_config

B = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _family(cfg, **model):
    with cfg.unlocked():
        cfg.model.vocab_size = 40
        cfg.model.image_size = cfg.data.image_size
        cfg.model.text_len = cfg.data.text_len
        for k, v in model.items():
            cfg.model[k] = v
    return zoo.build(cfg.model)


def _batch(seed, b=B, ids=None):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 16, size=b)
    text = rng.integers(6, 40, size=(b, 16))
    pos = np.arange(16)[None]
    text = np.where(pos < lengths[:, None], text, 0)
    text[:, 0] = 2
    text[np.arange(b), lengths - 1] = 3
    return {
        "image": rng.normal(size=(b, 16, 16, 3)).astype(np.float32),
        "text": text.astype(np.int32),
        "id": (np.arange(b) + seed * b if ids is None else ids).astype(np.int32),
    }


def _state(cfg, family):
    opt = optim.make_optimizer(cfg.train)
    return opt, step_lib.init_state(family, opt, jax.random.PRNGKey(0), (1, 16, 16, 3), (1, 16))


def test_ema_follows_closed_form_and_queues_hold_teacher_features(tmp_path):
    """After n steps ema = m^n p0 + sum_k (1-m) m^(n-1-k) p_(k+1), on the recorded
    params; the queue rows hold the teacher features of the samples that were
    written, with a wrap-around (queue 24, batch 16: not a multiple)."""
    cfg = albef_config(tmp_path)
    family = _family(cfg, momentum=0.9)
    opt, state = _state(cfg, family)
    step = jax.jit(step_lib.make_train_step(family, opt))
    enc_img, enc_txt = jax.jit(family.encode_image), jax.jit(family.encode_text)
    recorded = [state.params]
    written_img, written_txt, written_ids = [], [], []
    for i in range(3):
        batch = _batch(i)
        teacher = state.ema_params
        written_img.append(np.asarray(enc_img(teacher, batch["image"])))
        written_txt.append(np.asarray(enc_txt(teacher, batch["text"])))
        written_ids.append(batch["id"])
        state, metrics = step(state, batch)
        assert np.isfinite(metrics["loss"])
        recorded.append(state.params)
    m, n = 0.9, 3
    expect = jax.tree_util.tree_map(lambda p: m**n * p, recorded[0])
    for k in range(n):
        expect = jax.tree_util.tree_map(lambda e, p: e + (1 - m) * m ** (n - 1 - k) * p, expect, recorded[k + 1])
    for a, b in zip(jax.tree_util.tree_leaves(state.ema_params), jax.tree_util.tree_leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The teacher really moved away from the initial params and differs from the student.
    p0, p3 = jax.tree_util.tree_leaves(recorded[0]), jax.tree_util.tree_leaves(state.params)
    e3 = jax.tree_util.tree_leaves(state.ema_params)
    assert not all(np.allclose(a, b) for a, b in zip(p0, e3))
    assert not all(np.allclose(a, b) for a, b in zip(p3, e3))

    # 48 rows were written into 24 slots: the ring buffer by hand.
    ring_img, ring_txt = np.zeros((24, 16), np.float32), np.zeros((24, 16), np.float32)
    ring_ids = np.full(24, -1)
    ptr = 0
    for img, txt, ids in zip(written_img, written_txt, written_ids):
        for r in range(B):
            ring_img[ptr], ring_txt[ptr], ring_ids[ptr] = img[r], txt[r], ids[r]
            ptr = (ptr + 1) % 24
    q = state.queues
    np.testing.assert_array_equal(np.asarray(q["ids"]), ring_ids)
    assert int(q["ptr"]) == ptr == 0
    np.testing.assert_allclose(np.asarray(q["img"]), ring_img, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(q["txt"]), ring_txt, rtol=1e-4, atol=1e-5)


def test_albef_sharded_step_equals_single_device(tmp_path):
    """Hard negatives, queues and distillation are over the global batch: one step on
    an 8-device mesh equals the same step on one device (same rng)."""
    cfg = albef_config(tmp_path)
    family = _family(cfg)
    opt, state0 = _state(cfg, family)
    batch = _batch(7)
    fn = step_lib.make_train_step(family, opt)
    s1, m1 = jax.jit(fn)(state0, batch)
    mesh = mesh_lib.make_mesh({"data": -1})
    rep = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), state0)
    sharded = step_lib.compile_step(fn, rep, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh))
    copy = jax.tree_util.tree_map(jnp.array, state0)
    s8, m8 = sharded(jax.device_put(copy, rep), mesh_lib.global_batch(mesh, batch))
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, err_msg=key)
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s8)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_accumulation_is_refused_for_fusion_families(tmp_path):
    cfg = albef_config(tmp_path)
    family = _family(cfg)
    opt, state = _state(cfg, family)
    with pytest.raises(ValueError, match="accum_steps"):
        jax.jit(step_lib.make_train_step(family, opt, accum_steps=2))(state, _batch(0))


def test_reranked_metrics_against_brute_force():
    """Top-k by ITC re-ordered by the pair score, the rest in ITC order."""
    rng = np.random.default_rng(0)
    n, m, k = 12, 9, 3
    inverse = rng.integers(0, m, size=n)
    inverse[:m] = np.arange(m)  # every caption has an image
    sims = rng.normal(size=(n, m))
    pair_score = rng.normal(size=(n, m))
    got = retrieval.reranked_metrics(sims, inverse, lambda i, c: pair_score[i, c], k, ks=(1, 2, 5))
    for direction in ("i2t", "t2i"):
        s, ps = (sims, pair_score) if direction == "i2t" else (sims.T, pair_score.T)
        hits = {1: [], 2: [], 5: []}
        for r in range(s.shape[0]):
            order = list(np.argsort(-s[r], kind="stable"))
            top = sorted(order[:k], key=lambda c: -ps[r, c])
            ranked = top + order[k:]
            for kk in hits:
                if direction == "i2t":
                    hits[kk].append(inverse[r] in ranked[:kk])
                else:
                    hits[kk].append(any(inverse[j] == r for j in ranked[:kk]))
        for kk in hits:
            assert got[f"{direction}_itm_r@{kk}"] == pytest.approx(np.mean(hits[kk])), (direction, kk)
    # An oracle score lifts every hit within the top k to rank 1.
    oracle = lambda i, c: (inverse[i] == c).astype(float)
    got = retrieval.reranked_metrics(sims, inverse, oracle, k, ks=(1, k))
    assert got["i2t_itm_r@1"] == got[f"i2t_itm_r@{k}"] > 0


def test_albef_run_resumes_exactly(tmp_path, data_dir):
    """A run stopped at 3 and resumed equals the uninterrupted 10-step run in every
    field of the state: params, EMA teacher, queues and pointer, optimizer, rng, and
    the alpha ramp (a function of the step: 4 steps, so the stop falls inside it); the
    eval reports re-ranked recall. (tests/test_faults.py resumes ALBEF through kills.)"""
    run = {"train.steps": 10, "train.ckpt_every": 5}
    full = loop.train(albef_config(data_dir, **run, **{"eval.at_end": True}), str(tmp_path / "full"), progress=False)
    assert 0.0 <= full["i2t_itm_r@1"] <= 1.0 and full["rerank_k"] == 4
    part = str(tmp_path / "part")
    loop.train(albef_config(data_dir, **run, **{"eval.at_end": False}), part, progress=False, stop_at=3)
    resumed = loop.train(albef_config(data_dir, **run, **{"eval.at_end": False}), part, progress=False)
    a, b = full["final_state"], resumed["final_state"]
    assert int(b.step) == 10
    for name in ("params", "ema_params", "queues", "opt_state", "rng"):
        for x, y in zip(jax.tree_util.tree_leaves(getattr(a, name)), jax.tree_util.tree_leaves(getattr(b, name))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(b.queues["ptr"]) == (10 * B) % 24 != 0
