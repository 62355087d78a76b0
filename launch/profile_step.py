"""Where the time of one compiled train step goes, op by op, on this machine.

    python launch/profile_step.py --config configs/clip_s16_64.py [--batch-size 128] [--steps 2]

Compiles the config's real step (as `mmjax bench` does), traces `--steps` calls with
`jax.profiler`, and prints: each HLO op kind's time, the model code the ops come from
(their `op_name` metadata, blocks folded together, forward and backward apart), and how
busy each XLA worker thread was (sum of its events over the traced span), with the idle
time split by what the other thread ran meanwhile. Times are summed over threads, so
they exceed the wall time when ops overlap; fused backward ops often carry their forward
op's name, so the fwd/bwd split is a lower bound on the backward. docs/performance.md
has the findings.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

from mmjax import bench
from mmjax import config as config_lib

SKIP = ("ThunkExecutor", "Threadpool", "Slinky", "PjRt", "TfrtCpu", "Pjit", "$", "end:")


def _instructions(hlo: str) -> dict:
    """instruction name -> (kind, op_name) from the compiled HLO text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if m:
            meta = re.search(r'op_name="([^"]+)"', line)
            kind = "ynn (matmul)" if "__ynn_fusion" in line else m.group(2)
            out[m.group(1)] = (kind, meta.group(1) if meta else "?")
    return out


def _source(op_name: str) -> str:
    side = "bwd" if "transpose(" in op_name else "fwd"
    parts = [p for p in op_name.split("/") if p][-2:]
    return f"{side} " + re.sub(r"block\d+", "blockN", "/".join(parts))[:90]


def _threads(events, names):
    per = collections.defaultdict(list)
    for e in events:
        key = (e["pid"], e["tid"])
        if "Eigen" in names.get(key, "") and not e["name"].startswith(SKIP):
            per[key].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    rows, during = [], collections.Counter()
    keys = sorted(per, key=lambda k: -len(per[k]))[:2]
    for k in keys:
        per[k].sort()
        busy = sum(t - s for s, t, _ in per[k])
        rows.append((names[k], busy, per[k][-1][1] - per[k][0][0], len(per[k])))
    if len(keys) == 2:
        for a, b in ((keys[0], keys[1]), (keys[1], keys[0])):
            end, other = per[a][0][1], per[b]
            j = 0
            for s, t, _ in per[a][1:]:
                if s > end:
                    mid = (s + end) / 2
                    while j + 1 < len(other) and other[j + 1][0] <= mid:
                        j += 1
                    running = other[j][2] if other[j][0] <= mid <= other[j][1] else "(nothing)"
                    during[re.sub(r"\.\d+$", "", running)] += s - end
                end = max(end, t)
    return rows, during


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    config = config_lib.load(a.config)
    if a.batch_size:
        with config.unlocked():
            config.train.batch_size = a.batch_size
    family, opt, mesh, trainable, init, _, shard = bench._prepare(config)
    state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
    batch = bench.synthetic_batch(config, family, int(config.train.batch_size))
    fn = bench._compiled_step(config, family, opt, mesh, trainable, shard)
    inst = _instructions(fn.lower(state, batch).compile().as_text())
    for _ in range(2):
        state, m = fn(state, batch)
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(a.steps):
                state, m = fn(state, batch)
            jax.block_until_ready(m)
        wall = (time.perf_counter() - t0) / a.steps
        trace = json.load(gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]))
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    by_kind, by_source = collections.Counter(), collections.Counter()
    for e in events:
        if e["name"] in inst:
            kind, op_name = inst[e["name"]]
            by_kind[kind] += e["dur"]
            by_source[_source(op_name)] += e["dur"]
    ms = lambda us: us / a.steps / 1000  # noqa: E731
    print(f"step {1000 * wall:.1f} ms wall (profiled), ops {ms(sum(by_kind.values())):.1f} ms summed over threads")
    print("-- by op kind (ms / step)")
    for k, v in by_kind.most_common(8):
        print(f"{ms(v):9.1f}  {k}")
    print("-- by model code (ms / step)")
    for k, v in by_source.most_common(25):
        print(f"{ms(v):9.1f}  {k}")
    rows, during = _threads(events, names)
    print("-- worker threads")
    for name, busy, span, n in rows:
        print(f"{name[:32]:32s} busy {busy / max(span, 1):.0%} of the span, {n // a.steps} events / step")
    print("-- idle time by what the other thread ran (ms / step)")
    for k, v in during.most_common(6):
        print(f"{ms(v):9.1f}  {k}")


if __name__ == "__main__":
    main()
