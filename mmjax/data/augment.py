"""Per-record tf.data maps: decode, crop/resize/flip (training) or resize (eval),
normalise, and draw a record's hard-negative captions. Both maps are stateless:
their randomness derives from (seed, stream position), so a resumed stream draws
what an uninterrupted one would.
"""

from __future__ import annotations

from mmjax.data import require_tf, shapes_gen, video_io
from mmjax.data.decode import decode_media, normalize, num_frames
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


def train_map(data_config, seed, hard_negatives: int = 0):
    tf = require_tf()
    size = int(option(data_config, "image_size"))
    scale = tuple(float(x) for x in option(data_config, "augment.crop_scale"))
    ratio = tuple(float(x) for x in option(data_config, "augment.aspect"))
    flip = bool(option(data_config, "augment.flip"))
    t = num_frames(data_config)
    sampling = video_io.check_sampling(option(data_config, "frame_sampling"))

    crop_is_identity = scale == (1.0, 1.0) and ratio == (1.0, 1.0)

    def fn(pos, rec):
        base = tf.stack([tf.constant(seed, tf.int64), pos])
        s = tf.random.experimental.stateless_split(base, 3)
        if t and sampling == "random":  # TSN: a random frame of each of T segments
            offsets = tf.random.stateless_uniform([t], seed=tf.random.experimental.stateless_fold_in(base, 1))
        else:
            offsets = tf.fill([t], 0.5)
        img = decode_media(rec, t, offsets)  # [H, W, 3] or a clip [T, H, W, 3]: one crop and flip for all
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
        out = {"image": normalize(img), "caption": rec["caption"], "id": rec["id"], "pos": pos}
        if "label" in rec:
            out["label"] = tf.cast(rec["label"], tf.int32)
        if hard_negatives:
            out["hard_negatives"], out["hard_negatives_valid"] = pick_negatives(
                rec["hard_negatives"], hard_negatives, s[2]
            )
        return out

    return fn


def eval_map(data_config):
    tf = require_tf()
    size = int(option(data_config, "image_size"))
    t = num_frames(data_config)

    def fn(pos, rec):
        img = tf.image.resize(decode_media(rec, t, tf.fill([t], 0.5)), [size, size], antialias=True)
        out = {"image": normalize(img), "caption": rec["caption"], "id": rec["id"], "pos": pos}
        if "label" in rec:
            out["label"] = tf.cast(rec["label"], tf.int32)
        if "hard_negatives" in rec:
            hn = rec["hard_negatives"][:MAX_NEGATIVES]
            n = tf.shape(hn)[0]
            out["hard_negatives"] = tf.concat([hn, tf.fill([MAX_NEGATIVES - n], "")], 0)
            out["hard_negatives_valid"] = tf.range(MAX_NEGATIVES) < n
        return out

    return fn
