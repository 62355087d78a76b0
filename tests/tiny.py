"""A tiny recipe for tests: the demo config shrunk to seconds on a CPU."""

import os

from mmjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
ALBEF = os.path.join(ROOT, "configs", "albef.py")


def tiny_overrides(data_dir, **extra) -> dict:
    """The `key: value` overrides that shrink configs/demo.py (also for CLI runs)."""
    overrides = {
        "data.data_dir": str(data_dir),
        "data.image_size": 16,
        "data.text_len": 16,
        "data.shuffle_buffer": 256,
        "data.shapes.image_size": 16,
        "data.shapes.num_train": 256,
        "data.shapes.num_validation": 32,
        "data.shapes.num_test": 64,
        "data.tokenizer.vocab_size": 40,
        "model.image": "mu/4",
        "model.image_overrides": "{}",
        "model.text_overrides": "{}",
        "model.embed_dim": 32,
        # At 16px and 30 steps the mean-pooled tower shows its loss falling; the
        # demo's [CLS] pooling needs more steps than a loop test should take.
        "model.pool": "gap",
        "train.batch_size": 16,
        "train.steps": 30,
        "train.warmup_steps": 3,
        "train.log_every": 5,
        "train.ckpt_every": 10,
        "eval.every": 0,
        "eval.batch_size": 32,
    }
    overrides.update(extra)
    return overrides


def tiny_config(data_dir, **extra):
    return config_lib.load(DEMO, [f"{k}={v}" for k, v in tiny_overrides(data_dir, **extra).items()])


def albef_overrides(data_dir, **extra) -> dict:
    """tiny_overrides' shrinking applied to configs/albef.py: a 2-layer text tower
    with one fusion layer, a 24-row queue (also for CLI runs)."""
    overrides = tiny_overrides(
        data_dir,
        **{
            "model.pool": "cls",  # ALBEF's own pooling
            "model.text_overrides": "{'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}",
            "model.fusion_from": 1,
            "model.embed_dim": 16,
            "model.queue_size": 24,
            "model.alpha_ramp_steps": 4,
            "eval.rerank_k": 4,
        },
    )
    overrides.update(extra)
    return overrides


def albef_config(data_dir, **extra):
    return config_lib.load(ALBEF, [f"{k}={v}" for k, v in albef_overrides(data_dir, **extra).items()])


def write_images(directory, n: int, size: int = 16):
    """n random PNGs and one file that is not an image: ([paths], bad_path)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = os.path.join(str(directory), f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    bad = os.path.join(str(directory), "bad.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    return paths, bad
