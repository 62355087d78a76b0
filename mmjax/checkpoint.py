"""Orbax checkpoints: state + data position + config, async, atomic, verified, keep-N.

Orbax writes each step into `STEP.orbax-checkpoint-tmp` and renames it when complete,
so a save that dies (a full disk, a killed process) leaves the earlier steps untouched.
Just before that rename (orbax's post-finalization callback; after the save for
synchronous checkpoints) process 0 writes `mmjax_manifest.json` into the step: the
size and CRC32 of every file of its items and the shape of every array of the state
(checkpoint_manifest.py writes and verifies it). `restore` verifies a step against its manifest before reading it and takes the newest
step that verifies and reads; each one that does not is reported (which step, which
file) and, for a training run, moved aside to `STEP.damaged`. A step without a
manifest (written by an older mmjax) is read unverified.

Keep-N is done here, not by orbax (whose pruning runs even when the new save failed):
old steps are deleted only once a newer step is final and carries its manifest.
A failed save raises `SaveError` ("disk full while saving step N; the last good
checkpoint is step M"); `remove_partial_saves` deletes the temporary directories a
dead save left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

# The manifest half (checkpoint_manifest.py). CheckpointError and StateMismatch are
# what `Checkpointer.restore` and `usable_step` raise, so their callers catch them here.
from mmjax.checkpoint_manifest import MANIFEST, check_shapes, read_manifest, state_shapes, step_problem, write_manifest
from mmjax.checkpoint_manifest import CheckpointError as CheckpointError
from mmjax.checkpoint_manifest import StateMismatch as StateMismatch

log = logging.getLogger(__name__)
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class SaveError(OSError, ValueError):
    """A checkpoint save failed (a full disk, an unwritable directory, ...)."""


def usable_step(directory: str, step: int | None = None) -> int:
    """`step`, or the newest step of a checkpoint directory whose files verify (others
    are reported): for readers that open a step's items themselves. CheckpointError
    naming each step and file when none does; FileNotFoundError when there is none."""
    directory = os.path.abspath(directory)
    steps = (
        [int(step)]
        if step is not None
        else sorted(
            (int(d) for d in (os.listdir(directory) if os.path.isdir(directory) else []) if d.isdigit()), reverse=True
        )
    )
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    problems = []
    for s in steps:
        step_dir = os.path.join(directory, str(s))
        problem = step_problem(step_dir)
        if problem is None:
            return s
        log.warning("checkpoint step %d in %s: %s", s, directory, problem)
        problems.append(f"step {s}: {problem}")
    raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(problems))


def is_disk_full(e: BaseException) -> bool:
    text = str(e)
    return (
        getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "RESOURCE_EXHAUSTED" in text
        or "No space left" in text
        or "Disk quota exceeded" in text
    )


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _agree_all(ok: bool) -> bool:
    """True on every process iff `ok` is True on every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _from_primary(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


class Checkpointer:
    """Saves and restores `TrainState` plus a JSON `meta` dict (data position, ...)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.keep = int(keep or 0)
        self.async_save = bool(async_save)
        self._pending = None  # (step, shapes) of the save in flight
        self.restored_step = None
        async_options = ocp.AsyncOptions(post_finalization_callback=self._seal) if self.async_save else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=self.async_save, async_options=async_options
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ steps on disk
    def steps(self) -> list[int]:
        """Final (renamed) step directories, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(
            int(d) for d in os.listdir(self.directory) if d.isdigit() and os.path.isdir(os.path.join(self.directory, d))
        )

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def verified_steps(self) -> list[int]:
        return [s for s in self.steps() if os.path.isfile(os.path.join(self.step_dir(s), MANIFEST))]

    def remove_partial_saves(self) -> list[str]:
        """Deletes `*.orbax-checkpoint-tmp*` directories of saves that never finished
        (process 0; call before this run saves anything)."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return []
        gone = [d for d in os.listdir(self.directory) if TMP_SUFFIX in d]
        for d in gone:
            shutil.rmtree(os.path.join(self.directory, d), ignore_errors=True)
            log.warning("removed %s, left behind by a save that did not finish", os.path.join(self.directory, d))
        return gone

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, meta: dict) -> None:
        """Starts an (async) save; blocks only until device buffers are copied (and
        until the previous save is final). SaveError when a save fails."""
        self._finish_pending()
        self._pending = (int(step), state_shapes(state))
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            if not self.async_save:  # final now: the manifest follows the rename
                if jax.process_index() == 0:
                    write_manifest(self.step_dir(step), *self._pending)
                self._pending = None
                self._prune()
        except Exception as e:
            raise self._save_error(int(step), e) from e

    def _tmp_dirs(self, step: int) -> list[str]:
        """The temporary directories of `step`'s save: `STEP.orbax-checkpoint-tmp`, or
        with the suffix orbax versions add (`-<timestamp>`)."""
        if not os.path.isdir(self.directory):
            return []
        return [
            os.path.join(self.directory, d)
            for d in sorted(os.listdir(self.directory))
            if d.startswith(f"{step}{TMP_SUFFIX}")
        ]

    def _seal(self):
        """orbax's post-finalization callback (process 0, background thread): every
        file of the pending step is written; its manifest goes in before the rename.
        Where orbax saves in place (no temporary directory), `_finish_pending` writes
        it after the save instead."""
        step, shapes = self._pending
        for d in self._tmp_dirs(step)[-1:]:
            write_manifest(d, step, shapes)

    def _finish_pending(self):
        if self._pending is None:
            return
        step = self._pending[0]
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
            if not os.path.isdir(self.step_dir(step)):
                raise OSError(f"step {step} was not finalized")
            if jax.process_index() == 0 and read_manifest(self.step_dir(step)) is None:
                write_manifest(self.step_dir(step), *self._pending)  # no temporary directory was seen
        except Exception as e:
            raise self._save_error(step, e) from e
        self._pending = None
        self._prune()

    def _save_error(self, step: int, e: BaseException) -> SaveError:
        self._pending = None
        try:  # let the rest of the failed save end before its directory goes
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception:  # noqa: BLE001 - the first error is the one reported
            pass
        if jax.process_index() == 0:
            for d in self._tmp_dirs(step):
                shutil.rmtree(d, ignore_errors=True)
        good = [s for s in self.steps() if s != step]
        last = f"step {good[-1]}" if good else "none (no step was saved)"
        what = "disk full while saving" if is_disk_full(e) else f"saving failed ({_one_line(e)}) at"
        return SaveError(f"{what} step {step} in {self.directory}; the last good checkpoint is {last}")

    def _prune(self):
        """Keeps the `keep` newest verified steps and deletes every older step."""
        if self.keep <= 0 or jax.process_index() != 0:
            return
        verified = self.verified_steps()
        if len(verified) <= self.keep:
            return
        cutoff = verified[-self.keep]
        for s in self.steps():
            if s < cutoff:
                shutil.rmtree(self.step_dir(s), ignore_errors=True)
        self.manager.reload()

    # ------------------------------------------------------------------ restore
    def restore(self, abstract_state, step: int | None = None, *, require=(), quarantine: bool = False):
        """Restores into the shapes/shardings of `abstract_state` (from `jax.eval_shape`
        with `.sharding` set), so a checkpoint lands directly on the target mesh.

        Takes `step`, or the newest step that verifies, reads and whose meta has the
        `require`d keys; each step passed over is reported (and with `quarantine`, once
        an older step restored, moved aside to STEP.damaged so that this run can save
        that step again; nothing is moved when no step is usable).
        Returns `(state, meta)` (the step read: `self.restored_step`), or `None` when
        there is no checkpoint; CheckpointError when none is usable, StateMismatch when
        the checkpoint holds another state than `abstract_state`.
        """
        self._finish_pending()
        candidates = [int(step)] if step is not None else self.steps()[::-1]
        if not candidates:
            return None
        problems, passed, i = [], [], 0
        while True:
            chosen = -1
            if jax.process_index() == 0:  # process 0 reads the bytes; everyone follows
                while i < len(candidates) and chosen < 0:
                    s, i = candidates[i], i + 1
                    problem = step_problem(self.step_dir(s))
                    if problem is None:
                        chosen = s
                    else:
                        problems.append(self._pass_over(s, problem, step is None))
                        passed.append(s)
            chosen = _from_primary(chosen)
            if chosen < 0:
                break
            self.manager.reload()
            check_shapes(
                read_manifest(self.step_dir(chosen)), abstract_state, f"checkpoint step {chosen} in {self.directory}"
            )
            restored, problem = self._read(chosen, abstract_state, require)
            if _agree_all(problem is None):
                self.restored_step = chosen
                log.info("restored checkpoint step %d from %s", chosen, self.directory)
                if quarantine and passed:
                    self._set_aside(passed)
                return restored
            problems.append(self._pass_over(chosen, problem or "unreadable on another process", step is None))
            passed.append(chosen)
        if jax.process_index() != 0:
            problems = problems or ["see process 0's log"]
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: " + "; ".join(problems)
            if step is None
            else f"checkpoint {problems[0]}"
        )

    def _read(self, step, abstract_state, require):
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
            )
            meta = dict(restored["meta"] or {})
        except Exception as e:  # a damaged step that has no manifest to say so
            return None, f"unreadable ({type(e).__name__}: {_one_line(e)})"
        missing = [k for k in require if k not in meta]
        if missing:
            return None, f"its meta lacks {missing}"
        return (restored["state"], meta), None

    def _pass_over(self, step, problem, fall_back) -> str:
        text = f"step {step}: {problem}"
        log.warning("checkpoint %s in %s%s", text, self.directory, "; trying an older step" if fall_back else "")
        return text

    def _set_aside(self, steps):
        """Moves unusable steps to STEP.damaged (kept for inspection, never read)."""
        if jax.process_index() == 0:
            for step in steps:
                if os.path.isdir(self.step_dir(step)):
                    dest, n = f"{self.step_dir(step)}.damaged", 1
                    while os.path.exists(dest):
                        dest, n = f"{self.step_dir(step)}.damaged{n}", n + 1
                    os.replace(self.step_dir(step), dest)
                    log.warning("moved the unusable step %d to %s", step, dest)
        _agree_all(True)  # a barrier: nobody saves before the steps are out of the way
        self.manager.reload()

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying target shardings, for restoring onto a mesh."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
