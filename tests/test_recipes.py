"""Every recipe in configs/ (and every `:arg` variant a recipe documents) loads through
mmjax.config and builds its family, with the run-time model keys derived as the setup
derives them (a recipe value that contradicts one is an error); the params are
initialised with shapes only (`jax.eval_shape`) and their count is pinned (big_vision's
habit: a test pins each named config's parameter count and checks that every config is
covered)."""

import glob
import os
import re

import jax
import pytest

from mmjax import config as config_lib
from mmjax.models import zoo
from tiny import ROOT

CONFIGS = os.path.join(ROOT, "configs")

# recipe[:arg] -> (family, params, param arrays), counted on the code before issue 15's
# restructuring. A name without ':arg' is the recipe with its default argument.
RECIPES = {
    "albef": ("albef", 1_032_323, 140),
    "albef:emoji": ("albef", 1_215_059, 140),
    "albef_base": ("albef", 209_563_709, 372),
    "beit3": ("beit3", 975_779, 119),
    "beit3_base": ("beit3", 222_492_173, 311),
    "blip": ("blip", 1_247_363, 179),
    "blip2": ("blip2", 1_321_155, 161),
    "blip2:stage1": ("blip2", 1_321_155, 161),
    "blip2:stage2": ("blip2_lm", 1_783_104, 168),
    "blip2_base": ("blip2", 266_748_419, 441),
    "blip2_base:stage1": ("blip2", 266_748_419, 441),
    "blip2_base:stage2": ("blip2_lm", 6_926_630_400, 653),
    "blip2_base:instructblip": ("instructblip", 7_007_992_320, 727),
    "blip2_base:minigpt4": ("minigpt4", 6_926_630_400, 653),
    "imagebind": ("imagebind", 1_664_257, 200),
    "imagebind:shapes": ("imagebind", 1_664_257, 200),
    "imagebind:direct": ("imagebind", 1_664_257, 200),
    "imagebind_base": ("imagebind", 1_043_650_945, 992),
    "meta_transformer": ("meta_transformer", 479_280, 66),
    "meta_transformer:frozen": ("meta_transformer", 479_280, 66),
    "meta_transformer:tuned": ("meta_transformer", 479_280, 66),
    "meta_transformer:scratch": ("meta_transformer", 926_832, 116),
    "instructblip": ("instructblip", 2_113_728, 194),
    "minigpt4": ("minigpt4", 1_783_104, 168),
    "minigpt4:stage1": ("minigpt4", 1_783_104, 168),
    "minigpt4:stage2": ("minigpt4", 1_783_104, 168),
    "cogvlm": ("cogvlm", 2_013_504, 125),
    "blip_base": ("blip", 251_478_845, 499),
    "clip_b16": ("clip", 149_620_737, 302),
    "clip_s16_64": ("clip", 62_164_993, 302),
    "coca": ("coca", 1_099_617, 162),
    "coca_base": ("coca", 339_698_945, 598),
    "demo": ("clip", 723_649, 86),
    "demo:shapes": ("clip", 723_649, 86),
    "demo:emoji": ("clip", 904_513, 86),
    "llava": ("llava", 1_276_224, 97),
    "llava:stage1": ("llava", 1_276_224, 97),
    "llava:stage2": ("llava", 1_276_224, 97),
    "llava:lora": ("llava", 1_350_976, 153),
    "lm": ("lm", 779_392, 38),
    "finetune_retrieval:clip": ("clip", 723_649, 86),
    "finetune_retrieval:albef": ("albef", 1_032_323, 140),
    "finetune_shapes:linear": ("classifier", 479_449, 59),
    "finetune_shapes:full": ("classifier", 479_449, 59),
    "finetune_vqa:albef": ("vqa", 1_028_271, 135),
    "finetune_vqa:vlmo": ("vqa", 878_128, 99),
    "finetune_vqa:beit3": ("vqa", 953_295, 114),
    "video_albef:none": ("albef", 1_033_091, 141),
    "video_albef:divided": ("albef", 1_220_099, 173),
    "video_albef:local": ("albef", 1_111_043, 205),
    "video_albef:mean": ("albef", 1_032_707, 140),
    "video_clip:none": ("clip", 724_417, 87),
    "video_clip:divided": ("clip", 911_425, 119),
    "video_clip:local": ("clip", 802_369, 151),
    "video_clip:mean": ("clip", 724_033, 86),
    "vlmo": ("vlmo", 919_044, 106),
    "vlmo:emoji": ("vlmo", 1_101_780, 106),
    "vlmo_base": ("vlmo", 179_029_822, 256),
}


def _load(name_arg: str):
    name, _, arg = name_arg.partition(":")
    return config_lib.load(os.path.join(CONFIGS, f"{name}.py") + (f":{arg}" if arg else ""))


def with_run_time_keys(config):
    """The model keys the setup derives at run time (`config.derive_model_keys`), with
    the vocabulary of a tokenizer trained to data.tokenizer.vocab_size pieces."""
    return config_lib.derive_model_keys(config, int(config.data.tokenizer.vocab_size))


@pytest.mark.parametrize("name_arg", sorted(RECIPES))
def test_recipe_builds_and_initialises(name_arg):
    config = with_run_time_keys(_load(name_arg))
    family = zoo.build(config.model)
    abstract = jax.eval_shape(
        lambda rng: family.init_params(rng, family.image_shape(), (1, config.data.text_len)), jax.random.PRNGKey(0)
    )
    leaves = jax.tree_util.tree_leaves(abstract)
    want_family, want_params, want_arrays = RECIPES[name_arg]
    assert (config.model.family, sum(x.size for x in leaves), len(leaves)) == (want_family, want_params, want_arrays)


def _own_choices(path: str) -> set:
    """The arguments a recipe's get_config validates itself (its error names its file)."""
    try:
        config_lib.load(f"{path}:no_such_variant")
    except config_lib.ConfigError as e:
        m = re.search(rf"configs/{os.path.basename(path)} argument .*valid choices: ([\w, ]+)", str(e))
        return {a.strip() for a in m.group(1).split(",")} if m else set()
    return set()


def _documented(path: str) -> set:
    """The `configs/NAME.py:ARG` variants the recipe's docstring shows."""
    text = open(path).read()
    return set(re.findall(rf"configs/{re.escape(os.path.basename(path))}:(\w+)", text))


def test_every_recipe_and_documented_variant_is_covered():
    """A new recipe, or a variant a recipe validates or documents, needs its row above."""
    names = {name_arg.partition(":")[0] for name_arg in RECIPES}
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, "*.py"))}
    assert names == files
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*.py"))):
        name = os.path.basename(path)[:-3]
        covered = {a.partition(":")[2] for a in RECIPES if a.partition(":")[0] == name}
        assert _own_choices(path) | _documented(path) <= covered | {""}, name
    # The recipes no test loaded before issue 15.
    assert {"albef_base", "vlmo_base", "video_albef:divided"} <= set(RECIPES)
