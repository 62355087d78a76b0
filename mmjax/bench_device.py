"""Device-level measurements for `mmjax bench`: the matmul ceiling MFU is reported
against, the peak device memory, and the captioning decoder's speed."""

from __future__ import annotations

import time

import jax


def matmul_ceiling(n: int | None = None, dtype=None, reps: int = 10) -> dict:
    """The measured matmul throughput of one device: an n x n @ n x n product in
    `dtype` (default bf16, n = 8192 on accelerators; f32, n = 1024 on CPU), best of
    `reps` timed calls. MFU is reported against this, not a datasheet figure."""
    import jax.numpy as jnp

    dev = jax.local_devices()[0]
    cpu = dev.platform == "cpu"
    n = int(n or (1024 if cpu else 8192))
    dtype = dtype or (jnp.float32 if cpu else jnp.bfloat16)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(k1, (n, n), dtype), dev)
    b = jax.device_put(jax.random.normal(k2, (n, n), dtype), dev)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return {"matmul_n": n, "matmul_dtype": jnp.dtype(dtype).name, "matmul_tflops": 2 * n**3 / best / 1e12}


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on this process's first device since start (None where the
    backend does not report it, e.g. CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # not implemented on this backend
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def decode_speed(
    width: int = 256,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int = 1024,
    vocab: int = 8000,
    max_len: int = 32,
    memory_len: int = 65,
    batch: int = 64,
    reps: int = 3,
    beams: int = 4,
) -> dict:
    """Captions per second of one randomly initialised TextDecoder, greedy with and
    without the KV cache and beam search (cached), compiled once, best of `reps`."""
    import jax.numpy as jnp

    from mmjax.models.decoder import TextDecoder, beam_search, greedy_decode
    from mmjax.models.tokens import MMJAX

    m = TextDecoder(vocab, max_len, width, depth, heads, mlp_dim)
    memory = jax.random.normal(jax.random.PRNGKey(1), (batch, memory_len, width))
    ids = dict(bos_id=MMJAX["bos"], eos_id=MMJAX["eos"])  # mmjax's tokenizer (the decoder's pad_id default)
    params = m.init(jax.random.PRNGKey(0), jnp.full((batch, max_len), ids["bos_id"], jnp.int32), memory)["params"]
    runs = {
        "greedy_cached": lambda: greedy_decode(m, params, memory, max_len=max_len, **ids),
        "greedy_uncached": lambda: greedy_decode(m, params, memory, max_len=max_len, **ids, use_cache=False),
        f"beam{beams}_cached": lambda: beam_search(m, params, memory, max_len=max_len, **ids, beams=beams)[0],
    }
    out = {"batch": batch, "max_len": max_len, "width": width, "depth": depth, "platform": jax.devices()[0].platform}
    for name, fn in runs.items():
        jax.block_until_ready(fn())
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - t0)
        out[name + "_captions_per_s"] = batch / best
    out["cache_speedup"] = out["greedy_cached_captions_per_s"] / out["greedy_uncached_captions_per_s"]
    return out
