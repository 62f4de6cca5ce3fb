"""Retrieval metrics from features: recall@K, median and mean rank, rsum; no Python loop over queries.

The rank of a query is the number of wrong candidates that score at least as high as its best right one, so a
tie is counted against the model: a constant similarity matrix gets recall ~0, not 1.

Up to MAX_MATRIX similarities (COCO 5k images x 25k captions fits) come from one matrix product that both
directions read; beyond that the product is made in slices of rows, then of columns, to bound memory.
"""
import math

import torch

KS = (1, 5, 10)
MAX_MATRIX = 2**27  # similarities made in one product: 512 MiB of float32


def caption_table(caption_image, num_images):
    """(Ni, M) indices of each image's captions, M = the most captions any image has (at least 1); -1 pads."""
    counts = torch.bincount(caption_image, minlength=num_images)  # (Ni,)
    order = torch.argsort(caption_image, stable=True)  # caption indices grouped by image
    image = caption_image[order]
    first = torch.cumsum(counts, 0) - counts  # (Ni,) where each image's group starts in `order`
    slot = torch.arange(len(order), device=order.device) - first[image]  # position inside the group
    width = max(1, int(counts.max())) if len(counts) else 1
    table = torch.full((num_images, width), -1, dtype=torch.long, device=caption_image.device)
    table[image, slot] = order
    return table


def _ranks_i2t(sim, table):
    """sim (n, Nc), table (n, M) the n images' caption indices (-1 = none) -> (n,) 0-based rank of each image's
    best right caption: wrong captions scoring at least as high."""
    real = table >= 0
    right = sim.gather(1, table.clamp(min=0)).masked_fill(~real, float("-inf"))  # (n, M)
    best = right.amax(dim=1, keepdim=True)  # (n, 1); -inf for an image without captions: all Nc rank above
    # every caption at or above the best, less the right ones among them (those tied with the best)
    return (sim >= best).sum(dim=1) - ((right >= best) & real).sum(dim=1)


def _ranks_t2i(sim, caption_image):
    """sim (Ni, n) for n captions -> (n,) 0-based rank of each caption's image among all images."""
    right = sim.gather(0, caption_image[None, :])  # (1, n)
    return (sim >= right).sum(dim=0) - 1  # the right image itself always counts once


@torch.no_grad()
def retrieval_ranks(image_features, text_features, caption_image, chunk=2048, max_matrix=MAX_MATRIX):
    """0-based ranks for every image query (image -> text) and every caption query (text -> image).

    image_features (Ni, D) and text_features (Nc, D), L2-normalised; caption_image (Nc,) gives each caption's
    image index. With Ni * Nc <= `max_matrix` the (Ni, Nc) similarity matrix is made once and read both ways;
    otherwise it is made `chunk` rows, then `chunk` columns, at a time.
    """
    img, txt = image_features.float(), text_features.float()
    caption_image = caption_image.to(img.device)
    ni, nc = img.shape[0], txt.shape[0]
    table = caption_table(caption_image, ni)  # (Ni, M)
    if ni * nc <= max_matrix:
        sim = img @ txt.t()  # (Ni, Nc)
        return _ranks_i2t(sim, table).cpu(), _ranks_t2i(sim, caption_image).cpu()
    i2t = torch.cat([_ranks_i2t(img[s:s + chunk] @ txt.t(), table[s:s + chunk])  # (c, Nc) per slice
                     for s in range(0, ni, chunk)])
    t2i = torch.cat([_ranks_t2i(img @ txt[s:s + chunk].t(), caption_image[s:s + chunk])  # (Ni, c) per slice
                     for s in range(0, nc, chunk)])
    return i2t.cpu(), t2i.cpu()


def median_rank(ranks):
    """1-based median rank as VSE++ and SCAN report it: floor(median of the 0-based ranks) + 1, where the median
    of an even count is the mean of its two middle values (torch.median would take the lower one)."""
    ranks = ranks.sort().values
    middle = (ranks[(len(ranks) - 1) // 2] + ranks[len(ranks) // 2]).item() / 2
    return float(math.floor(middle) + 1)


def summarize(ranks):
    """0-based ranks -> recall@K as fractions, and 1-based median / mean rank."""
    ranks = ranks.double()
    out = {f"R@{k}": (ranks < k).double().mean().item() for k in KS}
    out["median_rank"] = median_rank(ranks)
    out["mean_rank"] = (ranks + 1).mean().item()
    return out


def protocol_name(num_images, num_captions):
    """Name the protocol from the data: one caption per image (the reference run) or all captions per image
    (COCO 5k, Flickr30k 1k), where image -> text counts a hit when any of the image's captions is in the top K."""
    if num_captions == num_images:
        return "one caption per image (reference protocol)"
    per_image = f"{num_captions / max(num_images, 1):.2f} captions per image"
    known = {5000: "COCO 5k", 1000: "Flickr30k 1k / COCO 1k"}.get(num_images)
    return f"{known + ', ' if known else ''}all captions ({per_image}), image->text hit = any of its captions"


def retrieval_metrics(image_features, text_features, caption_image):
    i2t, t2i = retrieval_ranks(image_features, text_features, caption_image)
    out = {"image_to_text": summarize(i2t), "text_to_image": summarize(t2i)}
    out["rsum"] = sum(out[d][f"R@{k}"] for d in ("image_to_text", "text_to_image") for k in KS)
    out["num_images"] = int(image_features.shape[0])
    out["num_captions"] = int(text_features.shape[0])
    out["protocol"] = protocol_name(out["num_images"], out["num_captions"])
    return out


def format_table(m):
    lines = [f"protocol: {m['protocol']} ({m['num_images']} images, {m['num_captions']} captions)",
             f"{'direction':<15}{'R@1':>9}{'R@5':>9}{'R@10':>9}{'medr':>8}{'meanr':>9}"]
    for key, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        r = m[key]
        lines.append(f"{label:<15}{r['R@1']:>9.5f}{r['R@5']:>9.5f}{r['R@10']:>9.5f}"
                     f"{r['median_rank']:>8.1f}{r['mean_rank']:>9.2f}")
    lines.append(f"rsum (sum of the six recalls): {m['rsum']:.5f}")
    return "\n".join(lines)
