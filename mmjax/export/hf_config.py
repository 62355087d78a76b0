"""transformers CLIPConfig <-> the mmjax CLIP model config: `spec_from_hf_config`
(config.json -> the shapes and settings of the mmjax model), `model_config` (a spec ->
mmjax's `model` section), `check_exportable` and `hf_config` (an mmjax CLIP ->
config.json), `image_processor_config` (preprocessor_config.json). `mmjax.export.hf`
re-exports them; numpy only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mmjax.models.tokens import MMJAX

if TYPE_CHECKING:
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
MMJAX_IDS = dict(bos_token_id=MMJAX["bos"], eos_token_id=MMJAX["eos"], pad_token_id=MMJAX["pad"])  # mmjax tokenizer


def _square(value, what):
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"vision_config.{what}={list(value)} is not square; mmjax's ViT takes square {what.replace('_', ' ')}s"
            )
        value = value[0]
    return int(value)


def _check_towers(tc: dict, vc: dict) -> None:
    """ValueError naming a text/vision setting that mmjax's one model.act / model.ln_eps
    (or its RGB input) cannot express."""
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
    _check_towers(tc, vc)
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


def _token_ids(model: CLIP, eos_id=None, token_ids=None) -> dict:
    """The bos/eos/pad ids of the exported config, which fix how transformers pools the
    text; `token_ids`: the workdir tokenizer's special ids (`Tokenizer.special_ids`)."""
    known = dict(zip(("bos_token_id", "eos_token_id", "pad_token_id"), getattr(model, "hf_token_ids", None) or ()))
    if model.text_pool == "argmax":
        ids = known if known.get("eos_token_id") == LEGACY_EOS else dict(LEGACY_IDS)
    elif model.text_pool == "eos":
        ids = dict(known) if known.get("eos_token_id") == int(model.eos_id) else {}
        ids["eos_token_id"] = int(model.eos_id)
    else:  # 'last': mmjax's tokenizer puts one eos last, then pad 0: the first eos is the same token
        ids = dict(MMJAX_IDS)
        for name in ("bos", "eos", "pad"):
            if (token_ids or {}).get(name) is not None:
                ids[f"{name}_token_id"] = int(token_ids[name])
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
    return ids


def hf_config(model: CLIP, spec: dict, *, eos_id=None, token_ids=None) -> dict:
    """The transformers config.json of mmjax CLIP `model` with the shapes of `spec`."""
    check_exportable(model)
    ids = _token_ids(model, eos_id, token_ids)
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
