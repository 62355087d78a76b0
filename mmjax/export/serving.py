"""Run the encoders of `mmjax export --format stablehlo` with jax and numpy only.

No flax, no mmjax model code: this file imports nothing from mmjax, so it can also be
copied next to an export and used on its own.

    from mmjax.export.serving import Encoders
    enc = Encoders("OUT")                    # the export directory
    img = enc.image(images)                  # [B, H, W, 3] float32, normalised -> [B, E]
    txt = enc.text(ids)                      # [B, L] int32 token ids -> [B, E]
    scores = img @ txt.T                     # cosine similarities (rows L2-normalised)

`enc.normalize(pixels)` turns RGB pixels [B, H, W, 3] (0..255, already resized to
`enc.image_size`) into the encoder's input; `enc.tokenize(texts)` gives the ids (it
needs the `sentencepiece` package and the export's tokenizer.model). Any batch size
works: the batch dimension of the exported programs is symbolic (each new size
compiles once). The params are read once from OUT/model.safetensors and kept on the
device; both encoders take them as their first argument (see OUT/export.json).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "mmjax-stablehlo"
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str, *, with_metadata: bool = False):
    """{name: numpy array} of a .safetensors file (and its header metadata if asked).

    The format is an 8-byte little-endian header size, a JSON header {name: {dtype,
    shape, data_offsets}, '__metadata__': {str: str}}, then the tensors' bytes.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (header size {n}, file size {size})")
        header = json.loads(f.read(n))
    data = np.fromfile(path, np.uint8, offset=8 + n)
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, t in header.items():
        if t["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t['dtype']}, not one of {sorted(SAFETENSORS_DTYPES)}")
        dtype = np.dtype(SAFETENSORS_DTYPES[t["dtype"]])
        start, end = t["data_offsets"]
        shape = tuple(int(d) for d in t["shape"])
        if not 0 <= start <= end <= data.size or end - start != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(
                f"{path}: tensor {name!r} {t['dtype']}{list(shape)} has bytes "
                f"[{start}, {end}) of {data.size}: the file is truncated or corrupt"
            )
        tensors[name] = data[start:end].view(dtype).reshape(shape)
    return (tensors, meta) if with_metadata else tensors


def _describe(x) -> str:
    return f"{np.dtype(x.dtype).name}[{','.join(str(d) for d in x.shape)}]"


class Encoders:
    """The exported image and text encoders of one export directory.

    `image(images [B, H, W, 3] float32) -> [B, E] float32` and `text(ids [B, L] int32)
    -> [B, E] float32`, L2-normalised, as numpy. `spec` is OUT/export.json.
    """

    def __init__(self, directory: str, *, device=None):
        self.directory = str(directory)
        with open(os.path.join(self.directory, "export.json")) as f:
            self.spec = json.load(f)
        if self.spec.get("format") != FORMAT:
            raise ValueError(f"{self.directory}/export.json: format {self.spec.get('format')!r}, expected {FORMAT!r}")
        self._exported = {k: self._deserialize(self.spec[k]["file"]) for k in ("image", "text")}
        tensors = read_safetensors(os.path.join(self.directory, self.spec["params"]["file"]))
        order = self.spec["params"]["order"]
        missing = [name for name in order if name not in tensors]
        if missing:
            raise ValueError(
                f"{self.directory}: params file lacks {len(missing)} tensor(s) the encoders take, first {missing[0]!r}"
            )
        flat = [tensors[name] for name in order]
        for kind, exp in self._exported.items():
            avals = exp.in_avals[:-1]
            if len(avals) != len(flat):
                raise ValueError(f"{kind} encoder takes {len(avals)} params, export.json lists {len(flat)}")
            for name, x, aval in zip(order, flat, avals):
                if tuple(x.shape) != tuple(aval.shape) or x.dtype != aval.dtype:
                    raise ValueError(
                        f"param {name!r} is {_describe(x)} in the file, the {kind} encoder takes {_describe(aval)}"
                    )
        self.params = [jax.device_put(x, device) for x in flat]
        self._fns = {k: jax.jit(exp.call) for k, exp in self._exported.items()}

    def _deserialize(self, name: str):
        with open(os.path.join(self.directory, name), "rb") as f:
            return jax.export.deserialize(bytearray(f.read()))

    @property
    def image_size(self) -> int:
        return int(self.spec["image"]["image_size"])

    @property
    def text_len(self) -> int:
        return int(self.spec["text"]["text_len"])

    @property
    def platforms(self) -> tuple:
        return tuple(self._exported["image"].platforms)

    def _run(self, kind: str, x, dtype):
        x = np.asarray(x)
        want = self._exported[kind].in_avals[-1].shape[1:]
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != tuple(want):
            shape = ", ".join(["B"] + [str(d) for d in want])
            raise ValueError(f"{kind} encoder input must be [{shape}], got {list(x.shape)}")
        if kind == "text" and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"text encoder input must be integer token ids, got {x.dtype}")
        return np.asarray(self._fns[kind](self.params, x.astype(dtype, copy=False)))

    def image(self, images) -> np.ndarray:
        """[B, H, W, 3] float32 (normalised, see `normalize`) -> [B, E] float32."""
        return self._run("image", images, np.float32)

    def text(self, ids) -> np.ndarray:
        """[B, L] int32 token ids (see `tokenize`) -> [B, E] float32."""
        return self._run("text", ids, np.int32)

    def normalize(self, pixels) -> np.ndarray:
        """RGB pixels [B, H, W, 3] in 0..255 -> the image encoder's float32 input."""
        mean = np.asarray(self.spec["image"]["mean"], np.float32)
        std = np.asarray(self.spec["image"]["std"], np.float32)
        return (np.asarray(pixels, np.float32) / np.float32(255.0) - mean) / std

    def tokenize(self, texts) -> np.ndarray:
        """list of str -> int32 [N, text_len]: lower-cased sentencepiece ids as
        `bos ids... eos pad...` (truncated so eos is kept). Needs `sentencepiece`."""
        import sentencepiece as spm

        t = self.spec["text"]
        if not t.get("tokenizer"):
            raise ValueError(f"{self.directory}: the export has no tokenizer.model")
        if not hasattr(self, "_sp"):
            self._sp = spm.SentencePieceProcessor(model_file=os.path.join(self.directory, t["tokenizer"]))
        n = self.text_len
        out = np.full((len(texts), n), int(t["pad_id"]), np.int32)
        texts = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in texts]
        for i, ids in enumerate(self._sp.encode([s.lower() for s in texts])):
            ids = [int(t["bos_id"])] + list(ids)[: n - 2] + [int(t["eos_id"])]
            out[i, : len(ids)] = ids
        return out
