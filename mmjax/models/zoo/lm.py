"""A decoder-only language model (Llama / Qwen2 / Gemma layouts, mmjax/models/llm.py)
trained by next-token prediction on text: the LLM that the connector families
(LLaVA, CogVLM) put image tokens into, pretrained here on built-in text so that
demos and tests have one without a download, or imported from a transformers
checkpoint (`mmjax convert --from hf-llama|hf-qwen2|hf-gemma`).

Shape letters: B batch, L text length, D width, V vocabulary.

`model.lm` is a dict of the LM's shape and options (`LM_KEYS`; the converter writes
the imported checkpoint's): width, depth, heads, kv_heads, head_dim (None: width //
heads), mlp_dim, act ('silu': SwiGLU; 'gelu_tanh': GeGLU), norm_eps, norm_offset
(Gemma's RMSNorm (1 + w)), rope_theta, tie_embeddings, embed_scale (Gemma's
sqrt(width)), qkv_bias (Qwen2). The vocabulary is the tokenizer's
(`model.vocab_size`, derived).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models import generate as generate_lib
from mmjax.models.llm import DecoderLM, LMSpec, lm_mask
from mmjax.models.zoo.contract import Family, register
from mmjax.models.zoo.schema import DTYPES, ModelConfig, key
from mmjax.objectives import identity, lm_loss

# model.lm: the keys and the tiny default (the recipe configs/lm.py trains on built-in text).
LM_KEYS = dict(
    width=128,
    depth=4,
    heads=4,
    kv_heads=2,
    head_dim=None,
    mlp_dim=352,
    act="silu",
    norm_eps=1e-6,
    norm_offset=False,
    rope_theta=10000.0,
    tie_embeddings=True,
    embed_scale=False,
    qkv_bias=False,
)
ACTS = ("silu", "gelu_tanh")


def lm_spec(lm: dict, vocab_size: int, *, visual_expert: bool = False) -> LMSpec:
    """`model.lm` (LM_KEYS, defaults filled in) + the vocabulary -> an LMSpec;
    ConfigError naming a key that is unknown or inconsistent."""
    lm = dict(lm or {})
    unknown = sorted(set(lm) - set(LM_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key 'model.lm.{unknown[0]}'; valid keys: {', '.join(LM_KEYS)}")
    v = {**LM_KEYS, **{k: x for k, x in lm.items() if x is not None}}
    if v["act"] not in ACTS:
        raise ConfigError(f"bad value for config key 'model.lm.act': {v['act']!r}; valid choices: {', '.join(ACTS)}")
    ints = ("width", "depth", "heads", "kv_heads", "mlp_dim")
    if any(not isinstance(v[k], int | np.integer) or v[k] < 1 for k in ints):
        raise ConfigError(f"model.lm: {', '.join(ints)} must be positive integers, got {[v[k] for k in ints]}")
    if v["heads"] % v["kv_heads"]:
        raise ConfigError(f"model.lm.heads={v['heads']} is not a multiple of model.lm.kv_heads={v['kv_heads']}")
    head_dim = v["head_dim"] or v["width"] // v["heads"]
    if not v["head_dim"] and v["width"] % v["heads"]:
        raise ConfigError(f"model.lm.width={v['width']} is not a multiple of heads={v['heads']}: set model.lm.head_dim")
    return LMSpec(
        vocab_size=int(vocab_size),
        width=int(v["width"]),
        depth=int(v["depth"]),
        heads=int(v["heads"]),
        kv_heads=int(v["kv_heads"]),
        head_dim=int(head_dim),
        mlp_dim=int(v["mlp_dim"]),
        act=v["act"],
        norm_eps=float(v["norm_eps"]),
        norm_offset=bool(v["norm_offset"]),
        rope_theta=float(v["rope_theta"]),
        tie_embeddings=bool(v["tie_embeddings"]),
        embed_scale=bool(v["embed_scale"]),
        qkv_bias=bool(v["qkv_bias"]),
        visual_expert=bool(visual_expert),
    )


def spec_dict(spec: LMSpec) -> dict:
    """An LMSpec -> `model.lm` (every key of LM_KEYS; the vocabulary and the expert flag left out)."""
    return {k: getattr(spec, k) for k in LM_KEYS}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LmKeys(ModelConfig):
    """The keys of every family with a decoder LM: model.lm (LM_KEYS), scan_layers,
    dtype, param_dtype, remat, attention, label_smoothing."""

    lm: dict = key(dict(LM_KEYS))
    scan_layers: bool = key(False)
    dtype: str = key("float32", choices=tuple(DTYPES))
    param_dtype: str = key("float32", choices=tuple(DTYPES))
    remat: object = key(False, inert=(False, "none"))
    attention: str = key("xla")
    label_smoothing: float = key(0.0)

    def check(self):
        super().check()
        lm_spec(self.lm, self.vocab_size or 8)

    def module_kw(self) -> dict:
        from mmjax.models.transformer import remat_mode

        return dict(
            remat=remat_mode(self.remat),
            scan=bool(self.scan_layers),
            attention=self.attention,
            dtype=DTYPES[self.dtype],
            param_dtype=DTYPES[self.param_dtype],
        )


def lm_flops(spec: LMSpec, length: int) -> int:
    """Forward matmul FLOPs of the LM over `length` tokens (mmjax/flops.py's
    accounting): q and o 2*L*D*H*Dh each, k and v 2*L*D*K*Dh each, q k^T and the
    weighted values 2*2*L^2*H*Dh, the gated MLP 3 * 2*L*D*F, the output head 2*L*D*V."""
    s, n = spec, int(length)
    attn = 2 * n * s.width * s.head_dim * (2 * s.heads + 2 * s.kv_heads) + 2 * 2 * n * n * s.heads * s.head_dim
    mlp = 3 * 2 * n * s.width * s.mlp_dim
    return s.depth * (attn + mlp) + 2 * n * s.width * s.vocab_size


def text_valid(ids_BxL, pad_id: int, eos_id: int | None):
    """The real tokens of right-padded rows: every non-pad token, and, where the
    tokenizer's pad is its eos (an LLM tokenizer without a pad token), the first pad
    of each row too: that one is the text's eos, a token to attend to and predict."""
    valid = ids_BxL != pad_id
    if eos_id is not None and eos_id == pad_id:
        valid = valid | (jnp.cumsum(~valid, axis=1) == 1) & ~valid
    return valid


def text_inputs(valid_BxL):
    """Real tokens [B, L] (right-padded) -> (positions [B, L]: 0..L-1, causal mask
    [B, 1, L, L] with the padding keys masked)."""
    b, length = valid_BxL.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (b, length))
    return positions, lm_mask(valid_BxL)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LmConfig(LmKeys):
    """The `lm` family: LmKeys; text_len is the training sequence length (data.text_len)."""


@register("lm")
class LmFamily(Family):
    """Next-token prediction on the batch's text (keys: LmConfig); `token_nll` scores
    held-out text (the perplexity eval), `generate` continues prompts."""

    Config = LmConfig
    capabilities = frozenset({"lm", "generate"})
    batch_keys = ("text", "valid")  # valid [B, L]: conversation batches (data.chat) mark their tokens

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c = model_config, c
        self.image_size, self.text_len, self.num_frames = c.image_size, c.text_len, 0
        self.spec = lm_spec(c.lm, c.need("vocab_size"))
        self.pad_id = c.tokens.need("pad", "the LM's padding")
        self.eos_id = c.tokens.eos
        self.model = DecoderLM(self.spec, **c.module_kw())

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        ids = jnp.zeros(tuple(text_shape or (1, self.text_len)), jnp.int32)
        positions, mask = text_inputs(jnp.ones(ids.shape, bool))
        params = self.model.init(rng, ids, positions, mask, method=DecoderLM.forward_ids)["params"]
        return params if boxed else nn.unbox(params)

    def image_shape(self, batch: int = 1) -> tuple:
        return (batch, 1, 1, 3)  # no image input (bench's synthetic batches carry a tiny one, unread)

    def valid(self, ids_BxL, valid_BxL=None):
        """The rows' real tokens: `valid_BxL` where the batch marks them (conversations),
        else `text_valid` (caption batches)."""
        if valid_BxL is not None and valid_BxL.ndim == 2:
            return valid_BxL.astype(bool)
        return text_valid(ids_BxL, self.pad_id, self.eos_id)

    def text_logits(self, params, ids_BxL, valid_BxL=None):
        positions, mask = text_inputs(self.valid(ids_BxL, valid_BxL))
        return self.model.apply({"params": params}, ids_BxL, positions, mask, method=DecoderLM.forward_ids)

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, {}): next-token cross entropy over the real tokens."""
        del rng, teacher, queues, step
        ids, valid = batch["text"], self.valid(batch["text"], batch.get("valid"))
        loss, metrics = lm_loss(
            self.text_logits(params, ids, valid),
            ids,
            label_smoothing=self.c.label_smoothing,
            pad_id=self.pad_id,
            gather=gather,
            target_mask_BxL=valid,
        )
        return loss, {**metrics, "loss": loss}, {}

    def token_nll(self, params, ids_BxL, valid_BxL=None):
        """-> (summed negative log-likelihood [B], target tokens [B]) of each row's real
        tokens after the first: the perplexity eval's terms."""
        valid = self.valid(ids_BxL, valid_BxL)
        logp = jax.nn.log_softmax(self.text_logits(params, ids_BxL, valid)[:, :-1].astype(jnp.float32), axis=-1)
        targets = ids_BxL[:, 1:]
        weight = valid[:, 1:].astype(jnp.float32)
        nll = -jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[:, :, 0]
        return jnp.sum(nll * weight, axis=1), jnp.sum(weight, axis=1)

    def flops(self, batch: int) -> dict:
        """The LM over text_len tokens (`lm_flops`)."""
        del batch
        return {"student": lm_flops(self.spec, self.text_len), "teacher": 0}

    def generate(self, params, prompt: dict, *, max_new_tokens: int, **opts):
        """prompt {'ids' [B, P] int32, 'valid' [B, P] bool}, left-padded -> (new tokens
        [B, N] (pad after eos), scores [B]); opts: generate_lib.generate's (method,
        temperature, top_p, rng, beams, length_penalty, use_cache)."""
        x = self.model.apply({"params": params}, prompt["ids"], method=DecoderLM.embed)
        return generate_lib.generate(
            self.model,
            params,
            x,
            prompt["valid"],
            max_new_tokens=int(max_new_tokens),
            eos_ids=self.stop_ids(),
            pad_id=self.pad_id,
            **opts,
        )

    def stop_ids(self) -> tuple:
        """The token ids that end a generated text (the tokenizer's eos)."""
        return () if self.eos_id is None else (int(self.eos_id),)
