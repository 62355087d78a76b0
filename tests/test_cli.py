"""The command line as a table (mmjax/cli.py COMMANDS, handlers in mmjax/commands.py):
the commands and flags scripts rely on, `mmjax --version`, overrides refused by the
commands that take none, and the finetune config rewriting."""

import os
import subprocess
import sys

import pytest

import mmjax
from mmjax import cli, commands
from mmjax import config as config_lib
from tiny import DEMO, ROOT

MP = ["--coordinator", "--num-processes", "--process-id"]
# The flags of each command before the CLI became a table (scripts outside use them).
FLAGS = {
    "train": ["--config", "--workdir", "--no-progress", "--stop-at", "--dry-run", *MP],
    "finetune": ["--config", "--init-from", "--weights", "--workdir", "--no-progress", *MP],
    "embed": ["--workdir", "--images", "--videos", "--texts", "--out", "--weights"],
    "caption": ["--workdir", "--images", "--videos", "--beams", "--max-len", "--length-penalty", "--weights"],
    "generate": [
        "--workdir",
        "--prompt",
        "--images",
        "--chat",
        "--max-new-tokens",
        "--greedy",
        "--temperature",
        "--beams",
        "--top-p",
        "--seed",
        "--length-penalty",
        "--stop",
        "--weights",
    ],
    "classify": ["--workdir", "--images", "--classes", "--classes-file", "--templates", "--weights"],
    "export": ["--workdir", "--format", "--out", "--weights", "--step", "--dtype", "--platforms", "--precision"],
    "convert": ["--from", "--src", "--workdir"],
    "eval": ["--workdir", "--split", *MP],
    "data": [
        "action",
        "src",
        "--batch-size",
        "--batches",
        "--config",
        "--threads",
        "--process-count",
        "--process-index",
        "--out",
        "--split",
        "--workers",
        "--records-per-shard",
        "--min-side",
        "--caption-chars",
        "--dedup",
        "--data-dir",
        "--runner",
        "--beam-options",
        "--captioner",
        "--filter",
        "--in",
        "--threshold",
        "--top-p",
        "--temperature",
        "--seed",
        "--weights",
    ],
    "bench": [
        "--config",
        "--steps",
        "--warmup",
        "--batch-size",
        "--data",
        "--no-ceiling",
        "--max-batch",
        "--memory-limit-gib",
        *MP,
    ],
}


def _subparsers():
    import argparse

    p = cli._parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_commands_and_flags_are_kept():
    subs = _subparsers()
    assert list(subs) == list(FLAGS)  # the order `mmjax --help` lists them in
    for name, parser in subs.items():
        flags = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions]
        assert sorted(f for f in flags if f != "-h") == sorted(FLAGS[name]), name
        assert cli.COMMANDS[name].run.__module__ == "mmjax.commands"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"mmjax {mmjax.__version__}\n"
    assert mmjax.__version__


def test_console_script_version():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    run = "import sys; from mmjax.cli import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", run, "--version"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"mmjax {mmjax.__version__}", proc.stderr


@pytest.mark.parametrize("name", [c.name for c in cli.COMMANDS.values() if not c.overrides])
def test_commands_without_overrides_refuse_them(name, capsys):
    required = {
        "embed": ["--workdir", "w", "--out", "o.npz", "--texts", "t.txt"],
        "caption": ["--workdir", "w", "--images", "a.png"],
        "generate": ["--workdir", "w", "--prompt", "a"],
        "classify": ["--workdir", "w", "--images", "a.png", "--classes", "a,b"],
        "export": ["--workdir", "w", "--format", "safetensors", "--out", "o"],
        "convert": ["--from", "hf-clip", "--src", "s", "--workdir", "w"],
    }[name]
    assert cli.main([name, *required, "--config.train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mmjax: error: mmjax {name} takes no --config overrides"


def test_finetune_config_sets_the_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    config = commands.finetune_config(config_lib.load(DEMO), str(src), "ema")  # demo has no finetune section
    assert (config.finetune.init_from, config.finetune.weights) == (str(src), "ema")
    assert config.finetune.inflation == "central"
    ft = config_lib.load(os.path.join(ROOT, "configs", "finetune_shapes.py") + ":linear")
    rel = os.path.relpath(src)
    config = commands.finetune_config(ft, rel, None)  # the recipe's own weights stay
    assert (config.finetune.init_from, config.finetune.weights) == (os.path.abspath(rel), "student")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        commands.finetune_config(config_lib.load(DEMO), str(tmp_path / "nope"), None)
