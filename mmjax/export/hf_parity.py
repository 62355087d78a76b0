"""Parity of mmjax's HF CLIP converter with transformers (torch, CPU, fp32).

    HF_HUB_OFFLINE=1 python -m mmjax.export.hf_parity [--base]

builds random-weight `transformers.CLIPModel`s of several shapes (never downloaded),
converts them with `mmjax.export.hf`, and prints the max relative difference of the
image and text features (max|a - b| / max|b|) as a markdown table.
"""

import math
import os
import re

import numpy as np

from mmjax.export.hf import LEGACY_EOS, TEXT_DEFAULTS, VISION_DEFAULTS, load_clip

# ------------------------------------------------------------------ parity with transformers

# Random-weight CLIPConfigs of several shapes for the parity check (tiny, CPU-fast);
# `base32` has ViT-B/32 + text-B shapes (python -m mmjax.export.hf_parity --base).
PARITY_CONFIGS = {
    "quickgelu-argmax": dict(
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=12,
            vocab_size=99,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=16,
            patch_size=4,
            hidden_act="quick_gelu",
        ),
        projection_dim=16,
    ),
    "gelu-eos": dict(
        text=dict(
            hidden_size=40,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=5,
            max_position_embeddings=16,
            vocab_size=257,
            hidden_act="gelu",
            eos_token_id=256,
            bos_token_id=255,
            pad_token_id=0,
        ),
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=30,
            patch_size=6,
            hidden_act="gelu",
        ),
        projection_dim=24,
    ),
    "quickgelu-eos-small-id": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=20,
            vocab_size=300,
            hidden_act="quick_gelu",
            eos_token_id=5,
            bos_token_id=4,
            pad_token_id=5,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=1,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=48,
    ),
    "tanh-eps1e-6": dict(
        text=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            vocab_size=64,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            bos_token_id=62,
            eos_token_id=63,
            pad_token_id=0,
        ),
        vision=dict(
            hidden_size=24,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            image_size=14,
            patch_size=2,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        projection_dim=8,
    ),
    # A large epsilon makes every LayerNorm's eps visible in the features.
    "gelunew-eps0.3": dict(
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=10,
            vocab_size=50,
            hidden_act="gelu_new",
            layer_norm_eps=0.3,
            bos_token_id=48,
            eos_token_id=49,
            pad_token_id=49,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=12,
            patch_size=3,
            hidden_act="gelu_new",
            layer_norm_eps=0.3,
        ),
        projection_dim=16,
    ),
}
BASE_CONFIG = {
    "base32": dict(
        text=dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=77,
            vocab_size=49408,
            hidden_act="quick_gelu",
        ),
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
            hidden_act="quick_gelu",
        ),
        projection_dim=512,
    )
}


def random_hf_clip(cfg: dict, seed: int = 0):
    """A transformers CLIPModel (fp32, eval) of `cfg` (a PARITY_CONFIGS entry) with every
    weight random: lecun-normal kernels, N(0, 1) embeddings, random biases and
    LayerNorm affines, so a transposed or dropped weight cannot go unnoticed."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=cfg["text"], vision_config=cfg["vision"], projection_dim=cfg["projection_dim"])
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(float(torch.rand(())) + 2.0)
            elif re.search(r"(layer_?norm\d?|layrnorm)\.weight$", name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif p.ndim == 1:  # class embedding
                p.copy_(torch.randn_like(p))
            elif "embedding.weight" in name and "patch" not in name:
                p.copy_(torch.randn_like(p))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
    return model


def parity_inputs(cfg: dict, batch: int = 4, seed: int = 0):
    """(images [B, 3, H, W] f32 NCHW, ids [B, L] int64) exercising the pooling rule:
    eos at the first / last / random positions, repeated eos and id 0 mid-sequence,
    one row without eos (both frameworks then pool position 0)."""
    rng = np.random.default_rng(seed)
    tc, vc = {**TEXT_DEFAULTS, **cfg["text"]}, {**VISION_DEFAULTS, **cfg["vision"]}
    size = vc["image_size"]
    images = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    vocab, length, eos = tc["vocab_size"], tc["max_position_embeddings"], tc["eos_token_id"]
    if eos == LEGACY_EOS:  # argmax rule: the largest id marks the end
        ids = rng.integers(0, vocab - 1, size=(batch, length))
        for b, pos in enumerate([length - 1, 0] + list(rng.integers(1, length - 1, size=batch))[: batch - 2]):
            ids[b, pos] = vocab - 1
    else:
        ids = rng.integers(0, vocab, size=(batch, length))
        ids[ids == eos] = (eos + 1) % vocab
        ids[:, 1] = 0  # an id-0 token before eos: an ordinary token to transformers
        positions = [length - 1, 2] + list(rng.integers(2, length, size=batch))[: batch - 2]
        for b, pos in enumerate(positions[: batch - 1]):
            ids[b, pos] = eos
            if b == 1:
                ids[b, pos:] = eos  # pad == eos: the first one counts
        # the last row has no eos at all
    return images, ids.astype(np.int64)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def hf_features(hf_model, images, ids):
    """transformers' (get_image_features, get_text_features) as numpy."""
    import torch

    with torch.no_grad():
        img = hf_model.get_image_features(pixel_values=torch.from_numpy(images))
        txt = hf_model.get_text_features(input_ids=torch.from_numpy(ids))
    pick = lambda o: (o if torch.is_tensor(o) else o.pooler_output).numpy()
    return pick(img), pick(txt)


def mmjax_features(model, variables, images_nchw, ids):
    """(encode_image, encode_text) of a loaded HFCLIP on the same inputs (NCHW -> NHWC)."""
    import jax

    img = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))(
        variables, np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))
    )
    txt = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, ids.astype(np.int32))
    return np.asarray(img), np.asarray(txt)


def parity(cfg: dict, tmp_dir: str, *, seed: int = 0, batch: int = 4) -> dict:
    """Random CLIPModel of `cfg` -> save_pretrained(tmp_dir) -> load_clip: max relative
    differences {'image', 'text'} (max|a-b| / max|b|, b = transformers) of the features."""
    hf_model = random_hf_clip(cfg, seed)
    hf_model.save_pretrained(tmp_dir)
    images, ids = parity_inputs(cfg, batch, seed)
    ref_img, ref_txt = hf_features(hf_model, images, ids)
    model, variables = load_clip(tmp_dir)
    img, txt = mmjax_features(model, variables, images, ids)
    return dict(image=_rel(img, ref_img), text=_rel(txt, ref_txt))


def parity_table(configs: dict, *, seed: int = 0, batch: int = 4) -> str:
    """A markdown table of `parity` over `configs`."""
    import tempfile

    rows = [
        "| config | vision W/D/H, patch, image | text W/D/H, len, vocab | act | LN eps | text pool | "
        "image rel. diff | text rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in configs.items():
        with tempfile.TemporaryDirectory() as tmp:
            r = parity(cfg, tmp, seed=seed, batch=batch)
        t, v = {**TEXT_DEFAULTS, **cfg["text"]}, {**VISION_DEFAULTS, **cfg["vision"]}
        pool = "argmax" if t["eos_token_id"] == LEGACY_EOS else f"eos={t['eos_token_id']}"
        rows.append(
            f"| {name} | {v['hidden_size']}/{v['num_hidden_layers']}/{v['num_attention_heads']}, "
            f"{v['patch_size']}, {v['image_size']} | {t['hidden_size']}/{t['num_hidden_layers']}/"
            f"{t['num_attention_heads']}, {t['max_position_embeddings']}, {t['vocab_size']} | "
            f"{t['hidden_act']} | {t['layer_norm_eps']:g} | {pool} | {r['image']:.2e} | {r['text']:.2e} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmjax.export.hf_parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", action="store_true", help="add a ViT-B/32 + text-B shaped config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configs = dict(PARITY_CONFIGS, **(BASE_CONFIG if args.base else {}))
    print(parity_table(configs, seed=args.seed, batch=args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
