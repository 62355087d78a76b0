"""The family contract: what every model family has, the optional capabilities it
declares, its config schema, and the one registry of families.

A family is a class in its own `mmjax/models/zoo/<name>.py`, registered there with
`@register("name", ...)` (several names may share a class: vlmo / beit3). It states

- `Config`: a frozen dataclass of its `model.*` keys with defaults and types
  (subclass `ModelConfig`, declare fields with `key(...)`); `Config.parse(model_config)`
  checks a config section against it (unknown keys, types, choices: `ConfigError`);
- `capabilities`: a frozenset from `CAPABILITIES` naming the optional method groups
  it implements; `zoo.build` checks both ways (a declared capability without its
  methods, or a capability's method without the declaration, is an error);
- the methods every family has (`Family` below gives the defaults): `init_params`,
  `objective`, `batch_keys`, `tasks`, `init_extra` ({} unless the family keeps a
  teacher), `param_bounds` / `project_params` / `project_grads`, `image_shape`, and
  `flops(batch)`, its analytic FLOP formula (mmjax/flops.py has the per-layer helpers).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.zoo.schema import FAMILIES, ModelConfig

# capability -> the family methods it brings (what callers may then use).
CAPABILITIES = {
    # retrieval, zero-shot, embed, export: L2-normalised [B, E] embeddings; image_flops
    # is the image embedding's forward FLOPs per sample (for wrappers: classifier)
    "encode": ("encode_image", "encode_text", "image_flops"),
    # an EMA teacher and feature queues in the TrainState (ALBEF, BLIP)
    "teacher": ("init_extra", "teacher_update"),
    # GradCache accumulation (train.accum_steps > 1): contrastive-only objectives
    "accumulate": ("embed", "loss_from_embeddings"),
    # ITM re-ranking in the evaluator
    "itm": ("image_features", "text_features", "itm_scores"),
    # `mmjax caption`, caption metrics in the eval
    "caption": ("caption",),
    # class logits (classifier, VQA): the classification evaluator
    "classify": ("logits",),
    # fused image-text features [B, D] (a VQA backbone), and their FLOPs per sample
    "fuse": ("fused_features", "fused_flops"),
    # a decoder LM's per-row negative log-likelihood of text: the perplexity eval
    "lm": ("token_nll",),
    # continue prompts (text, or images + text) token by token: `mmjax generate`
    "generate": ("generate",),
    # other modalities (audio, depth, a 1-D signal) in the image-text space: X -> image /
    # text retrieval, zero-shot and embedding arithmetic in the evaluator (ImageBind)
    "bind": ("encode_modality",),
}


def register(*names):
    """Class decorator: `@register("vlmo", "beit3")` adds the family under each name."""

    def add(cls):
        for name in names:
            if name in FAMILIES and FAMILIES[name] is not cls:
                raise ValueError(f"model.family {name!r} registered twice ({FAMILIES[name].__name__}, {cls.__name__})")
            FAMILIES[name] = cls
        cls.names = tuple(dict.fromkeys(cls.__dict__.get("names", ()) + names))  # its own, not a base's
        return cls

    return add


def check_contract(family) -> None:
    """ValueError naming the capability and the method when a family's declared
    capabilities and its methods disagree (run once per build by `zoo.build`)."""
    cls = type(family)
    unknown = set(cls.capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(
            f"{cls.__name__}.capabilities {sorted(unknown)} unknown; valid capabilities: {', '.join(CAPABILITIES)}"
        )
    for cap, methods in CAPABILITIES.items():
        have = [
            m for m in methods if callable(getattr(cls, m, None)) and getattr(cls, m) is not getattr(Family, m, None)
        ]
        if cap in cls.capabilities and len(have) < len(methods):
            missing = [m for m in methods if m not in have]
            raise ValueError(f"{cls.__name__} declares capability {cap!r} but has no {', '.join(missing)}")
        if cap not in cls.capabilities and have:
            raise ValueError(
                f"{cls.__name__} defines {', '.join(have)} (capability {cap!r}) without declaring {cap!r} "
                "in its capabilities"
            )


def clamp_params(params, bounds: dict):
    """`params` with each top-level scalar named in `bounds` ({name: (low, high)})
    clipped to its range; every other leaf is returned as is. Works on dicts and
    FrozenDicts alike (the tree's structure is kept), under jit and pmap."""

    def one(path, x):
        name = _top_name(path)
        if name in bounds:
            low, high = bounds[name]
            return jnp.clip(x, low, high).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(one, params)


def bound_grads(params, grads, bounds: dict):
    """`grads` with the gradient of each top-level scalar named in `bounds` set to 0
    where the param sits at (or past) a bound and a descent step would move it further
    out: at the low bound a positive gradient, at the high bound a negative one (the
    projected gradient of a box constraint). The projection after the update would
    undo such a step anyway; left in, the gradient of a temperature held at 0.01 (tens,
    against the rest's ~1) dominates the global norm, and `train.grad_clip` then
    scales every other gradient down by as much. A gradient pointing back into the
    range passes unchanged, so the param can still leave its bound."""

    def one(path, g, x):
        name = _top_name(path)
        if name not in bounds:
            return g
        low, high = bounds[name]
        out = ((x <= low) & (g > 0)) | ((x >= high) & (g < 0))
        return jnp.where(out, jnp.zeros_like(g), g)

    return jax.tree_util.tree_map_with_path(one, grads, params)


def _top_name(path):
    return path[0].key if len(path) == 1 and hasattr(path[0], "key") else None


class Family:
    """The contract's defaults. A subclass sets `Config`, `capabilities`, `model` (its
    linen module), `image_size` / `text_len` / `num_frames`, and implements
    `objective` and `flops`.

    `init_params` builds params from dummy inputs of the family's image size and text
    length (and, for a video model, `num_frames` frames)."""

    Config = ModelConfig
    capabilities = frozenset()
    names = ()
    batch_keys = ("image", "text")  # the batch fields the objective reads
    tasks = ()  # the objectives it runs (model.tasks), where it has a choice
    model = None
    image_size = 224
    text_len = 77
    num_frames = 0  # > 0: the image input is a clip [B, T, H, W, 3]
    image_tokens = 0  # an LM connector: the image's slots in a conversation (data.chat.image_tokens)
    # finetune.init_parts: {part: model keys that must equal the part's source workdir's}
    # (what no param shape shows: an activation, a LayerNorm epsilon, the variant's depth)
    part_keys: dict = {}

    def can(self, capability: str) -> bool:
        """Whether the family declares `capability` (a key of CAPABILITIES)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"capability {capability!r} unknown; valid capabilities: {', '.join(CAPABILITIES)}")
        return capability in self.capabilities

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        """Params from dummy zeros; shapes are static tuples (eval_shape-friendly).

        image_shape: (B, H, W, 3), default (1, image_size, image_size, 3), or for a video
        model (B, T, H, W, 3), default (1, num_frames, image_size, image_size, 3);
        text_shape: (B, L), default (1, text_len). `boxed=True` keeps each param in its
        `nn.LogicallyPartitioned` box (its logical axis names, for sharding); the
        default returns plain arrays.
        """
        image = jnp.zeros(tuple(image_shape or self.image_shape()), jnp.float32)
        text = jnp.zeros(tuple(text_shape or (1, self.text_len)), jnp.int32)
        params = self.model.init(rng, image, text)["params"]
        return params if boxed else nn.unbox(params)

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=None):
        """-> (loss, metrics, updates): `updates` holds the non-gradient state the step
        stores ('queues'); `teacher` / `queues` / `step` come from the TrainState."""
        raise NotImplementedError(f"{type(self).__name__} has no objective")

    def init_extra(self, params) -> dict:
        """The state a family adds to the TrainState ({'ema_params', 'queues'}); none by default."""
        del params
        return {}

    def flops(self, batch: int) -> dict:
        """{'student': forward FLOPs per sample of what gets gradients, 'teacher': the
        EMA teacher's forward per sample} at global batch `batch` (mmjax/flops.py)."""
        raise NotImplementedError(
            f"model.family {self.names[0] if self.names else type(self).__name__!r} has no FLOP formula "
            "(Family.flops): mmjax bench cannot report its MFU"
        )

    def finish_init(self, params):
        """Params just loaded from pretrained checkpoints (finetune.init_from /
        init_parts) -> the params training starts from; as they are by default
        (CogVLM copies the LM's attention and MLP into its visual experts)."""
        return params

    def param_bounds(self) -> dict:
        """{top-level param name: (low, high)}: the params kept inside a range (a learned
        temperature or logit scale); none by default."""
        return {}

    def project_params(self, params):
        """Params after an optimizer update -> params inside their `param_bounds` (ALBEF's
        `temp.clamp_`, open_clip's `logit_scale.clamp_`). The step calls it after every
        update."""
        return clamp_params(params, self.param_bounds())

    def project_grads(self, params, grads):
        """Gradients -> the projected gradient of `param_bounds` (`bound_grads`): none
        pushes a param that sits at its bound further out. The step calls it before the
        optimizer (so before gradient clipping and Adam's moments)."""
        return bound_grads(params, grads, self.param_bounds())

    def image_shape(self, batch: int = 1) -> tuple:
        """The shape of an input batch: (B, S, S, 3), or (B, T, S, S, 3) for a video model."""
        frames = (self.num_frames,) if self.num_frames else ()
        return (batch,) + frames + (self.image_size, self.image_size, 3)


def _lookup(model_config):
    family = model_config.get("family", None)
    if family not in FAMILIES:
        raise ConfigError(f"bad value for config key 'model.family': {family!r}; valid choices: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def family_class(model_config):
    """The registered class of model_config.family (ConfigError for an unknown one)."""
    return _lookup(model_config)


def build(model_config):
    """model_config.family -> family object (e.g. ClipFamily(model_config)), its
    config checked against the family's schema and its contract checked once."""
    out = _lookup(model_config)(model_config)
    check_contract(out)
    return out


def check_config(model_config) -> None:
    """Checks a model config section against its family's schema without building
    anything (ConfigError for an unknown family or key, a type, a choice); a
    wrapper's backbone section (`model.backbone`) is checked against its own family's."""
    parsed = _lookup(model_config).Config.parse(model_config)
    backbone = getattr(parsed, "backbone", None)
    if backbone:
        check_config(backbone)
