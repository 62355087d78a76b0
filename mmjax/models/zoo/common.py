"""What the families share: param init (with logical axis names), and for the fusion
families (ALBEF, VLMo, BEiT-3) applying one method of their linen module and the
evaluator's view of them."""

import dataclasses
import math

import jax
import jax.numpy as jnp

from mmjax.models.zoo.contract import Family, bound_grads, clamp_params  # noqa: F401 (re-exported)
from mmjax.models.zoo.schema import TowerConfig, key, video_options  # noqa: F401 (re-exported)


def logit_scale_bounds(max_logit_scale) -> tuple:
    """open_clip's projection of a log logit scale t: t in [0, ln(max_logit_scale)]
    (`logit_scale.clamp_(0, math.log(100))` after every step); None = no upper bound."""
    if max_logit_scale is None:
        return (0.0, math.inf)
    if not max_logit_scale >= 1:
        raise ValueError(f"model.max_logit_scale={max_logit_scale!r}; expected a number >= 1 (or None: no bound)")
    return (0.0, math.log(max_logit_scale))


def float32_copy(tree):
    """A float32 copy of every floating leaf (integer leaves copied as they are)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.array(x, dtype=jnp.float32) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else jnp.array(x),
        tree,
    )


class FeatureFamily(Family):
    """Base of families whose `.model` has `image_features(image) -> (emb, tokens)` and
    `text_features(ids) -> (emb, tokens)`; the subclass adds `itm_scores` and
    `image_flops` (capabilities 'encode' and 'itm'). `itm_pairs`
    draws the ITM hard negatives of every fusion family (ALBEF, BLIP, VLMo, BEiT-3).

    The evaluator ranks by the L2-normalised embeddings (`encode_image`/`encode_text`)
    and re-ranks with ITM on the tokens (`image_features`/`text_features`).
    """

    capabilities = frozenset({"encode", "itm"})

    def _apply(self, params, method, *args):
        return self.model.apply({"params": params}, *args, method=method)

    def encode_image(self, params, image):
        """[B, H, W, 3] -> [B, E] float32, L2-normalised."""
        return self._apply(params, self.model.image_features, image)[0]

    def encode_text(self, params, text):
        """[B, L] int32 -> [B, E] float32, L2-normalised."""
        return self._apply(params, self.model.text_features, text)[0]

    def image_features(self, params, image):
        """-> (emb [B, E], image tokens the family's ITM consumes)."""
        return self._apply(params, self.model.image_features, image)

    def text_features(self, params, text):
        """-> (emb [B, E], text tokens the family's ITM consumes)."""
        return self._apply(params, self.model.text_features, text)

    def itm_pairs(self, rngs, img_emb, txt_emb, ids, temp, gather, text=None):
        """The 3b pairs ITM scores, ALBEF's way: (image, its text), (image, a hard
        negative text), (a hard negative image, text), the negatives drawn from the
        softmax of the similarities over the global batch; `rngs` = (key for the
        texts, key for the images). Never a negative: a pair with the same id, and,
        with `text` ([b, L] token ids), a row whose caption is token for token the
        anchor's (image -> text: the anchor image's own caption text under another id;
        text -> image: an image captioned with the anchor text).

        -> (neg_txt [b], neg_img [b]: rows of the gathered batch; labels [3b] int32;
        weights [3b] float32, 0 where a row had no negative to draw)."""
        sim_i2t = jax.lax.stop_gradient(img_emb @ gather(txt_emb).T / temp)  # [b, B]
        sim_t2i = jax.lax.stop_gradient(txt_emb @ gather(img_emb).T / temp)
        return hard_negative_pairs(rngs, sim_i2t, sim_t2i, ids, gather, text=text)


def hard_negative_pairs(rngs, sim_i2t_bxB, sim_t2i_bxB, ids, gather, text=None):
    """`FeatureFamily.itm_pairs` from similarities the family computed ([b, B] logits of
    each local image against every global text, and of each local text against every
    global image; BLIP-2: the max over query embeddings) -> (neg_txt, neg_img, labels,
    weights) as itm_pairs returns them."""
    from mmjax.objectives import same_rows, sample_hard_negatives

    rng_i2t, rng_t2i = rngs
    ids_all = gather(ids)
    same = None if text is None else same_rows(text, gather(text))
    sim_i2t_bxB, sim_t2i_bxB = jax.lax.stop_gradient(sim_i2t_bxB), jax.lax.stop_gradient(sim_t2i_bxB)
    neg_txt, has_t = sample_hard_negatives(rng_i2t, sim_i2t_bxB, ids, ids_all, gather=gather, exclude_bxB=same)
    neg_img, has_i = sample_hard_negatives(rng_t2i, sim_t2i_bxB, ids, ids_all, gather=gather, exclude_bxB=same)
    b = ids.shape[0]
    labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
    weights = jnp.concatenate([jnp.ones((b,), jnp.float32), has_t.astype(jnp.float32), has_i.astype(jnp.float32)])
    return neg_txt, neg_img, labels, weights


@dataclasses.dataclass(frozen=True, kw_only=True)
class MomentumConfig(TowerConfig):
    """The keys of the families with an EMA teacher and feature queues (ALBEF, BLIP):
    queue_size, momentum, momentum_final (None = constant), alpha, alpha_ramp_steps,
    temp_range (clamp of the learned temperature, ALBEF's and BLIP's (0.001, 0.5)),
    tasks (() = all of the family's), scan_layers (nn.scan over the image tower's
    blocks; the BERT-style text / fusion encoder is not scanned)."""

    scan_layers: bool = key(False)
    queue_size: int = key(65536)
    momentum: float = key(0.995)
    momentum_final: float = key(None, none=True)
    alpha: float = key(0.4)
    alpha_ramp_steps: int = key(0)
    temp_range: tuple = key((0.001, 0.5))
    tasks: tuple = key(())


class MomentumFamily(FeatureFamily):
    """Base of the families with an EMA teacher and feature queues (ALBEF, BLIP): the
    state they add and the projection of the temperature (keys: MomentumConfig;
    model.total_steps, derived from train.steps, ends a momentum ramp)."""

    capabilities = FeatureFamily.capabilities | {"teacher"}

    def _momentum_config(self, c):
        """Reads MomentumConfig's keys from the parsed config `c` and checks them."""
        self.queue_size, self.momentum, self.momentum_final = c.queue_size, c.momentum, c.momentum_final
        self.total_steps, self.alpha, self.alpha_ramp_steps = c.total_steps, c.alpha, c.alpha_ramp_steps
        self.temp_range = tuple(float(x) for x in c.temp_range)
        for name, value, ok, want in [
            ("queue_size", self.queue_size, self.queue_size > 0, "a positive integer"),
            ("momentum", self.momentum, 0 <= self.momentum <= 1, "in [0, 1]"),
            ("alpha", self.alpha, 0 <= self.alpha <= 1, "in [0, 1]"),
            (
                "temp_range",
                self.temp_range,
                len(self.temp_range) == 2 and 0 < self.temp_range[0] <= self.temp_range[1],
                "(low, high) with 0 < low <= high",
            ),
        ]:
            if not ok:
                raise ValueError(f"model.{name}={value!r}; expected {want}")
        self.tasks = c.tasks or self.TASKS
        bad = [t for t in self.tasks if t not in self.TASKS]
        if bad:
            raise ValueError(f"model.tasks {bad} unknown; valid choices: {', '.join(self.TASKS)}")

    def init_extra(self, params):
        """The teacher starts as a float32 copy of the student, whatever
        `model.param_dtype` (a bf16 teacher loses every increment below half a bf16 ulp:
        at m = 0.995 it stops following a slowly moving student); the queues start empty."""
        from mmjax.objectives import init_queues

        return dict(ema_params=float32_copy(params), queues=init_queues(self.queue_size, self.embed_dim))

    def teacher_update(self, ema_params, params, step):
        """EMA in the teacher's dtype (float32, from `init_extra`), whatever the params'."""
        from mmjax.objectives import ema_update, momentum_at

        m = momentum_at(step, self.momentum, self.momentum_final, self.total_steps or None)
        return ema_update(ema_params, params, m)

    def temp(self, params):
        """The learned temperature as stored: `project_params` keeps it in `temp_range`
        after every update (a clip here would give it zero gradient beyond the bound)."""
        return params["temp"]

    def param_bounds(self) -> dict:
        """ALBEF's / BLIP's `temp.clamp_(0.001, 0.5)` on the parameter (model.temp_range)."""
        return {"temp": self.temp_range}
