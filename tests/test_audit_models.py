"""Issue 14, models and objectives: learned temperatures projected after the step (1),
a float32 EMA teacher (2), ITM negatives that are never the positive's own caption
(3), VLMo's release loss (6), NegCLIP over the whole batch (7), float32 head logits
(9) and the BEiT-3 base recipe (11). Each test compares against a reference (numpy,
a float32 matmul, a swapped-parameter model, the architecture's formula)."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import bench
from mmjax import config as config_lib
from mmjax.models import zoo
from mmjax.objectives import init_queues, itc_distill_loss, itc_loss, same_rows, sample_hard_negatives, sigmoid_loss
from mmjax.parallel.collective import PmapCollective, identity
from mmjax.train import step as step_lib
from mmjax.train.state import TrainState
from tiny import ROOT

KEY = jax.random.PRNGKey(0)
N_DEV = 8


def family(**kw):
    """A tiny family from a plain model config (16px images, 12 tokens, vocab 40)."""
    base = dict(
        image="mu/4",
        image_overrides={},
        text="mu",
        text_overrides=dict(width=32, depth=2, heads=2, mlp_dim=64),
        embed_dim=16,
        vocab_size=40,
        image_size=16,
        text_len=12,
    )
    if kw.get("family") in ("vlmo", "beit3"):  # one tower: no text keys (they would be ignored)
        base = {k: v for k, v in base.items() if not k.startswith("text")} | {"text_len": 12}
    return zoo.build(ml_collections.ConfigDict({**base, **kw}))


def _zeros_like_params(fam):
    """The family's params tree, zeros (no init compile)."""
    shapes = jax.eval_shape(fam.init_params, KEY)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _text(rng, b, length=12):
    text = rng.integers(6, 40, size=(b, length))
    text[:, 0], text[:, -3], text[:, -2:] = 2, 3, 0
    return text.astype(np.int32)


# ------------------------------------------------------------- 1. temperatures


class _TemperatureProbe:
    """A family whose objective is the real family's contrastive loss on embeddings
    given in the batch (so the loss moves the learned temperature only), run through the
    real train step with the real family's params and `project_params`."""

    def __init__(self, fam, loss):
        self.fam, self.loss = fam, loss

    def objective(self, params, batch, rng=None, *, gather=identity, **_):
        loss = self.loss(self.fam, params, batch)
        return loss, {}, {}

    def project_params(self, params):
        return self.fam.project_params(params)

    def project_grads(self, params, grads):
        return self.fam.project_grads(params, grads)


def _albef_itc(fam, params, batch):
    """ALBEF's ITC (hard targets, empty queues) at the family's forward temperature."""
    queues = init_queues(4, batch["img"].shape[1])
    ids = jnp.arange(batch["img"].shape[0])
    return itc_distill_loss(batch["img"], batch["txt"], ids, batch["img"], batch["txt"], queues, fam.temp(params), 0.0)[
        0
    ]


def _clip_itc(fam, params, batch):
    return fam.loss_from_embeddings(params, {"img": batch["img"], "txt": batch["txt"]})[0]


def _run_two_phases(fam, loss, key, phases, lr, *, grad_norms=None):
    """AdamW through `step.make_train_step`; `phases`: [(batch, steps)]. -> the
    parameter `key` after each phase (`grad_norms`: a list that gets each step's
    gradient norm as the optimizer sees it)."""
    params = fam.init_params(KEY)
    opt = optax.adamw(lr, weight_decay=0.0)
    probe = _TemperatureProbe(fam, loss)
    step = jax.jit(step_lib.make_train_step(probe, opt))
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params), ema_params=None, queues=None, rng=KEY
    )
    out = []
    for batch, n in phases:
        for _ in range(n):
            state, metrics = step(state, batch)
            if grad_norms is not None:
                grad_norms.append(float(metrics["grad_norm"]))
        out.append(float(state.params[key]))
    return out


# Similarities 0.05 apart, so the gradients stay well above Adam's epsilon at any scale.
EYE = np.eye(4, dtype=np.float32)
ALIGNED = {"img": EYE, "txt": 0.05 * EYE}  # sharper is better: temperature down / scale up
CROSSED = {"img": EYE, "txt": 0.05 * np.roll(EYE, 1, 0)}  # softer is better: temperature up / scale down


def test_albef_temperature_recovers_from_its_lower_bound():
    """Issue 14.1: a loss that first pushes the temperature below temp_range's 0.01,
    then up. With a forward-only clamp the stored value passes the bound, gets zero
    gradient and stays below 0.01 for ever; projected after each update it sits at
    0.01 and then climbs (0.28 after 40 steps; Adam's second moment, large from the
    steep gradients near 0.01, slows it)."""
    fam = family(family="albef", fusion_from=1, queue_size=8, temp_range=(0.01, 0.5))
    low, high = _run_two_phases(fam, _albef_itc, "temp", [(ALIGNED, 20), (CROSSED, 40)], lr=0.05)
    assert low == pytest.approx(0.01, abs=1e-7)  # held at the bound, not past it
    assert 0.2 < high <= 0.5  # and it came back


def test_clip_logit_scale_recovers_from_its_upper_bound():
    """The same for open_clip's logit scale: pushed past 100, then down."""
    fam = family(family="clip", text="mu", text_overrides={}, pool="gap")
    up, down = _run_two_phases(fam, _clip_itc, "t", [(ALIGNED, 30), (CROSSED, 20)], lr=0.1)
    assert up == pytest.approx(math.log(100.0), abs=1e-6)
    assert down < math.log(100.0) - 1.5


def test_a_temperature_held_at_its_bound_takes_no_outward_gradient():
    """The projected gradient: while the loss pushes the temperature below its bound,
    the step hands the optimizer a zero gradient for it (not the steep one, ~1/T^2,
    which as part of the global norm made `train.grad_clip` scale every other gradient
    down 30-fold in the tiny ALBEF run); once the loss pulls it back up, the gradient
    passes and the temperature leaves the bound."""
    fam = family(family="albef", fusion_from=1, queue_size=8, temp_range=(0.01, 0.5))
    norms = []
    low, high = _run_two_phases(fam, _albef_itc, "temp", [(ALIGNED, 20), (CROSSED, 5)], lr=0.05, grad_norms=norms)
    assert low == pytest.approx(0.01, abs=1e-7)
    pinned = [n for n in norms[:20] if n == 0.0]
    assert len(pinned) >= 10 and norms[:20][-1] == 0.0  # held at 0.01: nothing outward reaches the optimizer
    assert min(norms[20:]) > 1.0 and high > 0.01  # pulled up: the gradient passes, the temperature moves


def test_bound_grads_against_numpy():
    """`bound_grads` zeroes exactly the gradients that point out of the range at a bound
    (numpy reference), for every family's bounds, and leaves all other leaves alone."""
    from mmjax.models.zoo.common import bound_grads

    x = np.array([0.01, 0.01, 0.3, 0.5, 0.5, 0.005, 0.7], np.float32)
    g = np.array([2.0, -2.0, 3.0, -1.0, 1.0, 0.5, -0.5], np.float32)
    want = np.where(((x <= 0.01) & (g > 0)) | ((x >= 0.5) & (g < 0)), 0.0, g)
    assert want.tolist() == [0.0, -2.0, 3.0, 0.0, 1.0, 0.0, 0.0]
    got = jax.jit(
        jax.vmap(lambda xi, gi: bound_grads({"temp": xi, "w": xi}, {"temp": gi, "w": gi}, {"temp": (0.01, 0.5)}))
    )(x, g)
    np.testing.assert_array_equal(got["temp"], want)
    np.testing.assert_array_equal(got["w"], g)  # not bounded: untouched
    for kw, cases in PROJECTIONS:
        fam = family(**kw)
        assert set(fam.param_bounds()) >= set(k for k, (v, w) in cases.items() if v != w), kw


def _with(params, **leaves):
    return {**params, **{k: jnp.asarray(v, params[k].dtype) for k, v in leaves.items()}}


PROJECTIONS = [
    (dict(family="clip", text_overrides={}), {"t": (9.0, math.log(100.0))}),
    (dict(family="clip", text_overrides={}, loss="sigmoid"), {"t": (-1.0, 0.0), "b": (-30.0, -30.0)}),
    (dict(family="clip", text_overrides={}, max_logit_scale=None), {"t": (9.0, 9.0)}),
    (dict(family="albef", fusion_from=1, queue_size=8), {"temp": (0.9, 0.5)}),
    (dict(family="albef", fusion_from=1, queue_size=8), {"temp": (1e-5, 0.001)}),
    (dict(family="blip", queue_size=8, temp_range=(0.01, 0.5)), {"temp": (-0.2, 0.01)}),
    (dict(family="coca"), {"t": (6.0, math.log(100.0))}),
    (
        dict(family="vlmo", vl_from=1, itc_vlffn=True, max_logit_scale=50.0),
        {"t": (6.0, math.log(50.0)), "t_vl": (-3.0, 0.0)},
    ),
    (dict(family="beit3"), {"t": (7.0, math.log(100.0))}),
]


@pytest.mark.parametrize("kw,cases", PROJECTIONS, ids=[f"{i}-{kw['family']}" for i, (kw, _) in enumerate(PROJECTIONS)])
def test_every_family_projects_its_temperature(kw, cases):
    """project_params puts each learned temperature / logit scale back in range and
    leaves every other leaf as it is (the identity before the fix)."""
    fam = family(**kw)
    params = _with(_zeros_like_params(fam), **{k: v for k, (v, _) in cases.items()})
    out = jax.jit(fam.project_params)(params)
    for k, (_, want) in cases.items():
        np.testing.assert_allclose(float(out[k]), want, rtol=1e-6, err_msg=k)
    flat_in, flat_out = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(out)
    assert [p for p, _ in flat_in] == [p for p, _ in flat_out]
    for (path, a), (_, b) in zip(flat_in, flat_out):
        if jax.tree_util.keystr(path).strip("[]'") not in cases:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kw,names",
    [(dict(family="coca"), ("t",)), (dict(family="vlmo", vl_from=1, itc_vlffn=True, tasks=("itc",)), ("t", "t_vl"))],
    ids=["coca", "vlmo"],
)
def test_forward_uses_the_logit_scale_as_it_is(kw, names):
    """Beyond the bound (t = ln 200) the family's own objective still moves t: the
    forward no longer clips it (the clip gave exactly zero gradient there)."""
    fam = family(**kw)
    params = _with(fam.init_params(KEY), **{k: math.log(200.0) for k in names})
    rng = np.random.default_rng(0)
    batch = dict(
        image=jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
        text=jnp.asarray(_text(rng, 4)),
        id=jnp.arange(4),
    )
    scales = {k: params[k] for k in names}
    grads = jax.jit(jax.grad(lambda s: fam.objective({**params, **s}, batch, KEY)[0]))(scales)
    for k in names:
        assert abs(float(grads[k])) > 1e-6, k


# ------------------------------------------------------------- 2. EMA teacher precision


def test_teacher_is_float32_whatever_the_param_dtype():
    fam = family(family="albef", fusion_from=1, queue_size=8, param_dtype="bfloat16", dtype="bfloat16")
    params = jax.eval_shape(fam.init_params, KEY)
    assert {x.dtype for x in jax.tree.leaves(params)} >= {jnp.dtype(jnp.bfloat16)}
    ema = jax.eval_shape(fam.init_extra, params)["ema_params"]
    assert {x.dtype for x in jax.tree.leaves(ema)} == {jnp.dtype(jnp.float32)}


def test_float32_teacher_follows_a_slow_bf16_student():
    """Issue 14.2: bf16 student params drifting 0.02 -> 0.04 over 2,000 steps, m = 0.995.
    The teacher (init_extra + teacher_update) equals the float64 EMA of the student's
    bf16 values; a bf16 teacher (what init_extra made before) ends ~0.01 short."""
    fam = family(family="albef", fusion_from=1, queue_size=8, momentum=0.995)
    n = 2000
    student = jnp.asarray(0.02 + 0.02 * np.arange(1, n + 1) / n, jnp.bfloat16)  # the stored (bf16) values

    def run(ema0):
        def body(ema, xs):
            k, w = xs
            return fam.teacher_update(ema, {"w": jnp.full((3,), w)}, k), None

        return jax.jit(lambda e: jax.lax.scan(body, e, (jnp.arange(n), student))[0])(ema0)["w"]

    want = 0.02
    for w in np.asarray(student, np.float64):
        want = 0.995 * want + 0.005 * w
    teacher = run(fam.init_extra({"w": jnp.full((3,), 0.02, jnp.bfloat16)})["ema_params"])
    assert teacher.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(teacher), want, rtol=1e-5)
    stale = run({"w": jnp.full((3,), 0.02, jnp.bfloat16)})  # a bf16 teacher: the defect
    assert abs(float(stale[0]) - want) > 5e-3


def test_bf16_student_with_float32_teacher_runs_the_objective():
    """The teacher's forward (float32 params) works in a bf16-compute, bf16-param model."""
    fam = family(family="albef", fusion_from=1, queue_size=8, param_dtype="bfloat16", dtype="bfloat16", tasks=("itc",))
    params = fam.init_params(KEY)
    extra = fam.init_extra(params)
    assert extra["ema_params"]["image_proj"]["kernel"].dtype == jnp.float32
    assert params["image_proj"]["kernel"].dtype == jnp.bfloat16
    rng = np.random.default_rng(1)
    batch = dict(
        image=jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
        text=jnp.asarray(_text(rng, 4)),
        id=jnp.arange(4),
    )
    loss, metrics, upd = jax.jit(lambda p, e, q: fam.objective(p, batch, KEY, teacher=e, queues=q))(
        params, extra["ema_params"], extra["queues"]
    )
    assert np.isfinite(float(loss)) and upd["queues"]["img"].dtype == jnp.float32


# ------------------------------------------------------------- 3. ITM negatives


def _dup_batch():
    """8 pairs, distinct ids; rows 0, 1, 2 share one caption, rows 5 and 6 another."""
    text = _text(np.random.default_rng(2), 8)
    text[1] = text[2] = text[0]
    text[6] = text[5]
    return jnp.asarray(text)


def test_hard_negatives_never_the_anchor_caption():
    """Issue 14.3: with the duplicates the most similar columns (sim 9 vs 0), a draw
    that excluded only the same id would pick them nearly always; none is ever drawn."""
    text = _dup_batch()
    same = np.asarray(same_rows(text, text))
    sim = np.where(same, 9.0, 0.0).astype(np.float32)
    ids = jnp.arange(8)
    draw = jax.jit(jax.vmap(lambda k: sample_hard_negatives(k, sim, ids, ids, exclude_bxB=same)))
    idx, has = draw(jax.random.split(KEY, 2000))
    idx, has = np.asarray(idx), np.asarray(has)
    assert has.all()
    assert not same[np.arange(8)[None, :], idx].any()
    # Without the exclusion (the old rule) the duplicate caption is the usual draw.
    old, _ = jax.vmap(lambda k: sample_hard_negatives(k, sim, ids, ids))(jax.random.split(KEY, 200))
    assert same[0, np.asarray(old)[:, 0]].mean() > 0.9


def test_no_negative_left_gets_weight_zero():
    """Every other row shares the anchor's caption: no negative, weight 0, finite loss."""
    text = jnp.asarray(np.repeat(_text(np.random.default_rng(3), 1), 4, axis=0))
    fam = family(family="albef", fusion_from=1, queue_size=8)
    emb = jnp.asarray(np.eye(4, 16), jnp.float32)
    _, _, labels, weights = fam.itm_pairs((KEY, KEY), emb, emb, jnp.arange(4), 0.07, identity, text=text)
    np.testing.assert_array_equal(np.asarray(weights), [1] * 4 + [0] * 8)
    np.testing.assert_array_equal(np.asarray(labels), [1] * 4 + [0] * 8)


def test_itm_pairs_exclude_duplicates_under_jit_and_pmap():
    """The family's draw (ALBEF, BLIP, VLMo, BEiT-3 share `itm_pairs`): never a row
    with the anchor's caption, in either direction, and the pmap run (8 devices, each
    with its rows, gathering the rest) draws exactly what the jit run draws."""
    fam = family(family="albef", fusion_from=1, queue_size=8)
    b = 16
    rng = np.random.default_rng(4)
    text = np.concatenate([np.asarray(_dup_batch())] * 2)
    text[8:, 1] = 7  # the second half's captions differ from the first half's
    text = jnp.asarray(text)
    emb = rng.normal(size=(b, 16)).astype(np.float32)
    emb = jnp.asarray(emb / np.linalg.norm(emb, axis=1, keepdims=True))
    txt = emb + 0.01  # each text close to its image: the duplicates' rows are also similar below
    ids = jnp.arange(b)
    same = np.asarray(same_rows(text, text))
    keys = (jax.random.PRNGKey(5), jax.random.PRNGKey(6))
    neg_t, neg_i, _, w = jax.jit(lambda: fam.itm_pairs(keys, emb, txt, ids, 0.07, identity, text=text))()
    assert np.asarray(w).min() == 1.0
    assert not same[np.arange(b), np.asarray(neg_t)].any() and not same[np.arange(b), np.asarray(neg_i)].any()

    def per_device(e, t, i, x):
        return fam.itm_pairs(keys, e, t, i, 0.07, PmapCollective("data"), text=x)[:2]

    split = lambda x: x.reshape((N_DEV, -1) + x.shape[1:])
    p_t, p_i = jax.pmap(per_device, axis_name="data")(split(emb), split(txt), split(ids), split(text))
    np.testing.assert_array_equal(np.asarray(p_t).reshape(-1), neg_t)
    np.testing.assert_array_equal(np.asarray(p_i).reshape(-1), neg_i)


# ------------------------------------------------------------- 6. VLMo's release loss


def _np_itc(img, txt, scale):
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = scale * img @ txt.T
    lse = lambda x: np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    d = np.diag(logits)
    return 0.5 * (np.mean(lse(logits) - d) + np.mean(lse(logits.T) - d))


def _vl_as_plain(params, vl_from, depth):
    """The params with VLMo's VL path moved into the single-modality path: blocks from
    vl_from use ffn_vl / ln2_vl, the final norm is ln_final_vl, the projections the VL
    ones. A plain image-only (text-only) pass with them is the VL-FFN pass."""
    enc = dict(params["encoder"])
    for i in range(vl_from, depth):
        blk = dict(enc[f"block{i:02d}"])
        for m in ("image", "text"):
            blk[f"ffn_{m}"], blk[f"ln2_{m}"] = blk["ffn_vl"], blk["ln2_vl"]
        enc[f"block{i:02d}"] = blk
    enc["ln_final_image"] = enc["ln_final_text"] = enc["ln_final_vl"]
    return {**params, "encoder": enc, "image_proj": params["vl_image_proj"], "text_proj": params["vl_text_proj"]}


def test_vlmo_release_loss_composition():
    """Issue 14.6: loss = (itc + itc_vlffn) / 2 + 0.25 * mlm (VLMo's objectives.py), the
    second ITC on the VL-FFN features with its own logit scale: both ITC terms equal a
    numpy ITC on features from the model's plain passes (the VL ones with the VL
    experts swapped in), and the MLM term is the one-ITC, weight-1 objective's. The
    recipe's keys (configs/vlmo.py) are the release's."""
    recipe = config_lib.load(f"{ROOT}/configs/vlmo.py", []).model
    fam = family(
        family="vlmo", vl_from=1, tasks=("itc", "mlm"), mlm_weight=recipe.mlm_weight, itc_vlffn=recipe.itc_vlffn
    )
    assert fam.mlm_weight == 0.25 and fam.itc_vl
    params = _with(fam.init_params(KEY), t=2.0, t_vl=1.2)
    rng = np.random.default_rng(7)
    batch = dict(
        image=jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
        text=jnp.asarray(_text(rng, 4)),
        id=jnp.arange(4),
    )
    loss, m, _ = jax.jit(lambda p: fam.objective(p, batch, KEY))(params)

    plain = {k: v for k, v in params.items() if k not in ("t_vl", "vl_image_proj", "vl_text_proj")}
    old = family(family="vlmo", vl_from=1, tasks=("itc", "mlm"))  # no keys: the earlier objective
    assert not old.itc_vl and old.mlm_weight == 1.0 and set(jax.eval_shape(old.init_params, KEY)) == set(plain)
    old_loss, old_m, _ = jax.jit(lambda p: old.objective(p, batch, KEY))(plain)

    feats = lambda p: (fam.encode_image(p, batch["image"]), fam.encode_text(p, batch["text"]))
    want_itc = _np_itc(*feats(params), np.exp(2.0))
    want_vl = _np_itc(*feats(_vl_as_plain(params, 1, 2)), np.exp(1.2))
    np.testing.assert_allclose(m["loss_itc"], want_itc, rtol=1e-5)
    np.testing.assert_allclose(m["loss_itc_vlffn"], want_vl, rtol=1e-5)
    np.testing.assert_allclose(m["logit_scale_vl"], np.exp(1.2), rtol=1e-6)
    assert abs(want_vl - want_itc) > 1e-3  # the two ITCs really differ
    np.testing.assert_allclose(m["loss_mlm"], old_m["loss_mlm"], rtol=1e-6)
    np.testing.assert_allclose(old_loss, want_itc + old_m["loss_mlm"], rtol=1e-5)  # itc_vlffn=False, weight 1
    np.testing.assert_allclose(loss, 0.5 * (want_itc + want_vl) + 0.25 * old_m["loss_mlm"], rtol=1e-5)


def test_vlmo_and_beit3_loss_keys():
    assert family(family="beit3").mlm_weight == 1.0 and not family(family="beit3").itc_vl
    with pytest.raises(ValueError, match="itc_vlffn"):
        family(family="vlmo", vl_from=None, itc_vlffn=True)
    with pytest.raises(ValueError, match="itc_vlffn"):
        family(family="beit3", itc_vlffn=True)
    with pytest.raises(ValueError, match="mlm_weight"):
        family(family="vlmo", vl_from=1, mlm_weight=-1.0)
    names = set(jax.eval_shape(family(family="vlmo", vl_from=1, itc_vlffn=True).init_params, KEY))
    assert {"t_vl", "vl_image_proj", "vl_text_proj"} <= names
    assert "t_vl" not in set(jax.eval_shape(family(family="beit3").init_params, KEY))


# ------------------------------------------------------------- 7. NegCLIP over the batch


def _np_lse(x):
    return np.log(np.sum(np.exp(x - x.max()))) + x.max()


def np_negclip(img, txt, neg, valid, s, scope, bias=None):
    """Loops in float64. softmax (bias None): image i against the B texts and the valid
    hard captions (all of the batch's, or its own); sigmoid: z = -1 terms for them."""
    img, txt, neg = (np.asarray(x, np.float64) for x in (img, txt, neg))
    b = len(img)
    per_i2t, per_t2i = [], []
    for i in range(b):
        cand = neg.reshape(-1, neg.shape[-1])[valid.reshape(-1)] if scope == "batch" else neg[i][valid[i]]
        if bias is None:
            row = np.concatenate([s * txt @ img[i], s * cand @ img[i]])
            per_i2t.append(_np_lse(row) - row[i])
            col = s * img @ txt[i]
            per_t2i.append(_np_lse(col) - col[i])
        else:
            z = 2 * (np.arange(b) == i) - 1
            ll = s * txt @ img[i] + bias
            hard = s * cand @ img[i] + bias
            per_i2t.append(np.sum(np.log1p(np.exp(-z * ll))) + np.sum(np.log1p(np.exp(hard))))
    if bias is None:
        return 0.5 * (np.mean(per_i2t) + np.mean(per_t2i))
    return np.mean(per_i2t)


def _unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def negclip_data():
    rng = np.random.default_rng(11)
    b, k, d = 16, 3, 8
    img, txt, neg = _unit(rng, b, d), _unit(rng, b, d), _unit(rng, b, k, d)
    valid = rng.random((b, k)) < 0.6
    valid[:, 0] = True  # a record has at least one; the rest are cycled repeats or padding
    neg[~valid] = neg[:, :1].repeat(k, 1)[~valid]  # invalid slots repeat the first, as a cycled record would
    return img, txt, neg, valid


@pytest.mark.parametrize("scope", ["batch", "own"])
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_negclip_matches_numpy(negclip_data, scope, loss):
    """Issue 14.7: 'batch' scores every image against all B*K hard captions (B x (B + B*K));
    'own' against its own K; invalid (cycled, padded) ones never count."""
    img, txt, neg, valid = negclip_data
    t, bias = 1.7, -1.0
    if loss == "softmax":
        got = jax.jit(lambda: itc_loss(img, txt, t, txt_neg=neg, neg_valid=valid, neg_scope=scope)[0])()
        want = np_negclip(img, txt, neg, valid, np.exp(t), scope)
    else:
        got = jax.jit(lambda: sigmoid_loss(img, txt, t, bias, txt_neg=neg, neg_valid=valid, neg_scope=scope)[0])()
        want = np_negclip(img, txt, neg, valid, np.exp(t), scope, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if scope == "batch":  # the old rule (own K, repeats counted) is a different number
        old = np_negclip(img, txt, neg, np.ones_like(valid), np.exp(t), "own", None if loss == "softmax" else bias)
        assert abs(old - want) > 1e-2


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_negclip_batch_scope_under_pmap_equals_one_device(negclip_data, loss):
    """The hard captions are gathered like the texts: 8 devices with 2 rows each give
    the single-device loss and gradients."""
    img, txt, neg, valid = negclip_data

    def fn(i, t, n, v, gather=identity):
        if loss == "softmax":
            return itc_loss(i, t, 1.7, txt_neg=n, neg_valid=v, gather=gather)[0]
        return sigmoid_loss(i, t, 1.7, -1.0, txt_neg=n, neg_valid=v, gather=gather)[0]

    want, want_g = jax.value_and_grad(fn, argnums=(0, 1, 2))(img, txt, neg, valid)
    gather = lambda x: jax.lax.all_gather(x, "data", tiled=True)

    def per_device(i, t, n, v):
        l, g = jax.value_and_grad(functools.partial(fn, gather=gather), argnums=(0, 1, 2))(i, t, n, v)
        return jax.lax.pmean(l, "data"), jax.tree.map(lambda x: x / N_DEV, g)

    split = lambda x: x.reshape((N_DEV, -1) + x.shape[1:])
    got, got_g = jax.pmap(per_device, axis_name="data")(split(img), split(txt), split(neg), split(valid))
    np.testing.assert_allclose(got, np.full(N_DEV, want), rtol=1e-5)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g).reshape(w.shape), w, rtol=1e-4, atol=1e-6)


def test_clip_family_reads_the_valid_mask_and_scope():
    """The family passes batch['hard_negatives_valid'] and model.hard_negatives_scope:
    all-invalid hard captions give the loss without them; 'own' is the per-image rule."""
    fam = family(family="clip", text_overrides={}, pool="gap")
    params = fam.init_params(KEY)
    rng = np.random.default_rng(12)
    b, k = 4, 2
    batch = dict(
        image=jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32),
        text=jnp.asarray(_text(rng, b)),
        hard_negatives=jnp.asarray(_text(rng, b * k).reshape(b, k, -1)),
    )
    emb = jax.jit(fam.embed)(params, batch)
    plain = jax.jit(lambda: fam.loss_from_embeddings(params, {"img": emb["img"], "txt": emb["txt"]})[0])()
    off = {**batch, "hard_negatives_valid": jnp.zeros((b, k), bool)}
    np.testing.assert_allclose(jax.jit(lambda p, x: fam.objective(p, x)[0])(params, off), plain, rtol=1e-6)
    valid = np.array([[1, 0], [1, 1], [1, 0], [1, 1]], bool)
    for scope in ("batch", "own"):
        f = family(family="clip", text_overrides={}, pool="gap", hard_negatives_scope=scope)
        got = f.loss_from_embeddings(params, {**emb, "neg_valid": jnp.asarray(valid, jnp.float32)})[0]
        want = np_negclip(emb["img"], emb["txt"], emb["neg"], valid, float(np.exp(params["t"])), scope)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="hard_negatives_scope"):
        family(family="clip", text_overrides={}, hard_negatives_scope="all")
    # GradCache accumulation carries the mask with the embeddings: 2 micro-batches = the full batch.
    part = {**batch, "hard_negatives_valid": jnp.asarray(valid)}
    grads = jax.jit(lambda p, a: step_lib.loss_and_grads(fam, p, part, KEY, accum_steps=a), static_argnums=1)
    (l1, _, _), g1 = grads(params, 1)
    (l2, _, _), g2 = grads(params, 2)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=5e-6)


# ------------------------------------------------------------- 9. float32 head logits


def _captured(module, variables, method, *args, path):
    """(output of `method`, the captured `__call__` output of the submodule at `path`)."""
    out, state = module.apply(variables, *args, method=method, capture_intermediates=True, mutable=["intermediates"])
    node = state["intermediates"]
    for k in path:
        node = node[k]
    return out, node["__call__"][0]


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _as_bf16(x):
    return _f64(jnp.asarray(x, jnp.bfloat16))


def test_head_logits_are_a_float32_matmul_in_a_bf16_model():
    """Issue 14.9, with model.dtype = bfloat16: the MLM (tied vocabulary) and ITM logits
    and the ITC projection of ALBEF, and BLIP's LM logits, equal a float32 matmul of the
    same bf16 hidden states (the vocabulary heads with the bf16 table, as the matmul
    reads it; the small heads with the float32 kernel). Before, each was a bf16 matmul
    with a bf16 output (3 significant digits), cast afterwards."""
    fam = family(family="albef", fusion_from=1, queue_size=8, dtype="bfloat16")
    m = fam.model
    params = fam.init_params(KEY)
    v = {"params": params}
    rng = np.random.default_rng(13)
    fused = jnp.asarray(rng.normal(size=(3, 12, 32)), jnp.bfloat16)
    logits, h = _captured(m, v, m.mlm_logits, fused, path=("mlm_head", "ln"))
    table = params["text_tower"]["embed"]["token"]["embedding"]
    want = _f64(h) @ _as_bf16(table).T + _f64(params["mlm_head"]["bias"])
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(_f64(logits), want, rtol=1e-5, atol=1e-5)

    itm = m.apply(v, fused, method=m.itm_logits)
    head = params["itm_head"]["dense"]
    want = _f64(fused[:, 0]) @ _f64(head["kernel"]) + _f64(head["bias"])
    np.testing.assert_allclose(_f64(itm), want, rtol=1e-6, atol=1e-6)

    image = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
    (emb, _), (pooled, _) = _captured(m, v, m.image_features, image, path=("image_tower",))
    proj = _f64(pooled) @ _f64(params["image_proj"]["kernel"]) + _f64(params["image_proj"]["bias"])
    np.testing.assert_allclose(_f64(emb), proj / np.linalg.norm(proj, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)

    blip = family(family="blip", queue_size=8, dtype="bfloat16")
    bp = blip.init_params(KEY)
    memory = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.bfloat16)
    ids = jnp.asarray(_text(rng, 3))
    lm, h = _captured(blip.model, {"params": bp}, blip.model.lm_logits, memory, ids, path=("text_tower", "ln_final"))
    want = _f64(h) @ _as_bf16(bp["text_tower"]["embed"]["token"]["embedding"]).T + _f64(bp["text_tower"]["bias"])
    assert lm.dtype == jnp.float32
    np.testing.assert_allclose(_f64(lm), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- 11. BEiT-3 base


def test_beit3_base_recipe_param_count():
    """configs/beit3_base.py builds (abstractly) to the count the architecture gives:
    12 decoupled multiway layers of width 768 / MLP 3072 with two experts (image,
    text), ViT-B/16 patches at 224px, 64,010 words x 64 positions, and mmjax's heads."""
    cfg = config_lib.load(f"{ROOT}/configs/beit3_base.py", [])
    fam, *_ = bench._prepare(cfg)
    m = cfg.model
    assert (m.family, m.image, m.vocab_size, m.image_size, m.text_len) == ("beit3", "B/16", 64010, 224, 64)
    shapes = jax.eval_shape(fam.init_params, KEY)
    d, f, depth, v, length, p, e = 768, 3072, 12, 64010, 64, 16, 768
    n = (224 // p) ** 2
    expert = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * f + f + f * d + d)  # ln1 qkv out ln2 ffn
    encoder = depth * 2 * expert + 2 * (2 * d)  # two experts per layer + ln_final_image / _text
    embeddings = (p * p * 3 * d + d) + d + (n + 1) * d + d + (v * d + length * d)  # patch, cls, pos, mask, words
    heads = (
        2 * d * e + (2 * d + 2) + (d * d + d + 2 * d + v) + (d * p * p * 3 + p * p * 3) + 1
    )  # proj, itm, mlm, mdm, t
    want = encoder + embeddings + heads
    assert want == 222_492_173
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == want
    assert {"ln1_image", "ln1_text", "ffn_image", "ffn_text"} <= set(shapes["encoder"]["block11"])
    assert "ffn_vl" not in shapes["encoder"]["block11"] and "t_vl" not in shapes
