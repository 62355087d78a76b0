"""Recipes: load a config file, apply `--config.a.b=value` overrides, validate.

A config file is a python file with `get_config(arg=None) -> ConfigDict`; an
argument may follow the path after a colon (`configs/demo.py:emoji`). Every user
mistake raises `ConfigError` with one message naming the key and the valid
choices; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Mapping

import ml_collections

from mmjax.data.modalities import AUDIO_DERIVED_FROM
from mmjax.errors import ConfigError  # callers raise and catch it as `config.ConfigError` too

WEIGHTS = ("student", "ema")  # a workdir's params: the student's, or the EMA teacher's
PARALLEL_MODES = ("mesh", "pmap")
MU_DTYPES = ("float32", "bfloat16")


def _choices() -> dict:
    """Keys whose values must come from a fixed set: dotted key -> the code's own tuple."""
    from mmjax.data.video_io import SAMPLINGS
    from mmjax.models import zoo
    from mmjax.models.text import POOLS as TEXT_POOLS
    from mmjax.models.transformer import ACTIVATIONS, REMAT_POLICIES
    from mmjax.models.video import INFLATIONS, LOCAL_VARIANTS, TEMPORAL
    from mmjax.models.zoo import clip, vqa
    from mmjax.models.zoo.schema import DTYPES

    return {
        "model.family": tuple(zoo.FAMILIES),
        "model.temporal": TEMPORAL,
        "model.local_temporal": LOCAL_VARIANTS,
        "data.frame_sampling": SAMPLINGS,
        "model.vqa_loss": vqa.LOSSES,
        "finetune.weights": WEIGHTS,
        "finetune.inflation": INFLATIONS,
        "model.loss": clip.LOSSES,
        "model.pool": clip.POOLS,
        "model.posemb": clip.POSEMBS,
        "model.act": tuple(ACTIVATIONS),
        "model.text_pool": tuple(TEXT_POOLS),
        "model.dtype": tuple(DTYPES),
        "model.param_dtype": tuple(DTYPES),
        "model.remat": tuple(REMAT_POLICIES),
        "train.mu_dtype": MU_DTYPES,
        "parallel.mode": PARALLEL_MODES,
    }


class _Choices(Mapping):
    """`_choices()`, read when used: the tuples live in the models, which import JAX (a
    recipe module imports this one before anything needs them), and the family names
    are the registry's as it is now."""

    def __getitem__(self, key):
        return _choices()[key]

    def __iter__(self):
        return iter(_choices())

    def __len__(self):
        return len(_choices())


CHOICES = _Choices()


def load(path_and_arg: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads `path[:arg]`, applies `a.b=value` overrides and validates."""
    path, _, arg = path_and_arg.partition(":")
    config = _get_config(path, arg)
    apply_overrides(config, overrides)
    validate(config)
    return config


def _get_config(path: str, arg=None) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    # A module name per file, so a recipe loading another does not replace it mid-load.
    name = "_mmjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # the file's own or one it imports: e.filename says which
        raise ConfigError(f"config file {e.filename or path} line {e.lineno}: {e.msg}") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any error of the user's python, one line
        raise ConfigError(f"config file {path}{_where(e, path)}: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg=None) function")
    try:
        return module.get_config(arg or None)
    except ConfigError:
        raise  # a recipe it builds on (config.recipe) already named its file
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"config file {path}{_where(e, path)}: get_config({arg or None!r}) raised {type(e).__name__}: {e}"
        ) from None


def _where(error: BaseException, path: str) -> str:
    """' line N' of the innermost frame of `error`'s traceback inside file `path`."""
    import traceback

    lines = [
        f.lineno
        for f in traceback.extract_tb(error.__traceback__)
        if os.path.abspath(f.filename) == os.path.abspath(path)
    ]
    return f" line {lines[-1]}" if lines else ""


def recipe(path: str, arg=None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of another config file, unvalidated: a recipe that builds on
    one (configs/albef.py on configs/demo.py) starts from it and changes what differs."""
    return _get_config(path, arg)


def _parse_value(text: str, old):
    """Parses `text` into the type of the value it replaces."""
    if isinstance(old, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(old, int):
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)  # accepts 1e4; rejects 0.5 below
            except ValueError:
                number = None
            if number is None or not number.is_integer():
                raise ValueError(f"expected an integer, got {text!r}") from None
            return int(number)
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if isinstance(old, str):
        return text
    if old is None:
        if text.lower() == "none":
            return None
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if isinstance(old, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            # A tuple of strings (train.freeze's regexes) takes a bare string as a
            # 1-tuple: --config.train.freeze=^image_tower/. No splitting at commas (a
            # regex may hold one); several values: a Python literal "('^a/', '^b/')".
            if not all(isinstance(v, str) for v in old):
                raise ValueError(f"expected a tuple like {tuple(old)!r}, got {text!r}") from None
            value = text
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(old)(value)
    return ast.literal_eval(text)


def set_key(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets `config[a][b] = parse(text)`; unknown keys name the valid ones."""
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(parts[:i])!r} is a value, not a section")
        if part not in node:
            valid = ", ".join(sorted(node.keys()))
            raise ConfigError(f"unknown config key {here!r}; valid keys here: {valid}")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, (ml_collections.ConfigDict, dict)):
        # A whole section may be replaced by a dict literal: --config.model.image_overrides={}
        try:
            new = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            new = None
        if not isinstance(new, dict):
            raise ConfigError(
                f"config key {dotted!r} is a section; set one of: {', '.join(sorted(old.keys()))}"
                " (or give a whole dict literal)"
            )
        with node.ignore_type() if isinstance(node, ml_collections.ConfigDict) else _nullcontext():
            node[parts[-1]] = ml_collections.ConfigDict(new)
        return
    try:
        value = _parse_value(text, old)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"bad value for config key {dotted!r}: {text!r} ({e})") from None
    with node.ignore_type() if isinstance(node, ml_collections.ConfigDict) else _nullcontext():
        node[parts[-1]] = value


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def get(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return default
        node = node[part]
    return node


# Integer keys `validate` checks (a step count of 0 divides by zero, a keep-N of 0 deletes all).
POSITIVE_INTS = (
    "train.batch_size",
    "train.steps",
    "train.log_every",
    "train.keep_checkpoints",
    "train.accum_steps",
    "data.image_size",
    "data.text_len",
    "eval.batch_size",
    "eval.max_examples",
    "train.max_bad_steps",
)
NON_NEGATIVE_INTS = ("train.ckpt_every", "train.warmup_steps", "eval.every", "data.num_frames", "model.hard_negatives")

# `mmjax eval --config.K=V` may change only keys that leave the checkpoint's shapes and tree as they are.
EVAL_OVERRIDABLE = ("eval.", "data.", "parallel.", "model.dtype", "model.attention", "model.remat")
EVAL_FIXED = ("data.image_size", "data.text_len", "data.num_frames", "data.tokenizer")


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Applies `a.b=value` overrides in place (typed as the value each replaces)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value")
        set_key(config, key, value)
    return config


def override_saved(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """A workdir's saved config with `mmjax eval` overrides applied and validated.

    Keys that would change the params' shapes or tree (model.*, data.image_size,
    data.text_len, data.num_frames, data.tokenizer.*) or the optimizer (train.*)
    are refused: the checkpoint could not be restored into them."""
    for item in overrides:
        key = item.partition("=")[0]
        fixed = any(key == k or key.startswith(k + ".") for k in EVAL_FIXED)
        allowed = any(key.startswith(k) if k.endswith(".") else key == k for k in EVAL_OVERRIDABLE)
        if fixed or not allowed:
            raise ConfigError(
                f"mmjax eval cannot override {key!r}: the checkpoint was trained with the workdir's value "
                f"and would not restore into another (shapes, vocabulary or optimizer). Overridable: "
                f"eval.*, data.* (except {', '.join(EVAL_FIXED)}), parallel.*, model.dtype, "
                "model.attention, model.remat"
            )
    apply_overrides(config, overrides)
    validate(config)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks choice-valued keys, basic numeric ranges, the model section against its
    family's schema and the data section against the sources' (unknown keys).

    Resolves one hint: `data.cache_decoded` holds for the built-in sets only; with another
    `data.name` it is turned off, with a warning (a `shapes` recipe streams a user's files).
    """
    from mmjax.data import sources
    from mmjax.train import optim

    sources.check_data_config(config.get("data"))
    name = get(config, "data.name")
    if get(config, "data.cache_decoded") and not sources.cache_allowed(name):
        import logging

        logging.getLogger(__name__).warning(
            "data.cache_decoded applies to the built-in datasets only; streaming %r", name
        )
        with config.unlocked():
            config.data.cache_decoded = False
    for key, choices in _choices().items():
        value = get(config, key)
        if not key.startswith("model.") and value is not None and value not in choices:
            raise ConfigError(f"bad value for config key {key!r}: {value!r}; valid choices: {', '.join(choices)}")
    if "model" in config:  # the family's schema: its keys, their types and choices
        from mmjax.models import zoo

        zoo.check_config(config.model)
    for key in POSITIVE_INTS + NON_NEGATIVE_INTS:
        value = get(config, key)
        low = 1 if key in POSITIVE_INTS else 0
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            what = "a positive integer" if low else "an integer >= 0"
            raise ConfigError(f"bad value for config key {key!r}: {value!r}; expected {what}")
    optim.check_floats(lambda key: get(config, key))
    accum = get(config, "train.accum_steps", 1)
    bs = get(config, "train.batch_size")
    if bs is not None and (accum < 1 or bs % accum):
        raise ConfigError(
            f"bad value for config key 'train.accum_steps': {accum}; it must divide train.batch_size={bs}"
        )


DERIVED_FROM = {
    "vocab_size": "the tokenizer's vocabulary",
    "image_size": "data.image_size",
    "num_frames": "data.num_frames",
    "text_len": "data.text_len",
    "total_steps": "train.steps",
    "token_ids": "the tokenizer's special ids",
    **AUDIO_DERIVED_FROM,  # for a family with an audio input
}


def _audio_keys(config) -> dict:
    """The audio input shape from data.audio, for a family that derives it (ImageBind, Meta-Transformer)."""
    from mmjax.data.modalities import audio_model_keys
    from mmjax.models.zoo import family_class

    try:
        return audio_model_keys(config.data) if "audio_samples" in family_class(config.model).Config.keys() else {}
    except ConfigError:
        return {}


def derive_model_keys(
    config: ml_collections.ConfigDict, vocab_size: int, token_ids: Mapping | None = None
) -> ml_collections.ConfigDict:
    """Sets the model keys a run derives, in one place: model.vocab_size (`vocab_size`; a
    model with model.keep_vocab_size keeps its own), token_ids (`Tokenizer.special_ids`;
    not given: left as is, unset reads as mmjax's ids), image_size, num_frames, text_len,
    the audio shape (data.*) and total_steps (train.steps). A config that sets one to
    another value is a ConfigError naming both (else it would be replaced silently)."""
    model = config.model
    keep = model.get("keep_vocab_size", False) and model.get("vocab_size", None)
    derived = {
        "vocab_size": int(keep or vocab_size),
        "image_size": int(config.data.image_size),
        "num_frames": int(config.data.get("num_frames", 0) or 0),
        "text_len": int(config.data.text_len),
        "total_steps": int(config.train.steps),
    }
    if token_ids is not None:
        derived["token_ids"] = dict(token_ids)
    derived.update(_audio_keys(config))
    for key, value in derived.items():
        old = model.get(key, None)
        old = old.to_dict() if isinstance(old, ml_collections.ConfigDict) else old
        if old is not None and old != value:
            raise ConfigError(
                f"model.{key}={old!r} contradicts {DERIVED_FROM[key]} ({value}): model.{key} is derived from it "
                f"at run time; remove model.{key} from the config"
            )
    with config.unlocked():
        for key, value in derived.items():
            model[key] = value
    return config


def split_overrides(argv):
    """Separates `--config.a.b=v` (or `--config.a.b v`) from the other flags."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override --config.{body} needs a value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides
