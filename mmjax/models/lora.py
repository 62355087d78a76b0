"""LoRA adapters for the decoder LM's dense layers (mmjax/models/llm.py; issue 17).

With `DecoderLM(lora_rank=r > 0, lora_alpha=alpha)` each of the projections q, k, v, o
(attention) and gate, up, down (MLP), the visual expert's `attn_img` / `mlp_img` included,
gets a `<name>_lora` subtree beside its own kernel:

    a [*in, r]   the input side's logical names, None for r;
                 init: PEFT's default, kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    b [r, *out]  None, then the output side's logical names; init: zeros (a fresh adapter is a no-op)
    output += (alpha / r) * (x @ a) @ b

e.g. `attn/q_lora/a` [D, r] + `attn/q_lora/b` [r, H, Dh]; `attn/o_lora/a` [H, Dh, r] + `b` [r, D];
`mlp/gate_lora/a` [D, r] + `b` [r, F]; `mlp/down_lora/a` [F, r] + `b` [r, D]. No LoRA dropout.
Scanned layers (scan=True) stack them under `layers/` with a leading depth axis like every param.

Helpers on param trees (plain nested dicts, unrolled or scanned):
  `merge_lora(params, rank=, alpha=)` folds W + (alpha / r) * a @ b into each kernel and drops
    the `*_lora` subtrees: the plain DecoderLM params (serve / export with lora_rank=0);
  `split_lora(params) -> (base, lora)` and `join_lora(base, lora)` (its inverse: e.g. a
    pretrained checkpoint joined with fresh adapters from `split_lora(init_params(...))[1]`);
  `lora_freeze_regex(prefix)`: the `train.freeze` pattern matching every non-LoRA LM param.
"""

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.parallel.sharding import names

Dtype = Any
SUFFIX = "_lora"  # `q` -> `q_lora`


def lora_init(n_in: int):
    """PEFT's default init of A (torch kaiming_uniform_ with a=sqrt(5)): U(-b, b), b = 1/sqrt(fan_in),
    fan_in the product of a's first `n_in` (input) dims."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)


class LoRA(nn.Module):
    """The low-rank update of one projection: x [..., *in] -> (alpha / rank) * (x @ a) @ b
    [..., *out]; the last len(in_names) dims of x are contracted. Params `a` [*in, r]
    (in_names + (None,)) and `b` [r, *out] ((None,) + out_names, zeros)."""

    rank: int
    alpha: float
    in_names: tuple
    out_shape: tuple
    out_names: tuple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n_in, r = len(self.in_names), self.rank
        a_init = names(lora_init(n_in), *self.in_names, None)
        a = self.param("a", a_init, tuple(x.shape[-n_in:]) + (r,), self.param_dtype)
        b_init = names(nn.initializers.zeros_init(), None, *self.out_names)
        b = self.param("b", b_init, (r,) + tuple(self.out_shape), self.param_dtype)
        h = jnp.tensordot(jnp.asarray(x, self.dtype), jnp.asarray(a, self.dtype), axes=n_in)
        return jnp.tensordot(h, jnp.asarray(b, self.dtype), axes=1) * jnp.asarray(self.alpha / r, self.dtype)


def lora_factory(rank: int, alpha: float, dtype, param_dtype):
    """A `LoRA` factory `(name, in_names, out_shape, out_names) -> LoRA | None` (None when rank 0)."""
    if rank < 0:
        raise ValueError(f"lora_rank={rank} must be >= 0")

    def make(name, in_names, out_shape, out_names):
        if not rank:
            return None
        kw = dict(dtype=dtype, param_dtype=param_dtype, name=name)
        return LoRA(rank, alpha, tuple(in_names), tuple(out_shape), tuple(out_names), **kw)

    return make


def with_lora(y, adapter, x):
    """y + adapter(x), or y when there is no adapter."""
    return y if adapter is None else y + adapter(x).astype(y.dtype)


# ----------------------------------------------------------------- param trees


def _delta(a, b, kernel):
    """a [S.., *in, r] @ b [S.., r, *out] -> [S.., *in, *out] (S: stacked layer axes)."""
    stack = a.ndim + b.ndim - 2 - kernel.ndim
    if stack < 0 or a.shape[:stack] != b.shape[:stack]:
        raise ValueError(f"LoRA a {a.shape} / b {b.shape} do not fit kernel {kernel.shape}")
    fn = lambda a, b: jnp.tensordot(a, b, axes=1)
    for _ in range(stack):
        fn = jax.vmap(fn)
    return fn(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))


def merge_lora(params, *, rank: int, alpha: float):
    """DecoderLM params with adapters -> the plain params: every `X_lora` {a, b} folded into its
    sibling `X/kernel` as W + (alpha / rank) * a @ b (in float32, cast back to W's dtype) and
    dropped. Unrolled and scanned (`layers/`, leading depth axis) layouts alike."""
    scale = alpha / rank

    def walk(tree):
        out = {k: walk(v) if isinstance(v, Mapping) else v for k, v in tree.items() if not k.endswith(SUFFIX)}
        for key, ad in tree.items():
            if not key.endswith(SUFFIX):
                continue
            base = key[: -len(SUFFIX)]
            if base not in out or "kernel" not in out[base]:
                raise ValueError(f"LoRA subtree {key!r} has no sibling {base!r} with a kernel")
            if ad["a"].shape[-1] != rank:
                raise ValueError(f"{key}/a has rank {ad['a'].shape[-1]}, merge_lora was given rank={rank}")
            w = out[base]["kernel"]
            merged = jnp.asarray(w, jnp.float32) + scale * _delta(ad["a"], ad["b"], w)
            out[base] = {**out[base], "kernel": merged.astype(w.dtype)}
        return out

    return walk(params)


def split_lora(params):
    """-> (base, lora): the tree without its `*_lora` subtrees, and only those (same nesting;
    branches without adapters dropped)."""

    def walk(tree):
        base, lora = {}, {}
        for k, v in tree.items():
            if k.endswith(SUFFIX):
                lora[k] = v
            elif isinstance(v, Mapping):
                base[k], sub = walk(v)
                if sub:
                    lora[k] = sub
            else:
                base[k] = v
        return base, lora

    return walk(params)


def join_lora(base, lora):
    """The inverse of `split_lora`: `lora`'s subtrees put into (a copy of) `base`."""
    out = dict(base)
    for k, v in lora.items():
        out[k] = join_lora(out[k], v) if (k in out and isinstance(v, Mapping) and not k.endswith(SUFFIX)) else v
    return out


def lora_freeze_regex(prefix: str = "lm/", train_expert: bool = False) -> str:
    """A `train.freeze` regex (re.search on 'a/b/c' param paths, mmjax.parallel.sharding.path_str)
    matching every LM param under `prefix` except the LoRA ones: '^lm/(?!.*_lora/)'.
    `train_expert`: leave CogVLM's `attn_img` / `mlp_img` weights trainable too
    ('^lm/(?!.*(_lora|_img)/)'). prefix '' matches every non-LoRA param of the tree."""
    skip = "(_lora|_img)" if train_expert else "_lora"
    return f"^{re.escape(prefix)}(?!.*{skip}/)"
