"""Peak memory of `prepare_data chinese-clip` on a small and a large generated TSV: the TSV is streamed, so the
peak should not grow with the file.

    python -m bench.prepare_memory --images 4000   # about 375 MB of TSV; needs about twice that on disk

Each run is a fresh process with one worker, so its own peak RSS (ru_maxrss) is the figure. The images are noise
JPEGs (about 70 KB each, 8 distinct ones reused: the reader's memory does not depend on what they show); a third
of the texts have two right images.
"""
import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

RUN = ("import resource, sys; from tools import prepare_data; prepare_data.main(sys.argv[1:]); "
       "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def write_split(folder, n, seed=0):
    """{folder}/train_imgs.tsv and train_texts.jsonl with `n` images; returns the TSV's size in bytes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=85)
        blobs.append(base64.b64encode(buffer.getvalue()))
    with open(os.path.join(folder, "train_imgs.tsv"), "wb") as f:
        f.writelines(f"{100000 + i}\t".encode() + blobs[i % 8] + b"\n" for i in range(n))
    with open(os.path.join(folder, "train_texts.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            ids = [100000 + i] + ([100000 + (i + 1) % n] if i % 3 == 0 else [])
            f.write(json.dumps({"text_id": i, "text": f"第{i}张图片", "image_ids": ids}, ensure_ascii=False) + "\n")
    return os.path.getsize(os.path.join(folder, "train_imgs.tsv"))


def measure(folder, out):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RUN, "chinese-clip", "--input", folder, "--split", "train",
                             "--output", out, "--workers", "1"], capture_output=True, text=True, check=True)
    peak = int(result.stdout.split("maxrss_kb")[-1])
    return peak, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="images in the large TSV (the small has 100)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print("| TSV | images | peak RSS | time |\n|---|---|---|---|")
        for n in (100, args.images):
            size = write_split(os.path.join(tmp, str(n)), n)
            peak, seconds = measure(os.path.join(tmp, str(n)), os.path.join(tmp, f"out{n}"))
            print(f"| {size / 1e6:.0f} MB | {n} | {peak / 1024:.0f} MB | {seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
