"""Zero-shot classification: prompt templates, class names, and classifying a user's
image files with their own class names.

A class's text embedding is the mean of its normalised prompt embeddings over the
templates (open_clip's recipe), normalised again. Every prompt must fit the model's
text length whole (bos + tokens + eos <= data.text_len, the length it was trained
at): a cut prompt names something else, so a prompt that does not fit is an error
naming the prompt and the fix, never silently truncated.

    mmjax classify --workdir DIR --images a.png b.jpg --classes "red circle,blue square"
"""

from __future__ import annotations

import os

import numpy as np

# Built-in templates per dataset (as open_clip / CLIP_benchmark keep per-dataset ones),
# short enough for the recipes' text lengths. `shapes` captions read "a small red
# circle left of a large blue square" and the label is the first-named object's
# "colour shape": the prompts are that caption's opening words, in either size.
DEFAULT_TEMPLATES = {
    "shapes": ("a small {}", "a large {}"),
    "shapes_av": ("a small {}", "a large {}"),  # the `shapes` scenes, heard and seen: the same labels
    "cifar10": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a photo of the small {}.",
        "a photo of the big {}.",
        "a bad photo of a {}.",
        "a good photo of a {}.",
    ),
    "cifar100": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a photo of the small {}.",
        "a photo of the big {}.",
        "a bad photo of a {}.",
        "a good photo of a {}.",
    ),
    # open_clip's SIMPLE_IMAGENET_TEMPLATES
    "imagenet2012": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ),
}
# Any other dataset. A catalog set with labels but no captions is trained on
# "a photo of a <label>" (mmjax/data/pipeline.py), which the first template matches.
GENERIC_TEMPLATES = ("a photo of a {}", "a photo of a {}.", "a {}.")


def default_templates(dataset_name) -> tuple[str, ...]:
    return DEFAULT_TEMPLATES.get(str(dataset_name), GENERIC_TEMPLATES)


def resolve_templates(templates, dataset_name, key: str = "eval.zero_shot.templates") -> tuple[str, ...]:
    """templates (None / empty: the dataset's built-in ones; a str: one template) ->
    a checked tuple; each must hold exactly one '{}' (the class name)."""
    if templates is None or (not isinstance(templates, str) and len(templates) == 0):
        return default_templates(dataset_name)
    if isinstance(templates, str):
        templates = (templates,)
    out = []
    for t in templates:
        t = str(t)
        try:
            ok = t.count("{}") == 1 and t.format("x") == t.replace("{}", "x")
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{key}: template {t!r} must hold exactly one '{{}}' (the class name) and no "
                "other braces, e.g. 'a photo of a {}.'"
            )
        out.append(t)
    return tuple(out)


def clean_class_names(names, source: str = "class names") -> list[str]:
    """Stripped, non-empty, distinct names (order kept); a ValueError naming `source` otherwise."""
    out = [str(n).strip() for n in names]
    out = [n for n in out if n]
    if not out:
        raise ValueError(f"{source}: no class names given")
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise ValueError(f"{source}: class names repeated: {', '.join(map(repr, dup))}")
    return out


def split_class_names(text: str) -> list[str]:
    """'cat, dog,bird' -> ['cat', 'dog', 'bird'] (the CLI's --classes)."""
    return clean_class_names(str(text).split(","), "--classes")


def read_class_names(path: str) -> list[str]:
    """One class name per non-empty line of a UTF-8 file."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class names file not found: {path!r} (one class name per line)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"class names file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return clean_class_names(lines, f"class names file {path!r}")


class PromptsTooLong(ValueError):
    """Some prompts do not fit text_len: `.count` of `.total`; `.builtin`: they are the
    dataset's built-in prompts, not ones a user gave."""

    def __init__(self, message: str, count: int, total: int):
        super().__init__(message)
        self.count, self.total, self.builtin = count, total, False


def prompt_ids(tokenizer, templates, names, text_len: int) -> np.ndarray:
    """Token ids [T, C, text_len] of every (template, class) prompt, exactly as the
    training captions are encoded. A prompt longer than text_len (bos and eos
    included) is a ValueError naming it, never truncated."""
    text_len = int(text_len)
    texts = [t.format(n) for t in templates for n in names]
    probe = tokenizer.encode(texts, 4 * text_len + 64)  # long enough to count, not to cut
    lengths = (probe != getattr(tokenizer, "pad_id", 0)).sum(axis=1)
    over = np.flatnonzero(lengths > text_len)
    if over.size:
        worst = int(over[np.argmax(lengths[over])])
        raise PromptsTooLong(
            f"{over.size} of {len(texts)} zero-shot prompts do not fit text_len={text_len} (the length the "
            f"model was trained at), e.g. {texts[worst]!r} is {int(lengths[worst])} tokens with bos/eos; "
            "give shorter templates (eval.zero_shot.templates, or --templates) or shorter class names",
            int(over.size),
            len(texts),
        )
    return probe[:, :text_len].reshape(len(templates), len(names), text_len)


def class_embeddings(encode_text, ids: np.ndarray) -> np.ndarray:
    """ids [T, C, L] -> [C, D]: per class, the mean over templates of the normalised
    text embeddings (encode_text: [N, L] -> [N, D]), normalised."""
    t, c, length = ids.shape
    emb = np.asarray(encode_text(ids.reshape(t * c, length)), np.float64)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.reshape(t, c, -1).mean(axis=0)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def eval_prompts(data_config, tokenizer, zs_config=None):
    """(class names, prompt ids [T, C, L]) for the eval's zero-shot metric, or None
    when the dataset has no labels. Class names: `eval.zero_shot.class_names_file`
    (one per line, in label order) or the dataset's; templates: eval.zero_shot.templates
    or the dataset's built-in ones. Prompts that do not fit raise PromptsTooLong, with
    `.builtin` set when neither the templates nor the names came from the user."""
    from mmjax.data import pipeline

    zs = zs_config or {}
    names = pipeline.label_names(data_config)
    name_file = zs.get("class_names_file")
    if name_file:
        if not names:
            raise ValueError(
                f"eval.zero_shot.class_names_file is set, but dataset {data_config.name!r} has no labels to classify"
            )
        custom = read_class_names(name_file)
        if len(custom) != len(names):
            raise ValueError(
                f"eval.zero_shot.class_names_file {name_file!r} holds {len(custom)} names; "
                f"dataset {data_config.name!r} has {len(names)} labels (one name per label, in order)"
            )
        names = custom
    if not names:
        return None
    templates = resolve_templates(zs.get("templates"), data_config.name)
    try:
        return list(names), prompt_ids(tokenizer, templates, names, int(data_config.text_len))
    except PromptsTooLong as e:
        e.builtin = not (zs.get("templates") or name_file)
        raise


def classify_files(
    workdir: str, image_paths, class_names, templates=None, weights: str = "student", *, videos=()
) -> list[dict]:
    """Zero-shot classes of image (or, for a video model, video) files from a
    workdir's checkpoint, with the caller's class names: [{'image', 'class',
    'score', 'scores'}] per file that decoded ('score': the cosine similarity of the
    image to the top class's template-averaged prompt embedding; 'scores': every
    class's, in the order given). templates: None = the workdir's
    eval.zero_shot.templates or its dataset's built-in ones. Files that do not
    decode are skipped with a warning."""
    import jax

    from mmjax.eval import embed as embed_lib
    from mmjax.eval import retrieval
    from mmjax.parallel import mesh as mesh_lib

    names = clean_class_names(class_names)
    params, setup, _, bs = embed_lib._restore(workdir, weights)
    config, family = setup.config, setup.family
    if not family.can("encode"):
        from mmjax.models import zoo

        able = [n for n, cls in zoo.FAMILIES.items() if "encode" in cls.capabilities]
        raise ValueError(
            f"family {config.model.family!r} has no image/text encoders to classify with; "
            f"zero-shot families: {', '.join(able)}"
        )
    if templates is None or (not isinstance(templates, str) and len(templates) == 0):
        templates = (config.get("eval", {}).get("zero_shot", {}) or {}).get("templates")
    templates = resolve_templates(templates, config.data.name, key="templates")
    ids = prompt_ids(setup.tokenizer, templates, names, int(config.data.text_len))
    pixels, ok = embed_lib._load_media(config, image_paths, videos)
    if not len(pixels):
        return []
    rep = mesh_lib.replicated(setup.mesh)
    enc_img = jax.jit(lambda x: family.encode_image(params, x), out_shardings=rep)
    enc_txt = jax.jit(lambda x: family.encode_text(params, x), out_shardings=rep)
    img = np.asarray(embed_lib._batched(enc_img, setup.mesh, pixels, bs), np.float32)
    class_txt = class_embeddings(lambda t: embed_lib._batched(enc_txt, setup.mesh, t, bs), ids)
    sims = retrieval.similarity(img, class_txt)
    best = np.argmax(sims, axis=1)
    return [
        {"image": path, "class": names[b], "score": float(s[b]), "scores": [float(v) for v in s]}
        for path, b, s in zip(ok, best, sims)
    ]
