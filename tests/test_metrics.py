import pytest
import torch
import torch.nn.functional as F

from engine.metrics import format_table, retrieval_metrics, retrieval_ranks, summarize, tile_plan


def features_for(sim):
    """Features whose dot products are exactly `sim` (images = sim rows, captions = identity)."""
    return sim.clone(), torch.eye(sim.shape[1])


def test_one_caption_per_image_hand_made():
    sim = torch.tensor([[0.9, 0.1, 0.2],    # image 0: own caption first -> rank 0
                        [0.8, 0.5, 0.1],    # image 1: caption 0 beats it -> rank 1
                        [0.7, 0.6, 0.3]])   # image 2: two captions beat it -> rank 2
    img, txt = features_for(sim)
    i2t, t2i = retrieval_ranks(img, txt, torch.tensor([0, 1, 2]))
    assert i2t.tolist() == [0, 1, 2]
    # caption 0: column [0.9, 0.8, 0.7] -> rank 0; caption 1: [0.1, 0.5, 0.6] -> rank 1; caption 2: [0.2,.1,.3] -> 0
    assert t2i.tolist() == [0, 1, 0]
    m = retrieval_metrics(img, txt, torch.tensor([0, 1, 2]))
    assert m["image_to_text"]["R@1"] == pytest.approx(1 / 3)
    assert m["text_to_image"]["R@1"] == pytest.approx(2 / 3)
    assert m["image_to_text"]["median_rank"] == 2.0 and m["image_to_text"]["mean_rank"] == 2.0
    assert m["rsum"] == pytest.approx(1 / 3 + 1 + 1 + 2 / 3 + 1 + 1)
    assert m["protocol"].startswith("one caption per image")


def test_ties_do_not_inflate_recall():
    sim = torch.full((4, 4), 0.5)
    img, txt = features_for(sim)
    m = retrieval_metrics(img, txt, torch.arange(4))
    assert m["image_to_text"]["R@1"] == 0.0 and m["text_to_image"]["R@1"] == 0.0
    # every wrong candidate ties, so the right one ranks last (4th): inside R@5 and R@10
    assert m["image_to_text"]["R@5"] == 1.0 and m["image_to_text"]["median_rank"] == 4.0


def test_several_captions_per_image():
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.tensor([
        # captions: c0   c1   c2   c3   c4   c5
        [0.1, 0.9, 0.2, 0.3, 0.0, 0.0],  # image 0: its best caption c1 is first -> hit at 1
        [0.8, 0.0, 0.7, 0.6, 0.0, 0.0],  # image 1: c0 (wrong) beats c2 -> rank 1
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.05],  # image 2: four wrong captions beat c4 -> rank 4
    ])
    img, txt = features_for(sim)
    i2t, t2i = retrieval_ranks(img, txt, caption_image)
    assert i2t.tolist() == [0, 1, 4]
    # caption queries: c0 col [.1,.8,.5] right=img0 -> rank 2; c1 [.9,0,.4] -> 0; c2 [.2,.7,.3] -> 0;
    # c3 [.3,.6,.2] -> 0; c4 [0,0,.1] -> 0; c5 [0,0,.05] -> 0
    assert t2i.tolist() == [2, 0, 0, 0, 0, 0]
    m = retrieval_metrics(img, txt, caption_image)
    assert m["num_images"] == 3 and m["num_captions"] == 6
    assert m["image_to_text"]["R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text"]["R@5"] == 1.0
    assert m["text_to_image"]["R@1"] == pytest.approx(5 / 6)
    assert "2.00 captions per image" in m["protocol"]
    assert "R@1" in format_table(m) and "rsum" in format_table(m)


def test_vectorised_ranks_match_a_plain_loop_and_chunking():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(50, 16), dim=-1)
    txt = F.normalize(torch.randn(120, 16), dim=-1)
    caption_image = torch.randint(0, 50, (120,))
    caption_image[:50] = torch.arange(50)  # every image has at least one caption
    sim = img @ txt.t()
    loop_i2t = []
    for i in range(50):
        order = sim[i].argsort(descending=True).tolist()
        loop_i2t.append(next(r for r, j in enumerate(order) if caption_image[j] == i))
    loop_t2i = []
    for j in range(120):
        order = sim[:, j].argsort(descending=True).tolist()
        loop_t2i.append(order.index(int(caption_image[j])))
    i2t, t2i = retrieval_ranks(img, txt, caption_image)
    assert i2t.tolist() == loop_i2t and t2i.tolist() == loop_t2i
    small_i2t, small_t2i = retrieval_ranks(img, txt, caption_image, chunk=7)
    assert small_i2t.tolist() == loop_i2t and small_t2i.tolist() == loop_t2i


def tie_counting_ranks(sim, caption_image):
    """Reference ranks by a plain loop: wrong candidates scoring at least as high as the best right one."""
    i2t = []
    for i in range(sim.shape[0]):
        right = caption_image == i
        best = sim[i][right].max() if right.any() else float("-inf")
        i2t.append(int(((sim[i] >= best) & ~right).sum()))
    t2i = [int((sim[:, j] >= sim[caption_image[j], j]).sum()) - 1 for j in range(sim.shape[1])]
    return i2t, t2i


def right_bonus(caption_image, num_images):
    """(Ni, Nc) 1 where the caption belongs to the image."""
    return (caption_image[None, :] == torch.arange(num_images)[:, None]).float()


@pytest.mark.parametrize("rounded", [False, True])
def test_one_product_and_slices_give_the_same_ranks(rounded):
    # image 0 has 3 captions, image 1 one, image 2 none, images 3-7 two each; captions in shuffled order
    caption_image = torch.tensor([0, 0, 0, 1] + [i for i in range(3, 8) for _ in range(2)])
    caption_image = caption_image[torch.randperm(len(caption_image), generator=torch.Generator().manual_seed(0))]
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(8, 4, generator=g), torch.randn(len(caption_image), 4, generator=g)
    if rounded:  # halves in 4 dimensions: many exact ties, and every dot product exact in float32
        img, txt = (img * 2).round() / 2, (txt * 2).round() / 2
    one = retrieval_ranks(img, txt, caption_image)
    sliced = retrieval_ranks(img, txt, caption_image, chunk=3, max_matrix=10)  # 8 x 14 > 10: the sliced path
    assert torch.equal(one[0], sliced[0]) and torch.equal(one[1], sliced[1])
    want_i2t, want_t2i = tie_counting_ranks(img @ txt.t(), caption_image)
    assert one[0].tolist() == want_i2t and one[1].tolist() == want_t2i
    assert one[0][2] == len(caption_image)  # no caption to find: every caption ranks above
    if rounded:  # the ties really touch right items: counting them in favour would change some ranks
        strict_i2t, strict_t2i = tie_counting_ranks(img @ txt.t() + 1e-3 * right_bonus(caption_image, 8),
                                                    caption_image)
        assert strict_i2t != want_i2t and strict_t2i != want_t2i


def plain_loop_ranks(sim, caption_image):
    """Reference ranks from nested Python loops over lists: wrong candidates scoring >= the best right one."""
    rows, owner = sim.tolist(), caption_image.tolist()
    i2t = []
    for i, row in enumerate(rows):
        own = [s for c, s in enumerate(row) if owner[c] == i]
        best = max(own) if own else float("-inf")
        i2t.append(sum(1 for c, s in enumerate(row) if owner[c] != i and s >= best))
    t2i = [sum(1 for i, row in enumerate(rows) if i != image and row[c] >= rows[image][c])
           for c, image in enumerate(owner)]
    return i2t, t2i


# (chunk, max_matrix): one tile for everything, one similarity per tile, and uneven tilings in between
TILINGS = [(1000, 10**6), (1, 1), (2, 5), (3, 7), (4, 16), (5, 3), (2, 100)]


def test_hand_made_ties_match_a_plain_loop_in_every_tiling():
    caption_image = torch.tensor([1, 0, 2, 0, 1, 2, 0, 3])  # image 0: three captions, image 4: none
    sim = torch.tensor([
        # c0   c1   c2   c3   c4   c5   c6   c7
        [2.0, 1.0, 2.0, 1.0, 0.0, 2.0, 0.0, 0.0],  # image 0: best own 1.0 (c1, c3 tie); c0 c2 c5 above -> 3
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # image 1: all tie -> all 6 wrong captions count -> 6
        [0.0, 0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 3.0],  # image 2: best own 3.0 (c2); c7 ties it -> 1
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # image 3: own c7 1.0; c1 ties -> 1
        [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0],  # image 4: no caption -> all 8 rank above
    ])
    img, txt = features_for(sim)
    want = plain_loop_ranks(sim, caption_image)
    assert want[0] == [3, 6, 1, 1, 8]
    # c0 (image 1, 1.0): images 0, 4 reach it -> 2; c1 (image 0, 1.0): images 1, 3, 4 tie or beat it -> 3; ...
    # c6 (image 0, 0.0): every other image reaches it -> 4; c7 (image 3, 1.0): images 1, 2, 4 -> 3
    assert want[1] == [2, 3, 1, 2, 1, 3, 4, 3]
    for chunk, max_matrix in TILINGS:
        i2t, t2i = retrieval_ranks(img, txt, caption_image, chunk=chunk, max_matrix=max_matrix)
        assert (i2t.tolist(), t2i.tolist()) == want, (chunk, max_matrix)


@pytest.mark.parametrize("seed", range(4))
def test_small_integer_scores_match_a_plain_loop_in_every_tiling(seed):
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.randint(0, 7, (19,), generator=g)  # some images get several captions, some none
    sim = torch.randint(0, 3, (7, 19), generator=g).float()  # three values: ties everywhere
    img, txt = features_for(sim)
    want = plain_loop_ranks(sim, caption_image)
    tiles = [retrieval_ranks(img, txt, caption_image, chunk=c, max_matrix=m) for c, m in TILINGS]
    assert all((i2t.tolist(), t2i.tolist()) == want for i2t, t2i in tiles)
    # the ties decide ranks here: a loop that let them count in the model's favour would disagree
    strict = plain_loop_ranks(sim + 1e-3 * right_bonus(caption_image, 7), caption_image)
    assert strict != want


def test_even_count_median_is_the_mean_of_the_two_middle_ranks():
    # 0-based ranks 0, 0, 3, 3: median 1.5 -> floor + 1 = 2; torch.median's lower middle would give 1
    assert summarize(torch.tensor([0, 0, 3, 3]))["median_rank"] == 2.0
    assert summarize(torch.tensor([1, 4]))["median_rank"] == 3.0  # median 2.5 -> 3, lower middle -> 2
    assert summarize(torch.tensor([4, 0, 1]))["median_rank"] == 2.0  # odd count: the middle one, 1 -> 2
    sim = torch.tensor([[0.9, 0.1, 0.1, 0.1],   # image 0: rank 0
                        [0.1, 0.9, 0.1, 0.1],   # image 1: rank 0
                        [0.5, 0.5, 0.2, 0.5],   # image 2: three wrong captions above -> rank 3
                        [0.5, 0.5, 0.5, 0.2]])  # image 3: rank 3
    m = retrieval_metrics(*features_for(sim), torch.arange(4))
    assert m["image_to_text"]["median_rank"] == 2.0 and m["image_to_text"]["mean_rank"] == 2.5
    assert m["text_to_image"]["median_rank"] == 1.0  # ranks 0, 0, 1, 1: median 0.5 -> 1


def test_tiles_make_every_pair_once_within_the_bound(monkeypatch):
    counts = [3, 0, 6, 1, 1, 2, 0, 4, 1, 2]  # image 2 has more captions than a tile is wide
    for rows, max_matrix, largest in ((3, 12, 12), (2, 4, 6), (10, 1000, 200)):
        plan = tile_plan(counts, rows, max_matrix)
        starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
        made = torch.zeros(len(counts), sum(counts), dtype=torch.long)  # (Ni, Nc) in grouped caption order
        sizes, seen_other = [], False
        for diagonal, c0, c1, tiles in plan:
            seen_other |= not diagonal
            assert not (diagonal and seen_other)  # every right score is known before other tiles are counted
            for i0, i1, lo, hi in tiles:
                assert c0 <= lo < hi <= c1 and i1 - i0 <= rows
                if diagonal:  # an image block against exactly its own captions
                    assert (lo, hi) == (starts[i0], starts[i1])
                made[i0:i1, lo:hi] += 1
                sizes.append((i1 - i0) * (hi - lo))
        assert bool((made == 1).all())
        # within max_matrix, except (2, 4): image 2 alone against its 6 captions
        assert max(sizes) == largest and (max(sizes) <= max_matrix or max(sizes) == max(counts))
    # and the products retrieval_ranks really makes: no similarity block beyond the bound, every pair once
    caption_image = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    caption_image = caption_image[torch.randperm(len(caption_image), generator=torch.Generator().manual_seed(0))]
    g = torch.Generator().manual_seed(1)
    img = (torch.randn(len(counts), 8, generator=g) * 2).round()  # (10, 8) integers: every product exact
    txt = (torch.randn(len(caption_image), 8, generator=g) * 2).round()  # (20, 8)
    products, mm = [], torch.mm

    def recording_mm(a, b, out=None):  # every similarity metrics.py makes comes from torch.mm
        products.append(out.numel())
        return mm(a, b, out=out)
    monkeypatch.setattr(torch, "mm", recording_mm)
    ranks = retrieval_ranks(img, txt, caption_image, chunk=3, max_matrix=12)
    monkeypatch.undo()
    assert max(products) == 12 and sum(products) == len(counts) * len(caption_image)
    want = plain_loop_ranks(img @ txt.t(), caption_image)
    assert (ranks[0].tolist(), ranks[1].tolist()) == want
