"""CapFilt (`mmjax data capfilt`, mmjax/data/capfilt.py): nucleus sampling against a numpy
nucleus of the full forward's logits, the filter's decisions against an independent ITM
computation, byte-identical output across batch sizes and after interrupted runs, the
output read by the shards source with its provenance, and one-line CLI errors.

The captioner and the filter are one tiny BLIP workdir (random init, both capabilities)
written directly (no training); the web set is the noisy `shapes` tars of
`mmjax.data.noisy_shapes`, converted by `mmjax data convert`, with one record's image
bytes damaged after conversion (a record that reads but does not decode)."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from mmjax import cli
from mmjax import config as config_lib
from mmjax import workdir as workdir_lib
from mmjax.data import capfilt as capfilt_lib
from mmjax.data import manifest as mf
from mmjax.data import noisy_shapes, records, shapes_gen
from mmjax.data.convert import WRITER_OPTIONS, convert
from mmjax.models import zoo
from mmjax.models.decoder import greedy_decode, sample_decode
from tiny import ROOT, tiny_overrides

N, PER, SEED, DAMAGED = 24, 8, 3, 13  # input records, records per unit, sampling seed, the undecodable id
BLIP = {
    "model.image": "mu/4",
    "model.image_overrides": "{}",
    "model.embed_dim": 16,
    "model.text_overrides": "{'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}",
    "model.queue_size": 24,
}


def _workdir(path, data_dir):
    """A BLIP workdir with a random-init checkpoint (EMA = a scaled student), its config
    and a tokenizer trained on shapes captions."""
    from mmjax.data.tokenizer import Tokenizer, train_tokenizer

    over = {k: v for k, v in tiny_overrides(data_dir).items() if not k.startswith("model.")} | BLIP
    config = config_lib.load(f"{ROOT}/configs/blip.py", [f"{k}={v}" for k, v in over.items()])
    caps = [shapes_gen.example(0, "train", i, 16)["caption"] for i in range(200)]
    tok = Tokenizer(train_tokenizer(caps, str(path), 40))
    config_lib.derive_model_keys(config, tok.vocab_size, tok.special_ids)
    workdir_lib.save_config_json(config, str(path))
    family = zoo.build(config.model)
    params = jax.tree.map(np.asarray, jax.jit(family.init_params)(jax.random.PRNGKey(0)))
    workdir_lib.save_params(str(path), params, ema_params=jax.tree.map(lambda x: x * 0.9, params), step=0)
    return str(path)


def _damage(directory: str, key: int) -> None:
    """Replaces the image bytes of record `key` by bytes no decoder reads (the header stays)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    reader = records.ArrayRecordShards(directory)
    entry = next(s for s in reader.shards if s["first_id"] <= key < s["first_id"] + s["records"])
    recs = reader.read_records(range(entry["first_id"], entry["first_id"] + entry["records"]))
    reader.close()
    writer = ArrayRecordWriter(os.path.join(directory, entry["path"]), WRITER_OPTIONS)
    for header, blobs in recs:
        blob = b"\x89PNG not really" if header["id"] == key else blobs[0]
        writer.write(records.encode_record({k: v for k, v in header.items() if k != "sizes"}, [blob]))
    writer.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    wd = _workdir(root / "blip", root / "tfds")
    noisy_shapes.write_noisy_shapes(str(root / "tars"), N, fraction=0.4, seed=0, image_size=16, per_tar=10)
    src = str(root / "web")
    convert(str(root / "tars"), src, workers=1)
    _damage(src, DAMAGED)
    opened = workdir_lib.open_workdir(wd)
    return {"root": root, "wd": wd, "src": src, "opened": opened}


def _run(world, name, **kw):
    kw = dict(records_per_shard=PER, seed=SEED, batch_size=8, devices=jax.local_devices()[:1]) | kw
    out = str(world["root"] / name)
    return out, capfilt_lib.capfilt(world["wd"], world["wd"], world["src"], out, **kw)


def _files(out: str) -> dict:
    """{relative path: sha256} of the shards, captions, shard JSONs and manifest."""
    got = {}
    for d, _, names in os.walk(out):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), out)
            if not rel.startswith("."):
                with open(os.path.join(d, n), "rb") as f:
                    got[rel] = hashlib.sha256(f.read()).hexdigest()
    return got


@pytest.fixture(scope="module")
def reference(world) -> dict:
    return _reference(world)


@pytest.fixture(scope="module")
def threshold(reference) -> float:
    """Midway between the two middle reference probabilities: half the captions pass (a
    random-init ITM head need not straddle 0.5), none sits at the boundary."""
    probs = sorted(p for _, p in reference.values())
    return (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2


@pytest.fixture(scope="module")
def first_run(world, threshold):
    return _run(world, "out_b8", threshold=threshold)


# ---------------------------------------------------------------- nucleus sampling


def _nucleus(logits_V: np.ndarray, top_p: float, pad: int) -> set:
    """The smallest set of most probable tokens (PAD excluded) whose mass is >= top_p."""
    z = logits_V.astype(np.float64).copy()
    z[pad] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    return {int(t) for t, b in zip(order, before) if b < top_p}


def test_top_p_sampling_is_greedy_at_zero_and_stays_in_the_nucleus(world):
    opened = world["opened"]
    family, params = opened.family, opened.params
    pixels = jax.random.normal(jax.random.PRNGKey(1), (6, 16, 16, 3))
    _, memory = jax.jit(family.image_features)(params, pixels)
    dec, tp = family.decoder, params["text_tower"]
    kw = dict(max_len=12, bos_id=2, eos_id=3)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(SEED), i))(np.arange(6, dtype=np.uint32))

    greedy = np.asarray(greedy_decode(dec, tp, memory, **kw))
    tiny_p = np.asarray(sample_decode(dec, tp, memory, keys, top_p=1e-6, **kw))
    np.testing.assert_array_equal(tiny_p, greedy)
    via_family = jax.jit(lambda p, x, k: family.caption(p, x, max_len=12, top_p=1e-6, rng=k))(params, pixels, keys)
    np.testing.assert_array_equal(np.asarray(via_family), greedy)

    top_p, temp = 0.6, 1.5
    tokens = np.asarray(sample_decode(dec, tp, memory, keys, top_p=top_p, temperature=temp, **kw))
    logits = np.asarray(jax.jit(dec.apply)({"params": tp}, tokens, memory)) / temp  # full (uncached) forward
    pad, strict = dec.pad_id, 0
    for b in range(tokens.shape[0]):
        for i in range(kw["max_len"] - 1):
            if tokens[b, i] in (kw["eos_id"], pad):  # after eos: padding only
                assert (tokens[b, i + 1 :] == pad).all()
                break
            allowed = _nucleus(logits[b, i], top_p + 1e-4, pad)  # a hair wider: cached vs full float noise
            assert tokens[b, i + 1] in allowed, (b, i)
            strict += len(allowed) < logits.shape[-1] - 1
    assert strict > 0  # the nucleus did exclude tokens somewhere

    again = np.asarray(sample_decode(dec, tp, memory, keys, top_p=top_p, temperature=temp, **kw))
    np.testing.assert_array_equal(again, tokens)
    other = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(SEED + 1), i))(np.arange(6, dtype=np.uint32))
    full = np.asarray(sample_decode(dec, tp, memory, other, top_p=1.0, temperature=temp, **kw))
    assert (full != tokens).any()


def test_coca_caption_samples_with_rng():
    """CoCa's caption: greedy by default, sampling with `rng` (top_p -> 0: greedy again);
    top_p without rng is refused."""
    over = ["data.image_size=16", "data.text_len=8", "model.cap_queries=4", "model.unimodal_layers=1"]
    over += ["model.image_overrides={'width': 32, 'depth': 1, 'heads': 2, 'mlp_dim': 64}"]
    over += ["model.text_overrides={'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}"]
    cfg = config_lib.load(f"{ROOT}/configs/coca.py", over)
    config_lib.derive_model_keys(cfg, 50)
    fam = zoo.build(cfg.model)
    params = jax.jit(fam.init_params)(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    both = jax.jit(lambda p, x, k, top_p: (fam.caption(p, x), fam.caption(p, x, top_p=top_p, rng=k)))
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    greedy, sampled = both(params, x, keys, 1e-6)
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))
    assert (np.asarray(both(params, x, keys, 1.0)[1]) != np.asarray(greedy)).any()
    with pytest.raises(ValueError, match="needs rng"):
        fam.caption(params, x, top_p=0.9)


# ---------------------------------------------------------------- the filter's decisions


def _reference(world) -> dict:
    """{(input id, kind): (caption, match probability)} computed independently: PIL decode,
    `mmjax.Model.preprocess`, the family's caption with fold_in(PRNGKey(seed), id) row keys,
    and sigmoid(itm_scores) of the filter's own features."""
    import io

    from PIL import Image

    from mmjax.api import Model

    model = Model(world["opened"])
    family, params, tok = model.family, model.params, model.tokenizer
    reader = records.ArrayRecordShards(world["src"])
    ids = [i for i in range(N) if i != DAMAGED]
    samples = reader.read(ids)
    pixels = model.preprocess(
        np.stack([np.asarray(Image.open(io.BytesIO(s["image"])).convert("RGB")) for s in samples])
    )
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(SEED), i))(np.asarray(ids, np.uint32))
    caption = jax.jit(lambda p, x, k: family.caption(p, x, max_len=16, top_p=0.9, temperature=1.0, rng=k))
    synthetic = [tok.decode(t).strip() for t in np.asarray(caption(params, pixels, keys))]
    _, image_tokens = jax.jit(family.image_features)(params, pixels)
    text_features, itm = jax.jit(family.text_features), jax.jit(family.itm_scores)
    out = {}
    for kind, caps in (("web", [s["caption"] for s in samples]), ("synthetic", synthetic)):
        text = tok.encode(caps, 16)
        _, stream = text_features(params, text)
        probs = np.asarray(jax.nn.sigmoid(itm(params, image_tokens, stream, text)))
        out |= {(i, kind): (c, float(p)) for i, c, p in zip(ids, caps, probs)}
    return out


def _headers(out: str) -> list[dict]:
    reader = records.ArrayRecordShards(out)
    return [h for h, _ in reader.read_records(range(len(reader)))]


def test_filter_keeps_exactly_the_pairs_at_or_above_the_threshold(reference, threshold, first_run):
    out, summary = first_run
    got = {(h["source_id"], h["caption_kind"]): h for h in _headers(out)}
    for (i, kind), (caption, p) in reference.items():
        if abs(p - threshold) < 1e-4:
            continue  # too close to call between two float paths
        assert ((i, kind) in got) == (p >= threshold), (i, kind, p)
        if (i, kind) in got:
            h = got[i, kind]
            assert h["caption"] == caption and abs(h["filter_prob"] - p) < 1e-4 and h["filter_prob"] >= threshold
    assert all(h["filter_prob"] >= threshold for h in got.values()) and (DAMAGED, "web") not in got
    assert 0 < len(got) < len(reference)
    web = sum(k == "web" for _, k in got)
    assert summary == {
        "inputs": N,
        "web_kept": web,
        "synthetic_kept": len(got) - web,
        "dropped": 2 * (N - 1) - len(got),
        "skipped_corrupt": 1,
        "records": len(got),
        "shards": 3,
        "out": out,
    }


# ---------------------------------------------------------------- determinism and resume


def test_output_is_byte_identical_across_batch_sizes_devices_and_the_cli(world, threshold, first_run, capsys):
    """The CLI on all 8 (test) devices at batch 24 writes the bytes of 1 device at batch 8."""
    out, summary = first_run
    other = str(world["root"] / "out_cli_b24")
    argv = ["data", "capfilt", "--captioner", world["wd"], "--filter", world["wd"], "--in", world["src"]]
    argv += ["--out", other, "--batch-size", "24", "--records-per-shard", str(PER), "--seed", str(SEED)]
    argv += ["--threshold", repr(threshold)]
    capsys.readouterr()
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == dict(summary, out=other)
    assert "mmjax data capfilt: scored unit 3/3" in captured.err
    assert _files(other) == _files(out)


def test_a_killed_run_resumes_to_the_uninterrupted_output(world, threshold, first_run, monkeypatch):
    """Killed after unit 0's scores, then after shard 0: the rerun does only the rest and
    writes the uninterrupted run's bytes. Three rows per model call (MICRO) make a unit
    three calls and a 4-row batch two host steps."""
    from mmjax.data import capfilt_models

    monkeypatch.setattr(capfilt_models, "MICRO", 3)
    out, summary = _run(world, "micro3", threshold=threshold)
    lines = []

    def kill_at(word, count):
        def progress(line):
            lines.append(line)
            if sum(word in x for x in lines) == count:
                raise KeyboardInterrupt(line)

        return progress

    with pytest.raises(KeyboardInterrupt):
        _run(world, "resumed", threshold=threshold, batch_size=4, progress=kill_at("scored", 1))
    with pytest.raises(KeyboardInterrupt):
        _run(world, "resumed", threshold=threshold, batch_size=4, progress=kill_at("wrote", 1))
    assert sum("scored" in x for x in lines) == 1 + 2  # unit 0 was not scored again
    lines.clear()
    again, got = _run(world, "resumed", threshold=threshold, batch_size=16, progress=lines.append)
    assert [x.split(":")[0] for x in lines] == ["wrote shard 2/3", "wrote shard 3/3"]
    assert got == dict(summary, out=again) and _files(again) == _files(out)
    assert not os.path.exists(os.path.join(again, ".tmp"))
    # Another call layout moves float bits at most: the same captions, probabilities within 2e-6.
    for u in range(3):
        rows = [mf.read_json(f"{d}/.capfilt/train/unit-{u:05d}.json")["rows"] for d in (out, first_run[0])]
        for a, b in zip(*rows):
            assert a.get("synthetic") == b.get("synthetic") and a.get("skip") == b.get("skip")
            assert all(abs(a[k] - b[k]) <= 2e-6 for k in ("web_prob", "synthetic_prob") if k in a)
    # Another threshold reuses every unit's scores: only the write pass runs.
    probs = sorted(h["filter_prob"] for h in _headers(out))
    lines.clear()
    _, higher = _run(world, "resumed", threshold=probs[len(probs) // 2], progress=lines.append)
    assert not any("scored" in x for x in lines) and higher["records"] == len(probs) - len(probs) // 2


# ---------------------------------------------------------------- the output as training data


def test_output_reads_as_shards_with_provenance(world, threshold, first_run):
    from mmjax.data.sources import source_for

    out, summary = first_run
    source = source_for({"name": "shards", "path": out})
    reader = source.reader("train")
    assert source.num_examples("train") == summary["records"] == len(reader)
    samples = reader.read(range(len(reader)))
    web_in = records.ArrayRecordShards(world["src"])
    for s, h in zip(samples, _headers(out)):
        assert s["id"] == h["id"] and s["caption"] == h["caption"]
        assert h["caption_kind"] in ("web", "synthetic") and threshold <= h["filter_prob"] <= 1
        header, blobs = web_in.read_records([h["source_id"]])[0]
        assert s["image"] == blobs[0] and h["meta"] == header["meta"]  # the web image and its meta, kept
        assert h["key"] == f"{header['key']}/{h['caption_kind']}"
        if h["caption_kind"] == "web":
            assert h["caption"] == header["caption"] == header["meta"]["caption"]
    assert source.captions("train") == [s["caption"] for s in samples]
    m = mf.read_manifest(out)
    assert m["source"]["kind"] == "capfilt" and m["splits"]["train"]["skipped"]["undecodable"] == 1
    assert mf.read_json(os.path.join(out, "train", "capfilt_summary.json"))["records"] == summary["records"]


def test_corrupt_captions_replaces_the_given_share_deterministically():
    caps = [shapes_gen.example(0, "train", i, 16)["caption"] for i in range(50)]
    out, bad = noisy_shapes.corrupt_captions(caps, 0.4, seed=7)
    assert bad.sum() == 20 and all((o != c) == b for o, c, b in zip(out, caps, bad))
    words = {w for c in caps for w in c.split()} | set(" ".join(shapes_gen.COLOURS + shapes_gen.SHAPES).split())
    assert all(set(o.split()) <= words | {"of", "left", "right", "above", "below", "small", "large", "a"} for o in out)
    again, bad2 = noisy_shapes.corrupt_captions(caps, 0.4, seed=7)
    assert again == out and (bad2 == bad).all()
    assert noisy_shapes.corrupt_captions(caps, 0.4, seed=8)[0] != out


# ---------------------------------------------------------------- CLI errors


def test_cli_mistakes_are_one_line_and_exit_2(world, tmp_path, capsys):
    albef = tmp_path / "albef"
    albef.mkdir()
    from tiny import albef_config

    workdir_lib.save_config_json(albef_config(tmp_path / "tfds"), str(albef))  # a config, no checkpoint
    base = ["data", "capfilt", "--in", world["src"], "--out", str(tmp_path / "o")]
    cases = {
        "no such workdir": ["--captioner", str(tmp_path / "nope"), "--filter", world["wd"]],
        "'caption' capability": ["--captioner", str(albef), "--filter", world["wd"]],
        "config.json not found": ["--captioner", str(tmp_path), "--filter", world["wd"]],
        "--top-p 0.0": ["--captioner", world["wd"], "--filter", world["wd"], "--top-p", "0"],
        "needs --filter": ["--captioner", world["wd"]],
        "no manifest.json": ["--captioner", world["wd"], "--filter", world["wd"], "--in", str(tmp_path)],
    }
    for expect, flags in cases.items():
        capsys.readouterr()
        assert cli.main(base + flags) == 2, expect
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mmjax: error: ") and expect in err, (expect, err)
