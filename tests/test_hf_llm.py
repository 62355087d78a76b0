"""transformers Llama / Qwen2 / Gemma <-> mmjax DecoderLM: logit and greedy-generation
parity, save / from_pretrained round trips, exact state-dict round trips, the HF
tokenizer, and the errors of what DecoderLM cannot express.

Every model is a tiny random one built from a config object (nothing is downloaded);
skipped when torch or transformers is not installed.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from mmjax.data.hf_tokenizer import HFTokenizer  # noqa: E402
from mmjax.export import hf_llm  # noqa: E402
from mmjax.export.hf_llm_weights import LazyStateDict, flat_params  # noqa: E402
from mmjax.models import generate as generate_lib  # noqa: E402
from mmjax.models.llm import DecoderLM, lm_mask, stack_layers  # noqa: E402

TOL = 1e-4  # max |logit difference| against transformers, fp32 (docs/benchmarks.md)
COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64)
CASES = {
    # GQA 6 / 3 heads, untied, saved in several shards.
    "llama": ("hf-llama", "LlamaConfig", dict(num_attention_heads=6, num_key_value_heads=3, head_dim=8), "40KB"),
    # q/k/v biases, MQA, tied embeddings, another rope_theta.
    "qwen2": (
        "hf-qwen2",
        "Qwen2Config",
        dict(num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=50000.0),
        None,
    ),
    # head_dim 16 != 48 / 4, GeGLU, (1 + w) norms, sqrt(D) embeddings, tied.
    "gemma": ("hf-gemma", "GemmaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16), None),
}
IDS = np.random.RandomState(0).randint(0, 97, size=(2, 11))  # a batch of 2, no padding


def _randomize(model, gemma: bool):
    """Every weight random (norms around 1, or around 0 for Gemma's (1 + w)), seeded."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.3 * torch.randn_like(p))
            else:
                p.copy_((0.1 if name.endswith("bias") else 0.08) * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{name: dict(dir, hf (the torch model), spec, params, info)}, built lazily."""
    torch.set_num_threads(1)
    cache = {}

    def get(name):
        if name not in cache:
            source, cls, kw, shard = CASES[name]
            config = getattr(transformers, cls)(**COMMON, **kw, bos_token_id=1, eos_token_id=2, pad_token_id=0)
            torch.manual_seed(0)
            model = _randomize(transformers.AutoModelForCausalLM.from_config(config), name == "gemma")
            d = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
            spec, params, info = hf_llm.read_hf_llm(d, source)
            cache[name] = dict(dir=d, hf=model, spec=spec, params=params, info=info, source=source)
        return cache[name]

    return get


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def _logits(spec, params, ids):
    lm = DecoderLM(spec)
    valid = jnp.ones(ids.shape, bool)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
    fn = jax.jit(lambda p, t: lm.apply({"params": p}, t, positions, lm_mask(valid), method=lm.forward_ids))
    return np.asarray(fn(params, jnp.asarray(ids, jnp.int32)))


def _hf_state_dict(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, cases):
    c = cases(name)
    diff = np.abs(_logits(c["spec"], c["params"], IDS) - _hf_logits(c["hf"], IDS)).max()
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert diff < TOL, diff


def test_sharded_checkpoint_and_info(cases):
    c = cases("llama")
    files = os.listdir(c["dir"])
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 3
    assert c["info"]["max_position_embeddings"] == 64
    assert (c["info"]["bos_id"], c["info"]["eos_id"], c["info"]["eos_ids"], c["info"]["pad_id"]) == (1, 2, (2,), 0)
    assert c["info"]["tokenizer"] is None


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_matches_transformers(name, cases):
    c = cases(name)
    prompt, n, eos, pad = IDS[:, :6], 8, c["info"]["eos_id"], c["info"]["pad_id"]
    with torch.no_grad():  # stops at eos (2), pads finished rows with pad (0)
        hf = c["hf"].generate(torch.tensor(prompt), do_sample=False, max_new_tokens=n).numpy()[:, prompt.shape[1] :]
    hf = np.pad(hf, ((0, 0), (0, n - hf.shape[1])), constant_values=pad)
    lm = DecoderLM(c["spec"])
    params = jax.tree.map(jnp.asarray, c["params"])
    x = lm.apply({"params": params}, jnp.asarray(prompt, jnp.int32), method=lm.embed)
    tokens, _ = generate_lib.generate(
        lm, params, x, jnp.ones(prompt.shape, bool), max_new_tokens=n, eos_ids=(eos,), pad_id=pad, method="greedy"
    )
    print(f"{name} greedy: {hf.tolist()}")
    np.testing.assert_array_equal(np.asarray(tokens), hf)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_exact(name, cases):
    c = cases(name)
    want = {k: v for k, v in _hf_state_dict(c["hf"]).items() if "inv_freq" not in k}
    if c["spec"].tie_embeddings:
        assert np.array_equal(want.pop("lm_head.weight"), want["model.embed_tokens.weight"])
    for params in (c["params"], stack_layers(c["params"], c["spec"].depth)):  # unrolled and scanned layouts
        got = hf_llm.state_dict_from_params(params, c["spec"])
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize("name", list(CASES))
def test_save_from_pretrained_round_trip(name, cases, tmp_path):
    c = cases(name)
    out = str(tmp_path / "out")
    ids = {"bos": 1, "eos": 2, "pad": 0}
    shard = 30_000 if name == "qwen2" else None
    hf_llm.save_hf_llm(c["params"], c["spec"], c["source"], out, ids, 64, shard_bytes=shard)
    assert ("model.safetensors.index.json" in os.listdir(out)) == (shard is not None)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == hf_llm.ARCHITECTURES[c["source"]]
    diff = np.abs(_hf_logits(model.eval(), IDS) - _logits(c["spec"], c["params"], IDS)).max()
    print(f"{name} saved: max |logit diff| {diff:.2e}")
    assert diff < TOL, diff
    spec, params, info = hf_llm.read_hf_llm(out, c["source"])
    assert spec == c["spec"] and (info["bos_id"], info["eos_id"], info["pad_id"]) == (1, 2, 0)
    a, b = flat_params(params), flat_params(c["params"])
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_bfloat16_checkpoint_reads_lazily(cases, tmp_path):
    import copy

    model = copy.deepcopy(cases("qwen2")["hf"]).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    want = _hf_state_dict(model)
    sd = LazyStateDict(str(tmp_path))
    k = "model.layers.1.self_attn.q_proj.weight"
    assert sd.shape(k) == (48, 48) and sd[k].dtype == np.float32 and np.array_equal(sd[k], want[k])
    _, params, _ = hf_llm.read_hf_llm(str(tmp_path), "hf-qwen2")
    assert params["layer01"]["attn"]["q"]["bias"].dtype == np.float32


def test_qwen2_export_of_a_biasless_lm_and_llama_attention_bias(cases, tmp_path):
    import dataclasses

    c = cases("llama")
    spec = c["spec"]
    # A Llama-layout LM written as Qwen2: zero q/k/v biases, same logits.
    hf_llm.save_hf_llm(c["params"], spec, "hf-qwen2", str(tmp_path / "q"), {"eos": 2}, 64)
    spec_q, params_q, _ = hf_llm.read_hf_llm(str(tmp_path / "q"), "hf-qwen2")
    assert spec_q == dataclasses.replace(spec, qkv_bias=True)
    assert np.abs(_logits(spec_q, params_q, IDS) - _logits(spec, c["params"], IDS)).max() < TOL
    # ... and back as Llama with attention_bias: zero o_proj biases, which read back.
    hf_llm.save_hf_llm(params_q, spec_q, "hf-llama", str(tmp_path / "l"), {"eos": 2}, 64)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "l")).eval()
    assert model.config.attention_bias
    assert np.abs(_hf_logits(model, IDS) - _hf_logits(c["hf"], IDS)).max() < TOL
    assert hf_llm.read_hf_llm(str(tmp_path / "l"), "hf-llama")[0] == spec_q


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "source, changes, match",
    [
        ("hf-llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        ("hf-llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "llama3"),
        ("hf-gemma", dict(model_type="gemma2"), "gemma2.*supported: hf-llama"),
        ("hf-qwen2", dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
        ("hf-llama", dict(mlp_bias=True), "mlp_bias"),
        ("hf-llama", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        ("hf-bert", {}, "unknown source 'hf-bert'"),
    ],
)
def test_config_errors(source, changes, match):
    cfg = {**COMMON, "model_type": "llama", "num_attention_heads": 6, **changes}
    with pytest.raises(ValueError, match=match):
        hf_llm.spec_from_hf_config(cfg, source)


def test_state_dict_errors(cases):
    c = cases("llama")
    sd = _hf_state_dict(c["hf"])
    extra = dict(sd, **{"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="q_norm"):
        hf_llm.params_from_state_dict(extra, c["spec"])
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.up_proj"):
        hf_llm.params_from_state_dict(missing, c["spec"])
    o_bias = dict(sd, **{"model.layers.0.self_attn.o_proj.bias": np.full(48, 0.1, np.float32)})
    with pytest.raises(ValueError, match="o_proj.bias is not zero"):
        hf_llm.params_from_state_dict(o_bias, c["spec"])
    with pytest.raises(ValueError, match="norm_offset"):
        hf_llm.save_hf_llm(c["params"], c["spec"], "hf-gemma", "/nonexistent", {}, 64)


# ------------------------------------------------------------------ tokenizers

TEXTS = ["A cat sits on the Mat.", "Two dogs run in the park!", "The quick brown fox jumps.", "cats and dogs"]


def _bpe_dir(path, config: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return os.path.join(path, "tokenizer.json")


def test_hf_tokenizer(tmp_path):
    path = _bpe_dir(str(tmp_path / "a"), {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>"})
    tok = HFTokenizer(os.path.dirname(path))
    assert tok.special_ids == dict(pad=3, unk=1, bos=2, eos=3, mask=None, cls=None)  # no pad: eos
    assert tok.vocab_size == tok.tok.get_vocab_size(with_added_tokens=True) and tok.token_id("<s>") == 2
    assert tok.token_id("never-a-token") is None
    for t in TEXTS:
        ids = tok.encode_plain(t)
        assert ids and 2 not in ids and tok.decode_plain(ids) == t  # case kept
    out = tok.encode(TEXTS[:2], 8)
    assert out.shape == (2, 8) and out.dtype == np.int32 and (out[:, 0] == 2).all()
    assert tok.truncated == sum(len(tok.encode_plain(t)) > 6 for t in TEXTS[:2])
    short = tok.encode(["cats"], 16)[0]
    n = len(tok.encode_plain("cats"))
    assert list(short[: n + 2]) == [2, *tok.encode_plain("cats"), 3] and (short[n + 2 :] == 3).all()
    assert tok.decode(short) == "cats"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    assert fast.encode(TEXTS[0], add_special_tokens=False) == tok.encode_plain(TEXTS[0])


def test_hf_tokenizer_without_bos_and_prefixed_files(tmp_path):
    _bpe_dir(str(tmp_path), {"bos_token": None, "eos_token": "</s>", "pad_token": "<pad>"})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.rename(os.path.join(tmp_path, f), os.path.join(tmp_path, "hf_" + f))
    with open(tmp_path / "config.json", "w") as f:  # a workdir's config: not read (no hf_ prefix)
        json.dump({"unk_token_id": 7}, f)
    tok = HFTokenizer(str(tmp_path / "hf_tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (None, 3, 0, 1)
    out = tok.encode(["cats"], 8)[0]
    assert list(out[: len(tok.encode_plain("cats")) + 1]) == [*tok.encode_plain("cats"), 3] and out[-1] == 0


def test_tokenizers_copied_and_found(cases, tmp_path):
    from mmjax.data.tokenizer import train_tokenizer

    c = cases("gemma")
    sp_path = train_tokenizer(TEXTS * 20, str(tmp_path / "sp"), vocab_size=60)
    out = str(tmp_path / "out_sp")
    hf_llm.save_hf_llm(c["params"], c["spec"], "hf-gemma", out, {"bos": 2, "eos": 3, "pad": 0}, 64, sp_path)
    info = hf_llm.read_hf_llm(out, "hf-gemma")[2]
    assert info["tokenizer"] == os.path.join(out, "tokenizer.model") and info["eos_ids"] == (3,)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=info["tokenizer"])
    assert all(sp.decode(sp.encode(t.lower())) == t.lower() for t in TEXTS)
    _bpe_dir(str(tmp_path / "bpe"), {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False})
    for f in ("tokenizer.json", "tokenizer_config.json"):  # as a converted workdir keeps them
        os.rename(tmp_path / "bpe" / f, tmp_path / "bpe" / ("hf_" + f))
    out = str(tmp_path / "out_json")
    json_path = str(tmp_path / "bpe" / "hf_tokenizer.json")
    hf_llm.save_hf_llm(c["params"], c["spec"], "hf-gemma", out, {"bos": 2, "eos": 3}, 64, json_path)
    assert sorted(f for f in os.listdir(out) if f.startswith("tokenizer")) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    info = hf_llm.read_hf_llm(out, "hf-gemma")[2]
    tok = HFTokenizer(info["tokenizer"])
    assert (tok.bos_id, tok.eos_id) == (2, 3) and all(tok.decode_plain(tok.encode_plain(t)) == t for t in TEXTS)
    assert tok.encode(["cats"], 8)[0, 0] != 2  # add_bos_token false: no bos
    assert HFTokenizer(json_path).special_ids == tok.special_ids
