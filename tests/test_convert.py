"""`mmjax.data.convert` (tars / lists / TFDS -> ArrayRecord shards), the record format and
`ArrayRecordShards`, each checked against what the test wrote (the reference)."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from mmjax.data import convert as convert_lib
from mmjax.data import manifest as mf
from mmjax.data import records, tars
from mmjax.data.convert import convert
from mmjax.data.records import ArrayRecordShards, decode_record, encode_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image(seed: int, fmt: str = "JPEG", size: int = 24) -> bytes:
    """A noise image, different for each seed."""
    px = np.random.default_rng(seed).integers(0, 256, [size, size + 4, 3], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: str, samples: list, cut=None) -> int:
    """Members `{key}.{ext}` in sample order (img2dataset's media, txt, json) -> the tar at
    `path`; cut(offsets, data) -> a length to truncate it to. Returns the file size."""
    offsets = []  # (key, ext, header offset, data offset, size) per member
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o444
                offsets.append((key, ext, t.offset, t.offset + 512, len(data)))
                t.addfile(info, io.BytesIO(data))
    if cut is not None:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: cut(offsets, data)])
    return os.path.getsize(path)


def sample(seed: int, caption: str | None, fmt: str = "JPEG", ext: str = "jpg", size: int = 24, meta=True) -> dict:
    out = {ext: image(seed, fmt, size)} if ext else {}
    if caption is not None:
        out["txt"] = caption.encode()
    if meta:
        out["json"] = json.dumps(
            {"url": f"http://x/{seed}", "caption": caption, "status": "success"}, indent=4
        ).encode()
    return out


def good(key: str, s: dict, ext: str = "jpg") -> dict:
    return {key: (s[ext], s["txt"].decode().strip())}


def make_tars(d: str):
    """Four tars with broken members -> (expected {key: (media bytes, caption)}, expected skips)."""
    os.makedirs(d, exist_ok=True)
    expect = {}
    a = [
        ("a0", sample(0, "a red square", "JPEG", "jpg")),
        ("a1", sample(1, "a png\nwith a line break", "PNG", "png")),
        ("a2", sample(2, "a webp", "WEBP", "webp")),
        ("sub/a3", sample(3, " spaced caption ", "PNG", "JPEG")),  # upper-case ext; png bytes in a .jpeg
        ("a4", {"jpg": b"not an image at all", "txt": b"undecodable"}),
        ("a5", {"txt": b"no image", "json": b"{}"}),
        ("a6", sample(6, None)),  # no caption
        ("a7", sample(7, "too small", size=12)),
        ("a8", sample(8, "x" * 300)),  # caption too long
        ("a9", sample(9, "the last one", meta=False)),
    ]
    write_tar(f"{d}/00000.tar", a)
    for k, s in a[:3] + a[9:]:
        expect |= good(k, s, next(e for e in s if e in ("jpg", "png", "webp")))
    expect |= {"sub/a3": (a[3][1]["JPEG"], "spaced caption")}
    b = [(f"b{i}", sample(10 + i, f"tar b {i}")) for i in range(5)]
    # cut inside sample b3's jpg data: b0..b2 survive
    write_tar(f"{d}/00001.tar", b, cut=lambda offs, _: [o for o in offs if o[0] == "b3"][0][3] + 100)
    for k, s in b[:3]:
        expect |= good(k, s)
    c = [(f"c{i}", sample(20 + i, f"tar c {i}")) for i in range(5)]
    # cut at the header of c3's txt (a header boundary: tarfile stops silently): c3 has no caption
    write_tar(f"{d}/00002.tar", c, cut=lambda offs, _: [o for o in offs if o[0] == "c3" and o[1] == "txt"][0][2])
    for k, s in c[:3]:
        expect |= good(k, s)
    e = [(f"e{i}", sample(30 + i, f"tar e {i}", "WEBP", "webp")) for i in range(3)]
    write_tar(f"{d}/00003.tar", e)
    for k, s in e:
        expect |= good(k, s, "webp")
    skips = mf.no_skips() | {"undecodable": 1, "no_media": 1, "no_caption": 2, "too_small": 1}
    return expect, skips | {"caption_length": 1, "tar_truncated": 2}


def read_all(directory: str, split: str = "train") -> list[dict]:
    with ArrayRecordShards(directory, split) as r:
        out = r.read(range(len(r)))
    assert all(o is not None for o in out)
    return out


def raw_headers(directory: str, split: str = "train") -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for s in mf.read_manifest(directory)["splits"][split]["shards"]:
        r = ArrayRecordReader(os.path.join(directory, s["path"]), records.READER_OPTIONS)
        out += [decode_record(x)[0] for x in r.read_all()]
        r.close()
    return out


def test_record_format():
    rec = encode_record({"key": "k", "caption": "é", "id": 3, "media": "jpg"}, [b"abc", b"de"])
    head = b'{"caption":"\xc3\xa9","id":3,"key":"k","media":"jpg","sizes":[3,2]}'
    assert rec == b"MMJ1" + struct.pack("<I", len(head)) + head + b"abcde"
    assert decode_record(rec) == (
        {"caption": "é", "id": 3, "key": "k", "media": "jpg", "sizes": [3, 2]},
        [b"abc", b"de"],
    )
    for bad in (b"MMJ0" + rec[4:], rec[:-1], rec[:6], b"MMJ1" + struct.pack("<I", 999) + rec[8:]):
        with pytest.raises(ValueError):
            decode_record(bad)


def test_expand_shards_and_keys(tmp_path):
    for i in (0, 1, 2, 10):
        write_tar(str(tmp_path / f"{i:05d}.tar"), [("k", {"txt": b"x"})])
    d = str(tmp_path)
    assert tars.expand_shards(f"{d}/{{00000..00002}}.tar") == [f"{d}/{i:05d}.tar" for i in range(3)]
    assert tars.expand_shards(d) == [f"{d}/{i:05d}.tar" for i in (0, 1, 2, 10)]
    assert tars.expand_shards(f"{d}/00010.tar,{d}/{{00001..00002}}.tar") == [f"{d}/{i:05d}.tar" for i in (10, 1, 2)]
    with pytest.raises(FileNotFoundError, match="not found"):
        tars.expand_shards(f"{d}/{{00000..00003}}.tar")
    with pytest.raises(FileNotFoundError):
        tars.expand_shards(str(tmp_path / "empty*.tar"))
    assert tars.split_key("dir.x/0001.seg.JPG") == ("dir.x/0001", "seg.jpg")
    assert tars.split_key("noext") is None


def offsets(path: str) -> list:
    with tarfile.open(path) as t:
        return t.getmembers()


def test_tar_reader_reports_truncation(tmp_path):
    expect, _ = make_tars(str(tmp_path))
    seen = {}
    for name in ("00000", "00001", "00002", "00003"):
        reasons = []
        seen[name] = [k for k, _ in tars.iter_tar_samples(str(tmp_path / f"{name}.tar"), reasons.append)]
        assert len(reasons) == (name in ("00001", "00002")), (name, reasons)
    assert seen["00001"] == ["b0", "b1", "b2"]  # b3's cut jpg is dropped with its sample
    assert seen["00002"] == ["c0", "c1", "c2", "c3"]  # c3 without its txt
    path = str(tmp_path / "00003.tar")  # a damaged header mid-file: tarfile stops silently there
    with open(path, "r+b") as f:
        f.seek([o for o in offsets(path) if o.name == "e1.txt"][0].offset)
        f.write(b"\xff" * 512)
    reasons = []
    assert [k for k, _ in tars.iter_tar_samples(path, reasons.append)] == ["e0", "e1"] and len(reasons) == 1


def test_tar_round_trip(tmp_path):
    expect, skips = make_tars(str(tmp_path / "tars"))
    out = str(tmp_path / "out")
    res = convert(str(tmp_path / "tars/{00000..00003}.tar"), out, workers=2, min_side=16, caption_chars=(1, 200))
    assert res["records"] == len(expect) and res["shards"] == 4 and res["skipped"] == skips
    got = read_all(out)
    assert [g["id"] for g in got] == list(range(len(expect)))
    heads = raw_headers(out)
    assert sorted(h["key"] for h in heads) == sorted(expect)  # every good sample exactly once
    for g, h in zip(got, heads):
        assert (g["image"], g["caption"]) == expect[h["key"]]
    assert {h["key"]: h["media"] for h in heads}["sub/a3"] == "png"
    assert heads[0]["meta"]["url"] == "http://x/0" and "meta" not in {h["key"]: h for h in heads}["a9"]
    m = mf.read_manifest(out)
    assert m["skipped"] == skips and m["splits"]["train"]["skipped"] == skips
    assert m["splits"]["train"]["media"] == ["jpg", "png", "webp"]
    shards = m["splits"]["train"]["shards"]
    assert [s["unit"] for s in shards] == [f"{i:05d}.tar" for i in range(4)]
    assert [s["first_id"] for s in shards] == [0, 5, 8, 11] and [s["records"] for s in shards] == [5, 3, 3, 3]
    assert shards[1]["skipped"]["tar_truncated"] == 1 and shards[2]["skipped"]["no_caption"] == 1
    for s in shards:
        assert s["sha256"] == mf.sha256_file(os.path.join(out, s["path"]))
        assert s == mf.read_json(os.path.join(out, s["path"].replace(".array_record", ".json")))
    assert m["fingerprint"] == mf.fingerprint(m["splits"])
    with ArrayRecordShards(out) as r:
        assert r.captions() == [g["caption"].replace("\n", " ") for g in got]
        r.read([13, 0, 7])
        assert r.keys_read == 3 and r.bytes_read > sum(len(expect[heads[k]["key"]][0]) for k in (13, 0, 7))
    assert not os.path.exists(os.path.join(out, ".tmp")) and not os.path.exists(os.path.join(out, ".scan"))


def write_images(d: str, n: int) -> list[bytes]:
    os.makedirs(d, exist_ok=True)
    blobs = [image(100 + i, "PNG" if i % 2 else "JPEG") for i in range(n)]
    for i, b in enumerate(blobs):
        with open(f"{d}/{i}.img", "wb") as f:
            f.write(b)
    return blobs


def test_list_source_and_second_split(tmp_path):
    blobs = write_images(str(tmp_path / "img"), 8)
    with open(tmp_path / "img" / "bad.img", "wb") as f:
        f.write(b"garbage")
    rows = [(f"img/{i}.img", f"caption {i}", "dog" if i % 3 else "cat") for i in range(8)]
    rows.insert(3, ("img/missing.jpg", "gone", "cat"))
    rows.insert(5, ("img/bad.img", "bad", "dog"))
    with open(tmp_path / "list.csv", "w") as f:
        f.write("image_path,caption,label\n" + "".join(f"{p},{c},{lab}\n" for p, c, lab in rows))
    out = str(tmp_path / "out")
    res = convert(str(tmp_path / "list.csv"), out, workers=1, records_per_shard=3)
    assert res["records"] == 8 and res["shards"] == 3  # 9 rows on disk -> 3 units of 3
    assert res["skipped"] == mf.no_skips() | {"missing": 1, "undecodable": 1}
    got = read_all(out)
    assert [(g["image"], g["caption"], g["label"], g["id"]) for g in got] == [
        (blobs[i], f"caption {i}", int(i % 3 != 0), i) for i in range(8)
    ]
    assert [h["key"] for h in raw_headers(out)] == [f"img/{i}.img" for i in range(8)]
    with open(tmp_path / "test.jsonl", "w") as f:
        f.write(
            "".join(
                json.dumps({"image_path": f"img/{i}.img", "caption": f"t{i}", "label": lab}) + "\n"
                for i, lab in ((6, "cat"), (7, "bird"))
            )
        )
    convert(str(tmp_path / "test.jsonl"), out, split="test", workers=1)
    m = mf.read_manifest(out)
    assert sorted(m["splits"]) == ["test", "train"] and m["splits"]["train"]["records"] == 8
    assert m["label_names"] == ["cat", "dog", "bird"] and m["source"]["kind"] == "list"  # train's indices kept
    test = [(g["image"], g["caption"], g["label"], g["id"]) for g in read_all(out, "test")]
    assert test == [(blobs[6], "t6", 0, 0), (blobs[7], "t7", 2, 1)]
    assert m["fingerprint"] == mf.fingerprint(m["splits"])
    convert(str(tmp_path / "list.csv"), out, workers=1, records_per_shard=9)  # one unit: old shards go
    assert sorted(os.listdir(f"{out}/train")) == [f"shard-00000.{e}" for e in ("array_record", "captions.txt", "json")]
    assert [g["image"] for g in read_all(out)] == blobs and len(read_all(out, "test")) == 2


def test_video_tar(tmp_path):
    pytest.importorskip("av")
    from mmjax.data import video_io

    frames = np.random.default_rng(0).integers(0, 256, [4, 16, 16, 3], dtype=np.uint8)
    clip = video_io.write_video(str(tmp_path / "clip.mp4"), frames)
    with open(clip, "rb") as f:
        mp4 = f.read()
    os.makedirs(tmp_path / "tars")
    write_tar(
        str(tmp_path / "tars/00000.tar"),
        [("v0", {"mp4": mp4, "txt": b"a clip"}), ("v1", {"mp4": b"junk", "txt": b"x"})],
    )
    out = str(tmp_path / "out")
    res = convert(str(tmp_path / "tars"), out, workers=1)
    assert res["records"] == 1 and res["skipped"]["undecodable"] == 1
    assert read_all(out) == [{"video_file": mp4, "caption": "a clip", "id": 0}]
    assert mf.read_manifest(out)["splits"]["train"]["media"] == ["mp4"]


def shard_files(directory: str) -> dict:
    out = {}
    for split in sorted(os.listdir(directory)):
        if os.path.isdir(os.path.join(directory, split)) and not split.startswith("."):
            for name in sorted(os.listdir(os.path.join(directory, split))):
                with open(os.path.join(directory, split, name), "rb") as f:
                    out[f"{split}/{name}"] = f.read()
    return out


def five_tars(d: str) -> str:
    os.makedirs(d, exist_ok=True)
    for t in range(5):
        write_tar(f"{d}/{t:05d}.tar", [(f"{t}-{i}", sample(50 + 4 * t + i, f"tar {t} sample {i}")) for i in range(4)])
    return f"{d}/{{00000..00004}}.tar"


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    src = five_tars(str(tmp_path / "tars"))
    ref = str(tmp_path / "ref")
    convert(src, ref, workers=1)
    out = str(tmp_path / "out")
    script = (
        "import time\nimport mmjax.data.convert as c\nw = c.write_unit\n"
        "def slow(job):\n    e = w(job)\n    time.sleep(0.4)\n    return e\n"
        f"c.write_unit = slow\nc.convert({src!r}, {out!r}, workers=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not os.path.exists(f"{out}/train/shard-00000.json") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not os.path.exists(f"{out}/manifest.json")
    done = sorted(f for f in os.listdir(f"{out}/train") if f.endswith(".json"))
    assert 1 <= len(done) < 5
    kept = os.stat(f"{out}/train/shard-00000.array_record").st_mtime_ns
    with open(f"{out}/.tmp/partial", "wb") as f:
        f.write(b"left by the killed run")
    res = convert(src, out, workers=2)
    assert res["records"] == 20 and res["shards"] == 5
    assert os.stat(f"{out}/train/shard-00000.array_record").st_mtime_ns == kept  # kept, not redone
    assert shard_files(out) == shard_files(ref) and not os.path.exists(f"{out}/.tmp")  # the writer is deterministic
    assert mf.read_manifest(out) == mf.read_manifest(ref)


def test_resume_redoes_missing_and_damaged_units(tmp_path):
    src = five_tars(str(tmp_path / "tars"))
    out = str(tmp_path / "out")
    convert(src, out, workers=1)
    ref, ref_manifest = shard_files(out), mf.read_manifest(out)
    os.remove(f"{out}/manifest.json")
    os.remove(f"{out}/train/shard-00003.array_record")
    os.remove(f"{out}/train/shard-00003.json")
    with open(f"{out}/train/shard-00001.array_record", "r+b") as f:
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    kept = os.stat(f"{out}/train/shard-00002.array_record").st_mtime_ns
    convert(src, out, workers=1)
    assert shard_files(out) == ref and mf.read_manifest(out) == ref_manifest
    assert os.stat(f"{out}/train/shard-00002.array_record").st_mtime_ns == kept
    res = convert(src, out, workers=1, min_side=100)  # other filters: every unit is redone
    assert res["records"] == 0 and res["skipped"]["too_small"] == 20


def test_dedup_keeps_first_good_copy(tmp_path):
    d = str(tmp_path / "tars")
    os.makedirs(d)
    dup, other = sample(70, "first copy"), sample(71, "a caption")
    t0 = [("x0", dict(sample(72, None), jpg=dup["jpg"])), ("x1", dup), ("x2", sample(73, "unique")), ("x3", dup)]
    t1 = [("y0", dict(other, txt=b"again")), ("y1", other), ("y2", dict(dup, txt=b"third copy"))]
    write_tar(f"{d}/00000.tar", [("w0", other)])
    write_tar(f"{d}/00001.tar", t0)
    write_tar(f"{d}/00002.tar", t1)
    out = str(tmp_path / "out")
    res = convert(d, out, workers=2, dedup=True)
    # x0 has no caption, so x1 is the first good copy of `dup`; w0 is the first of `other`
    assert res["records"] == 3 and res["skipped"]["duplicate"] == 4 and res["skipped"]["no_caption"] == 1
    got = read_all(out)
    assert [h["key"] for h in raw_headers(out)] == ["w0", "x1", "x2"]
    assert [g["caption"] for g in got] == ["a caption", "first copy", "unique"]
    assert len({g["image"] for g in got}) == 3 and [g["id"] for g in got] == [0, 1, 2]
    ref = shard_files(out)
    os.remove(f"{out}/train/shard-00001.json")
    assert convert(d, out, workers=1, dedup=True) == res and shard_files(out) == ref
    assert convert(d, str(tmp_path / "plain"), workers=1)["records"] == 7


def test_corrupt_byte_makes_only_that_record_unreadable(tmp_path):
    d = str(tmp_path / "tars")
    os.makedirs(d)
    samples = [(f"s{i}", sample(80 + i, f"caption {i}", size=40)) for i in range(8)]
    write_tar(f"{d}/00000.tar", samples)
    write_tar(f"{d}/00001.tar", [("t0", sample(90, "other shard"))])
    out = str(tmp_path / "out")
    convert(d, out, workers=1)
    clean = read_all(out)
    path = f"{out}/train/shard-00000.array_record"
    with open(path, "rb") as f:
        data = bytearray(f.read())
    blob = samples[3][1]["jpg"]
    at = data.find(blob[len(blob) // 2 : len(blob) // 2 + 64])  # stored uncompressed: the bytes are there
    assert at > 0 and data.find(blob[len(blob) // 2 : len(blob) // 2 + 64], at + 1) < 0
    data[at + 10] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    with ArrayRecordShards(out) as r:
        got = r.read(range(9))
        assert got[3] is None and r.unreadable == 1
        assert [g for i, g in enumerate(got) if i != 3] == [c for i, c in enumerate(clean) if i != 3]
        assert r.read([3]) == [None] and r.read([8, 2]) == [clean[8], clean[2]]
        with pytest.raises(IndexError):
            r.read([9])


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pixels = [np.random.default_rng(i).integers(0, 256, [16, 16, 3], dtype=np.uint8) for i in range(5)]

    class MmjaxConvertToy(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            feats = {"image": tfds.features.Image(encoding_format="png"), "caption": tfds.features.Text()}
            feats["label"] = tfds.features.ClassLabel(names=["a", "b"])
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, px in enumerate(pixels):
                yield i, {"image": px, "caption": f"toy {i}", "label": i % 2}

    MmjaxConvertToy(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    out = str(tmp_path / "out")
    res = convert("tfds:mmjax_convert_toy", out, workers=1, records_per_shard=2, data_dir=str(tmp_path / "tfds"))
    assert res["records"] == 5 and res["shards"] == 3
    got = read_all(out)
    ds = tfds.builder_from_directory(str(tmp_path / "tfds" / "mmjax_convert_toy" / "1.0.0"))
    order = [ex["caption"].decode() for ex in tfds.as_numpy(ds.as_dataset(split="train", shuffle_files=False))]
    assert [(g["caption"], g["id"]) for g in got] == [(c, i) for i, c in enumerate(order)]  # the split's order
    for g in got:
        i = int(g["caption"].split()[1])
        assert g["label"] == i % 2
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(g["image"]))), pixels[i])
    assert mf.read_manifest(out)["label_names"] == ["a", "b"]


def test_convert_module_does_not_import_tensorflow():
    code = (
        "import sys, mmjax.data.convert, mmjax.data.records, mmjax.data.tars\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert convert_lib.WRITER_OPTIONS.startswith("group_size:1")


# ---------------------------------------------------------------- `mmjax data convert` (CLI) and the Beam pipeline


def run_cli(argv: list, capsys) -> tuple[int, list[str], list[str]]:
    """cli.main(argv) -> (exit code, stdout lines, stderr lines)."""
    from mmjax import cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_cli_convert_prints_one_json_line(tmp_path, capsys):
    expect, skips = make_tars(str(tmp_path / "tars"))
    out = str(tmp_path / "out")
    argv = ["data", "convert", str(tmp_path / "tars/{00000..00003}.tar"), "--out", out, "--workers", "1"]
    argv += ["--min-side", "16", "--caption-chars", "1,200"]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0 and len(stdout) == 1, stdout
    line = json.loads(stdout[0])
    assert line == {
        "records": len(expect),
        "skipped": sum(skips.values()),
        "skipped_by_reason": skips,
        "shards": 4,
        "out": out,
    }
    assert [e for e in stderr if e.startswith("mmjax data convert: shard ")] == [
        f"mmjax data convert: shard {i + 1}/4: train/shard-{i:05d}.array_record ({n} records)"
        for i, n in enumerate((5, 3, 3, 3))
    ]
    assert mf.read_manifest(out)["splits"]["train"]["records"] == len(expect) == len(read_all(out))
    code, again, stderr = run_cli(argv, capsys)  # a rerun keeps every shard
    assert code == 0 and again == stdout and "mmjax data convert: 4 of 4 shards kept from a previous run" in stderr


def test_cli_convert_user_errors(tmp_path, capsys):
    five_tars(str(tmp_path / "tars"))
    out = str(tmp_path / "out")
    cases = [
        (["data", "convert", str(tmp_path / "nope/{00000..00001}.tar"), "--out", out], "2 shard(s) not found"),
        (["data", "convert", str(tmp_path / "list.csv"), "--out", out], "no such list file"),
        (["data", "convert", str(tmp_path / "tars"), "--out", out, "--caption-chars", "5"], "expected MIN,MAX"),
        (["data", "convert", str(tmp_path / "tars"), "--out", out, "--caption-chars", "9,3"], "0 <= MIN <= MAX"),
        (["data", "convert", str(tmp_path / "tars")], "needs --out DIR"),
        (["data", "convert", "--out", out], "needs SRC"),
        (["data", "convert", str(tmp_path / "tars"), "--out", out, "--beam-options=--x"], "needs --runner beam"),
        (["data", "convert", str(tmp_path / "tars"), "--out", out, "--config.data.name=x"], "takes no --config"),
        (["data", "prepare"], "mmjax data prepare needs --config"),
        (["data", "bench", str(tmp_path / "tars"), "--config", "c.py"], "takes no SRC"),
        (["data", "bench", "--config", "c.py", "--process-index", "2", "--process-count", "2"], "0 <= index < count"),
    ]
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        cases.append((["data", "convert", str(tmp_path / "tars"), "--out", out, "--runner", "beam"], ".[beam]"))
    for argv, words in cases:
        code, stdout, stderr = run_cli(argv, capsys)
        assert code == 2 and stdout == [] and len(stderr) == 1, (argv, stdout, stderr)
        assert stderr[0].startswith("mmjax: error: ") and words in stderr[0], (argv, stderr)
    assert not os.path.exists(out)  # nothing was started
    from mmjax import cli

    # Beam's own --runner inside --beam-options: the `=` form keeps it one value
    args = cli._parser().parse_args(["data", "convert", "s", "--out", "o", "--runner", "beam", BEAM_FLAGS])
    assert (args.runner, args.beam_options) == ("beam", "--runner=DataflowRunner --project=p --region=r")


BEAM_FLAGS = "--beam-options=--runner=DataflowRunner --project=p --region=r"


def test_convert_beam_direct_runner_equals_local(tmp_path, capsys):
    """The Beam pipeline (DirectRunner) writes the local conversion's files byte for byte;
    in memory and over worker processes, with --dedup, from the CLI, and resumes a partial run."""
    pytest.importorskip("apache_beam")
    from mmjax.data.convert_beam import convert_beam

    make_tars(str(tmp_path / "tars"))
    src, kw = str(tmp_path / "tars/{00000..00003}.tar"), {"min_side": 16, "caption_chars": (1, 200)}
    local, beam = str(tmp_path / "local"), str(tmp_path / "beam")
    ref = convert(src, local, workers=1, **kw)
    got = convert_beam(src, beam, workers=1, beam_options="--direct_running_mode=in_memory", **kw)
    assert got == dict(ref, out=beam) and got["records"] == 14 and got["skipped"]["tar_truncated"] == 2
    assert shard_files(beam) == shard_files(local) and mf.read_manifest(beam) == mf.read_manifest(local)
    assert sorted(os.listdir(beam)) == ["manifest.json", "train"]  # no .tmp / .scan left

    d = str(tmp_path / "dups")  # --dedup over worker processes (DirectRunner multi_processing)
    os.makedirs(d)
    dup, other = sample(70, "first copy"), sample(71, "a caption")
    write_tar(f"{d}/00000.tar", [("w0", other), ("w1", dict(dup, txt=b"kept"))])
    write_tar(f"{d}/00001.tar", [("x0", dup), ("x1", sample(73, "unique")), ("x2", dict(other, txt=b"again"))])
    write_tar(f"{d}/00002.tar", [("y0", dict(dup, txt=b"third copy")), ("y1", sample(74, "last"))])
    dref = convert(d, str(tmp_path / "dl"), workers=1, dedup=True)
    dgot = convert_beam(d, str(tmp_path / "db"), workers=2, dedup=True)
    assert dref["records"] == 4 and dref["skipped"]["duplicate"] == 3
    assert dgot == dict(dref, out=str(tmp_path / "db"))
    assert shard_files(str(tmp_path / "db")) == shard_files(str(tmp_path / "dl"))
    assert mf.read_manifest(str(tmp_path / "db")) == mf.read_manifest(str(tmp_path / "dl"))

    os.remove(f"{beam}/manifest.json")  # a partial run: shard 2 missing, the others kept
    os.remove(f"{beam}/train/shard-00002.json")
    kept = os.stat(f"{beam}/train/shard-00001.array_record").st_mtime_ns
    assert convert_beam(src, beam, workers=1, **kw) == got
    assert os.stat(f"{beam}/train/shard-00001.array_record").st_mtime_ns == kept
    assert shard_files(beam) == shard_files(local) and mf.read_manifest(beam) == mf.read_manifest(local)

    cli_out = str(tmp_path / "cli")
    argv = ["data", "convert", src, "--out", cli_out, "--min-side", "16", "--caption-chars", "1,200"]
    code, stdout, _ = run_cli([*argv, "--runner", "beam", "--beam-options=--direct_running_mode=in_memory"], capsys)
    assert code == 0 and len(stdout) == 1, stdout
    line = json.loads(stdout[0])
    assert (line["records"], line["skipped"], line["shards"]) == (14, 8, 4)
    assert shard_files(cli_out) == shard_files(local)
