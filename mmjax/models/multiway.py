"""Multiway (mixture-of-modality-experts) transformer: VLMo and BEiT-3.

One stack of blocks serves image-only, text-only and image-text sequences with
one set of params. Which expert a token uses is decided by *static spans*: a
tuple of `(modality, length)` pairs that cover the sequence in order, e.g.
`(('image', 17),)`, `(('text', 16),)` or `(('image', 17), ('text', 16))`.
The sequence is sliced at the span boundaries (static shapes, no branching on
data values), each slice goes through its modality's expert, and the slices
are concatenated back. Any order works: the VLMo release uses [text ; image],
BEiT-3 [image ; text].

Layouts:
  'vlmo'  (VLMo paper; also what the BEiT-3 paper describes): LayerNorm `ln1`
          and self-attention `attn` are SHARED by all tokens; then a
          per-modality LayerNorm + FFN expert (`ln2_image`/`ffn_image`,
          `ln2_text`/`ffn_text`). Blocks with `vl_expert=True` (VLMo's top
          layers) send ALL tokens of a multi-modality sequence through
          `ln2_vl`/`ffn_vl`; single-modality sequences still use their own
          expert there.
  'beit3' (the released BEiT-3, "decoupled"): per-modality `ln1_<m>`,
          q/k/v projection `attn/qkv_<m>`, output projection `attn/out_<m>`,
          `ln2_<m>` and `ffn_<m>`; only the attention computation
          softmax(q k^T) v over the joint sequence (with the mask) is shared.
          No VL expert.

Every block is pre-LN (x + Attn(LN(x)), x + FFN(LN(x))). The VLMo and BEiT-3
releases are pre-LN too (BEiT-style); ALBEF/BERT are post-LN, and mmjax uses
pre-LN everywhere.

Param names (per block `blockNN`), for freezing by regex on the '/'-joined path:
  shared attention (vlmo):  r'block\\d+/(ln1|attn)/'
  image expert (vlmo):      r'block\\d+/(ln2|ffn)_image/'   (+ 'ln_final_image')
  image expert (beit3):     r'_image/' matches ln1_image, attn/qkv_image,
                            attn/out_image, ln2_image, ffn_image, ln_final_image
  VL expert (vlmo):         r'(ln2|ffn)_vl/' (+ 'ln_final_vl')

Initialising: linen creates params lazily, so under `init` every block and the
final norms also run each expert they did not use on a dummy [1, 1, D] input
(only while initialising; `apply` is unaffected). Any `init` call therefore
creates all experts whatever spans its input has. `MultiwayEncoder.init_all`
is the explicit alternative (runs image-only, text-only and joint passes).

Shape letters: B batch, L sequence length (sum of span lengths), N image
tokens, Lt text tokens, D width, F mlp width, Hh heads, Dh head width.
"""

from typing import Any, Optional, Sequence, Tuple

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention, attend
from mmjax.models.transformer import Mlp, maybe_remat
from mmjax.parallel.sharding import dense_init, norm_init

Dtype = Any
Spans = Tuple[Tuple[str, int], ...]
LAYOUTS = ("vlmo", "beit3")


def normalize_spans(spans, length: int, experts: Sequence[str]) -> Spans:
    """Checks `spans` against the sequence length and experts; returns a hashable tuple.

    Raises ValueError when a span has a modality without an expert, a
    non-positive length, or the lengths do not add up to `length`.
    """
    out = tuple((str(m), int(n)) for m, n in spans)
    if not out:
        raise ValueError("spans is empty; give at least one (modality, length) pair.")
    for m, n in out:
        if m not in experts:
            raise ValueError(f"span modality {m!r} has no expert; experts are {tuple(experts)}.")
        if n <= 0:
            raise ValueError(f"span ({m!r}, {n}) must have a positive length.")
    total = sum(n for _, n in out)
    if total != length:
        raise ValueError(f"spans {out} cover {total} tokens but the sequence has {length}.")
    return out


def is_multimodal(spans: Spans) -> bool:
    """True when the spans hold more than one distinct modality (VL expert case)."""
    return len({m for m, _ in spans}) > 1


def split_by_spans(x_BxLx, spans: Spans):
    """Slices axis 1 at the span boundaries: a list of [B, n_i, ...] arrays."""
    out, start = [], 0
    for _, n in spans:
        out.append(x_BxLx[:, start : start + n])
        start += n
    return out


def _per_span(fns, x_BxLx, spans: Spans):
    """Applies `fns[modality]` to each span's slice and concatenates along axis 1."""
    pieces = [fns[m](xs) for (m, _), xs in zip(spans, split_by_spans(x_BxLx, spans))]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def _touch_unused(module, fns, used, dummy):
    """Under `init`, calls every expert in `fns` not in `used` once so its params exist."""
    if module.is_initializing():
        for m, fn in fns.items():
            if m not in used:
                fn(dummy)


class MultiwayAttention(nn.Module):
    """BEiT-3 ('decoupled') attention: per-modality q/k/v and output projections.

    `__call__(x: [B, L, D], mask: [B, 1|Hh, L, L] bool | None, spans) -> [B, L, D]`.
    Each span is projected by `qkv_<modality>` (DenseGeneral to [3, Hh, Dh],
    the layout of `MultiHeadAttention`'s fused `qkv`); attention runs over the
    whole sequence; each span's output is projected by `out_<modality>`.
    Query rows whose mask is all False output 0, as in `MultiHeadAttention`.
    """

    num_heads: int
    experts: Tuple[str, ...] = ("image", "text")
    use_bias: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, mask, spans):
        chex.assert_rank(x_BxLxD, 3)
        b, length, width = x_BxLxD.shape
        spans = normalize_spans(spans, length, self.experts)
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by heads {self.num_heads}.")
        hd = (self.num_heads, width // self.num_heads)
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = {
            m: nn.DenseGeneral(
                (3,) + hd,
                name=f"qkv_{m}",
                **kw,
                **dense_init("embed", None, "heads", "kv", bias_names=(None, "heads", "kv")),
            )
            for m in self.experts
        }
        out = {
            m: nn.DenseGeneral(width, axis=(-2, -1), name=f"out_{m}", **kw, **dense_init("heads", "kv", "embed"))
            for m in self.experts
        }
        used = {m for m, _ in spans}
        qkv_BxLx3xHhxDh = _per_span(qkv, x_BxLxD, spans)
        q, k, v = (qkv_BxLx3xHhxDh[:, :, i] for i in range(3))
        o_BxLxHhxDh = attend(q, k, v, mask, self.attention)
        y_BxLxD = _per_span(out, o_BxLxHhxDh, spans)
        _touch_unused(self, qkv, used, jnp.zeros((1, 1, width), self.dtype))
        _touch_unused(self, out, used, jnp.zeros((1, 1) + hd, self.dtype))
        chex.assert_shape(y_BxLxD, (b, length, width))
        return y_BxLxD


class MultiwayBlock(nn.Module):
    """Pre-LN multiway block (see the module docstring for the two layouts).

    `__call__(x: [B, L, D], mask: [B, 1|Hh, L, L] bool | None, spans, route_vl=False)
    -> [B, L, D]` with `spans` a static tuple of (modality, length) pairs covering L in
    order. `route_vl=True` sends a single-modality sequence through the VL expert too
    (VLMo's `modality_type="vl"` on an image-only or text-only pass: the features of
    its second ITC); it changes nothing in a block without a VL expert.

    Params, layout 'vlmo': `ln1`, `attn` (shared; `attn` is a MultiHeadAttention
    with fused `qkv` and `out`), `ln2_<m>`, `ffn_<m>` (an Mlp: fc1, fc2) per
    expert m, and `ln2_vl`, `ffn_vl` when `vl_expert`. Layout 'beit3':
    `ln1_<m>`, `attn/qkv_<m>`, `attn/out_<m>`, `ln2_<m>`, `ffn_<m>`.
    Restricted to one modality either layout is exactly `transformer.Block`
    (ln1, attn/{qkv,out}, ln2, mlp) with that modality's params.
    """

    num_heads: int
    mlp_dim: int
    layout: str = "vlmo"
    experts: Tuple[str, ...] = ("image", "text")
    vl_expert: bool = False
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, mask, spans, route_vl: bool = False):
        chex.assert_rank(x_BxLxD, 3)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}.")
        if self.layout == "beit3" and self.vl_expert:
            raise ValueError("layout 'beit3' (the released BEiT-3) has no VL expert.")
        b, length, width = x_BxLxD.shape
        spans = normalize_spans(spans, length, self.experts)
        used = {m for m, _ in spans}
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dummy_1x1xD = jnp.zeros((1, 1, width), self.dtype)

        def ffn_expert(m):
            ln = nn.LayerNorm(**norm_init(), name=f"ln2_{m}", **kw)
            mlp = Mlp(self.mlp_dim, name=f"ffn_{m}", **kw)
            return lambda h: mlp(ln(h))

        # Attention.
        if self.layout == "vlmo":
            h_BxLxD = nn.LayerNorm(**norm_init(), name="ln1", **kw)(x_BxLxD)
            h_BxLxD = MultiHeadAttention(self.num_heads, attention=self.attention, name="attn", **kw)(
                h_BxLxD, mask=mask
            )
        else:
            ln1 = {m: nn.LayerNorm(**norm_init(), name=f"ln1_{m}", **kw) for m in self.experts}
            h_BxLxD = _per_span(ln1, x_BxLxD, spans)
            _touch_unused(self, ln1, used, dummy_1x1xD)
            h_BxLxD = MultiwayAttention(
                self.num_heads, experts=tuple(self.experts), attention=self.attention, name="attn", **kw
            )(h_BxLxD, mask, spans)
        x_BxLxD = x_BxLxD + h_BxLxD

        # FFN experts.
        ffn = {m: ffn_expert(m) for m in self.experts}
        if self.vl_expert:
            ffn_vl = ffn_expert("vl")
        if self.vl_expert and (is_multimodal(spans) or route_vl):
            h_BxLxD = ffn_vl(x_BxLxD)
            _touch_unused(self, ffn, set(), dummy_1x1xD)
        else:
            h_BxLxD = _per_span(ffn, x_BxLxD, spans)
            _touch_unused(self, ffn, used, dummy_1x1xD)
            if self.vl_expert:
                _touch_unused(self, {"vl": ffn_vl}, set(), dummy_1x1xD)
        y_BxLxD = x_BxLxD + h_BxLxD
        chex.assert_shape(y_BxLxD, (b, length, width))
        return y_BxLxD


class MultiwayEncoder(nn.Module):
    """`depth` MultiwayBlocks (`block00`, ...) then per-modality final LayerNorms.

    `__call__(x: [B, L, D], mask: [B, 1|Hh, L, L] bool | None, spans, start=0,
    route_vl=False) -> (y: [B, L, D], aux)`; aux holds each block's output as
    `aux['block00']`, ... like `transformer.Encoder`. `start` > 0 runs blocks
    start..depth-1 only (x is then block start-1's output); `route_vl` (needs
    `vl_from`) sends every token through the VL expert where a block has one and
    through `ln_final_vl`: VLMo's VL-FFN features of an image-only or text-only pass
    are `self(aux['block<vl_from - 1>'], mask, spans, start=vl_from, route_vl=True)`.

    `vl_from`: blocks with index >= vl_from get the VL expert (layout 'vlmo'
    only; VLMo-base uses 10 of 12); None = never. Final norms (`final_norm`):
    `ln_final_<m>` per modality applied per span; with `vl_from` set (vlmo), a
    multi-modality sequence is normed by `ln_final_vl` instead.
    `remat=True` recomputes block activations in the backward pass.

    Init: any `init` creates every expert (see the module docstring). The
    explicit way, standalone:
      params = enc.init(rng, img_BxNxD, txt_BxLtxD, method=MultiwayEncoder.init_all)
    and inside a family module's own init-time method:
      self.encoder.init_all(img_BxNxD, txt_BxLtxD)
    """

    depth: int
    num_heads: int
    mlp_dim: int
    layout: str = "vlmo"
    experts: Tuple[str, ...] = ("image", "text")
    vl_from: Optional[int] = None
    final_norm: bool = True
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, mask, spans, start: int = 0, route_vl: bool = False):
        chex.assert_rank(x_BxLxD, 3)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}.")
        if self.layout == "beit3" and self.vl_from is not None:
            raise ValueError("layout 'beit3' has no VL expert; set vl_from=None.")
        if route_vl and self.vl_from is None:
            raise ValueError("route_vl needs a VL expert (vl_from set).")
        if not 0 <= start <= self.depth:
            raise ValueError(f"start={start} must lie in [0, depth={self.depth}].")
        b, length, width = x_BxLxD.shape
        spans = normalize_spans(spans, length, self.experts)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # spans and route_vl (arguments 3 and 4 counting `self`) are static: they decide the routing.
        block_cls = maybe_remat(MultiwayBlock, self.remat, static_argnums=(3, 4))
        aux = {}
        for i in range(start, self.depth):
            vl = self.vl_from is not None and i >= self.vl_from
            x_BxLxD = block_cls(
                self.num_heads,
                self.mlp_dim,
                layout=self.layout,
                experts=tuple(self.experts),
                vl_expert=vl,
                attention=self.attention,
                name=f"block{i:02d}",
                **kw,
            )(x_BxLxD, mask, spans, route_vl)
            aux[f"block{i:02d}"] = x_BxLxD
        if self.final_norm:
            norms = {m: nn.LayerNorm(**norm_init(), name=f"ln_final_{m}", **kw) for m in self.experts}
            dummy_1x1xD = jnp.zeros((1, 1, width), self.dtype)
            use_vl = self.vl_from is not None
            if use_vl:
                ln_vl = nn.LayerNorm(**norm_init(), name="ln_final_vl", **kw)
            if use_vl and (is_multimodal(spans) or route_vl):
                x_BxLxD = ln_vl(x_BxLxD)
                _touch_unused(self, norms, set(), dummy_1x1xD)
            else:
                x_BxLxD = _per_span(norms, x_BxLxD, spans)
                _touch_unused(self, norms, {m for m, _ in spans}, dummy_1x1xD)
                if use_vl:
                    _touch_unused(self, {"vl": ln_vl}, set(), dummy_1x1xD)
        chex.assert_shape(x_BxLxD, (b, length, width))
        return x_BxLxD, aux

    def init_all(self, img_BxNxD, txt_BxLtxD):
        """Runs image-only, text-only and [image ; text] passes (no masks).

        For `init(..., method=MultiwayEncoder.init_all)`; needs 'image' and
        'text' experts. Returns the joint pass's `(y, aux)`.
        """
        for m in ("image", "text"):
            if m not in self.experts:
                raise ValueError(f"init_all needs an {m!r} expert; experts are {self.experts}.")
        chex.assert_rank([img_BxNxD, txt_BxLtxD], 3)
        n, lt = img_BxNxD.shape[1], txt_BxLtxD.shape[1]
        self(img_BxNxD, None, (("image", n),))
        self(txt_BxLtxD, None, (("text", lt),))
        b = min(img_BxNxD.shape[0], txt_BxLtxD.shape[0])
        joint_BxLxD = jnp.concatenate([img_BxNxD[:b], txt_BxLtxD[:b]], axis=1)
        return self(joint_BxLxD, None, (("image", n), ("text", lt)))
