"""mmjax workdirs <-> transformers causal-LM directories (Llama, Qwen2, Gemma):
`mmjax convert --from hf-llama|hf-qwen2|hf-gemma` and `mmjax export --format hf-llm`.
The weight and config mapping is `mmjax.export.hf_llm`.

A converted workdir holds config.json (configs/lm.py with the checkpoint's `model.lm`,
its vocabulary kept, data.tokenizer.path -> the tokenizer copied into the workdir)
and a params-only step 0 (`mmjax.workdir.save_params`), read as every workdir is:
`mmjax train --init-from`, `mmjax generate`, `mmjax eval`, `mmjax export`.

The export writes the LM in the layout its spec implies: Gemma's (norm_offset,
embed_scale, GeGLU), Qwen2's (q/k/v biases) or Llama's (neither), and refuses a mix
transformers has no class for.
"""

from __future__ import annotations

import os
import shutil

from mmjax import workdir as workdir_lib

SOURCES = ("hf-llama", "hf-qwen2", "hf-gemma")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def layout_of(spec) -> str:
    """The transformers layout an LMSpec has: 'hf-gemma', 'hf-qwen2' or 'hf-llama';
    ValueError for a combination none of them expresses."""
    gemma = (spec.norm_offset, spec.embed_scale, spec.act == "gelu_tanh")
    if all(gemma):
        if spec.qkv_bias or not spec.tie_embeddings:
            raise ValueError(
                "a Gemma-style LM (norm_offset, embed_scale, gelu_tanh) with q/k/v biases or untied "
                "embeddings has no transformers class"
            )
        return "hf-gemma"
    if any(gemma):
        raise ValueError(
            f"model.lm norm_offset={spec.norm_offset}, embed_scale={spec.embed_scale}, act={spec.act!r}: transformers "
            "has Gemma (all three) or Llama / Qwen2 (none); export needs one of them"
        )
    return "hf-qwen2" if spec.qkv_bias else "hf-llama"


def converted_config(spec, tokenizer_path: str | None, seed: int = 0):
    """configs/lm.py with the imported LM: model.lm from `spec`, the vocabulary kept,
    the tokenizer at `tokenizer_path` (case kept), no chat template (prompts are raw
    text to continue); validated."""
    import ml_collections

    from mmjax import config as config_lib
    from mmjax.models.zoo.lm import spec_dict

    config = config_lib.recipe(_recipe_path("lm.py"))
    with config.unlocked(), config.ignore_type():
        config.model.lm = ml_collections.ConfigDict(spec_dict(spec))
        config.model.keep_vocab_size = True
        config.model.vocab_size = int(spec.vocab_size)
        config.data.tokenizer.path = tokenizer_path
        config.data.tokenizer.lowercase = False
        config.data.chat.template = None  # an imported base LM continues raw text (set one to train on chat)
        config.seed = int(seed)
    config_lib.validate(config)
    return config


def _recipe_path(name: str) -> str:
    import mmjax

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mmjax.__file__))), "configs", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (mmjax installed without its configs/)")
    return path


def _copy_tokenizer(src_dir: str, workdir: str) -> str | None:
    """Copies the checkpoint's tokenizer files into the workdir; -> the path to load
    (tokenizer.json when there is one, else tokenizer.model), None without either."""
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, f))]
    for f in found:
        shutil.copyfile(os.path.join(src_dir, f), os.path.join(workdir, "hf_" + f))
    for f in ("tokenizer.json", "tokenizer.model"):
        if f in found:
            return os.path.join(os.path.abspath(workdir), "hf_" + f)
    return None


def _token_ids(tokenizer_path: str | None, info: dict) -> dict:
    """The special ids a run will derive from the copied tokenizer (so the two agree);
    without a tokenizer, the checkpoint's config (pad: eos when it has none)."""
    if tokenizer_path:
        from mmjax.data.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer_path, lowercase=False).special_ids
    ids = {"unk": None, "mask": None, "cls": None, **{k: info.get(k + "_id") for k in ("pad", "bos", "eos")}}
    if ids["pad"] is None:
        ids["pad"] = ids["eos"] if ids["eos"] is not None else 0
    return ids


def convert_to_workdir(src_dir: str, workdir: str, source: str, *, seed: int = 0):
    """An mmjax `lm` workdir from a transformers Llama / Qwen2 / Gemma directory
    (sharded safetensors read memory-mapped); returns its config. Refuses a workdir
    that has checkpoints."""
    import jax

    from mmjax import config as config_lib
    from mmjax.export.hf_llm import read_hf_llm
    from mmjax.export.hf_workdir import _check_param_tree
    from mmjax.models import zoo

    if source not in SOURCES:
        raise ValueError(f"--from {source!r}; valid choices: {', '.join(SOURCES)}")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; convert into a new workdir")
    spec, params, info = read_hf_llm(src_dir, source)
    os.makedirs(workdir, exist_ok=True)
    tokenizer = _copy_tokenizer(src_dir, workdir)
    config = config_lib.derive_model_keys(
        converted_config(spec, tokenizer, seed), spec.vocab_size, _token_ids(tokenizer, info)
    )
    family = zoo.build(config.model)
    _check_param_tree(family, params)
    params = jax.device_put(params, jax.local_devices()[0])
    workdir_lib.save_config_json(config, workdir)
    meta = {"source": source, "src": os.path.abspath(src_dir)}
    workdir_lib.save_params(workdir, params, step=0, meta=meta)
    return config


def export_workdir(workdir: str, out_dir: str, weights: str = "student", *, step: int | None = None) -> dict:
    """An `lm` workdir's params -> a transformers directory in its layout (`layout_of`):
    config.json, generation_config.json, model.safetensors and the tokenizer."""
    from mmjax.export.hf_llm import save_hf_llm

    config = workdir_lib.load_config_json(workdir)
    if config.model.get("family") != "lm":
        raise ValueError(
            f"--format hf-llm exports an 'lm' workdir; {workdir} holds a {config.model.get('family')!r} model "
            "(a LLaVA-style workdir: --format hf-llava)"
        )
    opened = workdir_lib.open_workdir(workdir, weights=weights, step=step, config=config)
    spec = opened.family.spec
    source = layout_of(spec)
    ids = opened.family.c.tokens.as_dict()
    tok = opened.tokenizer_path
    save_hf_llm(opened.params, spec, source, out_dir, ids, max(2048, int(config.data.text_len)), tokenizer_path=tok)
    return {"format": "hf-llm", "layout": source, "out": out_dir, "weights": weights, "step": opened.step}
