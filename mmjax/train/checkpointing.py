"""A training run's checkpoints: open (resume or start), save, leave on SIGTERM.

`open_run` restores the newest usable checkpoint of a workdir into the run's
shardings (passing over damaged steps, `checkpoint.Checkpointer.restore`) or builds
a fresh state; `save_checkpoint` refuses a state with non-finite values; after
SIGTERM's save `leave_preempted` raises `guard.Preempted` (exit code 143).
"""

from __future__ import annotations

import logging
import os
import sys

import jax

from mmjax import checkpoint as ckpt_lib
from mmjax import workdir as workdir_lib
from mmjax.train import guard
from mmjax.train import step as step_lib
from mmjax.train.setup import Setup


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


def open_run(config, workdir: str):
    """(setup, state, meta) of a new or resumed run: the workdir checked, the newest
    usable checkpoint restored (or a fresh state), config.json written, partial saves
    of a dead run removed."""
    workdir_lib.check_workdir(workdir)
    params_only = workdir_lib.params_only_step(workdir)
    if params_only is not None:
        raise ValueError(
            f"cannot resume {workdir}: its step {params_only} holds params alone (as `mmjax convert` writes), "
            f"no optimizer state; start a run from it with `mmjax finetune --init-from {workdir} --workdir NEW_DIR`"
        )
    setup = Setup(config, workdir)
    restored = _restore_for_training(setup, config, workdir)
    workdir_lib.save_config_json(config, workdir)
    setup.checkpointer.remove_partial_saves()
    if restored is None:
        return setup, setup.fresh_state(), {"data_position": 0}
    state, meta = restored
    logging.info("resuming at step %d (data position %d)", setup.checkpointer.restored_step, meta["data_position"])
    return setup, state, meta


def save_checkpoint(setup: Setup, step: int, state, meta: dict) -> None:
    """Saves unless some value of the state is not finite (then NonFiniteError)."""
    state = setup.to_checkpoint_layout(state)
    if not bool(jax.jit(step_lib.all_finite)((state.params, state.opt_state, state.ema_params, state.queues))):
        raise guard.NonFiniteError(
            f"step {step}: the state holds non-finite values; not saved (the last "
            f"checkpoint is step {setup.checkpointer.latest_step()})"
        )
    setup.checkpointer.save(step, state, meta)


def leave_preempted(setup: Setup, writer, step: int):
    """After SIGTERM's checkpoint of `step`: waits for it, says so, raises Preempted."""
    setup.checkpointer.close()
    writer.close()
    msg = f"mmjax: preempted: saved step {step}; exiting with code {guard.PREEMPTED_EXIT} (run again to resume)"
    logging.warning(msg)
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
    raise guard.Preempted(step)
