"""A tiny recipe for tests: the demo config shrunk to seconds on a CPU."""
import os

from mmjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


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
