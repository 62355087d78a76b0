"""The Python API: a trained (or converted) workdir as a model object.

    import mmjax

    m = mmjax.load("workdirs/demo", weights="ema" | "student", step=None)
    pixels = m.preprocess(images)      # uint8 [N, H, W, 3] or image paths -> float32 [N, S, S, 3]
    img = m.encode_image(images)       # [N, E] float32, unit rows (uint8 images, paths or pixels)
    txt = m.encode_text(["a red circle left of a blue square"])   # [M, E]
    probs = m.zero_shot(images, ["red circle", "blue square"], templates=None)   # [N, C]
    rows = m.generate(["What colour is the circle?"], images=["a.png"])   # LMs and LLM connectors

`m.family`, `m.model` (its linen module), `m.params` (host numpy), `m.config`,
`m.tokenizer` and `m.step` are the workdir's (`mmjax.workdir.open_workdir`).
Images are prepared exactly as the eval pipeline prepares them (TensorFlow's
antialiased resize to data.image_size, then the dataset mean/std), so this needs the
`data` extra; the embeddings equal the family's own `encode_image` / `encode_text`
on those pixels and on the tokenizer's ids.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mmjax import workdir as workdir_lib

ZERO_SHOT_SCALE = 100.0  # CLIP's zero-shot logit scale: softmax(100 * cosine)


def load(workdir: str, weights: str = "student", step: int | None = None) -> Model:
    """The model of `workdir`'s newest usable checkpoint (or `step`): the student params
    ('student') or the EMA teacher ('ema', ALBEF-style families)."""
    return Model(workdir_lib.open_workdir(workdir, weights=weights, step=step))


class Model:
    """A workdir's model, params, preprocessing and tokenizer (see the module docstring)."""

    def __init__(self, opened: workdir_lib.Workdir, batch_size: int = 32):
        self.workdir = opened
        self.config, self.params, self.step, self.weights = opened.config, opened.params, opened.step, opened.weights
        self.family = opened.family
        self.image_size = int(self.config.data.image_size)
        self.text_len = int(self.config.data.text_len)
        self.num_frames = int(self.config.data.get("num_frames", 0) or 0)
        self.batch_size = int(batch_size)
        self._device_params = None
        self._jitted = {}

    def __repr__(self):
        return (
            f"mmjax.Model({self.config.model.family!r}, workdir={self.workdir.path!r}, step={self.step}, "
            f"weights={self.weights!r})"
        )

    @property
    def model(self):
        """The family's linen module (`model.apply({'params': m.params}, ...)`)."""
        return self.family.model

    @property
    def tokenizer(self):
        return self.workdir.tokenizer

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images) -> np.ndarray:
        """uint8 images [N, H, W, 3] (or one [H, W, 3]), or image file paths ->
        float32 [N, S, S, 3]: resized to data.image_size with antialiasing and
        normalised with the dataset mean/std, as the eval pipeline does. A path that
        does not decode is a ValueError naming it."""
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
            return self._load_paths([str(p) for p in images])
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(
                f"images: expected uint8 [N, H, W, 3] (or [H, W, 3]) or image paths, got {arr.dtype} {arr.shape}"
            )
        from mmjax.data import decode, require_tf

        tf = require_tf()
        resized = tf.image.resize(tf.constant(arr), [self.image_size, self.image_size], antialias=True)
        return decode.normalize(resized).numpy().astype(np.float32)

    def _load_paths(self, paths: list[str]) -> np.ndarray:
        from mmjax.data import images as images_lib

        pixels, ok = images_lib.load_images(self.config.data, paths)
        bad = [p for p in paths if p not in set(ok)]
        if bad:
            raise ValueError(f"images: {len(bad)} of {len(paths)} files do not decode as images, e.g. {bad[0]!r}")
        return pixels

    def _pixels(self, images) -> np.ndarray:
        """Prepared pixels [N, S, S, 3] (or clips [N, T, S, S, 3] for a video model)."""
        arr = None if isinstance(images, (str, os.PathLike, list, tuple)) else np.asarray(images)
        if arr is not None and np.issubdtype(arr.dtype, np.floating):
            pixels = arr.astype(np.float32)  # already prepared
        else:
            pixels = self.preprocess(images)
        if self.num_frames and pixels.ndim == 4:  # a video model takes an image as a still clip
            pixels = np.repeat(pixels[:, None], self.num_frames, axis=1)
        return pixels

    # ------------------------------------------------------------------ encoders
    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        """The family's encode_image / encode_text ('image' / 'text') of `x` [N, ...],
        jitted once, over batches of at most batch_size rows -> float32 [N, E]."""
        if tower not in self._jitted:
            self._check_encoders()
            self._jitted[tower] = jax.jit(self.family.encode_image if tower == "image" else self.family.encode_text)
            if self._device_params is None:
                self._device_params = jax.device_put(self.params)
        fn, out = self._jitted[tower], []
        for i in range(0, len(x), self.batch_size):
            out.append(np.asarray(fn(self._device_params, x[i : i + self.batch_size]), np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _check_encoders(self):
        if not self.family.can("encode"):
            from mmjax.models import zoo

            names = sorted(n for n, cls in zoo.FAMILIES.items() if "encode" in cls.capabilities)
            raise ValueError(
                f"family {self.config.model.family!r} has no image/text encoders (capability 'encode') for "
                f"encode_image / encode_text / zero_shot; families with them: {', '.join(names)}"
            )

    def encode_image(self, images) -> np.ndarray:
        """L2-normalised image embeddings [N, E] float32 of uint8 images, image paths,
        or float32 pixels already prepared (`preprocess`)."""
        return self._run("image", self._pixels(images))

    def encode_text(self, texts) -> np.ndarray:
        """L2-normalised text embeddings [M, E] float32 of a list of strings (lower-cased,
        tokenized and cut to data.text_len as the training captions were)."""
        if isinstance(texts, str):
            texts = [texts]
        return self._run("text", self.tokenizer.encode(list(texts), self.text_len))

    def zero_shot(self, images, class_names, templates=None, *, scale: float = ZERO_SHOT_SCALE) -> np.ndarray:
        """Class probabilities [N, C]: softmax over classes of `scale` x the cosine of each
        image with each class's prompt embedding (the mean of its normalised prompt
        embeddings over `templates`, normalised: `mmjax classify`'s recipe). templates:
        None = the workdir's eval.zero_shot.templates or its dataset's built-in ones;
        each must hold one '{}' and fit data.text_len."""
        from mmjax.eval import retrieval
        from mmjax.eval import zero_shot as zs

        names = zs.clean_class_names(class_names)
        if templates is None or (not isinstance(templates, str) and len(templates) == 0):
            templates = (self.config.get("eval", {}).get("zero_shot", {}) or {}).get("templates")
        templates = zs.resolve_templates(templates, self.config.data.get("name"), key="templates")
        ids = zs.prompt_ids(self.tokenizer, templates, names, self.text_len)
        classes = zs.class_embeddings(lambda t: self._run("text", t), ids)
        logits = float(scale) * retrieval.similarity(self.encode_image(images), classes)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)

    def generate(self, prompts, images=None, **kw) -> list[dict]:
        """Continues text prompts (a language model) or answers them about images (an
        LLM connector: one image per prompt, uint8 arrays or paths) -> one dict per
        prompt {'prompt', 'text', 'ids'}; keywords as `mmjax generate`'s: max_new_tokens,
        stops, method ('greedy' | 'sample' | 'beam'), temperature, top_p, seed, beams,
        length_penalty (mmjax.eval.generation.Generator)."""
        from mmjax.eval.generation import Generator

        if isinstance(prompts, str):
            prompts = [prompts]
        pixels = None if images is None else self.preprocess(images)
        if "method" not in kw:
            kw["method"] = "greedy"
        return Generator(self.family, self.params, self.tokenizer, self.config).texts(list(prompts), pixels, **kw)
