"""Starting a run from a pretraining checkpoint: `mmjax finetune --init-from SRC`.

`pretrained_params(src, weights)` reads the student params or the EMA teacher of a
workdir's latest checkpoint (or of `WORKDIR/checkpoints/STEP`). `transplant(init,
pretrained, prefix)` fills a new model's params from them: every leaf of the new
tree is taken from the same path of the pretrained tree (under `prefix`, e.g. the
classifier's `backbone/`), position embeddings are resized when the image size or
patch grid changed, an image patch kernel [P, P, C, D] becomes a video model's
tubelet kernel [t, P, P, C, D] (`video.inflate_patch_kernel`, finetune.inflation
'central' or 'mean'), and leaves the new model has but the checkpoint lacks (a new
head; a video model's temporal embedding and temporal layers, which start as the
identity, so an image-text checkpoint continues on video where it stopped) keep their
fresh init; a text position table for a longer text keeps the
pretrained rows and fresh ones past them. What the checkpoint has but the task does not need
(text tower for an image classifier, ITM/MLM heads, queues, teacher, optimizer
state) is left behind.
"""

from __future__ import annotations

import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.parallel.sharding import path_str

log = logging.getLogger(__name__)
POSEMB = re.compile(r"(^|/)(pos_embedding|image_pos)$")


def source(src: str) -> tuple[str, int | None]:
    """'WORKDIR' or 'WORKDIR/checkpoints/STEP' -> (workdir, step or None)."""
    src = os.path.abspath(os.path.expanduser(src))
    head, tail = os.path.split(src)
    if tail.isdigit() and os.path.basename(head) == "checkpoints":
        return os.path.dirname(head), int(tail)
    return src, None


def pretrained_params(src: str, weights: str = "student"):
    """(model config, params) of a pretraining workdir's checkpoint (host numpy), read
    params-only on this machine whatever topology wrote it (`mmjax.workdir.open_workdir`)."""
    from mmjax import workdir as workdir_lib

    workdir, step = source(src)
    opened = workdir_lib.open_workdir(workdir, weights=weights, step=step)
    log.info("init from %s step %d (%s weights)", workdir, opened.step, weights)
    return opened.config.model, opened.params


def subtree(params, path: str):
    """params['a']['b'] for 'a/b'; KeyError naming the path and the keys there."""
    node = params
    for part in [p for p in path.split("/") if p]:
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(f"no subtree {path!r} in the pretrained params (keys here: {sorted(node)[:8]})")
        node = node[part]
    return node


def interpolate_posemb(table, new_len: int):
    """[1, (1+)g0*g0, D] -> [1, (1+)g1*g1, D]: the patch grid resized (bicubic), the
    [CLS] position (if the lengths say there is one) kept. Same length: unchanged."""
    table = np.asarray(table)
    old_len = table.shape[1]
    if old_len == new_len:
        return table
    cls = 0 if math.isqrt(old_len) ** 2 == old_len and math.isqrt(new_len) ** 2 == new_len else 1
    g0, g1 = math.isqrt(old_len - cls), math.isqrt(new_len - cls)
    if g0 * g0 != old_len - cls or g1 * g1 != new_len - cls:
        raise ValueError(f"position table of length {old_len} cannot become {new_len}: not a square patch grid")
    grid = table[:, cls:].reshape(1, g0, g0, -1)
    resized = jax.image.resize(jnp.asarray(grid, jnp.float32), (1, g1, g1, grid.shape[-1]), "bicubic")
    out = np.concatenate([table[:, :cls], np.asarray(resized, table.dtype).reshape(1, g1 * g1, -1)], axis=1)
    log.info("position embedding resized from a %dx%d to a %dx%d grid", g0, g0, g1, g1)
    return out


def extend_text_posemb(table, fresh):
    """A text position table [L0, D] for a new text length L1 (fresh: the new model's
    init [L1, D]): the first min(L0, L1) rows are the pretrained ones, rows past L0
    keep their fresh init (a 1-D text position has no neighbour to interpolate)."""
    table, out = np.asarray(table), np.array(fresh, copy=True)
    n = min(table.shape[0], out.shape[0])
    out[:n] = table[:n]
    log.info("text position table %d -> %d rows (%d pretrained)", table.shape[0], out.shape[0], n)
    return out


def match_layer_layout(pretrained, init_params, prefix: str = ""):
    """Pretrained params with each transformer encoder in the new model's layout:
    stacked (`encoder/blocks`, model.scan_layers=True) or unrolled (`encoder/block00`,
    ...), converting where the two differ, so a checkpoint moves either way."""
    from mmjax.models.transformer import stack_blocks, unstack_blocks

    target = init_params
    for part in [p for p in prefix.split("/") if p]:
        target = target.get(part, {}) if hasattr(target, "get") else {}

    def walk(pre, tgt):
        if not hasattr(pre, "items") or not hasattr(tgt, "items"):
            return pre
        if "blocks" in tgt and "block00" in pre:
            pre = stack_blocks(pre, len([k for k in pre if k.startswith("block") and k[5:].isdigit()]))
        elif "block00" in tgt and "blocks" in pre:
            pre = unstack_blocks(pre)
        return {k: walk(v, tgt.get(k, {})) for k, v in pre.items()}

    return walk(pretrained, target)


PATCH_KERNEL = re.compile(r"(^|/)patch_embed/conv/kernel$")


def transplant(init_params, pretrained, prefix: str = "", inflation: str = "central"):
    """New params filled from `pretrained` (see the module docstring).

    Returns (params, report) with report = {'loaded': n, 'resized': [...], 'kept_init': [...],
    'unused': n}. A leaf whose shape differs (other than a position table) is an error
    naming the path and both shapes.
    """
    pretrained = match_layer_layout(pretrained, init_params, prefix)
    flat_pre = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
    used, resized, kept = set(), [], []

    def one(path, leaf):
        key = path_str(path)
        src = key[len(prefix) :] if prefix and key.startswith(prefix) else (None if prefix else key)
        if src is None or src not in flat_pre:
            kept.append(key)
            return leaf
        value = flat_pre[src]
        used.add(src)
        if tuple(value.shape) != tuple(leaf.shape):
            if POSEMB.search(key) and value.ndim == 3 and value.shape[2] == leaf.shape[2]:
                value = interpolate_posemb(value, leaf.shape[1])
                resized.append(key)
            elif POSEMB.search(key) and value.ndim == 2 and value.shape[1] == leaf.shape[1]:
                value = extend_text_posemb(value, np.asarray(leaf))
                resized.append(key)
            elif PATCH_KERNEL.search(key) and value.ndim == 4 and leaf.ndim == 5 and value.shape == leaf.shape[1:]:
                from mmjax.models.video import inflate_patch_kernel

                value = inflate_patch_kernel(value, leaf.shape[0], inflation)
                resized.append(key)
            else:
                raise ValueError(
                    f"pretrained {src} has shape {tuple(value.shape)} but the new model's {key} "
                    f"has {tuple(leaf.shape)}; only position tables are resized and image "
                    "patch kernels inflated to tubelets"
                )
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(one, init_params)
    report = {"loaded": len(used), "resized": resized, "kept_init": kept, "unused": len(flat_pre) - len(used)}
    if not used:
        raise ValueError(
            f"no pretrained param matches the new model (prefix {prefix!r}); "
            f"pretrained paths look like {list(flat_pre)[:3]}"
        )
    return params, report


def check_part_configs(model_config, parts: dict, load_config) -> None:
    """finetune.init_parts: for each part the family lists in `part_keys`, the model keys
    that no param shape checks (the vision tower's variant, activation, LayerNorm
    epsilon, pooling, position embedding) must equal those of the part's source
    workdir (`load_config(workdir)` -> its config) where it has them; ValueError naming
    the part, each differing key and the overrides that match the source."""
    from mmjax.models import zoo
    from mmjax.models.variants import parse_variant

    keys_of = zoo.family_class(model_config).part_keys
    for part, (src, _) in parts.items():
        keys = keys_of.get(part, ())
        try:
            theirs = load_config(src).model
        except (OSError, ValueError):
            continue  # a bare checkpoint directory: no config to compare
        if not keys or "image" in keys and "image" not in theirs:
            continue
        ours_v = {k: _plain(model_config.get(k)) for k in keys if k in theirs}
        theirs_v = {k: _plain(theirs.get(k)) for k in ours_v}
        if "image" in ours_v:  # the resolved variant: 'mu/8' + overrides may equal a custom dict
            for side in (ours_v, theirs_v):
                side["image"] = parse_variant(side["image"], side.pop("image_overrides", None) or {}, kind="image")
        diff = [k for k in ours_v if ours_v[k] != theirs_v[k]]
        if diff:
            fixes = " ".join(f"--config.model.{k}={_plain(theirs.get(k))!r}" for k in keys if k in theirs)
            raise ValueError(
                f"finetune.init_parts[{part!r}] from {src}: model keys {', '.join(diff)} differ from that workdir's "
                f"({', '.join(f'{k}: {ours_v[k]!r} here, {theirs_v[k]!r} there' for k in diff)}); set {fixes}"
            )


def _plain(v):
    return v.to_dict() if hasattr(v, "to_dict") else v
