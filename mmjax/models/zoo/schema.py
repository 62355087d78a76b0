"""Model config schemas: each family declares its `model.*` keys once, as a frozen
dataclass of `key(...)` fields (defaults, types, choices), and `Config.parse(section)`
checks a config section against it. The bases here hold the keys families share.

An unknown key, or a key of another family set to a value this one would ignore, is
a `ConfigError` naming the key and the valid ones (exit 2 from the CLI).
"""

from __future__ import annotations

import dataclasses
import typing

import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models.tokens import TokenIds
from mmjax.models.video import LOCAL_VARIANTS, TEMPORAL

ANY = "<any value>"  # `inert=ANY`: a key that asks for nothing by itself (it refines another key)
FAMILIES: dict = {}  # the registry: name -> family class, filled by contract.register in the zoo modules
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def key(default=dataclasses.MISSING, *, choices=None, none=False, inert=None, derived=False):
    """A `model.*` key of a family's `Config`: its default (none key: required);
    `choices` it must be one of; `none=True`: None is a value of its own (e.g. 'no
    bound'), else None reads as the default; `inert`: the values at which the key
    asks for nothing (default: its default), accepted where a family lacks the key,
    so configs built on configs/demo.py and older workdirs load; `derived`: set at
    run time from data.* / train.* (`config.derive_model_keys`)."""
    meta = dict(choices=choices, none=none, inert=inert, derived=derived)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _plain(value):
    """ConfigDict / FrozenDict / list -> dict / tuple, for comparisons and storage."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, typing.Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def _coerce(name: str, value, kind):
    """`value` as the key's declared type (int, float, str, bool, tuple, dict, Any),
    converting only where nothing is lost; ConfigError otherwise."""
    value = _plain(value)
    ok = {
        bool: lambda v: isinstance(v, bool) or v in (0, 1),
        int: lambda v: not isinstance(v, bool) and isinstance(v, int | float) and float(v).is_integer(),
        float: lambda v: not isinstance(v, bool) and isinstance(v, int | float),
        str: lambda v: isinstance(v, str),
        tuple: lambda v: isinstance(v, tuple),
        dict: lambda v: isinstance(v, dict),
    }.get(kind)
    if ok is None:  # typing.Any
        return value
    if not ok(value):
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
        raise ConfigError(f"bad value for config key 'model.{name}': {value!r}; expected {what}")
    return kind(value)


def _inert(field, value) -> bool:
    inert = field.metadata["inert"]
    if inert == ANY:
        return True
    if inert is None:
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        inert = (field.default if field.default_factory is dataclasses.MISSING else field.default_factory(),)
        inert = inert if has_default else ()
    return any(_plain(value) == _plain(v) for v in inert)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The keys every family has: `family` and the keys the run derives (from data.*
    and train.*, `config.derive_model_keys`); a family's defaults apply when a config
    does not set them (a model built without a run)."""

    family: str = key(None, none=True)
    vocab_size: int = key(None, none=True, derived=True)
    image_size: int = key(224, derived=True)
    text_len: int = key(77, derived=True)
    num_frames: int = key(0, derived=True)
    total_steps: int = key(0, derived=True)
    token_ids: dict = key(None, none=True, derived=True)  # the tokenizer's special ids; None: mmjax's (tokens.py)
    keep_vocab_size: bool = key(False)  # an imported model keeps its vocabulary (mmjax convert)

    @classmethod
    def keys(cls) -> dict:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def derived_keys(cls) -> tuple:
        return tuple(n for n, f in cls.keys().items() if f.metadata["derived"])

    @classmethod
    def parse(cls, model_config):
        """The config section -> this schema's frozen instance. ConfigError for a key
        no family has, a key of another family set to a value that would be ignored
        here, a value of the wrong type or not among the key's choices."""
        fields, hints = cls.keys(), typing.get_type_hints(cls)
        family = model_config.get("family", None)
        values = {}
        for name, value in model_config.items():
            f = fields.get(name)
            if f is None:
                _check_foreign(cls, family, name, value)
            elif value is not None or f.metadata["none"]:
                values[name] = None if value is None else _coerce(name, value, hints[name])
                choices = f.metadata["choices"]
                if choices is not None and values[name] is not None and values[name] not in choices:
                    raise ConfigError(
                        f"bad value for config key 'model.{name}': {value!r}; valid choices: {', '.join(choices)}"
                    )
        required = [n for n, f in fields.items() if n not in values and _required(f)]
        if required:
            raise ConfigError(f"model.{required[0]} is required for model.family={family!r}")
        out = cls(**values)
        out.check()
        return out

    def check(self):
        """Checks across keys (subclasses extend it); ConfigError / ValueError."""
        self.tokens  # noqa: B018 (a bad token name fails here)

    @property
    def tokens(self) -> TokenIds:
        """The tokenizer's special ids (`model.token_ids`; a config without it: mmjax's)."""
        return TokenIds.of(self.token_ids)

    def need(self, name: str):
        """A derived key's value, or a ConfigError saying the run sets it."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(
                f"model.{name} is not set: a run derives it (config.derive_model_keys); set it to build a model alone"
            )
        return value


def _required(field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _check_foreign(cls, family, name, value):
    """A key `cls` does not declare: accepted only where another family declares it
    and the value asks for nothing (`key(inert=...)`)."""
    owners = {n: c.Config.keys()[name] for n, c in FAMILIES.items() if name in c.Config.keys()}
    valid = ", ".join(sorted(cls.keys()))
    if not owners:
        raise ConfigError(f"unknown config key 'model.{name}' for model.family={family!r}; valid keys: {valid}")
    if value is not None and not any(_inert(f, value) for f in owners.values()):
        raise ConfigError(
            f"config key 'model.{name}'={_plain(value)!r} has no effect on model.family={family!r} (a key of "
            f"{', '.join(owners)}); remove it. Valid keys: {valid}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeConfig(ModelConfig):
    """Keys of every family with its own towers: compute and param dtype, remat,
    attention (parsed here, once), the image tower and the embedding width."""

    dtype: str = key("float32", choices=tuple(DTYPES))
    param_dtype: str = key("float32", choices=tuple(DTYPES))
    remat: typing.Any = key(False, inert=(False, "none"))  # transformer.remat_mode
    attention: str = key("xla")  # attention.parse_attention: 'xla' | 'cudnn', '/N'
    image: str = key("mu/8")  # a ViT variant, models/variants.py
    image_overrides: dict = key({})
    embed_dim: int = key()

    def check(self):
        from mmjax.models.attention import parse_attention
        from mmjax.models.transformer import REMAT_POLICIES, remat_mode

        super().check()
        try:
            parse_attention(self.attention)
        except ValueError as e:
            raise ConfigError(f"bad value for config key 'model.attention': {e}") from None
        try:
            remat_mode(self.remat)
        except ValueError:
            raise ConfigError(
                f"bad value for config key 'model.remat': {self.remat!r}; valid choices: "
                f"{', '.join(REMAT_POLICIES)} (or a bool)"
            ) from None

    def module_kw(self) -> dict:
        """The linen keywords every tower takes from these keys."""
        from mmjax.models.transformer import remat_mode

        return dict(
            remat=remat_mode(self.remat),
            attention=self.attention,
            dtype=DTYPES[self.dtype],
            param_dtype=DTYPES[self.param_dtype],
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TowerConfig(ComputeConfig):
    """+ a separate text tower and the video keys (common.video_options)."""

    text: str = key("mu")
    text_overrides: dict = key({})
    temporal: str = key("none", choices=TEMPORAL)
    tubelet: int = key(1)
    temporal_kernel: int = key(3, inert=ANY)
    # None: video.LOCAL_WHEN_UNSET, what a workdir older than the key trained
    local_temporal: str = key(None, none=True, choices=LOCAL_VARIANTS, inert=ANY)

    def check(self):
        super().check()
        video_options(self.video_keys())

    def video_keys(self) -> dict:
        keys = ("num_frames", "temporal", "tubelet", "temporal_kernel", "local_temporal")
        return {k: getattr(self, k) for k in keys}


def video_options(model_config) -> dict:
    """The video keys of a model config, validated -> ViT keyword arguments.

    model.num_frames (0 or absent: an image model; T > 0: clips of T frames, images taken
    as one-frame clips), model.temporal (video.TEMPORAL, default 'none'), model.tubelet
    (frames per token, default 1), model.temporal_kernel ('local' module, default 3),
    model.local_temporal ('local' variant, video.LOCAL_VARIANTS; the recipes set 'release', a
    config without the key reads as video.LOCAL_WHEN_UNSET, what workdirs older than it trained).
    """
    from mmjax.models.video import LOCAL_WHEN_UNSET, check_local_variant, check_temporal

    frames = int(model_config.get("num_frames", None) or 0)
    temporal = check_temporal(str(model_config.get("temporal", None) or "none"))
    tubelet = int(model_config.get("tubelet", None) or 1)
    kernel = int(model_config.get("temporal_kernel", None) or 3)
    if frames < 0 or tubelet < 1 or kernel < 1:
        raise ValueError(
            f"model.num_frames={frames}, model.tubelet={tubelet}, model.temporal_kernel={kernel}: "
            "need num_frames >= 0 and tubelet, temporal_kernel >= 1"
        )
    if frames and frames % tubelet:
        raise ValueError(f"model.num_frames={frames} is not a multiple of model.tubelet={tubelet}")
    if tubelet > 1 and temporal == "mean":
        raise ValueError("model.temporal='mean' encodes frames one by one: it takes model.tubelet=1")
    local = check_local_variant(str(model_config.get("local_temporal", None) or LOCAL_WHEN_UNSET))
    return dict(num_frames=frames, temporal=temporal, tubelet=tubelet, temporal_kernel=kernel, local_temporal=local)
