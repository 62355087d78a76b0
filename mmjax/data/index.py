"""The record order of the index-based reader: which record fills each row of each global batch.

Pure numpy (no TensorFlow, no jax); every function is stateless, so any process computes the same order
from (seed, global batch index) alone, whatever the number of processes or devices.

- **Permutation.** `permute(i, n, key)` is a seeded bijection of [0, n): a 4-round balanced Feistel network over
  the smallest even-bit domain [0, 2**b) with 2**b >= n (b >= 2), plus cycle-walking (a value >= n is permuted
  again until it falls below n). Halves have h = b / 2 bits; round r (0..3) maps (L, R) -> (R, L ^ F_r(R)) with
  F_r(R) = mix64(R ^ k_r) & (2**h - 1), k_r = mix64(key + (r + 1) * GOLDEN mod 2**64), and mix64 the splitmix64
  finalizer. Only wrapping uint64 operations, so the order is the same on every platform.
- **Streams.** Source s with n records is an endless stream: position k is record
  `permute(k % n, n, stream_key(seed, s, k // n))`, so every epoch is a fresh permutation and every record
  appears once per epoch.
- **Global batches.** Source s gets a fixed quota q_s of the G rows of every batch (largest-remainder
  apportionment of G * w_s). In batch g the slots [0]*q_0 + [1]*q_1 + ... are shuffled by
  `permute(arange(G), G, mix_key(seed, g))`; the slot of source s with rank r among s's slots reads stream
  position g * q_s + r. Hence drawn_s(g) = g * q_s, and the state is one small JSON dict. Row j has the global
  position pos = g * G + j (the augmentation seed). Process p of P keeps rows [p * B, (p + 1) * B), B = G / P.
- **Unreadable records** are replaced by the next readable record of the same source's epoch order
  (`replacement_positions`), keeping the row's pos: later positions never shift.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_TAG_STREAM, _TAG_MIX = 0x53545245414D, 0x4D4958
MAX_N = 1 << 62


def _mix64_int(z: int) -> int:
    """splitmix64 finalizer on a Python int (taken mod 2**64) -> int in [0, 2**64)."""
    z &= M64
    z = ((z ^ (z >> 30)) * _C1) & M64
    z = ((z ^ (z >> 27)) * _C2) & M64
    return z ^ (z >> 31)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping multiplies) -> uint64 array of the same shape."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
    return z ^ (z >> np.uint64(31))


def _hash(*parts: int) -> int:
    """A 64-bit key from a tuple of ints (negative ints taken mod 2**64)."""
    z = 0
    for p in parts:
        z = _mix64_int(((z ^ (int(p) & M64)) + GOLDEN) & M64)
    return z


def stream_key(seed: int, source: int, epoch: int) -> int:
    """The 64-bit permutation key of epoch `epoch` of source `source`'s stream."""
    return _hash(_TAG_STREAM, seed, source, epoch)


def mix_key(seed: int, batch_index: int) -> int:
    """The 64-bit key that shuffles the source slots of global batch `batch_index`."""
    return _hash(_TAG_MIX, seed, batch_index)


def _domain_bits(n: int) -> int:
    b = max(2, (n - 1).bit_length())
    return b + (b & 1)


def permute(i, n: int, key: int) -> np.ndarray:
    """Seeded bijection of [0, n) (see the module docstring), vectorised.

    i: int or int array of any shape, values in [0, n); n in [1, 2**62]; key: int (mod 2**64).
    -> int64 array of i's shape (0-d for a scalar i).
    """
    n = int(n)
    if not 1 <= n <= MAX_N:
        raise ValueError(f"permute: n must be in [1, 2**62], got {n}")
    i = np.asarray(i)
    shape = i.shape
    flat = i.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n):
        raise ValueError(f"permute: indices must be in [0, {n}), got [{flat.min()}, {flat.max()}]")
    half = _domain_bits(n) // 2
    sh, mask = np.uint64(half), np.uint64((1 << half) - 1)
    keys = [np.uint64(_mix64_int(int(key) + (r + 1) * GOLDEN)) for r in range(4)]

    def feistel(v):
        left, right = v >> sh, v & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << sh) | right

    with np.errstate(over="ignore"):
        out = feistel(flat.astype(np.uint64))
        bad = np.nonzero(out >= np.uint64(n))[0]
        while bad.size:  # cycle-walking: the domain is < 4n, so a few steps on average
            out[bad] = feistel(out[bad])
            bad = bad[out[bad] >= np.uint64(n)]
    return out.astype(np.int64).reshape(shape)


def stream_index(k, n: int, seed: int, source: int) -> np.ndarray:
    """Record index at stream position(s) k of a source with n records.

    k: int or int array (>= 0) of any shape -> int64 array of k's shape: epoch, i = divmod(k, n);
    record = permute(i, n, stream_key(seed, source, epoch)).
    """
    k = np.asarray(k, dtype=np.int64)
    if k.size and k.min() < 0:
        raise ValueError(f"stream_index: stream positions must be >= 0, got {k.min()}")
    epoch, i = np.divmod(k, np.int64(n))
    out = np.empty_like(k)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = permute(i[sel], n, stream_key(seed, source, int(e)))
    return out


def replacement_positions(k: int, n: int, limit: int = 16) -> list[int]:
    """Stream positions tried in order when the record at stream position k is unreadable.

    The positions after k in the same epoch's order, wrapping to the start of that epoch, so each one names
    a different record than k's (and than each other): e*n + (i + j) % n for j = 1..min(limit, n - 1), where
    e, i = divmod(k, n). Pass them to stream_index. A pure function of (k, n): the same on every topology.
    """
    e, i = divmod(int(k), int(n))
    return [e * n + (i + j) % n for j in range(1, min(int(limit), n - 1) + 1)]


def quotas(weights, global_batch: int) -> list[int]:
    """Rows per global batch for each source: largest-remainder apportionment of G * w_s / sum(w).

    Exact rational arithmetic; ties on the remainder go to the earlier source. Raises ValueError for a
    negative or non-finite weight, a zero sum, or a source with weight > 0 whose quota is 0.
    """
    G, weights = int(global_batch), list(weights)
    if G < 1:
        raise ValueError(f"global batch must be >= 1, got {G}")
    if not weights or any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"mixture weights must be finite and >= 0, got {weights}")
    w = [Fraction(float(x)) for x in weights]
    total = sum(w)
    if total <= 0:
        raise ValueError(f"mixture weights must sum to > 0, got {weights}")
    exact = [G * x / total for x in w]
    q = [int(x) for x in exact]  # floor: exact >= 0
    by_remainder = sorted(range(len(w)), key=lambda s: (-(exact[s] - q[s]), s))
    for s in by_remainder[: G - sum(q)]:
        q[s] += 1
    for s, (x, n) in enumerate(zip(weights, q)):
        if x > 0 and n == 0:
            raise ValueError(
                f"mixture source {s} has weight {x} but gets 0 of the {G} rows of a global batch: "
                "raise its weight or the global batch"
            )
    return q


def process_slice(global_batch: int, process_count: int, process_index: int) -> slice:
    """Rows [r * B, (r + 1) * B) of a global batch that process r of P keeps (B = G / P)."""
    G, P, r = int(global_batch), int(process_count), int(process_index)
    if P < 1 or G % P:
        raise ValueError(f"the global batch ({G}) must be a multiple of the process count ({P})")
    if not 0 <= r < P:
        raise ValueError(f"process index {r} out of range for {P} processes")
    B = G // P
    return slice(r * B, (r + 1) * B)


def local_rows(plan: dict, rank: int, per_process: int) -> dict:
    """Rows [rank * B, (rank + 1) * B) of every [G] array of `plan` (B = per_process) -> dict of [B] arrays."""
    B, rank = int(per_process), int(rank)
    G = len(next(iter(plan.values())))
    if B < 1 or rank < 0 or (rank + 1) * B > G:
        raise ValueError(f"rows [{rank * B}, {(rank + 1) * B}) of process {rank} are out of a global batch of {G}")
    return {name: a[rank * B : (rank + 1) * B] for name, a in plan.items()}


class GlobalOrder:
    """The global batches over one source or a weighted mixture; stateless in the batch index.

    sizes: records per source (>= 1 each). weights: one per source (None: proportional to sizes, i.e. as if the
    sources were concatenated). The order depends on (sizes, weights, seed, global_batch) only, never on the
    number of processes.
    """

    def __init__(self, sizes: list[int], weights: list[float] | None, seed: int, global_batch: int):
        self.sizes = [int(n) for n in sizes]
        if not self.sizes or any(not 1 <= n <= MAX_N for n in self.sizes):
            raise ValueError(f"every source needs between 1 and 2**62 records, got sizes {self.sizes}")
        self.weights = [float(x) for x in (self.sizes if weights is None else weights)]
        if len(self.weights) != len(self.sizes):
            raise ValueError(f"{len(self.weights)} weights for {len(self.sizes)} sources")
        self.seed, self.global_batch = int(seed), int(global_batch)
        self.quota = quotas(self.weights, self.global_batch)
        self._slots = np.repeat(np.arange(len(self.sizes), dtype=np.int64), self.quota)

    def plan(self, batch_index: int) -> dict:
        """Global batch g -> {"source", "stream", "record", "pos"}: int64 arrays of shape [G].

        stream: the position in its source's stream (for replacement_positions); record: the record index in
        its source; pos: g * G + j, the row's global position (seeds the augmentation).
        """
        g, G = int(batch_index), self.global_batch
        if g < 0:
            raise ValueError(f"batch index must be >= 0, got {g}")
        rows = np.arange(G, dtype=np.int64)
        source = self._slots if len(self.sizes) == 1 else self._slots[permute(rows, G, mix_key(self.seed, g))]
        order = np.argsort(source, kind="stable")  # rows grouped by source, in row order within a source
        rank = np.empty(G, dtype=np.int64)
        rank[order] = rows - np.repeat(np.cumsum(self.quota) - self.quota, self.quota)
        stream = g * np.asarray(self.quota, dtype=np.int64)[source] + rank
        record = np.empty(G, dtype=np.int64)
        for s, n in enumerate(self.sizes):
            sel = source == s
            record[sel] = stream_index(stream[sel], n, self.seed, s)
        return {"source": source.copy(), "stream": stream, "record": record, "pos": g * G + rows}

    def drawn(self, batch_index: int) -> list[int]:
        """Stream positions consumed per source before global batch `batch_index`."""
        return [int(batch_index) * q for q in self.quota]

    def state(self, batch_index: int) -> dict:
        """The JSON-able resume state before global batch `batch_index` (the next batch to produce)."""
        return {
            "version": 1,
            "batch": int(batch_index),
            "drawn": self.drawn(batch_index),
            "global_batch": self.global_batch,
            "seed": self.seed,
            "sizes": list(self.sizes),
            "weights": list(self.weights),
        }

    def check_state(self, state: dict) -> int:
        """Validates a saved state against this order -> the batch index to resume at.

        Raises ValueError (one line) when the data (sizes), weights, seed or global batch differ. The process
        count is not part of the state: a resume on another topology is allowed.
        """
        if state.get("version") != 1:
            raise ValueError(f"data state version {state.get('version')!r} is not supported (expected 1)")
        checks = (
            ("sizes", [int(n) for n in state.get("sizes") or []], self.sizes, "the data (record counts per source)"),
            ("weights", [float(x) for x in state.get("weights") or []], self.weights, "the mixture weights"),
            ("seed", state.get("seed"), self.seed, "the data seed"),
            ("global_batch", state.get("global_batch"), self.global_batch, "the global batch"),
        )
        for key, then, now, what in checks:
            if then != now:
                raise ValueError(
                    f"cannot resume: {what} changed since the checkpoint ({key}: {state.get(key)} then, {now} now) "
                    "and the data order depends on it"
                )
        g = int(state["batch"])
        if g < 0 or list(state.get("drawn", [])) != self.drawn(g):
            raise ValueError(f"data state is inconsistent: batch {g} with drawn {state.get('drawn')}")
        return g
