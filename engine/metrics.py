"""Retrieval metrics from features: recall@K, median and mean rank, rsum, mean recall, and the mean over folds
of consecutive images (COCO 1K); no Python loop over queries.

The rank of a query is the number of wrong candidates that score at least as high as its best right one, so a
tie is counted against the model: a constant similarity matrix gets recall ~0, not 1.

The (Ni, Nc) similarity matrix is never held whole. It is made one tile at a time (at most MAX_MATRIX
similarities), and each tile is counted in both directions while it is still in cache: how many captions in it
reach each image's threshold, how many images reach each caption's.
A threshold is a right score, so the tiles holding right scores (each image block against its own captions)
are made and counted first; every other tile is then made once and counted against known thresholds. The
product is the only work that grows with D; the counting is two in-place comparisons per similarity.

A text that several images share (MUGE gives one query text several right images) is one text -> image query
that hits when any of its images is in the top K: grouped_text_ranks. Data where every text is unique never
takes that path, so its numbers are those of retrieval_ranks to the last digit.
"""
import math
from itertools import accumulate

import torch

KS = (1, 5, 10)
MAX_MATRIX = 2**20  # similarities in one tile: 4 MiB of float32, plus 4 MiB for its comparisons; stays in L3
BLOCK_IMAGES = 512  # images per tile: tiles are 512 images x 2048 captions (fewer, larger products than 256 x 1024)


def image_blocks(counts, rows, width):
    """Cut images 0..Ni-1 into runs of at most `rows` images having at most `width` captions in all (an image
    with more captions than that is a run alone) -> [(i0, i1)]. `counts` (Ni,) is each image's caption count."""
    blocks, start, captions = [], 0, 0
    for i, n in enumerate(counts):
        if i > start and (i - start == rows or captions + n > width):
            blocks.append((start, i))
            start, captions = i, 0
        captions += n
    if counts:
        blocks.append((start, len(counts)))
    return blocks


def tile_plan(counts, rows, max_matrix):
    """The order in which the similarity matrix is made, with captions grouped by image (image i's captions are
    positions starts[i]:starts[i + 1] of that order) -> [(diagonal, c0, c1, tiles)].

    Each entry is a group of grouped captions c0:c1, whose features are gathered once, and the tiles
    (i0, i1, lo, hi) of images i0:i1 x captions lo:hi made against them. The diagonal groups come first, one per
    image block: the block against its own captions, so that every right score is known before any other tile
    is counted. Then the captions in slices of `width`, each against every image block, skipping what that
    block's diagonal tile already made. Every (image, caption) pair is made exactly once, and a tile holds at
    most rows * width <= max_matrix similarities, unless a single image has more captions than that.
    """
    width = max(1, max_matrix // rows)
    starts = [0, *accumulate(counts)]  # (Ni + 1,)
    blocks = [(i0, i1, starts[i0], starts[i1]) for i0, i1 in image_blocks(counts, rows, width)]
    plan = [(True, c0, c1, [(i0, i1, c0, c1)]) for i0, i1, c0, c1 in blocks if c0 < c1]  # skip caption-less
    for a in range(0, starts[-1], width):
        b = min(a + width, starts[-1])
        tiles = [(i0, i1, lo, hi) for i0, i1, c0, c1 in blocks
                 for lo, hi in ((a, min(b, c0)), (max(a, c1), b)) if lo < hi]  # the slice outside c0:c1
        plan.append((False, a, b, tiles))
    return plan


@torch.no_grad()
def retrieval_ranks(image_features, text_features, caption_image, chunk=BLOCK_IMAGES, max_matrix=MAX_MATRIX):
    """0-based ranks for every image query (image -> text) and every caption query (text -> image).

    image_features (Ni, D) and text_features (Nc, D), L2-normalised; caption_image (Nc,) gives each caption's
    image index. The similarities are made in tiles of at most `chunk` images and `max_matrix` similarities
    (see tile_plan); two buffers of the largest tile's size are all the similarity memory used.
    """
    img, txt = image_features.float(), text_features.float()  # (Ni, D), (Nc, D)
    caption_image = caption_image.to(img.device)
    max_matrix = min(max_matrix, 2**24)  # a tile's row and column counts are float32 sums: exact up to 2**24
    ni, nc = img.shape[0], txt.shape[0]
    order = torch.argsort(caption_image, stable=True)  # (Nc,) caption indices grouped by image
    owner = caption_image[order]  # (Nc,) the image of each grouped caption
    plan = tile_plan(torch.bincount(caption_image, minlength=ni).tolist(), min(chunk, max_matrix), max_matrix)
    largest = max([(i1 - i0) * (hi - lo) for *_, tiles in plan for i0, i1, lo, hi in tiles], default=0)
    sim_buffer, hit_buffer = img.new_empty(largest), img.new_empty(largest)
    best = img.new_full((ni,), float("-inf"))  # (Ni,) best right score; -inf without captions: all rank above
    right = img.new_empty(nc)  # (Nc,) each grouped caption's score with its own image
    above_i2t = img.new_zeros(ni, dtype=torch.float64)  # (Ni,) captions scoring >= the image's best right one
    above_t2i = img.new_zeros(nc, dtype=torch.float64)  # (Nc,) images scoring >= the caption's own image
    for diagonal, c0, c1, tiles in plan:
        group = txt.index_select(0, order[c0:c1])  # (c1 - c0, D) these captions' features, grouped by image
        for i0, i1, lo, hi in tiles:
            h, k = i1 - i0, hi - lo
            sim = torch.mm(img[i0:i1], group[lo - c0:hi - c0].t(), out=sim_buffer[:h * k].view(h, k))  # (h, k)
            if diagonal:  # right scores are read off the very products that are counted, so ties stay exact
                own = owner[lo:hi] - i0  # (k,) each caption's image, as a row of this tile
                right[lo:hi] = sim.gather(0, own[None]).squeeze(0)
                best[i0:i1].scatter_reduce_(0, own, right[lo:hi], "amax")
                # a right caption tied with its image's best passes the >= below, but it is no wrong caption
                above_i2t[i0:i1].index_add_(0, own, -(right[lo:hi] >= best[i0:i1][own]).double())
            hit = hit_buffer[:h * k].view(h, k)  # (h, k) 1.0 / 0.0: float sums are faster than bool ones here
            torch.ge(sim, best[i0:i1, None], out=hit)
            above_i2t[i0:i1] += hit.sum(1)
            torch.ge(sim, right[None, lo:hi], out=hit)
            above_t2i[lo:hi] += hit.sum(0)
    t2i = torch.empty_like(order)
    t2i[order] = above_t2i.long() - 1  # back to the callers' caption order; the own image counts itself once
    return above_i2t.long().cpu(), t2i.cpu()


def median_rank(ranks):
    """1-based median rank as VSE++ and SCAN report it: floor(median of the 0-based ranks) + 1, where the median
    of an even count is the mean of its two middle values (torch.median would take the lower one)."""
    ranks = ranks.sort().values
    middle = (ranks[(len(ranks) - 1) // 2] + ranks[len(ranks) // 2]).item() / 2
    return float(math.floor(middle) + 1)


def summarize(ranks):
    """0-based ranks -> recall@K as fractions, their mean ("mean recall", what the Chinese benchmarks rank by),
    and 1-based median / mean rank."""
    ranks = ranks.double()
    out = {f"R@{k}": (ranks < k).double().mean().item() for k in KS}
    out["mean_recall"] = sum(out[f"R@{k}"] for k in KS) / len(KS)
    out["median_rank"] = median_rank(ranks)
    out["mean_rank"] = (ranks + 1).mean().item()
    return out


def protocol_name(num_images, num_captions, num_queries=None):
    """Name the protocol from the data: one caption per image (the reference run) or all captions per image
    (COCO 5k, Flickr30k 1k), where image -> text counts a hit when any of the image's captions is in the top K;
    and, when some texts are shared by several images, how many text -> image queries that leaves."""
    if num_captions == num_images:
        name = "one caption per image (reference protocol)"
    else:
        per_image = f"{num_captions / max(num_images, 1):.2f} captions per image"
        known = {5000: "COCO 5k", 1000: "Flickr30k 1k / COCO 1k"}.get(num_images)
        name = f"{known + ', ' if known else ''}all captions ({per_image}), image->text hit = any of its captions"
    if num_queries is not None and num_queries < num_captions:
        name += (f"; {num_queries} text queries, a text shared by several images hits when any of them is in "
                 f"the top K")
    return name


def text_groups(texts):
    """(Nc,) the text -> image query of each caption row, rows with identical text sharing one (numbered by first
    appearance); None when every text is unique, so such data keeps one query per row exactly as before."""
    first = {}
    query = [first.setdefault(t, len(first)) for t in texts]
    return torch.tensor(query) if len(first) < len(query) else None


def renumber(caption_query):
    """A subset's caption_query numbered 0..Nq-1 again; None when its rows are all different queries."""
    if caption_query is None:
        return None
    unique, query = torch.unique(caption_query, return_inverse=True)
    return query if len(unique) < len(query) else None


@torch.no_grad()
def grouped_text_ranks(image_features, text_features, caption_image, caption_query, max_matrix=MAX_MATRIX):
    """0-based rank of each text query that may have several right images: the wrong images scoring at least as
    high as its best right one (a tie counts against the model, as in retrieval_ranks) -> (Nq,).

    caption_query (Nc,) numbers each caption row's query 0..Nq-1; the rows of one query hold the same text, so
    its first row's features stand for it. The (Ni, Nq) similarities are made a slice of queries at a time
    (about `max_matrix` of them), and the right scores are read off those very products, so ties stay exact.
    """
    img, txt = image_features.float(), text_features.float()  # (Ni, D), (Nc, D)
    caption_image, caption_query = caption_image.to(img.device), caption_query.to(img.device)
    ni, nc, nq = img.shape[0], txt.shape[0], int(caption_query.max()) + 1
    first = torch.full((nq,), nc, dtype=torch.long, device=img.device)
    first.scatter_reduce_(0, caption_query, torch.arange(nc, device=img.device), "amin")  # (Nq,) a row of each
    queries = txt[first]  # (Nq, D)
    pairs = torch.unique(caption_query * ni + caption_image)  # (P,) each right (query, image) once, by query
    pair_query, pair_image = pairs // ni, pairs % ni
    width = max(1, max_matrix // max(ni, 1))
    ranks = torch.empty(nq, dtype=torch.long)
    for a in range(0, nq, width):
        b = min(a + width, nq)
        lo, hi = torch.searchsorted(pair_query, torch.tensor([a, b], device=img.device)).tolist()
        sim = img @ queries[a:b].t()  # (Ni, b - a)
        own = pair_query[lo:hi] - a  # (p,) the slice's right pairs: query column and image row
        right = sim[pair_image[lo:hi], own]  # (p,)
        best = sim.new_full((b - a,), float("-inf")).scatter_reduce_(0, own, right, "amax")  # (b - a,)
        above = (sim >= best).sum(0)  # (b - a,) images reaching the best right score, right ones included
        tied_right = torch.zeros_like(above).index_add_(0, own, (right >= best[own]).long())
        ranks[a:b] = (above - tied_right).cpu()
    return ranks


def retrieval_metrics(image_features, text_features, caption_image, caption_query=None):
    """Both directions' recall, ranks, rsum and mean recall. `caption_query` (Nc,), from text_groups: rows that
    share a text are one text -> image query (grouped_text_ranks); None: every row is its own query."""
    i2t, t2i = retrieval_ranks(image_features, text_features, caption_image)
    if caption_query is not None:
        t2i = grouped_text_ranks(image_features, text_features, caption_image, caption_query)
    out = {"image_to_text": summarize(i2t), "text_to_image": summarize(t2i)}
    out["rsum"] = sum(out[d][f"R@{k}"] for d in ("image_to_text", "text_to_image") for k in KS)
    out["mean_recall"] = out["rsum"] / (2 * len(KS))  # of all six recalls
    out["num_images"] = int(image_features.shape[0])
    out["num_captions"] = int(text_features.shape[0])
    out["num_text_queries"] = len(t2i)
    out["protocol"] = protocol_name(out["num_images"], out["num_captions"], out["num_text_queries"])
    return out


def fold_metrics(image_features, text_features, caption_image, caption_query, image_order, folds):
    """COCO 1K: the metrics of `folds` folds of consecutive images (in the order `image_order` (Ni,) lists their
    indices), each fold with its own images' captions, and the mean of every number over the folds.
    The fold count must divide Ni: a shorter last fold would not be the protocol the papers report."""
    ni = image_features.shape[0]
    if folds < 1 or ni % folds:
        raise ValueError(f"{folds} folds do not divide {ni} images")
    size, each = ni // folds, []
    for f in range(folds):
        local = torch.full((ni,), -1, dtype=torch.long)  # (Ni,) an image's index inside this fold, or -1
        local[image_order[f * size:(f + 1) * size]] = torch.arange(size)
        owner = local[caption_image.cpu()]  # (Nc,)
        rows = (owner >= 0).nonzero().squeeze(1).to(text_features.device)
        fold_images = image_order[f * size:(f + 1) * size].to(image_features.device)
        query = renumber(caption_query[rows.cpu()]) if caption_query is not None else None
        each.append(retrieval_metrics(image_features[fold_images], text_features[rows], owner[owner >= 0], query))
    mean = mean_of(each)
    mean["protocol"] = (f"1K-style: mean over {folds} folds of {size} consecutive images, each fold with its own "
                        f"captions; {each[0]['protocol']}")
    return {"count": folds, "images_per_fold": size, "mean": mean, "each": each}


def mean_of(results):
    """The mean over `results` (dicts of the same shape) of every number in them; other values from the first."""
    first = results[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = mean_of([r[key] for r in results])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = sum(r[key] for r in results) / len(results)
        else:
            out[key] = value
    return out


def format_table(m, title=None):
    """The metrics as a text table; `title` names the set (e.g. 5K or the 1K fold mean) on the first line.
    Mean recalls are computed from the recalls shown, so a metrics dict of an older checkpoint prints too."""
    counts = f"{m['num_images']:g} images, {m['num_captions']:g} captions"
    if m.get("num_text_queries", m["num_captions"]) != m["num_captions"]:
        counts += f", {m['num_text_queries']:g} text queries"
    lines = [f"{title + ' | ' if title else ''}protocol: {m['protocol']} ({counts})",
             f"{'direction':<15}{'R@1':>9}{'R@5':>9}{'R@10':>9}{'mR':>9}{'medr':>8}{'meanr':>9}"]
    for key, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        r = m[key]
        mean_recall = sum(r[f"R@{k}"] for k in KS) / len(KS)
        lines.append(f"{label:<15}{r['R@1']:>9.5f}{r['R@5']:>9.5f}{r['R@10']:>9.5f}{mean_recall:>9.5f}"
                     f"{r['median_rank']:>8.1f}{r['mean_rank']:>9.2f}")
    lines.append(f"rsum (sum of the six recalls): {m['rsum']:.5f}   mean recall (rsum / 6): {m['rsum'] / 6:.5f}")
    return "\n".join(lines)
