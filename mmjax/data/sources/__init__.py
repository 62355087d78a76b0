"""Where records come from: one `Source` per kind of dataset, one file each in this
package, registered by the `data.name` values it serves.

- `builtin.py`: the datasets mmjax generates locally (shapes, shapes_vqa, shapes_av,
  moving_shapes, emoji; builders in `mmjax.data.builders`);
- `file_list.py`: CSV/JSONL lists of local images, videos, audio clips and depth maps
  (`data.name='files'`);
- `catalog.py`: any other name, a TFDS catalog dataset the user has prepared (never
  downloaded).

`data.eval_path` (a shards directory or a CSV/JSONL list) is the eval set, read by the
source whose `Source.eval_set` takes it (shards, file list) instead of the eval split
of `data.name`'s: every read of a split but `data.train_split` goes there
(`split_source`, `eval_source`).

A new source is one new module here: a `Source` subclass decorated with `@register`;
every module of the package is imported when a source is first looked up, so nothing
else in the pipeline changes. Its data keys (`keys`, with their defaults) join the
schema (`mmjax.data.schema`).

Records (`Source.records`) are a tf.data.Dataset of dicts of still-encoded media:
'image' (encoded bytes) or 'image_path' (a file), or a clip: 'video' (the encoded
bytes of each frame, [n]) or 'video_path'; 'caption' (string); 'id' (int64, the
record's index in its split); and, where the dataset has them, 'label' (int64),
'hard_negatives' (string [n]), 'audio' (an encoded audio file's bytes) or
'audio_path', 'depth' (PNG bytes, 8- or 16-bit, one channel) or 'depth_path' (read
for data.modalities; a record may carry audio or depth without an image). Decoding,
augmenting, tokenizing and batching are the pipeline's (`mmjax.data.pipeline`).
TensorFlow is imported lazily, in methods.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from mmjax.data import schema
from mmjax.errors import ConfigError


class Source:
    """One dataset as the pipeline sees it, made from the `data` config section."""

    names: tuple[str, ...] = ()  # the data.name values it serves
    fallback = False  # serves every name no other source claims (the TFDS catalog)
    keys: dict = {}  # the data keys it reads, with defaults ({...} for a section)
    cache_allowed = False  # data.cache_decoded may keep its decoded images in memory
    summary = ""  # a few words for the message about an unknown dataset name

    def __init__(self, data_config):
        self.config = data_config
        self.name = schema.cfg_get(data_config, "name")

    def option(self, dotted: str):
        """This config's value of data key `dotted`, or its declared default."""
        return schema.option(self.config, dotted, declared())

    def records(self, split: str):
        """tf.data.Dataset of the encoded records of `split` (module docstring)."""
        raise NotImplementedError

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def reader(self, split: str):
        """A random-access reader of `split` (`len`, `read(keys) -> [sample or None]`,
        `bytes_read`, `fingerprint`: `mmjax.data.records.ArrayRecordShards`), or None for a
        source read as a stream. With a reader, training takes the index-based pipeline
        (`mmjax.data.index_pipeline`: a global order, each process reading only its rows)."""
        del split
        return None

    def mixture(self, split: str) -> list[tuple[str, float | None, object]]:
        """The random-access sources the index-based pipeline reads `split` from:
        [(name, weight or None, reader)], weight None for shares proportional to record
        counts. One source, this one's `reader`, unless a source mixes several."""
        return [(str(self.name), None, self.reader(split))]

    def captions(self, split: str) -> list[str]:
        """All captions of `split` (to train a tokenizer)."""
        ds = self.records(split).map(lambda r: r["caption"])
        return [c.decode("utf-8") for c in ds.as_numpy_iterator()]

    def label_names(self) -> list[str] | None:
        """Class names (label index = position), for zero-shot prompts; None without labels."""
        return None

    def answer_types(self) -> list[str] | None:
        """The type of each label (VQA answer types), or None."""
        return None

    def has_hard_negatives(self) -> bool:
        """Whether records carry 'hard_negatives' (captions of other scenes)."""
        return False

    def dropped(self, split: str) -> int:
        """Records skipped before the stream starts (a list's missing files)."""
        return 0

    def describe(self, split: str) -> str:
        """The source and split, for messages."""
        return f"dataset {self.name!r} (split {split!r})"

    @classmethod
    def eval_set(cls, data: dict, path: str, split: str) -> tuple[dict, str] | None:
        """For data.eval_path=`path` (it exists) and the eval split `split`: (a copy of the
        data section `data` that reads `path` with this source, the split to read there),
        or None when this source does not read such a path (`eval_config`)."""
        del data, path, split
        return None


_BY_NAME: dict[str, type[Source]] = {}
_CLASSES: list[type[Source]] = []
_FALLBACK: list[type[Source]] = []
_DISCOVERED = [False]


def register(cls: type[Source]) -> type[Source]:
    """Class decorator: `cls` serves `cls.names` (and every other name if `cls.fallback`)."""
    for name in cls.names:
        if _BY_NAME.get(name, cls) is not cls:
            raise ValueError(f"data source {name!r} registered twice: {_BY_NAME[name].__name__}, {cls.__name__}")
        _BY_NAME[name] = cls
    if cls.fallback:
        if _FALLBACK and _FALLBACK[0] is not cls:
            raise ValueError(f"two fallback data sources: {_FALLBACK[0].__name__}, {cls.__name__}")
        _FALLBACK[:] = [cls]
    if cls not in _CLASSES:
        _CLASSES.append(cls)
    return cls


def _discover() -> None:
    """Imports every module of this package once (each registers its sources)."""
    if not _DISCOVERED[0]:
        _DISCOVERED[0] = True
        for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
            importlib.import_module(f"{__name__}.{module}")


def registered() -> list[type[Source]]:
    """Every registered source class: this package's in module-name order (whatever order
    they were imported in), then any other in registration order."""
    _discover()
    modules = sorted(m.name for m in pkgutil.iter_modules(__path__))
    rank = {f"{__name__}.{m}": i for i, m in enumerate(modules)}
    return sorted(_CLASSES, key=lambda c: (rank.get(c.__module__, len(rank)), _CLASSES.index(c)))


def names() -> list[str]:
    """Every data.name a source claims, in `registered()` order (the fallback serves the rest)."""
    return [n for cls in registered() for n in cls.names if _BY_NAME.get(n) is cls]


def source_class(name) -> type[Source]:
    _discover()
    return _BY_NAME.get(name) or _FALLBACK[0]


def source_for(data_config) -> Source:
    """The source that `data_config` (the `data` section) names."""
    return source_class(schema.cfg_get(data_config, "name"))(data_config)


def cache_allowed(name) -> bool:
    """Whether data.cache_decoded may keep the decoded images of data.name in memory."""
    return source_class(name).cache_allowed


def load_records(data_config, split: str):
    """tf.data.Dataset of the undecoded records of `split` (module docstring)."""
    source, split = split_source(data_config, split)
    return source.records(split)


def num_examples(data_config, split: str) -> int:
    source, split = split_source(data_config, split)
    return source.num_examples(split)


def captions(data_config, split: str) -> list[str]:
    """All captions of `split` (for tokenizer training)."""
    source, split = split_source(data_config, split)
    return source.captions(split)


def label_names(data_config) -> list[str] | None:
    """Class names of the eval set (label index = position), for zero-shot prompts, or None."""
    return eval_source(data_config)[0].label_names()


def answer_types(data_config) -> list[str] | None:
    """The type of each label (VQA answer types: colour, shape, size, yes/no), or None."""
    return source_for(data_config).answer_types()


# ---------------------------------------------------------------- data.eval_path


def eval_path(data_config) -> str | None:
    """data.eval_path, `~` expanded and checked (ConfigError, one line), or None when unset."""
    path = schema.cfg_get(data_config, "eval_path")
    if not path:
        return None
    path = os.path.expanduser(str(path))
    what = "a directory written by `mmjax data convert` or a CSV/JSONL list"
    if not os.path.exists(path):
        raise ConfigError(f"data.eval_path={path!r}: no such file or directory (expected {what})")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "manifest.json")):
        raise ConfigError(f"data.eval_path={path!r} is a directory without manifest.json (expected {what})")
    return path


def eval_config(data_config, split: str) -> tuple[dict, str]:
    """(a copy of the data section that reads data.eval_path, the split to read there):
    from the first source whose `Source.eval_set` takes the path (a converted directory:
    the shards source; a CSV/JSONL list: the file-list source, every row)."""
    path = eval_path(data_config)
    data = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
    data["eval_path"] = None
    for cls in registered():
        found = cls.eval_set(data, path, split)
        if found is not None:
            return found
    raise ConfigError(f"data.eval_path={path!r}: no data source reads it")


def split_source(data_config, split: str) -> tuple[Source, str]:
    """(the source, its split) that serve `split`: data.eval_path's set for every split but
    data.train_split when it is set (`eval_config`), else data.name's source and `split`."""
    if split == schema.option(data_config, "train_split") or eval_path(data_config) is None:
        return source_for(data_config), split
    cfg, split = eval_config(data_config, split)
    return source_for(cfg), split


def eval_source(data_config, split: str | None = None) -> tuple[Source, str]:
    """`split_source` of `split`, by default data.eval_split: what evaluation reads."""
    return split_source(data_config, split or schema.option(data_config, "eval_split"))


def eval_label_map(data_config):
    """None, or int64 [C_eval + 1] taking data.eval_path's labels (and -1, last) to the
    training set's label indices, for a classifier's outputs; ValueError (one line)
    naming eval classes the training set lacks."""
    import numpy as np

    if eval_path(data_config) is None:
        return None
    names = eval_source(data_config)[0].label_names()
    train = source_for(data_config).label_names()
    if not names or not train or list(names) == list(train):
        return None
    unknown = [n for n in names if n not in train]
    if unknown:
        raise ValueError(
            f"data.eval_path={eval_path(data_config)!r} has classes the training set lacks: "
            f"{', '.join(map(str, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}"
        )
    return np.array([list(train).index(n) for n in names] + [-1], np.int64)


def declared() -> dict:
    """{key: default or {key: default}} over schema.COMMON and every registered source."""
    out = dict(schema.COMMON)
    for cls in registered():
        for key, default in cls.keys.items():
            if key in out and out[key] != default:
                raise RuntimeError(f"data key {key!r} declared twice with different defaults ({cls.__name__})")
            out[key] = default
    return out


def option(data_config, dotted: str):
    """data_config's value of data key `dotted` (any source's), or its declared default."""
    return schema.option(data_config, dotted, declared())


def check_data_config(data_config) -> None:
    """ConfigError naming the first key under `data` (or under one of its sections) that
    no source declares, and the valid keys there. None (no data section) passes."""
    if data_config is None:
        return
    if not schema.is_section(data_config):
        raise ConfigError(f"config key 'data' is a section; got {data_config!r}")
    schema.check_section(data_config, declared(), "data", ConfigError)
    eval_path(data_config)  # an eval set that is not there: one line now
