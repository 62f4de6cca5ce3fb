"""The web service under load: its memory when refusing decompression bombs and answering ordinary requests, and
its latency and throughput with many concurrent text searches.

    python -m bench.serve                                    # builds a tiny checkpoint and index in a temp folder
    python -m bench.serve --index indexes/photos --clients 50 --seconds 20 --output bench-serve.json

The real app (`inference.serve.create_app`) runs under uvicorn in a background thread of this process, listening
on 127.0.0.1 only, so VmRSS from /proc/self/status is the server's memory. The load test's clients run in a child
process: client threads in this one would take the GIL from the server and be measured as server latency. Every
request loop is bounded in count and in time. Numbers, never a pass/fail exit: the memory target is reported as
PASS or MISS.
"""
import argparse
import contextlib
import gc
import io
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import httpx
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.yaml")
HOST = "127.0.0.1"  # the only address this benchmark sends traffic to
BOMB_UPLOADS = 20  # uploads of each over-limit image
NORMAL_REQUESTS = 200  # text searches and small image uploads, alternating
GROWTH_TARGET_MB = 50.0  # resident memory the refused uploads may add
MAX_REQUESTS_PER_CLIENT = 100_000  # a count bound on each load-test client, on top of --seconds
REQUEST_TIMEOUT_S = 30.0
QUERIES = ("a big red circle in the top left", "small blue square, centre", "there is a yellow star at the bottom",
           "green triangle", "a picture of a large purple circle coloured purple in the upper right")


# ---------------------------------------------------------------- a checkpoint and an index to serve

def build_setup(folder, model_path, device):
    """(checkpoint, index folder) of a one-epoch demo model over 96 demo images, as tests/helpers.tiny_run makes
    it; with `model_path`, that checkpoint instead of training one."""
    from inference.encoder import Encoder
    from inference.index import build_index
    from tools import demo

    train_root, valid_root = os.path.join(folder, "train"), os.path.join(folder, "valid")
    quiet = contextlib.redirect_stdout(io.StringIO())  # the demo's "wrote ..." lines would cut into the report
    with quiet:
        # a small validation split first: make_demo leaves an existing one alone (it would write all 576 scenes)
        demo.write_split(valid_root, random.Random(1).sample(demo.all_scenes(), 96), 1, random.Random(2))
    if model_path is None:
        with quiet:
            demo.make_demo(train_root, valid_root, os.path.join(folder, "text"), train_images=16,
                           captions_per_image=1)
        model_path = os.path.join(folder, "ck", "best.pt")
        # train.py in its own process: nothing imports an entry script, and training's memory would otherwise
        # sit in the server's resident size and peak
        done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", DEMO_CONFIG,
                               "--train-root", train_root, "--valid-root", valid_root,
                               "--text-model", os.path.join(folder, "text"), "--epochs", "1", "--batch-size", "16",
                               "--image-size", "32", "--num-workers", "0", "--device", device,
                               "--select-root", valid_root,  # 16 training images: none to hold out
                               "--last-path", os.path.join(folder, "ck", "last.pt"), "--best-path", model_path],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode:
            sys.stderr.write(done.stdout[-4000:])
            raise RuntimeError(f"training the demo model failed (exit {done.returncode}); its output is above")
    index = os.path.join(folder, "index")
    build_index(Encoder(model_path, device), os.path.join(valid_root, "images"), index, progress=False)
    return model_path, index


# ---------------------------------------------------------------- the server in a thread

class Server:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a daemon thread; `stop()` ends it."""

    def __init__(self, app):
        import uvicorn
        self.socket = socket.socket()
        self.socket.bind((HOST, 0))  # the port is ours from here on: no race with another process
        self.url = f"http://{HOST}:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, timeout=60):
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start; see its log above")
            time.sleep(0.05)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


# ---------------------------------------------------------------- memory

def memory_mb():
    """(resident, peak resident) of this process in MB, after a garbage collection."""
    gc.collect()
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MB
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak():
    """Start a new peak (VmHWM) from the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def png(size, mode):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def phase(client, name, requests, expect):
    """Send `requests` (callables) one by one; memory before/after and the peak, and statuses other than `expect`."""
    peak_reset = reset_peak()
    before, _ = memory_mb()
    statuses = {}
    start = time.perf_counter()
    for send in requests:
        status = send(client).status_code
        statuses[status] = statuses.get(status, 0) + 1
    seconds = time.perf_counter() - start
    after, peak = memory_mb()
    return {"phase": name, "requests": len(requests), "statuses": statuses, "expected": expect,
            "unexpected": sum(n for s, n in statuses.items() if s != expect), "seconds": round(seconds, 3),
            "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "growth_mb": round(after - before, 1), "peak_mb": round(peak, 1) if peak_reset else None,
            "peak_growth_mb": round(peak - before, 1) if peak_reset else None}


def bench_memory(url, small_image):
    strip, square = png((1, 100_000), "1"), png((10_000, 10_000), "1")

    def upload(data, name):
        return lambda c: c.post("/api/search/image", params={"k": 5}, files={"file": (name, data, "image/png")})

    def text(i):
        return lambda c: c.get("/api/search", params={"q": QUERIES[i % len(QUERIES)], "k": 10})

    normal = [text(i) if i % 2 == 0 else upload(small_image, "small.jpg") for i in range(NORMAL_REQUESTS)]
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:  # no proxy from env
        for send in normal[:10]:  # warm up: first-call allocations are not growth
            send(client)
        return [phase(client, f"{BOMB_UPLOADS} x 1x100000 PNG ({len(strip)} bytes)",
                      [upload(strip, "strip.png")] * BOMB_UPLOADS, 413),
                phase(client, f"{BOMB_UPLOADS} x 10000x10000 1-bit PNG ({len(square)} bytes)",
                      [upload(square, "square.png")] * BOMB_UPLOADS, 413),
                phase(client, f"{NORMAL_REQUESTS} normal (text search / small image upload)", normal, 200)]


# ---------------------------------------------------------------- load

def load_client(url, deadline, seed, out):
    """One client: text searches one after another until `deadline` (time.monotonic()) or the count bound."""
    rng = random.Random(seed)
    latencies, errors = [], 0
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= deadline:
                break
            start = time.perf_counter()
            try:
                ok = client.get("/api/search", params={"q": rng.choice(QUERIES), "k": 10}).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
    out.append((latencies, errors))


def load_process(url, clients, seconds, queue):
    """The child process: `clients` threads against the server for `seconds`; sends the results back."""
    deadline = time.monotonic() + seconds
    out = []
    threads = [threading.Thread(target=load_client, args=(url, deadline, i, out)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put((time.perf_counter() - start, out))


def bench_load(url, clients, seconds):
    ctx = multiprocessing.get_context("spawn")  # not fork: this process runs the server's threads
    queue = ctx.Queue()
    child = ctx.Process(target=load_process, args=(url, clients, seconds, queue), daemon=True)
    child.start()
    elapsed, out = queue.get(timeout=seconds + REQUEST_TIMEOUT_S + 60)
    child.join(timeout=30)
    latencies = sorted(x for lat, _ in out for x in lat)
    done, errors = len(latencies), sum(e for _, e in out)

    def pct(p):
        return round(1000 * latencies[min(done - 1, int(p / 100 * done))], 2) if done else None
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": done + errors, "ok": done,
            "errors": errors, "p50_ms": pct(50), "p99_ms": pct(99),
            "mean_ms": round(1000 * statistics.fmean(latencies), 2) if done else None,
            "requests_per_s": round(done / elapsed, 1) if elapsed else None}


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", help="an existing index folder; default: a tiny demo index built in a temp folder")
    p.add_argument("--model-path", help="checkpoint; default: the index's, or a tiny demo model trained here")
    p.add_argument("--clients", type=int, default=50, help="concurrent load-test clients")
    p.add_argument("--seconds", type=float, default=20.0, help="load-test duration")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (server, and training when one is built)")
    p.add_argument("--output", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if not 1 <= a.clients <= 1000:
        p.error("--clients takes 1 to 1000")
    if not 0 < a.seconds <= 600:
        p.error("--seconds takes more than 0 and at most 600")
    return a


def format_result(r):
    lines = [f"server: {r['images']} images, checkpoint {r['checkpoint']}, device {r['device']}; "
             f"setup {r['setup_seconds']:.0f} s", "", "memory (VmRSS of the server process, MB):"]
    for m in r["memory"]:
        peak = f", peak +{m['peak_growth_mb']:.1f}" if m["peak_growth_mb"] is not None else ""
        lines.append(f"  {m['phase']}: {m['rss_before_mb']:.1f} -> {m['rss_after_mb']:.1f} "
                     f"({m['growth_mb']:+.1f}{peak}) in {m['seconds']:.2f} s; statuses {m['statuses']}"
                     + (f"; {m['unexpected']} not {m['expected']}" if m["unexpected"] else ""))
    lines.append(f"  refused uploads: growth {r['bomb_growth_mb']:+.1f} MB, all 413: {r['bombs_all_413']} "
                 f"(target under {GROWTH_TARGET_MB:g} MB, each 413): {r['memory_status']}")
    ld = r["load"]
    lines += ["", f"load: {ld['clients']} clients for {ld['seconds']:.1f} s on /api/search: {ld['requests']} requests, "
                  f"{ld['errors']} errors, p50 {ld['p50_ms']} ms, p99 {ld['p99_ms']} ms, {ld['requests_per_s']} req/s"]
    return "\n".join(lines)


def run(args):
    from engine.runtime import resolve_device
    from inference.serve import create_app

    device = str(resolve_device(args.device))
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the demo text model's "writing shards" bar would cut into the report
    # Pillow warns on opening the 100 MP header before the server refuses it with 413: expected, not news
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        model_path, index = args.model_path, args.index
        if index is None:
            print("building a tiny demo checkpoint and index (about a minute on 2 CPU cores) ...", flush=True)
            model_path, index = build_setup(folder, model_path, device)
        app = create_app(model_path, index, device=device)
        svc = app.state.service
        setup_seconds = time.perf_counter() - start
        with open(svc.index.path(0), "rb") as f:
            small_image = f.read()  # an indexed image: a valid, small upload
        server = Server(app).start()
        try:
            memory = bench_memory(server.url, small_image)
            load = bench_load(server.url, args.clients, args.seconds)
        finally:
            server.stop()
    bombs = memory[:2]
    growth = bombs[-1]["rss_after_mb"] - bombs[0]["rss_before_mb"]
    all_413 = all(m["unexpected"] == 0 for m in bombs)
    result = {"images": len(svc.index), "checkpoint": os.path.basename(svc.encoder.model_path), "device": device,
              "setup_seconds": round(setup_seconds, 1), "memory": memory, "bomb_growth_mb": round(growth, 1),
              "bombs_all_413": all_413,
              "memory_status": "PASS" if growth < GROWTH_TARGET_MB and all_413 else "MISS", "load": load,
              "settings": vars(args), "python": sys.version.split()[0]}
    print(format_result(result))
    if args.output:
        from engine.files import write_json
        write_json(args.output, result)
        print(f"results written to {args.output}")
    return result


def main(argv=None):
    from engine.errors import run_entry
    return run_entry(run, parse_args(argv))


if __name__ == "__main__":
    main()
