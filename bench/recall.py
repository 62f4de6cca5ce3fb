"""Recall benchmark for `python -m bench`: engine/metrics.py against a per-query top-k loop, on features exact
in float32.

The loop is the naive way to compute recall@K; on features whose dot products come out the same in any
summation order, and with no tie at a top-K boundary, both must give the very same hits.
"""
import math
import time

import torch
import torch.nn.functional as F

from bench.workspace import alternate, sync
from engine.metrics import KS


def exact_features(num_images, num_captions, dim=768, noise=7.0, seed=0):
    """Random features of norm ~1 whose dot products come out the same in any summation order.

    Entries are integers / 4096 and each vector's integer norm stays below 4096, so by Cauchy-Schwarz every
    partial sum of a dot product is an integer below 2**24: exact in float32. A per-query loop and a batched
    matmul then see bit-identical scores, and only a true tie could make them disagree (see `ambiguous`).
    Each caption is its image's feature plus noise; `noise` sets how hard retrieval is (7: R@1 ~0.6 at
    5000x5000).
    """
    g = torch.Generator().manual_seed(seed)
    caption_image = (torch.arange(num_captions) % num_images)[torch.randperm(num_captions, generator=g)]  # (Nc,)
    img = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)  # (Ni, D)
    txt = F.normalize(img[caption_image] + noise * F.normalize(torch.randn(num_captions, dim, generator=g), dim=-1),
                      dim=-1)  # (Nc, D)
    scale = 4096 - math.sqrt(dim) / 2 - 1  # rounding adds at most sqrt(D)/2 to a norm
    return (img * scale).round() / 4096, (txt * scale).round() / 4096, caption_image


def loop_image_queries(img, txt, caption_image, queries):
    """The naive way, image -> text: per image, top-k over all captions; is one of its captions in the first K?"""
    hits = torch.zeros(len(queries), len(KS), dtype=torch.bool)  # (q, len(KS))
    for n, q in enumerate(queries):
        top = (txt @ img[q]).topk(max(KS)).indices  # (kmax,) caption indices, best first
        right = caption_image[top] == q
        for j, k in enumerate(KS):
            hits[n, j] = bool(right[:k].any())
    return hits


def loop_caption_queries(img, txt, caption_image, queries):
    """The naive way, text -> image: per caption, top-k over all images; is its image in the first K?"""
    hits = torch.zeros(len(queries), len(KS), dtype=torch.bool)
    for n, c in enumerate(queries):
        top = (img @ txt[c]).topk(max(KS)).indices  # (kmax,) image indices, best first
        for j, k in enumerate(KS):
            hits[n, j] = bool((top[:k] == caption_image[c]).any())
    return hits


def ambiguous(img, txt, caption_image, image_queries, caption_queries):
    """True when a tie with the right item's score sits at a top-K boundary for one of the queries, so that
    top-k's arbitrary tie order could legitimately disagree with the tie-counting ranks of metrics.py."""
    def straddles(sim, right, wrong):  # sim (q, N), right (q, 1) best right score, wrong (q, N) bool
        ge = ((sim >= right) & wrong).sum(1)
        gt = ((sim > right) & wrong).sum(1)
        return any(bool(((ge < k) != (gt < k)).any()) for k in KS)
    sim = img[image_queries] @ txt.t()  # (q, Nc)
    pos = caption_image[None, :] == image_queries[:, None]
    if straddles(sim, sim.masked_fill(~pos, float("-inf")).amax(1, keepdim=True), ~pos):
        return True
    sim = txt[caption_queries] @ img.t()  # (q, Ni)
    pos = torch.arange(img.shape[0], device=img.device)[None, :] == caption_image[caption_queries][:, None]
    return straddles(sim, sim[pos][:, None], ~pos)


def tie_free_features(images, captions, queries, device, tries=5):
    """exact_features plus `queries` random image and caption queries with no tie at a top-K boundary."""
    for seed in range(tries):  # such a tie is rare: draw again rather than compare around it
        img, txt, caption_image = (t.to(device) for t in exact_features(images, captions, seed=seed))
        g = torch.Generator().manual_seed(seed)
        image_queries = torch.randperm(images, generator=g)[:queries].to(device)
        caption_queries = torch.randperm(captions, generator=g)[:queries].to(device)
        if not ambiguous(img, txt, caption_image, image_queries, caption_queries):
            return img, txt, caption_image, image_queries, caption_queries
    raise RuntimeError(f"could not draw tie-free features in {tries} tries")


def loop_recall(img, txt, caption_image, image_queries, caption_queries, chunks, device):
    """Per-query loop hits (q, len(KS)) both ways, and its time for ALL queries, extrapolated from each of
    `chunks` slices of the given queries (one estimate per slice)."""
    estimates, i2t, t2i = [], [], []
    for s in range(chunks):
        seconds = 0.0
        for queries, fn, out, total in ((image_queries[s::chunks], loop_image_queries, i2t, img.shape[0]),
                                        (caption_queries[s::chunks], loop_caption_queries, t2i, txt.shape[0])):
            sync(device)
            start = time.perf_counter()
            out.append(fn(img, txt, caption_image, queries))
            sync(device)
            seconds += (time.perf_counter() - start) / len(queries) * total
        estimates.append(seconds)
    order_i = torch.cat([image_queries[s::chunks] for s in range(chunks)]).cpu()
    order_c = torch.cat([caption_queries[s::chunks] for s in range(chunks)]).cpu()
    return estimates, order_i, torch.cat(i2t), order_c, torch.cat(t2i)


def query_ranks(img, txt, caption_image, image_queries, caption_queries):
    """metrics.py's 0-based ranks for just these queries, each still against every candidate."""
    from engine.metrics import retrieval_ranks
    # image queries: the chosen images against all captions. Captions of other images point at an extra
    # all-zero image, which is no query's own: each query's right captions and candidates stay the same.
    q = len(image_queries)
    where = torch.full((img.shape[0],), q, dtype=torch.long, device=img.device)
    where[image_queries] = torch.arange(q, device=img.device)
    chosen = torch.cat([img[image_queries], img.new_zeros(1, img.shape[1])])  # (q + 1, D)
    i2t = retrieval_ranks(chosen, txt, where[caption_image])[0][:q]
    _, t2i = retrieval_ranks(img, txt[caption_queries], caption_image[caption_queries])
    return i2t, t2i


def bench_recall(args, device, report):
    from engine.metrics import retrieval_metrics
    ks = torch.tensor(KS)
    for captions, images in args.recall_sizes:
        q = min(args.loop_queries, images, captions)
        chunks = min(args.repeats, q)
        img, txt, caption_image, image_queries, caption_queries = tie_free_features(images, captions, q, device)
        loop_s, iq, loop_i2t, cq, loop_t2i = loop_recall(img, txt, caption_image, image_queries, caption_queries,
                                                         chunks, device)
        i2t_rank, t2i_rank = query_ranks(img, txt, caption_image, iq.to(device), cq.to(device))
        vec_i2t = i2t_rank[:, None] < ks  # (q, len(KS)): hit at each K, from metrics.py's ranks
        vec_t2i = t2i_rank[:, None] < ks
        identical = torch.equal(vec_i2t, loop_i2t) and torch.equal(vec_t2i, loop_t2i)
        # the bare similarity product is the floor for any exact recall: metrics.py should cost little beyond it
        times = alternate({"metrics": lambda img=img, txt=txt, ci=caption_image: retrieval_metrics(img, txt, ci),
                           "product": lambda img=img, txt=txt: img @ txt.t()},  # (Ni, Nc)
                          args.repeats, device, warmup=0)
        name = f"{captions}x{images}"
        partial = q < max(images, captions)
        base = report.add("recall", f"per-query loop + topk, {name}" + (" (extrapolated)" if partial else ""),
                          "s", loop_s, is_baseline=True, queries_timed=2 * q)
        # the loop is the reference for the hits only; speed is judged against the bare product (the row below):
        # an exact recall cannot beat the product it needs, and the retired "50x the loop" target measured the loop
        metrics_row = report.add("recall", f"metrics.retrieval_metrics, {name}", "s", times["metrics"], base,
                                 lower_is_better=True, target="same recall",
                                 check=lambda r, same=identical: same, identical=identical, queries_compared=2 * q,
                                 recall_loop=loop_i2t.double().mean(0).tolist() + loop_t2i.double().mean(0).tolist(),
                                 recall_metrics=vec_i2t.double().mean(0).tolist() + vec_t2i.double().mean(0).tolist())
        # baseline = the metrics row, so its ratio is metrics time / product time: the cost of counting on top
        report.add("recall", f"bare product img @ txt.T, {name}", "s", times["product"], metrics_row,
                   lower_is_better=True, target="metrics <= 1.3x product", check=lambda r: r["ratio"] <= 1.3,
                   metrics_over_product_per_round=[m / p for m, p in
                                                   zip(times["metrics"], times["product"], strict=True)])
        if partial:
            report.notes.append(f"recall {name}: the loop ran {q} image and {q} caption queries in {chunks} "
                                f"slices, each slice's time extrapolated to all {images}+{captions} queries; "
                                f"hits compared with metrics.py's ranks on those {2 * q} queries")
    report.notes.append("recall: random 768-d features of norm ~1, dot products exact in float32 and no tie at a "
                        "top-K boundary, so the loop and metrics.py must give identical hits")
    report.notes.append("recall: the bare product row's ratio is metrics.retrieval_metrics time / bare product "
                        "time (medians of runs alternating in this process)")

