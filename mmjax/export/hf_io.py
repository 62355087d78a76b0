"""Reading a transformers model directory: config.json and the weights
(model.safetensors, pytorch_model.bin, or their .index.json shards) as float32 numpy.
Only numpy and safetensors are needed (torch for a pytorch_model.bin).
"""

from __future__ import annotations

import json
import os

import numpy as np


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_safetensors(path):
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
    try:
        with safe_open(path, framework="numpy") as f:
            for k in keys:
                out[k] = f.get_tensor(k)
    except TypeError:  # bfloat16 has no numpy dtype: read through jax
        with safe_open(path, framework="flax") as f:
            for k in keys:
                out[k] = np.asarray(f.get_tensor(k), np.float32)
    return out


def load_torch(path):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a PyTorch pickle: reading it needs torch (or save the model with safe_serialization=True)"
        ) from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def read_state_dict(src_dir: str) -> dict:
    """{name: float32 numpy} from model.safetensors, pytorch_model.bin or their shards."""
    loaders = [("model.safetensors", load_safetensors), ("pytorch_model.bin", load_torch)]
    for name, load in loaders:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            files = [path]
        elif os.path.isfile(path + ".index.json"):
            shards = sorted(set(read_json(path + ".index.json")["weight_map"].values()))
            files = [os.path.join(src_dir, s) for s in shards]
        else:
            continue
        sd = {}
        for f in files:
            sd.update(load(f))
        return {k: np.asarray(v, np.float32) for k, v in sd.items()}
    raise FileNotFoundError(
        f"{src_dir}: no model.safetensors or pytorch_model.bin (or their "
        ".index.json shards): is it a transformers model directory?"
    )
