"""mmjax LLaVA (model.family='llava') -> transformers `LlavaForConditionalGeneration`:
`mmjax export --format hf-llava`.

    from mmjax.export import hf_llava
    hf_llava.save_hf_llava(family, params, OUT, family.c.tokens.as_dict(), image_token_index=None,
                           tokenizer_path=TOK)       # LlavaForConditionalGeneration.from_pretrained(OUT)
    hf_llava.export_workdir(WORKDIR, OUT)            # the same from a `llava` workdir's checkpoint

What is written (OUT):
  config.json             LlavaConfig: vision_config (CLIPVisionConfig: the ViT's sizes, image_size,
                          patch_size, hidden_act = model.act, layer_norm_eps = model.ln_eps), text_config
                          (the LM's, `hf_llm.hf_config_from_spec`: Llama, Qwen2 or Gemma by its spec),
                          projector_hidden_act 'gelu' (exact, as mmjax's mlp2x_gelu),
                          vision_feature_layer (model.feature_layer; a non-negative one + 1, since
                          transformers' hidden_states[0] is the embedding output), strategy 'default'
                          ([CLS] dropped), image_token_index, image_seq_length T = (S / P)^2.
  model.safetensors       float32, in the layout of the llava-hf checkpoints (transformers 4 and 5 both
                          read it; 5 renames on load): vision_tower.vision_model.* (CLIPVisionModel),
                          multi_modal_projector.linear_{1,2}.{weight,bias}, language_model.model.*,
                          language_model.lm_head.weight (absent when the LM ties its embeddings).
  generation_config.json  bos / eos / pad of the tokenizer.
  preprocessor_config.json  CLIPImageProcessor preparing images as mmjax's eval pipeline does.
  processor_config.json   LlavaProcessor: patch_size, strategy 'default', image_token '<image>',
                          num_additional_image_tokens 1 (the [CLS]).
  the tokenizer files     of tokenizer_path (`hf_llm.copy_tokenizer`).

The image token (`resolve_image_token`): `image_token_index`, an id below the LM's vocabulary V
(the tokenizer's own '<image>'), is used as is. None: a copied tokenizer.json's '<image>' if it
has one; else its next free id n when n < V (a padded row the tokenizer never produces: nothing
grows), '<image>' added to the copied tokenizer.json as a special token with id n; else V is
appended: the embedding and lm_head (tied or not) grow by one row, each the mean of the V rows
(the input row is never read, image features replace it; the output row gives the mean logit,
so the token is never the sole argmax), text_config's vocab_size becomes V + 1, and a copied
tokenizer.json gets '<image>' with id V (a sentencepiece model cannot: put the id in input_ids
yourself). Either way the logits [..., :V] are mmjax's.

Not exportable (ValueError naming the key): model.family='cogvlm' (the visual expert has no place
in LLaVA), model.projector='linear' (transformers' LLaVA projector is always two layers),
model.prefix_lm (LLaVA attends causally), model.posemb other than 'learn', model.pool other than
'cls', an LM transformers has no class for (`hf_llm_workdir.layout_of`). LoRA adapters in the params
are merged first (`mmjax.models.lora.merge_lora`). numpy + safetensors only (no torch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from mmjax.export import hf_clip_weights as clip_w
from mmjax.export import hf_llm
from mmjax.export.hf_config import ACT_TO_HF, image_processor_config
from mmjax.export.hf_llm_weights import state_dict_from_params as lm_state_dict

IMAGE_TOKEN = "<image>"
VISION, PROJ, LM = "vision_tower.", "multi_modal_projector.", "language_model."
PROCESSOR_FILE, PREPROCESSOR_FILE = "processor_config.json", "preprocessor_config.json"
VISION_PARAM = re.compile(
    r"^vision/(encoder/block\d+/(attn/(qkv|out)|ln[12]|mlp/fc[12])/(kernel|bias|scale)"
    r"|ln_pre/(scale|bias)|encoder/ln_final/(scale|bias)|cls|pos_embedding|patch_embed/conv/kernel)$"
)


def check_exportable(family) -> None:
    """ValueError naming the first setting of a llava family transformers' LLaVA cannot express."""
    c = family.c
    if family.config.get("family") == "cogvlm" or family.spec.visual_expert:
        raise ValueError(
            "model.family='cogvlm': the visual expert (a second attention + MLP per LM layer) has no place in "
            "transformers' LlavaForConditionalGeneration; only model.family='llava' exports as hf-llava"
        )
    if c.projector != "mlp2x_gelu":
        raise ValueError(
            f"model.projector={c.projector!r}: transformers' LLaVA projector is always two layers "
            "(linear_1, GELU, linear_2); only model.projector='mlp2x_gelu' exports"
        )
    if c.prefix_lm:
        raise ValueError("model.prefix_lm=True: transformers' LLaVA attends causally (no bidirectional prefix)")
    if c.posemb != "learn":
        raise ValueError(f"model.posemb={c.posemb!r}: transformers' CLIP vision tower has learned positions ('learn')")
    if c.pool != "cls":
        raise ValueError(f"model.pool={c.pool!r}: transformers' CLIP vision tower has a [CLS] token ('cls')")
    if c.act not in ACT_TO_HF:
        raise ValueError(f"model.act={c.act!r} has no transformers counterpart; supported: {', '.join(ACT_TO_HF)}")
    from mmjax.export.hf_llm_workdir import layout_of

    layout_of(family.spec)


def hf_feature_layer(feature_layer: int, depth: int) -> int:
    """model.feature_layer (block index; negative from the end) -> transformers'
    vision_feature_layer (an index into hidden_states, whose [0] is the embedding output)."""
    if not -depth <= feature_layer < depth:
        raise ValueError(f"model.feature_layer={feature_layer} outside the vision tower's {depth} blocks")
    return int(feature_layer) if feature_layer < 0 else int(feature_layer) + 1


def resolve_image_token(image_token_index, vocab_size: int, tokenizer_size: int | None = None) -> tuple:
    """-> (the image token id, whether it is appended past the vocabulary V). An id below V
    is kept; None takes the tokenizer's next free id when it is below V (a row the tokenizer
    never produces: no growth), else V (appended)."""
    if image_token_index is None:
        if tokenizer_size is not None and tokenizer_size > vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer_size} ids but the LM's vocabulary only {vocab_size}")
        if tokenizer_size is not None and tokenizer_size < vocab_size:
            return int(tokenizer_size), False
        return int(vocab_size), True
    if int(image_token_index) == vocab_size:
        return int(vocab_size), True
    if not 0 <= int(image_token_index) < vocab_size:
        raise ValueError(
            f"image_token_index={image_token_index}: an id of the LM's vocabulary [0, {vocab_size}) or None "
            f"(the tokenizer's next id, or {vocab_size} appended)"
        )
    return int(image_token_index), False


# ------------------------------------------------------------------ config


def vision_config(family) -> dict:
    """CLIPVisionConfig (dict) of the family's ViT."""
    im, c = family.image_variant, family.c
    return dict(
        model_type="clip_vision_model",
        hidden_size=int(im["width"]),
        intermediate_size=int(im["mlp_dim"]),
        num_hidden_layers=int(im["depth"]),
        num_attention_heads=int(im["heads"]),
        num_channels=3,
        image_size=int(family.image_size),
        patch_size=int(im["patch"]),
        hidden_act=ACT_TO_HF[c.act],
        layer_norm_eps=float(c.ln_eps),
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
    )


def text_spec(family, appended: bool):
    """The LM's spec as written: one row more when the image token is appended."""
    spec = family.spec
    return dataclasses.replace(spec, vocab_size=spec.vocab_size + 1) if appended else spec


def hf_llava_config(family, token_ids: dict, image_token_index: int, appended: bool) -> dict:
    """LlavaConfig (dict) of a llava family; image_token_index as `resolve_image_token` gives it."""
    from mmjax.export.hf_llm_workdir import layout_of

    check_exportable(family)
    spec = text_spec(family, appended)
    max_pos = max(2048, int(family.text_len or 0))
    text = hf_llm.hf_config_from_spec(spec, layout_of(family.spec), token_ids, max_pos)
    return dict(
        architectures=["LlavaForConditionalGeneration"],
        model_type="llava",
        vision_config=vision_config(family),
        text_config=text,
        image_token_index=int(image_token_index),
        image_seq_length=int(family.image_tokens),
        projector_hidden_act="gelu",
        vision_feature_layer=hf_feature_layer(family.c.feature_layer, int(family.image_variant["depth"])),
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(spec.tie_embeddings),
        dtype="float32",
        torch_dtype="float32",
        **{k: v for k, v in hf_llm._ids(token_ids).items() if k == "pad_token_id"},
    )


# ------------------------------------------------------------------ weights


def vision_state_dict(vision_params, family) -> dict:
    """The `vision/` params -> CLIPVisionModel's state dict (keys `vision_model.*`)."""
    p = clip_w.flat_params({"vision": vision_params})
    unused = sorted(k for k in p if not VISION_PARAM.match(k))
    if unused:
        raise ValueError(f"vision params with no place in transformers' CLIP vision tower: {unused[:8]}")
    im, v = family.image_variant, "vision_model."
    out = {
        v + "embeddings.class_embedding": clip_w._c(p["vision/cls"].reshape(-1)),
        v + "embeddings.patch_embedding.weight": clip_w._c(p["vision/patch_embed/conv/kernel"].transpose(3, 2, 0, 1)),
        v + "embeddings.position_embedding.weight": clip_w._c(p["vision/pos_embedding"][0]),
    }
    for mm_ln, hf_ln in (("vision/ln_pre", "pre_layrnorm"), ("vision/encoder/ln_final", "post_layernorm")):
        out[v + hf_ln + ".weight"] = clip_w._c(p[mm_ln + "/scale"])
        out[v + hf_ln + ".bias"] = clip_w._c(p[mm_ln + "/bias"])
    clip_w.blocks_to_hf(p, "vision", "vision_model", im, out)
    # The vision half of the CLIPModel shapes (a text tower of depth 0 stands in for the other half).
    spec = dict(image=im, text=dict(width=1, depth=0, mlp_dim=1), embed_dim=1, vocab_size=1, text_len=1)
    want = {k: s for k, s in clip_w._hf_shapes(dict(spec, image_size=family.image_size)).items() if k.startswith(v)}
    for k, shape in want.items():
        if k not in out or tuple(out[k].shape) != tuple(shape):
            got = None if k not in out else tuple(out[k].shape)
            raise ValueError(f"vision weight {k}: {got} from the params, {tuple(shape)} from the model config")
    return out


def projector_state_dict(proj_params) -> dict:
    """`projector/` (fc1, GELU, fc2) -> {linear_1, linear_2}.{weight [out, in], bias}."""
    p = clip_w.flat_params(proj_params)
    want = {"fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias"}
    if set(p) != want:
        raise ValueError(f"projector params {sorted(p)}: transformers' LLaVA projector needs {sorted(want)}")
    return {
        f"linear_{i}.{w}": clip_w._c(p[f"fc{i}/kernel"].T if w == "weight" else p[f"fc{i}/bias"])
        for i in (1, 2)
        for w in ("weight", "bias")
    }


def _lm_params(family, lm_params):
    """The LM's params, LoRA adapters (if any) merged into the kernels."""
    if any(k.endswith("_lora/a") for k in clip_w.flat_params(lm_params)):
        from mmjax.models.lora import merge_lora

        lm_params = merge_lora(lm_params, rank=int(family.c.lora_rank), alpha=float(family.c.lora_alpha))
    return lm_params


def llm_state_dict(family, lm_params, appended: bool) -> dict:
    """`lm/` -> the causal LM's state dict (`model.*`, `lm_head.weight`), the image token's
    row (the mean row) appended to the embedding and lm_head when `appended`."""
    from mmjax.export.hf_llm_workdir import layout_of

    spec = family.spec
    sd = hf_llm.fill_biases(lm_state_dict(_lm_params(family, lm_params), spec), spec, layout_of(spec))
    if appended:
        for k in (hf_llm.EMBED, "lm_head.weight"):
            if k in sd:
                sd[k] = np.concatenate([sd[k], sd[k].mean(axis=0, keepdims=True)], axis=0)
    return sd


def state_dict_from_params(family, params, image_token_index=None) -> dict:
    """llava params (`vision`, `projector`, `lm`) -> LlavaForConditionalGeneration's state
    dict in the llava-hf layout ({name: float32 numpy})."""
    check_exportable(family)
    extra = sorted(set(params) - {"vision", "projector", "lm"})
    if extra:
        raise ValueError(f"params {extra} have no place in transformers' LLaVA (vision, projector, lm only)")
    _, appended = resolve_image_token(image_token_index, family.spec.vocab_size)
    sd = {VISION + k: a for k, a in vision_state_dict(params["vision"], family).items()}
    sd.update({PROJ + k: a for k, a in projector_state_dict(params["projector"]).items()})
    sd.update({LM + k: a for k, a in llm_state_dict(family, params["lm"], appended).items()})
    return sd


# ------------------------------------------------------------------ writing


def _tokenizer_json(out_dir: str):
    """The `tokenizers` Tokenizer of out_dir/tokenizer.json, None without one."""
    path = os.path.join(out_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _image_token_of(out_dir: str, image_token_index):
    """-> (image_token_index, tokenizer_size, add): a given id as is; None: the copied
    tokenizer.json's own '<image>' if it has one, else (None, its next free id, True: add
    '<image>' to it); without a tokenizer.json (None, None, False)."""
    tok = _tokenizer_json(out_dir) if image_token_index is None else None
    if tok is None:
        return image_token_index, None, False
    own = tok.token_to_id(IMAGE_TOKEN)
    if own is not None:
        return int(own), None, False
    return None, max(tok.get_vocab(with_added_tokens=True).values()) + 1, True


def _add_image_token(out_dir: str, image_token_index: int) -> None:
    """Adds '<image>' (special) to out_dir/tokenizer.json; ValueError unless it gets the id
    image_token_index (the next free id)."""
    from tokenizers import AddedToken

    tok = _tokenizer_json(out_dir)
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    if tok.token_to_id(IMAGE_TOKEN) != image_token_index:
        raise ValueError(
            f"'<image>' got id {tok.token_to_id(IMAGE_TOKEN)} in tokenizer.json, not {image_token_index}: "
            "pass image_token_index explicitly"
        )
    tok.save(os.path.join(out_dir, "tokenizer.json"))


def _write_json(obj, out_dir: str, name: str) -> None:
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def save_hf_llava(
    family,
    params,
    out_dir: str,
    token_ids: dict,
    *,
    image_token_index: int | None,
    tokenizer_path: str | None = None,
    image_mean=None,
    image_std=None,
) -> str:
    """Writes a transformers LlavaForConditionalGeneration directory (see the module docstring)
    from a llava family (`zoo.build(model_config)`) and its params (numpy or jax; the LM
    unrolled or scanned). token_ids: {'bos', 'eos', 'pad': id or None} (`TokenIds.as_dict()`).
    image_token_index: the tokenizer's '<image>' id, or None (`resolve_image_token`: a copied
    tokenizer.json's own '<image>', else its next free id below V, else V appended).
    image_mean / image_std: the image normalisation (default mmjax's). Returns out_dir."""
    check_exportable(family)
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer_path:
        hf_llm.copy_tokenizer(tokenizer_path, out_dir)
    given, tokenizer_size, add = _image_token_of(out_dir, image_token_index)
    index, appended = resolve_image_token(given, family.spec.vocab_size, tokenizer_size)
    sd = state_dict_from_params(family, params, index)
    hf_llm.write_safetensors(sd, out_dir)
    _write_json(hf_llava_config(family, token_ids, index, appended), out_dir, hf_llm.CONFIG_FILE)
    _write_json({k: v for k, v in hf_llm._ids(token_ids).items() if v is not None}, out_dir, hf_llm.GENERATION_FILE)
    _write_json(image_processor_config(family.image_size, image_mean, image_std), out_dir, PREPROCESSOR_FILE)
    processor = dict(
        processor_class="LlavaProcessor",
        patch_size=int(family.image_variant["patch"]),
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    _write_json(processor, out_dir, PROCESSOR_FILE)
    if add:
        _add_image_token(out_dir, index)
    return out_dir


def _tokenizer_image_id(opened) -> int | None:
    """The workdir tokenizer's '<image>' id, None without one (or without a tokenizer)."""
    if not opened.tokenizer_path:
        return None
    return opened.tokenizer.token_id(IMAGE_TOKEN)


def export_workdir(workdir: str, out_dir: str, weights: str = "student", step: int | None = None) -> dict:
    """A `llava` workdir's params -> a transformers LlavaForConditionalGeneration directory
    (`save_hf_llava`; the image token: the tokenizer's '<image>', else one id appended)."""
    from mmjax import workdir as workdir_lib
    from mmjax.models import zoo

    config = workdir_lib.load_config_json(workdir)
    if config.model.get("family") not in ("llava", "cogvlm"):
        raise ValueError(
            f"--format hf-llava exports a 'llava' workdir; {workdir} holds a {config.model.get('family')!r} model "
            "(an 'lm' workdir: --format hf-llm)"
        )
    check_exportable(zoo.build(config.model))  # before reading the checkpoint
    opened = workdir_lib.open_workdir(workdir, weights=weights, step=step, config=config)
    family = opened.family
    image_id = _tokenizer_image_id(opened)
    ids = family.c.tokens.as_dict()
    tok = opened.tokenizer_path
    save_hf_llava(family, opened.params, out_dir, ids, image_token_index=image_id, tokenizer_path=tok)
    with open(os.path.join(out_dir, hf_llm.CONFIG_FILE)) as f:
        written = json.load(f)
    return {
        "format": "hf-llava",
        "out": out_dir,
        "weights": weights,
        "step": opened.step,
        "image_token_index": written["image_token_index"],
        "vocab_size": written["text_config"]["vocab_size"],
    }
