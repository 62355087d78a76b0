"""Image classification on top of a pretrained family's image tower.

`model.family = "classifier"`, `model.backbone` = the model config of the family
whose image tower is reused (CLIP, ALBEF, VLMo, BEiT-3), `model.num_classes`.
The feature is the backbone's image embedding (projected, L2-normalised: what its
retrieval uses), scaled by `model.feature_scale`, then one Dense head. Only the
params the image path touches exist (text tower, fusion layers, ITM/MLM heads,
queues and teacher are not part of this model), so restoring a pretraining
checkpoint into it keeps exactly what the task needs.

Linear probe: `train.freeze = ("^backbone/",)`; full fine-tune: no freeze, with
`train.layer_decay` (layer-wise lr decay).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models.zoo.common import Family
from mmjax.parallel.sharding import dense_init


class Classifier(nn.Module):
    """`__call__(image: [B, H, W, 3]) -> logits [B, num_classes]` float32."""

    backbone: Any  # the backbone family's linen module
    num_classes: int
    feature_scale: float = 10.0

    @nn.compact
    def __call__(self, image_BxHxWx3):
        method = "image_features" if hasattr(self.backbone, "image_features") else "encode_image"
        emb_BxE = getattr(self.backbone, method)(image_BxHxWx3)[0]
        head = nn.Dense(
            self.num_classes,
            name="head",
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", None)),
            bias_init=dense_init("embed", None)["bias_init"],
        )
        return head(jnp.asarray(emb_BxE, jnp.float32) * self.feature_scale).astype(jnp.float32)


def build_backbone(cfg, wrapper: str, allowed=None):
    """(backbone family, its model config) from `cfg.backbone`, with the image size,
    text length and vocabulary of the fine-tuning run (`cfg.image_size` etc., which
    Setup fills from the data and tokenizer) replacing the checkpoint's."""
    from mmjax.models import zoo

    backbone_cfg = cfg.get("backbone", None)
    if not backbone_cfg:
        raise ValueError(
            "model.backbone must hold the backbone's model config (e.g. the pretraining "
            "workdir's model section); `mmjax finetune --init-from` fills it in"
        )
    backbone_cfg = ml_collections.ConfigDict(dict(backbone_cfg))
    with backbone_cfg.unlocked():  # sizes follow the fine-tuning data
        for k in ("image_size", "text_len", "vocab_size"):
            if cfg.get(k, None) is not None:
                backbone_cfg[k] = cfg[k]
    family = backbone_cfg.get("family")
    if family in WRAPPERS:
        raise ValueError(f"model.backbone cannot itself be a {family} (it wraps a pretraining family)")
    if allowed is not None and family not in allowed:
        raise ValueError(
            f"model.family={wrapper!r} needs a backbone with fused image-text features; "
            f"model.backbone.family={family!r}; valid choices: {', '.join(allowed)}"
        )
    return zoo.build(backbone_cfg), backbone_cfg


WRAPPERS = ("classifier", "vqa")  # families whose params sit under `backbone/` + a head


class ClassifierFamily(Family):
    """Softmax cross entropy on `label`; eval reports top-1 / top-5 accuracy."""

    batch_keys = ("image", "label")

    def __init__(self, model_config):
        cfg = model_config
        self.backbone, backbone_cfg = build_backbone(cfg, "classifier")
        self.num_classes = int(cfg.get("num_classes", 0) or 0)
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes={self.num_classes}: need at least 2 classes")
        self.config = cfg
        self.image_size = int(backbone_cfg.get("image_size", 224))
        self.text_len = int(backbone_cfg.get("text_len", 16))
        self.model = Classifier(self.backbone.model, self.num_classes, float(cfg.get("feature_scale", 10.0)))

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        del text_shape
        image = jnp.zeros(tuple(image_shape or (1, self.image_size, self.image_size, 3)), jnp.float32)
        params = self.model.init(rng, image)["params"]
        return params if boxed else nn.unbox(params)

    def logits(self, params, image):
        return self.model.apply({"params": params}, image)

    def objective(self, params, batch, rng=None, *, gather=None, **_):
        """-> (loss, metrics, {}): mean cross entropy over the batch, accuracy."""
        del rng
        logits = self.logits(params, batch["image"])
        labels = batch["label"].astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        loss = jnp.mean(nll)
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "train_top1": acc}, {}
