"""Step-time benchmark on synthetic batches: no data pipeline, no TensorFlow.

    mmjax bench --config configs/demo.py --config configs/albef.py [--steps 20]

Each config's train step (its last stage, i.e. the full objective) is compiled on
the configured mesh and timed on one fixed random batch; the first config is the
reference of the `ratio` column. Runs where TensorFlow is not installed (accelerator
images), since the vocabulary size comes from `data.tokenizer.vocab_size`.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from mmjax.models import zoo
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import optim, step as step_lib


def synthetic_batch(config, family, batch_size: int, seed: int = 0) -> dict:
    """A random batch with the fields the family reads: valid token layout
    (bos, words, eos, pad), unique ids."""
    rng = np.random.default_rng(seed)
    s, length = int(config.data.image_size), int(config.data.text_len)
    vocab = int(config.model.vocab_size)
    lengths = rng.integers(min(4, length), length + 1, size=batch_size)
    text = rng.integers(6, vocab, size=(batch_size, length))
    pos = np.arange(length)[None]
    text = np.where(pos < lengths[:, None], text, 0)
    text[:, 0] = 2
    text[np.arange(batch_size), lengths - 1] = 3
    batch = {"image": rng.normal(size=(batch_size, s, s, 3)).astype(np.float32),
             "text": text.astype(np.int32), "id": np.arange(batch_size, dtype=np.int32)}
    keys = getattr(family, "batch_keys", ("image", "text"))
    return {k: v for k, v in batch.items() if k in keys}


def step_time(config, steps: int = 20, warmup: int = 3) -> dict:
    """Compiles the config's step and times `steps` calls after `warmup`."""
    with config.unlocked():
        config.model.vocab_size = int(config.data.tokenizer.vocab_size)
        config.model.image_size = int(config.data.image_size)
        config.model.text_len = int(config.data.text_len)
        config.model.total_steps = int(config.train.steps)
    tc = config.train
    stages = tc.get("stages", None)
    model_cfg = config.model
    freeze = tc.get("freeze", None) or ()
    if stages:
        last = dict(stages[-1])
        if last.get("tasks"):
            model_cfg = model_cfg.copy_and_resolve_references()
            with model_cfg.unlocked():
                model_cfg.tasks = tuple(last["tasks"])
        freeze = last.get("freeze", None) or freeze
    family = zoo.build(model_cfg)
    mesh = mesh_lib.make_mesh(config.parallel.get("mesh"))
    opt = optim.make_optimizer(tc)
    image_shape = (1, config.data.image_size, config.data.image_size, 3)
    init = lambda r: step_lib.init_state(family, opt, r, image_shape, (1, config.data.text_len))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shard = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), abstract)
    state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
    fn = step_lib.compile_step(
        step_lib.make_train_step(family, opt, accum_steps=int(tc.accum_steps),
                                 trainable=optim.trainable_mask(abstract.params, freeze)),
        shard, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh))
    batch = mesh_lib.global_batch(mesh, synthetic_batch(config, family, int(tc.batch_size)))
    t0 = time.perf_counter()
    state, m = fn(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = fn(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = fn(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.params))
    return {"family": str(config.model.family), "batch_size": int(tc.batch_size),
            "ms_per_step": 1000 * dt, "samples_per_s": int(tc.batch_size) / dt,
            "samples_per_s_per_device": int(tc.batch_size) / dt / mesh.devices.size,
            "compile_s": compile_s, "params": n_params, "devices": int(mesh.devices.size),
            "platform": jax.devices()[0].platform, "loss": float(m["loss"])}
