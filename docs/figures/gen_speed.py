"""Generation speed of a decoder LM with and without the KV cache (docs/benchmarks.md).

    python docs/figures/gen_speed.py [--workdir workdirs/lm] [--new 48] [--prompt 16]

New tokens per second (batch x new tokens / seconds, compile excluded, best of 3) of
greedy generation from a random prompt, batch 1 and 32, cached and uncached
(`mmjax.models.generate.generate(use_cache=...)`). Without --workdir: configs/lm.py's
LM with random params and a 320-token vocabulary.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import generate as generate_lib
from mmjax.models.llm import DecoderLM, init_params
from mmjax.models.zoo.lm import LM_KEYS, lm_spec


def model(workdir):
    if workdir:
        from mmjax import workdir as workdir_lib

        opened = workdir_lib.open_workdir(workdir)
        return opened.family.model, opened.params
    lm = dict(LM_KEYS, width=128, depth=4, heads=4, kv_heads=2, mlp_dim=352)
    spec = lm_spec(lm, 320)
    return DecoderLM(spec), init_params(spec, jax.random.PRNGKey(0))


def tokens_per_s(lm, params, batch, prompt, new, use_cache):
    ids = np.random.default_rng(0).integers(6, lm.spec.vocab_size, size=(batch, prompt)).astype(np.int32)
    x = lm.apply({"params": params}, jnp.asarray(ids), method=DecoderLM.embed)
    valid = jnp.ones((batch, prompt), bool)
    run = lambda: generate_lib.generate(
        lm, params, x, valid, max_new_tokens=new, eos_ids=(-1,), pad_id=0, use_cache=use_cache
    )[0].block_until_ready()
    run()  # compile
    best = min(_timed(run) for _ in range(3))
    return batch * new / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=None)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--prompt", type=int, default=16)
    a = p.parse_args()
    lm, params = model(a.workdir)
    rows = []
    for batch in (1, 32):
        for cache in (True, False):
            rows.append(
                dict(
                    batch=batch,
                    kv_cache=cache,
                    tokens_per_s=round(tokens_per_s(lm, params, batch, a.prompt, a.new, cache), 1),
                )
            )
    print(json.dumps(dict(device=str(jax.devices()[0]), prompt=a.prompt, new=a.new, rows=rows)))


if __name__ == "__main__":
    main()
