"""Meta-Transformer: per-modality tokenizers into one shared encoder, light task heads.

Each modality of `model.modalities` (audio, depth, signal, image: `mmjax.models.modality`)
has its own tokenizer (patches + [CLS] + positions + `ln_pre`) and its own head (a
linear classifier on the [CLS] token over `model.num_classes`); every modality runs
through the same blocks, `encoder`, in a CLIP image tower's layout, so a CLIP workdir's
blocks load into it (`finetune.init_parts {"encoder": "W:image_tower/encoder"}`). The
recipe (configs/meta_transformer.py) keeps them frozen, as the paper does
(`train.freeze ("^encoder/",)`), or tunes them (its `tuned` argument), or, with
`model.encoder='separate'`, gives each modality blocks of its own trained from
scratch: the baseline that shows what the frozen encoder gives. The losses are the
modalities' cross-entropies on the record's `label`, averaged.

The release's tokenizers are not shared either; it fine-tunes per modality, and its
demo code does not run as released (MODELS.md). Here one model trains every
modality's tokenizer and head at once over one frozen encoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax.errors import ConfigError
from mmjax.flops import layer
from mmjax.models.attention import padding_mask
from mmjax.models.fusion import head_dense
from mmjax.models.modality import frontend_flops, num_tokens, tokenizer
from mmjax.models.modality import input_shape as modality_input_shape
from mmjax.models.transformer import ACTIVATIONS, LN_EPS, Encoder
from mmjax.models.variants import parse_variant
from mmjax.models.zoo.contract import Family, register
from mmjax.models.zoo.schema import ComputeConfig, key

META_MODALITIES = ("audio", "depth", "signal", "image")
TOKENIZER_DEFAULTS = {
    "audio": dict(patch=16, n_fft=400, hop=160, n_mels=128, mean=-4.268, std=9.138),
    "depth": dict(patch=16),
    "signal": dict(patch=8),
    "image": dict(patch=16),
}
Dtype = Any


class MetaTransformer(nn.Module):
    """`__call__(inputs {modality: (x, length or None)}) -> {modality: logits [B, classes]}`."""

    modalities: tuple
    variant: Any  # the encoder's {width, depth, heads, mlp_dim}
    options: Any  # {modality: tokenizer options}
    num_classes: int
    shared: bool = True
    act: str = "gelu_tanh"
    ln_eps: float = LN_EPS
    remat: Any = False
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _encoder(self, name):
        v = self.variant
        return Encoder(
            v["depth"], v["heads"], v["mlp_dim"], act=self.act, ln_eps=self.ln_eps, remat=self.remat,
            attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )  # fmt: skip

    @nn.compact
    def __call__(self, inputs):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = self._encoder("encoder") if self.shared else None
        out = {}
        for m in self.modalities:
            if m not in inputs:
                continue
            x, length = inputs[m]
            tokens, mask = tokenizer(m, self.variant["width"], self.options[m], name=f"tokenizer_{m}", **kw)(x, length)
            tokens = nn.LayerNorm(epsilon=self.ln_eps, name=f"ln_pre_{m}", **kw)(tokens)
            hidden, _ = (shared or self._encoder(f"encoder_{m}"))(tokens, padding_mask(mask))
            out[m] = head_dense(self.num_classes, name=f"head_{m}", param_dtype=self.param_dtype)(hidden[:, 0])
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetaTransformerConfig(ComputeConfig):
    """`image` is the encoder's variant (a CLIP image tower's: its width, depth, heads);
    modalities; one tokenizer section per modality (TOKENIZER_DEFAULTS); encoder
    ('shared' | 'separate'); num_classes; act and ln_eps as the CLIP's; the audio
    input shape derived from data.audio."""

    modalities: tuple = key(("audio", "depth"))
    audio: dict = key({})
    depth: dict = key({})
    signal: dict = key({})
    image_tokens: dict = key({})  # the image modality's tokenizer (model.image is the encoder)
    encoder: str = key("shared", choices=("shared", "separate"))
    num_classes: int = key(0)
    act: str = key("gelu_tanh", choices=tuple(ACTIVATIONS))
    ln_eps: float = key(LN_EPS)
    embed_dim: int = key(0, inert=None)  # no embedding space: heads only
    audio_sample_rate: int = key(16000, derived=True)
    audio_samples: int = key(32000, derived=True)
    audio_channels: int = key(1, derived=True)
    signal_shape: tuple = key((64, 6))

    def check(self):
        super().check()
        bad = [m for m in self.modalities if m not in META_MODALITIES]
        if bad or not self.modalities:
            raise ConfigError(
                f"bad value for config key 'model.modalities': {self.modalities!r}; valid members: "
                f"{', '.join(META_MODALITIES)} (at least one)"
            )
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes={self.num_classes}: need at least 2 classes")
        for m in META_MODALITIES:
            self.tokenizer_options(m)

    def tokenizer_options(self, modality: str) -> dict:
        out = dict(TOKENIZER_DEFAULTS[modality])
        given = dict(getattr(self, "image_tokens" if modality == "image" else modality) or {})
        unknown = sorted(set(given) - set(out))
        if unknown:
            section = "image_tokens" if modality == "image" else modality
            raise ConfigError(f"unknown config key 'model.{section}.{unknown[0]}'; valid keys: {', '.join(out)}")
        out.update(given)
        if modality == "audio":
            out["sample_rate"] = int(self.audio_sample_rate)
        return out


@register("meta_transformer")
class MetaTransformerFamily(Family):
    """Meta-Transformer (module docstring). Capability `classify`: `logits(params, x,
    length=None, modality=...)`, evaluated per modality (`classify_modalities`)."""

    Config = MetaTransformerConfig
    capabilities = frozenset({"classify"})
    part_keys = {"encoder": ("image", "image_overrides", "act", "ln_eps")}

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c = model_config, c
        self.image_size, self.num_classes = c.image_size, c.num_classes
        self.modalities = self.classify_modalities = tuple(c.modalities)
        self.batch_keys = tuple(k for m in self.modalities for k in (m, f"{m}_len")) + ("label",)
        self.variant = parse_variant(c.image, c.image_overrides, kind="image")
        self.options = {m: c.tokenizer_options(m) for m in self.modalities}
        self.model = MetaTransformer(
            self.modalities,
            self.variant,
            self.options,
            c.num_classes,
            shared=c.encoder == "shared",
            act=c.act,
            ln_eps=c.ln_eps,
            **c.module_kw(),
        )

    def input_shape(self, modality: str, batch: int = 1) -> tuple:
        """One modality's batch shape (`modality.input_shape`)."""
        return modality_input_shape(modality, self.c, batch)

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        del image_shape, text_shape
        inputs = {m: (jnp.zeros(self.input_shape(m), jnp.float32), None) for m in self.modalities}
        params = self.model.init(rng, inputs)["params"]
        return params if boxed else nn.unbox(params)

    def _inputs(self, batch):
        return {m: (batch[m], batch.get(f"{m}_len")) for m in self.modalities if m in batch}

    def logits(self, params, x, length=None, *, modality):
        """One modality's input -> class logits [B, num_classes] float32."""
        return self.model.apply({"params": params}, {modality: (x, length)})[modality]

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=None):
        """-> (loss, metrics, {}): the mean over modalities of the cross-entropy on `label`."""
        del rng, teacher, queues, step, gather
        logits = self.model.apply({"params": params}, self._inputs(batch))
        labels = batch["label"]
        losses, metrics = [], {}
        for m, lg in logits.items():
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, labels))
            losses.append(loss)
            metrics[f"{m}_loss"] = loss
            metrics[f"{m}_acc"] = jnp.mean((jnp.argmax(lg, -1) == labels).astype(jnp.float32))
        loss = sum(losses) / len(losses)
        metrics["loss"] = loss
        return loss, jax.tree.map(jnp.asarray, metrics), {}

    def flops(self, batch: int) -> dict:
        """Per modality: the tokenizer's patch projection, the blocks over its tokens
        and the head. A frozen encoder still runs forward and backward (the tokenizers
        below it train), so everything counts as student."""
        del batch
        v, total = self.variant, 0
        for m in self.modalities:
            shape, opts = self.input_shape(m)[1:], self.options[m]
            n = num_tokens(m, shape, opts)
            p = int(opts["patch"])
            total += (
                frontend_flops(m, shape, opts) + 2 * (n - 1) * p ** (1 if m == "signal" else 2) * shape[-1] * v["width"]
            )
            total += v["depth"] * layer(n, v["width"], v["mlp_dim"]) + 2 * v["width"] * self.num_classes
        return {"student": total, "teacher": 0}
