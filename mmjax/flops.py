"""Analytic FLOPs of a train step, per family, and a counter that checks them.

Only matrix multiplies are counted (2 FLOPs per multiply-add); normalisation,
activations, softmax and the optimizer are left out, as in the usual MFU accounting
(PaLM, appendix B). Counts are per sample; B is the global batch, because the
contrastive similarity matrices grow with it.

A transformer layer of width D and MLP width M over T tokens (self-attention):

    layer(T, D, M)          = 2T*4D^2          q, k, v and output projections
                            + 2*2*T^2*D        q k^T and attention-weighted values
                            + 2*2*T*D*M        the MLP
    cross(T, D, M, S, Ds)   = layer(T, D, M) + 2T*2D^2 + 2*2*S*Ds*D + 2*2*T*S*D
                              (ALBEF's fusion layer: cross-attention to S image
                              tokens of width Ds)

Towers: ViT = patch embedding 2*N*P^2*3*D + depth * layer(T) with T = N (+1 for a
[CLS] token), over a clip as `vision` says per temporal mode; a text tower = depth *
layer(L). Heads: projection 2*D*E, ITM 2*D*2,
MLM 2*L*(D^2 + D*V) (transform + tied decoder over every position), MDM 2*N*D*P^2*3.

Per family, forward FLOPs per sample:
- CLIP / SigLIP: image tower + text tower + both projections + the i2t and t2i
  logits against the global batch, 2 * 2*B*E.
- ALBEF: the student's image tower, text layers and projections; ITC against the
  batch and the queue (Q slots) for the student and the teacher, 4 * 2*(B+Q)*E;
  ITM: hard-negative similarities 2 * 2*B*E and the fusion layers on 3 pairs (one
  positive, two negatives) + the ITM head; MLM: text layers + fusion layers on the
  masked text + the MLM head. The teacher: image tower, text layers, projections,
  and the MLM pass again.
- VLMo / BEiT-3 (per task): itc: image-only and text-only passes + projections +
  logits (VLMo's VL-FFN ITC, `model.itc_vlffn`: the top depth - vl_from layers again
  on both passes + two projections + logits); itm: similarities + 3 joint passes over T+L tokens + head; mlm: a joint
  pass + MLM head; tmlm: a text pass + MLM head; mdm: an image pass + MDM head.
  (Experts do not change the count: every token goes through one FFN.)

Train step FLOPs = 3 x (the forward of what gets gradients) + 1 x (the teacher's
forward): the backward pass costs two forwards. Recomputation under remat is not
counted (model FLOPs, not hardware FLOPs). `count_dot_flops` counts the
`dot_general`s of a traced function; tests check the formulas against it.
"""

from __future__ import annotations

import jax
import numpy as np

from mmjax.models.variants import parse_variant
from mmjax.models.video import LOCAL_WHEN_UNSET


def layer(t, d, m):
    return 2 * t * 4 * d * d + 2 * 2 * t * t * d + 2 * 2 * t * d * m


def cross_layer(t, d, m, s, ds):
    return layer(t, d, m) + 2 * t * 2 * d * d + 2 * 2 * s * ds * d + 2 * 2 * t * s * d


def vit(v, image_size, cls=True):
    n = (image_size // v["patch"]) ** 2
    t = n + (1 if cls else 0)
    return 2 * n * v["patch"] ** 2 * 3 * v["width"] + v["depth"] * layer(t, v["width"], v["mlp_dim"])


def _tokens(v, image_size, cls=True):
    return (image_size // v["patch"]) ** 2 + (1 if cls else 0)


def _video(cfg):
    """(frames T, token frames T', temporal) of a video model config; T = 0 for images."""
    frames = int(cfg.get("num_frames", None) or 0)
    return frames, frames // int(cfg.get("tubelet", None) or 1), cfg.get("temporal", None) or "none"


def vision(cfg, v, cls=True):
    """The vision tower's forward per sample: `vit` for an image; for a clip of T
    frames (model.num_frames; T' = T / tubelet token frames, N patches, c = 1 with a
    [CLS]) the patch (or tubelet) embedding 2*T*N*P^2*3*D plus, per block:
      'none'     layer(T'N + c)                         one joint sequence
      'mean'     (the whole tower) T x vit(image)       frames encoded alone
      'divided'  spatial + 2T'N*4D^2 + 2*2*N*T'^2*D + 2T'N*D^2   temporal attention + projection
      'local'    spatial + 2T'N*D*R + 2T'N*R*K + 2T'N*R*D        down, depthwise conv (K), up; R = D/4
                 (model.local_temporal='mmjax_v1'; 'release': two such modules, R = D/2,
                 and the MLP over T'(N + c) tokens, each frame keeping its [CLS])
    with spatial = T'(2S*4D^2 + 2*2*S^2*D) + 2*2*(T'N + c)*D*M, S = N + c: attention
    per frame, the [CLS] copied into each, then the MLP over every token."""
    size = int(cfg.image_size)
    frames, t, temporal = _video(cfg)
    if not frames:
        return vit(v, size, cls=cls)
    if temporal == "mean":
        return frames * vit(v, size, cls=cls)
    n, c, d, m = (size // v["patch"]) ** 2, int(cls), v["width"], v["mlp_dim"]
    embed = 2 * frames * n * v["patch"] ** 2 * 3 * d
    if temporal == "none":
        return embed + v["depth"] * layer(t * n + c, d, m)
    s = n + c
    spatial = t * (2 * s * 4 * d * d + 2 * 2 * s * s * d) + 2 * 2 * (t * n + c) * d * m
    if temporal == "divided":
        time = 2 * t * n * 4 * d * d + 2 * 2 * n * t * t * d + 2 * t * n * d * d
    elif (cfg.get("local_temporal", None) or LOCAL_WHEN_UNSET) == "mmjax_v1":
        r, k = max(d // 4, 1), int(cfg.get("temporal_kernel", None) or 3)
        time = 2 * t * n * d * r + 2 * t * n * r * k + 2 * t * n * r * d
    else:  # the release: before and after attention; the MLP also over the T' - 1 extra [CLS]
        r, k = max(d // 2, 1), int(cfg.get("temporal_kernel", None) or 3)
        time = 2 * (2 * t * n * d * r + 2 * t * n * r * k + 2 * t * n * r * d) + 2 * 2 * (t - 1) * c * d * m
    return embed + v["depth"] * (spatial + time)


def vision_tokens(cfg, v, cls=True):
    """The tokens a vision tower hands on (cross-attention memory): N + c for an image,
    T'N + c for a clip, T(N + c) for 'mean'."""
    frames, t, temporal = _video(cfg)
    one = _tokens(v, int(cfg.image_size), cls)
    if not frames:
        return one
    return frames * one if temporal == "mean" else t * (one - int(cls)) + int(cls)


def clip_forward(cfg, batch: int) -> dict:
    im = parse_variant(cfg.image, cfg.get("image_overrides", None), kind="image")
    tx = parse_variant(cfg.text, cfg.get("text_overrides", None), kind="text")
    e, length = int(cfg.embed_dim), int(cfg.text_len)
    image = vision(cfg, im, cls=cfg.get("pool", "cls") == "cls") + 2 * im["width"] * e
    text = tx["depth"] * layer(length, tx["width"], tx["mlp_dim"]) + 2 * tx["width"] * e
    return {"student": image + text + 2 * 2 * batch * e, "teacher": 0}


def albef_forward(cfg, batch: int) -> dict:
    im = parse_variant(cfg.image, cfg.get("image_overrides", None), kind="image")
    tx = parse_variant(cfg.text, cfg.get("text_overrides", None), kind="text")
    e, length, vocab = int(cfg.embed_dim), int(cfg.text_len), int(cfg.vocab_size)
    ff = int(cfg.get("fusion_from", tx["depth"] // 2))
    q = int(cfg.get("queue_size", 65536))
    tasks = tuple(cfg.get("tasks", None) or ("itc", "itm", "mlm"))
    d, m = tx["width"], tx["mlp_dim"]
    t_img = vision_tokens(cfg, im)
    image = vision(cfg, im) + 2 * im["width"] * e
    text = ff * layer(length, d, m) + 2 * d * e
    fusion = (tx["depth"] - ff) * cross_layer(length, d, m, t_img, im["width"])
    mlm_head = 2 * length * (d * d + d * vocab)
    student, teacher = image + text, image + text
    if "itc" in tasks:
        student += 2 * 2 * (batch + q) * e
        teacher += 2 * 2 * (batch + q) * e
    if "itm" in tasks:
        student += 2 * 2 * batch * e + 3 * (fusion + 2 * d * 2)
    if "mlm" in tasks:
        student += ff * layer(length, d, m) + fusion + mlm_head
        teacher += ff * layer(length, d, m) + fusion + mlm_head
    return {"student": student, "teacher": teacher}


def multiway_forward(cfg, batch: int) -> dict:
    s = parse_variant(cfg.image, cfg.get("image_overrides", None), kind="image")
    e, size, length, vocab = int(cfg.embed_dim), int(cfg.image_size), int(cfg.text_len), int(cfg.vocab_size)
    family = cfg.get("family", "vlmo")
    default = ("itc", "itm", "mlm") if family == "vlmo" else ("mlm", "tmlm", "mdm")
    tasks = tuple(cfg.get("tasks", None) or default)
    d, m, p = s["width"], s["mlp_dim"], s["patch"]
    n = (size // p) ** 2
    t_img = n + 1
    img_pass = s["depth"] * layer(t_img, d, m)
    txt_pass = s["depth"] * layer(length, d, m)
    joint = s["depth"] * layer(t_img + length, d, m)
    patch = 2 * n * p * p * 3 * d
    mlm_head = 2 * length * (d * d + d * vocab)
    out = 0
    if "itc" in tasks or "itm" in tasks:
        out += patch + img_pass + txt_pass + 2 * 2 * d * e
    if "itc" in tasks:
        out += 2 * 2 * batch * e
        vl_from = cfg.get("vl_from", None) if family == "vlmo" else None
        if vl_from is not None and cfg.get("itc_vlffn", None):  # VLMo's ITC on VL-FFN features
            top = s["depth"] - int(vl_from)
            out += top * (layer(t_img, d, m) + layer(length, d, m)) + 2 * 2 * d * e + 2 * 2 * batch * e
    if "itm" in tasks:
        out += 2 * 2 * batch * e + 3 * (joint + 2 * d * 2)
    if "mlm" in tasks:
        out += patch + joint + mlm_head
    if "tmlm" in tasks:
        out += txt_pass + mlm_head
    if "mdm" in tasks:
        out += patch + img_pass + 2 * n * d * p * p * 3
    return {"student": out, "teacher": 0}


FORWARD = {"clip": clip_forward, "albef": albef_forward, "vlmo": multiway_forward, "beit3": multiway_forward}


def forward_flops(model_config, batch: int) -> dict:
    """{'student': forward FLOPs per sample of what gets gradients, 'teacher': the
    EMA teacher's forward per sample} for the family's configured tasks."""
    family = model_config.get("family")
    if family not in FORWARD:
        raise ValueError(f"no analytic FLOP count for model.family={family!r}; valid choices: {', '.join(FORWARD)}")
    return FORWARD[family](model_config, int(batch))


def train_step_flops(model_config, batch: int) -> float:
    """Model FLOPs of one train step over the global batch (3x student forward +
    teacher forward, per sample, times the batch)."""
    f = forward_flops(model_config, batch)
    return float(batch) * (3 * f["student"] + f["teacher"])


# ------------------------------------------------------------------ the counter


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    size = lambda shape, idx: int(np.prod([shape[i] for i in idx])) if len(idx) else 1
    free_l = size(lhs, [i for i in range(len(lhs)) if i not in tuple(lc) + tuple(lb)])
    free_r = size(rhs, [i for i in range(len(rhs)) if i not in tuple(rc) + tuple(rb)])
    return 2 * size(lhs, lb) * free_l * free_r * size(lhs, lc)


def _conv_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    # FLOPs = 2 * output elements * (kernel spatial size * input features per group)
    k_spatial = int(np.prod([rhs[i] for i in dn.rhs_spec[2:]]))
    in_feat = rhs[dn.rhs_spec[1]]
    return 2 * int(np.prod(out)) * k_spatial * in_feat


def _count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        subs = [_count(j) for j in _subjaxprs(eqn)]
        if name == "cond":  # one branch runs
            total += max(subs, default=0)
        else:
            total += (int(eqn.params["length"]) if name == "scan" else 1) * sum(subs)
    return total


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(x, "jaxpr") and hasattr(x, "consts"):  # ClosedJaxpr
                yield x.jaxpr
            elif hasattr(x, "eqns"):  # Jaxpr
                yield x


def count_dot_flops(fn, *args) -> int:
    """FLOPs of every dot_general and convolution in `fn(*args)`'s jaxpr (sub-jaxprs
    included; a scan's body counted `length` times)."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)
