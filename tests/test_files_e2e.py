"""A user's own CSV list, end to end through the CLI: a missing file and a corrupt
image are skipped and counted, the run finishes and evaluates."""

import json
import os

import numpy as np
from PIL import Image

from mmjax import cli
from tiny import DEMO

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}


def test_csv_list_with_bad_rows(tmp_path):
    rows = ["image_path,caption"]
    rng = np.random.default_rng(0)
    for i in range(40):
        name = list(COLOURS)[i % 4]
        img = np.zeros((20, 20, 3), np.uint8) + np.array(COLOURS[name], np.uint8)
        img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {name} square")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows.append("broken.png,a broken image")
    rows.append("missing.png,a missing image")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    wd = tmp_path / "wd"
    code = cli.main(
        [
            "train",
            "--config",
            DEMO,
            "--workdir",
            str(wd),
            "--no-progress",
            "--config.data.name=files",
            f"--config.data.path={tmp_path / 'list.csv'}",
            "--config.data.eval_fraction=0.3",
            "--config.data.image_size=16",
            "--config.data.text_len=8",
            "--config.data.tokenizer.vocab_size=30",
            "--config.model.image=mu/8",
            "--config.model.image_overrides={}",
            "--config.model.text_overrides={}",
            "--config.model.embed_dim=16",
            "--config.train.batch_size=8",
            "--config.train.steps=4",
            "--config.train.log_every=2",
            "--config.train.ckpt_every=0",
            "--config.eval.every=0",
            "--config.eval.batch_size=8",
        ]
    )
    assert code == 0
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    # The missing file is counted when the list is read (by each split's reader); the
    # corrupt PNG when it is decoded, in whichever split it fell.
    from mmjax.data import files

    kept, _ = files.read_list(str(tmp_path / "list.csv"))
    test_paths = {r["image_path"] for r in files.split_rows(kept, "test", 0.3)}
    broken_in_test = str(tmp_path / "broken.png") in test_paths
    train_skipped = max(r.get("skipped_records", 0) for r in train)
    eval_skipped = evals[-1].get("skipped_records", 0)
    assert eval_skipped == (2 if broken_in_test else 1)
    assert train_skipped >= (1 if broken_in_test else 2)
    assert evals[-1]["num_images"] == len(test_paths) - int(broken_in_test)
    assert os.path.isdir(wd / "checkpoints" / "4")
