"""Retrieval metrics from features: recall@K, median and mean rank, rsum; no Python loop over queries.

The rank of a query is the number of wrong candidates that score at least as high as its best right one, so a
tie is counted against the model: a constant similarity matrix gets recall ~0, not 1.
"""
import torch

KS = (1, 5, 10)


def _ranks_i2t(sim, pos):
    """sim (Ni, Nc), pos (Ni, Nc) bool -> (Ni,) 0-based rank of each image's best right caption."""
    best = sim.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)  # (Ni, 1)
    return ((sim >= best) & ~pos).sum(dim=1)


def _ranks_t2i(sim, caption_image):
    """sim (Ni, Nc) -> (Nc,) 0-based rank of each caption's image among all images."""
    right = sim.gather(0, caption_image[None, :])  # (1, Nc)
    wrong_ge = (sim >= right).sum(dim=0) - 1  # the right image itself always counts once
    return wrong_ge


@torch.no_grad()
def retrieval_ranks(image_features, text_features, caption_image, chunk=2048):
    """0-based ranks for every image query (image -> text) and every caption query (text -> image).

    image_features (Ni, D) and text_features (Nc, D), L2-normalised; caption_image (Nc,) gives each caption's
    image index. The similarity matrix is built `chunk` rows or columns at a time to bound memory.
    """
    img, txt = image_features.float(), text_features.float()
    caption_image = caption_image.to(img.device)
    ni, nc = img.shape[0], txt.shape[0]
    i2t = torch.empty(ni, dtype=torch.long, device=img.device)
    for s in range(0, ni, chunk):
        sim = img[s:s + chunk] @ txt.t()  # (c, Nc)
        rows = torch.arange(s, min(s + chunk, ni), device=img.device)
        i2t[s:s + chunk] = _ranks_i2t(sim, caption_image[None, :] == rows[:, None])
    t2i = torch.empty(nc, dtype=torch.long, device=img.device)
    for s in range(0, nc, chunk):
        sim = img @ txt[s:s + chunk].t()  # (Ni, c)
        t2i[s:s + chunk] = _ranks_t2i(sim, caption_image[s:s + chunk])
    return i2t.cpu(), t2i.cpu()


def summarize(ranks):
    """0-based ranks -> recall@K as fractions, and 1-based median / mean rank."""
    ranks = ranks.double()
    out = {f"R@{k}": (ranks < k).double().mean().item() for k in KS}
    out["median_rank"] = (ranks + 1).median().item()
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
