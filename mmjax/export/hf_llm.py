"""transformers causal LMs (Llama, Qwen2, Gemma) <-> mmjax `DecoderLM`.

    from mmjax.export import hf_llm
    spec, params, info = hf_llm.read_hf_llm(DIR, "hf-llama")   # config.json + (sharded) model.safetensors
    lm = DecoderLM(spec)                                         # lm.apply({"params": params}, ...)
    hf_llm.save_hf_llm(params, spec, "hf-llama", OUT, token_ids, info["max_position_embeddings"],
                       tokenizer_path=info["tokenizer"])         # LlamaForCausalLM.from_pretrained(OUT)

Sources (`SOURCES`, the config's model_type): hf-llama (LlamaForCausalLM: SwiGLU, no
biases), hf-qwen2 (Qwen2ForCausalLM: q/k/v biases), hf-gemma (GemmaForCausalLM: GeGLU with
gelu_pytorch_tanh, RMSNorm (1 + w), embeddings * sqrt(D), tied). config.json -> LMSpec:

  vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads
  (default: heads), head_dim (default: hidden_size // heads), intermediate_size,
  rms_norm_eps -> norm_eps, rope_theta (top level, or rope_parameters.rope_theta in
  transformers 5) -> rope_theta, tie_word_embeddings (default: Gemma true, else false).

What mmjax's DecoderLM cannot express is a ValueError naming it: another model_type
(gemma2, mistral, ...), RoPE scaling (rope_scaling, or a rope_parameters.rope_type other
than 'default'), partial rotary, Qwen2's sliding window, Llama's mlp_bias, an activation
other than silu (Llama, Qwen2) / the tanh GELU (Gemma). Llama / Gemma attention_bias puts
biases on q, k, v *and* o_proj: it maps to qkv_bias when every o_proj.bias is zero.
On export a Qwen2 without biases gets zero q/k/v biases, a Llama / Gemma with qkv_bias
zero o_proj biases (transformers' classes need them), so the numbers stay the same.

Weights are read lazily from memory-mapped safetensors (shards too; bfloat16 widened to
float32 tensor by tensor): `mmjax.export.hf_llm_weights` holds the mapping and reader.
numpy + safetensors only (no torch).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from mmjax.export.hf_llm_weights import (  # noqa: F401 - re-exported
    EMBED,
    LazyStateDict,
    hf_shapes,
    params_from_state_dict,
    state_dict_from_params,
)

SOURCES = {"hf-llama": "llama", "hf-qwen2": "qwen2", "hf-gemma": "gemma"}
ARCHITECTURES = {"hf-llama": "LlamaForCausalLM", "hf-qwen2": "Qwen2ForCausalLM", "hf-gemma": "GemmaForCausalLM"}
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu")  # Gemma's legacy "gelu" means the tanh one
CONFIG_FILE, GENERATION_FILE, WEIGHTS_FILE = "config.json", "generation_config.json", "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; supported: {', '.join(SOURCES)}")
    return SOURCES[source]


def _rope_theta(cfg: dict) -> float:
    """rope_theta of a config.json (transformers 4: top level + rope_scaling; 5: rope_parameters);
    ValueError for any RoPE scaling or partial rotary."""
    if cfg.get("rope_scaling") is not None:
        raise ValueError(
            f"rope_scaling={cfg['rope_scaling']!r}: mmjax's DecoderLM has plain RoPE only (no scaled / extended RoPE)"
        )
    rp = cfg.get("rope_parameters") or {}
    if rp.get("rope_type", rp.get("type", "default")) != "default":
        raise ValueError(
            f"rope_parameters={rp!r} (rope scaling, rope_type {rp.get('rope_type', rp.get('type'))!r}): "
            "mmjax's DecoderLM has plain RoPE only (rope_type 'default')"
        )
    partial = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial}: mmjax's DecoderLM rotates the whole head")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _act(cfg: dict, model_type: str) -> str:
    if model_type == "gemma":
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in TANH_GELU:
            raise ValueError(f"Gemma hidden_act {act!r}: mmjax's Gemma layout is GeGLU with gelu_pytorch_tanh")
        return "gelu_tanh"
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r}: mmjax's Llama / Qwen2 layout is SwiGLU (silu)")
    return "silu"


def _qkv_bias(cfg: dict, model_type: str) -> bool:
    if model_type == "qwen2":
        if cfg.get("use_sliding_window"):
            raise ValueError(
                "use_sliding_window is true: mmjax's DecoderLM attends over the full context (no sliding window)"
            )
        return True
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias is true: mmjax's DecoderLM has no MLP biases")
    # attention_bias also biases o_proj: read only when every o_proj.bias is 0 (params_from_state_dict).
    return bool(cfg.get("attention_bias", False))


def spec_from_hf_config(cfg: dict, source: str):
    """config.json (dict) of a transformers Llama / Qwen2 / Gemma causal LM -> LMSpec.

    ValueError when cfg's model_type is not the source's, or for a setting DecoderLM cannot
    express (see the module docstring)."""
    from mmjax.models.llm import LMSpec

    model_type = _check_source(source)
    if cfg.get("model_type") != model_type:
        raise ValueError(
            f"config.json has model_type {cfg.get('model_type')!r} but {source} reads {model_type!r}; "
            f"supported: {', '.join(f'{s} ({t})' for s, t in SOURCES.items())}"
        )
    heads = int(cfg["num_attention_heads"])
    gemma = model_type == "gemma"
    return LMSpec(
        vocab_size=int(cfg["vocab_size"]),
        width=int(cfg["hidden_size"]),
        depth=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        mlp_dim=int(cfg["intermediate_size"]),
        act=_act(cfg, model_type),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        norm_offset=gemma,
        rope_theta=_rope_theta(cfg),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        embed_scale=gemma,
        qkv_bias=_qkv_bias(cfg, model_type),
    )


def check_exportable(spec, source: str) -> None:
    """ValueError naming what of `spec` the source's transformers class cannot express."""
    model_type = _check_source(source)
    gemma = model_type == "gemma"
    if spec.visual_expert:
        raise ValueError(f"the LM has a visual expert (CogVLM): {ARCHITECTURES[source]} has no place for it")
    want = dict(act="gelu_tanh" if gemma else "silu", norm_offset=gemma, embed_scale=gemma)
    for key, value in want.items():
        if getattr(spec, key) != value:
            raise ValueError(
                f"LMSpec.{key}={getattr(spec, key)!r}; {ARCHITECTURES[source]} has {key}={value!r} "
                "(Gemma: gelu_tanh + norm_offset + embed_scale; Llama / Qwen2: silu, neither)"
            )


def _ids(token_ids: dict) -> dict:
    """{'bos_token_id', 'eos_token_id', 'pad_token_id'} from {'bos', 'eos', 'pad': id, list or None}."""
    out = {}
    for k in ("bos", "eos", "pad"):
        v = (token_ids or {}).get(k)
        out[f"{k}_token_id"] = [int(i) for i in v] if isinstance(v, (list, tuple)) else None if v is None else int(v)
    return out


def hf_config_from_spec(spec, source: str, token_ids: dict, max_position_embeddings: int) -> dict:
    """The config.json transformers reads back for `spec` as `source` (float32 weights).
    token_ids: {'bos', 'eos', 'pad': id or None} (eos may be a list)."""
    check_exportable(spec, source)
    model_type = _check_source(source)
    cfg = dict(
        architectures=[ARCHITECTURES[source]],
        model_type=model_type,
        vocab_size=spec.vocab_size,
        hidden_size=spec.width,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.mlp_dim,
        hidden_act="gelu_pytorch_tanh" if model_type == "gemma" else "silu",
        max_position_embeddings=int(max_position_embeddings),
        rms_norm_eps=float(spec.norm_eps),
        rope_theta=float(spec.rope_theta),  # transformers 4; 5 reads rope_parameters
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta)},
        rope_scaling=None,
        tie_word_embeddings=bool(spec.tie_embeddings),
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        torch_dtype="float32",
        dtype="float32",
        **_ids(token_ids),
    )
    if model_type == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.depth)
    else:
        cfg["attention_bias"] = bool(spec.qkv_bias)  # o_proj gets a zero bias (fill_biases)
    if model_type == "llama":
        cfg.update(mlp_bias=False, pretraining_tp=1)
    if model_type == "gemma":
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
    return cfg


# ------------------------------------------------------------------ reading


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _token_info(cfg: dict, gen: dict) -> dict:
    """bos / eos / pad ids (generation_config.json over config.json); eos_ids: every eos id."""
    info = {}
    for k in ("bos", "eos", "pad"):
        v = gen.get(f"{k}_token_id")
        if v is None:
            v = cfg.get(f"{k}_token_id")
        if k == "eos":
            info["eos_ids"] = tuple(int(i) for i in (v if isinstance(v, (list, tuple)) else [] if v is None else [v]))
            v = info["eos_ids"][0] if info["eos_ids"] else None
        info[f"{k}_id"] = None if v is None else int(v)
    return info


def find_tokenizer(src_dir: str) -> str | None:
    """tokenizer.json in src_dir (the `tokenizers` library's), else tokenizer.model
    (sentencepiece), else None."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(src_dir, name)):
            return os.path.join(src_dir, name)
    return None


def read_hf_llm(src_dir: str, source: str):
    """-> (spec: LMSpec, params: nested dict of float32 numpy (unrolled layout), info) of a
    transformers Llama / Qwen2 / Gemma directory: config.json, model.safetensors or its
    shards (read memory-mapped, one tensor at a time), generation_config.json if present.

    info: source, max_position_embeddings, bos_id, eos_id (the first), eos_ids (all),
    pad_id (None where neither config names one), tokenizer (path or None), torch_dtype."""
    cfg_path = os.path.join(src_dir, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: is {src_dir!r} a transformers model directory?")
    cfg = _read_json(cfg_path)
    spec = spec_from_hf_config(cfg, source)
    gen_path = os.path.join(src_dir, GENERATION_FILE)
    gen = _read_json(gen_path) if os.path.isfile(gen_path) else {}
    params = params_from_state_dict(LazyStateDict(src_dir), spec)
    info = dict(
        source=source,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        tokenizer=find_tokenizer(src_dir),
        torch_dtype=cfg.get("torch_dtype", cfg.get("dtype")),
        **_token_info(cfg, gen),
    )
    return spec, params, info


# ------------------------------------------------------------------ writing


def fill_biases(sd: dict, spec, source: str) -> dict:
    """Zero biases the source's class has but the spec does not: Qwen2's q/k/v without
    qkv_bias, Llama / Gemma's o_proj with qkv_bias (attention_bias)."""
    model_type = _check_source(source)
    for i in range(spec.depth):
        p = f"model.layers.{i}.self_attn."
        if model_type == "qwen2" and not spec.qkv_bias:
            for n in "qkv":
                sd[p + f"{n}_proj.bias"] = np.zeros(sd[p + f"{n}_proj.weight"].shape[0], np.float32)
        elif model_type != "qwen2" and spec.qkv_bias:
            sd[p + "o_proj.bias"] = np.zeros(spec.width, np.float32)
    return sd


def _shards(sd: dict, shard_bytes: int | None) -> list:
    """[{name: array}] in order, each under shard_bytes (one shard when None or all fit)."""
    if not shard_bytes or sum(a.nbytes for a in sd.values()) <= shard_bytes:
        return [sd]
    shards, cur, size = [], {}, 0
    for k, a in sd.items():
        if cur and size + a.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = a, size + a.nbytes
    return shards + [cur]


def write_safetensors(sd: dict, out_dir: str, shard_bytes: int | None = None) -> list:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    when the tensors pass shard_bytes; -> the files written (names)."""
    from safetensors.numpy import save_file

    shards = _shards(sd, shard_bytes)
    if len(shards) == 1:
        save_file(sd, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
        return [WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in sd.values()))}, "weight_map": weight_map}
    with open(os.path.join(out_dir, WEIGHTS_FILE + ".index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return names + [WEIGHTS_FILE + ".index.json"]


def copy_tokenizer(tokenizer_path: str, out_dir: str) -> list:
    """Copies a tokenizer into out_dir under transformers' names: a directory's tokenizer
    files, or one file (a .json as tokenizer.json, else as tokenizer.model: sentencepiece)
    with the tokenizer files beside it of the same name prefix (`hf_tokenizer.json` brings
    `hf_tokenizer_config.json`, `hf_special_tokens_map.json`); -> the names written."""
    if os.path.isdir(tokenizer_path):
        folder, prefix, src = tokenizer_path, "", {}
    else:
        folder, base = os.path.split(tokenizer_path)
        main = "tokenizer.json" if base.endswith(".json") else "tokenizer.model"
        prefix, src = base[: -len(main)] if base.endswith(main) else None, {main: tokenizer_path}
    for f in TOKENIZER_FILES if prefix is not None else ():
        src.setdefault(f, os.path.join(folder, prefix + f))
    written = []
    for name, path in src.items():
        if os.path.isfile(path):
            if os.path.abspath(path) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(path, os.path.join(out_dir, name))
            written.append(name)
    if not any(n in written for n in TOKENIZER_FILES[:2]):
        raise FileNotFoundError(f"{tokenizer_path}: no tokenizer.json or sentencepiece model to copy")
    return written


def save_hf_llm(
    params,
    spec,
    source: str,
    out_dir: str,
    token_ids: dict,
    max_position_embeddings: int,
    tokenizer_path: str | None = None,
    shard_bytes: int | None = None,
) -> str:
    """Writes a transformers `source` directory from DecoderLM params (unrolled or scanned,
    numpy or jax): config.json, generation_config.json, model.safetensors (float32; shards +
    model.safetensors.index.json past shard_bytes) and the tokenizer file(s) of
    tokenizer_path (`copy_tokenizer`). token_ids: {'bos', 'eos', 'pad': id or None}
    (`Tokenizer.special_ids`, `TokenIds.as_dict()`). Returns out_dir; ValueError names what
    the source's class cannot express (`check_exportable`)."""
    config = hf_config_from_spec(spec, source, token_ids, max_position_embeddings)
    sd = fill_biases(state_dict_from_params(params, spec), spec, source)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(sd, out_dir, shard_bytes)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    generation = {k: v for k, v in _ids(token_ids).items() if v is not None}
    with open(os.path.join(out_dir, GENERATION_FILE), "w") as f:
        json.dump(generation, f, indent=2, sort_keys=True)
    if tokenizer_path:
        copy_tokenizer(tokenizer_path, out_dir)
    return out_dir
