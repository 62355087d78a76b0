"""`mmjax train | eval | data` (the command line).

    mmjax train --config configs/demo.py --workdir DIR [--config.train.steps=100 ...]
    mmjax train --config configs/clip_b16.py --workdir DIR --dry-run   (memory per device)
    mmjax train ... --coordinator HOST:PORT --num-processes N --process-id I   (multi-process)
    mmjax finetune --config configs/finetune_shapes.py:linear --init-from DIR --workdir OUT
    mmjax caption --workdir DIR --images a.png b.jpg [--beams 4]   (or --videos a.mp4)
    mmjax embed --workdir DIR --images a.png b.jpg --texts captions.txt --out emb.npz
    mmjax classify --workdir DIR --images a.png b.jpg --classes "red circle,blue square" [--templates "a {}"]
    mmjax export --workdir DIR --format safetensors|stablehlo|hf-clip --out OUT [--weights ema]
    mmjax convert --from hf-clip --src HF_DIR --workdir DIR
    mmjax eval  --workdir DIR [--split test] [--config.eval.max_examples=200 ...]
    mmjax data prepare --config configs/demo.py
    mmjax data bench --config configs/demo.py:emoji --config.data.image_size=224
    mmjax bench --config configs/demo.py --config configs/albef.py [--steps 20]

Mistakes a user can make (a config key, a value, a path) exit with code 2 and one
message naming what was wrong and what was expected.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mmjax import config as config_lib


def _split_overrides(argv):
    """Separates `--config.a.b=v` (or `--config.a.b v`) from the other flags."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise config_lib.ConfigError(f"override --config.{body} needs a value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


OVERRIDES_EPILOG = """\
config overrides:
  --config.KEY=VALUE (or --config.KEY VALUE) sets any key of the config file, typed as
  the value it replaces, e.g. --config.train.steps=100 --config.model.loss=sigmoid
  --config.data.augment.crop_scale="(0.5, 1.0)" --config.train.freeze=^image_tower/
  (a bare string for a tuple of strings is a 1-tuple). An unknown key or a bad value
  exits with code 2 and names the valid keys or choices. See docs/usage.md."""
EVAL_EPILOG = """\
config overrides:
  --config.KEY=VALUE changes a key of the workdir's saved config for this evaluation:
  eval.* (e.g. --config.eval.max_examples=200), data.* (e.g. --config.data.name=files
  --config.data.path=test.csv), parallel.*, model.dtype, model.attention, model.remat.
  Keys that shape the checkpoint (other model.*, train.*, data.image_size,
  data.text_len, data.num_frames, data.tokenizer.*) are refused with code 2."""


def _parser():
    p = argparse.ArgumentParser(prog="mmjax", description="JAX/Flax multimodal pretraining")
    sub = p.add_subparsers(dest="command", required=True)
    help_kw = dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OVERRIDES_EPILOG)
    t = sub.add_parser("train", help="pretrain (or resume in an existing workdir)", **help_kw)
    t.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    t.add_argument("--workdir", required=True)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--stop-at", type=int, default=None, help="leave after this step with a checkpoint, as a preempted job would"
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the step for the configured mesh, print bytes per device, do not train",
    )
    f = sub.add_parser("finetune", help="train a recipe starting from a pretraining checkpoint", **help_kw)
    f.add_argument("--config", required=True, help="path/to/config.py[:arg], e.g. configs/finetune_shapes.py:linear")
    f.add_argument("--init-from", required=True, help="a pretraining workdir or WORKDIR/checkpoints/STEP")
    f.add_argument(
        "--weights",
        choices=("student", "ema"),
        default=None,
        help="the student params or the EMA teacher (default: the config's finetune.weights)",
    )
    f.add_argument("--workdir", required=True)
    f.add_argument("--no-progress", action="store_true")
    m = sub.add_parser("embed", help="embeddings of your images and texts from a workdir's checkpoint (.npz)")
    m.add_argument("--workdir", required=True)
    m.add_argument("--images", nargs="*", default=(), help="image files")
    m.add_argument("--videos", nargs="*", default=(), help="video files (a video model; PyAV decodes them)")
    m.add_argument("--texts", default=None, help="a text file, one text per line")
    m.add_argument("--out", required=True, help="output .npz")
    m.add_argument("--weights", choices=("student", "ema"), default="student")
    cp = sub.add_parser("caption", help="captions of your images or videos from a captioning workdir (CoCa, BLIP)")
    cp.add_argument("--workdir", required=True)
    cp.add_argument("--images", nargs="+", default=(), help="image files")
    cp.add_argument("--videos", nargs="+", default=(), help="video files (a video model; PyAV decodes them)")
    cp.add_argument("--beams", type=int, default=1, help="1 = greedy; more = beam search")
    cp.add_argument("--max-len", type=int, default=None, help="tokens incl. bos (default: the model's text length)")
    cp.add_argument("--length-penalty", type=float, default=0.6, help="beam score / length ** this")
    cp.add_argument("--weights", choices=("student", "ema"), default="student")
    zs = sub.add_parser("classify", help="zero-shot classes of your images from a workdir, with your class names")
    zs.add_argument("--workdir", required=True)
    zs.add_argument("--images", nargs="+", required=True, help="image files")
    zs_names = zs.add_mutually_exclusive_group(required=True)
    zs_names.add_argument("--classes", help='comma-separated class names, e.g. "cat,dog"')
    zs_names.add_argument("--classes-file", help="a text file, one class name per line")
    zs.add_argument(
        "--templates",
        nargs="+",
        default=None,
        help="prompt templates with {} for the class name (default: the workdir's eval.zero_shot."
        "templates or its dataset's built-in ones); each prompt must fit data.text_len",
    )
    zs.add_argument("--weights", choices=("student", "ema"), default="student")
    x = sub.add_parser("export", help="write a workdir's params as safetensors, StableHLO encoders or an HF CLIP dir")
    x.add_argument("--workdir", required=True)
    x.add_argument("--format", required=True, choices=("safetensors", "stablehlo", "hf-clip"))
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--weights", choices=("student", "ema"), default="student")
    x.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    x.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="safetensors: cast params")
    x.add_argument("--platforms", default="cpu,cuda", help="stablehlo: comma-separated platforms")
    x.add_argument(
        "--precision",
        choices=("default", "highest"),
        default="default",
        help="stablehlo: matmul precision (highest: no TF32 on GPUs)",
    )
    c = sub.add_parser("convert", help="make an mmjax workdir from a transformers CLIP directory")
    c.add_argument("--from", dest="source_format", required=True, choices=("hf-clip",))
    c.add_argument("--src", required=True, help="a directory with config.json and model weights")
    c.add_argument("--workdir", required=True)
    e = sub.add_parser(
        "eval",
        help="evaluate the latest checkpoint of a workdir",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EVAL_EPILOG,
    )
    e.add_argument("--workdir", required=True)
    e.add_argument("--split", default=None)
    d = sub.add_parser("data", help="prepare a built-in dataset or measure the input pipeline", **help_kw)
    d.add_argument("action", choices=("prepare", "bench"))
    d.add_argument("--config", required=True)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--batches", type=int, default=30)
    d.add_argument("--threads", type=int, default=None)
    b = sub.add_parser("bench", help="time the train step of one or more configs on synthetic batches", **help_kw)
    b.add_argument("--config", required=True, action="append", help="repeat to compare; the first is the reference")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--batch-size", type=int, default=None, help="global batch (default: train.batch_size)")
    b.add_argument(
        "--data",
        choices=("synthetic", "pipeline"),
        default="synthetic",
        help="pipeline: also time the step fed by the real input pipeline (needs TensorFlow)",
    )
    b.add_argument("--no-ceiling", action="store_true", help="skip the matmul-ceiling measurement (no MFU)")
    b.add_argument(
        "--max-batch",
        action="store_true",
        help="instead of timing: the largest global batch whose compiled step fits device memory",
    )
    b.add_argument(
        "--memory-limit-gib",
        type=float,
        default=None,
        help="with --max-batch: bytes per device to fit (default: the device's limit)",
    )
    for s in (t, f, e, b):
        g = s.add_argument_group("multi-process (default: MMJAX_* env, SLURM / TPU VM detection, or one process)")
        g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
        g.add_argument("--num-processes", type=int, default=None)
        g.add_argument("--process-id", type=int, default=None)
    return p


def _print_result(result: dict, workdir: str):
    keys = [k for k in result if k not in ("final_state", "plot") and isinstance(result[k], (int, float))]
    print(
        "\nresult:", json.dumps({k: round(result[k], 4) if isinstance(result[k], float) else result[k] for k in keys})
    )
    if result.get("plot"):
        print(f"plot: {result['plot']}")
    print(f"workdir: {workdir}")


def _initialize(args, config):
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


def _os_error(e: OSError) -> str:
    """'Not a directory: workdirs/x/wd (a path above it is a regular file)' and the like."""
    hints = {
        NotADirectoryError: " (a path above it is a regular file, not a directory)",
        IsADirectoryError: " (a directory where a file was expected)",
        FileExistsError: " (a regular file where a directory was expected)",
        PermissionError: " (no permission: a read-only workdir or file?)",
    }
    if e.filename is None or not e.strerror:  # raised with mmjax's own message
        return str(e)
    hint = next((h for cls, h in hints.items() if isinstance(e, cls)), "")
    return f"{e.strerror}: {e.filename}{hint}"


# Packages of the `data` extra: a raw ModuleNotFoundError of one becomes one line.
_EXTRA_MODULES = {
    "tensorflow": "TensorFlow",
    "tensorflow_datasets": "TensorFlow Datasets",
    "av": "PyAV (video decoding)",
}


def _missing_extra(e: ImportError, command) -> str | None:
    """The one-line message for a missing `data` extra, or None for another ImportError."""
    try:
        from mmjax.data import MissingExtraError
    except ImportError:
        MissingExtraError = ()
    if MissingExtraError and isinstance(e, MissingExtraError):
        return str(e)
    root = (e.name or "").split(".")[0]
    if root not in _EXTRA_MODULES:
        return None
    what = f"mmjax {command}" if command else "this command"
    return f"{what} needs {_EXTRA_MODULES[root]} ({e}): pip install -e '.[data]' (or pip install 'mmjax[data]')"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        rest, overrides = _split_overrides(argv)
        args = _parser().parse_args(rest)
        if args.command == "train":
            config = config_lib.load(args.config, overrides)
            if args.dry_run:
                from mmjax import bench

                plan = bench.memory_plan(config)
                print(bench.format_plan(plan))
                print(json.dumps(plan))
                return 0
            _initialize(args, config)
            from mmjax.train import loop
            from mmjax.train import setup as setup_lib

            result = loop.train(config, args.workdir, progress=not args.no_progress, stop_at=args.stop_at)
            _print_result(result, args.workdir)
        elif args.command == "finetune":
            config = config_lib.load(args.config, overrides)
            if not os.path.isdir(args.init_from):
                raise FileNotFoundError(f"--init-from {args.init_from!r} is not a directory")
            import ml_collections

            with config.unlocked():
                if "finetune" not in config:
                    config.finetune = ml_collections.ConfigDict(
                        {"init_from": None, "weights": "student", "inflation": "central"}
                    )
                config.finetune.init_from = os.path.abspath(args.init_from)
                if args.weights:
                    config.finetune.weights = args.weights
            _initialize(args, config)
            from mmjax.train import loop
            from mmjax.train import setup as setup_lib

            result = loop.train(config, args.workdir, progress=not args.no_progress)
            _print_result(result, args.workdir)
        elif args.command == "embed":
            if overrides:
                raise config_lib.ConfigError("mmjax embed takes no --config overrides")
            if not args.images and not args.videos and not args.texts:
                raise config_lib.ConfigError("mmjax embed needs --images (or --videos) and/or --texts")
            from mmjax.eval.embed import embed

            print(
                json.dumps(
                    embed(
                        args.workdir,
                        images=args.images,
                        videos=args.videos,
                        texts_file=args.texts,
                        out=args.out,
                        weights=args.weights,
                    )
                )
            )
        elif args.command == "caption":
            if overrides:
                raise config_lib.ConfigError("mmjax caption takes no --config overrides")
            if not args.images and not args.videos:
                raise config_lib.ConfigError("mmjax caption needs --images or --videos")
            from mmjax.eval.embed import caption

            for row in caption(
                args.workdir,
                images=args.images,
                videos=args.videos,
                weights=args.weights,
                beams=args.beams,
                max_len=args.max_len,
                length_penalty=args.length_penalty,
            ):
                print(f"{row['image']}\t{row['caption']}")
        elif args.command == "classify":
            if overrides:
                raise config_lib.ConfigError("mmjax classify takes no --config overrides")
            from mmjax.eval import zero_shot

            names = (
                zero_shot.read_class_names(args.classes_file)
                if args.classes_file
                else zero_shot.split_class_names(args.classes)
            )
            rows = zero_shot.classify_files(
                args.workdir, args.images, names, templates=args.templates, weights=args.weights
            )
            if not rows:
                raise ValueError(f"none of the {len(args.images)} --images could be read as an image")
            for row in rows:
                print(f"{row['image']}\t{row['class']}\t{row['score']:.4f}")
        elif args.command == "export":
            if overrides:
                raise config_lib.ConfigError("mmjax export takes no --config overrides")
            if args.format == "hf-clip":
                from mmjax.export import hf_workdir

                path = hf_workdir.export_workdir(args.workdir, args.out, args.weights, step=args.step)
                print(json.dumps({"format": "hf-clip", "out": path, "weights": args.weights}))
            else:
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
        elif args.command == "convert":
            if overrides:
                raise config_lib.ConfigError("mmjax convert takes no --config overrides")
            from mmjax.export import hf_workdir

            hf_workdir.convert_to_workdir(args.src, args.workdir)
            print(json.dumps({"workdir": args.workdir, "from": args.source_format, "src": args.src}))
        elif args.command == "eval":
            from mmjax import workdir as workdir_lib
            from mmjax.train import setup as setup_lib

            config = workdir_lib.load_config_json(args.workdir)
            if overrides:  # on the saved config; keys that shape the checkpoint are refused
                config = config_lib.override_saved(config, overrides)
            _initialize(args, config)
            setup = setup_lib.Setup(config, args.workdir)
            restored = setup.restore()
            if restored is None:
                raise config_lib.ConfigError(f"no checkpoint in {args.workdir}/checkpoints")
            state, _ = restored
            metrics = setup.evaluator(args.split)(state.params)
            setup.checkpointer.close()
            metrics["step"] = int(state.step)
            _print_result(metrics, args.workdir)
        elif args.command == "data":
            config = config_lib.load(args.config, overrides)
            from mmjax.data import pipeline

            if args.action == "prepare":
                for split in (config.data.train_split, config.data.eval_split):
                    print(f"{config.data.name}/{split}: {pipeline.num_examples(config.data, split)} examples")
            else:
                print(
                    json.dumps(
                        pipeline.pipeline_throughput(config.data, args.batch_size, args.batches, threads=args.threads)
                    )
                )
        elif args.command == "bench":
            from mmjax import bench

            if args.batch_size:
                overrides = [*overrides, f"train.batch_size={args.batch_size}"]
            configs = [config_lib.load(path, overrides) for path in args.config]
            _initialize(args, configs[0])
            if args.max_batch:
                limit = int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else None
                import math

                import jax

                multiple = math.lcm(8, jax.device_count())  # whole batches per device
                for path, c in zip(args.config, configs):
                    print(json.dumps({"config": path, **bench.max_batch(c, limit, multiple=multiple)}))
                return 0
            rows = [
                bench.step_time(c, args.steps, args.warmup, data=args.data, ceiling=not args.no_ceiling)
                for c in configs
            ]
            for path, row in zip(args.config, rows):
                row["config"] = path
                row["ratio"] = row["ms_per_step"] / rows[0]["ms_per_step"]
                if row.get("processes", 1) == 1 or __import__("jax").process_index() == 0:
                    print(json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}))
    except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
        # ValueError: a variant name, a shape or a path a user gave; the message names it.
        if os.environ.get("MMJAX_DEBUG"):
            raise
        print(f"mmjax: error: {e}", file=sys.stderr)
        return 2
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        # A path a user gave: a read-only workdir, a workdir under (or at) a regular file.
        if os.environ.get("MMJAX_DEBUG"):
            raise
        print(f"mmjax: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except ImportError as e:
        message = _missing_extra(e, argv[0] if argv else None)
        if message is None or os.environ.get("MMJAX_DEBUG"):
            raise
        print(f"mmjax: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
