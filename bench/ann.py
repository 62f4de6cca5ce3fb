"""Approximate vs exact image search: build time, index size, queries/s and recall@10 for each FAISS index type.

    python -m bench.ann                                   # 1M x 512 rows; 15 min on 2 busy CPU cores
    python -m bench.ann --n 100000 --nprobe 4,8,16 --ef-search 16,32,64 --output bench-ann-100k.json
    PYTHONPATH=. python bench/ann.py --n 20000            # the same while bench/ is not a package yet

This is a benchmark, not a test: it prints a table and writes JSON, and reports the target (an approximate
setting with recall@10 >= 0.95 at >= 10x the exact search's queries/s) as PASS/MISS, never as an exit code.

The data are generated, seeded, like image embeddings: unit vectors of low intrinsic dimension. Cluster centres
are drawn in an `--intrinsic-dim`-dimensional space, each row is its centre plus Gaussian spread `--spread`
times the centres' own scale there (so clusters overlap, and a query's true neighbours often lie in other
clusters: the run prints how often), then mapped to `--dim` dimensions by one fixed random linear map, given a
little isotropic noise and L2-normalised. Rows are written in chunks straight to a float16 .npy file and read
back as a read-only memmap, exactly as inference/index.py stores an index (1M x 512 is 1 GB on disk, a few hundred MB
of memory while generating). Queries are fresh draws from the same clusters, kept in float32 as an encoder
returns them.

The exact reference is the `flat` index: FAISS's blocked BLAS inner products over every row, the same search
as a flat index. Its results are the ground truth for recall. All types search the whole query batch
in one call with the same thread count (--threads). A search is timed once; if that took under 5 s it is run
twice more and the median is reported.
"""
import argparse
import os
import resource
import statistics
import tempfile
import time

import numpy as np

from engine.errors import run_entry
from engine.files import write_json
from inference import ann

OFF_SUBSPACE_NOISE = 0.25  # isotropic noise std per dimension, relative to the clustered part's: ~6% of energy
GENERATE_ROWS = 65536  # rows generated at a time: (65536, 512) float32 is 128 MB
RECALL_TARGET, SPEEDUP_TARGET = 0.95, 10.0


def clustered_unit_vectors(path, n, n_queries, dim, clusters, intrinsic_dim, spread, seed):
    """(rows: (n, dim) float16 read-only memmap at `path`, row cluster labels, queries (Q, dim) float32,
    query labels); see the module docstring for the model."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, intrinsic_dim), dtype=np.float32)  # (C, r)
    lift = rng.standard_normal((intrinsic_dim, dim), dtype=np.float32) / np.sqrt(intrinsic_dim)  # (r, D)
    noise = OFF_SUBSPACE_NOISE * np.sqrt(1 + spread ** 2)  # z @ lift has per-dimension std sqrt(1 + spread^2)

    def draw(count):
        labels = rng.integers(0, clusters, count)
        z = centers[labels] + spread * rng.standard_normal((count, intrinsic_dim), dtype=np.float32)  # (n, r)
        x = z @ lift + noise * rng.standard_normal((count, dim), dtype=np.float32)  # (n, D)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, labels

    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    labels = np.empty(n, np.int32)
    for start in range(0, n, GENERATE_ROWS):
        x, labels[start:start + GENERATE_ROWS] = draw(min(GENERATE_ROWS, n - start))
        rows[start:start + len(x)] = x
    rows.flush()
    del rows
    queries, query_labels = draw(n_queries)
    return np.load(path, mmap_mode="r"), labels, queries, query_labels


def timed_search(ann, index, queries, k, **params):
    """(median seconds over the runs, the runs, (scores, ids) of the first run)."""
    runs, result = [], None
    while len(runs) < 1 or (len(runs) < 3 and runs[0] < 5.0):
        start = time.perf_counter()
        out = ann.search(index, queries, k, **params)
        runs.append(time.perf_counter() - start)
        result = result or out
    return statistics.median(runs), runs, result


def recall_at(ids, exact):
    k = exact.shape[1]
    return float(np.mean([len(np.intersect1d(a[:k], b)) / k for a, b in zip(ids, exact, strict=True)]))


def measure(ann, kind, rows, queries, folder, build_args, sweep, exact, report):
    """Build one index, save it for its size, time its searches; one report row per search setting."""
    start = time.perf_counter()
    index = ann.build(rows, kind, **build_args)
    build_s = time.perf_counter() - start
    path = os.path.join(folder, f"{kind}.faiss")
    ann.save(index, path)
    size = os.path.getsize(path)
    os.remove(path)
    info = ann.describe(index)
    results = []
    for params in sweep:
        seconds, runs, (scores, ids) = timed_search(ann, index, queries, 10, **params)
        row = {"kind": kind, "params": params, "index": info, "build_s": build_s, "size_bytes": size,
               "qps": len(queries) / seconds, "search_runs_s": runs,
               "recall_at_10": 1.0 if exact is None else recall_at(ids, exact)}
        results.append((row, scores, ids))
        report.append(row)
        print(f"  {kind} {params or ''}: {row['qps']:.0f} queries/s, recall@10 {row['recall_at_10']:.4f}",
              flush=True)
    del index  # one index in memory at a time
    return results


def int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas, got '{text}'")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="indexed rows")
    p.add_argument("--dim", type=int, default=512, help="embedding width")
    p.add_argument("--queries", type=int, default=1000, help="queries, searched as one batch")
    p.add_argument("--clusters", type=int, default=1000, help="cluster centres")
    p.add_argument("--intrinsic-dim", type=int, default=32, help="dimension the clusters live in")
    p.add_argument("--spread", type=float, default=1.0, help="cluster std relative to the centres' std")
    p.add_argument("--types", default="ivf,hnsw", help="approximate types to time against flat (comma-separated)")
    p.add_argument("--nlist", type=int, help="ivf lists; default inference/ann.py's rule, 4*sqrt(N)")
    p.add_argument("--nprobe", type=int_list, default=[16, 32, 64, 128], help="ivf lists scanned, e.g. 8,16,32")
    p.add_argument("--m", type=int, default=32, help="hnsw links per node")
    p.add_argument("--ef-construction", type=int, default=40, help="hnsw candidates kept while inserting")
    p.add_argument("--ef-search", type=int_list, default=[32, 64, 128, 256], help="hnsw candidates kept, e.g. 32,64")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="FAISS threads, all types")
    p.add_argument("--seed", type=int, default=0, help="data, queries and ivf training sample")
    p.add_argument("--output", default="bench-ann.json", help="JSON results file")
    a = p.parse_args(argv)
    a.types = [t.strip() for t in a.types.split(",") if t.strip()]
    if any(t not in ("ivf", "hnsw") for t in a.types):
        p.error(f"--types takes ivf and/or hnsw (flat always runs as the reference), got {','.join(a.types)}")
    if min(a.n, a.dim, a.queries, a.clusters, a.intrinsic_dim, a.threads) < 1 or a.spread < 0:
        p.error("--n, --dim, --queries, --clusters, --intrinsic-dim and --threads must be >= 1, --spread >= 0")
    return a


def format_table(rows, flat_qps):
    header = ("type", "setting", "build s", "size MB", "queries/s", "vs flat", "recall@10", "target")
    lines = [header]
    for r in rows:
        setting = ", ".join(f"{k}={v}" for k, v in {**r["index"], **r["params"]}.items()
                            if k not in ("kind", "rows", "dim"))
        lines.append((r["kind"], setting or "exact", f"{r['build_s']:.1f}", f"{r['size_bytes'] / 1e6:.0f}",
                      f"{r['qps']:.0f}", f"{r['qps'] / flat_qps:.1f}x", f"{r['recall_at_10']:.4f}",
                      r.get("status", "")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def summarize(a, faiss, started, load_before, report, extra):
    """The JSON result so far; PASS/MISS marks against the flat row."""
    flat_qps = report[0]["qps"]
    for r in report[1:]:
        ok = r["recall_at_10"] >= RECALL_TARGET and r["qps"] >= SPEEDUP_TARGET * flat_qps
        r["status"] = "PASS" if ok else "MISS"
    return {"settings": vars(a), "threads": a.threads, "cores": os.cpu_count(), "faiss": faiss.__version__,
            **extra, "peak_resident_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "seconds": time.perf_counter() - started, "results": report,
            "target": f"recall@10 >= {RECALL_TARGET} at >= {SPEEDUP_TARGET:g}x flat's queries/s",
            "met_by": [{"kind": r["kind"], **r["params"]} for r in report[1:] if r["status"] == "PASS"]}


def main(argv=None):
    return run_entry(run, parse_args(argv))


def run(a):
    import faiss  # ann has already turned a missing package into its one-line error
    faiss.omp_set_num_threads(a.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    report, extra = [], {"complete": False}
    with tempfile.TemporaryDirectory(prefix="bench-ann-") as folder:
        rows, labels, queries, query_labels = clustered_unit_vectors(
            os.path.join(folder, "embeddings.npy"), a.n, a.queries, a.dim, a.clusters, a.intrinsic_dim, a.spread,
            a.seed)
        extra["generate_s"] = time.perf_counter() - started
        extra["peak_resident_mb_after_generating"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"generated {a.n} x {a.dim} rows in {extra['generate_s']:.1f} s "
              f"(peak resident {extra['peak_resident_mb_after_generating']:.0f} MB)", flush=True)
        ((_, exact_scores, exact),) = measure(ann, "flat", rows, queries, folder, {}, [{}], None, report)
        # How hard the data are: neighbours across clusters, and cosines of the 1st/10th neighbour vs a random row.
        random_rows = rows[np.sort(np.random.default_rng(a.seed).choice(a.n, min(a.n, 1000), replace=False))]
        data = extra["data"] = {
            "other_cluster_share_of_top10": float(np.mean(labels[exact] != query_labels[:, None])),
            "mean_cosine_1st": float(exact_scores[:, 0].mean()), "mean_cosine_10th": float(exact_scores[:, -1].mean()),
            "mean_cosine_random": float((queries @ random_rows.astype(np.float32).T).mean())}
        print(f"  {data['other_cluster_share_of_top10']:.0%} of the exact top-10 neighbours lie in another "
              f"cluster than their query's; mean cosine of the 1st neighbour {data['mean_cosine_1st']:.3f}, "
              f"10th {data['mean_cosine_10th']:.3f}, a random row {data['mean_cosine_random']:.3f}", flush=True)
        build = {"ivf": {"nlist": a.nlist, "seed": a.seed}, "hnsw": {"m": a.m, "ef_construction": a.ef_construction}}
        sweep = {"ivf": [{"nprobe": v} for v in a.nprobe], "hnsw": [{"ef_search": v} for v in a.ef_search]}
        for kind in a.types:
            write_json(a.output, summarize(a, faiss, started, load_before, report, extra))  # kept if a timeout hits
            measure(ann, kind, rows, queries, folder, build[kind], sweep[kind], exact, report)
        del rows
    extra["complete"] = True
    result = summarize(a, faiss, started, load_before, report, extra)
    print(format_table(report, report[0]["qps"]))
    print(f"target ({result['target']}): " + ("met by " + "; ".join(
        f"{m['kind']} " + ", ".join(f"{k}={v}" for k, v in m.items() if k != "kind") for m in result["met_by"])
        if result["met_by"] else "MISSED by every setting"))
    print(f"{a.threads} FAISS threads on {os.cpu_count()} cores; load average {load_before[0]:.2f} before, "
          f"{result['load_average_after'][0]:.2f} after; peak resident {result['peak_resident_mb']:.0f} MB; "
          f"total {result['seconds']:.0f} s")
    write_json(a.output, result)
    print(f"results written to {a.output}")
    return result


if __name__ == "__main__":
    main()
