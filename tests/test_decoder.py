"""The captioning decoder (issue 7, in progress): causality, KV-cached greedy decoding
equal to uncached decoding, and the LM loss against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.decoder import TextDecoder, beam_search, greedy_decode
from mmjax.objectives import lm_loss

V, L, S, DM = 30, 10, 7, 12


def _model():
    return TextDecoder(V, L, width=16, depth=2, num_heads=2, mlp_dim=32)


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    memory = jnp.asarray(rng.normal(size=(3, S, DM)), jnp.float32)
    ids = jnp.asarray(np.concatenate([np.full((3, 1), 2), rng.integers(6, V, (3, L - 1))], 1), jnp.int32)
    params = _model().init(jax.random.PRNGKey(seed), ids, memory)["params"]
    # Larger output weights than the init so greedy decoding is not dominated by ties.
    params = jax.tree.map(lambda x: x * 3.0, params)
    return params, ids, memory


def test_position_i_sees_only_tokens_up_to_i():
    params, ids, memory = _setup()
    m = _model()
    base = m.apply({"params": params}, ids, memory)
    for i in range(L - 1):
        changed = ids.at[:, i + 1 :].set((ids[:, i + 1 :] + 7) % (V - 6) + 6)
        out = m.apply({"params": params}, changed, memory)
        np.testing.assert_allclose(np.asarray(out[:, : i + 1]), np.asarray(base[:, : i + 1]), rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.asarray(out[:, i + 1 :]), np.asarray(base[:, i + 1 :]))
    # The memory matters (cross-attention), and padding memory tokens hides them.
    other = m.apply({"params": params}, ids, memory.at[:, -2:].set(5.0))
    assert not np.allclose(np.asarray(other), np.asarray(base))
    valid = jnp.arange(S)[None] < S - 2
    a = m.apply({"params": params}, ids, memory, jnp.broadcast_to(valid, (3, S)))
    b = m.apply({"params": params}, ids, memory.at[:, -2:].set(5.0), jnp.broadcast_to(valid, (3, S)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_decoding_gives_the_uncached_tokens(seed):
    params, _, memory = _setup(seed)
    m = _model()
    cached = greedy_decode(m, params, memory, max_len=L, bos_id=2, eos_id=3, use_cache=True)
    plain = greedy_decode(m, params, memory, max_len=L, bos_id=2, eos_id=3, use_cache=False)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))
    toks = np.asarray(cached)
    assert (toks[:, 0] == 2).all() and len(set(map(tuple, toks))) > 1  # captions depend on the memory
    # Each generated token is the argmax of the training-mode logits at its prefix.
    logits = np.asarray(m.apply({"params": params}, cached, memory))
    for b in range(toks.shape[0]):
        for i in range(L - 1):
            if toks[b, i] == 3 or (i > 0 and toks[b, i] == 0):
                break
            lg = logits[b, i].copy()
            lg[0] = -np.inf
            assert toks[b, i + 1] == int(np.argmax(lg))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_loss_matches_numpy(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    ids = np.array([[2, 5, 7, 3, 0, 0], [2, 8, 6, 6, 4, 3]], np.int32)
    loss, metrics = lm_loss(jnp.asarray(logits), jnp.asarray(ids), label_smoothing=smoothing)
    total, n, hits = 0.0, 0, 0
    for b in range(2):
        for i in range(5):
            t = ids[b, i + 1]
            if t == 0:
                continue
            z = logits[b, i].astype(np.float64)
            logp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
            q = np.full(9, smoothing / 9)
            q[t] += 1 - smoothing
            total += -(q * logp).sum()
            n += 1
            hits += int(np.argmax(z) == t)
    np.testing.assert_allclose(float(loss), total / n, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["lm_acc"]), hits / n, rtol=1e-6)


def _sequence_logprob(m, params, memory, seqs):
    """Summed log-probability of each candidate (bos + tokens, PAD after eos) and its
    generated length, scored by the training-mode decoder."""
    logits = m.apply({"params": params}, seqs, memory)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    seqs = np.asarray(seqs)
    out, lens = [], []
    for r in range(len(seqs)):
        total, n = 0.0, 0
        for i in range(seqs.shape[1] - 1):
            t = seqs[r, i + 1]
            if t == 0:
                break
            total += logp[r, i, t]
            n += 1
            if t == 3:
                break
        out.append(total)
        lens.append(n)
    return np.array(out), np.array(lens)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_with_enough_beams_is_exhaustive(alpha):
    """Vocabulary 6 (PAD 0, bos 2, eos 3), 3 generated tokens: 36 beams keep every
    prefix, so the beam's answer must be the best of all sequences scored one by one
    (length-normalised by length ** alpha); and one beam is greedy decoding."""
    import itertools

    v, max_len = 6, 4
    m = TextDecoder(v, max_len, width=16, depth=2, num_heads=2, mlp_dim=32)
    rng = np.random.default_rng(3)
    memory = jnp.asarray(rng.normal(size=(2, S, DM)), jnp.float32)
    params = m.init(jax.random.PRNGKey(4), jnp.full((2, max_len), 2, jnp.int32), memory)["params"]
    params = jax.tree.map(lambda x: x * 3.0, params)
    tokens, score = beam_search(m, params, memory, max_len=max_len, bos_id=2, eos_id=3, beams=36, length_penalty=alpha)
    cands = set()
    for seq in itertools.product([1, 2, 3, 4, 5], repeat=max_len - 1):
        seq = list(seq)
        if 3 in seq:
            seq = seq[: seq.index(3) + 1] + [0] * (len(seq) - seq.index(3) - 1)
        cands.add((2, *seq))
    cands = np.array(sorted(cands), np.int32)
    for b in range(2):
        lp, n = _sequence_logprob(m, params, jnp.repeat(memory[b : b + 1], len(cands), 0), jnp.asarray(cands))
        norm = lp / np.maximum(n, 1) ** alpha
        best = int(np.argmax(norm))
        np.testing.assert_array_equal(np.asarray(tokens[b]), cands[best])
        np.testing.assert_allclose(float(score[b]), norm[best], rtol=1e-4)
    greedy = greedy_decode(m, params, memory, max_len=max_len, bos_id=2, eos_id=3)
    one, _ = beam_search(m, params, memory, max_len=max_len, bos_id=2, eos_id=3, beams=1, length_penalty=alpha)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(greedy))
