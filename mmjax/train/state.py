"""The one record of everything that changes during training."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """`state, batch -> state, metrics` carries exactly this.

    step: scalar int32, optimizer steps taken.
    params: the student parameters (fp32).
    opt_state: optax state.
    ema_params: the momentum teacher (ALBEF-style families), or None.
    queues: feature queues and write pointer, or None.
    rng: PRNG key for dropout, masking, negatives; split inside the step.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    queues: Any
    rng: jax.Array
