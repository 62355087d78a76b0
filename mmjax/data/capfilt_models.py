"""CapFilt's two models on this process's devices (`mmjax data capfilt`, `mmjax.data.capfilt`).

`check_workdir(path, capability, flag)` reads a workdir's config.json and checks its
family declares `capability` ("caption" for the captioner, "itm" for the filter) without
reading params, so a wrong workdir fails in one line before any work. `Scorer` holds
both opened workdirs and scores input records in batches:

- images: decoded and prepared as the eval pipeline prepares them (TensorFlow's decode,
  antialiased resize to each model's data.image_size, the dataset mean/std; a video
  model gets the image as a still clip of data.num_frames frames);
- captioner: `family.caption(params, pixels, max_len=its data.text_len, top_p=,
  temperature=, rng=row keys)`, row key = fold_in(PRNGKey(seed), input record id), so a
  record's synthetic caption depends on (seed, id) alone, not on the batch it lands in;
  its tokens are decoded with the captioner's tokenizer;
- filter: both captions tokenized with the filter's tokenizer (its data.text_len), then
  match probability = sigmoid(`itm_scores(params, image_features(...)[1],
  text_features(...)[1], ids)`), rounded to PROB_DECIMALS decimals.

Model calls run MICRO rows per device over a data mesh of the local devices (params
replicated), each row at a slot fixed by its id within its unit (`Scorer`): a row's
results are the same bits whatever --batch-size, resume point or process count (on the
same kind of device; XLA's GPU autotuning may need --xla_gpu_deterministic_ops for
that). --batch-size sets how many rows the host prepares per step, overlapping the
devices' work on the previous step.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import workdir as workdir_lib
from mmjax.errors import ConfigError

PROB_DECIMALS = 6  # probabilities are stored (and compared with the threshold) at this precision
MICRO = 32  # rows per device per model call: fixed, so a row's floats never depend on the batch size
USES = {"caption": "writes the synthetic captions", "itm": "scores image-text matches"}


def check_workdir(path: str, capability: str, flag: str):
    """-> (the workdir's config (config.json), its newest usable checkpoint step), after
    checking that its family declares `capability`; one-line errors (FileNotFoundError,
    ConfigError) naming `flag` otherwise."""
    from mmjax.models import zoo

    if not os.path.isdir(str(path)):
        raise FileNotFoundError(f"{flag} {path}: no such workdir")
    config = workdir_lib.load_config_json(str(path))
    cls = zoo.family_class(config.model)
    if capability not in cls.capabilities:
        able = sorted(n for n, c in zoo.FAMILIES.items() if capability in c.capabilities)
        raise ConfigError(
            f"{flag} {path}: family {config.model.family!r} has no {capability!r} capability (the {flag[2:]} "
            f"{USES[capability]}); families with it: {', '.join(able)}"
        )
    return config, workdir_lib.usable_step(str(path))  # FileNotFoundError "no checkpoint in ..." before any work


def _caption(family, max_len, params, pixels, ids_B, seed, top_p, temperature):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(ids_B)
    return family.caption(params, pixels, max_len=max_len, top_p=top_p, temperature=temperature, rng=keys)


def _match(family, params, pixels, web_BxL, syn_BxL):
    """-> match probabilities [2, B] float32 of (each image, its web caption), (…, its synthetic one)."""
    _, tokens = family.image_features(params, pixels)
    probs = []
    for ids in (web_BxL, syn_BxL):
        _, stream = family.text_features(params, ids)
        probs.append(jax.nn.sigmoid(family.itm_scores(params, tokens, stream, ids).astype(jnp.float32)))
    return jnp.stack(probs)


def _prepare(blob: bytes, sizes: set) -> dict | None:
    """Encoded image -> {size: float32 [S, S, 3]} as the eval pipeline prepares it; None
    when it does not decode."""
    from mmjax.data import decode, require_tf

    tf = require_tf()
    try:
        img = decode.decode_image({"image": tf.constant(blob)})
        return {s: decode.normalize(tf.image.resize(img, [s, s], antialias=True)).numpy() for s in sizes}
    except (tf.errors.OpError, ValueError):
        return None


class Scorer:
    """Captioner + filter at checkpoint `steps` (a pair), opened and placed on `devices`
    (default: the local ones; module docstring). `score(start, rows)` takes one unit's
    readable records [(id, image bytes, web caption)] (the unit's ids start at `start`)
    and returns, in order, one dict per row: {"id", "web_prob", "synthetic",
    "synthetic_prob"}, or {"id", "skip": "undecodable"} for an image that does not decode.

    Every model call takes `call_rows` = MICRO x devices rows, MICRO per device; the row
    of id i sits in slot (i - start) mod call_rows of call (i - start) // call_rows (empty
    slots: zeros, results dropped), so its floats come from the same kernels at the same
    position whatever the batch size, the resume point or the process count. A host step
    prepares `batch_size` rows (rounded up to whole calls) while the devices run the last."""

    def __init__(
        self,
        captioner: str,
        filt: str,
        *,
        steps,
        weights="student",
        top_p=0.9,
        temperature=1.0,
        seed=0,
        batch_size=64,
        devices=None,
    ):
        from mmjax.parallel import mesh as mesh_lib

        self.cap = workdir_lib.open_workdir(captioner, weights=weights, step=steps[0])
        self.filt = workdir_lib.open_workdir(filt, weights=weights, step=steps[1])
        self.mesh = mesh_lib.make_mesh({"data": -1}, list(devices or jax.local_devices()))
        self.call_rows = MICRO * self.mesh.devices.size
        self.calls_per_step = max(1, -(-int(batch_size) // self.call_rows))
        self._rows, rep = mesh_lib.batch_sharding(self.mesh), mesh_lib.replicated(self.mesh)
        self.cap_params = jax.device_put(self.cap.params, rep)
        self.filt_params = jax.device_put(self.filt.params, rep)
        self.size = {m: int(m.config.data.image_size) for m in (self.cap, self.filt)}
        self.frames = {m: int(m.config.data.get("num_frames", 0) or 0) for m in (self.cap, self.filt)}
        self.text_len = {m: int(m.config.data.text_len) for m in (self.cap, self.filt)}
        self.sampling = (np.uint32(seed), np.float32(top_p), np.float32(temperature))
        self._caption = jax.jit(partial(_caption, self.cap.family, self.text_len[self.cap]))
        self._match = jax.jit(partial(_match, self.filt.family))

    def steps(self) -> dict:
        """{"captioner": step, "filter": step} of the checkpoints read."""
        return {"captioner": self.cap.step, "filter": self.filt.step}

    def _pixels(self, model, call: dict) -> jax.Array:
        x = call["pixels"][self.size[model]]
        if self.frames[model]:  # a video model takes the image as a still clip
            x = np.repeat(x[:, None], self.frames[model], axis=1)
        return jax.device_put(x, self._rows)

    def _host(self, start: int, c: int, rows: list) -> dict:
        """Call c's rows -> {"slots": [(slot, row)] of the rows that decode, "pixels": {size:
        float32 [call_rows, S, S, 3]}, "ids": uint32 [call_rows]} (empty slots: zeros)."""
        n, sizes = self.call_rows, set(self.size.values())
        call = {"slots": [], "pixels": {s: np.zeros((n, s, s, 3), np.float32) for s in sizes}}
        call["ids"] = np.arange(start + c * n, start + (c + 1) * n, dtype=np.uint32)
        for row in rows:
            prepared = _prepare(row[1], sizes)
            if prepared is not None:
                slot = (row[0] - start) % n
                for s in sizes:
                    call["pixels"][s][slot] = prepared[s]
                call["slots"].append((slot, row))
        return call

    def _device(self, call: dict) -> list[dict]:
        """Synthetic captions and both match probabilities of one call's rows."""
        put = lambda a: jax.device_put(a, self._rows)
        tokens = np.asarray(
            self._caption(self.cap_params, self._pixels(self.cap, call), put(call["ids"]), *self.sampling)
        )
        web, synthetic = [""] * self.call_rows, [""] * self.call_rows
        for slot, row in call["slots"]:
            web[slot], synthetic[slot] = row[2], self.cap.tokenizer.decode(tokens[slot]).strip()
        L, tok = self.text_len[self.filt], self.filt.tokenizer
        probs = np.asarray(
            self._match(
                self.filt_params, self._pixels(self.filt, call), put(tok.encode(web, L)), put(tok.encode(synthetic, L))
            )
        )
        rnd = lambda p: round(float(p), PROB_DECIMALS)
        return [
            {
                "id": int(row[0]),
                "web_prob": rnd(probs[0, j]),
                "synthetic": synthetic[j],
                "synthetic_prob": rnd(probs[1, j]),
            }
            for j, row in call["slots"]
        ]

    def score(self, start: int, rows: list) -> list[dict]:
        """One unit's rows -> one result dict per row, in order (class docstring)."""
        calls: dict[int, list] = {}
        for row in rows:
            calls.setdefault((row[0] - start) // self.call_rows, []).append(row)
        order, k = sorted(calls), self.calls_per_step
        steps = [order[i : i + k] for i in range(0, len(order), k)]
        host = lambda step: [self._host(start, c, calls[c]) for c in step]
        done: dict[int, dict] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="mmjax-capfilt") as pool:
            nxt = pool.submit(host, steps[0]) if steps else None
            for i in range(len(steps)):
                prepared = nxt.result()
                nxt = pool.submit(host, steps[i + 1]) if i + 1 < len(steps) else None
                done |= {r["id"]: r for call in prepared for r in self._device(call)}
        return [done.get(int(row[0]), {"id": int(row[0]), "skip": "undecodable"}) for row in rows]
