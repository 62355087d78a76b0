"""A checkpoint step's manifest and its verification.

Process 0 writes `mmjax_manifest.json` into each step just before orbax renames it
(`checkpoint.Checkpointer`): the size and CRC32 of every file of the step's items
(state/, meta/) and the shape of every array of the state. `verify_files` checks a
step's files against it (a truncated, changed or missing file is named);
`check_shapes` compares the saved shapes with this run's state (`StateMismatch`);
`step_problem` says what makes a step unusable. A step without a manifest (written
by an older mmjax) verifies as long as it has items.
"""

from __future__ import annotations

import json
import os
import zlib

import jax
import numpy as np

MANIFEST = "mmjax_manifest.json"


class CheckpointError(ValueError):
    """No checkpoint step of a directory verifies and reads (or not the one asked for)."""


class StateMismatch(ValueError):
    """A checkpoint holds arrays of other shapes (or another tree) than this run's state."""


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _item_files(step_dir: str) -> list[str]:
    """Files of a step's items (state/, meta/), relative to the step directory. Orbax's
    own top-level files change during its final rename, so they are not covered."""
    out = []
    for item in sorted(os.listdir(step_dir)):
        top = os.path.join(step_dir, item)
        if not os.path.isdir(top):
            continue
        for root, _, names in os.walk(top):
            out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(out)


def state_shapes(tree) -> dict:
    """{key path: shape} of every array of a state (or of its abstract twin)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in flat}


def write_manifest(step_dir: str, step: int, shapes: dict) -> None:
    files = {
        rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "crc32": _crc32(os.path.join(step_dir, rel))}
        for rel in _item_files(step_dir)
    }
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "step": int(step), "files": files, "shapes": shapes}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def read_manifest(step_dir: str) -> dict | None:
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"{MANIFEST} unreadable ({e})"}


def verify_files(step_dir: str) -> str | None:
    """None when every file the step's manifest lists is there with its size and CRC32
    (or the step has no manifest); else what is wrong, naming the file."""
    if not os.path.isdir(step_dir):
        return "no such directory"
    manifest = read_manifest(step_dir)
    if manifest is None:
        return None if _item_files(step_dir) else "empty step directory (no manifest, no items)"
    if "error" in manifest:
        return manifest["error"]
    for rel, want in manifest.get("files", {}).items():
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written (truncated or changed)"
        if _crc32(path) != want["crc32"]:
            return f"{rel} fails its CRC32 check (its bytes changed after the save)"
    return None


def check_shapes(manifest: dict | None, abstract_state, where: str) -> None:
    """StateMismatch when the checkpoint's arrays differ from this run's state."""
    if not manifest or "shapes" not in manifest:
        return
    saved, want = manifest["shapes"], state_shapes(abstract_state)
    diff = [
        f"{k} {tuple(saved[k])} in the checkpoint, {tuple(want[k])} here"
        for k in want
        if k in saved and list(saved[k]) != list(want[k])
    ]
    diff += [f"{k} only in this run" for k in want if k not in saved]
    diff += [f"{k} only in the checkpoint" for k in saved if k not in want]
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise StateMismatch(
            f"{where} holds another model/optimizer state than this run's: " + "; ".join(diff[:3]) + more
        )


def step_problem(step_dir: str) -> str | None:
    """What is wrong with a step directory (`verify_files`, or its state item missing),
    or None."""
    return verify_files(step_dir) or (None if os.path.isdir(os.path.join(step_dir, "state")) else "state/ is missing")
