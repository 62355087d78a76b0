"""Video: FrameEmbed and the inflation of image patch kernels, the temporal modeling
of the video ViT (against frame-by-frame references), image checkpoints continuing on
video, frame sampling and the reader of a user's video files."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.embed import PatchEmbed
from mmjax.models.video import FrameEmbed, inflate_patch_kernel
from tiny import ROOT

P, D, C = 4, 8, 3


def _image_params(seed=0):
    img = jnp.zeros((1, 16, 16, C))
    params = nn.unbox(PatchEmbed(P, D).init(jax.random.PRNGKey(seed), img)["params"])
    # A non-zero bias so the test sees it.
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(9), x.shape), params)


def _with_temporal(conv, n, rng=None):
    temporal = jnp.zeros((n, D)) if rng is None else jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
    return {"conv": conv, "temporal_embedding": temporal}


def test_one_frame_is_exactly_patch_embed():
    """Inflation is exact: the image model's conv, a zero temporal embedding, T = 1."""
    img_params = _image_params()
    image = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, C))
    want = PatchEmbed(P, D).apply({"params": img_params}, image)
    got = FrameEmbed(P, D, max_frames=8).apply({"params": _with_temporal(img_params["conv"], 8)}, image[:, None])
    np.testing.assert_array_equal(np.asarray(got[:, 0]), np.asarray(want))
    for how in ("central", "mean"):
        conv = dict(img_params["conv"], kernel=inflate_patch_kernel(img_params["conv"]["kernel"], 1, how))
        tub = FrameEmbed(P, D, max_frames=8, mode="tubelet", tubelet=1)
        got = tub.apply({"params": _with_temporal(conv, 8)}, image[:, None])
        np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_frames_mode_embeds_each_frame_and_adds_its_time():
    rng = np.random.default_rng(0)
    img_params = _image_params()
    clip = jnp.asarray(rng.normal(size=(2, 5, 16, 16, C)), jnp.float32)
    params = _with_temporal(img_params["conv"], 8, rng)
    got = FrameEmbed(P, D, max_frames=8).apply({"params": params}, clip)
    assert got.shape == (2, 5, 16, D)
    for f in range(5):
        want = PatchEmbed(P, D).apply({"params": img_params}, clip[:, f]) + params["temporal_embedding"][f][None, None]
        np.testing.assert_allclose(np.asarray(got[:, f]), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["central", "mean"])
def test_tubelets_from_an_inflated_kernel(how):
    """A clip of one repeated frame embeds like that frame (both inflations); on a
    varying clip 'central' sees the middle frame of each tube, 'mean' the frame mean."""
    rng = np.random.default_rng(1)
    img_params = _image_params()
    t = 3
    kernel = inflate_patch_kernel(img_params["conv"]["kernel"], t, how)
    assert kernel.shape == (t, P, P, C, D)
    conv = dict(img_params["conv"], kernel=kernel)
    tub = FrameEmbed(P, D, max_frames=6, mode="tubelet", tubelet=t)
    frame = jnp.asarray(rng.normal(size=(2, 16, 16, C)), jnp.float32)
    still = jnp.repeat(frame[:, None], 6, axis=1)
    got = tub.apply({"params": _with_temporal(conv, 2)}, still)
    assert got.shape == (2, 2, 16, D)  # 6 frames / tubelet 3
    want = PatchEmbed(P, D).apply({"params": img_params}, frame)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(got[:, i]), np.asarray(want), rtol=1e-5, atol=1e-5)
    clip = jnp.asarray(rng.normal(size=(2, 6, 16, 16, C)), jnp.float32)
    got = tub.apply({"params": _with_temporal(conv, 2)}, clip)
    for i in range(2):
        tube = clip[:, i * t : (i + 1) * t]
        ref = tube[:, t // 2] if how == "central" else jnp.mean(tube, axis=1)
        want = PatchEmbed(P, D).apply({"params": img_params}, ref)
        np.testing.assert_allclose(np.asarray(got[:, i]), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_frame_embed_errors():
    clip = jnp.zeros((1, 4, 16, 16, C))
    with pytest.raises(ValueError, match="tubelet length 3"):
        FrameEmbed(P, D, max_frames=8, mode="tubelet", tubelet=3).init(jax.random.PRNGKey(0), clip)
    with pytest.raises(ValueError, match="max_frames=2"):
        FrameEmbed(P, D, max_frames=2).init(jax.random.PRNGKey(0), clip)
    with pytest.raises(ValueError, match="valid choices: frames, tubelet"):
        FrameEmbed(P, D, max_frames=8, mode="3d").init(jax.random.PRNGKey(0), clip)
    with pytest.raises(ValueError, match="valid choices: central, mean"):
        inflate_patch_kernel(np.zeros((P, P, C, D)), 2, "edge")


# ------------------------------------------------------------------ the video ViT
from mmjax.models.attention import MultiHeadAttention  # noqa: E402
from mmjax.models.transformer import Mlp  # noqa: E402
from mmjax.models.video import LocalTemporal, VideoBlock  # noqa: E402
from mmjax.models.vit import ViT  # noqa: E402
from mmjax.train import finetune  # noqa: E402

VIT = dict(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32)
TEMPORAL_MODES = ("none", "divided", "local", "mean")


def _jiggle(params, seed=5, scale=0.2):
    """Every leaf moved off its init (zero-initialised temporal parts included)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _video_from_image(pool, temporal, frames=4, tubelet=1, inflation="central", local_temporal=None):
    """(image ViT, its params moved off init, video ViT, the video params transplanted
    from the image ones as `mmjax finetune` does). local_temporal None: the default."""
    image_vit = ViT(**VIT, pool=pool)
    img_params = _jiggle(nn.unbox(image_vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]))
    variant = {} if local_temporal is None else dict(local_temporal=local_temporal)
    video_vit = ViT(**VIT, pool=pool, num_frames=frames, temporal=temporal, tubelet=tubelet, **variant)
    fresh = nn.unbox(video_vit.init(jax.random.PRNGKey(1), jnp.zeros((1, frames, 16, 16, 3)))["params"])
    params, report = finetune.transplant(fresh, img_params, inflation=inflation)
    assert report["unused"] == 0 and all("time" in k or "temporal" in k for k in report["kept_init"])
    return image_vit, img_params, video_vit, params


# every temporal mode with [CLS]; global average pooling with 'none' (where the [CLS]
# case differs) and mmjax_v1's local block
CONTINUE_CASES = [(t, "cls") for t in TEMPORAL_MODES + ("local:mmjax_v1",)] + [
    ("none", "gap"),
    ("local:mmjax_v1", "gap"),
]


@pytest.mark.parametrize("temporal,pool", CONTINUE_CASES)
def test_an_image_checkpoint_continues_on_video(temporal, pool):
    """Loaded into a video ViT, an image ViT's params compute on a one-frame clip
    exactly what they compute on the image, and on a clip of that frame repeated the
    same pooled feature: the temporal parts start as the identity, and joint attention
    over T copies of the patch tokens weighs each copy alike. (Not with 'none' and a
    [CLS] token: there the one [CLS] key gets 1/T of its image weight.)"""
    temporal, _, variant = temporal.partition(":")
    image_vit, img_params, video_vit, params = _video_from_image(pool, temporal, local_temporal=variant or None)
    image = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
    want, want_aux = image_vit.apply({"params": img_params}, image)
    got, aux = video_vit.apply({"params": params}, image[:, None])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(aux["tokens"]), np.asarray(want_aux["tokens"]))
    still, _ = video_vit.apply({"params": params}, jnp.repeat(image[:, None], 4, axis=1))
    if (temporal, pool) != ("none", "cls"):
        np.testing.assert_allclose(np.asarray(still), np.asarray(want), rtol=2e-5, atol=2e-5)
    else:
        assert np.abs(np.asarray(still) - np.asarray(want)).max() > 1e-3


@pytest.mark.parametrize("how", ["central", "mean"])
def test_tubelet_video_model_from_an_image_checkpoint(how):
    """`finetune.transplant` inflates the image patch kernel into the tubelet kernel:
    a still clip then pools like the image."""
    image_vit, img_params, video_vit, params = _video_from_image("cls", "divided", frames=4, tubelet=2, inflation=how)
    assert params["patch_embed"]["conv"]["kernel"].shape == (2, 4, 4, 3, 16)
    image = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
    want, _ = image_vit.apply({"params": img_params}, image)
    got, aux = video_vit.apply({"params": params}, jnp.repeat(image[:, None], 4, axis=1))
    assert aux["frames"] == 2 and aux["tokens"].shape == (2, 1 + 2 * 16, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def _apply(module, params, *args):
    return module.apply({"params": params}, *args)


def _reference_video_block(p, x, t, temporal, heads=2, kernel=3):
    """VideoBlock written frame by frame and position by position (loops, no reshapes)."""
    ln = lambda name, v: _apply(nn.LayerNorm(epsilon=1e-6), p[name], v)
    attn = lambda name, v: _apply(MultiHeadAttention(heads), p[name], v)
    b, s, d = x.shape
    n = (s - 1) // t
    cls, frames = x[:, :1], [x[:, 1 + f * n : 1 + (f + 1) * n] for f in range(t)]
    if temporal == "divided":
        new = [f.copy() for f in frames]
        for i in range(n):  # one spatial position across the frames
            seq = jnp.stack([f[:, i] for f in frames], axis=1)  # [B, T, D]
            h = _apply(nn.Dense(d), p["time_proj"], attn("time_attn", ln("ln_time", seq)))
            for f in range(t):
                new[f] = new[f].at[:, i].add(h[:, f])
        frames = new
    outs = [attn("attn", ln("ln1", jnp.concatenate([cls, f], axis=1))) for f in frames]
    cls = cls + sum(o[:, :1] for o in outs) / t
    frames = [f + o[:, 1:] for f, o in zip(frames, outs)]
    if temporal == "local":
        q = p["time_conv"]
        down = [
            _apply(nn.Dense(d // 4), q["down"], ln_f)
            for ln_f in [_apply(nn.LayerNorm(epsilon=1e-6), q["ln"], f) for f in frames]
        ]
        w, bias = np.asarray(q["conv"]["kernel"]), np.asarray(q["conv"]["bias"])  # [K, 1, R], [R]
        for f in range(t):
            mixed = bias[None, None] + sum(
                w[j, 0][None, None] * down[f + j - kernel // 2] for j in range(kernel) if 0 <= f + j - kernel // 2 < t
            )
            frames[f] = frames[f] + _apply(nn.Dense(d), q["up"], mixed)
    y = jnp.concatenate([cls] + frames, axis=1)
    return y + _apply(Mlp(32), p["mlp"], ln("ln2", y))


@pytest.mark.parametrize("temporal", ["divided", "local"])  # 'local': mmjax_v1's block
def test_video_block_matches_a_frame_by_frame_reference(temporal):
    t, n, d = 3, 5, 16
    block = VideoBlock(2, 32, t, temporal=temporal)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 1 + t * n, d))
    params = _jiggle(nn.unbox(block.init(jax.random.PRNGKey(0), x)["params"]))
    got = _apply(block, params, x)
    want = _reference_video_block(params, x, t, temporal)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_local_module_mixes_only_neighbouring_frames():
    """Through one mmjax_v1 'local' block, frame 3 of 5 depends on frames 2-4 and the [CLS]
    only: changing frame 0 leaves it unchanged, changing frame 2 does not."""
    t, n, d = 5, 4, 16
    block = VideoBlock(2, 32, t, temporal="local")
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 1 + t * n, d))
    params = _jiggle(nn.unbox(block.init(jax.random.PRNGKey(0), x)["params"]))
    frame = lambda y, f: np.asarray(y[:, 1 + f * n : 1 + (f + 1) * n])
    base = _apply(block, params, x)
    noise = jax.random.normal(jax.random.PRNGKey(6), (1, n, d))
    far = _apply(block, params, x.at[:, 1 : 1 + n].add(noise))  # frame 0
    near = _apply(block, params, x.at[:, 1 + 2 * n : 1 + 3 * n].add(noise))  # frame 2
    np.testing.assert_array_equal(frame(far, 3), frame(base, 3))
    assert np.abs(frame(near, 3) - frame(base, 3)).max() > 1e-3
    assert np.abs(frame(far, 1) - frame(base, 1)).max() > 1e-3
    y = jax.random.normal(jax.random.PRNGKey(4), (1, t, n, d))
    for lt in (LocalTemporal(), LocalTemporal(reduction=4, act=None)):  # the release's, mmjax_v1's
        np.testing.assert_array_equal(
            np.asarray(_apply(lt, nn.unbox(lt.init(jax.random.PRNGKey(0), y)["params"]), y)), np.asarray(y)
        )  # the identity at init


@pytest.mark.parametrize("temporal", TEMPORAL_MODES)
def test_only_the_mean_baseline_is_blind_to_frame_order(temporal):
    vit = ViT(**VIT, num_frames=4, temporal=temporal)
    clip = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 16, 16, 3))
    params = _jiggle(nn.unbox(vit.init(jax.random.PRNGKey(0), clip)["params"]))
    fwd, _ = vit.apply({"params": params}, clip)
    back, _ = vit.apply({"params": params}, clip[:, ::-1])
    if temporal == "mean":
        np.testing.assert_allclose(np.asarray(back), np.asarray(fwd), rtol=1e-5, atol=1e-5)
    else:
        assert np.abs(np.asarray(back) - np.asarray(fwd)).max() > 1e-3


def test_video_vit_errors():
    with pytest.raises(ValueError, match="model.num_frames"):
        ViT(**VIT).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 16, 16, 3)))
    with pytest.raises(ValueError, match="valid choices: none, divided, local, mean"):
        ViT(**VIT, num_frames=2, temporal="3d").init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 16, 16, 3)))
    with pytest.raises(ValueError, match="scan_layers"):
        ViT(**VIT, num_frames=2, temporal="divided", scan=True).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 2, 16, 16, 3))
        )
    from mmjax.models.zoo.common import video_options

    with pytest.raises(ValueError, match="multiple of model.tubelet"):
        video_options({"num_frames": 5, "tubelet": 2})


def test_config_choices_follow_the_code():
    """mmjax/config.py lists the video choices without importing the models (it loads
    before JAX); they must stay the code's."""
    from mmjax import config as config_lib
    from mmjax.data.video_io import SAMPLINGS
    from mmjax.models.video import INFLATIONS, LOCAL_VARIANTS, TEMPORAL

    assert config_lib.CHOICES["model.temporal"] == TEMPORAL
    assert config_lib.CHOICES["model.local_temporal"] == LOCAL_VARIANTS
    assert config_lib.CHOICES["data.frame_sampling"] == SAMPLINGS
    assert config_lib.CHOICES["finetune.inflation"] == INFLATIONS


# ------------------------------------------------------------------ mPLUG-2's local temporal module
def _quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def _np_layer_norm(p, x, eps=1e-6):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _np_local_temporal(q, frames, kernel=3):
    """mPLUG-2's LocalTemporal (models/clip_video.py) in numpy, frame by frame: for each
    frame f, LN -> 1x1 down (D -> D/2) -> depthwise conv over frames f-1, f, f+1 (zero
    padding) -> QuickGELU -> 1x1 up; returned as the residual branch, one array per frame."""
    down = [
        _np_layer_norm(q["ln"], f) @ np.asarray(q["down"]["kernel"]) + np.asarray(q["down"]["bias"]) for f in frames
    ]
    w, bias = np.asarray(q["conv"]["kernel"]), np.asarray(q["conv"]["bias"])  # [K, 1, D/2], [D/2]
    t, out = len(frames), []
    for f in range(t):
        mixed = bias + sum(w[j, 0] * down[f + j - kernel // 2] for j in range(kernel) if 0 <= f + j - kernel // 2 < t)
        out.append(_quick_gelu(mixed) @ np.asarray(q["up"]["kernel"]) + np.asarray(q["up"]["bias"]))
    return out


def _reference_release_encoder(p, x, t, heads=2):
    """mPLUG-2's VideoFormer encoder written frame by frame: every frame its own copy
    of the [CLS] through every block; in each block the local temporal module on the
    patch tokens before attention (lmhra1), attention per frame over [its CLS; its
    tokens], the module again after it (lmhra2), then the MLP; the frames' [CLS]
    averaged only after the last block, then the final LayerNorm."""
    x = np.asarray(x)
    b, s, d = x.shape
    n = (s - 1) // t
    cls = [x[:, :1]] * t
    frames = [x[:, 1 + f * n : 1 + (f + 1) * n] for f in range(t)]
    blocks = sorted(k for k in p if k.startswith("block"))
    for name in blocks:
        q = p[name]
        assert np.asarray(q["time_conv1"]["down"]["kernel"]).shape == (d, d // 2)  # the release's D/2
        frames = [f + h for f, h in zip(frames, _np_local_temporal(q["time_conv1"], frames))]
        seqs = [np.concatenate([c, f], axis=1) for c, f in zip(cls, frames)]
        seqs = [
            sq + np.asarray(_apply(MultiHeadAttention(heads), q["attn"], _np_layer_norm(q["ln1"], sq))) for sq in seqs
        ]
        cls, frames = [sq[:, :1] for sq in seqs], [sq[:, 1:] for sq in seqs]
        frames = [f + h for f, h in zip(frames, _np_local_temporal(q["time_conv2"], frames))]
        seqs = [np.concatenate([c, f], axis=1) for c, f in zip(cls, frames)]
        seqs = [sq + np.asarray(_apply(Mlp(32), q["mlp"], _np_layer_norm(q["ln2"], sq))) for sq in seqs]
        cls, frames = [sq[:, :1] for sq in seqs], [sq[:, 1:] for sq in seqs]
    y = np.concatenate([sum(cls) / t] + frames, axis=1)
    return _np_layer_norm(p["ln_final"], y)


def test_release_local_encoder_matches_a_frame_by_frame_reference():
    """model.temporal='local' (default local_temporal='release') is mPLUG-2's module:
    before and after attention, D/2, QuickGELU, a [CLS] per frame averaged at the end."""
    from mmjax.models.video import VideoEncoder

    t, n, d = 3, 5, 16
    enc = VideoEncoder(2, 2, 32, t, temporal="local")
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 1 + t * n, d))
    params = _jiggle(nn.unbox(enc.init(jax.random.PRNGKey(0), x)["params"]))
    got, aux = _apply(enc, params, x)
    want = _reference_release_encoder(params, x, t)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert aux["block01"].shape == (2, t, 1 + n, d)  # each frame with its own [CLS]


def test_release_local_frames_meet_only_through_the_temporal_modules():
    """With the temporal modules at init (the identity), the release's 'local' ViT is the
    image ViT on every frame alone, the frames' [CLS] averaged once at the end:
    pooled = ln_final(mean_f CLS_f). (mmjax_v1 averaged one shared [CLS] in every
    block, so the frames met through it from the first block on.)"""
    image_vit, img_params, video_vit, params = _video_from_image("cls", "local")
    clip = jax.random.normal(jax.random.PRNGKey(7), (2, 4, 16, 16, 3))  # 4 different frames
    got, aux = video_vit.apply({"params": params}, clip)
    last = f"block{VIT['depth'] - 1:02d}"
    cls, tokens = [], []
    for f in range(4):
        _, a = image_vit.apply({"params": img_params}, clip[:, f])
        cls.append(np.asarray(a["encoder"][last][:, 0]))  # before ln_final
        tokens.append(np.asarray(a["tokens"][:, 1:]))
    want = _np_layer_norm(img_params["encoder"]["ln_final"], sum(cls) / 4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(aux["tokens"][:, 1:]), np.concatenate(tokens, axis=1), rtol=1e-4, atol=1e-4)


def test_release_local_module_reaches_two_frames_per_block():
    """Two temporal convolutions (before and after attention) per block: through one
    block, frame 4 of 6 depends on frames 2-5 and not on frame 1; its [CLS], which
    sees the other frames only through its own frame's tokens in attention, on
    frames 3-5 (through the first convolution) and not on frame 2."""
    from mmjax.models.video import LocalTemporalBlock

    t, n, d = 6, 4, 16
    block = LocalTemporalBlock(2, 32)
    x = jax.random.normal(jax.random.PRNGKey(3), (1, t, 1 + n, d))
    params = _jiggle(nn.unbox(block.init(jax.random.PRNGKey(0), x)["params"]))
    base = np.asarray(_apply(block, params, x))
    noise = jax.random.normal(jax.random.PRNGKey(6), (1, 1 + n, d))
    far = np.asarray(_apply(block, params, x.at[:, 1].add(noise)))
    near = np.asarray(_apply(block, params, x.at[:, 2].add(noise)))
    np.testing.assert_array_equal(far[:, 4], base[:, 4])
    assert np.abs(near[:, 4] - base[:, 4]).max() > 1e-3
    np.testing.assert_array_equal(near[:, 4, 0], base[:, 4, 0])
    nearer = np.asarray(_apply(block, params, x.at[:, 3].add(noise)))
    assert np.abs(nearer[:, 4, 0] - base[:, 4, 0]).max() > 1e-3


def test_local_temporal_config_key():
    """model.local_temporal reaches the ViT: 'release' in every recipe, 'mmjax_v1' on
    request and for a config without the key (a workdir older than it, which trained
    mmjax_v1); a bad value is one clear error."""
    from mmjax import config as config_lib
    from mmjax.models.zoo.common import video_options

    for recipe in ("demo.py", "video_clip.py", "video_albef.py"):
        cfg = config_lib.load(f"{ROOT}/configs/{recipe}")
        assert video_options(dict(cfg.model.to_dict(), temporal="local"))["local_temporal"] == "release", recipe
    assert video_options({"num_frames": 4, "temporal": "local"})["local_temporal"] == "mmjax_v1"
    assert (
        video_options({"num_frames": 4, "temporal": "local", "local_temporal": "mmjax_v1"})["local_temporal"]
        == "mmjax_v1"
    )
    with pytest.raises(ValueError, match="model.local_temporal='v2'; valid choices: release, mmjax_v1"):
        video_options({"num_frames": 4, "temporal": "local", "local_temporal": "v2"})
    clip = jnp.zeros((1, 4, 16, 16, 3))
    for variant, names in (("release", {"time_conv1", "time_conv2"}), ("mmjax_v1", {"time_conv"})):
        vit = ViT(**VIT, num_frames=4, temporal="local", local_temporal=variant)
        block = vit.init(jax.random.PRNGKey(0), clip)["params"]["encoder"]["block00"]
        assert {k for k in block if "time" in k} == names
