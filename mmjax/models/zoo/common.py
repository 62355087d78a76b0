"""What the families share: param init (with logical axis names), and for the fusion
families (ALBEF, VLMo, BEiT-3) applying one method of their linen module and the
evaluator's view of them."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def clamp_params(params, bounds: dict):
    """`params` with each top-level scalar named in `bounds` ({name: (low, high)})
    clipped to its range; every other leaf is returned as is. Works on dicts and
    FrozenDicts alike (the tree's structure is kept), under jit and pmap."""

    def one(path, x):
        name = path[0].key if len(path) == 1 and hasattr(path[0], "key") else None
        if name in bounds:
            low, high = bounds[name]
            return jnp.clip(x, low, high).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(one, params)


def bound_grads(params, grads, bounds: dict):
    """`grads` with the gradient of each top-level scalar named in `bounds` set to 0
    where the param sits at (or past) a bound and a descent step would move it further
    out: at the low bound a positive gradient, at the high bound a negative one (the
    projected gradient of a box constraint). The projection after the update would
    undo such a step anyway; left in, the gradient of a temperature held at 0.01 (tens,
    against the rest's ~1) dominates the global norm, and `train.grad_clip` then
    scales every other gradient down by as much. A gradient pointing back into the
    range passes unchanged, so the param can still leave its bound."""

    def one(path, g, x):
        name = path[0].key if len(path) == 1 and hasattr(path[0], "key") else None
        if name not in bounds:
            return g
        low, high = bounds[name]
        out = ((x <= low) & (g > 0)) | ((x >= high) & (g < 0))
        return jnp.where(out, jnp.zeros_like(g), g)

    return jax.tree_util.tree_map_with_path(one, grads, params)


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


class Family:
    """`init_params` from dummy inputs of the family's image size and text length (and,
    for a video model, `num_frames` frames)."""

    model = None
    image_size = 224
    text_len = 77
    num_frames = 0  # > 0: the image input is a clip [B, T, H, W, 3]

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        """Params from dummy zeros; shapes are static tuples (eval_shape-friendly).

        image_shape: (B, H, W, 3), default (1, image_size, image_size, 3), or for a video
        model (B, T, H, W, 3), default (1, num_frames, image_size, image_size, 3);
        text_shape: (B, L), default (1, text_len). `boxed=True` keeps each param in its
        `nn.LogicallyPartitioned` box (its logical axis names, for sharding); the
        default returns plain arrays.
        """
        image = jnp.zeros(tuple(image_shape or self.image_shape()), jnp.float32)
        text = jnp.zeros(tuple(text_shape or (1, self.text_len)), jnp.int32)
        params = self.model.init(rng, image, text)["params"]
        return params if boxed else nn.unbox(params)

    def param_bounds(self) -> dict:
        """{top-level param name: (low, high)}: the params kept inside a range (a learned
        temperature or logit scale); none by default."""
        return {}

    def project_params(self, params):
        """Params after an optimizer update -> params inside their `param_bounds` (ALBEF's
        `temp.clamp_`, open_clip's `logit_scale.clamp_`). The step calls it after every
        update."""
        return clamp_params(params, self.param_bounds())

    def project_grads(self, params, grads):
        """Gradients -> the projected gradient of `param_bounds` (`bound_grads`): none
        pushes a param that sits at its bound further out. The step calls it before the
        optimizer (so before gradient clipping and Adam's moments)."""
        return bound_grads(params, grads, self.param_bounds())

    def image_shape(self, batch: int = 1) -> tuple:
        """The shape of an input batch: (B, S, S, 3), or (B, T, S, S, 3) for a video model."""
        frames = (self.num_frames,) if self.num_frames else ()
        return (batch,) + frames + (self.image_size, self.image_size, 3)


class FeatureFamily(Family):
    """Base of families whose `.model` has `image_features(image) -> (emb, tokens)` and
    `text_features(ids) -> (emb, tokens)`; the subclass adds `itm_scores`. `itm_pairs`
    draws the ITM hard negatives of every fusion family (ALBEF, BLIP, VLMo, BEiT-3).

    The evaluator ranks by the L2-normalised embeddings (`encode_image`/`encode_text`)
    and re-ranks with ITM on the tokens (`image_features`/`text_features`).
    """

    model = None

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
        from mmjax.objectives import same_rows, sample_hard_negatives

        rng_i2t, rng_t2i = rngs
        ids_all = gather(ids)
        same = None if text is None else same_rows(text, gather(text))
        sim_i2t = jax.lax.stop_gradient(img_emb @ gather(txt_emb).T / temp)  # [b, B]
        sim_t2i = jax.lax.stop_gradient(txt_emb @ gather(img_emb).T / temp)
        neg_txt, has_t = sample_hard_negatives(rng_i2t, sim_i2t, ids, ids_all, gather=gather, exclude_bxB=same)
        neg_img, has_i = sample_hard_negatives(rng_t2i, sim_t2i, ids, ids_all, gather=gather, exclude_bxB=same)
        b = ids.shape[0]
        labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
        weights = jnp.concatenate([jnp.ones((b,), jnp.float32), has_t.astype(jnp.float32), has_i.astype(jnp.float32)])
        return neg_txt, neg_img, labels, weights


class MomentumFamily(FeatureFamily):
    """Base of the families with an EMA teacher and feature queues (ALBEF, BLIP): their
    shared config keys, the state they add, and the projection of the temperature.

    Keys: queue_size, momentum, momentum_final (None = constant), total_steps (set by
    the loop), alpha, alpha_ramp_steps, temp_range (clamp of the learned temperature,
    default ALBEF's and BLIP's (0.001, 0.5)).
    """

    TEMP_RANGE = (0.001, 0.5)

    def _momentum_config(self, cfg, queue_size: int):
        """Reads the keys above (`queue_size`: the family's default) and checks them."""
        self.queue_size = int(cfg.get("queue_size", queue_size))
        self.momentum = float(cfg.get("momentum", 0.995))
        self.momentum_final = cfg.get("momentum_final", None)
        self.total_steps = int(cfg.get("total_steps", 0) or 0)
        self.alpha = float(cfg.get("alpha", 0.4))
        self.alpha_ramp_steps = int(cfg.get("alpha_ramp_steps", 0))
        self.temp_range = tuple(float(x) for x in (cfg.get("temp_range", None) or self.TEMP_RANGE))
        for key, value, ok, want in [
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
                raise ValueError(f"model.{key}={value!r}; expected {want}")

    def _tasks(self, cfg):
        tasks = tuple(cfg.get("tasks", None) or self.TASKS)
        bad = [t for t in tasks if t not in self.TASKS]
        if bad:
            raise ValueError(f"model.tasks {bad} unknown; valid choices: {', '.join(self.TASKS)}")
        return tasks

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


def attention_spec(model_config) -> str:
    """model.attention (default 'xla'), validated: 'xla' | 'cudnn', optionally '/N'."""
    from mmjax.models.attention import parse_attention

    spec = str(model_config.get("attention", None) or "xla")
    parse_attention(spec)
    return spec


def video_options(model_config) -> dict:
    """The video keys of a model config, validated -> ViT keyword arguments.

    model.num_frames (0 or absent: an image model; T > 0: clips of T frames, images taken
    as one-frame clips), model.temporal (video.TEMPORAL, default 'none'), model.tubelet
    (frames per token, default 1), model.temporal_kernel ('local' module, default 3),
    model.local_temporal ('local' variant, video.LOCAL_VARIANTS; the recipes set 'release', a
    config without the key reads as video.LOCAL_WHEN_UNSET, what workdirs older than it trained).
    """
    from mmjax.models.video import LOCAL_WHEN_UNSET, check_local_variant, check_temporal

    frames = int(model_config.get("num_frames", None) or 0)
    temporal = check_temporal(str(model_config.get("temporal", None) or "none"))
    tubelet = int(model_config.get("tubelet", None) or 1)
    kernel = int(model_config.get("temporal_kernel", None) or 3)
    if frames < 0 or tubelet < 1 or kernel < 1:
        raise ValueError(
            f"model.num_frames={frames}, model.tubelet={tubelet}, model.temporal_kernel={kernel}: "
            "need num_frames >= 0 and tubelet, temporal_kernel >= 1"
        )
    if frames and frames % tubelet:
        raise ValueError(f"model.num_frames={frames} is not a multiple of model.tubelet={tubelet}")
    if tubelet > 1 and temporal == "mean":
        raise ValueError("model.temporal='mean' encodes frames one by one: it takes model.tubelet=1")
    local = check_local_variant(str(model_config.get("local_temporal", None) or LOCAL_WHEN_UNSET))
    return dict(num_frames=frames, temporal=temporal, tubelet=tubelet, temporal_kernel=kernel, local_temporal=local)
