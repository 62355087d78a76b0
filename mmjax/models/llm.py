"""A decoder-only language model in the Llama / Qwen2 / Gemma / CogVLM layout (issue 17).

Shape letters: B batch, L length (C cache slots), D width, H query heads, K key/value
heads (GQA: H % K == 0), Dh head width, F MLP width, V vocabulary.

`DecoderLM` (setup-style, its methods share submodules):
  `embed(ids [B, L]) -> [B, L, D]` token embeddings (times sqrt(D) when spec.embed_scale);
  `__call__(x [B, L, D], positions [B, L], mask [B, 1, L, Lk], expert [B, L] | None) -> [B, L, D]`
    the layers (pre-norm: x + attn(norm(x)); x + mlp(norm(x))) and the final RMSNorm;
  `logits(h [B, L, D]) -> float32 [B, L, V]`; `forward_ids` = logits(__call__(embed(ids))).
With `decode=True` each layer's attention keeps `cache/key`, `cache/value` [B, C, K, Dh] and
`cache/index`: the first call (mutable=["cache"]) on a length-C input creates the empty cache,
later calls write their n tokens at index..index+n-1 and attend over the C slots with a
[B, 1, n, C] mask given by the caller. `lm_mask` builds causal / prefix-LM masks.
With spec.visual_expert (CogVLM) image tokens (expert True) use `attn_img` / `mlp_img`
projections, text tokens `attn` / `mlp`; the attention itself is over all tokens.
`lora_rank` > 0 (a module field, not part of the spec) adds LoRA adapters `<proj>_lora/{a, b}`
beside every q, k, v, o, gate, up, down kernel (the expert's too): mmjax/models/lora.py.
"""

import dataclasses
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import attend
from mmjax.models.lora import lora_factory, with_lora
from mmjax.models.transformer import maybe_remat
from mmjax.parallel.sharding import constrain, dense_init, names

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LMSpec:
    """The architecture of a DecoderLM (hashable: a jit static argument / module field)."""

    vocab_size: int
    width: int  # hidden_size D
    depth: int  # num_hidden_layers
    heads: int  # num_attention_heads H
    kv_heads: int  # num_key_value_heads K (GQA: H % K == 0; MQA: K = 1)
    head_dim: int  # Dh (Gemma: not width // heads)
    mlp_dim: int  # intermediate_size F
    act: str = "silu"  # "silu": SwiGLU (Llama, Qwen2); "gelu_tanh": GeGLU (Gemma)
    norm_eps: float = 1e-6
    norm_offset: bool = False  # Gemma's RMSNorm: normed * (1 + scale), scale initialised to 0
    rope_theta: float = 10000.0
    tie_embeddings: bool = False  # logits = h @ embedding.T (no lm_head param)
    embed_scale: bool = False  # Gemma: embeddings * sqrt(width), the factor in the compute dtype
    qkv_bias: bool = False  # Qwen2: biases on q, k, v (never on o)
    visual_expert: bool = False  # CogVLM: a second attention (q, k, v, o) and MLP for image tokens

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE)")
        if self.act not in LM_ACTIVATIONS:
            raise ValueError(f"act={self.act!r}; valid choices: {', '.join(LM_ACTIVATIONS)}")


# The gate activation of the MLP: SwiGLU ("silu") or GeGLU with the tanh GELU ("gelu_tanh").
LM_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def lm_mask(valid_BxL, prefix_BxL=None):
    """-> bool [B, 1, L, L]: query i sees key j iff valid[j] and (j <= i or (prefix[i] and
    prefix[j])): causal, or prefix-LM (the prefix, e.g. image + prompt, bidirectional)."""
    chex.assert_rank(valid_BxL, 2)
    valid = valid_BxL.astype(bool)
    idx = jnp.arange(valid.shape[1])
    see_BxLxL = jnp.broadcast_to((idx[None, :] <= idx[:, None])[None], (valid.shape[0],) + (valid.shape[1],) * 2)
    if prefix_BxL is not None:
        prefix = prefix_BxL.astype(bool)
        see_BxLxL = see_BxLxL | (prefix[:, :, None] & prefix[:, None, :])
    return (see_BxLxL & valid[:, None, :])[:, None]


def rope(x_BxLxHxDh, positions_BxL, theta):
    """Rotary position embedding, HF's rotate_half convention, computed in float32:
    x * cos + rotate_half(x) * sin with angles positions * theta ** -(arange(0, Dh, 2) / Dh),
    each frequency used twice (cat(freqs, freqs)). Returns x's dtype."""
    chex.assert_rank(x_BxLxHxDh, 4)
    dh = x_BxLxHxDh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    freqs_BxLxF = positions_BxL.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([freqs_BxLxF, freqs_BxLxF], axis=-1)[:, :, None, :]  # [B, L, 1, Dh]
    x = x_BxLxHxDh.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_BxLxHxDh.dtype)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale in float32 (`offset`: * (1 + scale), Gemma),
    cast to `dtype`. Param `scale` [D] ("norm",), initialised to 1 (offset: 0)."""

    eps: float = 1e-6
    offset: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD):
        init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
        scale = self.param("scale", names(init, "norm"), (x_BxLxD.shape[-1],), self.param_dtype)
        x = x_BxLxD.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        s = jnp.asarray(scale, jnp.float32)
        return (y * ((1.0 + s) if self.offset else s).reshape((1,) * (x.ndim - 1) + (-1,))).astype(self.dtype)


class Attention(nn.Module):
    """The projections of one attention: q [D, H, Dh], k / v [D, K, Dh] (+ biases [.., Dh] if
    spec.qkv_bias), o [H, Dh, D]; `cache` keeps the KV cache (decode=True). The layer runs
    RoPE and the attention itself, so two Attentions can share it (the visual expert).
    `lora_rank` > 0: adapters `{q,k,v,o}_lora/{a, b}` beside the kernels (mmjax/models/lora.py)."""

    spec: LMSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def setup(self):
        s, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lora = lora_factory(self.lora_rank, self.lora_alpha, **kw)
        proj = lambda heads: nn.DenseGeneral(
            (heads, s.head_dim),
            use_bias=s.qkv_bias,
            **kw,
            **dense_init("embed", "heads", "kv", bias_names=("heads", "kv")),
        )
        self.q, self.k, self.v = proj(s.heads), proj(s.kv_heads), proj(s.kv_heads)
        self.o = nn.DenseGeneral(s.width, axis=(-2, -1), use_bias=False, **kw, **dense_init("heads", "kv", "embed"))
        qkv_lora = lambda name, heads: lora(name, ("embed",), (heads, s.head_dim), ("heads", "kv"))
        self.q_lora, self.k_lora = qkv_lora("q_lora", s.heads), qkv_lora("k_lora", s.kv_heads)
        self.v_lora = qkv_lora("v_lora", s.kv_heads)
        self.o_lora = lora("o_lora", ("heads", "kv"), (s.width,), ("embed",))

    def qkv(self, x_BxLxD):
        """-> q [B, L, H, Dh], k, v [B, L, K, Dh] (before RoPE)."""
        q = with_lora(self.q(x_BxLxD), self.q_lora, x_BxLxD)
        k = with_lora(self.k(x_BxLxD), self.k_lora, x_BxLxD)
        return q, k, with_lora(self.v(x_BxLxD), self.v_lora, x_BxLxD)

    def out(self, y_BxLxHxDh):
        return with_lora(self.o(y_BxLxHxDh), self.o_lora, y_BxLxHxDh)

    @nn.compact
    def cache(self, k_BxLxKxDh, v_BxLxKxDh):
        """decode=True: the first call creates `cache/{key,value}` [B, C, K, Dh] (zeros, C = L)
        and `cache/index` and returns k, v as given; later calls write their n tokens at
        index..index+n-1, advance index by n and return the whole cache [B, C, K, Dh]."""
        stepping = self.has_variable("cache", "key")
        ck = self.variable("cache", "key", jnp.zeros, k_BxLxKxDh.shape, k_BxLxKxDh.dtype)
        cv = self.variable("cache", "value", jnp.zeros, v_BxLxKxDh.shape, v_BxLxKxDh.dtype)
        ci = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not stepping:
            return k_BxLxKxDh, v_BxLxKxDh
        i = ci.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k_BxLxKxDh.astype(ck.value.dtype), (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v_BxLxKxDh.astype(cv.value.dtype), (0, i, 0, 0))
        ci.value = i + k_BxLxKxDh.shape[1]
        return ck.value, cv.value


class GatedMlp(nn.Module):
    """down(act(gate(x)) * up(x)): gate, up [D, F], down [F, D], no biases; `lora_rank` > 0:
    adapters `{gate,up,down}_lora/{a, b}` beside them (mmjax/models/lora.py)."""

    spec: LMSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def _dense(self, name, features, in_name, out_name, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.Dense(features, use_bias=False, name=name, **kw, **dense_init(in_name, out_name))(x)
        lora = lora_factory(self.lora_rank, self.lora_alpha, **kw)
        return with_lora(y, lora(f"{name}_lora", (in_name,), (features,), (out_name,)), x)

    @nn.compact
    def __call__(self, x_BxLxD):
        s = self.spec
        gate = self._dense("gate", s.mlp_dim, "embed", "mlp", x_BxLxD)
        up = self._dense("up", s.mlp_dim, "embed", "mlp", x_BxLxD)
        h_BxLxF = constrain(LM_ACTIVATIONS[s.act](gate) * up, ("batch", "length", "mlp"))
        return self._dense("down", s.width, "mlp", "embed", h_BxLxF)


class LMLayer(nn.Module):
    """x + attn(attn_norm(x)); x + mlp(mlp_norm(x)). `__call__(x [B, L, D], positions [B, L],
    mask [B, 1, L, Lk], expert [B, L] | None) -> [B, L, D]` (see the module docstring)."""

    spec: LMSpec
    attention: str = "xla"
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def _kw(self):
        """The projections' module kwargs (dtypes, LoRA)."""
        return dict(
            dtype=self.dtype, param_dtype=self.param_dtype, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha
        )

    def _attend(self, h_BxLxD, positions_BxL, mask, expert_BxL):
        s, kw = self.spec, self._kw()
        attn = Attention(s, name="attn", **kw)
        q, k, v = attn.qkv(h_BxLxD)
        img = Attention(s, name="attn_img", **kw) if s.visual_expert else None
        if img is not None:
            sel = expert_BxL[:, :, None, None]
            q, k, v = (jnp.where(sel, a, b) for a, b in zip(img.qkv(h_BxLxD), (q, k, v)))
        q = rope(q, positions_BxL, s.rope_theta)
        k = rope(k, positions_BxL, s.rope_theta)
        q, k, v = (constrain(t, ("batch", "length", "heads", "kv")) for t in (q, k, v))
        if self.decode:
            k, v = attn.cache(k, v)
        # K key/value heads against H query heads: jax's attention groups query head h with
        # kv head h // (H / K), as HF's repeat_kv does.
        y_BxLxHxDh = attend(q, k, v, mask, self.attention)
        out = attn.out(y_BxLxHxDh)
        if img is not None:
            out = jnp.where(expert_BxL[:, :, None], img.out(y_BxLxHxDh), out)
        return out

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, mask, expert_BxL=None):
        chex.assert_rank(x_BxLxD, 3)
        s, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if s.visual_expert:
            expert_BxL = jnp.zeros(x_BxLxD.shape[:2], bool) if expert_BxL is None else expert_BxL.astype(bool)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        h = RMSNorm(s.norm_eps, s.norm_offset, name="attn_norm", **kw)(x_BxLxD)
        x_BxLxD = x_BxLxD + self._attend(h, positions_BxL, mask, expert_BxL)
        h = RMSNorm(s.norm_eps, s.norm_offset, name="mlp_norm", **kw)(x_BxLxD)
        y = GatedMlp(s, name="mlp", **self._kw())(h)
        if s.visual_expert:
            y = jnp.where(expert_BxL[:, :, None], GatedMlp(s, name="mlp_img", **self._kw())(h), y)
        return x_BxLxD + y


class ScanLMLayer(LMLayer):
    """An LMLayer as an `nn.scan` body: `(x, positions, mask, expert) -> (x', None)`."""

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, mask, expert_BxL=None):
        return super().__call__(x_BxLxD, positions_BxL, mask, expert_BxL), None


class LMHead(nn.Module):
    """The untied output projection: kernel [D, V] ("embed", "vocab"), float32 logits."""

    vocab_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h_BxLxD):
        init = names(nn.initializers.lecun_normal(), "embed", "vocab")
        kernel = self.param("kernel", init, (h_BxLxD.shape[-1], self.vocab_size), self.param_dtype)
        return jnp.einsum(
            "bld,dv->blv", h_BxLxD.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32
        )


class DecoderLM(nn.Module):
    """The language model (see the module docstring). `scan=True` runs the layers as one
    nn.scan, params stacked on a leading "layers" axis under `layers/` (`stack_layers` /
    `unstack_layers` convert); `remat` is a transformer.REMAT_POLICIES name. `lora_rank` > 0
    adds LoRA adapters (scale lora_alpha / lora_rank) to every layer's projections
    (mmjax/models/lora.py: merge_lora, split_lora, lora_freeze_regex)."""

    spec: LMSpec
    remat: str = "none"
    scan: bool = False
    attention: str = "xla"
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def setup(self):
        s, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embed = nn.Embed(
            s.vocab_size,
            s.width,
            embedding_init=names(nn.initializers.normal(0.02), "vocab", "embed"),
            name="embed",
            **kw,
        )
        lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
        layer_kw = dict(attention=self.attention, decode=self.decode, **lora, **kw)
        if self.scan:
            self.layers = nn.scan(
                maybe_remat(ScanLMLayer, self.remat, prevent_cse=False),
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=s.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(s, **layer_kw, name="layers")
        else:
            cls = maybe_remat(LMLayer, self.remat)
            self.blocks = [cls(s, **layer_kw, name=f"layer{i:02d}") for i in range(s.depth)]
        self.final_norm = RMSNorm(s.norm_eps, s.norm_offset, **kw)
        if not s.tie_embeddings:
            self.lm_head = LMHead(s.vocab_size, **kw)

    def embed(self, ids_BxL):
        """-> [B, L, D] in the compute dtype (Gemma: times sqrt(D), the factor cast first)."""
        chex.assert_rank(ids_BxL, 2)
        x = self.token_embed(ids_BxL)
        if self.spec.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.spec.width), self.dtype).astype(x.dtype)
        return x

    def __call__(self, x_BxLxD, positions_BxL, mask, expert_BxL=None):
        chex.assert_rank(x_BxLxD, 3)
        chex.assert_rank(positions_BxL, 2)
        x = x_BxLxD.astype(self.dtype)
        if self.scan:
            x, _ = self.layers(x, positions_BxL, mask, expert_BxL)
        for block in [] if self.scan else self.blocks:
            x = block(x, positions_BxL, mask, expert_BxL)
        return self.final_norm(x)

    def logits(self, h_BxLxD):
        """-> float32 [B, L, V]: operands in the compute dtype, float32 accumulation."""
        if self.spec.tie_embeddings:
            table_VxD = jnp.asarray(self.token_embed.embedding, self.dtype)
            out = jnp.einsum("bld,vd->blv", h_BxLxD.astype(self.dtype), table_VxD, preferred_element_type=jnp.float32)
        else:
            out = self.lm_head(h_BxLxD)
        return constrain(out, ("batch", "length", "vocab"))

    def forward_ids(self, ids_BxL, positions_BxL, mask, expert_BxL=None):
        """ids [B, L] -> logits float32 [B, L, V]; initialising through it creates every param."""
        return self.logits(self(self.embed(ids_BxL), positions_BxL, mask, expert_BxL))


def init_params(spec: LMSpec, rng, boxed: bool = False, **module_kw):
    """Fresh DecoderLM(spec, **module_kw) params, every one (embed, layers, lm_head) created
    through `forward_ids` on a [1, 2] input. `boxed=True` keeps the logical-axis boxes
    (nn.LogicallyPartitioned) that sharding reads; otherwise plain arrays."""
    lm = DecoderLM(spec, **module_kw)
    ids = jnp.zeros((1, 2), jnp.int32)
    valid = jnp.ones((1, 2), bool)
    params = lm.init(rng, ids, jnp.arange(2)[None], lm_mask(valid), jnp.zeros((1, 2), bool), method=lm.forward_ids)
    return params["params"] if boxed else nn.unbox(params["params"])


def _is_layer_key(key: str) -> bool:
    return key.startswith("layer") and key[5:].isdigit()


def stack_layers(params, depth: int):
    """Unrolled DecoderLM params ({'layer00': ..., 'embed': ...}) -> the scan=True layout
    ({'layers': every layer leaf stacked on a leading axis, 'embed': ...})."""
    out = {k: v for k, v in params.items() if not _is_layer_key(k)}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layer{i:02d}"] for i in range(depth)])
    return out


def unstack_layers(params):
    """The scan=True layout -> the unrolled one (inverse of `stack_layers`)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    depth = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(depth):
        out[f"layer{i:02d}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out
