"""The step and the loop: accumulation, sharding, learning, exact resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import zoo
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import loop, optim
from mmjax.train import step as step_lib
from tiny import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _random_batch(rng, b, cfg):
    k1, k2, k3 = jax.random.split(rng, 3)
    image = jax.random.normal(k1, (b, cfg.data.image_size, cfg.data.image_size, 3))
    lengths = jax.random.randint(k2, (b,), 3, cfg.data.text_len)
    tokens = jax.random.randint(k3, (b, cfg.data.text_len), 6, 40)
    pos = jnp.arange(cfg.data.text_len)[None, :]
    text = jnp.where(pos < lengths[:, None], tokens, 0)
    text = text.at[:, 0].set(2)
    text = jnp.where(pos == lengths[:, None] - 1, 3, text)
    return {"image": image, "text": text.astype(jnp.int32)}


def _family(cfg):
    with cfg.unlocked():
        cfg.model.vocab_size = 40
        cfg.model.image_size = cfg.data.image_size
        cfg.model.text_len = cfg.data.text_len
    return zoo.build(cfg.model)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_gradcache_accumulation_equals_full_batch(tmp_path, loss):
    """Accumulating over 4 micro-batches gives the full-batch contrastive gradient
    (a naive per-micro-batch loss would not: it sees fewer negatives)."""
    cfg = tiny_config(tmp_path, **{"model.loss": loss})
    family = _family(cfg)
    params = family.init_params(jax.random.PRNGKey(0), (1, 16, 16, 3), (1, 16))
    batch = _random_batch(jax.random.PRNGKey(1), 16, cfg)
    if loss == "softmax":  # NegCLIP hard negatives ride along through both passes
        negs = _random_batch(jax.random.PRNGKey(5), 32, cfg)["text"]
        batch["hard_negatives"] = negs.reshape(16, 2, -1)
    rng = jax.random.PRNGKey(2)
    grads = jax.jit(lambda p, b, a: step_lib.loss_and_grads(family, p, b, rng, accum_steps=a), static_argnums=2)
    (l1, _, _), g1 = grads(params, batch, 1)
    (l4, _, _), g4 = grads(params, batch, 4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g4)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=5e-6)
    # The naive alternative really differs, so the test can tell them apart
    # (with SigLIP's init bias of -10 the negatives barely count, so use 0 there).
    if loss == "sigmoid":
        params = {**params, "b": jnp.zeros_like(params["b"])}

    @jax.jit
    def full_and_naive(p):
        micro = step_lib._split_micro(batch, 4)
        naive = jnp.mean(
            jnp.stack([family.objective(p, jax.tree_util.tree_map(lambda x: x[j], micro), rng)[0] for j in range(4)])
        )
        return family.objective(p, batch, rng)[0], naive

    full, naive = full_and_naive(params)
    assert not np.allclose(naive, full, rtol=1e-3)


def test_sharded_step_equals_single_device(tmp_path):
    """One step jitted over an 8-device data mesh == the same step on one device."""
    cfg = tiny_config(tmp_path)
    family = _family(cfg)
    opt = optim.make_optimizer(cfg.train)
    state0 = step_lib.init_state(family, opt, jax.random.PRNGKey(0), (1, 16, 16, 3), (1, 16))
    batch = _random_batch(jax.random.PRNGKey(1), 16, cfg)
    fn = step_lib.make_train_step(family, opt)
    s1, m1 = jax.jit(fn)(state0, batch)
    mesh = mesh_lib.make_mesh({"data": -1})
    assert mesh.devices.size == 8
    rep = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), state0)
    sharded = step_lib.compile_step(fn, rep, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh))
    state_copy = jax.tree_util.tree_map(jnp.array, state0)  # donated below
    s8, m8 = sharded(jax.device_put(state_copy, rep), mesh_lib.global_batch(mesh, jax.device_get(batch)))
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s8.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_train_lowers_loss_and_resume_is_exact(tmp_path, data_dir):
    """30 steps on 8 fake devices lower the loss; stopping at 15 and resuming ends
    with the params of the uninterrupted run (same data, rng, optimizer state)."""
    assert jax.device_count() == 8
    full = loop.train(tiny_config(data_dir), str(tmp_path / "full"), progress=False)
    losses = _losses(tmp_path / "full")
    assert losses[-1] < losses[0]
    assert 0.0 <= full["i2t_r@1"] <= 1.0 and full["num_images"] == 64

    part_dir = str(tmp_path / "part")
    first = loop.train(tiny_config(data_dir), part_dir, progress=False, stop_at=15)
    assert int(first["final_state"].step) == 15
    resumed = loop.train(tiny_config(data_dir), part_dir, progress=False)
    assert int(resumed["final_state"].step) == 30
    for a, b in zip(
        jax.tree_util.tree_leaves(full["final_state"].params), jax.tree_util.tree_leaves(resumed["final_state"].params)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The second half really trained (so equality above is not vacuous).
    leaves = zip(
        jax.tree_util.tree_leaves(first["final_state"].params), jax.tree_util.tree_leaves(resumed["final_state"].params)
    )
    assert not all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in leaves)
    # The plot and metrics the run promises are there.
    assert os.path.isfile(tmp_path / "full" / "curves.png")
    assert os.path.isdir(tmp_path / "full" / "tb")


def test_freeze_keeps_params_fixed_and_rejects_unknown_patterns(tmp_path):
    """train.freeze: matching params get neither gradient nor weight decay; the rest
    train; a pattern matching nothing is an error (a typo would train everything)."""
    cfg = tiny_config(tmp_path, **{"train.weight_decay": 0.5})
    family = _family(cfg)
    opt = optim.make_optimizer(cfg.train)
    state = step_lib.init_state(family, opt, jax.random.PRNGKey(0), (1, 16, 16, 3), (1, 16))
    trainable = optim.trainable_mask(state.params, ["^image_tower/"])
    step = jax.jit(step_lib.make_train_step(family, opt, trainable=trainable))
    new, _ = step(state, _random_batch(jax.random.PRNGKey(1), 16, cfg))
    new, _ = step(new, _random_batch(jax.random.PRNGKey(2), 16, cfg))
    before = dict(jax.tree_util.tree_flatten_with_path(state.params)[0])
    after = dict(jax.tree_util.tree_flatten_with_path(new.params)[0])
    frozen = [p for p in before if optim.param_path(p).startswith("image_tower/")]
    assert frozen and len(frozen) < len(before)
    for p in before:
        same = np.array_equal(np.asarray(before[p]), np.asarray(after[p]))
        assert same == (p in frozen) or (p not in frozen and not before[p].ndim), optim.param_path(p)
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.trainable_mask(state.params, ["^no_such_tower/"])


def test_resume_is_exact_past_dropped_records(tmp_path):
    """A file list with undecodable images among the good ones: a run stopped at step 4
    and resumed ends with the uninterrupted run's params, bit for bit, and logs the same
    skipped_records at every step (the count belongs to the step's own batch and is
    kept in the checkpoint, so it does not restart at the resume)."""
    from PIL import Image

    rows = ["image_path,caption"]
    rng = np.random.default_rng(0)
    for i in range(48):
        if i % 7 == 3:
            (tmp_path / f"{i}.png").write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {['red', 'green', 'blue'][i % 3]} square")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    kv = {
        "data.name": "files",
        "data.path": str(tmp_path / "list.csv"),
        "data.cache_decoded": False,
        "data.text_len": 8,
        "data.tokenizer.vocab_size": 30,
        "model.embed_dim": 16,
        "train.batch_size": 8,
        "train.steps": 10,
        "train.log_every": 1,
        "train.ckpt_every": 0,
        "eval.at_end": False,
    }
    full = loop.train(tiny_config(tmp_path, **kv), str(tmp_path / "full"), progress=False)
    part = str(tmp_path / "part")
    loop.train(tiny_config(tmp_path, **kv), part, progress=False, stop_at=4)
    resumed = loop.train(tiny_config(tmp_path, **kv), part, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(full["final_state"]), jax.tree_util.tree_leaves(resumed["final_state"])):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    skipped = lambda w: [(r["step"], r.get("skipped_records", 0)) for r in _rows(w) if r["kind"] == "train"]
    assert skipped(part) == skipped(tmp_path / "full")
    assert skipped(part)[3][1] > 0  # records were dropped before the resume point


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]
