"""Masked data modelling on images (a BEiT-3 stand-in): block-wise masks and
normalised-pixel regression targets (MAE's norm_pix_loss).

Shape letters: B batch, N = grid_h * grid_w patches, P patch size, C channels,
K target dim per patch (P * P * C for pixels).
"""

import math

import chex
import jax
import jax.numpy as jnp

from mmjax.parallel.collective import global_mean, identity


def blockwise_mask(rng, batch, grid_h, grid_w, ratio=0.4):
    """BEiT-style block-wise masks with exactly n = round(ratio * N) patches per row.

    Approach (vectorised; shapes are static):
    1. Each image draws R rectangles, like BEiT's sequential block sampler: area
       uniform in [min(16, n), n], aspect ratio log-uniform in [0.3, 1 / 0.3],
       top-left corner uniform among the positions where it fits.
    2. Every patch gets a priority: the index r of the first rectangle covering
       it, ties inside a rectangle broken in row-major order; uncovered patches
       come last, in random order.
    3. The n patches of highest priority are masked. So the mask is the union
       of the first few rectangles, the last one trimmed to fit (BEiT also cuts
       its last block to the budget). R = clip(ceil(4 n / min_area), 4, 64) makes
       the union of the rectangles usually exceed n; when it does not, the
       remainder is topped up with uniformly random uncovered patches.

    Args:
      rng: PRNG key.
      batch, grid_h, grid_w: static ints.
      ratio: fraction of patches to mask.
    Returns:
      [batch, grid_h * grid_w] bool, row-major patch order, exactly n True per row.
    """
    n_patches = grid_h * grid_w
    n = int(round(ratio * n_patches))
    if not 0 <= n <= n_patches:
        raise ValueError(f"ratio {ratio} gives {n} of {n_patches} patches")
    if n == 0:
        return jnp.zeros((batch, n_patches), bool)
    min_area = min(16, n)
    n_rect = int(min(64, max(4, math.ceil(4 * n / min_area))))
    # One uniform draw (cheaper to compile than five), sliced into its uses.
    u_BxU = jax.random.uniform(rng, (batch, 4 * n_rect + n_patches))
    u_area_BxR, u_aspect_BxR, u_y_BxR, u_x_BxR = (u_BxU[:, i * n_rect : (i + 1) * n_rect] for i in range(4))
    noise_BxN = u_BxU[:, 4 * n_rect :]
    area_BxR = min_area + u_area_BxR * (n - min_area)
    log_r = math.log(1 / 0.3)
    aspect_BxR = jnp.exp((2 * u_aspect_BxR - 1) * log_r)
    h_BxR = jnp.clip(jnp.round(jnp.sqrt(area_BxR * aspect_BxR)), 1, grid_h).astype(jnp.int32)
    w_BxR = jnp.clip(jnp.round(jnp.sqrt(area_BxR / aspect_BxR)), 1, grid_w).astype(jnp.int32)
    y0_BxR = jnp.floor(u_y_BxR * (grid_h - h_BxR + 1)).astype(jnp.int32)
    x0_BxR = jnp.floor(u_x_BxR * (grid_w - w_BxR + 1)).astype(jnp.int32)
    rows_N = jnp.arange(n_patches, dtype=jnp.int32) // grid_w
    cols_N = jnp.arange(n_patches, dtype=jnp.int32) % grid_w
    inside_BxRxN = (
        (rows_N[None, None, :] >= y0_BxR[:, :, None])
        & (rows_N[None, None, :] < (y0_BxR + h_BxR)[:, :, None])
        & (cols_N[None, None, :] >= x0_BxR[:, :, None])
        & (cols_N[None, None, :] < (x0_BxR + w_BxR)[:, :, None])
    )
    # Index of the first covering rectangle, n_rect if none.
    r_R = jnp.arange(n_rect, dtype=jnp.int32)
    first_BxN = jnp.min(jnp.where(inside_BxRxN, r_R[None, :, None], n_rect), axis=1)
    # Tie-break in [0, 1): row-major inside rectangles, random for uncovered.
    order_N = 1.0 - (jnp.arange(n_patches, dtype=jnp.float32) + 1) / (n_patches + 1)
    tie_BxN = jnp.where(first_BxN < n_rect, order_N[None, :], noise_BxN)
    score_BxN = -first_BxN.astype(jnp.float32) + tie_BxN
    _, idx_Bxn = jax.lax.top_k(score_BxN, n)
    mask_BxN = jnp.zeros((batch, n_patches), bool)
    return mask_BxN.at[jnp.arange(batch)[:, None], idx_Bxn].set(True)


def patch_targets(images_BxHxWxC, patch):
    """Per-patch normalised pixels: [B, H, W, C] -> [B, N, P * P * C].

    Patches in row-major grid order (the order of a stride-P conv's output
    reshaped to [B, (H/P) * (W/P), D]); inside a patch the values are ordered
    (row, col, channel). Each patch is normalised to zero mean and unit variance
    over its P * P * C values: (x - mean) / sqrt(var + 1e-6). Float32.
    """
    chex.assert_rank(images_BxHxWxC, 4)
    b, h, w, c = images_BxHxWxC.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by patch {patch}")
    gh, gw = h // patch, w // patch
    x = images_BxHxWxC.astype(jnp.float32).reshape(b, gh, patch, gw, patch, c)
    x_BxNxK = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch * patch * c)
    mean_BxNx1 = jnp.mean(x_BxNxK, axis=-1, keepdims=True)
    var_BxNx1 = jnp.var(x_BxNxK, axis=-1, keepdims=True)
    return (x_BxNxK - mean_BxNx1) / jnp.sqrt(var_BxNx1 + 1e-6)


def mdm_loss(pred_BxNxK, target_BxNxK, mask_BxN, *, gather=identity):
    """MSE over the masked patches only.

    loss = sum_{masked (b, n)} mean_k (pred - target)^2 / (number masked); 0 if
    nothing is masked. The target is under stop_gradient. Returns
    (loss, metrics) with metrics loss_mdm. Under pmap (`gather` a PmapCollective)
    the count of masked patches is global, as in `mlm_loss`.
    """
    chex.assert_rank([pred_BxNxK, target_BxNxK, mask_BxN], [3, 3, 2])
    chex.assert_equal_shape([pred_BxNxK, target_BxNxK])
    chex.assert_equal(pred_BxNxK.shape[:2], mask_BxN.shape)
    diff_BxNxK = pred_BxNxK.astype(jnp.float32) - jax.lax.stop_gradient(target_BxNxK).astype(jnp.float32)
    mse_BxN = jnp.mean(jnp.square(diff_BxNxK), axis=-1)
    m_BxN = mask_BxN.astype(jnp.float32)
    loss = global_mean(gather, jnp.sum(m_BxN * mse_BxN), jnp.sum(m_BxN))
    return loss, dict(loss_mdm=loss)
