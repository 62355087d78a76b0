"""Multi-head attention and boolean attention masks.

Masks are boolean, True = may attend, with shape [B, 1|Hh, Lq, Lk] (Hh heads),
the layout `jax.nn.dot_product_attention` broadcasts.
Shape letters: B batch, L length (Lq queries, Lk keys), D width, Hh heads,
Dh head width (D / Hh).
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.parallel.sharding import constrain, dense_init

Dtype = Any


def padding_mask(valid_BxL):
    """`valid: [B, L] bool` (True = real token) -> key mask [B, 1, 1, L]."""
    chex.assert_rank(valid_BxL, 2)
    return valid_BxL.astype(bool)[:, None, None, :]


def causal_mask(length):
    """[1, 1, L, L] bool, True where key position <= query position."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None, None]


def combine_masks(*masks):
    """Logical AND of masks that broadcast to [B, Hh, Lq, Lk]; None entries skipped.

    Returns None if every mask is None.
    """
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    for m in masks:
        chex.assert_rank(m, 4)
    out = masks[0].astype(bool)
    for m in masks[1:]:
        out = jnp.logical_and(out, m.astype(bool))
    return out


IMPLEMENTATIONS = ("xla", "cudnn")


def parse_attention(spec: str) -> tuple[str, int]:
    """model.attention 'IMPL' or 'IMPL/N' -> (implementation, pad multiple; 0 = none).

    'xla' is XLA's own softmax(q k^T) v; 'cudnn' is cuDNN's fused flash attention
    (GPU, bf16/fp16 only). '/N' pads the query and key lengths to a multiple of N
    (e.g. 197 ViT-B/16 tokens -> 208 with '/16'), the padded keys masked out and the
    padded query rows dropped, so the result is unchanged.
    """
    impl, _, pad = str(spec).partition("/")
    if impl not in IMPLEMENTATIONS or (pad and (not pad.isdigit() or int(pad) < 1)):
        raise ValueError(
            f"model.attention={spec!r}; valid choices: {', '.join(IMPLEMENTATIONS)}, "
            "optionally with '/N' to pad lengths to a multiple of N (e.g. 'cudnn/16')"
        )
    return impl, int(pad or 0)


def _pad_to(x, axis, length):
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def attend(q_BxLqxHhxDh, k_BxLkxHhxDh, v_BxLkxHhxDh, mask=None, attention: str = "xla"):
    """softmax(q k^T / sqrt(Dh)) v with `mask` (True = may attend), by the
    implementation and padding `attention` names (parse_attention). A query row whose
    mask is all False outputs 0 (not XLA's uniform average over masked keys)."""
    impl, pad = parse_attention(attention)
    q, k, v = q_BxLqxHhxDh, k_BxLkxHhxDh, v_BxLkxHhxDh
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    if mask is not None:
        chex.assert_rank(mask, 4)
        mask = mask.astype(bool)
    kv_lengths = None
    if pad:
        lq_p, lk_p = -(-lq // pad) * pad, -(-lk // pad) * pad
        q, k, v = _pad_to(q, 1, lq_p), _pad_to(k, 1, lk_p), _pad_to(v, 1, lk_p)
        if mask is None:  # padding only: cuDNN takes it as sequence lengths
            kv_lengths = jnp.full((b,), lk, jnp.int32)
        else:
            mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, lk))
            mask = _pad_to(_pad_to(mask, 3, lk_p), 2, lq_p)
            # Padded query rows (dropped below) attend to the real keys, so no row of the
            # fused kernel is fully masked (a NaN there would reach the backward pass).
            pad_row = (jnp.arange(lq_p) >= lq)[:, None] & (jnp.arange(lk_p) < lk)[None, :]
            mask = mask | pad_row[None, None]
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation=None if impl == "xla" else impl
    )
    out = out[:, :lq]
    if mask is not None:
        # [B, 1|Hh, Lq, 1] -> [B, Lq, 1|Hh, 1], zero rows with nothing to attend.
        any_BxHxLqx1 = jnp.any(mask[:, :, :lq], axis=-1, keepdims=True)
        out = jnp.where(jnp.swapaxes(any_BxHxLqx1, 1, 2), out, 0)
    return out


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention.

    `__call__(x: [B, Lq, D], inputs_kv: [B, Lk, Dkv] | None, mask: [B,1|Hh,Lq,Lk] bool)
    -> [B, Lq, D]`. With `inputs_kv=None` it is self-attention; `fused_qkv=True`
    then uses one Dense for q, k, v (OpenAI CLIP's `in_proj`). Cross-attention
    (inputs_kv given) always uses separate q / k / v projections. With `decode=True`
    (captioning decoders) self-attention keeps a KV cache (`_self_cache`), and
    cross-attention stores the memory's keys and values in the `cache` collection on
    the first call that may write it; later calls reuse them.

    A query row whose mask is all False attends nowhere; its output is set to 0
    (rather than XLA's uniform average over masked keys), so it is finite and
    independent of the masked keys.
    """

    num_heads: int
    fused_qkv: bool = True
    use_bias: bool = True
    attention: str = "xla"  # parse_attention
    decode: bool = False  # keep keys / values in the `cache` collection (see above)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _self_cache(self, k, v, mask):
        """Self-attention KV cache (decode=True). The first call (any length L) creates
        `cache/{key,value}` [B, L, Hh, Dh] (zeros) and `cache/index` and attends as
        usual; later calls take one token, write its key and value at `index` and
        attend to positions 0..index."""
        stepping = self.has_variable("cache", "key")
        ck = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        ci = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not stepping:
            return k, v, mask
        if k.shape[1] != 1:
            raise ValueError(f"a decoding step takes one token, got {k.shape[1]}")
        i = ci.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
        ci.value = i + 1
        return ck.value, cv.value, (jnp.arange(ck.value.shape[1]) <= i)[None, None, None, :]

    @nn.compact
    def __call__(self, x_BxLqxD, inputs_kv=None, mask=None):
        chex.assert_rank(x_BxLqxD, 3)
        width = x_BxLqxD.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by heads {self.num_heads}.")
        head_dim = width // self.num_heads
        dense = lambda feats, name, *logical: nn.DenseGeneral(
            feats,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
            **dense_init("embed", *logical, bias_names=logical),
        )
        hd = (self.num_heads, head_dim)
        if inputs_kv is None and self.fused_qkv:
            qkv_BxLx3xHhxDh = dense((3,) + hd, "qkv", None, "heads", "kv")(x_BxLqxD)
            q, k, v = (qkv_BxLx3xHhxDh[:, :, i] for i in range(3))
        else:
            kv_in = x_BxLqxD if inputs_kv is None else inputs_kv
            chex.assert_rank(kv_in, 3)
            q = dense(hd, "query", "heads", "kv")(x_BxLqxD)
            if self.decode and inputs_kv is not None and self.has_variable("cache", "cross_key"):
                # A decoding step: the memory's keys and values were computed once, at prefill.
                k, v = self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
            else:
                k = dense(hd, "key", "heads", "kv")(kv_in)
                v = dense(hd, "value", "heads", "kv")(kv_in)
                if self.decode and inputs_kv is not None and self.is_mutable_collection("cache"):
                    self.put_variable("cache", "cross_key", k)
                    self.put_variable("cache", "cross_value", v)
        q, k, v = (constrain(t, ("batch", "length", "heads", "kv")) for t in (q, k, v))
        if self.decode and inputs_kv is None:
            k, v, mask = self._self_cache(k, v, mask)
        out_BxLqxHhxDh = attend(q, k, v, mask, self.attention)
        out_BxLqxD = nn.DenseGeneral(
            width,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
            **dense_init("heads", "kv", "embed"),
        )(out_BxLqxHhxDh)
        return out_BxLqxD
