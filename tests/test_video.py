"""Video building blocks (issue 7, in progress): FrameEmbed and the inflation of
image patch kernels."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.embed import PatchEmbed
from mmjax.models.video import FrameEmbed, inflate_patch_kernel

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
        tube = clip[:, i * t:(i + 1) * t]
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
