"""AdamW with linear warmup + cosine decay, decay mask, clipping."""

from __future__ import annotations

import re

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


# train.* floats the optimizer needs in range (config.validate): key -> (low, high,
# low included). A NaN or negative lr, or eps = 0 (0 / 0 for a param whose gradient
# is always 0), would put NaN in the params from finite gradients, which the step's
# finiteness check (of the loss and the gradients) does not look for.
FLOAT_RANGES = {
    "train.lr": (0.0, float("inf"), True),
    "train.eps": (0.0, float("inf"), False),
    "train.b1": (0.0, 1.0, True),
    "train.b2": (0.0, 1.0, True),
    "train.weight_decay": (0.0, float("inf"), True),
    "train.grad_clip": (0.0, float("inf"), True),
    "train.end_lr_factor": (0.0, float("inf"), True),
}


def check_floats(get) -> None:
    """`get(dotted_key)` -> value or None; raises ConfigError naming the first key out
    of its FLOAT_RANGES range."""
    from mmjax.errors import ConfigError

    for key, (low, high, closed) in FLOAT_RANGES.items():
        value = get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (low <= value if closed else low < value) and value < high
        if not ok:
            bound = f"{'>=' if closed else '>'} {low:g} and < {high:g}"
            raise ConfigError(f"bad value for config key {key!r}: {value!r}; expected a number {bound}")


def make_optimizer(train_config) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(train_config)
    parts = []
    if train_config.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(float(train_config.grad_clip)))
    layer_decay = float(train_config.get("layer_decay", 1.0) or 1.0)
    parts.append(
        optax.adamw(
            schedule,
            b1=float(train_config.get("b1", 0.9)),
            b2=float(train_config.get("b2", 0.98)),
            eps=float(train_config.get("eps", 1e-6)),
            weight_decay=float(train_config.weight_decay),
            mask=decay_mask,
            mu_dtype=train_config.get("mu_dtype", None) if train_config.get("mu_dtype", None) != "float32" else None,
        )
    )
    if layer_decay != 1.0:
        parts.append(scale_by_layer(layer_decay))
    head_mult = float(train_config.get("head_lr_mult", 1.0) or 1.0)
    if head_mult != 1.0:
        parts.append(scale_matching(head_mult, train_config.get("head_pattern", None) or HEAD_PATTERN))
    return optax.chain(*parts)


HEAD_PATTERN = r"^head/"  # the new head of a fine-tuning family (classifier, vqa)


def scale_matching(mult: float, pattern: str) -> optax.GradientTransformation:
    """Updates of params whose path matches `pattern` (re.search) times `mult`: a
    larger learning rate for a freshly initialised task head (`train.head_lr_mult`;
    VLMo 10x, BEiT-3 20x). Placed after AdamW, like `scale_by_layer`."""
    pat = re.compile(pattern)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u * mult if pat.search(param_path(p)) else u, updates
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


_BLOCK = re.compile(r"(?:^|/)(?:block|text_blocks_|fusion_blocks_|blocks_)(\d+)(?:/|$)")
_TEXT_BLOCK = re.compile(r"(?:^|/)text_blocks_(\d+)(?:/|$)")
_EMBED = re.compile(r"(?:^|/)(patch_embed|cls|pos_embedding|ln_pre|embed|image_cls|image_pos|mask_token)(?:/|$)")


def layer_ids(params) -> tuple[dict, int]:
    """{param path: layer id}: 0 for embeddings, i + 1 for transformer block i, L + 1
    for everything above the blocks (final norms, projections, heads); and L.
    ALBEF's fusion layers sit on top of its text layers: fusion block i counts as
    block (number of text blocks) + i."""
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if any(re.search(r"(^|/)encoder/blocks/", p) for p in paths):
        raise ValueError(
            "train.layer_decay needs one param per layer; with model.scan_layers=True the "
            "layers are stacked (set model.scan_layers=False to fine-tune with layer decay)"
        )
    n_text = len({m.group(1) for m in map(_TEXT_BLOCK.search, paths) if m})

    def block(path):
        m = _BLOCK.search(path)
        if not m:
            return None
        return int(m.group(1)) + (n_text if "fusion_blocks_" in m.group(0) else 0)

    blocks = [b for b in map(block, paths) if b is not None]
    top = (max(blocks) + 1 if blocks else 0) + 1
    ids = {}
    for path in paths:
        b = block(path)
        ids[path] = b + 1 if b is not None else (0 if _EMBED.search(path) else top)
    return ids, top - 1


def scale_by_layer(decay: float) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay (BEiT / ELECTRA fine-tuning): the update of a
    param in layer i is scaled by decay ** (L + 1 - i), so the head moves at the full
    lr and the embeddings at decay ** (L + 1). Placed after AdamW, it scales the
    weight decay step too, exactly like a per-layer learning rate."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        ids, num_layers = layer_ids(updates)
        scaled = jax.tree_util.tree_map_with_path(
            lambda p, u: u * (decay ** (num_layers + 1 - ids[param_path(p)])), updates
        )
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


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
            raise ValueError(
                f"train.freeze pattern {pat.pattern!r} matches no parameter; paths look like: {sample}, ..."
            )
    return jax.tree_util.tree_map_with_path(lambda p, _: not any(pat.search(param_path(p)) for pat in patterns), params)
