"""Model families: `build(model_config)` -> a family object.

A family is one module here that registers its class with `@register("name")`
(contract.py: the contract every family follows, its declared capabilities and its
config schema). This package imports each of its modules once, so `FAMILIES` (the
registry), `build` and `config.CHOICES["model.family"]` see a new family without
another list to edit.
"""

import importlib
import pkgutil

from mmjax.models.zoo.contract import (
    CAPABILITIES,
    FAMILIES,
    Family,
    build,
    check_config,
    check_contract,
    family_class,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from mmjax.models.zoo.albef import ALBEF, AlbefFamily  # noqa: E402
from mmjax.models.zoo.blip import BLIP, BlipFamily  # noqa: E402
from mmjax.models.zoo.classifier import WRAPPERS, Classifier, ClassifierFamily, WrapperConfig  # noqa: E402
from mmjax.models.zoo.clip import CLIP, ClipFamily  # noqa: E402
from mmjax.models.zoo.coca import CoCa, CocaFamily  # noqa: E402
from mmjax.models.zoo.multiway import Multiway, MultiwayFamily  # noqa: E402
from mmjax.models.zoo.vqa import AnswerClassifier, VqaFamily  # noqa: E402


def build_module(model_config):
    """The linen module alone: `build(model_config).model`."""
    return build(model_config).model


__all__ = [
    "ALBEF",
    "BLIP",
    "CAPABILITIES",
    "CLIP",
    "FAMILIES",
    "WRAPPERS",
    "WrapperConfig",
    "AlbefFamily",
    "AnswerClassifier",
    "BlipFamily",
    "Classifier",
    "ClassifierFamily",
    "ClipFamily",
    "CoCa",
    "CocaFamily",
    "Family",
    "Multiway",
    "MultiwayFamily",
    "VqaFamily",
    "build",
    "build_module",
    "check_config",
    "check_contract",
    "family_class",
    "register",
]
