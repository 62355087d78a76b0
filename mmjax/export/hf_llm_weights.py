"""The weight mapping between a transformers Llama / Qwen2 / Gemma causal-LM state dict and
mmjax `DecoderLM` params (both directions), read against an `LMSpec`; and a lazy,
memory-mapped reader of (sharded) safetensors. See `mmjax.export.hf_llm`.

HF name (i: layer)                                  mmjax param (unrolled)          mapping
model.embed_tokens.weight [V, D]                    embed/embedding [V, D]          as is
model.layers.i.input_layernorm.weight [D]           layer0i/attn_norm/scale         as is (Gemma: 1 + w both sides)
model.layers.i.self_attn.q_proj.weight [H*Dh, D]    layer0i/attn/q/kernel [D,H,Dh]  W.T.reshape(D, H, Dh)
model.layers.i.self_attn.{k,v}_proj.weight          layer0i/attn/{k,v}/kernel       W.T.reshape(D, K, Dh)
model.layers.i.self_attn.{q,k,v}_proj.bias          layer0i/attn/{q,k,v}/bias       b.reshape(H or K, Dh)
model.layers.i.self_attn.o_proj.weight [D, H*Dh]    layer0i/attn/o/kernel [H,Dh,D]  W.T.reshape(H, Dh, D)
model.layers.i.post_attention_layernorm.weight      layer0i/mlp_norm/scale          as is
model.layers.i.mlp.{gate,up,down}_proj.weight       layer0i/mlp/{gate,up,down}/kernel  W.T
model.norm.weight [D]                               final_norm/scale                as is
lm_head.weight [V, D]                               lm_head/kernel [D, V]           W.T (absent when tied)

Rotary `inv_freq` buffers are dropped; a tied checkpoint's redundant lm_head.weight is
accepted when it equals the embedding, and an all-zero o_proj.bias (Llama / Gemma
attention_bias) is accepted: mmjax has no output-projection bias. Anything else left
over, missing or misshapen is a ValueError naming it. numpy + safetensors only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

INV_FREQ = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
O_BIAS = re.compile(r"^model\.layers\.\d+\.self_attn\.o_proj\.bias$")
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"


# ------------------------------------------------------------------ lazy safetensors


class LazyStateDict(Mapping):
    """{HF name: float32 numpy}, each tensor read (memory-mapped) only when indexed.

    Over one model.safetensors or the shards model.safetensors.index.json lists; one
    `safe_open(framework="numpy")` handle per shard stays open. bfloat16 tensors (which
    numpy cannot hold) are memory-mapped as uint16 from the file's header offsets and
    widened to float32. `shape(name)` reads only the header."""

    def __init__(self, src_dir: str):
        from safetensors import safe_open

        single, index = os.path.join(src_dir, SAFETENSORS), os.path.join(src_dir, INDEX)
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            with open(index) as f:
                files = [os.path.join(src_dir, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        else:
            raise FileNotFoundError(
                f"{src_dir}: no {SAFETENSORS} or {INDEX}: a transformers causal-LM directory saved with "
                "safetensors is needed (re-save a pytorch_model.bin one with safe_serialization=True)"
            )
        self._where, self._headers, self._handles = {}, {}, {}
        for path in files:
            self._handles[path] = safe_open(path, framework="numpy")
            self._headers[path] = _header(path)
            for k in self._handles[path].keys():
                self._where[k] = path

    def __getitem__(self, key):
        path = self._where[key]
        entry = self._headers[path][1][key]
        if entry["dtype"] == "BF16":
            start, end = entry["data_offsets"]
            raw = np.memmap(path, np.uint16, "r", offset=self._headers[path][0] + start, shape=(end - start) // 2)
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
        return np.asarray(self._handles[path].get_tensor(key), np.float32)

    def shape(self, key) -> tuple:
        return tuple(self._headers[self._where[key]][1][key]["shape"])

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def _header(path):
    """(byte offset of the data, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _shape(sd, key) -> tuple:
    return sd.shape(key) if isinstance(sd, LazyStateDict) else tuple(np.shape(sd[key]))


# ------------------------------------------------------------------ HF -> mmjax


def hf_shapes(spec) -> dict:
    """{transformers state-dict name: shape} of the causal LM `spec` describes (no o bias)."""
    d, h, k, dh, f, v = spec.width, spec.heads, spec.kv_heads, spec.head_dim, spec.mlp_dim, spec.vocab_size
    shapes = {EMBED: (v, d), NORM: (d,)}
    if not spec.tie_embeddings:
        shapes[LM_HEAD] = (v, d)
    for i in range(spec.depth):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
        for n, heads in (("q", h), ("k", k), ("v", k)):
            shapes[p + f"self_attn.{n}_proj.weight"] = (heads * dh, d)
            if spec.qkv_bias:
                shapes[p + f"self_attn.{n}_proj.bias"] = (heads * dh,)
        shapes[p + "self_attn.o_proj.weight"] = (d, h * dh)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    return shapes


def _listed(names) -> str:
    names = sorted(names)
    return f"{names[:8]}" + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")


def check_state_dict(sd: Mapping, spec) -> list:
    """The tolerated extra names of `sd` (inv_freq, a tied model's redundant lm_head, o_proj
    biases) after raising ValueError naming missing, unexpected or misshapen weights."""
    want = hf_shapes(spec)
    tolerated = [k for k in sd if INV_FREQ.search(k) or O_BIAS.match(k) or (k == LM_HEAD and spec.tie_embeddings)]
    missing = set(want) - set(sd)
    extra = set(sd) - set(want) - set(tolerated)
    if missing:
        raise ValueError(f"weights missing for this config.json: {_listed(missing)}")
    if extra:
        raise ValueError(
            f"weights with no place in mmjax's DecoderLM: {_listed(extra)} (biases, heads or layers this converter "
            "does not map: is config.json the checkpoint's own?)"
        )
    for k, shape in want.items():
        if _shape(sd, k) != tuple(shape):
            raise ValueError(f"weight {k} has shape {_shape(sd, k)} but config.json implies {tuple(shape)}")
    return tolerated


def _set(tree, path, value):
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _c(x):
    return np.ascontiguousarray(x, np.float32)


def _check_tolerated(sd, tolerated):
    """ValueError unless a tied lm_head equals the embedding and every o_proj bias is 0."""
    for k in tolerated:
        if k == LM_HEAD and not np.array_equal(sd[k], sd[EMBED]):
            raise ValueError(
                "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight: "
                "set tie_word_embeddings false in config.json (transformers would use the embedding)"
            )
        if O_BIAS.match(k) and np.any(sd[k] != 0):
            raise ValueError(f"{k} is not zero: mmjax's DecoderLM has no bias on the attention output projection")


def params_from_state_dict(sd: Mapping, spec) -> dict:
    """transformers causal-LM state dict ({name: numpy}, or a `LazyStateDict`) -> mmjax
    DecoderLM params (nested dict of float32 numpy, the unrolled `layer00..` layout).
    Each tensor is read once and converted on its own (no second full copy)."""
    tolerated = check_state_dict(sd, spec)
    _check_tolerated(sd, tolerated)
    d, h, k, dh = spec.width, spec.heads, spec.kv_heads, spec.head_dim
    out: dict = {}
    _set(out, "embed/embedding", _c(sd[EMBED]))
    for i in range(spec.depth):
        p, m = f"model.layers.{i}.", f"layer{i:02d}/"
        _set(out, m + "attn_norm/scale", _c(sd[p + "input_layernorm.weight"]))
        _set(out, m + "mlp_norm/scale", _c(sd[p + "post_attention_layernorm.weight"]))
        for n, heads in (("q", h), ("k", k), ("v", k)):
            _set(out, m + f"attn/{n}/kernel", _c(sd[p + f"self_attn.{n}_proj.weight"].T.reshape(d, heads, dh)))
            if spec.qkv_bias:
                _set(out, m + f"attn/{n}/bias", _c(sd[p + f"self_attn.{n}_proj.bias"].reshape(heads, dh)))
        _set(out, m + "attn/o/kernel", _c(sd[p + "self_attn.o_proj.weight"].T.reshape(h, dh, d)))
        for n in ("gate", "up", "down"):
            _set(out, m + f"mlp/{n}/kernel", _c(sd[p + f"mlp.{n}_proj.weight"].T))
    _set(out, "final_norm/scale", _c(sd[NORM]))
    if not spec.tie_embeddings:
        _set(out, "lm_head/kernel", _c(sd[LM_HEAD].T))
    return out


# ------------------------------------------------------------------ mmjax -> HF


def flat_params(params) -> dict:
    """{'a/b/c': numpy} of DecoderLM params (nested mappings); a scanned `layers` subtree
    (leaves stacked on a leading axis) is unstacked into `layer00`, `layer01`, ..."""
    out = {}
    for name, a in _flat_tree(params).items():
        if name.startswith("layers/"):
            for i in range(a.shape[0]):
                out[f"layer{i:02d}/{name[len('layers/') :]}"] = a[i]
        else:
            out[name] = a
    return out


def _flat_tree(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_tree(v, prefix + str(k) + "/"))
        else:
            out[prefix + str(k)] = np.asarray(v)
    return out


def _layer_pairs(spec) -> list:
    """[(mmjax name in a layer, HF name in a layer, params -> HF array)] of one layer."""
    d, h, k, dh = spec.width, spec.heads, spec.kv_heads, spec.head_dim
    pairs = [
        ("attn_norm/scale", "input_layernorm.weight", lambda a: a),
        ("mlp_norm/scale", "post_attention_layernorm.weight", lambda a: a),
    ]
    for n, heads in (("q", h), ("k", k), ("v", k)):
        pairs.append((f"attn/{n}/kernel", f"self_attn.{n}_proj.weight", lambda a, c=heads * dh: a.reshape(d, c).T))
        if spec.qkv_bias:
            pairs.append((f"attn/{n}/bias", f"self_attn.{n}_proj.bias", lambda a: a.reshape(-1)))
    pairs.append(("attn/o/kernel", "self_attn.o_proj.weight", lambda a: a.reshape(h * dh, d).T))
    pairs += [(f"mlp/{n}/kernel", f"mlp.{n}_proj.weight", np.transpose) for n in ("gate", "up", "down")]
    return pairs


def state_dict_from_params(params, spec) -> dict:
    """mmjax DecoderLM params (unrolled or scanned layout; numpy or jax, any float dtype) ->
    transformers causal-LM state dict {name: float32 numpy}. ValueError names params with no
    place in transformers' model (a visual expert, say), missing ones, and any shape that
    disagrees with spec."""
    p = flat_params(params)
    pairs = [("embed/embedding", EMBED, lambda a: a), ("final_norm/scale", NORM, lambda a: a)]
    if not spec.tie_embeddings:
        pairs.append(("lm_head/kernel", LM_HEAD, np.transpose))
    for i in range(spec.depth):
        pairs += [(f"layer{i:02d}/{mm}", f"model.layers.{i}.{name}", fn) for mm, name, fn in _layer_pairs(spec)]
    missing = [mm for mm, _, _ in pairs if mm not in p]
    if missing:
        raise ValueError(f"params missing for this LMSpec: {_listed(missing)}")
    unused = set(p) - {mm for mm, _, _ in pairs}
    if unused:
        raise ValueError(f"params with no place in a transformers causal LM: {_listed(unused)}")
    out = {}
    for mm, name, fn in pairs:
        try:
            out[name] = _c(fn(p[mm]))
        except ValueError as e:  # a reshape that does not fit
            raise ValueError(f"param {mm} has shape {p[mm].shape}, which does not fit the LMSpec: {e}") from None
    check_state_dict(out, spec)
    return out
