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
from mmjax.parallel import mesh as mesh_lib, sharding as sharding_lib
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
    if hasattr(family, "num_classes"):
        batch["label"] = rng.integers(0, family.num_classes, size=batch_size).astype(np.int32)
    keys = getattr(family, "batch_keys", ("image", "text"))
    return {k: v for k, v in batch.items() if k in keys}


def _prepare(config):
    """(family, optimizer, mesh, trainable mask, init, abstract state, state shardings)
    for the config's last stage, sized from the config alone (no tokenizer, no data)."""
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
    init, abstract, shard = step_lib.state_plan(family, opt, mesh, image_shape, (1, config.data.text_len))
    trainable = optim.trainable_mask(abstract.params, freeze)
    return family, opt, mesh, trainable, init, abstract, shard


def _compiled_step(config, family, opt, mesh, trainable, shard):
    return step_lib.compile_step(
        step_lib.make_train_step(family, opt, accum_steps=int(config.train.accum_steps), trainable=trainable),
        shard, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh), mesh=mesh)


def memory_plan(config) -> dict:
    """Compiles the train step for the configured mesh without running it and reports
    bytes per device: params / optimizer / EMA teacher / queues from the state's
    shardings, and XLA's compiled memory analysis (arguments, outputs, temporaries =
    activations and workspace). Nothing is allocated on the devices."""
    family, opt, mesh, trainable, _, abstract, shard = _prepare(config)
    b = int(config.train.batch_size)
    fn = _compiled_step(config, family, opt, mesh, trainable, shard)
    batch = synthetic_batch(config, family, b)
    bshard = mesh_lib.batch_sharding(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bshard) for k, v in batch.items()}
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
    t0 = time.perf_counter()
    compiled = fn.lower(abstract_state, abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    part = lambda name: sharding_lib.bytes_per_device(getattr(abstract, name), getattr(shard, name)) \
        if getattr(abstract, name) is not None else 0
    out = {"family": str(config.model.family), "mesh": dict(mesh.shape), "batch_size": b,
           "devices": int(mesh.devices.size), "compile_s": compile_s,
           "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params))),
           "param_bytes": part("params"), "opt_bytes": part("opt_state"),
           "ema_bytes": part("ema_params"), "queue_bytes": part("queues")}
    out["state_bytes"] = out["param_bytes"] + out["opt_bytes"] + out["ema_bytes"] + out["queue_bytes"]
    mem = compiled.memory_analysis()
    if mem is not None:
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes"):
            out["xla_" + k.replace("_size_in_bytes", "_bytes")] = int(getattr(mem, k, 0) or 0)
    return out


def format_plan(plan: dict) -> str:
    """A human-readable table of `memory_plan`'s bytes per device."""
    gib = lambda n: f"{n / 2**30:8.3f} GiB"
    rows = [("params", plan["param_bytes"]), ("optimizer state", plan["opt_bytes"]),
            ("EMA teacher", plan["ema_bytes"]), ("feature queues", plan["queue_bytes"]),
            ("state total", plan["state_bytes"])]
    for k, label in (("xla_temp_bytes", "activations + workspace (XLA temp)"),
                     ("xla_argument_bytes", "step inputs (XLA arguments)"),
                     ("xla_output_bytes", "step outputs (XLA outputs)"),
                     ("xla_alias_bytes", "outputs reusing donated inputs")):
        if k in plan:
            rows.append((label, plan[k]))
    head = (f"{plan['family']}: {plan['params']:,} params, mesh {plan['mesh']}, global batch "
            f"{plan['batch_size']}, per device:")
    return "\n".join([head] + [f"  {label:<36}{gib(n)}" for label, n in rows])


def step_time(config, steps: int = 20, warmup: int = 3) -> dict:
    """Compiles the config's step and times `steps` calls after `warmup`."""
    family, opt, mesh, trainable, init, abstract, shard = _prepare(config)
    tc = config.train
    state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
    fn = _compiled_step(config, family, opt, mesh, trainable, shard)
    # Every process makes the same global batch and hands over its own rows.
    full, n, i = synthetic_batch(config, family, int(tc.batch_size)), jax.process_count(), jax.process_index()
    rows = int(tc.batch_size) // n
    batch = mesh_lib.global_batch(mesh, {k: v[i * rows:(i + 1) * rows] for k, v in full.items()})
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
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform, "loss": float(m["loss"])}
