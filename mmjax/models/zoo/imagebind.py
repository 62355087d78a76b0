"""ImageBind: bind new modalities to a frozen CLIP through images alone.

The image and text towers are a CLIP's (`finetune.init_parts` from a CLIP workdir, mmjax's
or one imported from transformers with `mmjax convert`), frozen: the recipe freezes
them (`train.freeze`) and the objective takes the image embedding under
stop_gradient, so no gradient is computed through them. Each modality of
`model.modalities` (audio, depth, a 1-D signal: `mmjax.models.modality`) gets its own
encoder, tokenizer -> blocks -> ImageBind's head (final LayerNorm, the [CLS] token, a
bias-free projection to the CLIP embedding width), trained with the symmetric InfoNCE
loss against the image embedding of the same record; the modalities' losses are
averaged. The logit scale is per modality: fixed as in the release (audio 20, depth
5, `model.logit_scale`) or learned from that start (`model.temperature='learned'`,
a param `t` in each tower, clamped to [0, ln 100]).

No (X, text) pair is ever trained on: the train batches carry no text
(`data.modalities`), so X -> text retrieval and zero-shot classification with text
prompts are emergent, through the image space (the evaluator's `bind` metrics).

Params: CLIP's (`image_tower`, `text_tower`, `image_proj`, `text_proj`, `t`) at the
top level, so a CLIP workdir loads by path, plus `<modality>_tower` per modality.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.flops import layer
from mmjax.models.modality import ModalityEncoder, frontend_flops, num_tokens
from mmjax.models.modality import input_shape as modality_input_shape
from mmjax.models.variants import parse_variant
from mmjax.models.zoo.clip import ClipConfig, ClipFamily, l2_normalize
from mmjax.models.zoo.contract import Family, register
from mmjax.models.zoo.schema import key
from mmjax.objectives import identity, itc_loss

BIND_MODALITIES = ("audio", "depth", "signal")
# Each modality's tower and tokenizer settings (model.<modality>; a recipe sets any subset).
TOWER_DEFAULTS = {
    "audio": dict(variant="B/16", overrides={}, n_fft=400, hop=160, n_mels=128, mean=-4.268, std=9.138),
    "depth": dict(variant="S/16", overrides={}),
    "signal": dict(variant="S/8", overrides={}),
}
LOGIT_SCALES = {"audio": 20.0, "depth": 5.0, "signal": 5.0}  # the release's fixed scales (IMU: 5)
MAX_LOGIT_SCALE = 100.0


def tower_options(modality: str, given) -> dict:
    """model.<modality> over its defaults; ConfigError naming an unknown key."""
    out = dict(TOWER_DEFAULTS[modality])
    given = dict(given or {})
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ConfigError(f"unknown config key 'model.{modality}.{unknown[0]}'; valid keys: {', '.join(sorted(out))}")
    out.update(given)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageBindConfig(ClipConfig):
    """CLIP's keys (the frozen towers: they must match the CLIP workdir's) plus
    modalities, one section per modality (variant, overrides and the tokenizer's
    settings: TOWER_DEFAULTS), temperature ('fixed' | 'learned'), logit_scale (per
    modality) and the audio input shape, derived from data.audio."""

    modalities: tuple = key(("audio", "depth"))
    audio: dict = key({})
    depth: dict = key({})
    signal: dict = key({})
    temperature: str = key("fixed", choices=("fixed", "learned"))
    logit_scale: dict = key({})
    # what X is bound to: 'image' (ImageBind); 'text' trains on (X, caption) pairs directly,
    # the upper bound the emergent X -> text alignment is measured against
    anchor: str = key("image", choices=("image", "text"))
    audio_sample_rate: int = key(16000, derived=True)
    audio_samples: int = key(32000, derived=True)
    audio_channels: int = key(1, derived=True)
    signal_shape: tuple = key((64, 6))  # a 1-D signal's [steps, channels] (IMU: 6 axes)

    def check(self):
        super().check()
        bad = [m for m in self.modalities if m not in BIND_MODALITIES]
        if bad or not self.modalities:
            raise ConfigError(
                f"bad value for config key 'model.modalities': {self.modalities!r}; valid members: "
                f"{', '.join(BIND_MODALITIES)} (at least one)"
            )
        for m in BIND_MODALITIES:
            tower_options(m, getattr(self, m))
        unknown = sorted(set(self.logit_scale) - set(BIND_MODALITIES))
        if unknown:
            raise ConfigError(f"model.logit_scale has unknown modality {unknown[0]!r}; valid: {BIND_MODALITIES}")


@register("imagebind")
class ImageBindFamily(Family):
    """ImageBind over a CLIP (module docstring). Capabilities: CLIP's `encode` (the
    frozen towers, for retrieval and zero-shot) and `bind` (`encode_modality`)."""

    Config = ImageBindConfig
    capabilities = frozenset({"encode", "bind"})
    # finetune.init_parts from a CLIP workdir: what no param shape shows must match it
    part_keys = {
        "image_tower": ("image", "image_overrides", "pool", "posemb", "act", "ln_eps"),
        "text_tower": ("text", "text_overrides", "act", "ln_eps", "text_pool", "eos_id"),
    }

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c = model_config, c
        clip_keys = ClipConfig.keys()
        # The frozen CLIP, built from the CLIP keys of this section (its own family object).
        self.clip = ClipFamily({**{k: v for k, v in model_config.items() if k in clip_keys}, "family": "clip"})
        self.model = self.clip.model
        self.image_size, self.text_len, self.embed_dim = c.image_size, c.text_len, c.embed_dim
        self.image_variant = self.clip.image_variant
        self.modalities = tuple(c.modalities)
        self.anchor = c.anchor
        self.batch_keys = (c.anchor,) + tuple(k for m in self.modalities for k in (m, f"{m}_len"))
        self.scales = {m: float(c.logit_scale.get(m, LOGIT_SCALES[m])) for m in self.modalities}
        self.towers, self.variants, self.options = {}, {}, {}
        for m in self.modalities:
            opts = tower_options(m, getattr(c, m))
            v = parse_variant(opts.pop("variant"), opts.pop("overrides") or {}, kind="image")
            tok = dict(opts, patch=v["patch"])
            if m == "audio":
                tok["sample_rate"] = int(c.audio_sample_rate)
            self.variants[m], self.options[m] = v, tok
            self.towers[m] = ModalityEncoder(
                m,
                v,
                tok,
                embed_dim=c.embed_dim,
                act=c.act,
                ln_eps=c.ln_eps,
                logit_scale=self.scales[m] if c.temperature == "learned" else None,
                **c.module_kw(),
            )

    # ------------------------------------------------------------------ inputs
    def input_shape(self, modality: str, batch: int = 1) -> tuple:
        """One modality's batch shape (`modality.input_shape`)."""
        return modality_input_shape(modality, self.c, batch)

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        """CLIP's params plus one `<modality>_tower` each (fresh; a CLIP workdir fills the rest)."""
        rngs = jax.random.split(rng, 1 + len(self.modalities))
        clip = self.clip.init_params(rngs[0], image_shape, text_shape, boxed=True)
        params = dict(clip)
        for r, m in zip(rngs[1:], self.modalities):
            x = jnp.zeros(self.input_shape(m), jnp.float32)
            params[f"{m}_tower"] = self.towers[m].init(r, x)["params"]
        return params if boxed else nn.unbox(params)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, params, image):
        """The frozen CLIP's image embedding [B, E] (L2-normalised)."""
        return self.clip.encode_image(params, image)

    def encode_text(self, params, text):
        """The frozen CLIP's text embedding [B, E] (L2-normalised)."""
        return self.clip.encode_text(params, text)

    def image_flops(self) -> int:
        return self.clip.image_flops()

    def _tower(self, params, modality, x, length=None):
        emb, aux = self.towers[modality].apply({"params": params[f"{modality}_tower"]}, x, length)
        return l2_normalize(emb), aux

    def encode_modality(self, params, modality, x, length=None):
        """One modality's input (audio [B, S, C] + valid samples [B], depth [B, H, W, 1],
        signal [B, T, C]) -> [B, E] float32, L2-normalised, in CLIP's embedding space."""
        if modality not in self.towers:
            raise ValueError(f"modality {modality!r} is not bound by this model; it binds {self.modalities}")
        return self._tower(params, modality, x, length)[0]

    def log_scale(self, params, modality, aux):
        """The logit scale's log: the tower's learned `t` (clamped), or the fixed one."""
        if "t" in aux:
            return jnp.clip(aux["t"], 0.0, math.log(MAX_LOGIT_SCALE))
        return jnp.float32(math.log(self.scales[modality]))

    # ------------------------------------------------------------------ training
    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, {}): the mean over modalities of the symmetric InfoNCE loss of
        (image, X) against the global batch. batch: image [b, S, S, 3] (model.anchor='text':
        text [b, L] instead) and, per modality X, X and X_len (audio: valid samples). The
        anchor's embedding is the frozen CLIP's, under stop_gradient."""
        del rng, teacher, queues, step
        encode = self.clip.encode_image if self.anchor == "image" else self.clip.encode_text
        img = jax.lax.stop_gradient(encode(params, batch[self.anchor]))
        losses, metrics = [], {}
        for m in self.modalities:
            emb, aux = self._tower(params, m, batch[m], batch.get(f"{m}_len"))
            loss, met = itc_loss(img, emb, self.log_scale(params, m, aux), gather=gather)
            losses.append(loss)
            metrics.update({f"{m}_{k}": v for k, v in met.items()})
        loss = sum(losses) / len(losses)
        metrics["loss"] = loss
        return loss, metrics, {}

    def flops(self, batch: int) -> dict:
        """Student: each modality's tower (tokenizer, blocks, projection) and its 2*2*B*E
        similarities; teacher: the frozen anchor tower's forward (no backward)."""
        e, student = self.embed_dim, 0
        for m in self.modalities:
            v = self.variants[m]
            n = num_tokens(m, self.input_shape(m)[1:], self.options[m])
            chans = self.input_shape(m)[-1]
            student += frontend_flops(m, self.input_shape(m)[1:], self.options[m])
            student += 2 * (n - 1) * v["patch"] ** (1 if m == "signal" else 2) * chans * v["width"]
            student += v["depth"] * layer(n, v["width"], v["mlp_dim"]) + 2 * v["width"] * e + 2 * 2 * batch * e
        if self.anchor == "text":  # the text tower and its projection
            tx = self.clip.text_variant
            text = tx["depth"] * layer(self.text_len, tx["width"], tx["mlp_dim"]) + 2 * tx["width"] * e
            return {"student": student, "teacher": text}
        return {"student": student, "teacher": self.clip.image_flops()}

    def param_bounds(self) -> dict:
        return {}  # CLIP's `t` is frozen; the towers' learned `t` are clamped where they are read
