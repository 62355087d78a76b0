"""The weight mapping between a transformers CLIP state dict and mmjax CLIP params
(both directions), with the spec (tower sizes, pooling, image size) each is read
against. See `mmjax.export.hf` for the conventions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import numpy as np


def _hf_shapes(spec) -> dict:
    """{transformers state-dict name: shape} of the CLIPModel `spec` describes."""
    im, tx, e = spec["image"], spec["text"], spec["embed_dim"]
    g = spec["image_size"] // im["patch"]
    shapes = {
        "logit_scale": (),
        "visual_projection.weight": (e, im["width"]),
        "text_projection.weight": (e, tx["width"]),
        "vision_model.embeddings.class_embedding": (im["width"],),
        "vision_model.embeddings.patch_embedding.weight": (im["width"], 3, im["patch"], im["patch"]),
        "vision_model.embeddings.position_embedding.weight": (g * g + 1, im["width"]),
        "text_model.embeddings.token_embedding.weight": (spec["vocab_size"], tx["width"]),
        "text_model.embeddings.position_embedding.weight": (spec["text_len"], tx["width"]),
    }
    for ln, d in (
        ("vision_model.pre_layrnorm", im["width"]),
        ("vision_model.post_layernorm", im["width"]),
        ("text_model.final_layer_norm", tx["width"]),
    ):
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
        raise ValueError(
            f"projection dims differ: visual_projection.weight {tuple(vp.shape)} projects to "
            f"{vp.shape[0]}, text_projection.weight {tuple(tp.shape)} to {tp.shape[0]}; "
            "mmjax's CLIP has one embed_dim"
        )
    want = _hf_shapes(spec)
    have = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # old non-persistent buffers
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        raise ValueError(
            f"weights missing for a CLIPModel of this config: {missing[:8]}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        )
    if extra:
        raise ValueError(
            f"weights with no place in mmjax's CLIP: {extra[:8]}"
            + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
            + " (a head or tower this converter does not know)"
        )
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
        _set(
            out,
            m + "attn/qkv/kernel",
            _c(np.stack([sd[a + f"{n}_proj.weight"].T.reshape(d, h, dh) for n in "qkv"], axis=1)),
        )
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
    _set(
        out,
        "image_tower/patch_embed/conv/kernel",
        _c(sd[v + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)),
    )
    _set(out, "image_tower/pos_embedding", _c(sd[v + "embeddings.position_embedding.weight"][None]))
    for hf_ln, mm_ln in (
        (v + "pre_layrnorm", "image_tower/ln_pre"),
        (v + "post_layernorm", "image_tower/encoder/ln_final"),
        (t + "final_layer_norm", "text_tower/encoder/ln_final"),
    ):
        _set(out, mm_ln + "/scale", _c(sd[hf_ln + ".weight"]))
        _set(out, mm_ln + "/bias", _c(sd[hf_ln + ".bias"]))
    _set(out, "text_tower/embed/token/embedding", _c(sd[t + "embeddings.token_embedding.weight"]))
    _set(out, "text_tower/embed/pos_embedding", _c(sd[t + "embeddings.position_embedding.weight"]))
    _blocks_to_mmjax(sd, "vision_model", "image_tower", spec["image"], out)
    _blocks_to_mmjax(sd, "text_model", "text_tower", spec["text"], out)
    return out


def flat_params(params) -> dict:
    """{'a/b/c': numpy} of a params tree; a scanned encoder's `blocks` (leaves stacked on
    a leading axis) is unstacked into `block00`, `block01`, ... (the unrolled names)."""
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
    p = flat_params(params)
    if "b" in p:
        raise ValueError(
            "params hold a logit bias `b` (sigmoid / SigLIP loss): transformers' CLIPModel "
            "has no bias; export a softmax-loss CLIP"
        )
    if "image_tower/cls" not in p:
        raise ValueError(
            "the image tower has no [CLS] token (model.pool='gap'): transformers' CLIP pools the [CLS] token"
        )
    if "image_tower/pos_embedding" not in p:
        raise ValueError(
            "the image tower has no learned position table (model.posemb='sincos2d'): "
            "transformers' CLIP has a learned one"
        )
    if "image_tower/ln_pre/scale" not in p:
        raise ValueError("the image tower has no ln_pre (pre_norm): transformers' CLIP has pre_layrnorm")

    def tower(name):
        blocks = sorted({m.group(1) for k in p for m in [re.match(rf"{name}/encoder/block(\d+)/", k)] if m})
        if not blocks:
            raise ValueError(f"{name} has no transformer blocks")
        qkv = p[f"{name}/encoder/block00/attn/qkv/kernel"]
        if qkv.ndim != 4 or qkv.shape[1] != 3:
            raise ValueError(f"{name} attention is not a fused qkv [D, 3, H, Dh] (got {qkv.shape})")
        return dict(
            width=int(qkv.shape[0]),
            depth=len(blocks),
            heads=int(qkv.shape[2]),
            mlp_dim=int(p[f"{name}/encoder/block00/mlp/fc1/kernel"].shape[1]),
        )

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
        raise ValueError(
            f"projection dims differ: image_proj {p['image_proj/kernel'].shape}, text_proj "
            f"{p['text_proj/kernel'].shape}; transformers' CLIPModel has one projection_dim"
        )
    emb = p["text_tower/embed/token/embedding"]
    return dict(
        image=image,
        text=text,
        image_size=g * image["patch"],
        text_len=int(p["text_tower/embed/pos_embedding"].shape[0]),
        vocab_size=int(emb.shape[0]),
        embed_dim=int(e_img),
    )


def blocks_to_hf(p, mm_tower, hf_tower, t, out):
    """The transformer blocks of `mm_tower` in flat params `p` (`flat_params`) written
    into `out` under HF CLIP's `hf_tower.encoder.layers.i.*` names (torch layouts);
    `t`: the tower's variant dict (width, depth)."""
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
    p = flat_params(params)
    out = {
        "logit_scale": _c(p["t"]).reshape(()),
        "visual_projection.weight": _c(p["image_proj/kernel"].T),
        "text_projection.weight": _c(p["text_proj/kernel"].T),
        "vision_model.embeddings.class_embedding": _c(p["image_tower/cls"].reshape(-1)),
        "vision_model.embeddings.patch_embedding.weight": _c(
            p["image_tower/patch_embed/conv/kernel"].transpose(3, 2, 0, 1)
        ),
        "vision_model.embeddings.position_embedding.weight": _c(p["image_tower/pos_embedding"][0]),
        "text_model.embeddings.token_embedding.weight": _c(p["text_tower/embed/token/embedding"]),
        "text_model.embeddings.position_embedding.weight": _c(p["text_tower/embed/pos_embedding"]),
    }
    for mm_ln, hf_ln in (
        ("image_tower/ln_pre", "vision_model.pre_layrnorm"),
        ("image_tower/encoder/ln_final", "vision_model.post_layernorm"),
        ("text_tower/encoder/ln_final", "text_model.final_layer_norm"),
    ):
        out[hf_ln + ".weight"] = _c(p[mm_ln + "/scale"])
        out[hf_ln + ".bias"] = _c(p[mm_ln + "/bias"])
    blocks_to_hf(p, "image_tower", "vision_model", spec["image"], out)
    blocks_to_hf(p, "text_tower", "text_model", spec["text"], out)
    used = {
        "t",
        "image_proj/kernel",
        "text_proj/kernel",
        "image_tower/cls",
        "image_tower/pos_embedding",
        "image_tower/patch_embed/conv/kernel",
        "text_tower/embed/token/embedding",
        "text_tower/embed/pos_embedding",
    }
    unused = [
        k
        for k in p
        if k not in used
        and not re.search(
            r"(encoder/block\d+/(attn/(qkv|out)|ln[12]|mlp/fc[12])/(kernel|bias|scale)"
            r"|ln_pre/(scale|bias)|ln_final/(scale|bias))$",
            k,
        )
    ]
    if unused:
        raise ValueError(f"params with no place in transformers' CLIPModel: {unused[:8]}")
    check_state_dict(out, spec)
    return out
