"""mmjax LLaVA -> transformers LlavaForConditionalGeneration: logit parity on the same
pixels and tokens (Llama-, Qwen2- and Gemma-style LMs, feature layers -2 / -1 / 0), the
appended or given image token, the tokenizer's added '<image>', and the refusals.

Tiny random models (nothing downloaded); skipped without torch or transformers.
"""

import functools
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from mmjax.export import hf_llava  # noqa: E402
from mmjax.models import zoo  # noqa: E402
from mmjax.models.llm import stack_layers  # noqa: E402

TOL = 1e-4  # max |logit difference|, fp32
V, L, T = 61, 24, 16  # vocabulary, sequence, image tokens ((32 / 8)^2)
LM = dict(width=32, depth=2, heads=4, kv_heads=2, mlp_dim=64, tie_embeddings=False)
LMS = {
    "llama": LM,
    "qwen2": dict(LM, qkv_bias=True, kv_heads=1, rope_theta=50000.0),
    "gemma": dict(LM, head_dim=16, act="gelu_tanh", norm_offset=True, embed_scale=True, tie_embeddings=True),
}


@functools.lru_cache(maxsize=None)
def _setup(lm="llama", feature_layer=-2):
    """(family, random params, jitted forward) of one tiny LLaVA, built once per module."""
    family = _family(LMS[lm], feature_layer=feature_layer)
    return family, _params(family), jax.jit(family.forward)


def _family(lm=LM, **kw):
    cfg = dict(
        family="llava",
        vocab_size=V,
        image_size=32,
        text_len=L,
        image="mu/8",
        image_overrides=dict(width=48, depth=3, heads=4, mlp_dim=96),
        act="quick_gelu",
        ln_eps=1e-5,
        lm=lm,
        projector="mlp2x_gelu",
        feature_layer=-2,
    )
    return zoo.build(ml_collections.ConfigDict(dict(cfg, **kw)))


def _params(family, seed=0):
    """Random params of the family's tree (shapes from an abstract init, so no init runs):
    norm scales around their init (1, or 0 for Gemma's (1 + w)), biases around 0, other
    weights ~ N(0, 1 / fan_in)."""
    shapes = jax.eval_shape(family.init_params, jax.random.PRNGKey(0))
    rng = np.random.RandomState(seed)

    def fill(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        noise = rng.randn(*x.shape).astype(np.float32)
        if names[-1] == "scale":
            return (0.0 if names[0] == "lm" and family.spec.norm_offset else 1.0) + 0.2 * noise
        if names[-1] == "bias":
            return 0.2 * noise
        return noise / float(np.sqrt(max(1, int(np.prod(x.shape[:-1])))))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _batch(seed=0, b=2, start=(1, 3)):
    """Normalised pixels [B, 32, 32, 3], tokens [B, L] (no image id), slots at `start`."""
    rng = np.random.RandomState(seed)
    image = rng.randn(b, 32, 32, 3).astype(np.float32)
    tokens = rng.randint(6, V, size=(b, L)).astype(np.int32)
    slots = np.zeros((b, L), bool)
    for i, s in enumerate(start[:b]):
        slots[i, s : s + T] = True
    return image, tokens, slots


def _mmjax_logits(forward, params, image, tokens, slots):
    batch = dict(
        image=jnp.asarray(image),
        tokens=jnp.asarray(tokens),
        image_slots=jnp.asarray(slots),
        valid=jnp.ones(tokens.shape, bool),
        prefix=jnp.zeros(tokens.shape, bool),
    )
    return np.asarray(forward(params, batch))


def _hf_logits(out, image, tokens, slots, image_id):
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = np.where(slots, image_id, tokens)
    with torch.no_grad():
        got = model.eval()(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            pixel_values=torch.from_numpy(image.transpose(0, 3, 1, 2).copy()),
        ).logits
    return got.numpy(), model


@pytest.mark.parametrize(
    "lm, feature_layer", [("llama", -2), ("qwen2", -1), ("gemma", 0)], ids=["llama-2", "qwen2-1", "gemma0"]
)
def test_logit_parity(tmp_path, lm, feature_layer):
    family, params, forward = _setup(lm, feature_layer)
    image, tokens, slots = _batch()
    want = _mmjax_logits(forward, params, image, tokens, slots)
    out = hf_llava.save_hf_llava(family, params, str(tmp_path), family.c.tokens.as_dict(), image_token_index=None)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["image_token_index"] == V and cfg["text_config"]["vocab_size"] == V + 1
    assert cfg["image_seq_length"] == T and cfg["vision_feature_layer"] == hf_llava.hf_feature_layer(feature_layer, 3)
    got, model = _hf_logits(out, image, tokens, slots, V)
    assert got.shape == (2, L, V + 1)
    diff = float(np.abs(got[..., :V] - want).max())
    print(f"{lm} feature_layer={feature_layer}: max |logit diff| {diff:.2e}")
    assert diff <= TOL, diff
    # The appended row is the mean row: its logit is the mean of the V others.
    np.testing.assert_allclose(got[..., V], got[..., :V].mean(-1), atol=TOL)
    assert model.config.tie_word_embeddings == (lm == "gemma")


def test_given_image_token_keeps_the_vocabulary(tmp_path):
    family, params, forward = _setup()
    image, tokens, slots = _batch(seed=1, start=(0, 5))
    want = _mmjax_logits(forward, params, image, tokens, slots)
    out = hf_llava.save_hf_llava(family, params, str(tmp_path), family.c.tokens.as_dict(), image_token_index=5)
    got, _ = _hf_logits(out, image, tokens, slots, 5)
    assert got.shape == (2, L, V)
    assert float(np.abs(got - want).max()) <= TOL
    # A scanned LM (`layers/`, stacked) writes the same weights.
    scanned = dict(params, lm=stack_layers(params["lm"], family.spec.depth))
    a, b = (hf_llava.state_dict_from_params(family, x, 5) for x in (params, scanned))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_lora_adapters_are_merged():
    params = _setup()[1]
    family = _family(lora_rank=2, lora_alpha=4.0)  # alpha / rank = 2
    rng = np.random.RandomState(1)
    lm = jax.tree_util.tree_map(np.asarray, params["lm"])
    attn = dict(
        lm["layer00"]["attn"],
        q_lora=dict(a=rng.randn(32, 2).astype(np.float32), b=rng.randn(2, 4, 8).astype(np.float32)),
    )
    lm = dict(lm, layer00=dict(lm["layer00"], attn=attn))
    sd = hf_llava.state_dict_from_params(family, dict(params, lm=lm), 5)
    kernel = lm["layer00"]["attn"]["q"]["kernel"] + 2.0 * np.einsum(
        "dr,rhk->dhk", attn["q_lora"]["a"], attn["q_lora"]["b"]
    )
    np.testing.assert_allclose(
        sd["language_model.model.layers.0.self_attn.q_proj.weight"], kernel.reshape(32, 32).T, atol=1e-5
    )


def test_export_workdir(tmp_path):
    from mmjax import workdir as workdir_lib

    family, params, _ = _setup()
    tok = _word_tokenizer(tmp_path / "tokenizer.json", 30, ("<image>",))
    config = ml_collections.ConfigDict(
        dict(model=family.config.to_dict(), data=dict(tokenizer=dict(path=tok, lowercase=False)))
    )
    workdir = str(tmp_path / "wd")
    os.makedirs(workdir)
    workdir_lib.save_config_json(config, workdir)
    workdir_lib.save_params(workdir, params, step=0)
    info = hf_llava.export_workdir(workdir, str(tmp_path / "hf"))
    assert info["image_token_index"] == 30 and info["vocab_size"] == V and info["step"] == 0
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    want = hf_llava.state_dict_from_params(family, params, 30)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


def _word_tokenizer(path, n, extra=()):
    """A `tokenizers` WordLevel tokenizer.json of n words (+ added special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n - 4)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(extra))
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize(
    "words, extra, want, vocab",
    [(44, (), 44, V), (V, (), V, V + 1), (30, ("<x>", "<image>"), 31, V)],
    ids=["next-free-row", "appended", "own"],
)
def test_tokenizer_image_token(tmp_path, words, extra, want, vocab):
    """None: the tokenizer's next free id below V (no growth), V appended (the tokenizer too),
    or the tokenizer's own '<image>'."""
    from tokenizers import Tokenizer

    family, params, _ = _setup()
    tok = _word_tokenizer(tmp_path / "tokenizer.json", words, extra)
    out = hf_llava.save_hf_llava(
        family, params, str(tmp_path / "hf"), dict(pad=0, bos=2, eos=3), image_token_index=None, tokenizer_path=tok
    )
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["image_token_index"], cfg["text_config"]["vocab_size"]) == (want, vocab)
    back = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert back.encode("w1 <image> w2").ids == [5, want, 6]
    proc = json.load(open(os.path.join(out, "processor_config.json")))
    assert proc["patch_size"] == 8 and proc["num_additional_image_tokens"] == 1
    assert os.path.isfile(os.path.join(out, "preprocessor_config.json"))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(projector="linear"), "model.projector"),
        (dict(family="cogvlm"), "cogvlm"),
        (dict(prefix_lm=True), "model.prefix_lm"),
        (dict(posemb="sincos2d"), "model.posemb"),
    ],
)
def test_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        hf_llava.check_exportable(_family(**kw))


def test_bad_image_token_and_feature_layer():
    with pytest.raises(ValueError, match="image_token_index"):
        hf_llava.resolve_image_token(V + 1, V)
    assert hf_llava.resolve_image_token(None, V) == (V, True)
    assert hf_llava.resolve_image_token(None, V, 40) == (40, False)
    with pytest.raises(ValueError, match="tokenizer has"):
        hf_llava.resolve_image_token(None, V, V + 2)
    assert hf_llava.resolve_image_token(7, V) == (7, False)
    assert [hf_llava.hf_feature_layer(k, 3) for k in (-3, -1, 0, 2)] == [-3, -1, 1, 3]
