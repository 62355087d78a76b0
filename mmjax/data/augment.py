"""Per-record tf.data maps: decode, crop/resize/flip (training) or resize (eval),
normalise, cut the audio window, and draw a record's hard-negative captions. Both maps
are stateless: their randomness derives from (seed, stream position), so a resumed
stream draws what an uninterrupted one would.

With data.modalities holding depth, the depth map takes the image's own crop and flip
(stacked as a 4th channel before them, split after), so the two stay aligned; audio
is cut to data.audio.clip_seconds (training: a random window, eval: the centre one)
and zero-padded, with `audio_len` the valid samples.
"""

from __future__ import annotations

from mmjax.data import modalities, require_tf, shapes_gen, video_io
from mmjax.data.decode import decode_all, normalize, normalize_depth, num_frames
from mmjax.data.schema import option

MAX_NEGATIVES = shapes_gen.MAX_NEGATIVES


def pick_negatives(hn, k: int, seed):
    """k of a record's hard-negative captions, from a random start, cycling when it
    has fewer than k (so every image gets exactly k): [n] str -> ([k] str, [k] bool).
    The mask is True for the first min(n, k) picks, which are distinct; False marks a
    repeat of an earlier pick (n < k) or, for a record with none, an empty padding text."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    n = tf.shape(hn)[0]
    start = tf.random.stateless_uniform([], seed=seed, maxval=tf.maximum(n, 1), dtype=tf.int32)
    idx = tf.where(n > 0, (start + tf.range(k)) % tf.maximum(n, 1), n)  # n: the padding text
    return tf.gather(tf.concat([hn, [""]], 0), idx), tf.range(k) < n


def audio_window(wave, n_out: int, start):
    """float32 [n, C] -> ([n_out, C] from sample `start`, zero-padded; int32 valid samples)."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    clip = wave[start : start + n_out]
    length = tf.shape(clip)[0]
    clip = tf.pad(clip, [[0, n_out - length], [0, 0]])
    clip.set_shape([n_out, wave.shape[-1]])
    return clip, tf.cast(length, tf.int32)


def _crop_flip(data_config):
    """fn(x [.., H, W, K], t, seeds) -> float32 [.., size, size, K]: the random-resized
    crop and the flip of the training images (one for all frames of a clip)."""
    tf = require_tf()
    size = int(option(data_config, "image_size"))
    scale = tuple(float(x) for x in option(data_config, "augment.crop_scale"))
    ratio = tuple(float(x) for x in option(data_config, "augment.aspect"))
    flip = bool(option(data_config, "augment.flip"))
    crop_is_identity = scale == (1.0, 1.0) and ratio == (1.0, 1.0)

    def fn(img, t, s):
        hw = img.shape[-3:-1]
        if crop_is_identity and hw == (size, size):
            img = tf.cast(img, tf.float32)  # nothing to crop or resize
        else:
            begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(img)[-3:],
                bounding_boxes=tf.zeros([1, 0, 4]),
                seed=s[0],
                min_object_covered=0.0,
                aspect_ratio_range=ratio,
                area_range=scale,
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            if t:
                img = tf.slice(img, tf.concat([[0], begin], 0), tf.concat([[-1], crop], 0))
            else:
                img = tf.slice(img, begin, crop)
            img = tf.image.resize(img, [size, size], antialias=True)
        if flip and t:  # one coin for the whole clip
            coin = tf.random.stateless_uniform([], seed=s[1]) < 0.5
            img = tf.cond(coin, lambda: tf.reverse(img, [-2]), lambda: img)
        elif flip:
            img = tf.image.stateless_random_flip_left_right(img, s[1])
        return img

    return fn


def _aligned(img, depth):
    """image [H, W, 3] and depth [h, w, 1] -> float32 [H, W, 4] (depth resized to H x W if it differs)."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    hw = tf.shape(img)[:2]
    same = tf.reduce_all(tf.shape(depth)[:2] == hw)
    depth = tf.cond(same, lambda: depth, lambda: tf.image.resize(depth, hw))
    return tf.concat([tf.cast(img, tf.float32), depth], -1)


def _extras(out, rec, hard_negatives: int, seed):
    """label, and the record's hard negatives (k drawn in training; all, padded, in eval)."""
    tf = require_tf()
    if "label" in rec:
        out["label"] = tf.cast(rec["label"], tf.int32)
    if hard_negatives:
        out["hard_negatives"], out["hard_negatives_valid"] = pick_negatives(rec["hard_negatives"], hard_negatives, seed)
    elif hard_negatives is None and "hard_negatives" in rec:  # eval: every one, padded to MAX_NEGATIVES
        hn = rec["hard_negatives"][:MAX_NEGATIVES]
        n = tf.shape(hn)[0]
        out["hard_negatives"] = tf.concat([hn, tf.fill([MAX_NEGATIVES - n], "")], 0)
        out["hard_negatives_valid"] = tf.range(MAX_NEGATIVES) < n
    return out


def train_map(data_config, seed, hard_negatives: int = 0):
    tf = require_tf()
    t = num_frames(data_config)
    sampling = video_io.check_sampling(option(data_config, "frame_sampling"))
    media = modalities.parse(data_config)
    crop_flip = _crop_flip(data_config)

    def fn(pos, rec):
        base = tf.stack([tf.constant(seed, tf.int64), pos])
        s = tf.random.experimental.stateless_split(base, 3)
        if t and sampling == "random":  # TSN: a random frame of each of T segments
            offsets = tf.random.stateless_uniform([t], seed=tf.random.experimental.stateless_fold_in(base, 1))
        else:
            offsets = tf.fill([t], 0.5)
        dec = decode_all(rec, media, t, offsets)  # image [H, W, 3] or a clip [T, H, W, 3]: one crop and flip for all
        out = {"caption": rec["caption"], "id": rec["id"], "pos": pos}
        if "depth" in dec:
            dec["depth"] = normalize_depth(dec["depth"], media)
        if "image" in dec and "depth" in dec:
            x = crop_flip(_aligned(dec["image"], dec["depth"]), t, s)
            out["image"], out["depth"] = normalize(x[..., :3]), x[..., 3:]
        elif "image" in dec:
            out["image"] = normalize(crop_flip(dec["image"], t, s))
        elif "depth" in dec:
            out["depth"] = crop_flip(dec["depth"], t, s)
        if "audio" in dec:
            n = tf.shape(dec["audio"])[0]
            seed_a = tf.random.experimental.stateless_fold_in(base, 3)
            start = tf.random.stateless_uniform(
                [], seed=seed_a, maxval=tf.maximum(n - media.clip_samples, 0) + 1, dtype=tf.int32
            )
            out["audio"], out["audio_len"] = audio_window(dec["audio"], media.clip_samples, start)
        return _extras(out, rec, hard_negatives, s[2])

    return fn


def eval_map(data_config):
    tf = require_tf()
    size = int(option(data_config, "image_size"))
    t = num_frames(data_config)
    media = modalities.parse(data_config)

    def fn(pos, rec):
        dec = decode_all(rec, media, t, tf.fill([t], 0.5))
        out = {"caption": rec["caption"], "id": rec["id"], "pos": pos}
        if "image" in dec:
            out["image"] = normalize(tf.image.resize(dec["image"], [size, size], antialias=True))
        if "depth" in dec:
            out["depth"] = tf.image.resize(normalize_depth(dec["depth"], media), [size, size], antialias=True)
        if "audio" in dec:  # the centre window
            start = tf.maximum(tf.shape(dec["audio"])[0] - media.clip_samples, 0) // 2
            out["audio"], out["audio_len"] = audio_window(dec["audio"], media.clip_samples, start)
        return _extras(out, rec, None, None)

    return fn
