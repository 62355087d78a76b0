"""VQA as answer classification over a fusion model's fused image-text features.

`model.family = "vqa"`, `model.backbone` = the model config of an ALBEF, VLMo or
BEiT-3 checkpoint (`mmjax finetune --init-from` fills it in), `model.num_answers`.
The question is the text; the feature is the backbone's fused [CLS] of the
image-question pass (`fused_features`: ALBEF's last fusion layer, VLMo/BEiT-3's
joint pass), and the head is VLMo's and BEiT-3's VQA classifier:
Dense(2D) -> LayerNorm -> GELU -> Dense(num_answers). Only the params that pass
touches exist (no ITC projections, ITM/MLM heads, queues or teacher), so the
checkpoint restores into exactly what the task needs.

Losses (`model.vqa_loss`):
  softmax  cross entropy on the single answer `label` (mmjax's default: the
           built-in data has one answer per question);
  bce      VLMo/BEiT-3's VQAv2 loss: sigmoid cross entropy against one-hot (on
           VQAv2: soft-score) targets, summed over answers, averaged over the batch.
ALBEF's release answers VQA with a generative answer decoder ranking candidate
answers; mmjax uses this classifier head for every backbone.
"""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.transformer import gelu_exact
from mmjax.models.zoo.classifier import WrapperConfig, build_backbone
from mmjax.models.zoo.contract import Family, register
from mmjax.models.zoo.schema import key
from mmjax.parallel.sharding import dense_init, norm_init

LOSSES = ("softmax", "bce")


class AnswerHead(nn.Module):
    """[B, D] -> [B, num_answers] float32: Dense(2D) -> LayerNorm -> GELU -> Dense."""

    num_answers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxD):
        chex.assert_rank(x_BxD, 2)
        d = x_BxD.shape[-1]
        h = nn.Dense(2 * d, dtype=self.dtype, name="dense1", **dense_init("embed", "mlp"))(x_BxD)
        h = nn.LayerNorm(dtype=self.dtype, name="norm", **norm_init())(h)
        h = gelu_exact(h)
        out = nn.Dense(self.num_answers, dtype=self.dtype, name="dense2", **dense_init("mlp", None))(h)
        return jnp.asarray(out, jnp.float32)


class AnswerClassifier(nn.Module):
    """`__call__(image [B,H,W,3], question ids [B,L]) -> answer logits [B, A]`."""

    backbone: Any  # the fusion family's linen module (has `fused_features`)
    num_answers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image_BxHxWx3, ids_BxL):
        fused_BxD = self.backbone.fused_features(image_BxHxWx3, ids_BxL)
        return AnswerHead(self.num_answers, self.dtype, name="head")(fused_BxD)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VqaConfig(WrapperConfig):
    num_answers: int = key(0)
    vqa_loss: str = key("softmax", choices=LOSSES)


@register("vqa")
class VqaFamily(Family):
    """Answer classification; eval reports top-1 / top-5 and top-1 per answer type
    (keys: VqaConfig: backbone, num_answers, vqa_loss)."""

    Config = VqaConfig
    capabilities = frozenset({"classify"})
    batch_keys = ("image", "text", "label")

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.backbone, backbone_cfg = build_backbone(c, "vqa", "fuse")
        self.num_classes = c.num_answers
        if self.num_classes < 2:
            raise ValueError(f"model.num_answers={self.num_classes}: need at least 2 answers")
        self.loss = c.vqa_loss
        self.config, self.c = model_config, c
        self.image_size = self.backbone.image_size
        self.text_len = self.backbone.text_len
        self.model = AnswerClassifier(self.backbone.model, self.num_classes, dtype=self.backbone.model.dtype)

    def flops(self, batch: int) -> dict:
        """The backbone's fused features + the answer head 2*D*2D + 2*2D*A."""
        del batch
        fused, d = self.backbone.fused_flops()
        return {"student": fused + 2 * d * 2 * d + 2 * 2 * d * self.num_classes, "teacher": 0}

    def logits(self, params, image, text):
        return self.model.apply({"params": params}, image, text)

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=None):
        """-> (loss, metrics, {}): the mean over the batch of the per-question loss."""
        del rng, teacher, queues, step, gather
        logits = self.logits(params, batch["image"], batch["text"])
        labels = batch["label"].astype(jnp.int32)
        if self.loss == "softmax":
            logp = jax.nn.log_softmax(logits, axis=-1)
            per = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        else:
            target = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
            per = jnp.sum(jnp.logaddexp(0.0, logits) - target * logits, axis=-1)  # BCE with logits
        loss = jnp.mean(per)
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "train_top1": acc}, {}
