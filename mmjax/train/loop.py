"""The training loop: batches -> step -> metrics, progress, checkpoints, evals."""
from __future__ import annotations

import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from mmjax import checkpoint as ckpt_lib
from mmjax.models import zoo
from mmjax.parallel import distributed, mesh as mesh_lib
from mmjax.parallel.collective import PmapCollective, identity
from mmjax.train import metrics as metrics_lib
from mmjax.train import guard, optim, step as step_lib


class Setup:
    """Everything a run (train or eval) needs, built from a config and a workdir."""

    def __init__(self, config, workdir: str):
        from mmjax.data import pipeline, tokenizer as tok_lib

        self.config, self.workdir = config, workdir
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:  # a path under a regular file, a read-only parent, ...
            raise ValueError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None
        data = config.data
        self.init_from = config.get("finetune", {}).get("init_from", None)
        if self.init_from:
            self._prepare_finetune()
        get_tokenizer = lambda: tok_lib.get_tokenizer(
            data.tokenizer, workdir, lambda: pipeline.captions(data, data.train_split))
        if jax.process_count() == 1:
            self.tokenizer = get_tokenizer()
        else:
            # Process 0 builds the built-in data and trains the tokenizer (shared
            # workdir); the others wait for it instead of racing to write the same files.
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                self.tokenizer = get_tokenizer()
                for split in {data.train_split, data.eval_split}:
                    pipeline.num_examples(data, split)
            multihost_utils.sync_global_devices("mmjax: data and tokenizer ready")
            if jax.process_index() != 0:
                self.tokenizer = get_tokenizer()
        with config.unlocked():
            # An imported model (mmjax convert) keeps its own vocabulary size.
            keep = config.model.get("keep_vocab_size", False) and int(config.model.get("vocab_size", 0) or 0)
            config.model.vocab_size = int(keep or self.tokenizer.vocab_size)
            config.model.image_size = int(data.image_size)
            config.model.num_frames = int(data.get("num_frames", 0) or 0)  # 0: images; T: clips
            config.model.text_len = int(data.text_len)
            config.model.total_steps = int(config.train.steps)  # for momentum / ramp schedules
        self.family = zoo.build(config.model)
        self.mode = config.parallel.get("mode", "mesh")
        # pmap keeps a replica of the state per device; its checkpoints use the
        # replicated layout of a 1-D data mesh, so either mode can restore them.
        self.mesh = mesh_lib.make_mesh(config.parallel.get("mesh") if self.mode == "mesh" else None)
        self.schedule = optim.learning_rate_schedule(config.train)
        self.optimizer = optim.make_optimizer(config.train)
        self.image_shape = self.family.image_shape()
        self.text_shape = (1, data.text_len)
        self._init, self.abstract_state, self.state_sharding = step_lib.state_plan(
            self.family, self.optimizer, self.mesh, self.image_shape, self.text_shape)
        if self.mode == "pmap":
            self.state_sharding = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(self.mesh),
                                                         self.abstract_state)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=int(config.train.keep_checkpoints),
            async_save=bool(config.train.get("async_checkpoints", True)),
        )

    def stages(self) -> list[dict]:
        """The training stages: [{name, until, tasks, freeze, family, trainable}].

        Without `train.stages` there is one stage over all steps with `train.freeze`.
        A stage may name `tasks` (the family's objectives in that stage, e.g. VLMo's
        image-only, then text-only, then image-text pretraining) and `freeze` (regexes
        of params kept fixed); stages end at their `until` step (an int) or at that
        fraction of train.steps (a float in (0, 1]).
        """
        tc = self.config.train
        specs = tc.get("stages", None) or [dict(name="all", until=int(tc.steps))]
        out, prev = [], 0
        for i, spec in enumerate(specs):
            spec = dict(spec)
            unknown = set(spec) - {"name", "until", "tasks", "freeze"}
            if unknown:
                raise ValueError(f"train.stages[{i}] has unknown keys {sorted(unknown)}; "
                                 "valid keys: name, until, tasks, freeze")
            until = spec.get("until", tc.steps)
            # A float in (0, 1] is a fraction of train.steps, so a recipe's stages
            # follow --config.train.steps; an int is an absolute step.
            until = int(round(until * int(tc.steps))) if isinstance(until, float) and until <= 1 else int(until)
            if until <= prev:
                raise ValueError(f"train.stages[{i}].until={until} must exceed the previous stage's end {prev}")
            prev = until
            family = self.family
            tasks = spec.get("tasks")
            if tasks is not None:
                model_cfg = ml_collections.ConfigDict(self.config.model.to_dict())
                model_cfg.tasks = tuple(tasks)
                family = zoo.build(model_cfg)
            freeze = tuple(spec.get("freeze", None) or tc.get("freeze", None) or ())
            trainable = optim.trainable_mask(self.abstract_state.params, freeze)
            out.append(dict(name=spec.get("name", f"stage{i}"), until=until, family=family,
                            tasks=tuple(getattr(family, "tasks", ()) or ()), freeze=freeze,
                            trainable=trainable))
        return out

    def _prepare_finetune(self):
        """Before anything is built: the source's tokenizer (the text tower must read the
        same ids) and, for a classifier or VQA model, the source's model as backbone."""
        from mmjax import checkpoint
        from mmjax.train import finetune

        src_workdir, _ = finetune.source(self.init_from)
        src_config = checkpoint.load_config_json(src_workdir)
        src_tok = os.path.join(src_workdir, "tokenizer.model")
        dst_tok = os.path.join(self.workdir, "tokenizer.model")
        if not self.config.data.tokenizer.get("path") and os.path.exists(src_tok) and not os.path.exists(dst_tok):
            if jax.process_index() == 0:
                import shutil
                shutil.copyfile(src_tok, dst_tok + ".tmp")
                os.replace(dst_tok + ".tmp", dst_tok)
        model = self.config.model
        if model.get("family") in zoo.WRAPPERS:  # the backbone is what the checkpoint holds
            with self.config.unlocked():
                model.backbone = src_config.model.to_dict()

    def fresh_state(self):
        """The initial state, created sharded (pmap layout in pmap mode); with
        `finetune.init_from`, the params come from that checkpoint (`train.finetune`)."""
        init = jax.jit(self._init, out_shardings=self.state_sharding)
        state = init(jax.random.PRNGKey(int(self.config.seed)))
        if self.init_from:
            state = self._load_pretrained(state)
        return self.to_run_layout(state)

    def _load_pretrained(self, state):
        from mmjax.train import finetune

        weights = self.config.finetune.get("weights", "student")
        _, pretrained = finetune.pretrained_params(self.init_from, weights)
        prefix = "backbone/" if self.config.model.family in zoo.WRAPPERS else ""
        params, report = finetune.transplant(jax.device_get(state.params), pretrained, prefix,
                                             inflation=self.config.finetune.get("inflation", None) or "central")
        logging.info("init from %s (%s): %d params loaded, %d left behind, resized %s, fresh %s",
                     self.init_from, weights, report["loaded"], report["unused"], report["resized"],
                     report["kept_init"])
        family, optimizer = self.family, self.optimizer

        def rebuild(params, rng):
            extra = family.init_extra(params) if hasattr(family, "init_extra") else {}
            return state.replace(params=params, opt_state=optimizer.init(params), rng=rng,
                                 ema_params=extra.get("ema_params"), queues=extra.get("queues"))

        return jax.jit(rebuild, out_shardings=self.state_sharding)(params, state.rng)

    def restore(self, step=None, **kw):
        """(state, meta) from the newest usable (or `step`'s) checkpoint, or None.

        The checkpoint is read straight into this run's shardings, whatever mesh,
        device count, process count or mode wrote it. Steps that fail their checksums
        or do not read are reported and passed over (`Checkpointer.restore`, whose
        keywords `require` and `quarantine` pass through); the step read is
        `self.checkpointer.restored_step`.
        """
        target = ckpt_lib.abstract_with_shardings(self.abstract_state, self.state_sharding)
        restored = self.checkpointer.restore(target, step, **kw)
        if restored is None:
            return None
        state, meta = restored
        return self.to_run_layout(state), meta

    def to_run_layout(self, state):
        """Checkpoint layout -> what the compiled step takes."""
        return mesh_lib.to_pmap(state) if self.mode == "pmap" else state

    def to_checkpoint_layout(self, state):
        """What the step returns -> checkpoint layout (global arrays on `self.mesh`)."""
        return mesh_lib.from_pmap(state, self.mesh) if self.mode == "pmap" else state

    def save(self, step: int, state, meta: dict):
        self.checkpointer.save(step, self.to_checkpoint_layout(state), meta)

    def evaluator(self, split=None):
        from mmjax.eval.run import ClassificationEvaluator, Evaluator

        ev = self.config.eval
        if hasattr(self.family, "logits"):
            return ClassificationEvaluator(self.family, self.config.data, self.mesh,
                                           split=split or self.config.data.eval_split,
                                           batch_size=int(ev.batch_size), tokenizer=self.tokenizer)
        return Evaluator(
            self.family, self.config.data, self.tokenizer, self.mesh,
            split=split or self.config.data.eval_split, batch_size=int(ev.batch_size),
            max_examples=ev.get("max_examples"), rerank_k=int(ev.get("rerank_k", 16)),
            zero_shot=ev.get("zero_shot"),
        )


def restore_params(workdir: str, weights: str = "student", step: int | None = None):
    """(params as host numpy, setup, step) of a workdir's latest (or `step`'s) checkpoint:
    the student params or the EMA teacher. Read onto a plain data mesh of this
    machine's devices, whatever mesh, device count or mode wrote it (fine-tuning,
    export and `mmjax embed` need the values, not the layout)."""
    if weights not in ("student", "ema"):
        raise ValueError(f"weights {weights!r}; valid choices: student, ema")
    config = ckpt_lib.load_config_json(workdir)
    with config.unlocked():
        config.parallel.mode = "mesh"
        config.parallel.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    setup = Setup(config, workdir)
    try:
        if weights == "ema" and setup.abstract_state.ema_params is None:
            raise ValueError(f"weights='ema': the {config.model.family!r} run in {workdir} has no EMA teacher "
                             "(only ALBEF-style families keep one); use weights='student'")
        restored = setup.restore(step)  # the newest step that verifies, or `step`
        if restored is None:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
        step = setup.checkpointer.restored_step
    finally:
        setup.checkpointer.close()
    state = setup.to_checkpoint_layout(restored[0])
    tree = state.params if weights == "student" else state.ema_params
    return jax.tree.map(np.asarray, jax.device_get(tree)), setup, int(step)


def _format(metrics: dict, keys) -> str:
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)


def _restore_for_training(setup: Setup, config, workdir: str):
    """(state, meta) of the newest usable checkpoint, or None. A checkpoint of another
    model shape is one error naming the config keys that changed since it was saved."""
    try:
        return setup.restore(require=("data_position",), quarantine=True)
    except (ckpt_lib.StateMismatch, ckpt_lib.CheckpointError) as e:
        old = os.path.join(workdir, "config.json")
        diff = ckpt_lib.config_diff(ckpt_lib.load_config_json(workdir), config) if os.path.isfile(old) else []
        if not diff:
            raise
        if isinstance(e, ckpt_lib.StateMismatch):
            raise ValueError(f"cannot resume {workdir}: the workdir's config differs from this run's in keys: "
                             f"{', '.join(diff)}; use another --workdir, or the workdir's values ({e})") from None
        raise ckpt_lib.CheckpointError(f"{e} (the workdir's config also differs from this run's in keys: "
                                       f"{', '.join(diff)})") from None


def _open_run(config, workdir: str):
    """(setup, state, meta) of a new or resumed run: the workdir checked, the newest
    usable checkpoint restored (or a fresh state), config.json written, partial saves
    of a dead run removed."""
    ckpt_lib.check_workdir(workdir)
    setup = Setup(config, workdir)
    restored = _restore_for_training(setup, config, workdir)
    ckpt_lib.save_config_json(config, workdir)
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
        raise guard.NonFiniteError(f"step {step}: the state holds non-finite values; not saved (the last "
                                   f"checkpoint is step {setup.checkpointer.latest_step()})")
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
        config.data, setup.tokenizer, local_batch, seed=int(config.seed), start_batch=data_position,
        process_index=jax.process_index(), process_count=n_proc,
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
                st["family"], setup.optimizer, setup.schedule, accum_steps=int(tc.accum_steps),
                trainable=st["trainable"], collective=PmapCollective(mesh_lib.DATA) if pmap else identity)
            compiled[i] = (step_lib.compile_pmap_step(fn) if pmap else
                           step_lib.compile_step(fn, setup.state_sharding, batch_shard, metric_shard,
                                                 mesh=setup.mesh))
            if len(stages) > 1:
                tqdm.write(f"[stage {st['name']}] from step {step}: tasks={st['tasks']} "
                           f"frozen={list(st['freeze'])}")
        return compiled[i]

    batch_keys = getattr(setup.family, "batch_keys", ("image", "text", "hard_negatives"))
    evaluator = setup.evaluator() if config.eval.every or config.eval.at_end else None
    if evaluator is not None:  # a missing or empty eval split fails now, not after hours
        n_eval = pipeline.num_examples(config.data, config.data.eval_split)
        if n_eval == 0:
            raise ValueError(f"eval split {config.data.eval_split!r} of {config.data.name!r} is empty; "
                             "set data.eval_fraction (file lists) or eval.every=0 eval.at_end=false")
    writer = metrics_lib.MetricWriter(workdir)
    last_eval: dict = {}

    def run_eval(step):
        nonlocal last_eval
        t0 = time.time()
        last_eval = evaluator(setup.to_checkpoint_layout(state).params)
        last_eval["eval_seconds"] = time.time() - t0
        writer.write(step, "eval", last_eval)
        shown = ("i2t_r@1", "i2t_itm_r@1", "i2t_r@5", "t2i_r@1", "t2i_itm_r@1", "binding_acc", "time_probe_acc", "zero_shot_top1",
                 "i2t_chance@1", "top1", "top5", "caption_exact", "caption_cider")
        tqdm.write(f"[eval step {step}] " + _format(last_eval, shown))

    bar = tqdm(total=total, initial=start_step, disable=not progress or jax.process_index() != 0,
               desc="train", unit="step", dynamic_ncols=True)
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
    device_batches = mesh_lib.prefetch_to_device(train_iter, to_device,
                                                 int(config.data.get("prefetch_to_device", 2) or 0))
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
                    m = _train_row(m, pmap=pmap, samples=n_since * tc.batch_size, seconds=time.time() - t_last,
                                   n_devices=n_dev, bad_steps=checks.total, skipped=int(totals[:, 1].sum())
                                   if totals is not None else getattr(train_iter, "skipped", 0))
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
