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

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models.zoo.contract import FAMILIES, Family, build, register
from mmjax.models.zoo.schema import ModelConfig, key
from mmjax.parallel.sharding import dense_init


class Classifier(nn.Module):
    """`__call__(image: [B, H, W, 3]) -> logits [B, num_classes]` float32."""

    backbone: Any  # the backbone family's linen module
    num_classes: int
    feature_scale: float = 10.0
    clip_backbone: bool = False  # the backbone is a CLIP (its image embedding: `encode_image`)

    @nn.compact
    def __call__(self, image_BxHxWx3):
        encode = self.backbone.encode_image if self.clip_backbone else self.backbone.image_features
        emb_BxE = encode(image_BxHxWx3)[0]
        head = nn.Dense(
            self.num_classes,
            name="head",
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", None)),
            bias_init=dense_init("embed", None)["bias_init"],
        )
        return head(jnp.asarray(emb_BxE, jnp.float32) * self.feature_scale).astype(jnp.float32)


def build_backbone(c, wrapper: str, capability: str):
    """(backbone family, its model config) from the parsed wrapper config `c`
    (`c.backbone`), with the image size, text length and vocabulary of the
    fine-tuning run (`c.image_size` etc., derived from its data and tokenizer)
    replacing the checkpoint's; the backbone must declare `capability`."""
    if not c.backbone:
        raise ValueError(
            "model.backbone must hold the backbone's model config (e.g. the pretraining "
            "workdir's model section); `mmjax finetune --init-from` fills it in"
        )
    backbone_cfg = ml_collections.ConfigDict(dict(c.backbone))
    with backbone_cfg.unlocked():  # sizes follow the fine-tuning data
        for k in ("image_size", "text_len", "vocab_size", "token_ids"):
            if getattr(c, k) is not None:
                backbone_cfg[k] = getattr(c, k)
    family = backbone_cfg.get("family")
    if family in WRAPPERS:
        raise ValueError(f"model.backbone cannot itself be a {family} (it wraps a pretraining family)")
    allowed = [n for n, cls in FAMILIES.items() if capability in cls.capabilities and n not in WRAPPERS]
    if family not in allowed:
        raise ValueError(
            f"model.family={wrapper!r} needs a backbone with capability {capability!r}; "
            f"model.backbone.family={family!r}; valid choices: {', '.join(allowed)}"
        )
    return build(backbone_cfg), backbone_cfg


@dataclasses.dataclass(frozen=True, kw_only=True)
class WrapperConfig(ModelConfig):
    """The keys of a fine-tuning wrapper: backbone (the pretraining family's model
    config); image_size / text_len / vocab_size are the fine-tuning run's (None: the
    backbone's)."""

    backbone: dict = key({})
    image_size: int = key(None, none=True, derived=True)
    text_len: int = key(None, none=True, derived=True)
    vocab_size: int = key(None, none=True, derived=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig(WrapperConfig):
    num_classes: int = key(0)
    feature_scale: float = key(10.0)


WRAPPERS = ("classifier", "vqa")  # families whose params sit under `backbone/` + a head


@register("classifier")
class ClassifierFamily(Family):
    """Softmax cross entropy on `label`; eval reports top-1 / top-5 accuracy (keys:
    ClassifierConfig: backbone, num_classes, feature_scale)."""

    Config = ClassifierConfig
    capabilities = frozenset({"classify"})
    batch_keys = ("image", "label")

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.backbone, backbone_cfg = build_backbone(c, "classifier", "encode")
        self.num_classes = c.num_classes
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes={self.num_classes}: need at least 2 classes")
        self.config, self.c = model_config, c
        self.image_size = self.backbone.image_size
        self.text_len = self.backbone.text_len
        self.model = Classifier(
            self.backbone.model, self.num_classes, c.feature_scale, clip_backbone="clip" in self.backbone.names
        )

    def flops(self, batch: int) -> dict:
        """The backbone's image embedding + the head 2*E*C."""
        del batch
        return {"student": self.backbone.image_flops() + 2 * self.backbone.embed_dim * self.num_classes, "teacher": 0}

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        del text_shape
        image = jnp.zeros(tuple(image_shape or (1, self.image_size, self.image_size, 3)), jnp.float32)
        params = self.model.init(rng, image)["params"]
        return params if boxed else nn.unbox(params)

    def logits(self, params, image):
        return self.model.apply({"params": params}, image)

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=None):
        """-> (loss, metrics, {}): mean cross entropy over the batch, accuracy."""
        del rng, teacher, queues, step, gather
        logits = self.logits(params, batch["image"])
        labels = batch["label"].astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        loss = jnp.mean(nll)
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "train_top1": acc}, {}
