"""ImageBind on the built-in data: sounds and depth maps bound to the demo CLIP through
images alone; text never meets them in training.

    mmjax train --config configs/demo.py --workdir workdirs/demo                # the CLIP (frozen here)
    mmjax train --config configs/imagebind.py --workdir workdirs/imagebind      # (image, audio), (image, depth)
    mmjax train --config configs/imagebind.py:direct --workdir workdirs/bind_direct  # the upper bound

`shapes_av` (mmjax/data/shapes_av_gen.py) gives every `shapes` scene a stereo sound
(pitch = colour, timbre = shape, duration = size, pan = x, order and gap = y) and a
depth map (height = colour, footprint = shape and size). The CLIP's image and text
towers come from workdirs/demo (finetune.init_parts, its tokenizer too) and stay frozen;
an audio encoder (log-mel patches, 4 blocks of width 96) and a depth encoder (8x8
patches, 4 blocks) each learn InfoNCE against the image embedding with the release's
fixed logit scales (audio 20, depth 5). The train batches carry image, audio and depth
only (data.modalities): no caption is tokenized into them. The eval embeds the test
split's images, captions, sounds and depth maps and reports X -> image and X -> text
recall, zero-shot classification of sounds and depth maps with the demo's prompts, and
embedding arithmetic (audio + image).

`direct` trains the same encoders on (audio, caption) and (depth, caption) pairs
against the frozen text tower (model.anchor='text'): the upper bound of the emergent
alignment at the same budget.

ImageBind's towers (audio ViT-B, depth ViT-S, 1024-d, OpenCLIP ViT-H) and its audio
front end (16 kHz, 128 mel bins, 2 s clips) are in configs/imagebind_base.py.
"""

import os

import ml_collections

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = ("shapes", "direct")
CLIP_KEYS = ("image", "image_overrides", "text", "text_overrides", "embed_dim", "loss", "pool", "posemb", "act",
             "ln_eps", "text_pool", "eos_id")  # fmt: skip
TOWER = dict(width=96, depth=4, heads=4, mlp_dim=384)


def shapes_av_data(c) -> None:
    """The built-in sounds and depth maps: stereo 8 kHz clips of 1.024 s, depth in metres."""
    c.data.name = "shapes_av"
    c.data.modalities = ("image", "audio", "depth")
    c.data.audio = ml_collections.ConfigDict(dict(sample_rate=8000, clip_seconds=1.024, channels=2))
    c.data.depth = ml_collections.ConfigDict(dict(scale=1000.0, mean=2.9, std=0.4))
    c.data.shuffle_buffer = 10_000


def get_config(arg=None):
    arg = arg or "shapes"
    if arg not in ARGS:
        raise ValueError(f"configs/imagebind.py argument {arg!r}; valid choices: {', '.join(ARGS)}")
    c = config_lib.recipe(os.path.join(HERE, "demo.py"))
    demo = c.model
    shapes_av_data(c)
    c.model = m = ml_collections.ConfigDict()
    m.family = "imagebind"
    for k in CLIP_KEYS:
        m[k] = demo[k].to_dict() if hasattr(demo[k], "to_dict") else demo[k]
    m.modalities = ("audio", "depth")
    # 128 frames (hop 64) x 32 mel bins in 8x8 patches: 64 tokens; pitches 200-1131 Hz fall in distinct bins;
    # mean / std: the log-mel statistics of shapes_av's train clips
    m.audio = dict(variant="mu/8", overrides=TOWER, n_fft=256, hop=64, n_mels=32, mean=-4.7, std=3.1)
    m.depth = dict(variant="mu/8", overrides=TOWER)
    m.temperature = "fixed"  # the release: audio 20, depth 5 (model.logit_scale); "learned" starts there
    m.logit_scale = dict(audio=20.0, depth=5.0)
    m.anchor = "image"
    m.dtype, m.param_dtype, m.remat, m.attention = "float32", "float32", "none", "xla"
    c.finetune = ml_collections.ConfigDict()
    c.finetune.init_from = None
    # the CLIP's towers and projections by part (each part's architecture keys are checked
    # against the workdir's), and its tokenizer
    c.finetune.init_parts = {p: f"workdirs/demo:{p}" for p in ("image_tower", "text_tower", "image_proj", "text_proj")}
    c.finetune.tokenizer_from = "workdirs/demo"
    c.finetune.weights = "student"
    c.train.freeze = ("^image_tower/", "^text_tower/", "^image_proj/", "^text_proj/", "^t$")
    c.train.steps = 600
    c.train.lr = 1e-3
    c.train.warmup_steps = 50
    c.eval.every = 600
    if arg == "direct":  # the upper bound: (X, caption) pairs against the frozen text tower
        m.anchor = "text"
        # images too: the step reads only text, audio and depth, the eval embeds images
        c.data.modalities = ("image", "text", "audio", "depth")
    return c
