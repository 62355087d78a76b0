"""Orbax checkpoints: state + data position + config, async, atomic, keep-N.

Orbax writes each step into a temporary directory and renames it when complete,
so a save that fails (a full disk, a killed process) leaves the previous good
checkpoint untouched; `latest_step` only ever sees finished steps.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores `TrainState` plus a JSON `meta` dict (data position, ...)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an (async) save; blocks only until device buffers are copied."""
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, abstract_state, step: int | None = None):
        """Restores into the shapes/shardings of `abstract_state` (from `jax.eval_shape`
        with `.sharding` set), so a checkpoint lands directly on the target mesh.

        Returns `(state, meta)`, or `None` when there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying target shardings, for restoring onto a mesh."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


def save_config_json(config, workdir: str) -> str:
    path = os.path.join(workdir, "config.json")
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(tmp, path)
    return path


def load_config_json(workdir: str):
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} an mmjax workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
