"""One train step for every family: `state, batch -> state, metrics`.

The family supplies the objective; this file supplies gradients, gradient
accumulation, the optimizer update, and the jit with shardings. No config is
captured inside the compiled function beyond the static choices passed here.

Gradient accumulation is GradCache-style for contrastive families: a naive
per-micro-batch loss would only see the micro-batch's negatives and change the
objective. Instead every micro-batch is embedded without gradients, the loss and
its gradient with respect to the embeddings are taken over the full batch, and
each micro-batch is then back-propagated through its towers with its slice of
those embedding gradients. The result equals the full-batch gradient.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mmjax.parallel import sharding as sharding_lib
from mmjax.parallel.collective import Collective, identity
from mmjax.train.state import TrainState


def _split_micro(tree, accum: int):
    """[B, ...] -> [accum, B // accum, ...], micro-batch j = rows j, j+accum, ...

    Rows are interleaved (not contiguous blocks) so that with the batch sharded
    over devices every micro-batch keeps rows on every device.
    """

    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, tree)


def _merge_micro(tree):
    """Inverse of `_split_micro`: [accum, b, ...] -> [accum * b, ...]."""

    def merge(x):
        y = jnp.swapaxes(x, 0, 1)
        return y.reshape(y.shape[0] * y.shape[1], *y.shape[2:])

    return jax.tree_util.tree_map(merge, tree)


def loss_and_grads(
    family,
    params,
    batch,
    rng,
    *,
    accum_steps: int = 1,
    gather: Callable = identity,
    teacher=None,
    queues=None,
    step=None,
):
    """Returns `(loss, metrics, updates), grads` over the whole batch.

    `updates` are the family's non-gradient outputs (e.g. new feature queues).
    """
    if accum_steps == 1:

        def objective(p):
            loss, metrics, updates = family.objective(
                p, batch, rng, teacher=teacher, queues=queues, step=step, gather=gather
            )
            return loss, (metrics, updates)

        (loss, (metrics, updates)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return (loss, metrics, updates), grads

    if not family.can("accumulate"):
        raise ValueError(
            f"train.accum_steps={accum_steps}: gradient accumulation is GradCache-exact only for "
            f"contrastive-only families (clip); {type(family).__name__} has fusion losses. "
            "Set train.accum_steps=1 and lower train.batch_size, or use more devices."
        )

    micro = _split_micro(batch, accum_steps)
    rngs = jax.random.split(rng, accum_steps)
    # Pass 1: embeddings of every micro-batch, no gradients kept.
    emb = jax.lax.map(lambda a: family.embed(params, a[0], a[1]), (micro, rngs))
    emb = _merge_micro(emb)
    # The loss over the full batch, and its gradient wrt params (temperature, bias)
    # and wrt the embeddings.
    (loss, metrics), (g_params, g_emb) = jax.value_and_grad(
        lambda p, e: family.loss_from_embeddings(p, e, gather=gather), argnums=(0, 1), has_aux=True
    )(params, emb)
    g_emb = _split_micro(g_emb, accum_steps)

    # Pass 2: back-propagate each micro-batch through its towers.
    def body(g_acc, args):
        mb, r, ge = args
        _, vjp = jax.vjp(lambda p: family.embed(p, mb, r), params)
        (g,) = vjp(ge)
        return jax.tree_util.tree_map(jnp.add, g_acc, g), None

    grads, _ = jax.lax.scan(body, g_params, (micro, rngs, g_emb))
    return (loss, metrics, {}), grads


def make_train_step(
    family,
    optimizer: optax.GradientTransformation,
    schedule=None,
    *,
    accum_steps: int = 1,
    collective: Collective = identity,
    trainable=None,
):
    """Builds the pure step function (not yet compiled).

    `collective`: `identity` for jit on a mesh (arrays are global), or
    `PmapCollective('data')` under pmap: objectives gather the global batch through
    it, and gradients, loss and metrics are averaged over devices with it.

    `trainable`: optional pytree of bools like the params (False = frozen, see
    `optim.trainable_mask`); frozen params get zero gradient and zero update, so
    weight decay does not move them either, and the optimizer state keeps its shape
    (a staged schedule can freeze different parts without re-creating it).
    After the update the family's teacher (`ema_params`) follows the new params and
    the family's `updates` (feature queues) replace the old ones. A step whose loss or
    gradients are not finite changes none of them (metrics["bad_step"] = 1; the loop
    stops after train.max_bad_steps in a row).
    """

    def freeze(tree):
        if trainable is None:
            return tree
        return jax.tree_util.tree_map(lambda t, keep: t if keep else jnp.zeros_like(t), tree, trainable)

    def train_step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        (loss, metrics, extra), grads = loss_and_grads(
            family,
            state.params,
            batch,
            step_rng,
            accum_steps=accum_steps,
            gather=collective,
            teacher=state.ema_params,
            queues=state.queues,
            step=state.step,
        )
        grads, loss, metrics = collective.average((grads, loss, dict(metrics)))
        # The projected gradient: none pushes a param held at its bound further out
        # (it would be undone by the projection below, and would swell the global
        # norm that train.grad_clip divides every gradient by).
        grads = freeze(family.project_grads(state.params, grads))
        # optax's own norm, so XLA computes it once for train.grad_clip and the metric.
        grad_norm = optax.global_norm(grads)
        queues = extra.get("queues", state.queues)
        # A non-finite loss or gradient leaves params, optimizer, teacher and queues as
        # they were; step and rng advance, the loop counts the skip. The gradients'
        # global norm is non-finite when any gradient is and when any squares to inf (a
        # finite 1e20 would put inf in Adam's second moment); from finite gradients with
        # finite squares AdamW (eps > 0, a finite lr: config.validate) makes a finite
        # state. The flag is known before the update, so the select below fuses into the
        # update's own loops: deciding on the new params and optimizer state instead
        # read the whole state twice more, and made XLA's compile of the step 5x (demo) to
        # 35x (ViT-S/16) slower. Gradients and loss are averaged over devices first: every
        # device agrees.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(queues)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        # Constrained params (a learned temperature or logit scale) are projected back
        # into their range after the update, as ALBEF/BLIP (`temp.clamp_`) and open_clip
        # (`logit_scale.clamp_`) do: clamping only the forward value would leave a
        # parameter past its bound with zero gradient for ever.
        params = family.project_params(optax.apply_updates(state.params, freeze(updates)))
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = family.teacher_update(ema_params, params, state.step)
        keep = lambda new, old: jax.tree_util.tree_map(lambda x, y: jnp.where(ok, x, y), new, old)
        params, opt_state, ema_params, queues = keep(
            (params, opt_state, ema_params, queues), (state.params, state.opt_state, state.ema_params, state.queues)
        )
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["bad_step"] = 1.0 - ok.astype(jnp.float32)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=rng, ema_params=ema_params, queues=queues
        )
        return new_state, metrics

    return train_step


def all_finite(tree) -> jax.Array:
    """bool []: every float of `tree` is finite (ints and None count as finite)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def init_state(family, optimizer, rng, image_shape, text_shape) -> TrainState:
    """The initial state; call under `jax.jit(..., out_shardings=...)` so it is born sharded
    (`state_plan` gives the function and the shardings)."""
    init_rng, state_rng = jax.random.split(rng)
    params = family.init_params(init_rng, image_shape, text_shape)
    extra = family.init_extra(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=extra.get("ema_params"),
        queues=extra.get("queues"),
        rng=state_rng,
    )


def state_plan(family, optimizer, mesh, image_shape, text_shape):
    """-> (init, abstract_state, state_shardings) for `mesh`.

    `init(rng)` builds the state; `jax.jit(init, out_shardings=state_shardings)` creates
    it already sharded (no full copy on one device). Shardings come from the params'
    logical axis names through `sharding.RULES`.
    """
    init = lambda rng: init_state(family, optimizer, rng, image_shape, text_shape)
    key = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(init, key)
    boxed = jax.eval_shape(lambda r: family.init_params(r, image_shape, text_shape, boxed=True), key)
    logical = sharding_lib.param_logical_axes(boxed)
    return init, abstract, sharding_lib.state_shardings(abstract, logical, mesh)


def compile_step(train_step, state_sharding, batch_sharding, metrics_sharding, mesh=None):
    """jit with shardings and the state donated (its buffers are reused in place).

    With `mesh`, activations named in the models (`sharding.constrain`) are pinned
    to it while the step is traced.
    """

    def traced(state, batch):
        if mesh is None:
            return train_step(state, batch)
        with sharding_lib.activation_sharding(mesh):
            return train_step(state, batch)

    return jax.jit(
        traced,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metrics_sharding),
        donate_argnums=(0,),
    )


def compile_pmap_step(train_step):
    """The same step under `jax.pmap(axis_name='data')` (build it with
    `collective=PmapCollective('data')`); state in `mesh.to_pmap` layout."""
    return jax.pmap(train_step, axis_name="data", donate_argnums=(0,))
