"""Logical axis names and the one rule table that maps them to mesh axes.

Every parameter is created with logical names (`names(init, 'embed', 'mlp')`), and
key activations are constrained with `constrain(x, ('batch', 'length', 'act_embed'))`.
`RULES` below is the only place that says which mesh axis (`data`, `fsdp`, `tensor`)
shards which logical axis:

  FSDP    the width of every weight ('embed') is split over `fsdp`: params, their
          gradients, the optimizer moments and the EMA teacher are sharded, and
          XLA all-gathers each weight just before it is used.
  tensor  attention heads, MLP hidden units and the vocabulary are split over
          `tensor` (Megatron-style column / row parallel layers).
  batch   activations and the data are split over `data` x `fsdp`.

A mesh axis of size 1 is dropped, and so is one that does not divide the dimension
(e.g. a tiny model's 2 heads on tensor=4): that dimension is then replicated,
never padded. The same resolution is used for params, state and activations, so
they always agree.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

# logical axis -> mesh axes (a tuple shards over their product, in order).
RULES = (
    ("batch", ("data", "fsdp")),  # activations and data: the batch dimension
    ("embed", ("fsdp",)),  # params: model width (FSDP)
    ("mlp", ("tensor",)),  # MLP hidden units
    ("heads", ("tensor",)),  # attention heads
    ("vocab", ("tensor",)),  # word-embedding rows / logits
    ("queue", ("fsdp",)),  # feature-queue slots
    ("kv", ()),  # per-head width
    ("length", ()),  # sequence positions
    ("act_embed", ()),  # activation width (activations are batch-sharded)
    ("norm", ()),  # LayerNorm scales and biases: small, replicated
    ("layers", ()),  # the stacked layer axis of scanned blocks (model.scan_layers)
)
_RULES = dict(RULES)


def names(init, *axis_names):
    """An initializer whose parameter carries logical axis names (one per dim)."""
    return nn.with_logical_partitioning(init, tuple(axis_names))


def mesh_axes(logical, shape, mesh, rules=RULES) -> P:
    """Logical names of an array of `shape` -> a PartitionSpec on `mesh`.

    Unknown names raise; mesh axes of size 1, axes already used by an earlier
    dimension and axes whose size does not divide the dimension are left out.
    """
    table = dict(rules)
    if logical is None:
        return P()
    logical = tuple(logical)
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match shape {tuple(shape)}")
    used, out = set(), []
    for name, dim in zip(logical, shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {', '.join(table)}")
        axes = []
        size = 1
        for ax in table[name]:
            n = mesh.shape.get(ax, 1)
            if n == 1 or ax in used or dim % (size * n):
                continue
            axes.append(ax)
            size *= n
        used.update(axes)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*out)


def path_str(path) -> str:
    """A jax key path -> 'image_tower/encoder/block00/attn/qkv/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state, param_logical, mesh, rules=RULES):
    """NamedShardings for every leaf of a TrainState.

    `param_logical`: {param path: logical names}. A state leaf whose path ends with a
    param's path and has its shape (the params, `ema_params`, Adam's `mu`/`nu`) gets
    that param's sharding; queue features shard their slots over `queue`; everything
    else (step, rng, counters, scalars) is replicated.
    """

    def one(path, leaf):
        keys = path_str(path).split("/")
        shape = tuple(getattr(leaf, "shape", ()))
        if keys and keys[0] == "queues" and len(shape) >= 1:
            return NamedSharding(mesh, mesh_axes(("queue",) + (None,) * (len(shape) - 1), shape, mesh, rules))
        for i in range(len(keys)):
            logical = param_logical.get("/".join(keys[i:]))
            if logical is not None and len(logical) == len(shape):
                return NamedSharding(mesh, mesh_axes(logical, shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def param_logical_axes(boxed_params) -> dict:
    """{'a/b/kernel': ('embed', 'mlp'), ...} from params initialised with names."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]:
        if isinstance(leaf, nn.LogicallyPartitioned):
            out[path_str(path)] = tuple(leaf.names)
    return out


def unnamed_params(boxed_params) -> list[str]:
    """Paths of params created without logical names (a test keeps this empty)."""
    named = set(param_logical_axes(boxed_params))
    return [
        path_str(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed_params))[0]
        if path_str(p) not in named
    ]


# ----------------------------------------------------------------- activation constraints

_ACTIVE = contextvars.ContextVar("mmjax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules=RULES):
    """While tracing under this context, `constrain` pins activations on `mesh`.

    Outside it (pmap, single-device eval, tests of modules) `constrain` is a no-op.
    """
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, logical):
    """`with_sharding_constraint` by logical names, resolved like the params."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if mesh.devices.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_axes(logical, x.shape, mesh, rules)))


def bytes_per_device(abstract_tree, shardings) -> int:
    """Bytes one device holds for `abstract_tree` laid out with `shardings`."""
    total = 0
    for leaf, sh in zip(jax.tree_util.tree_leaves(abstract_tree), jax.tree_util.tree_leaves(shardings)):
        shard = sh.shard_shape(tuple(leaf.shape)) if hasattr(sh, "shard_shape") else leaf.shape
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


# ----------------------------------------------------------------- named initializers


def dense_init(*kernel_names, bias_names=None) -> dict:
    """`kernel_init` / `bias_init` kwargs for nn.Dense / DenseGeneral / Conv with the
    default initializers (lecun normal, zeros) and logical names; the bias takes the
    kernel's output names unless given."""
    bias_names = tuple(kernel_names[-1:]) if bias_names is None else tuple(bias_names)
    return dict(
        kernel_init=names(nn.initializers.lecun_normal(), *kernel_names),
        bias_init=names(nn.initializers.zeros_init(), *bias_names),
    )


def norm_init() -> dict:
    """`scale_init` / `bias_init` kwargs for nn.LayerNorm with logical names."""
    return dict(
        scale_init=names(nn.initializers.ones_init(), "norm"), bias_init=names(nn.initializers.zeros_init(), "norm")
    )
