"""What each `mmjax` subcommand does: one small handler per command.

A handler takes the parsed flags and the `--config.KEY=VALUE` overrides and returns
the exit code (None: 0); mmjax/cli.py holds the table of commands and their flags and
turns a user's mistake into exit code 2. jax, TensorFlow and the training code are
imported inside the handlers, so `mmjax --help` (and a command that fails on its
flags) starts at once.
"""

from __future__ import annotations

import json
import os

from mmjax import config as config_lib


def print_result(result: dict, workdir: str):
    keys = [k for k in result if k not in ("final_state", "plot") and isinstance(result[k], (int, float))]
    print(
        "\nresult:", json.dumps({k: round(result[k], 4) if isinstance(result[k], float) else result[k] for k in keys})
    )
    if result.get("plot"):
        print(f"plot: {result['plot']}")
    print(f"workdir: {workdir}")


def initialize(args, config):
    """Multi-process start-up before any device is touched (a no-op for one process)."""
    from mmjax.parallel import distributed

    par = config.get("parallel", {})
    distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        init_timeout_s=int(par.get("init_timeout_s", 300)),
        heartbeat_timeout_s=int(par.get("heartbeat_timeout_s", 60)),
    )


# ---------------------------------------------------------------- train, finetune, eval


def train(args, overrides):
    config = config_lib.load(args.config, overrides)
    if args.dry_run:
        return dry_run(config)
    _fit(args, config, stop_at=args.stop_at)


def dry_run(config) -> int:
    """`mmjax train --dry-run`: the step compiled for the configured mesh, bytes per device."""
    from mmjax import bench

    plan = bench.memory_plan(config)
    print(bench.format_plan(plan))
    print(json.dumps(plan))
    return 0


def finetune(args, overrides):
    config = finetune_config(config_lib.load(args.config, overrides), args.init_from, args.weights)
    _fit(args, config)


def finetune_config(config, init_from: str, weights: str | None):
    """The recipe with `finetune.init_from` (absolute) and, when given, `finetune.weights`
    set from the command line (a recipe without a `finetune` section gets one)."""
    if not os.path.isdir(init_from):
        raise FileNotFoundError(f"--init-from {init_from!r} is not a directory")
    import ml_collections

    with config.unlocked():
        if "finetune" not in config:
            config.finetune = ml_collections.ConfigDict(
                {"init_from": None, "weights": "student", "inflation": "central"}
            )
        config.finetune.init_from = os.path.abspath(init_from)
        if weights:
            config.finetune.weights = weights
    return config


def _fit(args, config, **train_kw):
    initialize(args, config)
    from mmjax.train import loop

    result = loop.train(config, args.workdir, progress=not args.no_progress, **train_kw)
    print_result(result, args.workdir)


def evaluate(args, overrides):
    from mmjax import workdir as workdir_lib
    from mmjax.train import setup as setup_lib

    config = workdir_lib.load_config_json(args.workdir)
    if overrides:  # on the saved config; keys that shape the checkpoint are refused
        config = config_lib.override_saved(config, overrides)
    initialize(args, config)
    setup = setup_lib.Setup(config, args.workdir)
    setup.checkpointer.close()  # eval reads the params alone, through the workdir layer
    # (a converted workdir holds params only; FileNotFoundError "no checkpoint in ...")
    params, step = workdir_lib.read_params(args.workdir, sharding=setup.state_sharding.params)
    metrics = setup.evaluator(args.split)(params)
    metrics["step"] = step
    print_result(metrics, args.workdir)


# ---------------------------------------------------------------- a workdir's model on your files


def embed(args, overrides):
    if not args.images and not args.videos and not args.texts:
        raise config_lib.ConfigError("mmjax embed needs --images (or --videos) and/or --texts")
    from mmjax.eval.embed import embed as embed_files

    summary = embed_files(
        args.workdir, images=args.images, videos=args.videos, texts_file=args.texts, out=args.out, weights=args.weights
    )
    print(json.dumps(summary))


def caption(args, overrides):
    if not args.images and not args.videos:
        raise config_lib.ConfigError("mmjax caption needs --images or --videos")
    from mmjax.eval.embed import caption as caption_files

    for row in caption_files(
        args.workdir,
        images=args.images,
        videos=args.videos,
        weights=args.weights,
        beams=args.beams,
        max_len=args.max_len,
        length_penalty=args.length_penalty,
    ):
        print(f"{row['image']}\t{row['caption']}")


def generate(args, overrides):
    from mmjax import workdir as workdir_lib
    from mmjax.eval.generation import Generator, read_chat_file

    if args.beams > 1 and args.temperature is not None:
        raise config_lib.ConfigError("--beams and --temperature exclude each other: beam search or sampling")
    if args.beams > 1:
        method = dict(method="beam", beams=args.beams, length_penalty=args.length_penalty)
    elif args.temperature is not None:
        method = dict(method="sample", temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    else:
        method = dict(method="greedy")
    if bool(args.prompt) == bool(args.chat):
        raise config_lib.ConfigError("mmjax generate needs --prompt (one or more) or --chat FILE.jsonl, not both")
    opened = workdir_lib.open_workdir(args.workdir, weights=args.weights)
    gen = Generator(opened.family, opened.params, opened.tokenizer, opened.config)
    kw = dict(max_new_tokens=args.max_new_tokens, stops=tuple(args.stop), **method)
    if args.chat:
        convs, paths = read_chat_file(args.chat)
        images = _pixels(opened, paths) if gen.image_tokens else None
        rows = gen.chat_turns(convs, images, **kw)
    else:
        prompts, paths = _pair(args.prompt, args.images)
        images = _pixels(opened, paths) if paths else None
        rows = gen.texts(prompts, images, **kw)
        for row, path in zip(rows, paths or [None] * len(rows)):
            if path:
                row["image"] = path
    for row in rows:
        print(json.dumps(row))


def _pair(prompts, images):
    """--prompt / --images -> equally long lists: one prompt for every image, one image
    for every prompt, or as many of each (paired in order)."""
    prompts, images = list(prompts), list(images or ())
    if not images:
        return prompts, None
    if len(prompts) == 1:
        prompts = prompts * len(images)
    elif len(images) == 1:
        images = images * len(prompts)
    if len(prompts) != len(images):
        raise config_lib.ConfigError(
            f"{len(prompts)} --prompt and {len(images)} --images: give one of either, or as many"
        )
    return prompts, images


def _pixels(opened, paths):
    from mmjax.api import Model

    if any(p is None for p in paths):
        raise config_lib.ConfigError("this model reads an image with each prompt; a conversation has none")
    return Model(opened).preprocess(list(paths))


def classify(args, overrides):
    from mmjax.eval import zero_shot

    names = (
        zero_shot.read_class_names(args.classes_file)
        if args.classes_file
        else zero_shot.split_class_names(args.classes)
    )
    rows = zero_shot.classify_files(args.workdir, args.images, names, templates=args.templates, weights=args.weights)
    if not rows:
        raise ValueError(f"none of the {len(args.images)} --images could be read as an image")
    for row in rows:
        print(f"{row['image']}\t{row['class']}\t{row['score']:.4f}")


# ---------------------------------------------------------------- export, convert


def export(args, overrides):
    if args.format in ("hf-llm", "hf-llava"):
        from mmjax.export import hf_llava, hf_llm_workdir

        lib = hf_llm_workdir if args.format == "hf-llm" else hf_llava
        print(json.dumps(lib.export_workdir(args.workdir, args.out, args.weights, step=args.step)))
        return
    if args.format == "hf-clip":
        from mmjax.export import hf_workdir

        path = hf_workdir.export_workdir(args.workdir, args.out, args.weights, step=args.step)
        print(json.dumps({"format": "hf-clip", "out": path, "weights": args.weights}))
        return
    from mmjax.export import formats

    summary = formats.export_workdir(
        args.workdir,
        args.out,
        args.format,
        args.weights,
        step=args.step,
        dtype=args.dtype,
        platforms=tuple(p for p in args.platforms.split(",") if p),
        precision=None if args.precision == "default" else args.precision,
    )
    print(json.dumps(summary, default=str))


def convert(args, overrides):
    if args.source_format == "hf-clip":
        from mmjax.export import hf_workdir

        hf_workdir.convert_to_workdir(args.src, args.workdir)
    else:
        from mmjax.export import hf_llm_workdir

        hf_llm_workdir.convert_to_workdir(args.src, args.workdir, args.source_format)
    print(json.dumps({"workdir": args.workdir, "from": args.source_format, "src": args.src}))


# ---------------------------------------------------------------- data, bench


def data(args, overrides):
    if args.action == "convert":
        return data_convert(args, overrides)
    if args.action == "capfilt":
        from mmjax.data import capfilt

        return capfilt.command(args, overrides)
    if args.src is not None:
        raise config_lib.ConfigError(
            f"mmjax data {args.action} takes no SRC (got {args.src!r}); SRC is for mmjax data convert"
        )
    if not args.config:
        raise config_lib.ConfigError(f"mmjax data {args.action} needs --config path/to/config.py[:arg]")
    if not 0 <= args.process_index < args.process_count:
        raise config_lib.ConfigError(
            f"--process-index {args.process_index} --process-count {args.process_count}: expected 0 <= index < count"
        )
    config = config_lib.load(args.config, overrides)
    from mmjax.data import pipeline, throughput

    if args.action == "prepare":
        for split in (config.data.train_split, config.data.eval_split):
            print(f"{config.data.name}/{split}: {pipeline.num_examples(config.data, split)} examples")
    else:
        result = throughput.pipeline_throughput(
            config.data,
            args.batch_size,
            args.batches,
            threads=args.threads,
            process_index=args.process_index,
            process_count=args.process_count,
        )
        print(json.dumps(result))


def caption_chars(text: str) -> tuple[int, int]:
    """`--caption-chars MIN,MAX` -> (MIN, MAX); ConfigError (one line) unless 0 <= MIN <= MAX."""
    try:
        lo, hi = (int(t) for t in str(text).split(","))
    except ValueError:
        lo, hi = -1, -1
    if not 0 <= lo <= hi:
        raise config_lib.ConfigError(
            f"--caption-chars {text!r}: expected MIN,MAX, two integers with 0 <= MIN <= MAX (e.g. 1,200)"
        )
    return lo, hi


def data_convert(args, overrides) -> int:
    """`mmjax data convert SRC --out DIR`: one JSON line on stdout at the end, progress on stderr."""
    import sys

    if overrides or args.config:
        raise config_lib.ConfigError("mmjax data convert takes no --config (nor --config overrides)")
    if not args.src:
        raise config_lib.ConfigError("mmjax data convert needs SRC (tar shards, a CSV/JSONL list or tfds:NAME)")
    if not args.out:
        raise config_lib.ConfigError("mmjax data convert needs --out DIR")
    for flag, value, least in (("--workers", args.workers, 1), ("--records-per-shard", args.records_per_shard, 1)):
        if value is not None and value < least:
            raise config_lib.ConfigError(f"{flag} {value}: expected an integer >= {least}")
    if args.min_side < 0:
        raise config_lib.ConfigError(f"--min-side {args.min_side}: expected an integer >= 0")
    src = str(args.src)
    if src.endswith((".csv", ".jsonl", ".json")) and not os.path.isfile(os.path.expanduser(src)):
        raise FileNotFoundError(f"SRC {src}: no such list file")
    if args.beam_options and args.runner != "beam":
        raise config_lib.ConfigError("--beam-options needs --runner beam")
    kw = dict(
        split=args.split,
        workers=args.workers,
        records_per_shard=args.records_per_shard,
        min_side=args.min_side,
        caption_chars=caption_chars(args.caption_chars),
        dedup=args.dedup,
        data_dir=args.data_dir,
    )
    if args.runner == "beam":
        from mmjax.data import convert_beam

        convert_beam.require_beam()  # before any work: the missing extra is one line
        result = convert_beam.convert_beam(args.src, args.out, beam_options=args.beam_options, **kw)
    else:
        from mmjax.data import convert as convert_lib

        def progress(line):
            print(f"mmjax data convert: {line}", file=sys.stderr, flush=True)

        result = convert_lib.convert(args.src, args.out, progress=progress, **kw)
    from mmjax.data.manifest import SKIP_REASONS

    rank = {r: i for i, r in enumerate(SKIP_REASONS)}
    skipped = {k: int(v) for k, v in sorted(result["skipped"].items(), key=lambda kv: rank.get(kv[0], len(rank)))}
    line = {"records": int(result["records"]), "skipped": sum(skipped.values()), "shards": int(result["shards"])}
    print(json.dumps(line | {"out": result["out"], "skipped_by_reason": skipped}), flush=True)
    return 0


def bench(args, overrides):
    from mmjax import bench as bench_lib

    if args.batch_size:
        overrides = [*overrides, f"train.batch_size={args.batch_size}"]
    configs = [config_lib.load(path, overrides) for path in args.config]
    initialize(args, configs[0])
    if args.max_batch:
        return _max_batch(args, configs)
    rows = [
        bench_lib.step_time(c, args.steps, args.warmup, data=args.data, ceiling=not args.no_ceiling) for c in configs
    ]
    for path, row in zip(args.config, rows):
        row["config"] = path
        row["ratio"] = row["ms_per_step"] / rows[0]["ms_per_step"]
        if row.get("processes", 1) == 1 or __import__("jax").process_index() == 0:
            print(json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}))


def _max_batch(args, configs) -> int:
    """`mmjax bench --max-batch`: per config, the largest global batch whose compiled step fits."""
    import math

    import jax

    from mmjax import bench as bench_lib

    limit = int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else None
    multiple = math.lcm(8, jax.device_count())  # whole batches per device
    for path, c in zip(args.config, configs):
        print(json.dumps({"config": path, **bench_lib.max_batch(c, limit, multiple=multiple)}))
    return 0
