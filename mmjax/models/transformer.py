"""Pre-LN transformer parts: Mlp, Block, Encoder.

All modules take `dtype` (compute, e.g. bfloat16) and `param_dtype` (storage,
float32). Shape letters: B batch, L length, D width, F mlp width.
"""

from typing import Any, Callable, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention
from mmjax.parallel.sharding import constrain, dense_init, norm_init

Dtype = Any
LN_EPS = 1e-6  # flax's LayerNorm default; transformers' CLIP uses 1e-5 (model.ln_eps)


def gelu_exact(x):
    """GELU with the exact erf (torch's `nn.GELU()`, transformers' 'gelu'), written as
    torch writes it, `x/2 (1 + erf(x/sqrt 2))`: XLA's f32 erf is one rational polynomial,
    while `jax.nn.gelu(approximate=False)`'s erfc is piecewise with an exp, and the
    value-and-gradient of that costs twice as much on the CPU (docs/performance.md)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def quick_gelu(x):
    """OpenAI CLIP's `x * sigmoid(1.702 x)` (transformers' 'quick_gelu')."""
    return x * jax.nn.sigmoid(1.702 * x)


# model.act -> function. 'gelu_tanh' (flax's nn.gelu, the tanh approximation) is the
# default of every mmjax model; 'gelu' and 'quick_gelu' match transformers' CLIP.
ACTIVATIONS = {"gelu_tanh": nn.gelu, "gelu": gelu_exact, "quick_gelu": quick_gelu}


def activation(act: Union[str, Callable]) -> Callable:
    """A name from ACTIVATIONS (or a function, returned as is) -> the function."""
    if callable(act):
        return act
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r}; valid choices: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


class Mlp(nn.Module):
    """`[B, L, D] -> Dense(F) -> act -> Dense(D) -> [B, L, D]`; act: a name from
    ACTIVATIONS or a function."""

    mlp_dim: int
    act: Union[str, Callable] = "gelu_tanh"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD):
        width = x_BxLxD.shape[-1]
        h_BxLxF = nn.Dense(
            self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1", **dense_init("embed", "mlp")
        )(x_BxLxD)
        h_BxLxF = constrain(activation(self.act)(h_BxLxF), ("batch", "length", "mlp"))
        return nn.Dense(
            width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2", **dense_init("mlp", "embed")
        )(h_BxLxF)


# Activation checkpointing of a block (config key model.remat): what the backward
# pass may keep from the forward instead of recomputing it.
REMAT_POLICIES = {
    "none": None,  # no remat: everything is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def remat_mode(value) -> str:
    """model.remat (False / True / 'none' / 'full' / 'dots') -> a REMAT_POLICIES key."""
    mode = {False: "none", True: "full", None: "none"}.get(value, value) if not isinstance(value, str) else value
    if mode not in REMAT_POLICIES:
        raise ValueError(f"model.remat={value!r}; valid choices: {', '.join(REMAT_POLICIES)} (or a bool)")
    return mode


def maybe_remat(block_cls, remat, **kw):
    """`block_cls` wrapped in nn.remat with the policy of `remat` (unchanged for 'none')."""
    mode = remat_mode(remat)
    if mode == "none":
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[mode], **kw)


class Block(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + Mlp(LN(x)).

    `__call__(x: [B, L, D], mask: [B, 1|Hh, L, L] bool | None) -> [B, L, D]`.
    `act`: the MLP activation (a name from ACTIVATIONS); `ln_eps`: the LayerNorms' epsilon.
    """

    num_heads: int
    mlp_dim: int
    fused_qkv: bool = True
    act: str = "gelu_tanh"
    ln_eps: float = LN_EPS
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, mask=None):
        chex.assert_rank(x_BxLxD, 3)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        h = nn.LayerNorm(epsilon=self.ln_eps, name="ln1", **kw, **norm_init())(x_BxLxD)
        h = MultiHeadAttention(self.num_heads, fused_qkv=self.fused_qkv, attention=self.attention, name="attn", **kw)(
            h, mask=mask
        )
        x_BxLxD = x_BxLxD + h
        h = nn.LayerNorm(epsilon=self.ln_eps, name="ln2", **kw, **norm_init())(x_BxLxD)
        h = Mlp(self.mlp_dim, act=self.act, name="mlp", **kw)(h)
        return x_BxLxD + h


class ScanBlock(Block):
    """A Block as an `nn.scan` body: `(x, mask) -> (x', None)`."""

    @nn.compact
    def __call__(self, x_BxLxD, mask=None):
        return super().__call__(x_BxLxD, mask), None


class Encoder(nn.Module):
    """A stack of `depth` pre-LN Blocks, then an optional final LayerNorm.

    `__call__(x: [B, L, D], mask) -> (y: [B, L, D], aux)`; aux holds each block's
    output as `aux['block00']`, ... (unused entries are removed by XLA under jit).
    `remat` recomputes block activations in the backward pass ('full' / True: all
    of them; 'dots': all but the matmul outputs; see REMAT_POLICIES). `scan=True`
    runs the blocks as one `nn.scan` (one compiled layer, params stacked on a
    leading 'layers' axis under `blocks/`; `stack_blocks` / `unstack_blocks` convert
    the param trees) and returns no per-block outputs in aux. `act` and
    `ln_eps` go to every Block (and `ln_eps` to the final LayerNorm).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    final_norm: bool = True
    fused_qkv: bool = True
    act: str = "gelu_tanh"
    ln_eps: float = LN_EPS
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, mask=None):
        chex.assert_rank(x_BxLxD, 3)
        aux = {}
        block_kw = dict(
            fused_qkv=self.fused_qkv,
            attention=self.attention,
            act=self.act,
            ln_eps=self.ln_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan:
            layers = nn.scan(
                maybe_remat(ScanBlock, self.remat, prevent_cse=False),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, _ = layers(self.num_heads, self.mlp_dim, **block_kw, name="blocks")(x_BxLxD, mask)
        block_cls = maybe_remat(Block, self.remat)
        for i in range(0 if self.scan else self.depth):
            x_BxLxD = block_cls(self.num_heads, self.mlp_dim, **block_kw, name=f"block{i:02d}")(x_BxLxD, mask)
            aux[f"block{i:02d}"] = x_BxLxD
        if self.final_norm:
            x_BxLxD = nn.LayerNorm(
                epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final", **norm_init()
            )(x_BxLxD)
        return x_BxLxD, aux


def stack_blocks(encoder_params, depth: int):
    """Unrolled Encoder params ({'block00': ..., 'ln_final': ...}) -> the scanned layout
    ({'blocks': leaves stacked on a leading axis, 'ln_final': ...})."""
    blocks = [encoder_params[f"block{i:02d}"] for i in range(depth)]
    out = {k: v for k, v in encoder_params.items() if not k.startswith("block")}
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return out


def unstack_blocks(encoder_params):
    """The scanned layout -> the unrolled one (inverse of `stack_blocks`)."""
    out = {k: v for k, v in encoder_params.items() if k != "blocks"}
    depth = jax.tree.leaves(encoder_params["blocks"])[0].shape[0]
    for i in range(depth):
        out[f"block{i:02d}"] = jax.tree.map(lambda x: x[i], encoder_params["blocks"])
    return out
