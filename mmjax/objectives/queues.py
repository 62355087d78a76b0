"""Feature queues for momentum distillation (ALBEF / BLIP).

The queues are a plain dict pytree carried in the train state:

  img: [S, D] float32   teacher image features of past batches
  txt: [S, D] float32   teacher text features of past batches
  ids: [S] int32        pair / image id of each slot; -1 = empty, never written
  ptr: [] int32         next write position

Shape letters: S queue size, B (global) batch, D embed dim.

The queues hold global-batch rows and are replicated on every device: enqueue
the gathered (global) teacher features once per step, after the loss of that
step has been computed (ALBEF's order: the current batch is scored against the
queue of previous batches, then pushed).
"""

import chex
import jax.numpy as jnp


def init_queues(size: int, dim: int) -> dict:
    """Empty queues: zero features, ids -1 (empty), pointer 0."""
    if size <= 0 or dim <= 0:
        raise ValueError(f"queue size and dim must be positive, got {size}, {dim}")
    return dict(
        img=jnp.zeros((size, dim), jnp.float32),
        txt=jnp.zeros((size, dim), jnp.float32),
        ids=jnp.full((size,), -1, jnp.int32),
        ptr=jnp.zeros((), jnp.int32),
    )


def enqueue(queues, img_BxD, txt_BxD, ids_B, valid_B=None):
    """Writes the valid rows of a (global) batch into the ring buffer.

    The k-th valid row (k = 0, 1, ... in batch order) goes to slot
    (ptr + k) % S and the pointer advances by the number of valid rows. Invalid
    rows (padding of a short last batch) are not written and do not advance the
    pointer. When more than S rows are valid only the last S of them are written
    (each slot receives exactly one row, so the scatter has no duplicate
    indices and the result is deterministic).

    Args:
      queues: dict from `init_queues`.
      img_BxD, txt_BxD: [B, D] features (stored as float32).
      ids_B: [B] int ids, >= 0 for real rows.
      valid_B: optional [B] bool mask; None = all rows valid.
    Returns:
      The updated queues dict (same shapes and dtypes).
    """
    size, dim = queues["img"].shape
    chex.assert_rank([img_BxD, txt_BxD, ids_B], [2, 2, 1])
    chex.assert_equal_shape([img_BxD, txt_BxD])
    chex.assert_equal(img_BxD.shape[1], dim)
    chex.assert_equal(ids_B.shape[0], img_BxD.shape[0])
    if valid_B is None:
        valid_B = jnp.ones(ids_B.shape, bool)
    chex.assert_equal_shape([valid_B, ids_B])
    valid_B = valid_B.astype(bool)
    ptr = queues["ptr"].astype(jnp.int32)
    k_B = jnp.cumsum(valid_B.astype(jnp.int32)) - 1  # rank among valid rows
    n = jnp.sum(valid_B.astype(jnp.int32))
    write_B = valid_B & (k_B >= n - size)  # only the last S survive
    # Out-of-range index (size) for rows that are not written; mode="drop"
    # discards those updates.
    pos_B = jnp.where(write_B, (ptr + k_B) % size, size)
    return dict(
        img=queues["img"].at[pos_B].set(img_BxD.astype(jnp.float32), mode="drop"),
        txt=queues["txt"].at[pos_B].set(txt_BxD.astype(jnp.float32), mode="drop"),
        ids=queues["ids"].at[pos_B].set(ids_B.astype(jnp.int32), mode="drop"),
        ptr=(ptr + n) % size,
    )


def queue_valid(queues):
    """[S] bool: slots that hold a feature (id >= 0)."""
    return queues["ids"] >= 0
