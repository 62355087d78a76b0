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
sin-cos positions or a sigmoid-loss bias) raise ValueError naming the mismatch.

Only numpy and safetensors are needed to read and write (torch for pytorch_model.bin);
the parity helpers import torch and transformers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mmjax.models.zoo.clip import CLIP

log = logging.getLogger(__name__)

# transformers hidden_act -> mmjax model.act (gelu_new / gelu_pytorch_tanh are the
# tanh approximation, flax's nn.gelu).
HF_TO_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh"}
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults: save_pretrained leaves out
# values equal to them.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=1,
                     bos_token_id=49406, eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)
LEGACY_EOS = 2  # transformers pools at input_ids.argmax(-1) when eos_token_id == 2
LEGACY_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # OpenAI's early configs
MMJAX_IDS = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)   # mmjax.data.tokenizer
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


# ------------------------------------------------------------------ reading a directory

def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _load_safetensors(path):
  from safetensors import safe_open

  out = {}
  with safe_open(path, framework="numpy") as f:
    keys = list(f.keys())
  try:
    with safe_open(path, framework="numpy") as f:
      for k in keys:
        out[k] = f.get_tensor(k)
  except TypeError:  # bfloat16 has no numpy dtype: read through jax
    with safe_open(path, framework="flax") as f:
      for k in keys:
        out[k] = np.asarray(f.get_tensor(k), np.float32)
  return out


def _load_torch(path):
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path} is a PyTorch pickle: reading it needs torch "
                      "(or save the model with safe_serialization=True)") from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().float().numpy() for k, v in sd.items()}


def read_state_dict(src_dir: str) -> dict:
  """{name: float32 numpy} from model.safetensors, pytorch_model.bin or their shards."""
  loaders = [("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_torch)]
  for name, load in loaders:
    path = os.path.join(src_dir, name)
    if os.path.isfile(path):
      files = [path]
    elif os.path.isfile(path + ".index.json"):
      shards = sorted(set(_read_json(path + ".index.json")["weight_map"].values()))
      files = [os.path.join(src_dir, s) for s in shards]
    else:
      continue
    sd = {}
    for f in files:
      sd.update(load(f))
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}
  raise FileNotFoundError(f"{src_dir}: no model.safetensors or pytorch_model.bin (or their "
                          ".index.json shards): is it a transformers model directory?")


def _square(value, what):
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"vision_config.{what}={list(value)} is not square; mmjax's ViT "
                       f"takes square {what.replace('_', ' ')}s")
    value = value[0]
  return int(value)


def spec_from_hf_config(hf: dict) -> dict:
  """A transformers CLIPConfig dict -> the shapes and settings of the mmjax model.

  Returns {image: {width, depth, heads, mlp_dim, patch}, text: {...}, image_size,
  text_len, vocab_size, embed_dim, act, ln_eps, text_pool, eos_id, token_ids}.
  """
  model_type = hf.get("model_type")
  if model_type != "clip":
    raise ValueError(f"config.json has model_type {model_type!r}: hf-clip converts transformers "
                     "CLIPModel checkpoints (model_type 'clip') only"
                     + (" ; SigLIP has a sigmoid-loss bias and no [CLS] token" if "siglip" in str(model_type) else ""))
  # Old configs also carry text_config_dict / vision_config_dict, which win.
  tc = {**TEXT_DEFAULTS, **(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
  vc = {**VISION_DEFAULTS, **(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
  if tc["hidden_act"] != vc["hidden_act"]:
    raise ValueError(f"hidden_act differs between the towers (text {tc['hidden_act']!r}, vision "
                     f"{vc['hidden_act']!r}); mmjax's model.act applies to both")
  if tc["hidden_act"] not in HF_TO_ACT:
    raise ValueError(f"hidden_act {tc['hidden_act']!r} has no mmjax counterpart; supported: "
                     f"{', '.join(HF_TO_ACT)}")
  if float(tc["layer_norm_eps"]) != float(vc["layer_norm_eps"]):
    raise ValueError(f"layer_norm_eps differs between the towers (text {tc['layer_norm_eps']}, "
                     f"vision {vc['layer_norm_eps']}); mmjax's model.ln_eps applies to both")
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
      image=dict(width=int(vc["hidden_size"]), depth=int(vc["num_hidden_layers"]),
                 heads=int(vc["num_attention_heads"]), mlp_dim=int(vc["intermediate_size"]), patch=patch),
      text=dict(width=int(tc["hidden_size"]), depth=int(tc["num_hidden_layers"]),
                heads=int(tc["num_attention_heads"]), mlp_dim=int(tc["intermediate_size"]), patch=None),
      image_size=image_size, text_len=int(tc["max_position_embeddings"]),
      vocab_size=int(tc["vocab_size"]),
      embed_dim=int(hf.get("projection_dim", CLIP_DEFAULTS["projection_dim"])),
      act=HF_TO_ACT[tc["hidden_act"]], ln_eps=float(tc["layer_norm_eps"]),
      text_pool="argmax" if eos == LEGACY_EOS else "eos", eos_id=None if eos == LEGACY_EOS else eos,
      token_ids=(tc.get("bos_token_id"), eos, tc.get("pad_token_id")))
  for tower in ("image", "text"):
    t = spec[tower]
    if t["width"] % t["heads"]:
      raise ValueError(f"{tower} tower: hidden_size {t['width']} is not divisible by "
                       f"num_attention_heads {t['heads']}")
  return spec


# ------------------------------------------------------------------ the weight mapping

def _hf_shapes(spec) -> dict:
  """{transformers state-dict name: shape} of the CLIPModel `spec` describes."""
  im, tx, e = spec["image"], spec["text"], spec["embed_dim"]
  g = spec["image_size"] // im["patch"]
  shapes = {"logit_scale": (), "visual_projection.weight": (e, im["width"]),
            "text_projection.weight": (e, tx["width"]),
            "vision_model.embeddings.class_embedding": (im["width"],),
            "vision_model.embeddings.patch_embedding.weight": (im["width"], 3, im["patch"], im["patch"]),
            "vision_model.embeddings.position_embedding.weight": (g * g + 1, im["width"]),
            "text_model.embeddings.token_embedding.weight": (spec["vocab_size"], tx["width"]),
            "text_model.embeddings.position_embedding.weight": (spec["text_len"], tx["width"])}
  for ln, d in (("vision_model.pre_layrnorm", im["width"]), ("vision_model.post_layernorm", im["width"]),
                ("text_model.final_layer_norm", tx["width"])):
    shapes[ln + ".weight"] = shapes[ln + ".bias"] = (d,)
  for tower, t in (("vision_model", im), ("text_model", tx)):
    d, f = t["width"], t["mlp_dim"]
    for i in range(t["depth"]):
      p = f"{tower}.encoder.layers.{i}."
      for n in ("q", "k", "v", "out"):
        shapes[p + f"self_attn.{n}_proj.weight"] = (d, d)
        shapes[p + f"self_attn.{n}_proj.bias"] = (d,)
      for n in ("layer_norm1", "layer_norm2"):
        shapes[p + n + ".weight"] = shapes[p + n + ".bias"] = (d,)
      shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (f, d), (f,)
      shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (d, f), (d,)
  return shapes


def check_state_dict(sd: dict, spec: dict) -> None:
  """Raises ValueError naming missing, unexpected or misshapen weights."""
  vp, tp = sd.get("visual_projection.weight"), sd.get("text_projection.weight")
  if vp is not None and tp is not None and vp.shape[0] != tp.shape[0]:
    raise ValueError(f"projection dims differ: visual_projection.weight {tuple(vp.shape)} projects to "
                     f"{vp.shape[0]}, text_projection.weight {tuple(tp.shape)} to {tp.shape[0]}; "
                     "mmjax's CLIP has one embed_dim")
  want = _hf_shapes(spec)
  have = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # old non-persistent buffers
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  if missing:
    raise ValueError(f"weights missing for a CLIPModel of this config: {missing[:8]}"
                     + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
  if extra:
    raise ValueError(f"weights with no place in mmjax's CLIP: {extra[:8]}"
                     + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
                     + " (a head or tower this converter does not know)")
  for k, shape in want.items():
    if tuple(have[k].shape) != tuple(shape):
      raise ValueError(f"weight {k} has shape {tuple(have[k].shape)} but config.json implies {tuple(shape)}")


def _set(tree, path, value):
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _c(x):
  return np.ascontiguousarray(x, np.float32)


def _blocks_to_mmjax(sd, hf_tower, mm_tower, t, out):
  d, h = t["width"], t["heads"]
  dh = d // h
  for i in range(t["depth"]):
    p, m = f"{hf_tower}.encoder.layers.{i}.", f"{mm_tower}/encoder/block{i:02d}/"
    a = p + "self_attn."
    _set(out, m + "attn/qkv/kernel",
         _c(np.stack([sd[a + f"{n}_proj.weight"].T.reshape(d, h, dh) for n in "qkv"], axis=1)))
    _set(out, m + "attn/qkv/bias", _c(np.stack([sd[a + f"{n}_proj.bias"].reshape(h, dh) for n in "qkv"])))
    _set(out, m + "attn/out/kernel", _c(sd[a + "out_proj.weight"].T.reshape(h, dh, d)))
    _set(out, m + "attn/out/bias", _c(sd[a + "out_proj.bias"]))
    for hf_ln, mm_ln in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
      _set(out, m + mm_ln + "/scale", _c(sd[p + hf_ln + ".weight"]))
      _set(out, m + mm_ln + "/bias", _c(sd[p + hf_ln + ".bias"]))
    for fc in ("fc1", "fc2"):
      _set(out, m + f"mlp/{fc}/kernel", _c(sd[p + f"mlp.{fc}.weight"].T))
      _set(out, m + f"mlp/{fc}/bias", _c(sd[p + f"mlp.{fc}.bias"]))


def params_from_state_dict(sd: dict, spec: dict) -> dict:
  """transformers CLIPModel state dict (numpy) -> mmjax CLIP params (nested dict)."""
  check_state_dict(sd, spec)
  out: dict = {}
  v, t = "vision_model.", "text_model."
  d = spec["image"]["width"]
  _set(out, "t", _c(sd["logit_scale"]).reshape(()))
  _set(out, "image_proj/kernel", _c(sd["visual_projection.weight"].T))
  _set(out, "text_proj/kernel", _c(sd["text_projection.weight"].T))
  _set(out, "image_tower/cls", _c(sd[v + "embeddings.class_embedding"].reshape(1, 1, d)))
  _set(out, "image_tower/patch_embed/conv/kernel",
       _c(sd[v + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)))
  _set(out, "image_tower/pos_embedding", _c(sd[v + "embeddings.position_embedding.weight"][None]))
  for hf_ln, mm_ln in ((v + "pre_layrnorm", "image_tower/ln_pre"),
                       (v + "post_layernorm", "image_tower/encoder/ln_final"),
                       (t + "final_layer_norm", "text_tower/encoder/ln_final")):
    _set(out, mm_ln + "/scale", _c(sd[hf_ln + ".weight"]))
    _set(out, mm_ln + "/bias", _c(sd[hf_ln + ".bias"]))
  _set(out, "text_tower/embed/token/embedding", _c(sd[t + "embeddings.token_embedding.weight"]))
  _set(out, "text_tower/embed/pos_embedding", _c(sd[t + "embeddings.position_embedding.weight"]))
  _blocks_to_mmjax(sd, "vision_model", "image_tower", spec["image"], out)
  _blocks_to_mmjax(sd, "text_model", "text_tower", spec["text"], out)
  return out


def _flat(params) -> dict:
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if k == "blocks" and prefix.endswith("encoder/") and isinstance(v, Mapping):
        # Scanned layers (model.scan_layers): leaves stacked on a leading axis.
        depth = int(np.asarray(jax.tree_util.tree_leaves(v)[0]).shape[0])
        for i in range(depth):
          walk(jax.tree_util.tree_map(lambda x: np.asarray(x)[i], v), prefix + f"block{i:02d}/")
      elif isinstance(v, Mapping):
        walk(v, prefix + str(k) + "/")
      else:
        out[prefix + str(k)] = np.asarray(v)
  walk(params, "")
  return out


def spec_from_params(params) -> dict:
  """The CLIPModel shapes of mmjax CLIP params; ValueError naming what does not fit."""
  p = _flat(params)
  if "b" in p:
    raise ValueError("params hold a logit bias `b` (sigmoid / SigLIP loss): transformers' CLIPModel "
                     "has no bias; export a softmax-loss CLIP")
  if "image_tower/cls" not in p:
    raise ValueError("the image tower has no [CLS] token (model.pool='gap'): transformers' CLIP "
                     "pools the [CLS] token")
  if "image_tower/pos_embedding" not in p:
    raise ValueError("the image tower has no learned position table (model.posemb='sincos2d'): "
                     "transformers' CLIP has a learned one")
  if "image_tower/ln_pre/scale" not in p:
    raise ValueError("the image tower has no ln_pre (pre_norm): transformers' CLIP has pre_layrnorm")

  def tower(name):
    blocks = sorted({m.group(1) for k in p for m in [re.match(rf"{name}/encoder/block(\d+)/", k)] if m})
    if not blocks:
      raise ValueError(f"{name} has no transformer blocks")
    qkv = p[f"{name}/encoder/block00/attn/qkv/kernel"]
    if qkv.ndim != 4 or qkv.shape[1] != 3:
      raise ValueError(f"{name} attention is not a fused qkv [D, 3, H, Dh] (got {qkv.shape})")
    return dict(width=int(qkv.shape[0]), depth=len(blocks), heads=int(qkv.shape[2]),
                mlp_dim=int(p[f"{name}/encoder/block00/mlp/fc1/kernel"].shape[1]))

  image, text = tower("image_tower"), tower("text_tower")
  kernel = p["image_tower/patch_embed/conv/kernel"]
  if kernel.shape[0] != kernel.shape[1]:
    raise ValueError(f"patch conv kernel {kernel.shape} is not square: transformers' CLIP takes square patches")
  if kernel.shape[2] != 3:
    raise ValueError(f"patch conv takes {kernel.shape[2]} channels; transformers' CLIP export expects 3")
  image["patch"] = int(kernel.shape[0])
  text["patch"] = None
  t = p["image_tower/pos_embedding"].shape[1]
  g = math.isqrt(t - 1)
  if g * g != t - 1:
    raise ValueError(f"image position table has {t} rows: not 1 + a square patch grid")
  e_img, e_txt = p["image_proj/kernel"].shape[1], p["text_proj/kernel"].shape[1]
  if e_img != e_txt:
    raise ValueError(f"projection dims differ: image_proj {p['image_proj/kernel'].shape}, text_proj "
                     f"{p['text_proj/kernel'].shape}; transformers' CLIPModel has one projection_dim")
  emb = p["text_tower/embed/token/embedding"]
  return dict(image=image, text=text, image_size=g * image["patch"],
              text_len=int(p["text_tower/embed/pos_embedding"].shape[0]), vocab_size=int(emb.shape[0]),
              embed_dim=int(e_img))


def _blocks_to_hf(p, mm_tower, hf_tower, t, out):
  d = t["width"]
  for i in range(t["depth"]):
    m, h = f"{mm_tower}/encoder/block{i:02d}/", f"{hf_tower}.encoder.layers.{i}."
    qkv, qkv_b = p[m + "attn/qkv/kernel"], p[m + "attn/qkv/bias"]
    for j, n in enumerate("qkv"):
      out[h + f"self_attn.{n}_proj.weight"] = _c(qkv[:, j].reshape(d, d).T)
      out[h + f"self_attn.{n}_proj.bias"] = _c(qkv_b[j].reshape(d))
    out[h + "self_attn.out_proj.weight"] = _c(p[m + "attn/out/kernel"].reshape(d, d).T)
    out[h + "self_attn.out_proj.bias"] = _c(p[m + "attn/out/bias"])
    for mm_ln, hf_ln in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
      out[h + hf_ln + ".weight"] = _c(p[m + mm_ln + "/scale"])
      out[h + hf_ln + ".bias"] = _c(p[m + mm_ln + "/bias"])
    for fc in ("fc1", "fc2"):
      out[h + f"mlp.{fc}.weight"] = _c(p[m + f"mlp/{fc}/kernel"].T)
      out[h + f"mlp.{fc}.bias"] = _c(p[m + f"mlp/{fc}/bias"])


def state_dict_from_params(params, spec=None) -> dict:
  """mmjax CLIP params -> transformers CLIPModel state dict (float32 numpy)."""
  spec = spec or spec_from_params(params)
  p = _flat(params)
  out = {"logit_scale": _c(p["t"]).reshape(()),
         "visual_projection.weight": _c(p["image_proj/kernel"].T),
         "text_projection.weight": _c(p["text_proj/kernel"].T),
         "vision_model.embeddings.class_embedding": _c(p["image_tower/cls"].reshape(-1)),
         "vision_model.embeddings.patch_embedding.weight":
             _c(p["image_tower/patch_embed/conv/kernel"].transpose(3, 2, 0, 1)),
         "vision_model.embeddings.position_embedding.weight": _c(p["image_tower/pos_embedding"][0]),
         "text_model.embeddings.token_embedding.weight": _c(p["text_tower/embed/token/embedding"]),
         "text_model.embeddings.position_embedding.weight": _c(p["text_tower/embed/pos_embedding"])}
  for mm_ln, hf_ln in (("image_tower/ln_pre", "vision_model.pre_layrnorm"),
                       ("image_tower/encoder/ln_final", "vision_model.post_layernorm"),
                       ("text_tower/encoder/ln_final", "text_model.final_layer_norm")):
    out[hf_ln + ".weight"] = _c(p[mm_ln + "/scale"])
    out[hf_ln + ".bias"] = _c(p[mm_ln + "/bias"])
  _blocks_to_hf(p, "image_tower", "vision_model", spec["image"], out)
  _blocks_to_hf(p, "text_tower", "text_model", spec["text"], out)
  used = {"t", "image_proj/kernel", "text_proj/kernel", "image_tower/cls", "image_tower/pos_embedding",
          "image_tower/patch_embed/conv/kernel", "text_tower/embed/token/embedding",
          "text_tower/embed/pos_embedding"}
  unused = [k for k in p if k not in used and not re.search(
      r"(encoder/block\d+/(attn/(qkv|out)|ln[12]|mlp/fc[12])/(kernel|bias|scale)"
      r"|ln_pre/(scale|bias)|ln_final/(scale|bias))$", k)]
  if unused:
    raise ValueError(f"params with no place in transformers' CLIPModel: {unused[:8]}")
  check_state_dict(out, spec)
  return out


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
  return dict(family="clip", image=image, text=text, image_overrides=image_overrides,
              text_overrides=text_overrides, embed_dim=spec["embed_dim"], loss="softmax",
              pool="cls", posemb="learn", act=spec["act"], ln_eps=spec["ln_eps"],
              text_pool=spec["text_pool"], eos_id=spec["eos_id"], image_size=spec["image_size"],
              text_len=spec["text_len"], vocab_size=spec["vocab_size"])


def build_model(spec: dict) -> HFCLIP:
  """The HFCLIP module of a spec, built through ClipFamily (as a workdir's model is)."""
  import ml_collections
  from mmjax.models.zoo.clip import ClipFamily

  clip = ClipFamily(ml_collections.ConfigDict(model_config(spec))).model
  fields = {f.name: getattr(clip, f.name) for f in dataclasses.fields(CLIP)
            if f.name not in ("parent", "name")}
  return HFCLIP(**fields, hf_token_ids=tuple(spec.get("token_ids") or ()) or None)


def read_clip(src_dir: str):
  """(spec, params) of a transformers CLIPModel directory; see spec_from_hf_config."""
  cfg_path = os.path.join(src_dir, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: is {src_dir!r} a transformers model directory?")
  spec = spec_from_hf_config(_read_json(cfg_path))
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
    raise ValueError(f"model.loss={model.loss!r} (SigLIP-style): transformers' CLIPModel has "
                     "softmax logits only")
  if model.pool != "cls":
    raise ValueError(f"model.pool={model.pool!r}: transformers' CLIP pools the [CLS] token ('cls')")
  if model.posemb != "learn":
    raise ValueError(f"model.posemb={model.posemb!r}: transformers' CLIP has learned positions ('learn')")
  if model.act not in ACT_TO_HF:
    raise ValueError(f"model.act={model.act!r} has no transformers counterpart")
  if model.text_pool == "eos" and int(model.eos_id) == LEGACY_EOS:
    raise ValueError("model.eos_id=2 with text_pool='eos': transformers reads eos_token_id 2 as the "
                     "legacy argmax rule; use text_pool='argmax' or another eos id")


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
    log.info("text_pool='last' exported as transformers' first-eos pooling at id %d: the same "
             "token for mmjax-tokenized text (bos ... eos pad ...)", ids["eos_token_id"])
  ids = {k: (None if v is None else int(v)) for k, v in ids.items()}
  act, eps, e = ACT_TO_HF[model.act], float(model.ln_eps), spec["embed_dim"]
  im, tx = spec["image"], spec["text"]
  common = dict(hidden_act=act, layer_norm_eps=eps, projection_dim=e, attention_dropout=0.0,
                initializer_range=0.02, initializer_factor=1.0)
  text_config = dict(model_type="clip_text_model", vocab_size=spec["vocab_size"], hidden_size=tx["width"],
                     intermediate_size=tx["mlp_dim"], num_hidden_layers=tx["depth"],
                     num_attention_heads=tx["heads"], max_position_embeddings=spec["text_len"],
                     **ids, **common)
  vision_config = dict(model_type="clip_vision_model", hidden_size=im["width"],
                       intermediate_size=im["mlp_dim"], num_hidden_layers=im["depth"],
                       num_attention_heads=im["heads"], num_channels=3, image_size=spec["image_size"],
                       patch_size=im["patch"], **common)
  return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=e,
              logit_scale_init_value=CLIP_DEFAULTS["logit_scale_init_value"], initializer_factor=1.0,
              dtype="float32", text_config=text_config, vision_config=vision_config)


def image_processor_config(image_size: int, mean=None, std=None) -> dict:
  """transformers `CLIPImageProcessor` settings that prepare an image as mmjax's eval
  pipeline does (mmjax.data.images.load_images): RGB, resized to image_size x
  image_size (bilinear, antialiased when shrinking, as PIL does; no center crop),
  x / 255, then (x - mean) / std. mean/std default to mmjax's (mmjax.data.pipeline)."""
  if mean is None or std is None:
    from mmjax.data.pipeline import MEAN, STD  # constants only: no TensorFlow import

    mean, std = MEAN if mean is None else mean, STD if std is None else std
  s = int(image_size)
  return dict(image_processor_type="CLIPImageProcessor", do_convert_rgb=True, do_resize=True,
              size={"height": s, "width": s}, resample=2,  # PIL.Image.BILINEAR
              do_center_crop=False, crop_size={"height": s, "width": s},
              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
              image_mean=[float(v) for v in mean], image_std=[float(v) for v in std])


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
