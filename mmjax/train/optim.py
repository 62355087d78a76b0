"""AdamW with linear warmup + cosine decay, decay mask, clipping."""
from __future__ import annotations

import jax
import optax

from mmjax.parallel import sharding


def learning_rate_schedule(train_config) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, cosine to `lr * end_lr_factor`."""
    steps = int(train_config.steps)
    warmup = min(int(train_config.warmup_steps), max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(train_config.lr),
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=float(train_config.lr) * float(train_config.get("end_lr_factor", 0.0)),
    )


def decay_mask(params):
    """True for weights that get weight decay: matrices and kernels only.

    Norm scales, biases, embeddings of rank 1 and scalar temperatures are excluded
    (the usual CLIP/ViT recipe).
    """
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(train_config)
    parts = []
    if train_config.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(float(train_config.grad_clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(train_config.get("b1", 0.9)),
            b2=float(train_config.get("b2", 0.98)),
            eps=float(train_config.get("eps", 1e-6)),
            weight_decay=float(train_config.weight_decay),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


param_path = sharding.path_str  # a jax key path -> 'image_tower/encoder/block00/attn/qkv/kernel'


def trainable_mask(params, freeze=()):
    """Pytree of bools like `params`: False for params whose path matches any regex
    in `freeze` (re.search on 'a/b/c' paths), True otherwise; None if nothing is frozen.

    A pattern that matches no param is an error: a typo would silently train
    what was meant to be frozen.
    """
    import re

    patterns = [re.compile(p) for p in (freeze or ())]
    if not patterns:
        return None
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pat in patterns:
        if not any(pat.search(s) for s in paths):
            sample = ", ".join(paths[:6])
            raise ValueError(f"train.freeze pattern {pat.pattern!r} matches no parameter; "
                             f"paths look like: {sample}, ...")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: not any(pat.search(param_path(p)) for pat in patterns), params)
