"""CoCa: contrastive captioners (MODELS.md, CoCa).

Shape letters: B batch, T image tokens, Di image width, L text length, D text width,
E embed dim, n captioning queries, V vocabulary.

- Image: a ViT's tokens [B, T, Di]; attentional pooling (learned queries
  cross-attending to the tokens) gives one token for the contrastive embedding and
  `cap_queries` tokens the captioning layers attend to.
- Text: one `TextDecoder` whose first `unimodal_layers` blocks are causal and
  text-only. A learned [CLS] appended after the text goes through them; its output
  (LayerNorm, projection) is the text embedding for ITC. The upper blocks
  cross-attend to the captioning tokens and predict the next token (tied
  embeddings). The text tokens never see the [CLS] (causal), so captioning runs the
  same `TextDecoder` without it: greedy / beam decoding with the KV cache.
- One forward gives both losses: `con_weight * ITC + cap_weight * LM` (CoCa:
  1 and 2), LM with optional label smoothing.
"""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.flops import cross_layer, layer, pooler, vision, vision_tokens
from mmjax.models.attention import MultiHeadAttention, causal_mask, combine_masks, padding_mask
from mmjax.models.decoder import TextDecoder, decode
from mmjax.models.fusion import head_dense
from mmjax.models.tokens import MMJAX
from mmjax.models.variants import parse_variant
from mmjax.models.vit import image_tower
from mmjax.models.zoo.clip import l2_normalize
from mmjax.models.zoo.common import Family, logit_scale_bounds, video_options
from mmjax.models.zoo.contract import register
from mmjax.models.zoo.schema import TowerConfig, key
from mmjax.objectives import identity, itc_loss, lm_loss
from mmjax.parallel.sharding import names, norm_init

Dtype = Any


class AttentionalPooler(nn.Module):
    """`tokens [B, T, D] -> [B, n, D]`: n learned queries cross-attend to the tokens."""

    num_queries: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens_BxTxD):
        chex.assert_rank(tokens_BxTxD, 3)
        b, _, d = tokens_BxTxD.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = self.param(
            "queries", names(nn.initializers.normal(0.02), None, "embed"), (self.num_queries, d), self.param_dtype
        )
        q_BxnxD = jnp.broadcast_to(jnp.asarray(q, self.dtype)[None], (b, self.num_queries, d))
        kv = nn.LayerNorm(name="ln_kv", **kw, **norm_init())(tokens_BxTxD)
        out = MultiHeadAttention(self.num_heads, name="attn", **kw)(
            nn.LayerNorm(name="ln_q", **kw, **norm_init())(q_BxnxD), inputs_kv=kv
        )
        return nn.LayerNorm(name="ln_out", **kw, **norm_init())(out)


class CoCa(nn.Module):
    """Methods (apply with `method=`): `image_features(image) -> (emb [B,E], memory
    [B,n,Di])`, `text_features(ids) -> (emb [B,E], unimodal states [B,L,D])`,
    `caption_logits(states, ids, memory) -> [B,L,V]`; `__call__(image, ids) ->
    (img_emb, txt_emb, logits)` is the one training forward."""

    image: Any
    text: Any
    embed_dim: int
    vocab_size: int
    text_len: int
    unimodal_layers: int
    cap_queries: int = 16
    pad_id: int = MMJAX["pad"]  # the tokenizer's (model.token_ids)
    remat: Any = False
    attention: str = "xla"
    video: Any = None  # ViT video keywords (common.video_options); None: an image model
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        im, tx = self.image, self.text
        self.image_tower = image_tower(im, self, pool="gap")
        self.con_pool = AttentionalPooler(1, im["heads"], **kw)
        self.cap_pool = AttentionalPooler(self.cap_queries, im["heads"], **kw)
        self.image_proj = head_dense(self.embed_dim, use_bias=False, param_dtype=self.param_dtype)  # float32 heads
        self.decoder = TextDecoder(
            self.vocab_size,
            self.text_len,
            tx["width"],
            tx["depth"],
            tx["heads"],
            tx["mlp_dim"],
            cross_from=self.unimodal_layers,
            attention=self.attention,
            pad_id=self.pad_id,
            **kw,
        )
        self.text_cls = self.param(
            "text_cls", names(nn.initializers.normal(0.02), "embed"), (tx["width"],), self.param_dtype
        )
        self.ln_cls = nn.LayerNorm(**kw, **norm_init())
        self.text_proj = head_dense(self.embed_dim, use_bias=False, param_dtype=self.param_dtype)
        self.t = self.param("t", names(nn.initializers.constant(jnp.log(1 / 0.07))), (), jnp.float32)

    def image_features(self, image_BxHxWx3):
        _, aux = self.image_tower(image_BxHxWx3)
        tokens = aux["tokens"]
        emb = l2_normalize(self.image_proj(self.con_pool(tokens)[:, 0]))
        return emb, self.cap_pool(tokens)

    def text_features(self, ids_BxL):
        b, length = ids_BxL.shape
        x = self.decoder.embed_tokens(ids_BxL)
        cls = jnp.broadcast_to(jnp.asarray(self.text_cls, x.dtype)[None, None], (b, 1, x.shape[-1]))
        valid = jnp.concatenate([ids_BxL != self.pad_id, jnp.ones((b, 1), bool)], axis=1)  # + the [CLS]
        mask = combine_masks(padding_mask(valid), causal_mask(length + 1))
        y = self.decoder.run_blocks(jnp.concatenate([x, cls], axis=1), mask, stop=self.unimodal_layers)
        emb = l2_normalize(self.text_proj(self.ln_cls(y[:, -1])))
        return emb, y[:, :length]

    def caption_logits(self, states_BxLxD, ids_BxL, memory_BxnxDi):
        y = self.decoder.run_blocks(
            states_BxLxD, self.decoder.self_mask(ids_BxL), memory_BxnxDi, start=self.unimodal_layers
        )
        return self.decoder.logits(y)

    def __call__(self, image, ids):
        img_emb, memory = self.image_features(image)
        txt_emb, states = self.text_features(ids)
        return img_emb, txt_emb, self.caption_logits(states, ids, memory)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CocaConfig(TowerConfig):
    """CoCa's keys (besides TowerConfig's): unimodal_layers (text blocks without
    cross-attention; None = half the text depth), cap_queries, con_weight (1.0),
    cap_weight (2.0), label_smoothing (0.0), max_logit_scale (t is projected into
    [0, ln max_logit_scale] after each update; 100)."""

    text_len: int = key(76, derived=True)
    unimodal_layers: int = key(None, none=True)
    cap_queries: int = key(16)
    con_weight: float = key(1.0)
    cap_weight: float = key(2.0)
    label_smoothing: float = key(0.0)
    max_logit_scale: float = key(100.0, none=True)


@register("coca")
class CocaFamily(Family):
    """CoCa for the generic step, the retrieval evaluator and captioning (keys: CocaConfig)."""

    Config = CocaConfig
    capabilities = frozenset({"encode", "caption"})
    batch_keys = ("image", "text")

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c = model_config, c
        self.image_size, self.text_len, self.num_frames = c.image_size, c.text_len, c.num_frames
        self.text_variant = text = parse_variant(c.text, c.text_overrides, kind="text")
        self.image_variant = parse_variant(c.image, c.image_overrides, kind="image")
        self.unimodal_layers = c.unimodal_layers or text["depth"] // 2
        if not 0 < self.unimodal_layers < text["depth"]:
            raise ValueError(
                f"model.unimodal_layers={self.unimodal_layers} must lie in [1, text depth - 1 = "
                f"{text['depth'] - 1}]: CoCa needs both unimodal and multimodal layers"
            )
        self.con_weight, self.cap_weight, self.label_smoothing = c.con_weight, c.cap_weight, c.label_smoothing
        self.max_logit_scale = c.max_logit_scale
        self.t_range = logit_scale_bounds(self.max_logit_scale)
        self.embed_dim = c.embed_dim
        kw = c.module_kw()
        tok = c.tokens
        self.pad_id = tok.need("pad", "CoCa's text decoder")
        self.bos_eos = dict(bos_id=tok.need("bos", "CoCa's captioner"), eos_id=tok.need("eos", "CoCa's captioner"))
        self.model = CoCa(
            image=self.image_variant,
            text=text,
            embed_dim=c.embed_dim,
            vocab_size=c.need("vocab_size"),
            text_len=self.text_len,
            unimodal_layers=self.unimodal_layers,
            cap_queries=c.cap_queries,
            pad_id=self.pad_id,
            video=video_options(c.video_keys()),
            **kw,
        )
        del kw["remat"]
        self.decoder = TextDecoder(
            c.vocab_size,
            self.text_len,
            text["width"],
            text["depth"],
            text["heads"],
            text["mlp_dim"],
            cross_from=self.unimodal_layers,
            pad_id=self.pad_id,
            **kw,
        )

    # FLOPs per sample (mmjax/flops.py) ---------------------------------------------------
    def image_flops(self) -> int:
        """The ViT (no [CLS]: attentional pooling reads its tokens), the contrastive and
        the captioning poolers, the projection."""
        im, c = self.image_variant, self.c
        t, d = vision_tokens(c, im, cls=False), im["width"]
        return vision(c, im, cls=False) + pooler(1, t, d) + pooler(c.cap_queries, t, d) + 2 * d * self.embed_dim

    def flops(self, batch: int) -> dict:
        """Image path + the unimodal text layers over L+1 tokens (the [CLS] appended) +
        projection; the multimodal layers cross-attend to the cap_queries tokens; the
        tied LM head 2*L*D*V; the i2t and t2i logits 2 * 2*B*E."""
        im, tx, e, length = self.image_variant, self.text_variant, self.embed_dim, self.text_len
        d, m, u = tx["width"], tx["mlp_dim"], self.unimodal_layers
        text = u * layer(length + 1, d, m) + 2 * d * e
        multimodal = (tx["depth"] - u) * cross_layer(length, d, m, self.c.cap_queries, im["width"])
        lm_head = 2 * length * d * self.model.vocab_size
        return {"student": self.image_flops() + text + multimodal + lm_head + 2 * 2 * batch * e, "teacher": 0}

    def _apply(self, params, method, *args):
        return self.model.apply({"params": params}, *args, method=method)

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, {}): con_weight * ITC + cap_weight * LM, one forward."""
        del rng, teacher, queues, step
        img_emb, txt_emb, logits = self._apply(params, self.model.__call__, batch["image"], batch["text"])
        l_con, mi = itc_loss(img_emb, txt_emb, params["t"], gather=gather)
        l_cap, mc = lm_loss(
            logits, batch["text"], label_smoothing=self.label_smoothing, pad_id=self.pad_id, gather=gather
        )
        loss = self.con_weight * l_con + self.cap_weight * l_cap
        metrics = {**{("loss_itc" if k == "loss" else k): v for k, v in mi.items()}, **mc, "loss": loss}
        return loss, metrics, {}

    def param_bounds(self) -> dict:
        """t in [0, ln(model.max_logit_scale)] (open_clip's clamp after each step)."""
        return {"t": self.t_range}

    # Retrieval (the evaluator's view) -------------------------------------------------
    def encode_image(self, params, image):
        return self._apply(params, self.model.image_features, image)[0]

    def encode_text(self, params, text):
        return self._apply(params, self.model.text_features, text)[0]

    # Captioning -----------------------------------------------------------------------
    def caption(
        self,
        params,
        image,
        *,
        max_len=None,
        beams: int = 1,
        length_penalty: float = 0.6,
        top_p=None,
        temperature=1.0,
        rng=None,
    ):
        """Token ids [B, max_len] (bos first, PAD after eos): greedy, beam search, or with
        `rng` (one key, or B row keys) nucleus sampling (top_p, default 0.9; temperature)."""
        _, memory = self._apply(params, self.model.image_features, image)
        opts = dict(beams=beams, length_penalty=length_penalty, top_p=top_p, temperature=temperature, rng=rng)
        return decode(
            self.decoder, params["decoder"], memory, max_len=int(max_len or self.text_len), **self.bos_eos, **opts
        )
