"""A new user's first hour (issue 14, "First contact" and "Tracebacks on user input"):
every mistake below exits with code 2 and one line saying what is wrong, never a
traceback; help texts mention the overrides; `mmjax eval` takes overrides of the
workdir's saved config; the install declares what the docs promise.

Most tests call `mmjax.cli.main` in-process and stop before any data or compile."""

import os
import subprocess
import sys
import textwrap
import types

import pytest

from mmjax import cli
from mmjax import config as config_lib
from mmjax import workdir as workdir_lib
from tiny import DEMO, ROOT, tiny_config, tiny_overrides


def _one_line_error(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("mmjax: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tiny(tmp_path):
    """The tiny recipe's overrides, 2 steps: where a mistake is not caught (the code
    before these fixes) the run is short."""
    extra = {"train.steps": 2, "eval.at_end": False}
    return [f"--config.{k}={v}" for k, v in tiny_overrides(tmp_path / "tfds", **extra).items()]


def _train(tmp_path, *overrides, config=DEMO, workdir=None):
    return cli.main(
        [
            "train",
            "--config",
            config,
            "--workdir",
            str(workdir or tmp_path / "wd"),
            "--no-progress",
            *_tiny(tmp_path),
            *overrides,
        ]
    )


# ---------------------------------------------------------------- help and overrides


@pytest.mark.parametrize("command", ["train", "finetune", "eval", "data", "bench"])
def test_help_mentions_config_overrides(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config.KEY=VALUE" in out and "config overrides:" in out


def test_freeze_takes_a_bare_regex():
    """`--config.train.freeze=^image_tower/` (as people type it) is a 1-tuple; a
    literal still works; a tuple of numbers still rejects a bare word."""
    c = config_lib.load(DEMO, ["train.freeze=^image_tower/"])
    assert c.train.freeze == ("^image_tower/",)
    c = config_lib.load(DEMO, ["train.freeze=('^image_tower/', 'text_tower/.*embed')"])
    assert c.train.freeze == ("^image_tower/", "text_tower/.*embed")
    c = config_lib.load(DEMO, ["train.freeze=(image|text)_tower/encoder/block0[01],x"])  # no comma split
    assert c.train.freeze == ("(image|text)_tower/encoder/block0[01],x",)
    with pytest.raises(config_lib.ConfigError, match="crop_scale"):
        config_lib.load(DEMO, ["data.augment.crop_scale=abc"])
    # And it freezes what it says (the mask the loop builds from train.freeze).
    from mmjax.train import optim

    params = {"image_tower": {"w": 0.0}, "text_tower": {"w": 0.0}, "image_proj": {"w": 0.0}}
    mask = optim.trainable_mask(params, config_lib.load(DEMO, ["train.freeze=^image_tower/"]).train.freeze)
    assert mask == {"image_tower": {"w": False}, "text_tower": {"w": True}, "image_proj": {"w": True}}


def test_cli_freeze_override_reaches_the_config(tmp_path, capsys):
    # Through the command line: the override parses; the run then stops at the next
    # mistake (log_every=0), before anything is written.
    assert _train(tmp_path, "--config.train.freeze=^image_tower/", "--config.train.log_every=0") == 2
    line = _one_line_error(capsys)
    assert "train.log_every" in line and "invalid syntax" not in line


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.train.steps=abc", "expected an integer, got 'abc'"),
        ("--config.train.lr=fast", "expected a number, got 'fast'"),
    ],
)
def test_bad_number_says_what_was_expected(override, needle, tmp_path, capsys):
    assert _train(tmp_path, override) == 2
    line = _one_line_error(capsys)
    assert needle in line and "could not convert" not in line


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.log_every=0", "positive"),  # was ZeroDivisionError in the loop
        ("train.keep_checkpoints=0", "positive"),
        ("train.ckpt_every=-1", ">= 0"),
        ("eval.every=-5", ">= 0"),
        ("eval.batch_size=0", "positive"),
        ("train.accum_steps=0", "positive"),
        ("train.max_bad_steps=0", "positive"),  # was silently taken as 1
        # The step's finiteness check trusts AdamW with these in range (mmjax/train/step.py).
        ("train.lr=nan", ">= 0"),
        ("train.lr=-0.001", ">= 0"),
        ("train.eps=0", "> 0"),
        ("train.b2=1.0", "< 1"),
    ],
)
def test_out_of_range_numbers_exit_2_before_anything_runs(override, needle, tmp_path, capsys):
    assert _train(tmp_path, f"--config.{override}") == 2
    line = _one_line_error(capsys)
    assert override.split("=")[0] in line and needle in line
    assert not os.path.exists(tmp_path / "wd")


# ---------------------------------------------------------------- config files


def test_config_file_with_a_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections\n\ndef get_config(arg=None:\n    return None\n")
    assert _train(tmp_path, config=str(bad)) == 2
    line = _one_line_error(capsys)
    assert f"config file {bad} line 3" in line


def test_config_file_whose_get_config_raises(tmp_path, capsys):
    bad = tmp_path / "raises.py"
    bad.write_text(
        textwrap.dedent("""\
        import ml_collections

        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            return c.data.nope  # line 5
        """)
    )
    assert _train(tmp_path, config=str(bad)) == 2
    line = _one_line_error(capsys)
    assert f"config file {bad} line 5" in line and "get_config(None)" in line
    # An error while the module runs (before get_config) names the file too.
    bad.write_text("import ml_collections\nx = 1 / 0\n")
    assert _train(tmp_path, config=str(bad)) == 2
    line = _one_line_error(capsys)
    assert f"config file {bad} line 2" in line and "ZeroDivisionError" in line


def test_recipe_argument_error_names_the_file(tmp_path, capsys):
    assert _train(tmp_path, config=DEMO + ":nope") == 2
    line = _one_line_error(capsys)
    assert "demo.py" in line and "shapes, emoji" in line


# ---------------------------------------------------------------- paths


def test_workdir_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert _train(tmp_path, workdir=tmp_path / "afile" / "wd") == 2
    assert "Not a directory" in _one_line_error(capsys)
    assert _train(tmp_path, workdir=tmp_path / "afile") == 2
    assert "afile" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "wd/config.json.tmp"),
        IsADirectoryError(21, "Is a directory", "wd/metrics.jsonl"),
    ],
)
def test_os_errors_of_user_paths_exit_2(error, tmp_path, monkeypatch, capsys):
    """A read-only workdir (the loop's own message, or a raw OSError from any write)."""
    from mmjax.train import loop

    def train(*a, **k):
        raise error

    monkeypatch.setattr(loop, "train", train)
    assert _train(tmp_path) == 2
    line = _one_line_error(capsys)
    assert error.filename in line and error.strerror in line


def test_errors_of_other_helpers_map_to_exit_2(tmp_path, capsys):
    """Real inputs, through the CLI: a JSONL list with a line that is not an object
    (ValueError naming FILE:LINE) stays one line."""
    (tmp_path / "a.png").write_bytes(b"")
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"image_path": "a.png", "caption": "x"}\n{"image_path": "a.png", "caption": "y"}\n["a.png", "z"]\n')
    assert _train(tmp_path, "--config.data.name=files", f"--config.data.path={bad}") == 2
    assert "data.jsonl:3: expected a JSON object" in _one_line_error(capsys)


def test_init_from_a_step_without_its_state_exits_2(saved_workdir, tmp_path, capsys):
    """`mmjax finetune --init-from` a workdir whose only step lost its state item: one
    line naming the step and what is missing, exit 2."""
    meta = os.path.join(saved_workdir, "checkpoints", "5", "meta")
    os.makedirs(meta)
    with open(os.path.join(meta, "metadata"), "w") as f:
        f.write('{"data_position": 80}')
    code = cli.main(
        [
            "finetune",
            "--config",
            os.path.join(ROOT, "configs", "finetune_shapes.py") + ":linear",
            "--init-from",
            saved_workdir,
            "--workdir",
            str(tmp_path / "ft"),
            "--no-progress",
            *[o for o in _tiny(tmp_path) if o.startswith(("--config.data.", "--config.train."))],
        ]
    )
    assert code == 2
    line = _one_line_error(capsys)
    assert "step 5" in line and "state/" in line


# ---------------------------------------------------------------- the `data` extra


def test_missing_data_extra_says_what_to_install(tmp_path):
    """A plain `pip install -e .` (no TensorFlow): `mmjax train` exits 2 naming the
    extra; simulated by blocking the imports in a fresh interpreter."""
    run = textwrap.dedent("""\
        import sys
        for m in ("tensorflow", "tensorflow_datasets", "av"):
            sys.modules[m] = None  # `import tensorflow` now raises ModuleNotFoundError
        from mmjax.cli import main
        sys.exit(main(sys.argv[1:]))
        """)
    overrides = _tiny(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("MMJAX_DEBUG", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            run,
            "train",
            "--config",
            DEMO,
            "--workdir",
            str(tmp_path / "wd"),
            "--no-progress",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("mmjax: error:")]
    assert len(lines) == 1 and "TensorFlow" in lines[0] and ".[data]" in lines[0], proc.stderr[-2000:]


def test_raw_module_not_found_of_the_extra_exits_2(tmp_path, monkeypatch, capsys):
    """A raw ModuleNotFoundError of a `data` package (PyAV imported by a video path)
    becomes one line; an unrelated ImportError stays a traceback (a bug to see)."""
    from mmjax.train import loop

    def train(*a, **k):
        raise ModuleNotFoundError("No module named 'av'", name="av")

    monkeypatch.setattr(loop, "train", train)
    assert _train(tmp_path) == 2
    line = _one_line_error(capsys)
    assert "PyAV" in line and ".[data]" in line and "mmjax train" in line

    def other(*a, **k):
        raise ModuleNotFoundError("No module named 'mmjax.nope'", name="mmjax.nope")

    monkeypatch.setattr(loop, "train", other)
    with pytest.raises(ModuleNotFoundError):
        _train(tmp_path)


def _setup_kwargs():
    import setuptools

    captured = {}
    source = open(os.path.join(ROOT, "setup.py")).read()
    real = setuptools.setup
    try:
        setuptools.setup = lambda **k: captured.update(k)
        exec(compile(source, "setup.py", "exec"), {"__name__": "__main__"})
    finally:
        setuptools.setup = real
    return captured


def test_install_declares_what_export_and_docs_need():
    """jax.export's serialisation imports flatbuffers, which jax does not install; the
    TensorBoard the docs tell users to run comes with the `viz` extra."""
    kw = _setup_kwargs()
    names = [r.split(">")[0].split("=")[0].split(";")[0].strip() for r in kw["install_requires"]]
    assert "flatbuffers" in names
    import jax._src.export.serialization  # noqa: F401  the import that needs it

    assert any(r.startswith("tensorboard") for r in kw["extras_require"]["viz"])
    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    assert "tensorboard --logdir workdirs/demo/tb" in usage and ".[viz]" in usage
    assert "flatbuffers" in open(os.path.join(ROOT, "docs", "export.md")).read()


# ---------------------------------------------------------------- mmjax eval overrides


@pytest.fixture
def saved_workdir(tmp_path):
    """A workdir holding only the saved config of a tiny run."""
    wd = tmp_path / "wd"
    wd.mkdir()
    workdir_lib.save_config_json(tiny_config(tmp_path / "tfds"), str(wd))
    return str(wd)


def test_eval_takes_overrides_of_the_saved_config(saved_workdir, monkeypatch, capsys):
    from mmjax.train import setup as setup_lib

    seen = {}

    class FakeSetup:  # records the config eval builds its Setup from; no data, no restore
        def __init__(self, config, workdir):
            seen["config"] = config
            self.checkpointer = types.SimpleNamespace(close=lambda: None)
            self.state_sharding = types.SimpleNamespace(params=None)

    monkeypatch.setattr(setup_lib, "Setup", FakeSetup)
    code = cli.main(
        [
            "eval",
            "--workdir",
            saved_workdir,
            "--config.eval.max_examples=16",
            "--config.data.name",
            "files",
            "--config.data.path=test.csv",
            "--config.model.dtype=bfloat16",
        ]
    )
    assert code == 2 and "no checkpoint" in _one_line_error(capsys)  # the fake has none
    c = seen["config"]
    assert (c.eval.max_examples, c.data.name, c.data.path, c.model.dtype) == (16, "files", "test.csv", "bfloat16")
    assert c.data.cache_decoded is False  # validated as train's: the built-in-only cache is dropped


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.embed_dim=64", "cannot override 'model.embed_dim'"),
        ("train.lr=0.1", "cannot override 'train.lr'"),
        ("data.text_len=8", "cannot override 'data.text_len'"),
        ("data.tokenizer.vocab_size=50", "cannot override 'data.tokenizer.vocab_size'"),
        ("eval.batch_size=0", "expected a positive integer"),
        ("eval.nope=1", "unknown config key 'eval.nope'"),
    ],
)
def test_eval_refuses_overrides_that_do_not_fit_the_checkpoint(override, needle, saved_workdir, capsys):
    assert cli.main(["eval", "--workdir", saved_workdir, f"--config.{override}"]) == 2
    assert needle in _one_line_error(capsys)


def test_eval_override_keys_are_checked_before_anything_loads():
    """The refusal lists what may be overridden (no workdir needed)."""
    with pytest.raises(config_lib.ConfigError, match=r"eval\.\*, data\.\*"):
        config_lib.override_saved(config_lib.load(DEMO), ["model.image=B/16"])
