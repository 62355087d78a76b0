"""ALBEF: align before fuse, with a momentum teacher and feature queues.

Shape letters: B global batch, b local rows, T image tokens, L text length,
Di image width, D text width, E embed dim, V vocabulary.

Model (MODELS.md, ALBEF): a ViT ([CLS] pooled), one BERT-style bidirectional
text encoder whose first `fusion_from` layers are text-only and whose remaining
layers add cross-attention to the image tokens, projections to E for ITC, an ITM
head on the fused [CLS] (position 0, mmjax's bos) and an MLM head tied to the
word embeddings. mmjax blocks are pre-LN (the release's BERT is post-LN).

Objective = ITC with momentum distillation (teacher features of the batch and of
the queues) + ITM with hard negatives drawn over the global batch + MLM distilled
from the teacher's logits; unweighted sum. The teacher (`ema_params`, a full copy
of the params) and the queues live in the TrainState; the step updates the EMA
after the optimizer update and writes the queues with the `updates` returned here.
"""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.flops import cross_layer, layer, vision, vision_tokens
from mmjax.models.fusion import BertTextEncoder, ItmHead, MlmHead, head_dense
from mmjax.models.tokens import MMJAX
from mmjax.models.variants import parse_variant
from mmjax.models.vit import image_tower
from mmjax.models.zoo.clip import l2_normalize
from mmjax.models.zoo.common import MomentumConfig, MomentumFamily, video_options
from mmjax.models.zoo.contract import register
from mmjax.models.zoo.schema import key
from mmjax.objectives import alpha_at, enqueue, identity, itc_distill_loss, itm_loss, mask_tokens, mlm_loss
from mmjax.parallel.collective import local
from mmjax.parallel.sharding import names

Dtype = Any


class ALBEF(nn.Module):
    """ViT + BERT-style text/fusion encoder + projections + ITM and MLM heads.

    Methods (apply with `method=`): `image_features(image) -> (emb [B,E], tokens
    [B,T,Di])`, `text_features(ids) -> (emb [B,E], stream [B,L,D])`,
    `fuse(stream, ids, image_tokens) -> fused [B,L,D]`, `itm_logits(fused) -> [B,2]`,
    `mlm_logits(fused) -> [B,L,V]`, `fused_features(image, ids) -> [B,D]`;
    `__call__(image, ids)` touches every param.
    """

    image: Any
    text: Any
    fusion_from: int
    embed_dim: int
    vocab_size: int
    text_len: int
    pad_id: int = MMJAX["pad"]  # the tokenizer's (model.token_ids)
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    scan: bool = False  # nn.scan over the blocks (the image tower's transformer.Encoder)
    video: Any = None  # ViT video keywords (common.video_options); None: an image model
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        im, tx = self.image, self.text
        self.image_tower = image_tower(im, self, pool="cls", posemb="learn")
        self.text_tower = BertTextEncoder(
            self.vocab_size,
            self.text_len,
            tx["width"],
            tx["depth"],
            tx["heads"],
            tx["mlp_dim"],
            fusion_from=self.fusion_from,
            pad_id=self.pad_id,
            remat=self.remat,
            attention=self.attention,
            **kw,
        )
        self.image_proj = head_dense(self.embed_dim, name="image_proj", param_dtype=self.param_dtype)  # float32 heads
        self.text_proj = head_dense(self.embed_dim, name="text_proj", param_dtype=self.param_dtype)
        self.itm_head = ItmHead(**kw)
        self.mlm_head = MlmHead(self.vocab_size, **kw)
        self.temp = self.param("temp", names(nn.initializers.constant(0.07)), (), jnp.float32)

    def image_features(self, image_BxHxWx3):
        chex.assert_rank(image_BxHxWx3, {4, 5})  # images, or clips [B, T, H, W, 3]
        pooled, aux = self.image_tower(image_BxHxWx3)
        return l2_normalize(self.image_proj(pooled)), aux["tokens"]

    def text_features(self, ids_BxL):
        chex.assert_rank(ids_BxL, 2)
        cls_BxD, aux = self.text_tower.encode_text(ids_BxL)
        return l2_normalize(self.text_proj(cls_BxD)), aux["tokens"]

    def text_stream(self, ids_BxL):
        """The text-only layers' output [B, L, D] alone (no projection): what MLM fuses."""
        return self.text_tower.encode_text(ids_BxL)[1]["tokens"]

    def fuse(self, stream_BxLxD, ids_BxL, image_BxTxDi):
        fused_BxLxD, _ = self.text_tower.fuse(stream_BxLxD, ids_BxL, image_BxTxDi)
        return fused_BxLxD

    def itm_logits(self, fused_BxLxD):
        return self.itm_head(fused_BxLxD[:, 0]).astype(jnp.float32)

    def fused_features(self, image_BxHxWx3, ids_BxL):
        """The fused [CLS] of an image-text pass (what ITM reads; VQA heads too): [B, D].
        Touches the towers and fusion layers only, not the projections or heads."""
        _, img_aux = self.image_tower(image_BxHxWx3)
        return self.fuse(self.text_stream(ids_BxL), ids_BxL, img_aux["tokens"])[:, 0]

    def mlm_logits(self, fused_BxLxD):
        return self.mlm_head(fused_BxLxD, self.text_tower.attend)

    def __call__(self, image, ids):
        img_emb, img_tok = self.image_features(image)
        txt_emb, stream = self.text_features(ids)
        fused = self.fuse(stream, ids, img_tok)
        return img_emb, txt_emb, self.itm_logits(fused), self.mlm_logits(fused)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlbefConfig(MomentumConfig):
    """ALBEF's keys (besides MomentumConfig's and TowerConfig's): fusion_from (text-only
    layers before the fusion layers; None = half the text depth), mlm_prob; tasks:
    a subset of itc, itm, mlm (() = all three)."""

    image_size: int = key(256, derived=True)
    text_len: int = key(25, derived=True)
    fusion_from: int = key(None, none=True)
    mlm_prob: float = key(0.15)


@register("albef")
class AlbefFamily(MomentumFamily):
    """ALBEF for the generic train step and the evaluator (keys: AlbefConfig)."""

    Config = AlbefConfig
    capabilities = MomentumFamily.capabilities | {"fuse"}
    batch_keys = ("image", "text", "id")
    TASKS = ("itc", "itm", "mlm")

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c = model_config, c
        self.image_size, self.text_len, self.num_frames = c.image_size, c.text_len, c.num_frames
        self.image_variant = parse_variant(c.image, c.image_overrides, kind="image")
        self.text_variant = text = parse_variant(c.text, c.text_overrides, kind="text")
        self.fusion_from = text["depth"] // 2 if c.fusion_from is None else c.fusion_from
        if not 0 <= self.fusion_from <= text["depth"]:
            raise ValueError(f"model.fusion_from={self.fusion_from} must lie in [0, text depth {text['depth']}]")
        self._momentum_config(c)
        self.mlm_prob = c.mlm_prob
        self.embed_dim = c.embed_dim
        self.mlm_kw = c.tokens.mlm("model.tasks 'mlm'") if "mlm" in self.tasks else {}
        self.model = ALBEF(
            image=self.image_variant,
            text=text,
            fusion_from=self.fusion_from,
            embed_dim=self.embed_dim,
            vocab_size=c.need("vocab_size"),
            text_len=self.text_len,
            pad_id=c.tokens.need("pad", "ALBEF's text encoder"),
            scan=c.scan_layers,
            video=video_options(c.video_keys()),
            **c.module_kw(),
        )

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, updates={'queues': new queues}).

        batch: image [b,H,W,3] f32, text [b,L] i32, id [b] i32 (same id = same image;
        never a negative). `teacher` (ema params) and `queues` come from the state.
        """
        m = self.model
        image, ids, text_ids = batch["image"], batch["id"].astype(jnp.int32), batch["text"]
        step = jnp.zeros((), jnp.int32) if step is None else step
        rng_mlm, *rng_itm = jax.random.split(rng, 3)
        alpha = alpha_at(step, self.alpha, self.alpha_ramp_steps)
        temp = self.temp(params)
        img_emb, img_tok = self._apply(params, m.image_features, image)
        txt_emb, stream = self._apply(params, m.text_features, text_ids)
        teacher = jax.lax.stop_gradient(teacher)
        t_img, t_img_tok = self._apply(teacher, m.image_features, image)
        t_txt, _ = self._apply(teacher, m.text_features, text_ids)
        metrics, loss = {"alpha": alpha}, 0.0

        if "itc" in self.tasks:
            l_itc, mi = itc_distill_loss(img_emb, txt_emb, ids, t_img, t_txt, queues, temp, alpha, gather=gather)
            loss, metrics = loss + l_itc, {**metrics, **mi}

        if "itm" in self.tasks:
            neg_txt, neg_img, labels, weights = self.itm_pairs(
                rng_itm, img_emb, txt_emb, ids, temp, gather, text=text_ids
            )
            stream_all, text_all, img_tok_all = gather(stream), gather(text_ids), gather(img_tok)
            fused = self._apply(
                params,
                m.fuse,
                jnp.concatenate([stream, stream_all[neg_txt], stream]),
                jnp.concatenate([text_ids, text_all[neg_txt], text_ids]),
                jnp.concatenate([img_tok, img_tok, img_tok_all[neg_img]]),
            )
            logits = self._apply(params, m.itm_logits, fused)
            l_itm, mi = itm_loss(logits, labels, weights, gather=gather)
            loss, metrics = loss + l_itm, {**metrics, **mi}

        if "mlm" in self.tasks:
            # Drawn for the global batch, then this call's rows: pmap == jit.
            masked, target = local(
                gather,
                mask_tokens(
                    rng_mlm,
                    gather(text_ids),
                    vocab_size=m.vocab_size,
                    prob=self.mlm_prob,
                    **self.mlm_kw,
                ),
            )
            m_stream = self._apply(params, m.text_stream, masked)
            logits = self._apply(params, m.mlm_logits, self._apply(params, m.fuse, m_stream, masked, img_tok))
            tm_stream = self._apply(teacher, m.text_stream, masked)
            t_logits = self._apply(teacher, m.mlm_logits, self._apply(teacher, m.fuse, tm_stream, masked, t_img_tok))
            l_mlm, mi = mlm_loss(logits, text_ids, target, teacher_logits_BxLxV=t_logits, alpha=alpha, gather=gather)
            loss, metrics = loss + l_mlm, {**metrics, **mi}

        new_queues = enqueue(queues, gather(t_img), gather(t_txt), gather(ids))
        metrics["loss"] = loss
        return loss, metrics, {"queues": new_queues}

    # --- evaluation (encoders and features: FeatureFamily) --------------------------
    def fused_features(self, params, image, text):
        """The fused [CLS] of an image-text pass (what ITM and a VQA head read): [B, D]."""
        return self._apply(params, self.model.fused_features, image, text)

    # --- FLOPs per sample (mmjax/flops.py) -------------------------------------------
    def image_flops(self) -> int:
        im = self.image_variant
        return vision(self.c, im) + 2 * im["width"] * self.embed_dim

    def fused_flops(self) -> tuple:
        """-> (fused_features' forward FLOPs per sample, its width D): the image tower,
        the text-only layers and the fusion layers."""
        tx = self.text_variant
        return vision(self.c, self.image_variant) + self._text_flops() + self._fusion_flops(), tx["width"]

    def _text_flops(self):
        tx = self.text_variant
        return self.fusion_from * layer(self.text_len, tx["width"], tx["mlp_dim"])

    def _fusion_flops(self):
        im, tx = self.image_variant, self.text_variant
        t_img = vision_tokens(self.c, im)
        return (tx["depth"] - self.fusion_from) * cross_layer(
            self.text_len, tx["width"], tx["mlp_dim"], t_img, im["width"]
        )

    def flops(self, batch: int) -> dict:
        """Student: image tower, text layers and projections; ITC against the batch and
        the queue (Q slots), 2*2*(B+Q)*E; ITM: hard-negative similarities 2*2*B*E and the
        fusion layers on 3 pairs + the ITM head; MLM: text + fusion layers on the masked
        text + the MLM head. Teacher: image tower, text layers, projections, its ITC
        logits, and the MLM pass again."""
        d, e, length = self.text_variant["width"], self.embed_dim, self.text_len
        fusion = self._fusion_flops()
        mlm = self._text_flops() + fusion + 2 * length * (d * d + d * self.model.vocab_size)
        student = teacher = self.image_flops() + self._text_flops() + 2 * d * e
        if "itc" in self.tasks:
            student, teacher = (
                student + 2 * 2 * (batch + self.queue_size) * e,
                teacher + 2 * 2 * (batch + self.queue_size) * e,
            )
        if "itm" in self.tasks:
            student += 2 * 2 * batch * e + 3 * (fusion + 2 * d * 2)
        if "mlm" in self.tasks:
            student, teacher = student + mlm, teacher + mlm
        return {"student": student, "teacher": teacher}

    def itm_scores(self, params, image_tokens, stream, text):
        """Log-odds that each (image, text) pair matches: [B,T,Di], [B,L,D], [B,L] -> [B]."""
        logits = self._apply(
            params, self.model.itm_logits, self._apply(params, self.model.fuse, stream, text, image_tokens)
        )
        return logits[:, 1] - logits[:, 0]
