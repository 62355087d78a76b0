"""Token embeddings: image patches and words.

Shape letters: B batch, H/W image height/width, C channels, P patch size,
N number of patches (H/P * W/P), L text length, D width, V vocabulary size.
"""

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.parallel.sharding import dense_init, names

Dtype = Any


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as a conv with stride = kernel = patch.

    `__call__(images: [B, H, W, C] float) -> [B, N, D]` with N = (H/P)(W/P).
    `use_bias=False` matches OpenAI CLIP's `conv1`.
    """

    patch_size: int
    width: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC):
        chex.assert_rank(images_BxHxWxC, 4)
        b, h, w, _ = images_BxHxWxC.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not divisible by patch size {p}; pick image_size as a multiple of the patch."
            )
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
            **dense_init(None, None, None, "embed"),
        )(images_BxHxWxC)
        x_BxNxD = x.reshape(b, (h // p) * (w // p), self.width)
        return x_BxNxD


class WordEmbed(nn.Module):
    """Token embedding + learned absolute position embedding.

    `__call__(ids: [B, L] int) -> [B, L, D]` (L <= max_len).
    `attend(x: [..., D]) -> [..., V]` multiplies by the embedding table, for a
    language-model head tied to the input embedding.
    """

    vocab_size: int
    width: int
    max_len: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.token = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=names(nn.initializers.normal(0.02), "vocab", "embed"),
        )
        self.pos = self.param(
            "pos_embedding",
            names(nn.initializers.normal(0.01), None, "embed"),
            (self.max_len, self.width),
            self.param_dtype,
        )

    def __call__(self, ids_BxL, positions_L=None):
        """`positions_L` ([L] int, default 0..L-1): the positions of the given tokens
        (a decoder feeding one token at a time passes its step)."""
        chex.assert_rank(ids_BxL, 2)
        length = ids_BxL.shape[1]
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds max_len {self.max_len} (model_config.text_len).")
        x_BxLxD = self.token(ids_BxL)
        pos_LxD = self.pos[:length] if positions_L is None else jnp.take(self.pos, positions_L, axis=0)
        return x_BxLxD + jnp.asarray(pos_LxD, self.dtype)[None]

    def attend(self, x):
        """Logits over the vocabulary: `x: [..., D] -> [..., V]` float32 (tied weights).

        Operands in the compute dtype, float32 accumulation and output: a bf16 output
        would round every logit to 3 significant digits before the softmax."""
        table_VxD = jnp.asarray(self.token.embedding, self.dtype)
        return jnp.einsum("...d,vd->...v", jnp.asarray(x, self.dtype), table_VxD, preferred_element_type=jnp.float32)
