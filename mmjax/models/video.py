"""Video clips as tokens: frame embeddings and the inflation of image checkpoints.

Shape letters: B batch, T frames, H/W height/width, C channels, P patch size,
t tubelet length (frames per token), T' = T / t token frames, N patches per frame
(H/P * W/P), D width.

`FrameEmbed` turns a clip [B, T, H, W, C] into [B, T', N, D]:
  mode 'frames'   every frame through the same patch conv (an image model's
                  `patch_embed/conv/kernel` [P, P, C, D] as is), T' = T;
  mode 'tubelet'  a 3-D conv over t x P x P tubes (ViViT), kernel [t, P, P, C, D];
then a learned temporal embedding [T', D] added to each token frame. The
temporal embedding starts at zero, so with T = 1 (and t = 1) the output is exactly
PatchEmbed's: an image-text model continues on video without starting over.

`inflate_patch_kernel` makes a tubelet kernel from an image kernel: 'central'
(the image kernel on the middle frame, zeros elsewhere: a clip of one repeated frame
embeds like that frame) or 'mean' (the image kernel / t on every frame: same
property, and every frame contributes).
"""
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.parallel.sharding import dense_init, names

Dtype = Any
MODES = ("frames", "tubelet")
INFLATIONS = ("central", "mean")


class FrameEmbed(nn.Module):
  """`__call__(clip: [B, T, H, W, C]) -> [B, T', N, D]` (see the module docstring).

  Params: `conv/kernel` ([P, P, C, D] for 'frames', [t, P, P, C, D] for 'tubelet'),
  `conv/bias` (if use_bias), `temporal_embedding` [max_frames / t, D].
  """
  patch_size: int
  width: int
  max_frames: int
  mode: str = "frames"
  tubelet: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, clip_BxTxHxWxC):
    chex.assert_rank(clip_BxTxHxWxC, 5)
    if self.mode not in MODES:
      raise ValueError(f"FrameEmbed mode {self.mode!r}; valid choices: {', '.join(MODES)}")
    b, t, h, w, c = clip_BxTxHxWxC.shape
    p, k = self.patch_size, (self.tubelet if self.mode == "tubelet" else 1)
    if h % p or w % p:
      raise ValueError(f"frame size {h}x{w} is not divisible by patch size {p}")
    if t % k or t > self.max_frames:
      raise ValueError(f"{t} frames: need a multiple of the tubelet length {k} and at most "
                       f"max_frames={self.max_frames}")
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
    if self.mode == "frames":
      conv = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                     **dense_init(None, None, None, "embed"), **kw)
      x = conv(clip_BxTxHxWxC.reshape(b * t, h, w, c))  # [B*T, H/P, W/P, D]
      x_BxTpxNxD = x.reshape(b, t, (h // p) * (w // p), self.width)
    else:
      conv = nn.Conv(self.width, (k, p, p), strides=(k, p, p), padding="VALID",
                     **dense_init(None, None, None, None, "embed"), **kw)
      x = conv(clip_BxTxHxWxC)  # [B, T/t, H/P, W/P, D]
      x_BxTpxNxD = x.reshape(b, t // k, (h // p) * (w // p), self.width)
    temporal = self.param("temporal_embedding", names(nn.initializers.zeros, None, "embed"),
                          (self.max_frames // k, self.width), self.param_dtype)
    tp = t // k
    return x_BxTpxNxD + jnp.asarray(temporal[:tp], x_BxTpxNxD.dtype)[None, :, None, :]


def inflate_patch_kernel(kernel_PxPxCxD, tubelet: int, how: str = "central"):
  """An image patch kernel [P, P, C, D] -> a tubelet kernel [t, P, P, C, D]."""
  if how not in INFLATIONS:
    raise ValueError(f"inflation {how!r}; valid choices: {', '.join(INFLATIONS)}")
  kernel = np.asarray(kernel_PxPxCxD)
  if kernel.ndim != 4:
    raise ValueError(f"an image patch kernel is [P, P, C, D], got shape {kernel.shape}")
  t = int(tubelet)
  if how == "mean":
    return np.repeat(kernel[None] / t, t, axis=0).astype(kernel.dtype)
  out = np.zeros((t,) + kernel.shape, kernel.dtype)
  out[t // 2] = kernel
  return out
