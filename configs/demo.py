"""The demo recipe: a small CLIP pretrained on the built-in `shapes` data.

Runs on a 2-core CPU in under 10 minutes including data preparation:

    mmjax train --config configs/demo.py --workdir workdirs/demo

`configs/demo.py:emoji` is the same recipe on the built-in Twemoji pairs.
Override anything with --config.key=value, e.g. --config.train.steps=100.
"""

import ml_collections


def get_config(arg=None):
    arg = arg or "shapes"
    if arg not in ("shapes", "emoji"):
        raise ValueError(f"configs/demo.py argument {arg!r}; valid choices: shapes, emoji")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = arg
    c.data.data_dir = None  # default: $MMJAX_DATA_DIR or ~/.cache/mmjax/tensorflow_datasets
    c.data.random_access = False  # TFDS sets: True trains by random access (array_record copy, docs/data.md)
    c.data.path = None  # a CSV/JSONL list when name == "files"
    c.data.eval_fraction = 0.0  # files: hold out this fraction of rows as "test"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.eval_path = None  # the eval set's own shards directory or CSV/JSONL list (instead of eval_split)
    c.data.image_size = 32
    c.data.text_len = 12  # a shapes caption is 11-12 tokens with bos/eos (128-piece tokenizer)
    c.data.num_parallel_calls = -1
    c.data.prefetch_to_device = 2  # batches converted and copied to the devices ahead of the step (0 = inline)
    c.data.shuffle_buffer = 25_000
    # Decode the (small, built-in) dataset once and keep the pixels in memory; on a
    # 2-core machine the per-step decode otherwise competes with the train step.
    c.data.cache_decoded = True
    c.data.augment = ml_collections.ConfigDict()
    # No crop for shapes: every scene is new, and a crop can cut an object at the
    # border, which makes the caption wrong. (1, 1) skips the crop entirely.
    c.data.augment.crop_scale = (1.0, 1.0)
    c.data.augment.aspect = (1.0, 1.0)
    c.data.augment.flip = False  # a flip swaps "left of" and "right of"
    c.data.shapes = ml_collections.ConfigDict()
    c.data.shapes.image_size = 32
    c.data.shapes.num_train = 25_000
    c.data.shapes.num_validation = 1000
    c.data.shapes.num_test = 500
    c.data.shapes.seed = 0
    # Video (configs/video_clip.py): data.num_frames > 0 makes every record a clip of
    # that many frames, sampled per data.frame_sampling ("random": a random frame of
    # each segment; eval always takes the segment centres).
    c.data.num_frames = 0
    c.data.frame_sampling = "random"
    c.data.moving_shapes = ml_collections.ConfigDict(
        dict(image_size=32, num_frames=8, num_train=10_000, num_validation=1000, num_test=500, seed=0)
    )
    c.data.tokenizer = ml_collections.ConfigDict()
    c.data.tokenizer.path = None  # a sentencepiece .model; else trained on the captions
    c.data.tokenizer.vocab_size = 128

    c.model = ml_collections.ConfigDict()
    c.model.family = "clip"
    c.model.image = "mu/8"
    c.model.text = "mu"
    c.model.image_overrides = dict(width=96, depth=4, heads=4, mlp_dim=384)
    c.model.text_overrides = dict(width=96, depth=2, heads=4, mlp_dim=384)
    c.model.embed_dim = 96
    c.model.loss = "softmax"
    c.model.pool = "cls"  # the [CLS] token; "gap" (mean of patch tokens) learned slower here
    c.model.posemb = "learn"  # or "sincos2d" (fixed 2-D sin-cos)
    c.model.act = "gelu_tanh"  # MLP activation; "gelu" (erf) / "quick_gelu" as in HF CLIP checkpoints
    c.model.ln_eps = 1e-6  # LayerNorm epsilon (HF CLIP: 1e-5)
    c.model.text_pool = "last"  # last non-pad token; "argmax" / "eos" (with eos_id): HF CLIP's rules
    c.model.eos_id = None  # the eos token id, for text_pool="eos"
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.model.param_dtype = "float32"  # or "bfloat16": params (and so Adam's moments) stored in bf16
    # Speed switches (their measured effects: docs/benchmarks.md). Each computes the
    # same function (tests/test_speed_switches.py).
    c.model.attention = "xla"  # or "cudnn" (GPU flash attention, bf16); "/16" pads lengths to a multiple of 16
    c.model.remat = "none"  # or "full" (recompute each block in the backward pass), "dots" (keep matmul outputs)
    c.model.scan_layers = False  # nn.scan over ViT / CLIP text blocks (params stacked under encoder/blocks)
    # NegCLIP-style: per image, K captions with the same words but attributes swapped
    # join its candidates in ITC (datasets with hard_negatives: shapes). 0 = plain CLIP.
    c.model.hard_negatives = 0
    # "batch": each image against all B*K hard captions of the batch (NegCLIP); "own": its own K.
    c.model.hard_negatives_scope = "batch"
    c.model.temporal = "none"  # video: "none" (joint), "divided", "local", "mean" (models/video.py)
    c.model.tubelet = 1  # video: frames per token (ViViT tubelets when > 1)
    c.model.temporal_kernel = 3  # video, temporal="local": the temporal convolution's length
    c.model.local_temporal = "release"  # video, temporal="local": mPLUG-2's module, or "mmjax_v1" (models/video.py)
    # model.vocab_size, image_size, text_len, num_frames and total_steps are derived at run
    # time from the tokenizer, data.* and train.* (config.derive_model_keys).

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256
    c.train.accum_steps = 1
    c.train.steps = 1000
    c.train.lr = 3e-3
    c.train.end_lr_factor = 0.01
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.05
    c.train.grad_clip = 1.0
    c.train.freeze = ()  # regexes of param paths kept fixed, e.g. ("^image_tower/",)
    c.train.layer_decay = 1.0  # < 1: layer-wise lr decay (fine-tuning), 1 = off
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.eps = 1e-6
    c.train.mu_dtype = "float32"  # or "bfloat16": Adam's first moment in bf16 (optax mu_dtype)
    c.train.log_every = 25
    c.train.ckpt_every = 500
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True
    # A step with a non-finite loss or gradient changes nothing (counted as bad_step);
    # this many in a row stop the run with exit code 2 (docs/reliability.md).
    c.train.max_bad_steps = 20

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 500
    c.eval.at_end = True
    c.eval.batch_size = 256
    c.eval.max_examples = None
    # zero_shot_top1: prompts are templates with '{}' for the class name, averaged per
    # class; None = the dataset's built-in ones (mmjax/eval/zero_shot.py; shapes: "a small
    # {}", "a large {}"). Prompts are never cut: ones you set that do not fit data.text_len
    # stop the run at its start; built-in ones that do not are reported and skipped.
    c.eval.zero_shot = ml_collections.ConfigDict()
    c.eval.zero_shot.templates = None  # e.g. ("a small {}", "a {}")
    c.eval.zero_shot.class_names_file = None  # one name per line, in label order (None: the dataset's)

    c.parallel = ml_collections.ConfigDict()
    c.parallel.mode = "mesh"
    c.parallel.mesh = {"data": -1, "fsdp": 1, "tensor": 1}  # see docs/scaling.md
    # Multi-process runs: bounded waits instead of hangs (docs/scaling.md).
    c.parallel.init_timeout_s = 300  # a peer that never starts
    c.parallel.heartbeat_timeout_s = 60  # a peer that dies
    c.parallel.step_timeout_s = 0  # a peer that stalls (0 = no watchdog)

    if arg == "emoji":
        c.model.hard_negatives = 0  # emoji names have no swapped-attribute variants
        # No flip here either: names such as "backhand index pointing left" or
        # "right arrow" would then be wrong.
        c.data.augment.crop_scale = (0.7, 1.0)
        c.data.augment.aspect = (3 / 4, 4 / 3)
        c.data.cache_decoded = False  # crop the 72px originals, not a cached 32px copy
        c.data.tokenizer.vocab_size = 2000
        c.data.text_len = 24
        c.train.steps = 500
        c.train.lr = 2e-3
        c.train.ckpt_every = 250
        c.eval.every = 250
    return c
