"""Analytic FLOPs (mmjax/flops.py): the documented per-family formulas against the
matmuls actually traced in each family's objective, and the counter against hand
counts."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from mmjax import bench, flops
from mmjax import config as config_lib
from mmjax.models import zoo
from tiny import ROOT


def test_counter_on_hand_counted_programs():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert flops.count_dot_flops(lambda a, b: a @ b, x, w) == 2 * 4 * 8 * 16
    q, k = jnp.ones((2, 5, 3, 4)), jnp.ones((2, 7, 3, 4))  # [B, T, H, Dh], [B, S, H, Dh]
    assert flops.count_dot_flops(lambda a, b: jnp.einsum("bthd,bshd->bhts", a, b), q, k) == 2 * 2 * 3 * 5 * 7 * 4
    img, ker = jnp.ones((2, 16, 16, 3)), jnp.ones((4, 4, 3, 8))  # patchify conv, stride 4
    conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.count_dot_flops(conv, img, ker) == 2 * (2 * 4 * 4 * 8) * (4 * 4 * 3)

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=5)[0]

    assert flops.count_dot_flops(scanned, jnp.ones((4, 8)), jnp.ones((8, 8))) == 5 * 2 * 4 * 8 * 8
    # Under jit and grad: the backward of a matmul is two matmuls.
    loss = lambda a, b: jnp.sum(jax.jit(lambda a, b: a @ b)(a, b))
    assert flops.count_dot_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * 2 * 4 * 8 * 16


TINY = ["data.image_size=16", "data.text_len=12", "data.tokenizer.vocab_size=50"]
VIDEO = ["data.num_frames=4", "data.name=moving_shapes"]
CASES = [
    ("demo", []),
    ("demo", ["model.loss=sigmoid", "model.pool=gap"]),
    ("albef", []),
    ("albef", ["model.tasks=('itc', 'mlm')"]),
    ("vlmo", []),
    ("beit3", []),
    *[("video_clip:" + t, []) for t in ("none", "divided", "local", "mean")],
    ("video_clip:divided", ["model.tubelet=2"]),
    ("video_clip:local", ["model.pool=gap"]),
    ("video_albef:divided", []),
    ("video_albef:mean", []),
    ("albef", VIDEO + ["model.temporal=local"]),
    ("video_clip:local", ["model.local_temporal=mmjax_v1"]),
    ("coca", []),
    ("coca", VIDEO + ["model.temporal=divided"]),
    ("blip", []),
    ("blip", ["model.tasks=('itm', 'lm')"]),
    ("blip", VIDEO + ["model.temporal=none"]),
    ("finetune_shapes", []),
    ("finetune_vqa:albef", []),
    ("finetune_vqa:vlmo", []),
    ("finetune_vqa:beit3", []),
    ("lm", []),
    ("llava:lora", ["data.text_len=24"]),
    ("cogvlm", ["data.text_len=24", "model.prefix_lm=true"]),
    ("blip2", []),
    ("blip2", ["model.tasks=('itm', 'itg')"]),
    ("blip2:stage2", ["data.text_len=24"]),
    ("instructblip", ["data.text_len=24", "model.instruction_len=8"]),
    ("imagebind", []),
    ("imagebind:direct", ["model.temperature=learned"]),
    ("meta_transformer", []),
    ("meta_transformer:scratch", []),
]
TEACHER = ("albef", "video_albef", "blip")  # recipes whose objective runs an EMA teacher (ITC)
# a frozen vision tower: forward only, counted as 'teacher' (no backward)
FROZEN_FORWARD = ("llava", "cogvlm", "blip2", "instructblip", "imagebind")


@pytest.mark.parametrize("name,extra", CASES, ids=[f"{i}-{n}" for i, (n, _) in enumerate(CASES)])
def test_formula_equals_the_traced_matmuls(name, extra):
    """The formula's per-sample forward (student + teacher) times the batch equals every
    dot_general / conv FLOP in the family's traced objective: nothing missed, nothing
    invented."""
    b = 8
    path, _, arg = name.partition(":")
    cfg = config_lib.load(
        f"{ROOT}/configs/{path}.py" + (":" + arg if arg else ""), [*TINY, f"train.batch_size={b}", *extra]
    )
    fam, *_ = bench._prepare(cfg)
    batch = bench.synthetic_batch(cfg, fam, b)
    params = jax.eval_shape(lambda: fam.init_params(jax.random.PRNGKey(0)))
    extra_state = jax.eval_shape(fam.init_extra, params)

    def objective(p, batch, ex):
        kw = dict(teacher=ex.get("ema_params"), queues=ex.get("queues"), step=jnp.zeros((), jnp.int32))
        return fam.objective(p, batch, jax.random.PRNGKey(0), **kw)[0]

    counted = flops.count_dot_flops(objective, params, batch, extra_state)
    f = flops.forward_flops(zoo.build(cfg.model), b)
    assert f == fam.flops(b)  # the family's own formula
    assert counted == b * (f["student"] + f["teacher"]), (counted, f)
    assert (f["teacher"] > 0) == (path in TEACHER and "itc" in fam.tasks or path in FROZEN_FORWARD), f
    if int(cfg.model.get("num_frames", 0) or 0):
        image_only = flops.forward_flops(
            zoo.build(ml_collections.ConfigDict(dict(cfg.model.to_dict(), num_frames=0))), b
        )
        assert f["student"] > image_only["student"]  # the clip costs more than one frame


def test_every_recipe_has_a_flop_formula():
    """`mmjax bench` reports MFU for every family in configs/: each recipe and variant's
    family (built shapes-only, at the recipe's own sizes) has a positive train-step FLOP count."""
    from test_recipes import RECIPES, _load

    families = set()
    for name_arg in sorted(RECIPES):
        cfg = _load(name_arg)
        config_lib.derive_model_keys(cfg, int(cfg.data.tokenizer.vocab_size))
        fam = zoo.build(cfg.model)  # the family alone: no state plan to trace
        assert flops.train_step_flops(fam, 8) > 0, name_arg
        families.add(cfg.model.family)
    assert families == set(zoo.FAMILIES)  # and every registered family has a recipe


def test_a_family_without_a_formula_is_an_error(scratch_registry):
    from mmjax.models.zoo import contract
    from mmjax.models.zoo.clip import ClipFamily

    contract.register("noflops")(type("NoFlops", (ClipFamily,), {"flops": contract.Family.flops}))
    cfg = config_lib.load(f"{ROOT}/configs/demo.py", ["model.family=noflops", *TINY, "train.batch_size=8"])
    with pytest.raises(ValueError, match="'noflops' has no FLOP formula"):
        bench.step_time(cfg, steps=1, warmup=0, ceiling=False)  # before anything compiles


def test_bench_reports_mfu_for_coca_and_blip(monkeypatch):
    """`mmjax bench`'s row for CoCa and BLIP: MFU = the family's train-step FLOPs / step
    time / devices / the measured ceiling. The compiled step is replaced by one that
    only returns (compiling these steps on 8 fake CPU devices takes minutes and GBs;
    the step itself is covered by tests/test_coca.py and tests/test_blip.py)."""
    monkeypatch.setattr(bench, "_compiled_step", lambda *a: lambda state, batch: (state, {"loss": jnp.zeros(())}))
    monkeypatch.setattr(bench, "matmul_ceiling", lambda: {"matmul_tflops": 2.0})
    monkeypatch.setattr(bench, "_teacher_cost", lambda *a: {})
    for name in ("coca", "blip"):
        extra = ["model.queue_size=16"] if name == "blip" else []
        cfg = config_lib.load(f"{ROOT}/configs/{name}.py", [*TINY, "train.batch_size=8", *extra])
        row = bench.step_time(cfg, steps=2, warmup=0)
        want = flops.train_step_flops(bench._prepare(cfg)[0], 8)
        assert row["gflops_per_sample"] == pytest.approx(want / 8 / 1e9) and want > 0, row
        tflops = want / (row["ms_per_step"] / 1000) / row["devices"] / 1e12
        assert row["mfu"] == pytest.approx(tflops / 2.0) and row["mfu"] > 0, row


def test_clip_b16_is_the_issue_s_123_gflop_per_sample():
    cfg = config_lib.load(f"{ROOT}/configs/clip_b16.py", [])
    fam, *_ = bench._prepare(cfg)  # fills vocab / image size / text length from the config
    f = flops.forward_flops(zoo.build(cfg.model), 256)
    assert f["student"] / 1e9 == pytest.approx(41.09, abs=0.01)
    assert flops.train_step_flops(zoo.build(cfg.model), 256) == pytest.approx(256 * 3 * f["student"])
    assert flops.forward_flops(fam, 256) == f
    with pytest.raises(ValueError, match="valid choices"):
        flops.forward_flops(zoo.build(type(cfg.model)({"family": "nope"})), 8)
