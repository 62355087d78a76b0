"""transformers CLIP directories <-> mmjax CLIP.

    from mmjax.export import hf
    model, variables = hf.load_clip(DIR)   # DIR: config.json + model.safetensors / pytorch_model.bin
    img = model.apply(variables, images, method=model.encode_image)   # [B, H, W, 3] f32, normalized (NHWC)
    txt = model.apply(variables, token_ids, method=model.encode_text) # [B, L] int32
    hf.save_clip(model, variables, OUT)    # transformers.CLIPModel.from_pretrained(OUT) loads it
                                           # (and CLIPImageProcessor: preprocessor_config.json)

    # workdirs (mmjax convert / mmjax export --format hf-clip): mmjax.export.hf_workdir

    python -m mmjax.export.hf_parity       # mmjax vs transformers on random configs (torch)

`load_clip` returns an `HFCLIP`: mmjax's `CLIP` module (same params, same tree) whose
`encode_image` / `encode_text` return the projected, *unnormalised* features, i.e.
transformers' `CLIPModel.get_image_features` / `get_text_features`. The mmjax settings
that make the numbers equal are read from config.json:

  hidden_act      -> model.act: quick_gelu | gelu (exact erf) | gelu_tanh (gelu_new,
                     gelu_pytorch_tanh); both towers must use the same one
  layer_norm_eps  -> model.ln_eps (both towers the same)
  eos_token_id    -> model.text_pool: 2 (legacy OpenAI configs) -> 'argmax' (the
                     largest id); else 'eos' with model.eos_id (the first eos);
                     attention is then causal only, as in get_text_features(input_ids)
  logit_scale     -> param `t`

Weights: q/k/v projections are stacked into mmjax's fused `qkv` DenseGeneral
[D, 3, H, Dh]; torch Linear [out, in] kernels are transposed; the patch conv
[D, C, P, P] (OIHW) becomes [P, P, C, D] (HWIO). Models that do not fit (a SigLIP or
other non-CLIP checkpoint, non-square patches or images, towers with different
activations, projection dims that differ, an mmjax model with mean pooling, fixed
sin-cos positions or a sigmoid-loss bias) raise ValueError naming the mismatch. The
mapping itself is `mmjax.export.hf_clip_weights`; reading a directory `hf_io`; the
config side (config.json <-> mmjax's model section) `hf_config`, re-exported here.

Only numpy and safetensors are needed to read and write (torch for pytorch_model.bin);
the parity helpers import torch and transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.export.hf_clip_weights import params_from_state_dict, spec_from_params, state_dict_from_params
from mmjax.export.hf_config import (  # noqa: F401 - the config side, re-exported: hf.X as before
    ACT_TO_HF,
    CLIP_DEFAULTS,
    HF_TO_ACT,
    LEGACY_EOS,
    LEGACY_IDS,
    MMJAX_IDS,
    TEXT_DEFAULTS,
    VISION_DEFAULTS,
    check_exportable,
    hf_config,
    image_processor_config,
    model_config,
    spec_from_hf_config,
)
from mmjax.export.hf_io import read_json, read_state_dict
from mmjax.models.zoo.clip import CLIP, ClipFamily

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"  # transformers' CLIPImageProcessor


class HFCLIP(CLIP):
    """mmjax CLIP with transformers' feature semantics (same params as `CLIP`).

    `encode_image(image: [B, H, W, 3] f32) -> [B, E]` and `encode_text(ids: [B, L] i32)
    -> [B, E]` are the projected, unnormalised features (`get_image_features` /
    `get_text_features`); `__call__(image, text)` returns both. `hf_token_ids`
    (bos, eos, pad) of the source config are kept for `save_clip`.
    """

    hf_token_ids: Any = None

    def encode_image(self, image_BxHxWx3):
        return self.project_image(image_BxHxWx3)

    def encode_text(self, text_BxL):
        return self.project_text(text_BxL)

    def __call__(self, image, text):
        return self.project_image(image), self.project_text(text)


def build_model(spec: dict) -> HFCLIP:
    """The HFCLIP module of a spec, built through ClipFamily (as a workdir's model is)."""
    import ml_collections

    clip = ClipFamily(ml_collections.ConfigDict(model_config(spec))).model
    fields = {f.name: getattr(clip, f.name) for f in dataclasses.fields(CLIP) if f.name not in ("parent", "name")}
    return HFCLIP(**fields, hf_token_ids=tuple(spec.get("token_ids") or ()) or None)


def read_clip(src_dir: str):
    """(spec, params) of a transformers CLIPModel directory; see spec_from_hf_config."""
    cfg_path = os.path.join(src_dir, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: is {src_dir!r} a transformers model directory?")
    spec = spec_from_hf_config(read_json(cfg_path))
    params = params_from_state_dict(read_state_dict(src_dir), spec)
    return spec, params


def load_clip(src_dir: str):
    """-> (model: HFCLIP, variables {'params': ...}) from a transformers CLIPModel directory.

    `model.apply(variables, images, method=model.encode_image)` equals
    `CLIPModel.get_image_features(pixel_values)` (images NHWC here, NCHW there) and
    `encode_text` equals `get_text_features(input_ids)`.
    """
    import jax.numpy as jnp

    spec, params = read_clip(src_dir)
    model = build_model(spec)
    return model, {"params": _tree_map(jnp.asarray, params)}


def _tree_map(fn, tree):
    """Over nested mappings (dicts, FrozenDicts) -> nested dicts."""
    return {k: _tree_map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def save_clip(model, variables, out_dir: str, *, eos_id=None, token_ids=None, image_mean=None, image_std=None) -> str:
    """Writes `out_dir/config.json` + `model.safetensors` for `transformers.CLIPModel`,
    and `preprocessor_config.json` for `transformers.CLIPImageProcessor`.

    model: an mmjax CLIP module (HFCLIP from load_clip, or ClipFamily(...).model);
    variables: {'params': params} or the params. eos_id: for a model with mmjax's
    text_pool='last', the eos id written to the config; token_ids: the tokenizer's special
    ids (`Tokenizer.special_ids`: its bos / eos / pad go to the config; default mmjax's).
    image_mean / image_std: the normalisation (default mmjax's, OpenAI CLIP's values).
    Returns out_dir. ValueError names what does not fit transformers' CLIP.
    """
    from safetensors.numpy import save_file

    if isinstance(model, ClipFamily):  # a ClipFamily works too
        model = model.model
    if not isinstance(model, CLIP):
        raise ValueError(f"save_clip takes an mmjax CLIP module, got {type(model).__name__}")
    params = variables["params"] if "params" in variables else variables
    params = _tree_map(np.asarray, params)
    spec = spec_from_params(params)
    # The module's own sizes must agree with the params (a mismatch is a caller's mix-up).
    for tower, attrs in (("image", model.image), ("text", model.text)):
        for k in ("width", "depth", "heads", "mlp_dim"):
            if int(attrs[k]) != spec[tower][k]:
                raise ValueError(f"{tower} {k}: the module says {attrs[k]}, the params {spec[tower][k]}")
    config = hf_config(model, spec, eos_id=eos_id, token_ids=token_ids)
    sd = state_dict_from_params(params, spec)
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, PREPROCESSOR_FILE), "w") as f:
        json.dump(image_processor_config(spec["image_size"], image_mean, image_std), f, indent=2, sort_keys=True)
    return out_dir
