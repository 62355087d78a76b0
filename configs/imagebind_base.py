"""ImageBind at the release's shapes (MODELS.md; Girdhar et al. 2023): an OpenCLIP ViT-H/14
pair of towers (1024-d), frozen, imported from transformers' format with `mmjax convert
--from hf-clip` (laion/CLIP-ViT-H-14-laion2B-s32B-b79K ships one), an audio encoder of
ViT-B's size over 128-bin log-mel patches of 16 kHz clips, a depth encoder of ViT-S's
size over 224 px single-channel maps, heads LayerNorm -> [CLS] -> bias-free projection
to 1024, fixed logit scales audio 20 and depth 5.

    mmjax convert --from hf-clip --to DIR_OF_THE_HF_CHECKPOINT workdirs/clip_h14
    mmjax train --config configs/imagebind_base.py --workdir workdirs/imagebind_h \\
        --config.data.name=files --config.data.path=av_list.csv  # rows: image_path, audio_path, depth_path
    mmjax train --config configs/imagebind_base.py --workdir DIR --dry-run --config.parallel.mesh.fsdp=8

Where this differs from the release: its audio stem takes 16x16 patches at stride 10
over 204 frames of 2 s clips (overlapping); here patches do not overlap, so clips are
2.56 s (256 frames of 10 ms, 16 x 8 = 128 patches); the release averages 3 clips per
sound at eval, here one centre clip is taken; no drop path (release: audio 0.1); its
images enter a (2, 14, 14) Conv3d stem as 2 repeated frames; here the OpenCLIP tower's
own 2-D patch conv reads them (ImageBind's image tower is that OpenCLIP ViT-H). Its training
recipe was not released; AdamW lr 1e-4 with a 2k-step warmup, weight decay 0.2, batch
512 follow its paper's (audio on AudioSet, depth on SUN RGB-D).
"""

import os

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
VIT_H = dict(width=1280, depth=32, heads=16, mlp_dim=5120)
TEXT_H = dict(width=1024, depth=24, heads=16, mlp_dim=4096)


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/imagebind_base.py takes no argument, got {arg!r}")
    c = config_lib.recipe(os.path.join(HERE, "imagebind.py"))
    m = c.model
    m.image, m.image_overrides = "L/14", VIT_H
    m.text, m.text_overrides = "L", TEXT_H
    m.embed_dim = 1024
    m.act, m.ln_eps = "gelu", 1e-5  # OpenCLIP's ViT-H (exact GELU) in transformers' layout
    m.text_pool, m.pool, m.posemb = "argmax", "cls", "learn"
    m.audio = dict(variant="B/16", overrides={}, n_fft=400, hop=160, n_mels=128, mean=-4.268, std=9.138)
    m.depth = dict(variant="S/16", overrides={})
    m.dtype, m.param_dtype, m.remat = "bfloat16", "float32", "full"
    c.data.image_size = 224
    c.data.text_len = 77
    c.data.audio.update(dict(sample_rate=16000, clip_seconds=2.56, channels=1))
    c.data.depth.update(dict(scale=1000.0, mean=0.0, std=1.0))  # set to your depth maps' statistics
    c.data.cache_decoded = False
    c.data.tokenizer.path = None  # the imported CLIP's tokenizer comes with finetune.tokenizer_from
    srcs = ("image_tower", "text_tower", "image_proj", "text_proj")
    c.finetune.init_parts = {p: f"workdirs/clip_h14:{p}" for p in srcs}
    c.finetune.tokenizer_from = "workdirs/clip_h14"
    c.train.batch_size = 512
    c.train.steps = 20_000
    c.train.lr = 1e-4
    c.train.warmup_steps = 2_000
    c.train.weight_decay = 0.2
    c.eval.every = 2_000
    return c
