"""VLMo / BEiT-3 families: the stage-wise schedule as config, task routing, and the
multiway model used as a dual encoder and as a fusion encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.models import zoo
from mmjax.train import loop, optim
from mmjax.train import setup as setup_lib
from tiny import ROOT

TINY = {
    "data.image_size": 16,
    "data.text_len": 16,
    "data.shuffle_buffer": 256,
    "data.shapes.image_size": 16,
    "data.shapes.num_train": 256,
    "data.shapes.num_validation": 32,
    "data.shapes.num_test": 64,
    "data.tokenizer.vocab_size": 40,
    "model.image": "mu/4",
    "model.image_overrides": "{'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}",
    "model.embed_dim": 16,
    "train.batch_size": 16,
    "train.steps": 10,
    "train.warmup_steps": 1,
    "train.log_every": 2,
    "train.ckpt_every": 2,
    "eval.every": 0,
    "eval.at_end": False,
    "eval.batch_size": 32,
    "eval.rerank_k": 4,
}


def tiny(name, data_dir, **extra):
    kv = {**TINY, "data.data_dir": str(data_dir), **extra}
    cfg = config_lib.load(f"{ROOT}/configs/{name}.py", [f"{k}={v}" for k, v in kv.items()])
    if name == "vlmo":
        with cfg.unlocked():
            cfg.model.vl_from = 1
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _flat(params):
    return {optim.param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _changed(a, b, pattern):
    import re

    keys = [k for k in a if re.search(pattern, k)]
    assert keys, pattern
    return {k: not np.array_equal(a[k], b[k]) for k in keys}


def test_vlmo_stages_train_what_the_paper_trains(tmp_path, data_dir):
    """Stage 1 (image MDM) leaves the text side untouched; stage 2 (text MLM) keeps
    the shared attention and the V-FFN fixed while the L-FFN learns; stage 3
    (ITC+ITM+MLM) trains the attention and the VL expert."""
    wd = str(tmp_path / "vlmo")
    cfg = tiny("vlmo", data_dir)
    init = _flat(setup_lib.Setup(cfg, wd).fresh_state().params)
    # configs/vlmo.py gives the stage ends as fractions (0.2, 0.4, 1.0) of the 10 steps.
    assert [st["until"] for st in setup_lib.Setup(cfg, wd).stages()] == [2, 4, 10]
    s1 = _flat(loop.train(tiny("vlmo", data_dir), wd, progress=False, stop_at=2)["final_state"].params)
    s2 = _flat(loop.train(tiny("vlmo", data_dir), wd, progress=False, stop_at=4)["final_state"].params)
    s3 = _flat(loop.train(tiny("vlmo", data_dir), wd, progress=False)["final_state"].params)

    # Stage 1: image side trains, text side and pair heads stay at init.
    assert all(_changed(init, s1, r"ffn_image/").values())
    assert all(_changed(init, s1, r"^encoder/block\d+/attn/").values())
    assert not any(_changed(init, s1, r"ffn_text/|^word_embed/|_vl/|^itm_head/").values())
    # Stage 2: attention and V-FFN frozen, L-FFN and word embeddings learn.
    assert not any(_changed(s1, s2, r"^encoder/block\d+/(ln1|attn)/|ffn_image/|^patch_embed/").values())
    assert all(_changed(s1, s2, r"ffn_text/fc1/kernel|^word_embed/").values())
    # Stage 3: everything of the pair objectives learns.
    assert all(_changed(s2, s3, r"^encoder/block\d+/attn/|ffn_vl/fc1/kernel|^itm_head/|^text_proj/").values())
    assert not any(_changed(s2, s3, r"^mask_token$|^mdm_head/").values())


@pytest.mark.parametrize("family", ["vlmo", "beit3"])
def test_task_gradients_reach_only_their_modality(family):
    """mdm (image only) gives the text side zero gradient, tmlm (text only) gives
    the image side zero gradient; both reach the shared attention (vlmo)."""
    import ml_collections

    base = dict(
        family=family,
        image="mu/4",
        image_overrides={},
        embed_dim=16,
        vocab_size=40,
        image_size=16,
        text_len=12,
        vl_from=None,
    )
    rng = np.random.default_rng(0)
    text = rng.integers(6, 40, size=(4, 12))
    text[:, 0], text[:, 7], text[:, 8:] = 2, 3, 0
    batch = dict(
        image=jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
        text=jnp.asarray(text, jnp.int32),
        id=jnp.arange(4),
    )
    params = None
    for tasks, silent in (
        (("mdm",), r"_text/|^word_embed/|^mlm_head/"),
        (("tmlm",), r"_image/|^patch_embed/|^image_(cls|pos)$|^mdm_head/"),
    ):
        fam = zoo.build(ml_collections.ConfigDict({**base, "tasks": tasks}))
        params = params or fam.init_params(jax.random.PRNGKey(0))
        grads = jax.jit(jax.grad(lambda p: fam.objective(p, batch, jax.random.PRNGKey(1))[0]))(params)
        flat = _flat(grads)
        import re

        quiet = [k for k in flat if re.search(silent, k)]
        assert quiet and all(not flat[k].any() for k in quiet), tasks
        loud = [k for k in flat if re.search(r"^encoder/block00/", k) and k not in quiet]
        assert any(flat[k].any() for k in loud), tasks
