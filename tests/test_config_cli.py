"""Config loading, overrides and the CLI's exit code 2 for user mistakes."""

import os
import subprocess
import sys

import pytest

from mmjax import cli
from mmjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def test_overrides_are_typed():
    c = config_lib.load(
        DEMO,
        [
            "train.steps=7",
            "train.lr=0.5",
            "data.augment.flip=true",
            "data.augment.crop_scale=(0.5, 1.0)",
            "model.image_overrides.depth=1",
            "data.tokenizer.path=/tmp/x.model",
            "train.steps=1e2",
        ],
    )
    assert c.train.steps == 100 and isinstance(c.train.steps, int)
    assert c.train.lr == 0.5
    assert c.data.augment.flip is True
    assert tuple(c.data.augment.crop_scale) == (0.5, 1.0)
    assert c.model.image_overrides.depth == 1
    assert c.data.tokenizer.path == "/tmp/x.model"


def test_unknown_key_names_key_and_choices():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(DEMO, ["train.stepz=3"])
    msg = str(e.value)
    assert "train.stepz" in msg and "steps" in msg and "batch_size" in msg


def test_bad_choice_names_valid_choices():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(DEMO, ["model.loss=hinge"])
    assert "model.loss" in str(e.value) and "softmax" in str(e.value) and "sigmoid" in str(e.value)


def test_bad_type_is_reported():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(DEMO, ["train.steps=many"])
    assert "train.steps" in str(e.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.train.stepz=3", "train.stepz"),
        ("--config.nope.x=1", "nope"),
        ("--config.model.dtype=fp8", "bfloat16"),
    ],
)
def test_cli_exit_code_2(override, needle, tmp_path, capsys):
    code = cli.main(["train", "--config", DEMO, "--workdir", str(tmp_path), override])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing started


def test_console_script_exit_code_2(tmp_path):
    """The installed entry point really exits 2 (not just main()'s return value)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmjax.cli",
            "train",
            "--config",
            DEMO,
            "--workdir",
            str(tmp_path),
            "--config.train.stepz=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "train.stepz" in proc.stderr and proc.stderr.count("\n") <= 2


def test_cache_decoded_is_dropped_for_non_builtin_data():
    """The demo's in-memory cache is for built-in sets: pointing the recipe at your
    own file list streams it instead of failing."""
    from mmjax import config as config_lib

    demo = os.path.join(ROOT, "configs", "demo.py")
    assert config_lib.load(demo).data.cache_decoded is True
    assert config_lib.load(demo, ["data.name=files", "data.path=x.csv"]).data.cache_decoded is False
