"""The family contract (mmjax/models/zoo/contract.py): one registry, declared
capabilities checked against the methods, each family's config schema, and the model
keys a run derives (config.derive_model_keys)."""

import dataclasses

import jax
import ml_collections
import pytest

from mmjax import cli
from mmjax import config as config_lib
from mmjax.models import zoo
from mmjax.models.zoo import contract
from mmjax.models.zoo.clip import ClipConfig, ClipFamily
from mmjax.models.zoo.schema import ModelConfig, key
from tiny import DEMO, ROOT

TINY = ["data.image_size=16", "data.text_len=12", "data.tokenizer.vocab_size=50", "train.batch_size=8"]
RECIPES = [
    "demo",
    "albef",
    "blip",
    "coca",
    "vlmo",
    "beit3",
    "video_clip",
    "video_albef",
    "finetune_shapes",
    "finetune_vqa:albef",
    "finetune_vqa:vlmo",
    "lm",
    "llava",
    "cogvlm",
    "imagebind",
    "meta_transformer",
]
# What mmjax asked of a family before the contract (hasattr probes) -> the capability.
OLD_PROBES = {
    "encode": "encode_image",
    "teacher": "teacher_update",
    "accumulate": "loss_from_embeddings",
    "itm": "itm_scores",
    "caption": "caption",
    "classify": "logits",
    "fuse": "fused_features",
    "lm": "token_nll",
    "generate": "generate",
    "bind": "encode_modality",
}


def _family(name, extra=()):
    path, _, arg = name.partition(":")
    cfg = config_lib.load(f"{ROOT}/configs/{path}.py" + (":" + arg if arg else ""), TINY + list(extra))
    config_lib.derive_model_keys(cfg, 50)
    return cfg, zoo.build(cfg.model)


@pytest.mark.parametrize("name", RECIPES)
def test_declared_capabilities_are_what_the_probes_found(name):
    """Each capability a built family declares is exactly the set the old
    `hasattr(family, ...)` probes detected; init_extra is {} without a teacher."""
    _, fam = _family(name)
    for cap, method in OLD_PROBES.items():
        assert fam.can(cap) == hasattr(fam, method), (name, cap)
    params = jax.eval_shape(fam.init_params, jax.random.PRNGKey(0))
    extra = jax.eval_shape(fam.init_extra, params)
    assert set(extra) == ({"ema_params", "queues"} if fam.can("teacher") else set())
    assert isinstance(fam.batch_keys, tuple) and ("image" in fam.batch_keys or not fam.can("encode"))


def test_registry_names_every_family_once_and_config_choices_read_it():
    assert sorted(zoo.FAMILIES) == [
        "albef",
        "beit3",
        "blip",
        "blip2",
        "blip2_lm",
        "classifier",
        "clip",
        "coca",
        "cogvlm",
        "imagebind",
        "instructblip",
        "llava",
        "lm",
        "meta_transformer",
        "minigpt4",
        "vlmo",
        "vqa",
    ]
    assert zoo.FAMILIES["vlmo"] is zoo.FAMILIES["beit3"] is zoo.MultiwayFamily
    assert config_lib.CHOICES["model.family"] == tuple(zoo.FAMILIES)
    with pytest.raises(ValueError, match="registered twice"):
        contract.register("clip")(type("Other", (ClipFamily,), {}))


def test_a_family_is_one_registered_class(scratch_registry):
    """A new family: a class with @register; build, the config choices and the
    schema see it without another list."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ToyConfig(ClipConfig):
        toy_weight: float = key(1.0)

    @contract.register("toy")
    class ToyFamily(ClipFamily):
        Config = ToyConfig

    assert "toy" in config_lib.CHOICES["model.family"]
    cfg = config_lib.load(DEMO, TINY + ["model.family=toy"])
    config_lib.derive_model_keys(cfg, 50)
    assert type(zoo.build(cfg.model)) is ToyFamily
    with cfg.unlocked():
        cfg.model.toy_weight = 2.0
    config_lib.validate(cfg)
    cfg.model.family = "clip"
    with pytest.raises(config_lib.ConfigError, match="toy_weight.*a key of toy"):
        config_lib.validate(cfg)


def test_the_contract_check_names_capability_and_method():
    base = dict(image="mu/4", image_overrides={}, text_overrides={}, embed_dim=16, vocab_size=40, image_size=16)
    cfg = ml_collections.ConfigDict(dict(base, family="clip"))

    class Declares(ClipFamily):
        capabilities = ClipFamily.capabilities | {"caption"}

    class Undeclared(ClipFamily):
        def itm_scores(self, params, image_tokens, stream, text):
            return None

    class Unknown(ClipFamily):
        capabilities = ClipFamily.capabilities | {"telepathy"}

    with pytest.raises(ValueError, match="declares capability 'caption' but has no caption"):
        contract.check_contract(Declares(cfg))
    with pytest.raises(ValueError, match="defines itm_scores .capability 'itm'. without declaring"):
        contract.check_contract(Undeclared(cfg))
    with pytest.raises(ValueError, match="telepathy"):
        contract.check_contract(Unknown(cfg))
    with pytest.raises(ValueError, match="capability 'nope' unknown"):
        ClipFamily(cfg).can("nope")
    contract.check_contract(ClipFamily(cfg))  # the real one passes


# ------------------------------------------------------------------ config schemas


def test_unknown_model_key_is_exit_2_naming_the_key_and_the_valid_ones(tmp_path, capsys):
    cfg = config_lib.load(DEMO)
    with cfg.unlocked():
        cfg.model.widht = 3
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'model.widht'.*valid keys: .*embed_dim"):
        config_lib.validate(cfg)
    recipe = tmp_path / "typo.py"
    recipe.write_text(
        "from mmjax import config as config_lib\n"
        f"def get_config(arg=None):\n    c = config_lib.recipe({DEMO!r})\n    c.model.queue_sise = 8\n    return c\n"
    )
    rc = cli.main(["train", "--config", str(recipe), "--workdir", str(tmp_path / "w"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.queue_sise" in err and "embed_dim" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "recipe,override,owner",
    [
        ("coca", "model.scan_layers=true", "clip"),
        ("vlmo", "model.scan_layers=true", "clip"),
        ("beit3", "model.scan_layers=true", "clip"),
        ("albef", "model.pool=gap", "clip"),
        ("vlmo", "model.temporal=divided", "albef"),
        ("vlmo", "model.text_overrides={'depth': 1}", "albef"),
        ("coca", "model.hard_negatives=2", "clip"),
    ],
)
def test_a_key_the_family_would_ignore_is_an_error(recipe, override, owner):
    """Before, each of these was silently ignored (CoCa and the multiway encoder are not
    scanned, ALBEF's ViT always pools its [CLS], ...). At its inert value the same key
    loads (the recipes built on demo.py carry it)."""
    config_lib.load(f"{ROOT}/configs/{recipe}.py")
    with pytest.raises(config_lib.ConfigError, match=rf"'{override.split('=')[0]}'.*no effect.*a key of .*{owner}"):
        config_lib.load(f"{ROOT}/configs/{recipe}.py", [override])


def test_schema_types_and_choices():
    with pytest.raises(config_lib.ConfigError, match="'model.embed_dim': 'wide'; expected an integer"):
        ClipConfig.parse(ml_collections.ConfigDict(dict(family="clip", embed_dim="wide")))
    with pytest.raises(config_lib.ConfigError, match="'model.scan_layers': 2; expected true or false"):
        ClipConfig.parse(ml_collections.ConfigDict(dict(family="clip", embed_dim=8, scan_layers=2)))
    with pytest.raises(config_lib.ConfigError, match="'model.temporal': 'cubic'; valid choices: none, divided"):
        config_lib.load(DEMO, ["model.temporal=cubic"])
    with pytest.raises(config_lib.ConfigError, match="model.attention"):
        config_lib.load(DEMO, ["model.attention=flash"])
    c = ClipConfig.parse(ml_collections.ConfigDict(dict(family="clip", embed_dim=8.0, max_logit_scale=None)))
    assert c.embed_dim == 8 and isinstance(c.embed_dim, int) and c.max_logit_scale is None and c.pool == "cls"
    with pytest.raises(config_lib.ConfigError, match="model.embed_dim is required"):
        ClipConfig.parse(ml_collections.ConfigDict(dict(family="clip")))


def test_wrapper_backbone_is_checked_by_its_own_schema():
    cfg = config_lib.load(f"{ROOT}/configs/finetune_shapes.py")
    with cfg.unlocked():
        cfg.model.backbone.fusion_frm = 1
    with pytest.raises(config_lib.ConfigError, match="model.fusion_frm"):
        config_lib.validate(cfg)


# ------------------------------------------------------------------ derived keys


def test_audio_input_shape_is_derived_from_data_audio():
    """ImageBind / Meta-Transformer read the waveform's shape from data.audio, like the image size."""
    cfg = config_lib.load(f"{ROOT}/configs/imagebind.py", ["data.audio.clip_seconds=0.5"])
    config_lib.derive_model_keys(cfg, 50)
    m = cfg.model
    assert (m.audio_sample_rate, m.audio_samples, m.audio_channels) == (8000, 4000, 2)
    with cfg.unlocked():
        cfg.data.audio.sample_rate = 16000
    with pytest.raises(
        config_lib.ConfigError, match=r"model.audio_sample_rate=8000 contradicts data.audio.sample_rate"
    ):
        config_lib.derive_model_keys(cfg, 50)


def test_derive_model_keys_sets_them_in_one_place():
    cfg = config_lib.load(f"{ROOT}/configs/video_clip.py", ["train.steps=77"])
    assert not {"vocab_size", "image_size", "text_len", "num_frames", "total_steps"} & set(cfg.model)
    config_lib.derive_model_keys(cfg, 123)
    m = cfg.model
    assert (m.vocab_size, m.image_size, m.text_len, m.num_frames, m.total_steps) == (
        123,
        cfg.data.image_size,
        cfg.data.text_len,
        cfg.data.num_frames,
        77,
    )
    audio = {"audio_sample_rate", "audio_samples", "audio_channels"}  # derived for families with an audio input
    assert set(config_lib.DERIVED_FROM) == set(ModelConfig.derived_keys()) | audio  # the schema's derived keys
    assert not audio & set(cfg.model)  # a family without audio gets none of them
    config_lib.derive_model_keys(cfg, 123)  # again: the same values are no contradiction
    with pytest.raises(
        config_lib.ConfigError, match=r"model.vocab_size=123 contradicts the tokenizer's vocabulary \(40\)"
    ):
        config_lib.derive_model_keys(cfg, 40)
    with cfg.unlocked():
        cfg.data.image_size = 64
    with pytest.raises(config_lib.ConfigError, match=r"model.image_size=32 contradicts data.image_size \(64\)"):
        config_lib.derive_model_keys(cfg, 123)


def test_an_imported_model_keeps_its_vocabulary():
    cfg = config_lib.load(DEMO)
    with cfg.unlocked():
        cfg.model.keep_vocab_size, cfg.model.vocab_size = True, 49408
    assert config_lib.derive_model_keys(cfg, 128).model.vocab_size == 49408
