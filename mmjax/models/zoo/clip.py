"""CLIP / SigLIP dual encoder and its family object (objective, eval encoders).

Shape letters: B batch, H/W image size, L text length, E embed dim.

Architecture follows OpenAI CLIP so that 'B/16' + text 'B' (224px, 77 tokens,
vocab 49408, embed 512) has exactly OpenAI's 149,620,737 parameters: bias-free
patch conv, [CLS] token, `ln_pre` before the image encoder, bias-free
projections, and one logit scale `t`. The sigmoid loss adds the scalar bias `b`.

`act`, `ln_eps` and `text_pool` / `eos_id` (config keys model.act, model.ln_eps,
model.text_pool, model.eos_id) select the MLP activation, the LayerNorm epsilon and
the text pooling rule; with act='quick_gelu' (or 'gelu'), ln_eps=1e-5 and
text_pool='argmax' (or 'eos') the model computes what transformers' CLIPModel does
(see mmjax.export.hf).
"""

import dataclasses
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.flops import layer, vision
from mmjax.models.fusion import head_dense
from mmjax.models.text import PAD_ID, TextEncoder
from mmjax.models.text import POOLS as TEXT_POOLS
from mmjax.models.transformer import ACTIVATIONS, LN_EPS
from mmjax.models.variants import parse_variant
from mmjax.models.vit import image_tower
from mmjax.models.zoo.common import Family, logit_scale_bounds, video_options
from mmjax.models.zoo.contract import register
from mmjax.models.zoo.schema import ANY, DTYPES, TowerConfig, key
from mmjax.objectives import identity, itc_loss, sigmoid_loss
from mmjax.objectives.contrastive import NEG_SCOPES
from mmjax.parallel.sharding import names

Dtype = Any
LOSSES = ("softmax", "sigmoid")
POOLS = ("cls", "gap")  # the ViT's pooling: its [CLS] token, or the mean of the patch tokens
POSEMBS = ("learn", "sincos2d")  # vit.ViT's position embeddings
__all__ = ["CLIP", "ClipFamily", "ClipConfig", "DTYPES", "l2_normalize"]


def l2_normalize(x, eps=1e-6):
    """Row-wise L2 normalisation in float32: [..., E] -> [..., E] float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


class CLIP(nn.Module):
    """Image tower (ViT) + text tower (causal) + bias-free projections to E.

    `__call__(image: [B, H, W, 3] float32, text: [B, L] int32)
     -> (img_emb: [B, E] float32, txt_emb: [B, E] float32, aux)`, both
    L2-normalised. aux: {'image': ViT aux, 'text': text aux}. Params `t`
    (log logit scale) and, for loss='sigmoid', `b` (logit bias) are created at
    init by `__call__`. `project_image` / `project_text` give the projected features
    before the normalisation (transformers' `get_image_features` / `get_text_features`).
    """

    image: Any  # parse_variant(..., kind='image') dict, frozen by flax
    text: Any  # parse_variant(..., kind='text') dict
    embed_dim: int
    vocab_size: int
    text_len: int
    loss: str = "softmax"
    pool: str = "cls"
    posemb: str = "learn"
    act: str = "gelu_tanh"  # MLP activation of both towers (transformer.ACTIVATIONS)
    ln_eps: float = LN_EPS  # every LayerNorm's epsilon
    text_pool: str = "last"  # text pooling rule (text.POOLS)
    eos_id: Any = None  # the eos id, for text_pool='eos'
    pad_id: int = PAD_ID  # the tokenizer's pad id, for text_pool='last' (model.token_ids)
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    scan: bool = False  # nn.scan over the blocks (transformer.Encoder)
    video: Any = None  # ViT video keywords (common.video_options); None: an image model
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.loss not in LOSSES:
            raise ValueError(f"model_config.loss must be one of {LOSSES}, got {self.loss!r}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        im, tx = self.image, self.text
        self.image_tower = image_tower(
            im,
            self,
            pool=self.pool,
            posemb=self.posemb,
            patch_bias=False,
            pre_norm=True,
            act=self.act,
            ln_eps=self.ln_eps,
        )
        self.text_tower = TextEncoder(
            self.vocab_size,
            self.text_len,
            tx["width"],
            tx["depth"],
            tx["heads"],
            tx["mlp_dim"],
            pool=self.text_pool,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            act=self.act,
            ln_eps=self.ln_eps,
            remat=self.remat,
            attention=self.attention,
            scan=self.scan,
            **kw,
        )
        # The projections are heads: a float32 matmul whatever the compute dtype (fusion.head_dense).
        proj = lambda name: head_dense(self.embed_dim, use_bias=False, name=name, param_dtype=self.param_dtype)
        self.image_proj = proj("image_proj")
        self.text_proj = proj("text_proj")
        init_t = math.log(1 / 0.07) if self.loss == "softmax" else math.log(10.0)
        self.t = self.param("t", names(nn.initializers.constant(init_t)), (), jnp.float32)
        if self.loss == "sigmoid":
            self.b = self.param("b", names(nn.initializers.constant(-10.0)), (), jnp.float32)

    def _image(self, image_BxHxWx3):
        chex.assert_rank(image_BxHxWx3, {4, 5})  # images, or clips [B, T, H, W, 3]
        pooled, aux = self.image_tower(image_BxHxWx3)
        return self.image_proj(pooled), aux

    def _text(self, text_BxL):
        chex.assert_rank(text_BxL, 2)
        pooled, aux = self.text_tower(text_BxL)
        return self.text_proj(pooled), aux

    def encode_image(self, image_BxHxWx3):
        """[B, H, W, 3] float32 -> (emb [B, E] float32, L2-normalised; aux)."""
        feat_BxE, aux = self._image(image_BxHxWx3)
        return l2_normalize(feat_BxE), aux

    def encode_text(self, text_BxL):
        """[B, L] int32 -> (emb [B, E] float32, L2-normalised; aux)."""
        feat_BxE, aux = self._text(text_BxL)
        return l2_normalize(feat_BxE), aux

    def project_image(self, image_BxHxWx3):
        """[B, H, W, 3] -> [B, E]: the projected image features, not normalised."""
        return self._image(image_BxHxWx3)[0]

    def project_text(self, text_BxL):
        """[B, L] int32 -> [B, E]: the projected text features, not normalised."""
        return self._text(text_BxL)[0]

    def __call__(self, image, text):
        img_BxE, img_aux = self.encode_image(image)
        txt_BxE, txt_aux = self.encode_text(text)
        chex.assert_equal_shape([img_BxE, txt_BxE])
        return img_BxE, txt_BxE, dict(image=img_aux, text=txt_aux)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipConfig(TowerConfig):
    """CLIP / SigLIP's keys (besides TowerConfig's image / text variants, overrides,
    embed_dim, dtype, video keys): loss ('softmax' | 'sigmoid'), pool ('cls' | 'gap'),
    posemb, act, ln_eps, text_pool ('last' | 'argmax' | 'eos'), eos_id (for 'eos'),
    scan_layers (nn.scan over the ViT and text blocks), max_logit_scale (after every
    update t is projected into [0, ln max_logit_scale], open_clip's clamp; None = no
    upper bound, big_vision's SigLIP), hard_negatives (K NegCLIP captions per image,
    read by the data pipeline) and hard_negatives_scope ('batch': every image against
    all the batch's hard captions; 'own': against its own K)."""

    loss: str = key("softmax", choices=LOSSES)
    pool: str = key("cls", choices=POOLS)
    posemb: str = key("learn", choices=POSEMBS)
    act: str = key("gelu_tanh", choices=tuple(ACTIVATIONS))
    ln_eps: float = key(LN_EPS)
    text_pool: str = key("last", choices=tuple(TEXT_POOLS))
    eos_id: int = key(None, none=True, inert=ANY)
    scan_layers: bool = key(False)
    max_logit_scale: float = key(100.0, none=True)
    hard_negatives: int = key(0)
    hard_negatives_scope: str = key("batch", choices=NEG_SCOPES, inert=ANY)

    def check(self):
        super().check()
        if self.text_pool == "eos" and self.eos_id is None:
            raise ValueError("model_config.text_pool='eos' needs model_config.eos_id (the eos token id).")


@register("clip")
class ClipFamily(Family):
    """CLIP / SigLIP for the generic train step and evaluation (keys: ClipConfig; for
    video CLIP the batch's 'image' is a clip [B, T, H, W, 3])."""

    Config = ClipConfig
    capabilities = frozenset({"encode", "accumulate"})
    batch_keys = ("image", "text", "hard_negatives", "hard_negatives_valid")

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c, self.loss = model_config, c, c.loss
        self.max_logit_scale = c.max_logit_scale
        self.t_range = logit_scale_bounds(self.max_logit_scale)
        self.hard_negatives_scope = c.hard_negatives_scope
        self.image_size, self.text_len, self.num_frames, self.embed_dim = (
            c.image_size,
            c.text_len,
            c.num_frames,
            c.embed_dim,
        )
        self.image_variant = parse_variant(c.image, c.image_overrides, kind="image")
        self.text_variant = parse_variant(c.text, c.text_overrides, kind="text")
        self.model = CLIP(
            image=self.image_variant,
            text=self.text_variant,
            embed_dim=c.embed_dim,
            vocab_size=c.need("vocab_size"),
            text_len=c.text_len,
            loss=c.loss,
            pool=c.pool,
            posemb=c.posemb,
            act=c.act,
            ln_eps=c.ln_eps,
            text_pool=c.text_pool,
            eos_id=c.eos_id,
            # transformers' pooling rules ('argmax', 'eos') know no pad id; mmjax's 'last' needs one
            pad_id=c.tokens.need("pad", "model.text_pool='last'") if c.text_pool == "last" else PAD_ID,
            scan=c.scan_layers,
            video=video_options(c.video_keys()),
            **c.module_kw(),
        )

    def image_flops(self) -> int:
        """Forward FLOPs per sample of the image embedding (tower + projection)."""
        im = self.image_variant
        return vision(self.c, im, cls=self.c.pool == "cls") + 2 * im["width"] * self.embed_dim

    def flops(self, batch: int) -> dict:
        """Image tower + text tower + both projections + the i2t and t2i logits
        against the global batch, 2 * 2*B*E."""
        tx, e = self.text_variant, self.embed_dim
        text = tx["depth"] * layer(self.text_len, tx["width"], tx["mlp_dim"]) + 2 * tx["width"] * e
        return {"student": self.image_flops() + text + 2 * 2 * batch * e, "teacher": 0}

    def embed(self, params, batch, rng=None):
        """batch {'image': [B,H,W,3] f32, 'text': [B,L] i32} -> {'img','txt': [B,E]}.

        With 'hard_negatives' [B, K, L] i32 in the batch (NegCLIP-style captions
        with swapped attributes) also 'neg': [B, K, E] and 'neg_valid': [B, K] float32
        (1 = counts; from the batch's 'hard_negatives_valid' bool [B, K], all 1 if
        absent; a float so that GradCache can carry it with the embeddings).
        """
        del rng  # No dropout / stochastic depth yet.
        img, txt, _ = self.model.apply({"params": params}, batch["image"], batch["text"])
        emb = {"img": img, "txt": txt}
        if "hard_negatives" in batch:
            neg = batch["hard_negatives"]
            chex.assert_rank(neg, 3)
            b, k, length = neg.shape
            flat = self.encode_text(params, neg.reshape(b * k, length))
            emb["neg"] = flat.reshape(b, k, -1)
            valid = batch.get("hard_negatives_valid", None)
            emb["neg_valid"] = (
                jnp.ones((b, k), jnp.float32)
                if valid is None
                else jax.lax.stop_gradient(jnp.asarray(valid).astype(jnp.float32))
            )
        return emb

    def loss_from_embeddings(self, params, emb, *, gather=identity):
        """(loss, metrics) from {'img','txt': [b, E]}; see mmjax.objectives for gather."""
        neg = dict(
            txt_neg=emb.get("neg"), neg_valid=emb.get("neg_valid"), neg_scope=self.hard_negatives_scope, gather=gather
        )
        if self.loss == "softmax":
            return itc_loss(emb["img"], emb["txt"], params["t"], **neg)
        return sigmoid_loss(emb["img"], emb["txt"], params["t"], params["b"], **neg)

    def param_bounds(self) -> dict:
        """t in [0, ln(model.max_logit_scale)] (open_clip's
        `logit_scale.clamp_(0, math.log(100))` after each step); the forward uses t as it is."""
        return {"t": self.t_range}

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, updates); CLIP has no teacher or queues, updates = {}."""
        del teacher, queues, step
        loss, metrics = self.loss_from_embeddings(params, self.embed(params, batch, rng), gather=gather)
        return loss, metrics, {}

    def encode_image(self, params, image):
        """[B, H, W, 3] float32 -> [B, E] float32, L2-normalised."""
        return self.model.apply({"params": params}, image, method=self.model.encode_image)[0]

    def encode_text(self, params, text):
        """[B, L] int32 -> [B, E] float32, L2-normalised."""
        return self.model.apply({"params": params}, text, method=self.model.encode_text)[0]
