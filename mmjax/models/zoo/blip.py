"""BLIP: one text transformer used three ways, an EMA teacher and feature queues.

Shape letters: B global batch, b local rows, T image tokens, L text length,
Di image width, D text width, E embed dim, V vocabulary.

Model (MODELS.md, BLIP; Li et al. 2022): a ViT ([CLS] pooled, all T tokens for
cross-attention) and one text transformer run in three modes:

- 'text': the unimodal text encoder. Bidirectional self-attention, no
  cross-attention; the first token is replaced by <cls> (id 5) and its output
  (final LayerNorm, projection) is the ITC text embedding.
- 'encode': the image-grounded text encoder. Bidirectional self-attention and
  cross-attention to the image tokens in every block. BLIP's [Encode] token has no
  piece in mmjax's tokenizer, so it is a learned embedding `enc_token` [D] that
  replaces the first token's word embedding (position 0's embedding is kept);
  its output feeds the ITM head Linear(D, 2).
- 'decode': the image-grounded text decoder. Causal self-attention and the same
  cross-attention; bos (id 2) plays [Decode]. LM head: the final LayerNorm, the
  tied word embeddings and a bias.

Encoder and decoder share every parameter except the self-attention layers, and
the sharing is structural: each `BlipBlock` holds `ln1`+`attn` (encoder
self-attention), `ln1_dec`+`attn_dec` (decoder self-attention) and the shared
`ln_cross`+`cross_attn` and `ln2`+`mlp`; the word / position embeddings,
`ln_final` and the LM `bias` exist once, in `text_tower`. mmjax blocks are pre-LN
(the release's BERT is post-LN), with one final LayerNorm for every mode.

Objective = itc_weight * ITC (momentum distillation against the teacher's
features of the batch and of the queues) + itm_weight * ITM (hard negatives over
the global batch) + lm_weight * LM (label smoothing 0.1, BLIP's); weights 1. The
teacher (`ema_params`) is a full copy of the params like ALBEF's, though only its
image tower + `image_proj` and unimodal text mode + `text_proj` are read (BLIP's
momentum encoders); keeping the whole tree lets `--weights ema` evaluate and
caption.
"""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.flops import cross_layer, layer, vision, vision_tokens
from mmjax.models.decoder import decode
from mmjax.models.fusion import ItmHead, head_dense
from mmjax.models.transformer import remat_mode
from mmjax.models.variants import parse_variant
from mmjax.models.vit import image_tower
from mmjax.models.zoo.blip_text import BlipText
from mmjax.models.zoo.clip import l2_normalize
from mmjax.models.zoo.common import MomentumConfig, MomentumFamily, video_options
from mmjax.models.zoo.contract import register
from mmjax.models.zoo.schema import key
from mmjax.objectives import alpha_at, enqueue, identity, itc_distill_loss, itm_loss, lm_loss
from mmjax.parallel.sharding import names

Dtype = Any


class BLIP(nn.Module):
    """ViT + BlipText + projections + ITM head.

    Methods (apply with `method=`): `image_features(image) -> (emb [B,E], tokens
    [B,T,Di])`, `text_features(ids) -> (emb [B,E], unimodal states [B,L,D])`,
    `itm_logits(image_tokens, ids) -> [B,2]`, `lm_logits(image_tokens, ids) ->
    [B,L,V]`; `__call__(image, ids)` runs every mode and touches every param.
    """

    image: Any
    text: Any
    embed_dim: int
    vocab_size: int
    text_len: int
    text_ids: Any = None  # BlipText's token keywords (pad_id, cls_id: the tokenizer's); None: mmjax's
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    scan: bool = False  # nn.scan over the image tower's blocks
    video: Any = None  # ViT video keywords (common.video_options); None: an image model
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        im, tx = self.image, self.text
        self.image_tower = image_tower(im, self, pool="cls", posemb="learn")
        self.text_tower = BlipText(
            self.vocab_size,
            self.text_len,
            tx["width"],
            tx["depth"],
            tx["heads"],
            tx["mlp_dim"],
            remat=remat_mode(self.remat),
            attention=self.attention,
            **dict(self.text_ids or {}),
            **kw,
        )
        self.image_proj = head_dense(self.embed_dim, name="image_proj", param_dtype=self.param_dtype)  # float32 heads
        self.text_proj = head_dense(self.embed_dim, name="text_proj", param_dtype=self.param_dtype)
        self.itm_head = ItmHead(**kw)
        self.temp = self.param("temp", names(nn.initializers.constant(0.07)), (), jnp.float32)

    def image_features(self, image_BxHxWx3):
        chex.assert_rank(image_BxHxWx3, {4, 5})  # images, or clips [B, T, H, W, 3]
        pooled, aux = self.image_tower(image_BxHxWx3)
        return l2_normalize(self.image_proj(pooled)), aux["tokens"]

    def text_features(self, ids_BxL):
        y_BxLxD = self.text_tower.run(ids_BxL, "text")
        return l2_normalize(self.text_proj(y_BxLxD[:, 0])), y_BxLxD

    def itm_logits(self, image_BxTxDi, ids_BxL):
        return self.itm_head(self.text_tower.run(ids_BxL, "encode", image_BxTxDi)[:, 0]).astype(jnp.float32)

    def lm_logits(self, image_BxTxDi, ids_BxL):
        return self.text_tower(ids_BxL, image_BxTxDi)

    def __call__(self, image, ids):
        img_emb, img_tok = self.image_features(image)
        txt_emb, _ = self.text_features(ids)
        return img_emb, txt_emb, self.itm_logits(img_tok, ids), self.lm_logits(img_tok, ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlipConfig(MomentumConfig):
    """BLIP's keys (besides MomentumConfig's and TowerConfig's): itc_weight /
    itm_weight / lm_weight (1.0 each), label_smoothing (LM; BLIP's 0.1); tasks: a
    subset of itc, itm, lm (() = all three)."""

    text_len: int = key(30, derived=True)
    queue_size: int = key(57600)
    label_smoothing: float = key(0.1)
    itc_weight: float = key(1.0)
    itm_weight: float = key(1.0)
    lm_weight: float = key(1.0)


@register("blip")
class BlipFamily(MomentumFamily):
    """BLIP for the generic train step, the evaluator (ITC retrieval, ITM re-ranking,
    captions) and `mmjax caption` (keys: BlipConfig)."""

    Config = BlipConfig
    capabilities = MomentumFamily.capabilities | {"caption"}
    batch_keys = ("image", "text", "id")
    TASKS = ("itc", "itm", "lm")

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c = model_config, c
        self.image_size, self.text_len, self.num_frames = c.image_size, c.text_len, c.num_frames
        self._momentum_config(c)
        self.label_smoothing = c.label_smoothing
        self.weights = {"itc": c.itc_weight, "itm": c.itm_weight, "lm": c.lm_weight}
        for key_, value, ok, want in [
            ("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
            *[(f"{t}_weight", w, w >= 0, "a non-negative number") for t, w in self.weights.items()],
        ]:
            if not ok:
                raise ValueError(f"model.{key_}={value!r}; expected {want}")
        self.embed_dim = c.embed_dim
        self.image_variant = parse_variant(c.image, c.image_overrides, kind="image")
        self.text_variant = text = parse_variant(c.text, c.text_overrides, kind="text")
        kw = c.module_kw()
        tok = c.tokens
        self.bos_eos = dict(bos_id=tok.need("bos", "BLIP's decoder"), eos_id=tok.need("eos", "BLIP's decoder"))
        self.pad_id = tok.need("pad", "BLIP's text transformer")
        text_ids = dict(pad_id=self.pad_id, cls_id=tok.need("cls", "BLIP's ITC text encoder"))
        self.model = BLIP(
            image=self.image_variant,
            text=text,
            embed_dim=self.embed_dim,
            vocab_size=c.need("vocab_size"),
            text_len=self.text_len,
            text_ids=text_ids,
            scan=c.scan_layers,
            video=video_options(c.video_keys()),
            **kw,
        )
        del kw["remat"]
        # The decoder mode alone (params: params['text_tower']), for cached captioning.
        self.decoder = BlipText(
            c.vocab_size, self.text_len, text["width"], text["depth"], text["heads"], text["mlp_dim"], **text_ids, **kw
        )

    # --- FLOPs per sample (mmjax/flops.py) -------------------------------------------
    def image_flops(self) -> int:
        im = self.image_variant
        return vision(self.c, im) + 2 * im["width"] * self.embed_dim

    def flops(self, batch: int) -> dict:
        """Student: image tower + projection; with ITC or ITM the unimodal text pass +
        projection; ITC: 2*2*(B+Q)*E against the teacher's batch and queue features;
        ITM: hard-negative similarities 2*2*B*E and the image-grounded encoder (every
        layer cross-attends to the T image tokens) on 3 pairs + the ITM head; LM: the
        decoder mode + the tied LM head. Teacher (ITC only): image and text passes,
        projections and its ITC logits."""
        im, tx, e, length = self.image_variant, self.text_variant, self.embed_dim, self.text_len
        d, m, depth = tx["width"], tx["mlp_dim"], tx["depth"]
        grounded = depth * cross_layer(length, d, m, vision_tokens(self.c, im), im["width"])
        text = depth * layer(length, d, m) + 2 * d * e
        student, teacher = self.image_flops(), 0
        if "itc" in self.tasks or "itm" in self.tasks:
            student += text
        if "itc" in self.tasks:
            student += 2 * 2 * (batch + self.queue_size) * e
            teacher += self.image_flops() + text + 2 * 2 * (batch + self.queue_size) * e
        if "itm" in self.tasks:
            student += 2 * 2 * batch * e + 3 * (grounded + 2 * d * 2)
        if "lm" in self.tasks:
            student += grounded + 2 * length * d * self.model.vocab_size
        return {"student": student, "teacher": teacher}

    # --- objective ----------------------------------------------------------------
    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, updates={'queues': new queues} when ITC runs).

        batch: image [b,H,W,3] f32, text [b,L] i32 (bos ... eos pad), id [b] i32
        (same id = same image; never a negative). `teacher` (ema params) and
        `queues` come from the state (`init_extra`).
        """
        m = self.model
        image, ids, text = batch["image"], batch["id"].astype(jnp.int32), batch["text"]
        step = jnp.zeros((), jnp.int32) if step is None else step
        rng = jax.random.PRNGKey(0) if rng is None else rng
        alpha = alpha_at(step, self.alpha, self.alpha_ramp_steps)
        temp = self.temp(params)
        img_emb, img_tok = self._apply(params, m.image_features, image)
        metrics, loss, updates = {"alpha": alpha}, 0.0, {}
        if "itc" in self.tasks or "itm" in self.tasks:
            txt_emb, _ = self._apply(params, m.text_features, text)

        if "itc" in self.tasks:
            if teacher is None or queues is None:
                raise ValueError(
                    "BLIP's ITC needs the teacher and the queues (family.init_extra); or leave 'itc' out of model.tasks"
                )
            teacher = jax.lax.stop_gradient(teacher)
            t_img, _ = self._apply(teacher, m.image_features, image)
            t_txt, _ = self._apply(teacher, m.text_features, text)
            l_itc, mi = itc_distill_loss(img_emb, txt_emb, ids, t_img, t_txt, queues, temp, alpha, gather=gather)
            loss, metrics = loss + self.weights["itc"] * l_itc, {**metrics, **mi}
            updates["queues"] = enqueue(queues, gather(t_img), gather(t_txt), gather(ids))

        if "itm" in self.tasks:
            neg_txt, neg_img, labels, weights = self.itm_pairs(
                jax.random.split(rng), img_emb, txt_emb, ids, temp, gather, text=text
            )
            text_all, img_tok_all = gather(text), gather(img_tok)
            # Rows: (image, its text), (image, a hard negative text), (a hard negative image, text).
            logits = self._apply(
                params,
                m.itm_logits,
                jnp.concatenate([img_tok, img_tok, img_tok_all[neg_img]]),
                jnp.concatenate([text, text_all[neg_txt], text]),
            )
            l_itm, mi = itm_loss(logits, labels, weights, gather=gather)
            loss, metrics = loss + self.weights["itm"] * l_itm, {**metrics, **mi}

        if "lm" in self.tasks:
            logits = self._apply(params, m.lm_logits, img_tok, text)
            l_lm, mi = lm_loss(logits, text, label_smoothing=self.label_smoothing, pad_id=self.pad_id, gather=gather)
            loss, metrics = loss + self.weights["lm"] * l_lm, {**metrics, **mi}

        metrics["loss"] = loss
        return loss, metrics, updates

    # --- evaluation ----------------------------------------------------------------
    def text_features(self, params, text):
        """-> (emb [B, E], text [B, L]): BLIP's ITM re-encodes the token ids with the
        image-grounded encoder, so the ids are what `itm_scores` consumes."""
        return self._apply(params, self.model.text_features, text)[0], text

    def itm_scores(self, params, image_tokens, stream, text):
        """Log-odds that each (image, text) pair matches: [B,T,Di], (unused), [B,L] -> [B]."""
        del stream
        logits = self._apply(params, self.model.itm_logits, image_tokens, text)
        return logits[:, 1] - logits[:, 0]

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
        `rng` (one key, or B row keys) nucleus sampling (top_p, default 0.9; temperature);
        the decoder mode cross-attends to every image token."""
        _, memory = self._apply(params, self.model.image_features, image)
        opts = dict(beams=beams, length_penalty=length_penalty, top_p=top_p, temperature=temperature, rng=rng)
        return decode(
            self.decoder, params["text_tower"], memory, max_len=int(max_len or self.text_len), **self.bos_eos, **opts
        )
