"""Model families: `build(model_config)` -> a family object.

A family has `.model` (the linen module), `init_params`, `embed`,
`loss_from_embeddings`, `objective`, `encode_image`, `encode_text`.
"""
from mmjax.models.zoo.clip import CLIP, ClipFamily

FAMILIES = {"clip": ClipFamily}


def build(model_config):
  """model_config.family -> family object (e.g. ClipFamily(model_config))."""
  family = model_config.get("family", None)
  if family not in FAMILIES:
    raise ValueError(f"model_config.family must be one of {sorted(FAMILIES)}, "
                     f"got {family!r}.")
  return FAMILIES[family](model_config)


def build_module(model_config):
  """The linen module alone: `build(model_config).model`."""
  return build(model_config).model


__all__ = ["CLIP", "ClipFamily", "FAMILIES", "build", "build_module"]
