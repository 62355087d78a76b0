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
mapping itself is `mmjax.export.hf_clip_weights`; reading a directory `hf_io`.

Only numpy and safetensors are needed to read and write (torch for pytorch_model.bin);
the parity helpers import torch and transformers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.export.hf_clip_weights import params_from_state_dict, spec_from_params, state_dict_from_params
from mmjax.export.hf_io import read_json, read_state_dict
from mmjax.models.zoo.clip import CLIP

log = logging.getLogger(__name__)

# transformers hidden_act -> mmjax model.act (gelu_new / gelu_pytorch_tanh are the
# tanh approximation, flax's nn.gelu).
HF_TO_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults: save_pretrained leaves out
# values equal to them.
TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=49406,
    eos_token_id=49407,
)
VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
CLIP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)
LEGACY_EOS = 2  # transformers pools at input_ids.argmax(-1) when eos_token_id == 2
LEGACY_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # OpenAI's early configs
MMJAX_IDS = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)  # mmjax.data.tokenizer
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


def _square(value, what):
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"vision_config.{what}={list(value)} is not square; mmjax's ViT takes square {what.replace('_', ' ')}s"
            )
        value = value[0]
    return int(value)


def spec_from_hf_config(hf: dict) -> dict:
    """A transformers CLIPConfig dict -> the shapes and settings of the mmjax model.

    Returns {image: {width, depth, heads, mlp_dim, patch}, text: {...}, image_size,
    text_len, vocab_size, embed_dim, act, ln_eps, text_pool, eos_id, token_ids}.
    """
    model_type = hf.get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"config.json has model_type {model_type!r}: hf-clip converts transformers "
            "CLIPModel checkpoints (model_type 'clip') only"
            + (" ; SigLIP has a sigmoid-loss bias and no [CLS] token" if "siglip" in str(model_type) else "")
        )
    # Old configs also carry text_config_dict / vision_config_dict, which win.
    tc = {**TEXT_DEFAULTS, **(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
    vc = {**VISION_DEFAULTS, **(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
    if tc["hidden_act"] != vc["hidden_act"]:
        raise ValueError(
            f"hidden_act differs between the towers (text {tc['hidden_act']!r}, vision "
            f"{vc['hidden_act']!r}); mmjax's model.act applies to both"
        )
    if tc["hidden_act"] not in HF_TO_ACT:
        raise ValueError(f"hidden_act {tc['hidden_act']!r} has no mmjax counterpart; supported: {', '.join(HF_TO_ACT)}")
    if float(tc["layer_norm_eps"]) != float(vc["layer_norm_eps"]):
        raise ValueError(
            f"layer_norm_eps differs between the towers (text {tc['layer_norm_eps']}, "
            f"vision {vc['layer_norm_eps']}); mmjax's model.ln_eps applies to both"
        )
    if int(vc["num_channels"]) != 3:
        raise ValueError(f"vision_config.num_channels={vc['num_channels']}: mmjax images are RGB (3)")
    patch = _square(vc["patch_size"], "patch_size")
    image_size = _square(vc["image_size"], "image_size")
    if image_size % patch:
        raise ValueError(f"vision_config.image_size={image_size} is not a multiple of patch_size={patch}")
    eos = tc["eos_token_id"]
    if isinstance(eos, (list, tuple)) or eos is None:
        raise ValueError(f"text_config.eos_token_id={eos!r}: one integer id is needed to pool the text")
    eos = int(eos)
    spec = dict(
        image=dict(
            width=int(vc["hidden_size"]),
            depth=int(vc["num_hidden_layers"]),
            heads=int(vc["num_attention_heads"]),
            mlp_dim=int(vc["intermediate_size"]),
            patch=patch,
        ),
        text=dict(
            width=int(tc["hidden_size"]),
            depth=int(tc["num_hidden_layers"]),
            heads=int(tc["num_attention_heads"]),
            mlp_dim=int(tc["intermediate_size"]),
            patch=None,
        ),
        image_size=image_size,
        text_len=int(tc["max_position_embeddings"]),
        vocab_size=int(tc["vocab_size"]),
        embed_dim=int(hf.get("projection_dim", CLIP_DEFAULTS["projection_dim"])),
        act=HF_TO_ACT[tc["hidden_act"]],
        ln_eps=float(tc["layer_norm_eps"]),
        text_pool="argmax" if eos == LEGACY_EOS else "eos",
        eos_id=None if eos == LEGACY_EOS else eos,
        token_ids=(tc.get("bos_token_id"), eos, tc.get("pad_token_id")),
    )
    for tower in ("image", "text"):
        t = spec[tower]
        if t["width"] % t["heads"]:
            raise ValueError(
                f"{tower} tower: hidden_size {t['width']} is not divisible by num_attention_heads {t['heads']}"
            )
    return spec


# ------------------------------------------------------------------ mmjax model <-> HF config


def model_config(spec: dict) -> dict:
    """The mmjax `model` config section (family clip) of a CLIP `spec`."""
    from mmjax.models.variants import TEXT_SIZES, VIT_SIZES

    def variant(t, table, patch):
        key = (t["width"], t["depth"], t["heads"], t["mlp_dim"])
        name = next((n for n, v in table.items() if v == key), None)
        overrides = {} if name else dict(width=key[0], depth=key[1], heads=key[2], mlp_dim=key[3])
        name = name or "mu"
        return (f"{name}/{patch}" if patch else name), overrides

    image, image_overrides = variant(spec["image"], VIT_SIZES, spec["image"]["patch"])
    text, text_overrides = variant(spec["text"], TEXT_SIZES, None)
    return dict(
        family="clip",
        image=image,
        text=text,
        image_overrides=image_overrides,
        text_overrides=text_overrides,
        embed_dim=spec["embed_dim"],
        loss="softmax",
        pool="cls",
        posemb="learn",
        act=spec["act"],
        ln_eps=spec["ln_eps"],
        text_pool=spec["text_pool"],
        eos_id=spec["eos_id"],
        image_size=spec["image_size"],
        text_len=spec["text_len"],
        vocab_size=spec["vocab_size"],
    )


def build_model(spec: dict) -> HFCLIP:
    """The HFCLIP module of a spec, built through ClipFamily (as a workdir's model is)."""
    import ml_collections

    from mmjax.models.zoo.clip import ClipFamily

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


def check_exportable(model: CLIP) -> None:
    """ValueError naming the first setting of `model` transformers' CLIP cannot express."""
    if model.loss != "softmax":
        raise ValueError(f"model.loss={model.loss!r} (SigLIP-style): transformers' CLIPModel has softmax logits only")
    if model.pool != "cls":
        raise ValueError(f"model.pool={model.pool!r}: transformers' CLIP pools the [CLS] token ('cls')")
    if model.posemb != "learn":
        raise ValueError(f"model.posemb={model.posemb!r}: transformers' CLIP has learned positions ('learn')")
    if model.act not in ACT_TO_HF:
        raise ValueError(f"model.act={model.act!r} has no transformers counterpart")
    if model.text_pool == "eos" and int(model.eos_id) == LEGACY_EOS:
        raise ValueError(
            "model.eos_id=2 with text_pool='eos': transformers reads eos_token_id 2 as the "
            "legacy argmax rule; use text_pool='argmax' or another eos id"
        )


def hf_config(model: CLIP, spec: dict, *, eos_id=None) -> dict:
    """The transformers config.json of mmjax CLIP `model` with the shapes of `spec`."""
    check_exportable(model)
    known = dict(zip(("bos_token_id", "eos_token_id", "pad_token_id"), getattr(model, "hf_token_ids", None) or ()))
    if model.text_pool == "argmax":
        ids = known if known.get("eos_token_id") == LEGACY_EOS else dict(LEGACY_IDS)
    elif model.text_pool == "eos":
        ids = dict(known) if known.get("eos_token_id") == int(model.eos_id) else {}
        ids["eos_token_id"] = int(model.eos_id)
    else:  # 'last': mmjax's tokenizer puts one eos last, then pad 0: the first eos is the same token
        ids = dict(MMJAX_IDS)
        if eos_id is not None:
            ids["eos_token_id"] = int(eos_id)
        if ids["eos_token_id"] == LEGACY_EOS:
            raise ValueError("eos id 2 reads as transformers' legacy argmax rule; cannot export text_pool='last'")
        log.info(
            "text_pool='last' exported as transformers' first-eos pooling at id %d: the same "
            "token for mmjax-tokenized text (bos ... eos pad ...)",
            ids["eos_token_id"],
        )
    ids = {k: (None if v is None else int(v)) for k, v in ids.items()}
    act, eps, e = ACT_TO_HF[model.act], float(model.ln_eps), spec["embed_dim"]
    im, tx = spec["image"], spec["text"]
    common = dict(
        hidden_act=act,
        layer_norm_eps=eps,
        projection_dim=e,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
    )
    text_config = dict(
        model_type="clip_text_model",
        vocab_size=spec["vocab_size"],
        hidden_size=tx["width"],
        intermediate_size=tx["mlp_dim"],
        num_hidden_layers=tx["depth"],
        num_attention_heads=tx["heads"],
        max_position_embeddings=spec["text_len"],
        **ids,
        **common,
    )
    vision_config = dict(
        model_type="clip_vision_model",
        hidden_size=im["width"],
        intermediate_size=im["mlp_dim"],
        num_hidden_layers=im["depth"],
        num_attention_heads=im["heads"],
        num_channels=3,
        image_size=spec["image_size"],
        patch_size=im["patch"],
        **common,
    )
    return dict(
        architectures=["CLIPModel"],
        model_type="clip",
        projection_dim=e,
        logit_scale_init_value=CLIP_DEFAULTS["logit_scale_init_value"],
        initializer_factor=1.0,
        dtype="float32",
        text_config=text_config,
        vision_config=vision_config,
    )


def image_processor_config(image_size: int, mean=None, std=None) -> dict:
    """transformers `CLIPImageProcessor` settings that prepare an image as mmjax's eval
    pipeline does (mmjax.data.images.load_images): RGB, resized to image_size x
    image_size (bilinear, antialiased when shrinking, as PIL does; no center crop),
    x / 255, then (x - mean) / std. mean/std default to mmjax's (mmjax.data.pipeline)."""
    if mean is None or std is None:
        from mmjax.data.pipeline import MEAN, STD  # constants only: no TensorFlow import

        mean, std = MEAN if mean is None else mean, STD if std is None else std
    s = int(image_size)
    return dict(
        image_processor_type="CLIPImageProcessor",
        do_convert_rgb=True,
        do_resize=True,
        size={"height": s, "width": s},
        resample=2,  # PIL.Image.BILINEAR
        do_center_crop=False,
        crop_size={"height": s, "width": s},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(v) for v in mean],
        image_std=[float(v) for v in std],
    )


def save_clip(model, variables, out_dir: str, *, eos_id=None, image_mean=None, image_std=None) -> str:
    """Writes `out_dir/config.json` + `model.safetensors` for `transformers.CLIPModel`,
    and `preprocessor_config.json` for `transformers.CLIPImageProcessor`.

    model: an mmjax CLIP module (HFCLIP from load_clip, or ClipFamily(...).model);
    variables: {'params': params} or the params. eos_id: for a model with mmjax's
    text_pool='last', the eos id written to the config (default 3, mmjax's tokenizer).
    image_mean / image_std: the normalisation (default mmjax's, OpenAI CLIP's values).
    Returns out_dir. ValueError names what does not fit transformers' CLIP.
    """
    from safetensors.numpy import save_file

    model = getattr(model, "model", model)  # a ClipFamily works too
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
    config = hf_config(model, spec, eos_id=eos_id)
    sd = state_dict_from_params(params, spec)
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, PREPROCESSOR_FILE), "w") as f:
        json.dump(image_processor_config(spec["image_size"], image_mean, image_std), f, indent=2, sort_keys=True)
    return out_dir
