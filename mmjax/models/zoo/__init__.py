"""Model families: `build(model_config)` -> a family object.

A family has `.model` (the linen module), `init_params`, `objective`,
`encode_image`, `encode_text`; optionally `batch_keys` (the batch fields it reads),
`init_extra` + `teacher_update` (an EMA teacher and feature queues in the state),
`embed` + `loss_from_embeddings` (contrastive-only: GradCache accumulation), and
`image_features` + `text_features` + `itm_scores` (ITM re-ranking in the eval).
"""

from mmjax.models.zoo.albef import ALBEF, AlbefFamily
from mmjax.models.zoo.blip import BLIP, BlipFamily
from mmjax.models.zoo.classifier import WRAPPERS, Classifier, ClassifierFamily
from mmjax.models.zoo.clip import CLIP, ClipFamily
from mmjax.models.zoo.coca import CoCa, CocaFamily
from mmjax.models.zoo.multiway import Multiway, MultiwayFamily
from mmjax.models.zoo.vqa import AnswerClassifier, VqaFamily

FAMILIES = {
    "clip": ClipFamily,
    "albef": AlbefFamily,
    "vlmo": MultiwayFamily,
    "beit3": MultiwayFamily,
    "classifier": ClassifierFamily,
    "vqa": VqaFamily,
    "coca": CocaFamily,
    "blip": BlipFamily,
}


def build(model_config):
    """model_config.family -> family object (e.g. ClipFamily(model_config))."""
    family = model_config.get("family", None)
    if family not in FAMILIES:
        raise ValueError(f"model_config.family must be one of {sorted(FAMILIES)}, got {family!r}.")
    return FAMILIES[family](model_config)


def build_module(model_config):
    """The linen module alone: `build(model_config).model`."""
    return build(model_config).model


__all__ = [
    "BLIP",
    "BlipFamily",
    "CoCa",
    "CocaFamily",
    "AnswerClassifier",
    "VqaFamily",
    "Classifier",
    "ClassifierFamily",
    "ALBEF",
    "AlbefFamily",
    "CLIP",
    "ClipFamily",
    "Multiway",
    "MultiwayFamily",
    "FAMILIES",
    "WRAPPERS",
    "build",
    "build_module",
]
