"""open_clip's training step against `mmjax bench` on this CPU, same model, same batch, one run.

Extends ../shared/bench/cpu_side_by_side.py (the demo's size, unchanged here) with a
second size, a ViT-S/16 CLIP at 64 px (configs/clip_s16_64.py), and with rounds: each
round times open_clip eager, then `mmjax bench` in a subprocess, so both see the same
machine state; the figure is the median over rounds. The parameter counts of the two
sides must be equal, or the script stops.

    python3 -m venv /path/venv && . /path/venv/bin/activate && pip install -e . open_clip_torch
    python3 launch/cpu_side_by_side.py [--sizes demo,s16_64] [--rounds 3] [--steps N]

fp32, AdamW (open_clip: torch.optim.AdamW; mmjax: its recipe's optimizer with gradient
clipping and its step's metrics), random data. Prints one JSON line per size.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import open_clip
import torch
from open_clip.loss import ClipLoss

# size -> (batch, steps, image tower, text tower, embed dim, mmjax config); the demo's
# dims are those of ../shared/bench/cpu_side_by_side.py. open_clip's default GELU is
# the exact one: configs/clip_s16_64.py sets model.act=gelu to match (the demo keeps
# its tanh GELU, as the shared script compares it).
SIZES = {
    "demo": (
        256,
        20,
        dict(layers=4, width=96, head_width=24, mlp_ratio=4, patch_size=8, image_size=32),
        dict(context_length=12, vocab_size=128, width=96, heads=4, layers=2),
        96,
        "configs/demo.py",
    ),
    "s16_64": (
        128,
        8,
        dict(layers=12, width=384, head_width=64, mlp_ratio=4, patch_size=16, image_size=64),
        dict(context_length=16, vocab_size=49408, width=384, heads=6, layers=12),
        384,
        "configs/clip_s16_64.py",
    ),
}


def open_clip_step_ms(batch, steps, vision, text, embed):
    model = open_clip.model.CLIP(embed_dim=embed, vision_cfg=vision, text_cfg=text)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = ClipLoss()
    size = vision["image_size"]
    images = torch.randn(batch, 3, size, size)
    texts = torch.randint(1, text["vocab_size"], (batch, text["context_length"]))

    def step():
        img, txt, scale = model(images, texts)[:3]
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - t) / steps, params


def mmjax_row(config, batch, steps):
    cmd = ["mmjax", "bench", "--config", config, "--steps", str(steps), "--batch-size", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="demo,s16_64", help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: per size)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for name in a.sizes.split(","):
        if name not in SIZES:
            sys.exit(f"unknown size {name!r}; valid choices: {', '.join(SIZES)}")
        batch, steps, vision, text, embed, config = SIZES[name]
        steps = a.steps or steps
        res = {
            "size": name,
            "batch": batch,
            "steps": steps,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        }
        oc, mm = [], []
        for r in range(a.rounds):
            ms, oc_params = open_clip_step_ms(batch, steps, vision, text, embed)
            row = mmjax_row(config, batch, steps)
            if row["params"] != oc_params:
                sys.exit(f"{name}: parameter counts differ: open_clip {oc_params:,}, mmjax {row['params']:,}")
            oc.append(ms)
            mm.append(row["ms_per_step"])
            print(f"{name} round {r}: open_clip {ms:.1f} ms, mmjax {row['ms_per_step']:.1f} ms", flush=True)
        res["params"] = oc_params
        res["open_clip_eager_ms"] = [round(x, 1) for x in oc]
        res["mmjax_ms"] = [round(x, 1) for x in mm]
        res["open_clip_eager_samples_s"] = round(batch / statistics.median(oc) * 1000, 1)
        res["mmjax_samples_s"] = round(batch / statistics.median(mm) * 1000, 1)
        res["ratio_mmjax_over_open_clip"] = round(statistics.median(oc) / statistics.median(mm), 3)
        res["ratio_per_round"] = [round(o / m, 3) for o, m in zip(oc, mm)]
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
