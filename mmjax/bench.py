"""Step-time benchmark: synthetic batches (no TensorFlow) or the real input pipeline.

    mmjax bench --config configs/demo.py --config configs/albef.py [--steps 20]
    mmjax bench --config configs/clip_b16.py --batch-size 256 --data pipeline

Each config's train step (its last stage, i.e. the full objective) is compiled on
the configured mesh and timed on one fixed random batch; the first config is the
reference of the `ratio` column. Runs where TensorFlow is not installed (accelerator
images), since the vocabulary size comes from `data.tokenizer.vocab_size`.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from mmjax import config as config_lib
from mmjax import flops as flops_lib
from mmjax.bench_device import decode_speed, matmul_ceiling, peak_memory_bytes  # noqa: F401 (bench.decode_speed)
from mmjax.models import zoo
from mmjax.parallel import mesh as mesh_lib
from mmjax.parallel import sharding as sharding_lib
from mmjax.train import optim
from mmjax.train import step as step_lib


def synthetic_batch(config, family, batch_size: int, seed: int = 0) -> dict:
    """A random batch with the fields the family reads: valid token layout
    (bos, words, eos, pad), unique ids."""
    rng = np.random.default_rng(seed)
    length = int(config.data.text_len)
    vocab = int(config.model.vocab_size)
    lengths = rng.integers(min(4, length), length + 1, size=batch_size)
    text = rng.integers(6, vocab, size=(batch_size, length))
    pos = np.arange(length)[None]
    text = np.where(pos < lengths[:, None], text, 0)
    text[:, 0] = 2
    text[np.arange(batch_size), lengths - 1] = 3
    batch = {
        "image": rng.normal(size=family.image_shape(batch_size)).astype(np.float32),
        "text": text.astype(np.int32),
        "id": np.arange(batch_size, dtype=np.int32),
    }
    if family.can("classify"):
        batch["label"] = rng.integers(0, family.num_classes, size=batch_size).astype(np.int32)
    for m in getattr(family, "modalities", ()):  # ImageBind / Meta-Transformer: audio, depth, signals
        shape = family.input_shape(m, batch_size)
        batch[m] = (rng.normal(size=shape) * (0.1 if m == "audio" else 1.0)).astype(np.float32)
        batch[f"{m}_len"] = np.full([batch_size], shape[1], np.int32)
    if "image_slots" in family.batch_keys:  # a conversation batch (LM connectors): the image after bos
        t = int(family.image_tokens)
        batch["tokens"] = text.astype(np.int32)
        batch["image_slots"] = (pos >= 1) & (pos < 1 + t) & np.ones((batch_size, 1), bool)
        batch["valid"] = pos < np.maximum(lengths, t + 2)[:, None]
        batch["prefix"] = pos < (t + 1)
        batch["prefix"] = np.broadcast_to(batch["prefix"], (batch_size, length)).copy()
        batch["loss_mask"] = batch["valid"] & ~batch["prefix"]
    return {k: v for k, v in batch.items() if k in family.batch_keys}


def _prepare(config):
    """(family, optimizer, mesh, trainable mask, init, abstract state, state shardings)
    for the config's last stage, sized from the config alone (no tokenizer, no data)."""
    config_lib.derive_model_keys(config, int(config.data.tokenizer.vocab_size))
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
    image_shape = family.image_shape()
    init, abstract, shard = step_lib.state_plan(family, opt, mesh, image_shape, (1, config.data.text_len))
    trainable = optim.trainable_mask(abstract.params, freeze)
    return family, opt, mesh, trainable, init, abstract, shard


def _compiled_step(config, family, opt, mesh, trainable, shard):
    return step_lib.compile_step(
        step_lib.make_train_step(family, opt, accum_steps=int(config.train.accum_steps), trainable=trainable),
        shard,
        mesh_lib.batch_sharding(mesh),
        mesh_lib.replicated(mesh),
        mesh=mesh,
    )


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
    part = lambda name: (
        sharding_lib.bytes_per_device(getattr(abstract, name), getattr(shard, name))
        if getattr(abstract, name) is not None
        else 0
    )
    out = {
        "family": str(config.model.family),
        "mesh": dict(mesh.shape),
        "batch_size": b,
        "devices": int(mesh.devices.size),
        "compile_s": compile_s,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params))),
        "param_bytes": part("params"),
        "opt_bytes": part("opt_state"),
        "ema_bytes": part("ema_params"),
        "queue_bytes": part("queues"),
    }
    out["state_bytes"] = out["param_bytes"] + out["opt_bytes"] + out["ema_bytes"] + out["queue_bytes"]
    mem = compiled.memory_analysis()
    if mem is not None:
        for k in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            out["xla_" + k.replace("_size_in_bytes", "_bytes")] = int(getattr(mem, k, 0) or 0)
    return out


def step_bytes(plan: dict) -> int:
    """Device bytes the compiled step needs at its peak, from XLA's memory analysis:
    inputs + outputs not aliased to donated inputs + temporaries."""
    return (
        plan.get("xla_argument_bytes", 0)
        + plan.get("xla_output_bytes", 0)
        - plan.get("xla_alias_bytes", 0)
        + plan.get("xla_temp_bytes", 0)
    )


def max_batch(config, limit_bytes: int | None = None, multiple: int = 8, upper: int = 1 << 16) -> dict:
    """The largest global batch (a multiple of `multiple`) whose compiled train step
    fits `limit_bytes` per device (default: the first device's memory limit), by
    compiling, not running: doubling, then bisection. -> {'batch_size', 'bytes',
    'next_bytes' (of batch_size + multiple), 'limit_bytes', 'probes'}."""
    if limit_bytes is None:
        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            raise ValueError("this device reports no memory limit; pass limit_bytes (--memory-limit-gib)")
        limit_bytes = int(stats["bytes_limit"])
    seen = {}

    def need(b):
        if b not in seen:
            c = config.copy_and_resolve_references()
            with c.unlocked():
                c.train.batch_size = int(b)
            seen[b] = step_bytes(memory_plan(c))
        return seen[b]

    lo, hi = 0, multiple
    while hi <= upper and need(hi) <= limit_bytes:
        lo, hi = hi, hi * 2
    hi = min(hi, upper + multiple)
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        lo, hi = (mid, hi) if need(mid) <= limit_bytes else (lo, mid)
    if lo == 0:
        raise ValueError(f"batch {multiple} needs {need(multiple):,} bytes, over the limit {limit_bytes:,}")
    return {
        "batch_size": lo,
        "bytes": need(lo),
        "next_bytes": need(lo + multiple),
        "limit_bytes": int(limit_bytes),
        "probes": len(seen),
    }


def format_plan(plan: dict) -> str:
    """A human-readable table of `memory_plan`'s bytes per device."""
    gib = lambda n: f"{n / 2**30:8.3f} GiB"
    rows = [
        ("params", plan["param_bytes"]),
        ("optimizer state", plan["opt_bytes"]),
        ("EMA teacher", plan["ema_bytes"]),
        ("feature queues", plan["queue_bytes"]),
        ("state total", plan["state_bytes"]),
    ]
    for k, label in (
        ("xla_temp_bytes", "activations + workspace (XLA temp)"),
        ("xla_argument_bytes", "step inputs (XLA arguments)"),
        ("xla_output_bytes", "step outputs (XLA outputs)"),
        ("xla_alias_bytes", "outputs reusing donated inputs"),
    ):
        if k in plan:
            rows.append((label, plan[k]))
    head = (
        f"{plan['family']}: {plan['params']:,} params, mesh {plan['mesh']}, global batch "
        f"{plan['batch_size']}, per device:"
    )
    return "\n".join([head] + [f"  {label:<36}{gib(n)}" for label, n in rows])


def _time_steps(fn, state, next_batch, steps: int, warmup: int):
    """(state, metrics, compile seconds, seconds per step, seconds waiting for data per step)."""
    t0 = time.perf_counter()
    state, m = fn(state, next_batch())
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = fn(state, next_batch())
    jax.block_until_ready(m)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - tw
        state, m = fn(state, batch)
    jax.block_until_ready(m)
    return state, m, compile_s, (time.perf_counter() - t0) / steps, wait / steps


def _pipeline_tokenizer(config):
    """The tokenizer a run would train on the config's data (in a scratch dir)."""
    import tempfile

    from mmjax.data import pipeline
    from mmjax.data import tokenizer as tok_lib

    data = config.data
    return tok_lib.get_tokenizer(
        data.tokenizer, tempfile.mkdtemp(prefix="mmjax-bench-"), lambda: pipeline.captions(data, data.train_split)
    )


def _pipeline_batches(config, mesh, family, tok):
    """Batches from the real input pipeline (TensorFlow; a built-in set is prepared
    first), this process's rows of each global batch, as global arrays."""
    from mmjax.data import pipeline

    n = jax.process_count()
    it = pipeline.make_train_iterator(
        config.data,
        tok,
        int(config.train.batch_size) // n,
        seed=0,
        process_index=jax.process_index(),
        process_count=n,
        hard_negatives=int(config.model.get("hard_negatives", 0) or 0),
    )

    def next_batch():
        b = next(it)
        b = {k: (np.asarray(v).astype(np.int32) if k == "id" else v) for k, v in b.items() if k in family.batch_keys}
        return mesh_lib.global_batch(mesh, b)

    return next_batch


def _teacher_cost(family, state, batch_size: int, steps: int, step_s: float) -> dict:
    """Time of the EMA teacher update and the queue write of one step, run alone on
    the same (sharded) state: an upper bound of their share of the step, where XLA
    fuses them with the optimizer update."""
    from mmjax.objectives import enqueue

    def ema_and_queues(state, img, txt, ids):
        ema = family.teacher_update(state.ema_params, state.params, state.step)
        return ema, enqueue(state.queues, img, txt, ids) if state.queues is not None else None

    fn = jax.jit(ema_and_queues)
    e = family.embed_dim
    rng = np.random.default_rng(0)
    img, txt = (rng.normal(size=(batch_size, e)).astype(np.float32) for _ in range(2))
    ids = np.arange(batch_size, dtype=np.int32)
    jax.block_until_ready(fn(state, img, txt, ids))
    t0 = time.perf_counter()
    for _ in range(steps):
        r = fn(state, img, txt, ids)
    jax.block_until_ready(r)
    ms = 1000 * (time.perf_counter() - t0) / steps
    return {"ema_queue_ms": ms, "ema_queue_fraction": ms / (1000 * step_s)}


def step_time(config, steps: int = 20, warmup: int = 3, data: str = "synthetic", ceiling: bool = True) -> dict:
    """Compiles the config's step and times `steps` calls after `warmup` on one fixed
    synthetic batch; with data='pipeline' it then times the same step fed by the real
    input pipeline (`pipeline_*` keys, and their ratio to the synthetic figure).

    Reports compile time, step time, samples/s (per device), the family's analytic
    model FLOPs (`Family.flops`) as TFLOP/s per device, MFU against the matmul ceiling
    measured in the same process (`matmul_ceiling`), and peak device memory; for
    families with an EMA teacher, the teacher update + queue write timed alone
    (`ema_queue_ms`, `ema_queue_fraction` of the step). A family without a FLOP
    formula is an error (before anything compiles).
    """
    if data not in ("synthetic", "pipeline"):
        raise ValueError(f"bench data {data!r}; valid choices: synthetic, pipeline")
    if data == "pipeline":  # the family's vocabulary is the trained tokenizer's
        tok = _pipeline_tokenizer(config)
        with config.unlocked():
            config.data.tokenizer.vocab_size = int(tok.vocab_size)
    family, opt, mesh, trainable, init, abstract, shard = _prepare(config)
    tc = config.train
    step_flops = flops_lib.train_step_flops(family, int(tc.batch_size))
    state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
    fn = _compiled_step(config, family, opt, mesh, trainable, shard)
    # Every process makes the same global batch and hands over its own rows.
    full, n, i = synthetic_batch(config, family, int(tc.batch_size)), jax.process_count(), jax.process_index()
    rows = int(tc.batch_size) // n
    batch = mesh_lib.global_batch(mesh, {k: v[i * rows : (i + 1) * rows] for k, v in full.items()})
    state, m, compile_s, dt, _ = _time_steps(fn, state, lambda: batch, steps, warmup)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.params))
    n_dev = int(mesh.devices.size)
    out = {
        "family": str(config.model.family),
        "batch_size": int(tc.batch_size),
        "ms_per_step": 1000 * dt,
        "samples_per_s": int(tc.batch_size) / dt,
        "samples_per_s_per_device": int(tc.batch_size) / dt / n_dev,
        "compile_s": compile_s,
        "params": n_params,
        "devices": n_dev,
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "loss": float(m["loss"]),
    }
    out["gflops_per_sample"] = step_flops / int(tc.batch_size) / 1e9
    out["model_tflops_per_device"] = step_flops / dt / n_dev / 1e12
    if ceiling:
        out.update(matmul_ceiling())
        out["mfu"] = out["model_tflops_per_device"] / out["matmul_tflops"]
    if family.can("teacher"):
        out.update(_teacher_cost(family, state, int(tc.batch_size), steps, dt))
    if data == "pipeline":
        next_batch = _pipeline_batches(config, mesh, family, tok)
        state, m, _, pdt, wait = _time_steps(fn, state, next_batch, steps, warmup)
        out.update(
            {
                "pipeline_ms_per_step": 1000 * pdt,
                "pipeline_samples_per_s": int(tc.batch_size) / pdt,
                "pipeline_wait_ms_per_step": 1000 * wait,
                "pipeline_vs_synthetic": dt / pdt,
            }
        )
    out["peak_memory_bytes"] = peak_memory_bytes()
    return out
