"""The training loop: batches -> step -> metrics and progress, with the checkpoints
(train/checkpointing.py) and evals (train/evaluation.py) due on the way.

`train` opens the run (train/setup.py builds its context; a workdir's newest usable
checkpoint is restored), runs the steps and finishes (the last save, the final eval,
the plot). `_Run` holds what changes while the steps run: the state, the data
position, the step checks, the metric writer and the progress bar.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from tqdm import tqdm

from mmjax.parallel import distributed
from mmjax.parallel import mesh as mesh_lib
from mmjax.parallel.collective import PmapCollective, identity
from mmjax.train import checkpointing, evaluation, guard
from mmjax.train import metrics as metrics_lib
from mmjax.train import step as step_lib


def train(config, workdir: str, *, progress: bool = True, stop_at: int | None = None) -> dict:
    """Trains (or resumes) in `workdir`; returns the final eval metrics.

    `stop_at`: leave after that many steps with a checkpoint, as a preempted job
    would (the schedule still runs to `train.steps`); a later call resumes.
    SIGTERM: the current step finishes, a checkpoint is saved and `guard.Preempted`
    (SystemExit 143) is raised. `guard.NonFiniteError` after train.max_bad_steps
    non-finite steps in a row; `checkpoint.SaveError` when a save fails.
    """
    setup, state, meta = checkpointing.open_run(config, workdir)
    run = _Run(config, workdir, setup, state, meta, progress=progress, stop_at=stop_at)
    run.run_steps()
    if run.checks.stop:  # SIGTERM (on some process): every process saves this step and leaves
        if run.last_saved != run.done:
            run.save(run.done)
        checkpointing.leave_preempted(setup, run.writer, run.done)
    return run.finish()


def _train_iterator(config, setup, pmap: bool, data_position: int, cursor):
    """This process's rows of the global batches from `data_position` on (ValueError
    when a batch does not divide over the batch shards)."""
    from mmjax.data import pipeline

    tc, n_proc = config.train, jax.process_count()
    n_shards = setup.mesh.devices.size if pmap else mesh_lib.batch_shards(setup.mesh)
    if tc.batch_size % n_shards or (tc.batch_size // tc.accum_steps) % n_shards:
        raise ValueError(
            f"train.batch_size={tc.batch_size} (micro-batch {tc.batch_size // tc.accum_steps}) "
            f"must divide evenly over {n_shards} batch shards (data x fsdp devices)"
        )
    return pipeline.make_train_iterator(
        config.data,
        setup.tokenizer,
        tc.batch_size // n_proc,
        seed=int(config.seed),
        start_batch=data_position,
        process_index=jax.process_index(),
        process_count=n_proc,
        hard_negatives=int(config.model.get("hard_negatives", 0)),
        **cursor.start,
    )


class _StageSteps:
    """`self(step)` -> the compiled step of the training stage `step` falls in
    (`Setup.stages`), compiled on first use."""

    def __init__(self, setup, accum_steps: int, pmap: bool):
        self.setup, self.accum_steps, self.pmap = setup, accum_steps, pmap
        self.metric_shard = mesh_lib.replicated(setup.mesh)
        self.batch_shard = mesh_lib.batch_sharding(setup.mesh)
        self.stages = setup.stages()
        self.compiled = {}

    def __call__(self, step: int):
        stages = self.stages
        i = next((i for i, st in enumerate(stages) if step < st["until"]), len(stages) - 1)
        if i not in self.compiled:
            st, setup = stages[i], self.setup
            fn = step_lib.make_train_step(
                st["family"],
                setup.optimizer,
                setup.schedule,
                accum_steps=self.accum_steps,
                trainable=st["trainable"],
                collective=PmapCollective(mesh_lib.DATA) if self.pmap else identity,
            )
            self.compiled[i] = (
                step_lib.compile_pmap_step(fn)
                if self.pmap
                else step_lib.compile_step(
                    fn, setup.state_sharding, self.batch_shard, self.metric_shard, mesh=setup.mesh
                )
            )
            if len(stages) > 1:
                tqdm.write(f"[stage {st['name']}] from step {step}: tasks={st['tasks']} frozen={list(st['freeze'])}")
        return self.compiled[i]


class _Watchdog:
    """Hang guard: with parallel.step_timeout_s > 0, a watchdog exits the process when
    no step finishes in time. The step checks wait for each step one step behind (so
    one step stays in flight); the watchdog starts after the first (compiling) step."""

    def __init__(self, timeout_s: float, start_step: int):
        self.timeout_s, self.start_step, self.dog = timeout_s, start_step, None

    def beat(self, done: int):
        if self.timeout_s <= 0:
            return
        if self.dog is None and done > self.start_step + 1:
            self.dog = distributed.StepWatchdog(self.timeout_s)
        if self.dog is not None:
            self.dog.beat()

    def close(self):
        if self.dog is not None:
            self.dog.close()


def _train_row(m, *, pmap: bool, samples: int, seconds: float, n_devices: int, bad_steps: int, skipped) -> dict:
    """The metrics row of a logged step (host values)."""
    m = mesh_lib.unreplicate_metrics(m) if pmap else jax.device_get(m)
    m["samples_per_s"] = samples / max(seconds, 1e-9)
    m["samples_per_s_per_device"] = m["samples_per_s"] / n_devices
    m["bad_steps"] = bad_steps
    if skipped:
        m["skipped_records"] = skipped  # up to and including this step's batch
    return m


class _Run:
    """One run from its first step to its last: the state, the data stream and its
    position, the compiled steps, the evaluator, the metric writer, the progress bar."""

    def __init__(self, config, workdir: str, setup, state, meta: dict, *, progress: bool, stop_at: int | None):
        tc = config.train
        self.config, self.workdir, self.setup, self.state = config, workdir, setup, state
        self.meta = meta
        self.data_position = int(meta["data_position"])
        self.start = int(np.asarray(setup.to_checkpoint_layout(state).step.addressable_data(0)))
        metrics_lib.truncate(workdir, self.start)  # rows of steps this run re-does, a torn last line
        self.total = int(tc.steps)
        self.end = self.total if stop_at is None else min(self.total, int(stop_at))
        self.done = self.last_saved = self.start
        self.pmap = setup.mode == "pmap"
        self.cursor = guard.DataCursor(meta, jax.process_count(), jax.process_index())
        self.train_iter = _train_iterator(config, setup, self.pmap, self.data_position, self.cursor)
        self.step_fn = _StageSteps(setup, int(tc.accum_steps), self.pmap)
        self.batch_keys = setup.family.batch_keys
        self.evaluator = evaluation.make_evaluator(setup, config)
        self.writer = metrics_lib.MetricWriter(workdir)
        self.last_eval: dict = {}
        self.bar = tqdm(
            total=self.total,
            initial=self.start,
            disable=not progress or jax.process_index() != 0,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        self.watchdog = _Watchdog(float(config.parallel.get("step_timeout_s", 0) or 0), self.start)
        self.t_last, self.n_since = time.time(), 0
        self.checks = None  # guard.StepChecks, made when the steps start

    def run_steps(self):
        """Steps `start`..`end` (fewer when SIGTERM stops the run), with the logs, saves
        and evals due on the way."""
        # Host->device copies run ahead of the step on a thread (data.prefetch_to_device).
        batches = mesh_lib.prefetch_to_device(
            self.train_iter, self._to_device, int(self.config.data.get("prefetch_to_device", 2) or 0)
        )
        tc = self.config.train
        self.checks = guard.StepChecks(int(tc.get("max_bad_steps", 20)), int(self.meta.get("bad_steps", 0)))
        try:
            with self.checks:
                for step in range(self.start, self.end):
                    self._step(step, *next(batches))
                    if self.checks.stop:
                        break
                self.checks.flush()
                self.checks.raise_failure()
        except guard.NonFiniteError as e:
            self.setup.checkpointer.close()
            last = self.setup.checkpointer.latest_step()
            raise guard.NonFiniteError(f"{e} (the last checkpoint is step {last})") from None
        finally:
            self.bar.close()
            batches.close()
            self.watchdog.close()

    def _to_device(self, batch):
        data_state = batch.pop("data_state", None)  # host-only: where the stream stands after this batch
        batch = {k: batch[k] for k in self.batch_keys if k in batch}
        if "id" in batch:  # int64 from tf.data; jax runs without x64
            batch["id"] = np.asarray(batch["id"]).astype(np.int32)
        return (mesh_lib.pmap_batch(batch) if self.pmap else mesh_lib.global_batch(self.setup.mesh, batch)), data_state

    def _step(self, step: int, batch, data_state):
        tc, ev = self.config.train, self.config.eval
        self.state, m = self.step_fn(step)(self.state, batch)
        self.cursor.consumed(data_state)
        self.data_position += 1
        self.n_since += 1
        self.done = done = step + 1
        self.checks.push(done, m["bad_step"])  # waits for the previous step
        self.watchdog.beat(done)
        if done % int(tc.log_every) == 0 or done == self.total:
            self._log(done, m)
        self.bar.update(1)
        self.checks.raise_failure()
        if tc.ckpt_every and done % int(tc.ckpt_every) == 0 and done != self.end:
            self.save(done)
        if ev.every and done % int(ev.every) == 0 and done != self.total:
            self.evaluate(done)

    def _log(self, done: int, m):
        self.checks.flush()
        totals = self.cursor.totals(self.train_iter.payload_bytes())
        m = _train_row(
            m,
            pmap=self.pmap,
            samples=self.n_since * self.config.train.batch_size,
            seconds=time.time() - self.t_last,
            n_devices=self.setup.mesh.devices.size,
            bad_steps=self.checks.total,
            skipped=int(totals[:, 1].sum()) if totals is not None else getattr(self.train_iter, "skipped", 0),
        )
        m.update(self.cursor.source_metrics(totals))  # a mixture's rows (and replacements) per source
        self.writer.write(done, "train", m)
        self.bar.set_postfix_str(f"loss={float(m['loss']):.4f} {m['samples_per_s']:.0f} samples/s")
        self.t_last, self.n_since = time.time(), 0

    def save(self, step: int):
        cursor = self.cursor
        meta = {
            "data_position": self.data_position,
            "bad_steps": self.checks.total,
            **cursor.meta(cursor.totals(self.train_iter.payload_bytes())),
        }
        order = self.train_iter.order_state(self.data_position)  # index-based: checked on resume
        if order is not None:
            meta["data"] = order
        checkpointing.save_checkpoint(self.setup, step, self.state, meta)
        self.last_saved = step

    def evaluate(self, step: int):
        self.last_eval = evaluation.run_eval(self.evaluator, self.setup, self.state, self.writer, step)

    def finish(self) -> dict:
        """The last save and the final eval; -> the result (the last eval's metrics,
        step, plot, final_state)."""
        setup = self.setup
        if self.end > self.start or setup.checkpointer.latest_step() is None:
            self.save(self.end)
        if self.evaluator is not None and self.config.eval.at_end and self.end == self.total:
            self.evaluate(self.total)
        setup.checkpointer.close()
        self.writer.close()
        plot_path = metrics_lib.plot(self.workdir)
        skipped = self.cursor.skipped if self.cursor.records is not None else getattr(self.train_iter, "skipped", 0)
        if skipped:
            logging.warning("skipped %d unreadable records during training", skipped)
        result = dict(self.last_eval)
        result["step"] = self.end
        result["plot"] = plot_path
        result["final_state"] = setup.to_checkpoint_layout(self.state)
        return result
