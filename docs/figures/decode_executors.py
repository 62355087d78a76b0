"""docs/benchmarks.md, "Why tf.data for decode and augment": decode + augment (train_map,
224 px) of the same 1,024 shard records, executed by (a) a tf.data parallel map (mmjax's
choice), (b) a Python thread pool calling a tf.function per record (Grain's execution
model), (c) Grain itself where it is importable (GRAIN_PATH: a directory holding it).

    python docs/figures/decode_executors.py SHARDS_DIR
"""

import json
import os
import sys
import time

import numpy as np
import tensorflow as tf

from mmjax import config as config_lib
from mmjax.data.augment import train_map
from mmjax.data.records import ArrayRecordShards

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cfg = config_lib.load(os.path.join(ROOT, "configs/demo.py:emoji"), ["data.image_size=224"]).data
r = ArrayRecordShards(sys.argv[1])
N = 1024
recs = [{"image": s["image"], "caption": s["caption"].encode(), "id": np.int64(s["id"])} for s in r.read(range(N))]
fn = train_map(cfg, 0, 0)
spec = {
    "image": tf.TensorSpec([], tf.string),
    "caption": tf.TensorSpec([], tf.string),
    "id": tf.TensorSpec([], tf.int64),
}
out = {}


def tfdata(k):
    ds = tf.data.Dataset.from_generator(
        lambda: ((np.int64(i), rec) for i, rec in enumerate(recs)), output_signature=(tf.TensorSpec([], tf.int64), spec)
    )
    ds = ds.map(fn, num_parallel_calls=k, deterministic=True)
    o = tf.data.Options()
    o.threading.private_threadpool_size = k
    o.deterministic = True
    t = time.perf_counter()
    n = sum(1 for _ in ds.with_options(o).as_numpy_iterator())
    return n / (time.perf_counter() - t)


tfn = tf.function(fn, input_signature=(tf.TensorSpec([], tf.int64), spec))


def one(i):
    return {
        k: v.numpy() for k, v in tfn(tf.constant(i, tf.int64), {k: tf.constant(v) for k, v in recs[i].items()}).items()
    }


def threads(k):
    from concurrent.futures import ThreadPoolExecutor

    one(0)
    with ThreadPoolExecutor(k) as ex:
        t = time.perf_counter()
        n = sum(1 for _ in ex.map(one, range(N)))
        return n / (time.perf_counter() - t)


def grain_(k):
    sys.path.insert(0, os.environ.get("GRAIN_PATH", ""))
    import grain

    ds = grain.MapDataset.range(N).map(one).to_iter_dataset(grain.ReadOptions(num_threads=k, prefetch_buffer_size=64))
    t = time.perf_counter()
    n = sum(1 for _ in ds)
    return n / (time.perf_counter() - t)


for name, f in (("tf.data map", tfdata), ("thread pool + tf.function", threads), ("grain MapDataset", grain_)):
    for k in (1, 2):
        try:
            f(k)  # warm-up (traces)
            out[f"{name}, {k} thread(s)"] = round(max(f(k) for _ in range(2)), 1)
        except Exception as e:
            out[f"{name}, {k} thread(s)"] = f"failed: {type(e).__name__}: {str(e)[:100]}"
        print(name, k, out[f"{name}, {k} thread(s)"], flush=True)
print(json.dumps(out))
