"""`mmjax train | eval | data` (the command line).

    mmjax train --config configs/demo.py --workdir DIR [--config.train.steps=100 ...]
    mmjax train --config configs/clip_b16.py --workdir DIR --dry-run   (memory per device)
    mmjax train ... --coordinator HOST:PORT --num-processes N --process-id I   (multi-process)
    mmjax finetune --config configs/finetune_shapes.py:linear --init-from DIR --workdir OUT
    mmjax caption --workdir DIR --images a.png b.jpg [--beams 4]   (or --videos a.mp4)
    mmjax embed --workdir DIR --images a.png b.jpg --texts captions.txt --out emb.npz
    mmjax classify --workdir DIR --images a.png b.jpg --classes "red circle,blue square" [--templates "a {}"]
    mmjax export --workdir DIR --format safetensors|stablehlo|hf-clip|hf-llm|hf-llava --out OUT [--weights ema]
    mmjax convert --from hf-clip|hf-llama|hf-qwen2|hf-gemma --src HF_DIR --workdir DIR
    mmjax generate --workdir DIR --prompt "a red circle" [--max-new-tokens 32] [--greedy | --temperature T --top-p P]
    mmjax eval  --workdir DIR [--split test] [--config.eval.max_examples=200 ...]
    mmjax data prepare --config configs/demo.py
    mmjax data bench --config configs/demo.py:emoji --config.data.image_size=224
    mmjax data convert 'dl/{00000..00127}.tar' --out shards/ [--dedup --min-side 64 --runner beam]
    mmjax bench --config configs/demo.py --config configs/albef.py [--steps 20]
    mmjax --version

`COMMANDS` is the table: each subcommand's name, help, flags, whether it takes
`--config.KEY=VALUE` overrides and its handler (mmjax/commands.py); the parser is
built from it. Mistakes a user can make (a config key, a value, a path) exit with
code 2 and one message naming what was wrong and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Callable

from mmjax import commands
from mmjax import config as config_lib
from mmjax.user_errors import user_error

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


def arg(*flags, **kw):
    """One flag of a command: `parser.add_argument(*flags, **kw)`."""
    return ("arg", flags, kw)


def one_of(*args, required=False):
    """Flags of which at most one (with `required`, exactly one) may be given."""
    return ("one_of", args, {"required": required})


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable  # (args, overrides) -> exit code (None: 0)
    args: tuple = ()
    overrides: bool = False  # takes --config.KEY=VALUE; otherwise they are refused (exit 2)
    epilog: str | None = None  # what --help adds about the overrides
    multiprocess: bool = False  # --coordinator, --num-processes, --process-id


WORKDIR = arg("--workdir", required=True)
WEIGHTS = arg("--weights", choices=("student", "ema"), default="student")
NO_PROGRESS = arg("--no-progress", action="store_true")
CONFIG = arg("--config", required=True, help="path/to/config.py[:arg]")

COMMANDS = {
    c.name: c
    for c in (
        Command(
            "train",
            "pretrain (or resume in an existing workdir)",
            commands.train,
            (
                CONFIG,
                WORKDIR,
                NO_PROGRESS,
                arg(
                    "--stop-at",
                    type=int,
                    default=None,
                    help="leave after this step with a checkpoint, as a preempted job would",
                ),
                arg(
                    "--dry-run",
                    action="store_true",
                    help="compile the step for the configured mesh, print bytes per device, do not train",
                ),
            ),
            overrides=True,
            epilog=OVERRIDES_EPILOG,
            multiprocess=True,
        ),
        Command(
            "finetune",
            "train a recipe starting from a pretraining checkpoint",
            commands.finetune,
            (
                arg("--config", required=True, help="path/to/config.py[:arg], e.g. configs/finetune_shapes.py:linear"),
                arg("--init-from", required=True, help="a pretraining workdir or WORKDIR/checkpoints/STEP"),
                arg(
                    "--weights",
                    choices=("student", "ema"),
                    default=None,
                    help="the student params or the EMA teacher (default: the config's finetune.weights)",
                ),
                WORKDIR,
                NO_PROGRESS,
            ),
            overrides=True,
            epilog=OVERRIDES_EPILOG,
            multiprocess=True,
        ),
        Command(
            "embed",
            "embeddings of your images and texts from a workdir's checkpoint (.npz)",
            commands.embed,
            (
                WORKDIR,
                arg("--images", nargs="*", default=(), help="image files"),
                arg("--videos", nargs="*", default=(), help="video files (a video model; PyAV decodes them)"),
                arg("--texts", default=None, help="a text file, one text per line"),
                arg("--out", required=True, help="output .npz"),
                WEIGHTS,
            ),
        ),
        Command(
            "caption",
            "captions of your images or videos from a captioning workdir (CoCa, BLIP)",
            commands.caption,
            (
                WORKDIR,
                arg("--images", nargs="+", default=(), help="image files"),
                arg("--videos", nargs="+", default=(), help="video files (a video model; PyAV decodes them)"),
                arg("--beams", type=int, default=1, help="1 = greedy; more = beam search"),
                arg("--max-len", type=int, default=None, help="tokens incl. bos (default: the model's text length)"),
                arg("--length-penalty", type=float, default=0.6, help="beam score / length ** this"),
                WEIGHTS,
            ),
        ),
        Command(
            "generate",
            "continue text prompts with a workdir's language model; one JSON line per prompt",
            commands.generate,
            (
                WORKDIR,
                arg("--prompt", action="append", default=[], help="a prompt (repeat for several)"),
                arg("--images", nargs="+", default=(), help="image files (a model that reads images)"),
                arg("--chat", default=None, help="a JSONL of LLaVA-format conversations to answer the last turn of"),
                arg("--max-new-tokens", type=int, default=32, help="tokens generated at most per prompt"),
                one_of(
                    arg("--greedy", action="store_true", help="the most likely token each step (the default)"),
                    arg("--temperature", type=float, default=None, help="sample at this temperature (with --top-p)"),
                ),
                arg("--beams", type=int, default=1, help="beam search with this many beams (1: greedy)"),
                arg("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass"),
                arg("--seed", type=int, default=0, help="sampling: the PRNG seed"),
                arg("--length-penalty", type=float, default=0.0, help="beams: score / length ** this"),
                arg("--stop", action="append", default=[], help="cut the text at this string (repeatable)"),
                WEIGHTS,
            ),
        ),
        Command(
            "classify",
            "zero-shot classes of your images from a workdir, with your class names",
            commands.classify,
            (
                WORKDIR,
                arg("--images", nargs="+", required=True, help="image files"),
                one_of(
                    arg("--classes", help='comma-separated class names, e.g. "cat,dog"'),
                    arg("--classes-file", help="a text file, one class name per line"),
                    required=True,
                ),
                arg(
                    "--templates",
                    nargs="+",
                    default=None,
                    help="prompt templates with {} for the class name (default: the workdir's eval.zero_shot."
                    "templates or its dataset's built-in ones); each prompt must fit data.text_len",
                ),
                WEIGHTS,
            ),
        ),
        Command(
            "export",
            "write a workdir's params as safetensors, StableHLO encoders or an HF CLIP, LLM or LLaVA dir",
            commands.export,
            (
                WORKDIR,
                arg("--format", required=True, choices=("safetensors", "stablehlo", "hf-clip", "hf-llm", "hf-llava")),
                arg("--out", required=True, help="output directory"),
                WEIGHTS,
                arg("--step", type=int, default=None, help="checkpoint step (default: the latest)"),
                arg("--dtype", choices=("float32", "bfloat16"), default=None, help="safetensors: cast params"),
                arg("--platforms", default="cpu,cuda", help="stablehlo: comma-separated platforms"),
                arg(
                    "--precision",
                    choices=("default", "highest"),
                    default="default",
                    help="stablehlo: matmul precision (highest: no TF32 on GPUs)",
                ),
            ),
        ),
        Command(
            "convert",
            "make an mmjax workdir from a transformers CLIP or causal-LM (Llama, Qwen2, Gemma) directory",
            commands.convert,
            (
                arg(
                    "--from",
                    dest="source_format",
                    required=True,
                    choices=("hf-clip", "hf-llama", "hf-qwen2", "hf-gemma"),
                ),
                arg("--src", required=True, help="a directory with config.json and model weights"),
                WORKDIR,
            ),
        ),
        Command(
            "eval",
            "evaluate the latest checkpoint of a workdir",
            commands.evaluate,
            (WORKDIR, arg("--split", default=None)),
            overrides=True,
            epilog=EVAL_EPILOG,
            multiprocess=True,
        ),
        Command(
            "data",
            "prepare a built-in dataset, measure the input pipeline, convert a dataset to shards, or capfilt shards",
            commands.data,
            (
                arg("action", choices=("prepare", "bench", "convert", "capfilt")),
                arg(
                    "src",
                    nargs="?",
                    default=None,
                    help="convert: tar shards (a brace pattern dir/{00000..00127}.tar or a directory), "
                    "a CSV/JSONL list, or tfds:NAME[/CONFIG]",
                ),
                arg("--config", default=None, help="prepare, bench (required): path/to/config.py[:arg]"),
                arg("--batch-size", type=int, default=64, help="bench; capfilt: images per model call"),
                arg("--batches", type=int, default=30, help="bench"),
                arg("--threads", type=int, default=None, help="bench"),
                arg("--process-count", type=int, default=1, help="bench: read as one of P processes (data only)"),
                arg("--process-index", type=int, default=0, help="bench: which of the --process-count processes"),
                arg("--out", default=None, help="convert, capfilt (required): the output directory"),
                arg("--split", default="train", help="convert, capfilt: the split to write (and to read)"),
                arg("--workers", type=int, default=None, help="convert: processes (default: the local cores)"),
                arg("--records-per-shard", type=int, default=10000, help="convert (list, tfds: sources), capfilt"),
                arg("--min-side", type=int, default=0, help="convert: skip images whose smaller side is shorter"),
                arg(
                    "--caption-chars",
                    default="1,10000",
                    metavar="MIN,MAX",
                    help="convert: skip captions whose length in characters is outside [MIN, MAX]",
                ),
                arg(
                    "--dedup",
                    action="store_true",
                    help="convert: skip exact duplicates (the same media bytes as an earlier sample)",
                ),
                arg("--data-dir", default=None, help="convert: the TFDS data_dir of a tfds: source"),
                arg(
                    "--runner",
                    choices=("local", "beam"),
                    default="local",
                    help="convert: a local process pool, or an Apache Beam pipeline (the beam extra)",
                ),
                arg(
                    "--beam-options",
                    default="",
                    help='convert --runner beam: Beam pipeline flags, given as --beam-options="--runner=DataflowRunner '
                    '--project=P ..." (default: the local DirectRunner over --workers processes)',
                    metavar='"FLAGS"',
                ),
                arg("--captioner", default=None, help="capfilt (required): a captioning workdir (BLIP, CoCa)"),
                arg("--filter", default=None, help="capfilt (required): an image-text matching workdir (ALBEF, BLIP)"),
                arg("--in", dest="capfilt_in", metavar="DIR", help="capfilt (required): a `data convert` output DIR"),
                arg("--threshold", type=float, default=0.5, help="capfilt: keep captions of match probability >= this"),
                arg("--top-p", type=float, default=0.9, help="capfilt: the captioner's nucleus probability mass"),
                arg("--temperature", type=float, default=1.0, help="capfilt: the captioner's sampling temperature"),
                arg("--seed", type=int, default=0, help="capfilt: sampling seed (with each input record's id)"),
                arg("--weights", choices=("student", "ema"), default="student", help="capfilt: both models' params"),
            ),
            overrides=True,
            epilog=OVERRIDES_EPILOG + "\n  They apply to prepare and bench; convert and capfilt take none.",
        ),
        Command(
            "bench",
            "time the train step of one or more configs on synthetic batches",
            commands.bench,
            (
                arg(
                    "--config",
                    required=True,
                    action="append",
                    help="repeat to compare; the first is the reference",
                ),
                arg("--steps", type=int, default=20),
                arg("--warmup", type=int, default=3),
                arg("--batch-size", type=int, default=None, help="global batch (default: train.batch_size)"),
                arg(
                    "--data",
                    choices=("synthetic", "pipeline"),
                    default="synthetic",
                    help="pipeline: also time the step fed by the real input pipeline (needs TensorFlow)",
                ),
                arg("--no-ceiling", action="store_true", help="skip the matmul-ceiling measurement (no MFU)"),
                arg(
                    "--max-batch",
                    action="store_true",
                    help="instead of timing: the largest global batch whose compiled step fits device memory",
                ),
                arg(
                    "--memory-limit-gib",
                    type=float,
                    default=None,
                    help="with --max-batch: bytes per device to fit (default: the device's limit)",
                ),
            ),
            overrides=True,
            epilog=OVERRIDES_EPILOG,
            multiprocess=True,
        ),
    )
}

MULTIPROCESS = (
    arg("--coordinator", default=None, help="HOST:PORT of process 0"),
    arg("--num-processes", type=int, default=None),
    arg("--process-id", type=int, default=None),
)


def _add(parser, spec):
    kind, body, kw = spec
    if kind == "one_of":
        group = parser.add_mutually_exclusive_group(**kw)
        for s in body:
            _add(group, s)
    else:
        parser.add_argument(*body, **kw)


def _parser():
    import mmjax

    p = argparse.ArgumentParser(prog="mmjax", description="JAX/Flax multimodal pretraining")
    p.add_argument("--version", action="version", version=f"mmjax {mmjax.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for c in COMMANDS.values():
        s = sub.add_parser(c.name, help=c.help, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=c.epilog)
        for spec in c.args:
            _add(s, spec)
        if c.multiprocess:
            g = s.add_argument_group("multi-process (default: MMJAX_* env, SLURM / TPU VM detection, or one process)")
            for spec in MULTIPROCESS:
                _add(g, spec)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow", "jax._src", "orbax", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        rest, overrides = config_lib.split_overrides(argv)
        args = _parser().parse_args(rest)
        command = COMMANDS[args.command]
        if overrides and not command.overrides:
            raise config_lib.ConfigError(f"mmjax {command.name} takes no --config overrides")
        return command.run(args, overrides) or 0
    except (ValueError, OSError, ImportError) as e:  # ConfigError is a ValueError
        message = user_error(e, argv[0] if argv else None)
        if message is None or os.environ.get("MMJAX_DEBUG"):
            raise
        print(f"mmjax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
