"""The training loop: batches -> step -> metrics, progress, checkpoints, evals."""

from __future__ import annotations

import logging
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from mmjax import checkpoint as ckpt_lib
from mmjax import workdir as workdir_lib
from mmjax.parallel import distributed
from mmjax.parallel import mesh as mesh_lib
from mmjax.parallel.collective import PmapCollective, identity
from mmjax.train import guard
from mmjax.train import metrics as metrics_lib
from mmjax.train import step as step_lib
from mmjax.train.setup import Setup


def _format(metrics: dict, keys) -> str:
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)


def _restore_for_training(setup: Setup, config, workdir: str):
    """(state, meta) of the newest usable checkpoint, or None. A checkpoint of another
    model shape is one error naming the config keys that changed since it was saved."""
    try:
        return setup.restore(require=("data_position",), quarantine=True)
    except (ckpt_lib.StateMismatch, ckpt_lib.CheckpointError) as e:
        old = os.path.join(workdir, "config.json")
        diff = workdir_lib.config_diff(workdir_lib.load_config_json(workdir), config) if os.path.isfile(old) else []
        if not diff:
            raise
        if isinstance(e, ckpt_lib.StateMismatch):
            raise ValueError(
                f"cannot resume {workdir}: the workdir's config differs from this run's in keys: "
                f"{', '.join(diff)}; use another --workdir, or the workdir's values ({e})"
            ) from None
        raise ckpt_lib.CheckpointError(
            f"{e} (the workdir's config also differs from this run's in keys: {', '.join(diff)})"
        ) from None


def _open_run(config, workdir: str):
    """(setup, state, meta) of a new or resumed run: the workdir checked, the newest
    usable checkpoint restored (or a fresh state), config.json written, partial saves
    of a dead run removed."""
    workdir_lib.check_workdir(workdir)
    setup = Setup(config, workdir)
    restored = _restore_for_training(setup, config, workdir)
    workdir_lib.save_config_json(config, workdir)
    setup.checkpointer.remove_partial_saves()
    if restored is None:
        return setup, setup.fresh_state(), {"data_position": 0}
    state, meta = restored
    logging.info("resuming at step %d (data position %d)", setup.checkpointer.restored_step, meta["data_position"])
    return setup, state, meta


def _train_row(m, *, pmap: bool, samples: int, seconds: float, n_devices: int, bad_steps: int, skipped) -> dict:
    """The metrics row of a logged step (host values)."""
    m = mesh_lib.unreplicate_metrics(m) if pmap else jax.device_get(m)
    m["samples_per_s"] = samples / max(seconds, 1e-9)
    m["samples_per_s_per_device"] = m["samples_per_s"] / n_devices
    m["bad_steps"] = bad_steps
    if skipped:
        m["skipped_records"] = skipped  # up to and including this step's batch
    return m


def _leave_preempted(setup: Setup, writer, step: int):
    """After SIGTERM's checkpoint of `step`: waits for it, says so, raises Preempted."""
    setup.checkpointer.close()
    writer.close()
    msg = f"mmjax: preempted: saved step {step}; exiting with code {guard.PREEMPTED_EXIT} (run again to resume)"
    logging.warning(msg)
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
    raise guard.Preempted(step)


def _save_checkpoint(setup: Setup, step: int, state, meta: dict) -> None:
    """Saves unless some value of the state is not finite (then NonFiniteError)."""
    state = setup.to_checkpoint_layout(state)
    if not bool(jax.jit(step_lib.all_finite)((state.params, state.opt_state, state.ema_params, state.queues))):
        raise guard.NonFiniteError(
            f"step {step}: the state holds non-finite values; not saved (the last "
            f"checkpoint is step {setup.checkpointer.latest_step()})"
        )
    setup.checkpointer.save(step, state, meta)


def train(config, workdir: str, *, progress: bool = True, stop_at: int | None = None) -> dict:
    """Trains (or resumes) in `workdir`; returns the final eval metrics.

    `stop_at`: leave after that many steps with a checkpoint, as a preempted job
    would (the schedule still runs to `train.steps`); a later call resumes.
    SIGTERM: the current step finishes, a checkpoint is saved and `guard.Preempted`
    (SystemExit 143) is raised. `guard.NonFiniteError` after train.max_bad_steps
    non-finite steps in a row; `checkpoint.SaveError` when a save fails.
    """
    from mmjax.data import pipeline

    setup, state, meta = _open_run(config, workdir)
    tc = config.train
    data_position = int(meta["data_position"])
    start_step = int(np.asarray(setup.to_checkpoint_layout(state).step.addressable_data(0)))
    metrics_lib.truncate(workdir, start_step)  # rows of steps this run re-does, a torn last line
    total = int(tc.steps)
    pmap = setup.mode == "pmap"

    n_proc = jax.process_count()
    n_dev = setup.mesh.devices.size
    n_shards = n_dev if pmap else mesh_lib.batch_shards(setup.mesh)
    if tc.batch_size % n_shards or (tc.batch_size // tc.accum_steps) % n_shards:
        raise ValueError(
            f"train.batch_size={tc.batch_size} (micro-batch {tc.batch_size // tc.accum_steps}) "
            f"must divide evenly over {n_shards} batch shards (data x fsdp devices)"
        )
    local_batch = tc.batch_size // n_proc
    cursor = guard.DataCursor(meta, n_proc, jax.process_index())
    train_iter = pipeline.make_train_iterator(
        config.data,
        setup.tokenizer,
        local_batch,
        seed=int(config.seed),
        start_batch=data_position,
        process_index=jax.process_index(),
        process_count=n_proc,
        hard_negatives=int(config.model.get("hard_negatives", 0)),
        **cursor.start,
    )
    metric_shard = mesh_lib.replicated(setup.mesh)
    batch_shard = mesh_lib.batch_sharding(setup.mesh)
    stages = setup.stages()
    compiled = {}

    def step_fn_for(step: int):
        """The compiled step of the stage `step` falls in (compiled on first use)."""
        i = next((i for i, st in enumerate(stages) if step < st["until"]), len(stages) - 1)
        if i not in compiled:
            st = stages[i]
            fn = step_lib.make_train_step(
                st["family"],
                setup.optimizer,
                setup.schedule,
                accum_steps=int(tc.accum_steps),
                trainable=st["trainable"],
                collective=PmapCollective(mesh_lib.DATA) if pmap else identity,
            )
            compiled[i] = (
                step_lib.compile_pmap_step(fn)
                if pmap
                else step_lib.compile_step(fn, setup.state_sharding, batch_shard, metric_shard, mesh=setup.mesh)
            )
            if len(stages) > 1:
                tqdm.write(f"[stage {st['name']}] from step {step}: tasks={st['tasks']} frozen={list(st['freeze'])}")
        return compiled[i]

    batch_keys = getattr(setup.family, "batch_keys", ("image", "text", "hard_negatives"))
    evaluator = setup.evaluator() if config.eval.every or config.eval.at_end else None
    if evaluator is not None:  # a missing or empty eval split fails now, not after hours
        n_eval = pipeline.num_examples(config.data, config.data.eval_split)
        if n_eval == 0:
            raise ValueError(
                f"eval split {config.data.eval_split!r} of {config.data.name!r} is empty; "
                "set data.eval_fraction (file lists) or eval.every=0 eval.at_end=false"
            )
    writer = metrics_lib.MetricWriter(workdir)
    last_eval: dict = {}

    def run_eval(step):
        nonlocal last_eval
        t0 = time.time()
        last_eval = evaluator(setup.to_checkpoint_layout(state).params)
        last_eval["eval_seconds"] = time.time() - t0
        writer.write(step, "eval", last_eval)
        shown = (
            "i2t_r@1",
            "i2t_itm_r@1",
            "i2t_r@5",
            "t2i_r@1",
            "t2i_itm_r@1",
            "binding_acc",
            "time_probe_acc",
            "zero_shot_top1",
            "i2t_chance@1",
            "top1",
            "top5",
            "caption_exact",
            "caption_cider",
        )
        tqdm.write(f"[eval step {step}] " + _format(last_eval, shown))

    bar = tqdm(
        total=total,
        initial=start_step,
        disable=not progress or jax.process_index() != 0,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    # Hang guard: with parallel.step_timeout_s > 0, a watchdog exits the process when no
    # step finishes in time. The checks below wait for each step one step behind (so
    # one step stays in flight); the watchdog starts after the first (compiling) step.
    step_timeout = float(config.parallel.get("step_timeout_s", 0) or 0)
    watchdog = None
    t_last, n_since = time.time(), 0
    end = total if stop_at is None else min(total, int(stop_at))
    done = last_saved = start_step

    def to_device(batch):
        data_state = batch.pop("data_state", None)  # host-only: where the stream stands after this batch
        batch = {k: batch[k] for k in batch_keys if k in batch}
        if "id" in batch:  # int64 from tf.data; jax runs without x64
            batch["id"] = np.asarray(batch["id"]).astype(np.int32)
        return (mesh_lib.pmap_batch(batch) if pmap else mesh_lib.global_batch(setup.mesh, batch)), data_state

    def save(step):
        nonlocal last_saved
        meta = {"data_position": data_position, "bad_steps": checks.total, **cursor.meta(cursor.totals())}
        _save_checkpoint(setup, step, state, meta)
        last_saved = step

    # Host->device copies run ahead of the step on a thread (data.prefetch_to_device).
    device_batches = mesh_lib.prefetch_to_device(
        train_iter, to_device, int(config.data.get("prefetch_to_device", 2) or 0)
    )
    checks = guard.StepChecks(int(tc.get("max_bad_steps", 20)), int(meta.get("bad_steps", 0)))
    try:
        with checks:
            for step in range(start_step, end):
                batch, data_state = next(device_batches)
                state, m = step_fn_for(step)(state, batch)
                cursor.consumed(data_state)
                data_position += 1
                n_since += 1
                done = step + 1
                checks.push(done, m["bad_step"])  # waits for the previous step
                if step_timeout > 0:
                    if watchdog is None and done > start_step + 1:
                        watchdog = distributed.StepWatchdog(step_timeout)
                    if watchdog is not None:
                        watchdog.beat()
                if done % int(tc.log_every) == 0 or done == total:
                    checks.flush()
                    totals = cursor.totals()
                    m = _train_row(
                        m,
                        pmap=pmap,
                        samples=n_since * tc.batch_size,
                        seconds=time.time() - t_last,
                        n_devices=n_dev,
                        bad_steps=checks.total,
                        skipped=int(totals[:, 1].sum()) if totals is not None else getattr(train_iter, "skipped", 0),
                    )
                    writer.write(done, "train", m)
                    bar.set_postfix_str(f"loss={float(m['loss']):.4f} {m['samples_per_s']:.0f} samples/s")
                    t_last, n_since = time.time(), 0
                bar.update(1)
                checks.raise_failure()
                if tc.ckpt_every and done % int(tc.ckpt_every) == 0 and done != end:
                    save(done)
                if config.eval.every and done % int(config.eval.every) == 0 and done != total:
                    run_eval(done)
                if checks.stop:
                    break
            checks.flush()
            checks.raise_failure()
    except guard.NonFiniteError as e:
        setup.checkpointer.close()
        raise guard.NonFiniteError(f"{e} (the last checkpoint is step {setup.checkpointer.latest_step()})") from None
    finally:
        bar.close()
        device_batches.close()
        if watchdog is not None:
            watchdog.close()
    if checks.stop:  # SIGTERM (on some process): every process saves this step and leaves
        if last_saved != done:
            save(done)
        _leave_preempted(setup, writer, done)
    if end > start_step or setup.checkpointer.latest_step() is None:
        save(end)
    if evaluator is not None and config.eval.at_end and end == total:
        run_eval(total)
    setup.checkpointer.close()
    writer.close()
    plot_path = metrics_lib.plot(workdir)
    skipped = cursor.skipped if cursor.records is not None else getattr(train_iter, "skipped", 0)
    if skipped:
        logging.warning("skipped %d unreadable records during training", skipped)
    result = dict(last_eval)
    result["step"] = end
    result["plot"] = plot_path
    result["final_state"] = setup.to_checkpoint_layout(state)
    return result
