"""How an objective sees the global batch: the one helper for both parallel modes.

Objectives are written once, for a call that owns `b` rows of a global batch of `B`:

  gather(x)      [b, ...] -> [B, ...]: every row of the global batch.
  local(x)       [B, ...] -> [b, ...]: this call's rows of a global array (or tree). Random
                 draws (hard negatives, MLM and MDM masks) are made for the global
                 batch from the one replicated key and then sliced, so pmap and jit
                 draw exactly the same numbers.
  mean(s, n)     a loss normalised by a global count: `s` is this call's sum, `n` its
                 count; returns a value whose mean over devices is sum(s) / sum(n).
  average(tree)  the mean over devices (gradients, metrics).

Under `jit` on a mesh (`Collective()`) arrays are global already, so all four are
plain identities / a division, and XLA inserts the communication from the
shardings. Under `pmap` (`PmapCollective('data')`) they are `all_gather`,
a slice at `axis_index * b`, a `psum` of the (gradient-free) count, and `pmean`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class Collective:
    """The jit-on-a-mesh collective: every call sees the whole batch."""

    shards = 1

    def __call__(self, x):
        return x

    def local(self, x):
        return x

    def count(self, n):
        return n

    def mean(self, total, count):
        """`total / max(global count, 1)`, scaled so its mean over devices is that."""
        denom = jnp.maximum(self.count(jax.lax.stop_gradient(jnp.asarray(count, jnp.float32))), 1.0)
        return total * self.shards / denom

    def average(self, tree):
        return tree


class PmapCollective(Collective):
    """Inside `jax.pmap(..., axis_name=axis_name)`: each device holds `b` rows."""

    def __init__(self, axis_name: str = "data"):
        self.axis_name = axis_name

    @property
    def shards(self):
        return jax.lax.psum(1, self.axis_name)

    def __call__(self, x):
        return jax.lax.all_gather(x, self.axis_name, tiled=True)

    def local(self, tree):
        n = jax.lax.psum(1, self.axis_name)
        index = jax.lax.axis_index(self.axis_name)

        def one(x):
            b = x.shape[0] // n
            return jax.lax.dynamic_slice_in_dim(x, index * b, b, axis=0)

        return jax.tree_util.tree_map(one, tree)

    def count(self, n):
        return jax.lax.psum(n, self.axis_name)

    def average(self, tree):
        return jax.lax.pmean(tree, self.axis_name)


identity = Collective()


def local(gather, x):
    """`gather.local(x)` for a Collective; a plain gather function (tests) is jit-like."""
    return gather.local(x) if hasattr(gather, "local") else x


def global_mean(gather, total, count):
    """`gather.mean(total, count)`, or a local mean for a plain gather function."""
    if hasattr(gather, "mean"):
        return gather.mean(total, count)
    return total / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
