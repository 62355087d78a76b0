"""The tokenizer contract: special ids come from the tokenizer (`Tokenizer.special_ids`
-> `model.token_ids` -> every family), none is hard-coded.

The reference: a model built for mmjax's ids and the same model built for a tokenizer
whose special ids sit elsewhere (its vocabulary permuted, every vocabulary axis of the
params permuted with it) compute the same function: the same text embeddings, the same
captions (in the other vocabulary), the same losses.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.data.tokenizer import Tokenizer, train_tokenizer
from mmjax.models import tokens, zoo
from mmjax.objectives import lm_loss, mask_tokens
from tiny import DEMO, ROOT

V = 53  # a vocabulary size no other axis of the tiny models has
TINY = ["data.image_size=16", "data.text_len=12", f"data.tokenizer.vocab_size={V}", "train.batch_size=8"]
# Another tokenizer's special ids: mmjax's sit at 0..5, this one's at 40..45 (and 0..5 are words).
OTHER = {"pad": 40, "unk": 41, "bos": 42, "eos": 43, "mask": 44, "cls": 45}
PERM = np.arange(V)
for _name, _id in tokens.MMJAX.items():
    PERM[_id], PERM[OTHER[_name]] = OTHER[_name], _id  # mmjax id -> the other tokenizer's id


def test_a_trained_tokenizer_states_mmjax_ids(tmp_path):
    path = train_tokenizer([f"a red circle number {i}" for i in range(200)], str(tmp_path), 40)
    assert Tokenizer(path).special_ids == tokens.MMJAX


def test_a_tokenizer_without_pad_mask_or_cls_states_none(tmp_path):
    """An LLM-style sentencepiece model (unk 0, bos 1, eos 2, no pad, no <mask>, no <cls>)."""
    import sentencepiece as spm

    prefix = str(tmp_path / "llm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"a blue square number {i}" for i in range(200)]),
        model_prefix=prefix,
        vocab_size=40,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    ids = Tokenizer(prefix + ".model").special_ids
    assert ids == {"pad": None, "unk": 0, "bos": 1, "eos": 2, "mask": None, "cls": None}
    t = tokens.TokenIds.of(ids)
    assert t.special == (0, 1, 2) and t.first_word == 3
    with pytest.raises(config_lib.ConfigError, match="ALBEF's MLM needs a mask token"):
        t.need("mask", "ALBEF's MLM")


def test_token_ids_are_derived_and_checked():
    cfg = config_lib.load(DEMO, TINY)
    assert "token_ids" not in cfg.model
    config_lib.derive_model_keys(cfg, V, OTHER)
    assert cfg.model.token_ids.to_dict() == OTHER and zoo.build(cfg.model).c.tokens == tokens.TokenIds(**OTHER)
    config_lib.derive_model_keys(cfg, V, OTHER)  # the same tokenizer again: no contradiction
    with pytest.raises(config_lib.ConfigError, match="model.token_ids=.* contradicts the tokenizer's special ids"):
        config_lib.derive_model_keys(cfg, V, tokens.MMJAX)
    with pytest.raises(config_lib.ConfigError, match="unknown token name 'sep'"):
        zoo.build(ml_collections.ConfigDict(dict(cfg.model.to_dict(), token_ids={"sep": 1})))
    # a family that needs a token the tokenizer lacks says so when it is built
    no_mask = dict(OTHER, mask=None)
    albef = config_lib.load(f"{ROOT}/configs/albef.py", TINY)
    config_lib.derive_model_keys(albef, V, no_mask)
    with pytest.raises(config_lib.ConfigError, match="model.tasks 'mlm' needs a mask token"):
        zoo.build(albef.model)
    with albef.unlocked():
        albef.model.tasks = ("itc", "itm")
    zoo.build(albef.model)


def _pair(recipe, extra=()):
    """(family for mmjax's ids, family for OTHER's) from one recipe."""
    out = []
    for ids in (tokens.MMJAX, OTHER):
        cfg = config_lib.load(f"{ROOT}/configs/{recipe}.py", TINY + list(extra))
        config_lib.derive_model_keys(cfg, V, ids)
        out.append(zoo.build(cfg.model))
    return out


def _permuted(params):
    """Every vocabulary axis (size V) of every param permuted by PERM: row i of the
    mmjax model's table becomes row PERM[i] of the other model's."""
    inv = np.argsort(PERM)  # other id -> mmjax id

    def one(x):
        for axis, n in enumerate(x.shape):
            if n == V:
                x = jnp.take(x, inv, axis=axis)
        return x

    return jax.tree.map(one, params)


def _texts(rng, n=6, length=12):
    """mmjax-tokenized texts: bos, words (ids 6..V-1), eos, then pad."""
    out = np.zeros((n, length), np.int32)
    for i in range(n):
        k = int(rng.integers(1, length - 2))
        out[i, : k + 2] = [2, *rng.integers(6, V, k), 3]
    return out


@pytest.mark.parametrize("recipe", ["demo", "albef", "blip", "coca", "vlmo"])
def test_text_embeddings_follow_the_tokenizer_ids(recipe):
    mm, other = _pair(recipe, ["model.queue_size=16"] if recipe in ("albef", "blip") else [])
    params = mm.init_params(jax.random.PRNGKey(0))
    text = _texts(np.random.default_rng(0))
    want = mm.encode_text(params, jnp.asarray(text))
    got = other.encode_text(_permuted(params), jnp.asarray(PERM[text]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    # and it is not the same function under the wrong ids (the check can fail)
    wrong = mm.encode_text(_permuted(params), jnp.asarray(PERM[text]))
    assert not np.allclose(np.asarray(wrong), np.asarray(want), atol=1e-3)


@pytest.mark.parametrize("recipe", ["coca", "blip"])
def test_captions_follow_the_tokenizer_ids(recipe):
    mm, other = _pair(recipe, ["model.queue_size=16"] if recipe == "blip" else [])
    params = mm.init_params(jax.random.PRNGKey(1))
    image = jax.random.uniform(jax.random.PRNGKey(2), (3, 16, 16, 3))
    want = np.asarray(mm.caption(params, image, max_len=8))
    got = np.asarray(other.caption(_permuted(params), image, max_len=8))
    assert (want[:, 0] == tokens.MMJAX["bos"]).all() and (got[:, 0] == OTHER["bos"]).all()
    np.testing.assert_array_equal(got, PERM[want])


def test_caption_loss_skips_the_tokenizer_pad():
    rng = np.random.default_rng(3)
    ids = _texts(rng)
    logits = jnp.asarray(rng.normal(size=(*ids.shape, V)), jnp.float32)
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    tgt = ids[:, 1:]
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    want = (nll * (tgt != 0)).sum() / (tgt != 0).sum()  # numpy: mmjax's pad 0 is no target
    loss, _ = lm_loss(logits, jnp.asarray(ids))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    inv = np.argsort(PERM)
    loss_other, _ = lm_loss(jnp.take(logits, inv, axis=-1), jnp.asarray(PERM[ids]), pad_id=OTHER["pad"])
    np.testing.assert_allclose(float(loss_other), want, rtol=1e-5)


def test_mlm_masking_never_touches_the_tokenizer_specials():
    t = tokens.TokenIds(**OTHER)
    ids = jnp.asarray(PERM[_texts(np.random.default_rng(4), n=64)])
    masked, target = mask_tokens(jax.random.PRNGKey(0), ids, vocab_size=V, prob=0.5, **t.mlm("MLM"))
    masked, target, ids = np.asarray(masked), np.asarray(target), np.asarray(ids)
    special = np.isin(ids, list(OTHER.values()))
    assert (masked[special] == ids[special]).all() and not target[special].any()
    changed = masked != ids
    assert changed.any() and (masked[changed & (masked != OTHER["mask"])] >= t.first_word).all()
    assert not np.isin(masked[changed & (masked != OTHER["mask"])], list(OTHER.values())).any()
