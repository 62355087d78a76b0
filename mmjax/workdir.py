"""A workdir: its own files (the writability check, config.json) and the one way to
open it for eval, export, fine-tuning and the Python API.

    w = open_workdir(WORKDIR, weights="student" | "ema", step=None)
    w.config  w.tokenizer  w.family  w.params  w.step

`read_params` is the one params reader: a params-only partial restore with orbax
(`params` or `ema_params` of a step's `state` item; no optimizer state, no data)
onto this machine's devices, whatever mesh, device count, process count or mode
wrote the checkpoint. The step is verified first (`checkpoint.usable_step`: a
damaged newest step is reported and the previous one read). `save_params` writes a
params-only step (what `mmjax convert` starts a workdir with), which the same
reader reads. Nothing here imports `mmjax.train`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from collections.abc import Mapping

import jax
import numpy as np

from mmjax import checkpoint as ckpt_lib

log = logging.getLogger(__name__)
WEIGHTS = {"student": "params", "ema": "ema_params"}  # --weights -> the state's field
TOKENIZER_FILE = "tokenizer.model"


def check_workdir(workdir: str) -> None:
    """ValueError unless `workdir` is (or can be made) a directory this process can write."""
    try:
        os.makedirs(workdir, exist_ok=True)
        # Unique per process of every host (PIDs repeat across containers on a shared
        # filesystem, and one process must not remove another's probe).
        probe = os.path.join(workdir, f".mmjax_write_probe.{jax.process_index()}.{os.getpid()}.{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"workdir {workdir} is not writable: {e.strerror or e}"
            + (f" ({e.filename})" if getattr(e, "filename", None) else "")
        ) from None


def save_config_json(config, workdir: str) -> str:
    path = os.path.join(workdir, "config.json")
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(config.to_json_best_effort(indent=2))
            os.replace(tmp, path)
        except OSError as e:
            raise ValueError(f"workdir {workdir} is not writable: {e.strerror or e} ({tmp})") from None
    return path


def load_config_json(workdir: str):
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} an mmjax workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def config_diff(old, new, limit: int = 12) -> list[str]:
    """['model.width (256 -> 128)', ...]: the keys where two configs differ."""

    def flat(d, pre=""):
        out = {}
        for k, v in d.items() if hasattr(d, "items") else []:
            if hasattr(v, "items"):
                out.update(flat(v, f"{pre}{k}."))
            else:
                out[f"{pre}{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    a = flat(json.loads(old.to_json_best_effort()) if hasattr(old, "to_json_best_effort") else old)
    b = flat(json.loads(new.to_json_best_effort()) if hasattr(new, "to_json_best_effort") else new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    keys.sort(key=lambda k: not k.startswith("model."))  # the shape-bearing keys first
    out = [f"{k} ({a.get(k, '<unset>')} -> {b.get(k, '<unset>')})" for k in keys]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


# ----------------------------------------------------------------------------- params


def check_weights(weights: str) -> str:
    """The state field of `weights` ('student' -> 'params', 'ema' -> 'ema_params')."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}; valid choices: {', '.join(WEIGHTS)}")
    return WEIGHTS[weights]


def checkpoint_dir(workdir: str) -> str:
    # Absolute: orbax reads no metadata from a relative path (metadata() gives None).
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def usable_step(workdir: str, step: int | None = None) -> int:
    """`step` if its checkpoint verifies against its manifest, else (None) the newest
    step that does (damaged steps are reported and passed over). FileNotFoundError
    when there is no such checkpoint, CheckpointError when none verifies."""
    ckpt_dir = checkpoint_dir(workdir)
    if step is not None and not os.path.isdir(os.path.join(ckpt_dir, str(int(step)))):
        raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt_dir}")
    return int(ckpt_lib.usable_step(ckpt_dir, step))


def _state_metadata(path: str) -> dict:
    """{field: metadata tree} of a step's `state` item (TrainState or params-only)."""
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)  # the orbax versions differ here
    return getattr(tree, "tree", tree)


def _is_array_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def read_params(workdir: str, weights: str = "student", step: int | None = None, *, sharding=None):
    """(params, step): the student params or the EMA teacher of a workdir's newest
    usable (or `step`'s) checkpoint, read params-only. A step whose files verify but do
    not read (one without a manifest) is reported and, unless `step` was asked for, the
    next older usable step read instead (CheckpointError naming each when none reads).

    sharding: None (host numpy arrays, read through this process's first device), a
    `jax.sharding.Sharding` for every leaf, or a tree of them shaped like the params
    (e.g. a run's param shardings: the arrays land sharded on its mesh).
    """
    key = check_weights(weights)
    chosen = usable_step(workdir, step)
    try:
        return _read_field(workdir, chosen, weights, key, sharding), chosen
    except ckpt_lib.CheckpointError as e:
        if step is not None:
            raise
        problems = [str(e)]
    for older in sorted((s for s in _steps(workdir) if s < chosen), reverse=True):
        log.warning("%s; trying an older step", problems[-1])
        try:
            older = usable_step(workdir, older)
            return _read_field(workdir, older, weights, key, sharding), older
        except ckpt_lib.CheckpointError as e:
            problems.append(str(e))
    raise ckpt_lib.CheckpointError("; ".join(problems))


def _steps(workdir: str) -> list[int]:
    ckpt_dir = checkpoint_dir(workdir)
    return [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []


def _read_field(workdir: str, step: int, weights: str, key: str, sharding):
    """`key` ('params' or 'ema_params') of step `step`'s state item (see read_params)."""
    import orbax.checkpoint as ocp

    path = os.path.join(checkpoint_dir(workdir), str(step), "state")
    try:
        tree = _state_metadata(path)
    except (ValueError, OSError) as e:
        raise _unreadable(workdir, step, weights, e) from e
    if not isinstance(tree, Mapping):  # its metadata file is missing or empty
        raise _unreadable(workdir, step, weights, "no array metadata in state/")
    if tree.get(key) is None:
        raise ValueError(
            f"weights={weights!r}: the {_family_name(workdir)} run in {workdir} has no EMA teacher "
            "(only ALBEF-style families keep one); use weights='student'"
        )
    target_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if sharding is None else sharding
    if isinstance(target_sharding, jax.sharding.Sharding):
        target = jax.tree.map(lambda m: _abstract(m, target_sharding), tree[key], is_leaf=_is_array_meta)
    else:
        target = jax.tree.map(_abstract, tree[key], target_sharding, is_leaf=_is_array_meta)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            path,
            args=ocp.args.PyTreeRestore(
                item={key: target},
                restore_args=ocp.checkpoint_utils.construct_restore_args({key: target}),
                partial_restore=True,
            ),
        )
    except (ValueError, OSError) as e:  # damaged beyond what a manifest saw (or none was written)
        raise _unreadable(workdir, step, weights, e) from e
    params = restored[key]
    return jax.tree.map(np.asarray, params) if sharding is None else params


def _unreadable(workdir: str, step: int, weights: str, why) -> ckpt_lib.CheckpointError:
    first = (str(why).strip().splitlines() or [type(why).__name__])[0][:300]
    return ckpt_lib.CheckpointError(
        f"checkpoint step {step} in {checkpoint_dir(workdir)}: {weights} params unreadable ({first})"
    )


def _abstract(meta, sharding):
    return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)


def _family_name(workdir: str) -> str:
    try:
        return repr(load_config_json(workdir).model.get("family"))
    except (OSError, ValueError, AttributeError):
        return "this"


def params_only_step(workdir: str) -> int | None:
    """The newest step of `workdir` when it holds params alone (`save_params`: what `mmjax
    convert` writes; its manifest lists no optimizer state), else None."""
    from mmjax import checkpoint_manifest as manifest_lib

    steps = _steps(workdir)
    if not steps:
        return None
    step = max(steps)
    shapes = (manifest_lib.read_manifest(os.path.join(checkpoint_dir(workdir), str(step))) or {}).get("shapes")
    if shapes and all(k.startswith(("['params']", "['ema_params']")) for k in shapes):
        return step
    return None


def save_params(workdir: str, params, *, ema_params=None, step: int = 0, meta: dict | None = None) -> str:
    """Writes checkpoints/STEP with a params-only state item ({'params'} and, for a
    family with a teacher, {'ema_params'}) and `meta` (plus data_position 0 and
    params_only True): what `read_params` / `open_workdir` / `finetune --init-from`
    read. Returns the step directory."""
    state = {"params": params} if ema_params is None else {"params": params, "ema_params": ema_params}
    ckpt = ckpt_lib.Checkpointer(checkpoint_dir(workdir), keep=0, async_save=False)
    try:
        ckpt.save(int(step), state, {"data_position": 0, **(meta or {}), "params_only": True})
    finally:
        ckpt.close()
    return ckpt.step_dir(step)


# ----------------------------------------------------------------------------- open


class Workdir:
    """An opened workdir: `config` (config.json, or the config given to open_workdir),
    `params` (host numpy) of checkpoint `step` (`weights`: student or ema), and, built
    on first use, `family` (zoo.build of config.model, whose run-time values
    config.json holds) and `tokenizer` (its sentencepiece model; no TensorFlow)."""

    def __init__(self, path: str, config, params, step: int, weights: str):
        self.path, self.config, self.params, self.step, self.weights = path, config, params, int(step), weights

    @functools.cached_property
    def family(self):
        from mmjax.models import zoo

        return zoo.build(self.config.model)

    @property
    def tokenizer_path(self) -> str | None:
        """data.tokenizer.path, or the workdir's tokenizer.model; None when that file is missing."""
        return _tokenizer_path(self.path, self.config)

    @functools.cached_property
    def tokenizer(self):
        from mmjax.data.tokenizer import load_tokenizer

        path = self.tokenizer_path
        if path is None:
            raise FileNotFoundError(
                f"no tokenizer for {self.path}: {_tokenizer_path(self.path, self.config, must_exist=False)} "
                "not found (a run writes WORKDIR/tokenizer.model; for another model set data.tokenizer.path "
                "to its sentencepiece file)"
            )
        tok = self.config.get("data", {}).get("tokenizer", {}) or {}
        return load_tokenizer(path, lowercase=bool(tok.get("lowercase", True)))


def _tokenizer_path(workdir: str, config, must_exist: bool = True) -> str | None:
    tok = config.get("data", {}).get("tokenizer", {}) or {}
    path = tok.get("path", None)
    path = os.path.expanduser(str(path)) if path else os.path.join(workdir, TOKENIZER_FILE)
    return path if not must_exist or os.path.isfile(path) else None


def open_workdir(workdir: str, *, weights: str = "student", step: int | None = None, config=None) -> Workdir:
    """Opens `workdir` at its newest usable checkpoint (or `step`): see `Workdir`.
    config: use this config instead of the workdir's config.json (e.g. one with
    eval overrides); it must describe the same model."""
    check_weights(weights)
    if config is None:
        config = load_config_json(workdir)
    params, step = read_params(workdir, weights, step)
    return Workdir(workdir, config, params, step, weights)
