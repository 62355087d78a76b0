"""A workdir's own files, apart from its checkpoints: the writability check and
config.json (written by process 0 atomically, read back as a ConfigDict, and
compared with another config key by key).
"""

from __future__ import annotations

import json
import os
import uuid

import jax


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
