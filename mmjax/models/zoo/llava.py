"""LLM connectors: LLaVA (an image tower's tokens through a projector into a decoder
LM's input sequence) and CogVLM (the same, plus a visual expert in every LM layer)
(MODELS.md; issue 17).

Shape letters: B batch, L sequence, T image tokens, Dv vision width, D LM width, V vocabulary.

- Vision: a ViT (the CLIP image tower's layout: bias-free patches, `ln_pre`, model.pool
  / posemb / act / ln_eps as the CLIP it comes from), its tokens read at
  `model.feature_layer` (-2: the penultimate block's output, LLaVA's default; -1 the
  last block's), the [CLS] token dropped: T = (S / P)^2 tokens [B, T, Dv].
- Projector (`model.projector`): 'linear' (MiniGPT-4 / LLaVA 1.0) or 'mlp2x_gelu'
  (LLaVA 1.5: Dense(D), exact GELU, Dense(D)) -> [B, T, D].
- LM (`model.lm`, mmjax/models/llm.py): the batch's `tokens` embedded, the image
  features put at the `image_slots` positions (in order), RoPE positions counting the
  valid tokens (CogVLM: every image token of an image on one position), attention
  causal or, with model.prefix_lm, prefix-LM (image + prompt bidirectional).
- Loss: next-token cross entropy on the `loss_mask` tokens only (the assistant's
  answers, mmjax/data/conversations.py).

What trains is set by the recipe through `train.freeze` (the stages of LLaVA: the
projector alone, then projector + LM; CogVLM: the experts and projector, the LM
frozen); LoRA adapters (`model.lora_rank` > 0) train beside a frozen LM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.flops import vit
from mmjax.models.llm import DecoderLM, LMSpec, lm_mask
from mmjax.models.transformer import ACTIVATIONS, LN_EPS, gelu_exact
from mmjax.models.variants import parse_variant
from mmjax.models.vit import image_tower
from mmjax.models.zoo.contract import Family, register
from mmjax.models.zoo.lm import LmKeys, lm_flops, lm_spec
from mmjax.models.zoo.schema import key
from mmjax.objectives import identity, lm_loss
from mmjax.parallel.sharding import dense_init

Dtype = Any
PROJECTORS = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
    """[B, T, Dv] -> [B, T, D]: 'linear' (`linear`) or 'mlp2x_gelu' (`fc1`, GELU, `fc2`)."""

    kind: str
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxDv):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kind == "linear":
            return nn.Dense(self.width, name="linear", **kw, **dense_init("embed", "mlp"))(x_BxTxDv)
        h = nn.Dense(self.width, name="fc1", **kw, **dense_init("embed", "mlp"))(x_BxTxDv)
        return nn.Dense(self.width, name="fc2", **kw, **dense_init("mlp", "embed"))(gelu_exact(h))


def place_images(x_BxLxD, feats_BxTxD, slots_BxL):
    """The text embeddings with the image features written at the slot positions, in
    order (slot k of a row takes feature k; a row without slots is unchanged)."""
    t = feats_BxTxD.shape[1]
    idx = jnp.clip(jnp.cumsum(slots_BxL, axis=1) - 1, 0, t - 1)
    at = jnp.take_along_axis(feats_BxTxD, idx[:, :, None], axis=1).astype(x_BxLxD.dtype)
    return jnp.where(slots_BxL[:, :, None], at, x_BxLxD)


def positions_of(valid_BxL, slots_BxL, shared_image_position: bool):
    """RoPE positions: the count of valid tokens before each one; with
    `shared_image_position` (CogVLM) an image's tokens after its first take no new
    position, so all of them sit on one."""
    step = valid_BxL
    if shared_image_position:
        after_first = slots_BxL & jnp.pad(slots_BxL, ((0, 0), (1, 0)))[:, :-1]
        step = valid_BxL & ~after_first
    return jnp.maximum(jnp.cumsum(step.astype(jnp.int32), axis=1) - 1, 0)


def lora_flops(spec: LMSpec, length: int, rank: int) -> int:
    """The LoRA adapters' matmuls over `length` tokens: (x @ a) @ b = 2*L*r*(in + out)
    for q, k, v, o, gate, up and down of every layer."""
    s = spec
    d, q, kv, f = s.width, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.mlp_dim
    per = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)
    return s.depth * 2 * length * rank * per


class Llava(nn.Module):
    """Methods: `image_features(image) -> [B, T, D]` (projected), `__call__(image,
    tokens, image_slots, valid, prefix) -> logits float32 [B, L, V]`."""

    image: Any  # the ViT variant (parse_variant)
    spec: LMSpec
    projector: str = "mlp2x_gelu"
    feature_layer: int = -2
    prefix_lm: bool = False
    pool: str = "cls"
    posemb: str = "learn"
    act: str = "quick_gelu"
    ln_eps: float = LN_EPS
    remat: Any = "none"
    scan: bool = False
    attention: str = "xla"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        vit_kw = dict(pool=self.pool, posemb=self.posemb, patch_bias=False, pre_norm=True)
        self.vision = image_tower(self.image, UnscannedOwner(self), act=self.act, ln_eps=self.ln_eps, **vit_kw)
        self.proj = Projector(self.projector, self.spec.width, name="projector", **kw)
        lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
        self.lm = DecoderLM(self.spec, remat=self.remat, scan=self.scan, attention=self.attention, **lora, **kw)

    def image_features(self, image_BxHxWx3):
        _, aux = self.vision(image_BxHxWx3)
        depth = self.image["depth"]
        layer = self.feature_layer % depth
        tokens = aux["encoder"][f"block{layer:02d}"]
        if self.pool == "cls":
            tokens = tokens[:, 1:]
        return self.proj(tokens)

    def inputs(self, image, tokens_BxL, slots_BxL, valid_BxL, prefix_BxL):
        """-> (x [B, L, D], positions [B, L], mask [B, 1, L, L]): what the LM reads."""
        x = place_images(self.lm.embed(tokens_BxL), self.image_features(image), slots_BxL)
        positions = positions_of(valid_BxL, slots_BxL, self.spec.visual_expert)
        mask = lm_mask(valid_BxL, prefix_BxL if self.prefix_lm else None)
        return x, positions, mask

    def __call__(self, image, tokens_BxL, slots_BxL, valid_BxL, prefix_BxL):
        x, positions, mask = self.inputs(image, tokens_BxL, slots_BxL, valid_BxL, prefix_BxL)
        return self.lm.logits(self.lm(x, positions, mask, slots_BxL))


class UnscannedOwner:
    """The owner attributes `vit.image_tower` reads, with the vision tower unscanned
    (its per-block outputs are needed for the feature layer)."""

    def __init__(self, owner):
        self.remat, self.attention, self.scan = owner.remat, owner.attention, False
        self.dtype, self.param_dtype, self.video = owner.dtype, owner.param_dtype, None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlavaConfig(LmKeys):
    """LLaVA / CogVLM keys: LmKeys (model.lm, scan_layers for the LM, dtypes, remat,
    attention) + the vision tower (image, image_overrides, pool, posemb, act, ln_eps:
    as the CLIP it is taken from), feature_layer, projector, prefix_lm, and LoRA
    (lora_rank: 0 = none; lora_alpha)."""

    image: str = key("mu/8")
    image_overrides: dict = key({})
    pool: str = key("cls", choices=("cls",))
    posemb: str = key("learn", choices=("learn", "sincos2d"))
    act: str = key("gelu_tanh", choices=tuple(ACTIVATIONS))
    ln_eps: float = key(LN_EPS)
    feature_layer: int = key(-2)
    projector: str = key("mlp2x_gelu", choices=PROJECTORS)
    prefix_lm: bool = key(False)
    lora_rank: int = key(0)
    lora_alpha: float = key(16.0)


BATCH = ("image", "tokens", "image_slots", "valid", "prefix")


@register("llava", "cogvlm")
class LlavaFamily(Family):
    """LLaVA-style (model.family='llava') and CogVLM-style ('cogvlm': a visual expert
    in every LM layer, image tokens on one RoPE position) connectors (keys: LlavaConfig)."""

    Config = LlavaConfig
    capabilities = frozenset({"generate"})
    batch_keys = BATCH + ("loss_mask",)
    part_keys = {"vision": ("image", "image_overrides", "pool", "posemb", "act", "ln_eps")}

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c = model_config, c
        self.image_size, self.text_len, self.num_frames = c.image_size, c.text_len, 0
        self.expert = model_config.get("family") == "cogvlm"
        self.spec = lm_spec(c.lm, c.need("vocab_size"), visual_expert=self.expert)
        self.image_variant = im = parse_variant(c.image, c.image_overrides, kind="image")
        if not -im["depth"] <= c.feature_layer < im["depth"]:
            raise ValueError(f"model.feature_layer={c.feature_layer} outside the vision tower's {im['depth']} blocks")
        self.pad_id = c.tokens.need("pad", "the LM's padding")
        self.eos_id = c.tokens.eos
        kw = dict(c.module_kw(), lora_rank=int(c.lora_rank), lora_alpha=float(c.lora_alpha))
        self.model = self.build_model(c, im, kw)
        self.image_tokens = self.count_image_tokens(c, im)
        self.lm = DecoderLM(self.spec, **kw)  # the LM alone, as inside the model: generation

    def build_model(self, c, image_variant, kw) -> nn.Module:
        """The linen module (kw: the compute and LoRA keywords)."""
        return Llava(
            image_variant,
            self.spec,
            projector=c.projector,
            feature_layer=c.feature_layer,
            prefix_lm=c.prefix_lm,
            pool=c.pool,
            posemb=c.posemb,
            act=c.act,
            ln_eps=c.ln_eps,
            **kw,
        )

    def count_image_tokens(self, c, image_variant) -> int:
        """The image's slots in a conversation: T = (S / P)^2 patch tokens ([CLS] dropped)."""
        return (c.image_size // image_variant["patch"]) ** 2

    def dummy_batch(self, b: int = 1, length: int | None = None) -> dict:
        length = int(length or self.text_len)
        slots = jnp.zeros((b, length), bool).at[:, 1 : 1 + self.image_tokens].set(True)
        return dict(
            image=jnp.zeros(self.image_shape(b), jnp.float32),
            tokens=jnp.zeros((b, length), jnp.int32),
            image_slots=slots,
            valid=jnp.ones((b, length), bool),
            prefix=jnp.zeros((b, length), bool),
        )

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        b = dict(self.dummy_batch(1, (text_shape or (1, self.text_len))[1]))
        params = self.model.init(rng, *(b[k] for k in BATCH))["params"]
        return params if boxed else nn.unbox(params)

    def forward(self, params, batch):
        return self.model.apply({"params": params}, *(batch[k] for k in BATCH))

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, {}): next-token cross entropy on the answer tokens."""
        del rng, teacher, queues, step
        logits = self.model.apply({"params": params}, *(batch[k] for k in BATCH))
        loss, metrics = lm_loss(
            logits,
            batch["tokens"],
            label_smoothing=self.c.label_smoothing,
            pad_id=self.pad_id,
            gather=gather,
            target_mask_BxL=batch["loss_mask"],
        )
        return loss, {**metrics, "loss": loss}, {}

    def flops(self, batch: int) -> dict:
        """The vision tower (frozen, but its forward runs: counted as 'teacher', no
        backward), the projector 2*T*Dv*D (+ 2*T*D*D for mlp2x_gelu), the LM over L
        tokens (`lm_flops`; the expert doubles no matmul: each token uses one set)
        plus, for CogVLM, the image tokens' second set of projections (computed for
        every token: 2x the q/k/v/o and MLP matmuls), and LoRA's adapters (`lora_flops`)."""
        del batch
        im, s, t = self.image_variant, self.spec, self.image_tokens
        proj = 2 * t * im["width"] * s.width + (2 * t * s.width * s.width if self.c.projector != "linear" else 0)
        lm = lm_flops(s, self.text_len)
        if self.expert:
            per = 2 * s.width * s.head_dim * (2 * s.heads + 2 * s.kv_heads) + 3 * 2 * s.width * s.mlp_dim
            lm += s.depth * self.text_len * per
        if self.c.lora_rank:
            lm += lora_flops(s, self.text_len, int(self.c.lora_rank)) * (2 if self.expert else 1)
        return {"student": proj + lm, "teacher": vit(im, self.image_size)}

    def generate(self, params, prompt: dict, *, max_new_tokens: int, **opts):
        """prompt {'image' [B, S, S, 3], 'ids' [B, P], 'valid', 'image_slots' (and
        'prefix') [B, P]}, left-padded -> (new tokens [B, N], scores [B])."""
        from mmjax.models import generate as generate_lib

        prefix = prompt.get("prefix", prompt["valid"])
        x, positions, _ = self.model.apply(
            {"params": params},
            prompt["image"],
            prompt["ids"],
            prompt["image_slots"],
            prompt["valid"],
            prefix,
            method="inputs",
        )
        return generate_lib.generate(
            self.lm,
            params["lm"],
            x,
            prompt["valid"],
            max_new_tokens=int(max_new_tokens),
            eos_ids=self.stop_ids(),
            pad_id=self.pad_id,
            prompt_positions_BxP=positions,
            prompt_prefix_BxP=prefix if self.c.prefix_lm else None,
            prompt_expert_BxP=prompt["image_slots"] if self.expert else None,
            **opts,
        )

    def finish_init(self, params):
        """CogVLM: each layer's visual expert starts as a copy of the LM's attention and
        MLP (`attn_img` <- `attn`, `mlp_img` <- `mlp`), so the loaded LM computes the
        same on image tokens before training; LLaVA: unchanged."""
        if not self.expert:
            return params
        lm = dict(params["lm"])
        for name, layer in lm.items():
            if name == "layers" or (name.startswith("layer") and name[5:].isdigit()):
                copy = {e: {k: layer[e[:-4]][k] for k in layer[e]} for e in ("attn_img", "mlp_img")}
                lm[name] = {**layer, **copy}
        return {**params, "lm": lm}

    def stop_ids(self) -> tuple:
        return () if self.eos_id is None else (int(self.eos_id),)
