"""`mmjax generate` and `mmjax.load(W).generate(...)`: continue text prompts (and,
for a family with an image input, images + prompts) with a workdir's model.

Prompts are tokenized without truncation, left-padded to a multiple of
`PROMPT_BUCKET` (so prompts of similar length share one compiled program), and
continued by the family's `generate` (the KV-cached loop of mmjax/models/generate.py):
greedy, beam search or temperature + top-p sampling. Stop strings cut the decoded
text at their first occurrence (the tokens are cut to match).
"""

from __future__ import annotations

import numpy as np

PROMPT_BUCKET = 16
METHODS = ("greedy", "sample", "beam")


def left_pad(rows: list[list[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
    """Token lists -> (ids [B, P] int32, valid [B, P] bool), right-aligned, P the
    longest row rounded up to a multiple of `bucket`."""
    if not rows or not all(rows):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(map(len, rows)) // bucket) * bucket
    ids = np.full((len(rows), length), pad_id, np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = r
        valid[i, length - len(r) :] = True
    return ids, valid


def truncate_at_stop(text: str, stops) -> tuple[str, bool]:
    """(text up to the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops or () if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def prompt_tokens(tokenizer, text: str) -> list[int]:
    """A prompt's ids: bos (where the tokenizer has one), then the text (case as the
    tokenizer treats it), no eos."""
    bos = [] if tokenizer.bos_id is None or tokenizer.bos_id < 0 else [int(tokenizer.bos_id)]
    return bos + [int(i) for i in tokenizer.encode_plain(text)]


def sampling_options(method: str, *, temperature=1.0, top_p=1.0, seed=0, beams=1, length_penalty=0.0) -> dict:
    """The family.generate keywords of a decoding method; ValueError for a bad one."""
    import jax

    if method not in METHODS:
        raise ValueError(f"decoding method {method!r}; valid choices: {', '.join(METHODS)}")
    if method == "sample" and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"--temperature {temperature} --top-p {top_p}: need temperature > 0 and 0 < top_p <= 1")
    if method == "beam" and beams < 1:
        raise ValueError(f"--beams {beams}: need at least 1")
    opts = dict(method=method)
    if method == "sample":
        opts.update(temperature=float(temperature), top_p=float(top_p), rng=jax.random.PRNGKey(int(seed)))
    if method == "beam":
        opts.update(beams=int(beams), length_penalty=float(length_penalty))
    return opts


def _decode_row(tokenizer, ids, pad_id: int, stop_ids, stops) -> dict:
    ids = [int(i) for i in ids]
    cut = next((k for k, t in enumerate(ids) if t in stop_ids or t == pad_id), len(ids))
    kept = ids[:cut]
    text, stopped = truncate_at_stop(tokenizer.decode_plain(kept), stops)
    if stopped:  # the fewest tokens that spell the kept text
        k = next((k for k in range(len(kept) + 1) if len(tokenizer.decode_plain(kept[:k])) >= len(text)), len(kept))
        kept = kept[:k]
    return {"text": text, "ids": kept}


def generate_texts(family, params, tokenizer, prompts, *, max_new_tokens=32, stops=(), batch_size=32, **method_opts):
    """Continues each prompt; -> one dict per prompt: {'prompt', 'text', 'ids'} (the
    new text and token ids, eos and what follows removed, cut at a stop string)."""
    import jax

    if not family.can("generate"):
        raise ValueError(f"model.family {family.names[0]!r} does not generate text (no 'generate' capability)")
    opts = sampling_options(**method_opts)
    pad, max_new_tokens = int(family.pad_id), int(max_new_tokens)
    run = jax.jit(lambda p, i, v: family.generate(p, {"ids": i, "valid": v}, max_new_tokens=max_new_tokens, **opts))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        ids, valid = left_pad([prompt_tokens(tokenizer, p) for p in chunk], pad)
        tokens, _ = run(params, ids, valid)
        for prompt, row in zip(chunk, np.asarray(tokens)):
            out.append({"prompt": prompt, **_decode_row(tokenizer, row, pad, family.stop_ids(), stops)})
    return out
