"""Model families: `build(model_config)` -> a family object.

A family is one module here that registers its class with `@register("name")`
(contract.py: the contract every family follows, its declared capabilities and its
config schema). This package imports each of its modules once, so `FAMILIES` (the
registry), `build` and `config.CHOICES["model.family"]` see a new family without
another list to edit.
"""

import importlib
import pkgutil

from mmjax.models.zoo.contract import CAPABILITIES, FAMILIES, Family, check_contract, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from mmjax.models.zoo.albef import ALBEF, AlbefFamily  # noqa: E402
from mmjax.models.zoo.blip import BLIP, BlipFamily  # noqa: E402
from mmjax.models.zoo.classifier import WRAPPERS, Classifier, ClassifierFamily, WrapperConfig  # noqa: E402
from mmjax.models.zoo.clip import CLIP, ClipFamily  # noqa: E402
from mmjax.models.zoo.coca import CoCa, CocaFamily  # noqa: E402
from mmjax.models.zoo.multiway import Multiway, MultiwayFamily  # noqa: E402
from mmjax.models.zoo.vqa import AnswerClassifier, VqaFamily  # noqa: E402


def build(model_config):
    """model_config.family -> family object (e.g. ClipFamily(model_config)), its
    config checked against the family's schema and its contract checked once."""
    from mmjax.config import ConfigError

    family = model_config.get("family", None)
    if family not in FAMILIES:
        raise ConfigError(f"bad value for config key 'model.family': {family!r}; valid choices: {', '.join(FAMILIES)}")
    out = FAMILIES[family](model_config)
    check_contract(out)
    return out


def check_config(model_config) -> None:
    """Checks a model config section against its family's schema without building
    anything (ConfigError for an unknown family or key, a type, a choice); a
    wrapper's backbone section is checked against its own family's."""
    from mmjax.config import ConfigError

    family = model_config.get("family", None)
    if family not in FAMILIES:
        raise ConfigError(f"bad value for config key 'model.family': {family!r}; valid choices: {', '.join(FAMILIES)}")
    parsed = FAMILIES[family].Config.parse(model_config)
    if isinstance(parsed, WrapperConfig) and parsed.backbone:
        check_config(parsed.backbone)


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
    "register",
]
