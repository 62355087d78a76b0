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

Each family owns its formula (`Family.flops(batch)` in mmjax/models/zoo/<family>.py,
stated in its docstring) built from the helpers here; a CoCa-style attentional
pooler with q queries over T tokens of width D adds pooler(q, T, D) = 2q*2D^2 (query
and output projections) + 2T*2D^2 (keys and values) + 2*2*q*T*D.

Train step FLOPs = 3 x (the forward of what gets gradients) + 1 x (the teacher's
forward): the backward pass costs two forwards. Recomputation under remat is not
counted (model FLOPs, not hardware FLOPs). `count_dot_flops` counts the
`dot_general`s of a traced function; tests check the formulas against it.
"""

from __future__ import annotations

import jax
import numpy as np

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


def pooler(q, t, d):
    return 2 * q * 2 * d * d + 2 * t * 2 * d * d + 2 * 2 * q * t * d


def _video(c):
    """(frames T, token frames T', temporal) of a parsed video model config; T = 0 for images."""
    frames = int(c.num_frames or 0)
    return frames, frames // int(c.tubelet or 1), c.temporal or "none"


def vision(c, v, cls=True):
    """The vision tower's forward per sample (`c`: a parsed model config with the video
    keys, zoo/schema.py's TowerConfig): `vit` for an image; for a clip of T
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
    size = int(c.image_size)
    frames, t, temporal = _video(c)
    if not frames:
        return vit(v, size, cls=cls)
    if temporal == "mean":
        return frames * vit(v, size, cls=cls)
    n, k, d, m = (size // v["patch"]) ** 2, int(cls), v["width"], v["mlp_dim"]
    embed = 2 * frames * n * v["patch"] ** 2 * 3 * d
    if temporal == "none":
        return embed + v["depth"] * layer(t * n + k, d, m)
    s = n + k
    spatial = t * (2 * s * 4 * d * d + 2 * 2 * s * s * d) + 2 * 2 * (t * n + k) * d * m
    kernel = int(c.temporal_kernel or 3)
    if temporal == "divided":
        time = 2 * t * n * 4 * d * d + 2 * 2 * n * t * t * d + 2 * t * n * d * d
    elif (c.local_temporal or LOCAL_WHEN_UNSET) == "mmjax_v1":
        r = max(d // 4, 1)
        time = 2 * t * n * d * r + 2 * t * n * r * kernel + 2 * t * n * r * d
    else:  # the release: before and after attention; the MLP also over the T' - 1 extra [CLS]
        r = max(d // 2, 1)
        time = 2 * (2 * t * n * d * r + 2 * t * n * r * kernel + 2 * t * n * r * d) + 2 * 2 * (t - 1) * k * d * m
    return embed + v["depth"] * (spatial + time)


def vision_tokens(c, v, cls=True):
    """The tokens a vision tower hands on (cross-attention memory): N + c for an image,
    T'N + c for a clip, T(N + c) for 'mean'."""
    frames, t, temporal = _video(c)
    one = _tokens(v, int(c.image_size), cls)
    if not frames:
        return one
    return frames * one if temporal == "mean" else t * (one - int(cls)) + int(cls)


def forward_flops(family, batch: int) -> dict:
    """{'student': forward FLOPs per sample of what gets gradients, 'teacher': the
    EMA teacher's forward per sample} for the family's configured tasks (`family`: a
    built family, `zoo.build(config.model)`). A family without a formula is an error."""
    try:
        return family.flops(int(batch))
    except NotImplementedError as e:
        raise ValueError(str(e)) from None


def train_step_flops(family, batch: int) -> float:
    """Model FLOPs of one train step over the global batch (3x student forward +
    teacher forward, per sample, times the batch)."""
    f = forward_flops(family, batch)
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
