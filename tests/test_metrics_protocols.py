"""The protocols beside the plain recall: texts shared by several images, mean recall, and the COCO 1K fold mean."""
import csv
import json
import os
import shutil
from contextlib import nullcontext

import pytest
import torch

import eval as eval_script
from engine.checkpoint import load_trained
from engine.evaluation import Encoding, encode_image_files, encode_texts, evaluate
from engine.metrics import (
    fold_metrics,
    format_table,
    grouped_text_ranks,
    retrieval_metrics,
    retrieval_ranks,
    summarize,
    text_groups,
)
from tests.helpers import DEMO_EVAL_CONFIG, one_line_exit, write_csv


def shared_text_case():
    """Four images; caption rows 0 and 1 hold the same text (so the same features), on images 0 and 1."""
    img = torch.tensor([[0.5, 0.1, 0.0],    # text "a" (rows 0, 1), text "b" (row 2), text "c" (row 3)
                        [0.9, 0.2, 0.1],
                        [0.7, 0.3, 0.2],
                        [0.1, 0.4, 0.8]])
    txt = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # (4 rows, 3): sim columns a a b c
    return img, txt, torch.tensor([0, 1, 2, 3])


def test_text_groups_number_identical_texts_by_first_appearance():
    assert text_groups(["a", "b", "c"]) is None  # all unique: one query per row, the unchanged path
    assert text_groups(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]


def test_a_shared_text_is_one_query_hit_by_any_of_its_images():
    img, txt, caption_image = shared_text_case()
    # one query per row: row 0 (image 0, 0.5) has images 1 (0.9) and 2 (0.7) above -> 2; row 1 -> 0;
    # row 2 (image 2, 0.3): image 3 (0.4) above -> 1; row 3 -> 0
    assert retrieval_ranks(img, txt, caption_image)[1].tolist() == [2, 0, 1, 0]
    # grouped: text "a" is right on images 0 and 1; its best right score 0.9 has no wrong image above -> 0
    query = text_groups(["a", "a", "b", "c"])
    assert grouped_text_ranks(img, txt, caption_image, query).tolist() == [0, 1, 0]
    m = retrieval_metrics(img, txt, caption_image, query)
    assert m["num_text_queries"] == 3 and m["num_captions"] == 4
    assert m["text_to_image"]["R@1"] == pytest.approx(2 / 3)
    # image -> text is unchanged: image 0's right row 0 ties with row 1 (same text, image 1's): a wrong row -> 1
    i2t = [1, 1, 2, 0]  # image 2: rows 0 and 1 (0.7) above its 0.3; image 3: its 0.8 is first
    assert m["image_to_text"] == summarize(torch.tensor(i2t))
    assert "3 text queries" in m["protocol"] and "3 text queries" in format_table(m)
    ungrouped = retrieval_metrics(img, txt, caption_image)
    assert ungrouped["text_to_image"]["R@1"] == 0.5 and ungrouped["num_text_queries"] == 4


def test_tied_right_images_do_not_count_but_a_tied_wrong_one_does():
    img = torch.tensor([[0.9], [0.9], [0.9], [0.2]])  # images 0 and 1 are right for the text, 2 is wrong
    txt = torch.tensor([[1.0], [1.0]])
    assert grouped_text_ranks(img, txt, torch.tensor([0, 1]), torch.tensor([0, 0])).tolist() == [1]


def loop_grouped_ranks(sim, caption_image, caption_query):
    """Reference by a plain loop: per query, wrong images scoring at least its best right image's score."""
    ranks = []
    for q in range(int(caption_query.max()) + 1):
        rows = (caption_query == q).nonzero().squeeze(1)
        right = set(caption_image[rows].tolist())
        column = sim[:, rows[0]].tolist()
        best = max(column[i] for i in right)
        ranks.append(sum(1 for i, s in enumerate(column) if i not in right and s >= best))
    return ranks


@pytest.mark.parametrize("seed", range(3))
def test_grouped_ranks_match_a_loop_and_equal_the_row_ranks_when_texts_are_unique(seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 3, (9, 4), generator=g).float()  # small integers: exact products, ties everywhere
    texts = torch.randint(0, 3, (7, 4), generator=g).float()  # 7 distinct texts, some on several images
    caption_query = torch.cat([torch.arange(7), torch.randint(0, 7, (8,), generator=g)])  # (15,)
    caption_image = torch.randint(0, 9, (15,), generator=g)
    caption_image[7:] = (caption_image[caption_query[7:]] + 1 + torch.randint(0, 8, (8,), generator=g)) % 9
    txt = texts[caption_query]  # (15, 4) rows of one text share its features
    want = loop_grouped_ranks(img @ txt.t(), caption_image, caption_query)
    for max_matrix in (1, 5, 10**6):
        assert grouped_text_ranks(img, txt, caption_image, caption_query, max_matrix).tolist() == want
    # one image per text: the grouped rule is the row rule, tie for tie
    unique = torch.arange(15)
    assert grouped_text_ranks(img, txt, caption_image, unique, 7).tolist() == \
        retrieval_ranks(img, txt, caption_image)[1].tolist()


def test_mean_recall_per_direction_and_over_all_six():
    sim = torch.tensor([[0.9, 0.1, 0.2],    # i2t ranks 0, 1, 2 -> R@1 1/3, R@5 1, R@10 1
                        [0.8, 0.5, 0.1],
                        [0.7, 0.6, 0.3]])   # t2i ranks 0, 1, 0 -> R@1 2/3, R@5 1, R@10 1
    m = retrieval_metrics(sim, torch.eye(3), torch.arange(3))
    assert m["image_to_text"]["mean_recall"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert m["text_to_image"]["mean_recall"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert m["mean_recall"] == pytest.approx((1 / 3 + 2 / 3 + 4) / 6) and m["mean_recall"] == m["rsum"] / 6


def fold_case():
    """Images 0-3, caption rows c0..c4 on images 0, 1, 2, 3, 0; features whose products are `sim`."""
    sim = torch.tensor([
        # c0   c1   c2   c3   c4
        [0.2, 0.9, 0.8, 0.0, 0.1],  # image 0
        [0.1, 0.5, 0.0, 0.3, 0.0],  # image 1
        [0.9, 0.0, 0.1, 0.0, 0.7],  # image 2
        [0.0, 0.4, 0.0, 0.6, 0.0],  # image 3
    ])
    return sim, torch.eye(5), torch.tensor([0, 1, 2, 3, 0])


def test_fold_mean_by_hand():
    img, txt, caption_image = fold_case()
    # consecutive order 2, 0, 3, 1: fold 0 = images 2, 0 with rows c0, c2, c4; fold 1 = images 3, 1 with c1, c3
    folds = fold_metrics(img, txt, caption_image, None, torch.tensor([2, 0, 3, 1]), 2)
    first, second = folds["each"]
    # fold 0: image 0 (best right c0 0.2, c2 0.8 above) rank 1; image 2 (c2 0.1; c0, c4 above) rank 2;
    # rows c0, c2, c4 each have the fold's other image above -> rank 1
    assert first["image_to_text"]["R@1"] == 0 and first["image_to_text"]["mean_rank"] == 2.5
    assert first["text_to_image"]["R@1"] == 0 and first["rsum"] == 4
    assert first["num_images"] == 2 and first["num_captions"] == 3
    # fold 1: every query first (the whole set would have put image 0's 0.9 above c1)
    assert second["rsum"] == 6 and second["num_captions"] == 2
    mean = folds["mean"]
    assert mean["image_to_text"]["R@1"] == 0.5 and mean["text_to_image"]["R@1"] == 0.5
    assert mean["rsum"] == 5 and mean["mean_recall"] == pytest.approx(5 / 6)
    assert mean["image_to_text"]["mean_rank"] == pytest.approx((2.5 + 1) / 2)
    assert folds["count"] == 2 and folds["images_per_fold"] == 2 and "mean over 2 folds" in mean["protocol"]
    whole = retrieval_metrics(img, txt, caption_image)
    assert whole["text_to_image"]["R@1"] != mean["text_to_image"]["R@1"]  # the folds are not the whole set
    with pytest.raises(ValueError, match="3 folds do not divide 4 images"):
        fold_metrics(img, txt, caption_image, None, torch.arange(4), 3)


def test_fold_of_a_shared_text_keeps_only_its_images_in_that_fold():
    img, txt, caption_image = shared_text_case()
    folds = fold_metrics(img, txt, caption_image, text_groups(["a", "a", "b", "c"]), torch.tensor([0, 2, 1, 3]), 2)
    # fold 0 = images 0, 2 with rows 0 ("a") and 2 ("b"): each text on one image, so row ranks:
    # row 0 (image 0, 0.5): image 2 (0.7) above -> 1; row 2 (image 2, 0.3): image 0 (0.1) below -> 0
    assert folds["each"][0]["num_text_queries"] == 2 and folds["each"][0]["text_to_image"]["R@1"] == 0.5


# ---- evaluate() and eval.py on the tiny checkpoint ----

@pytest.fixture(scope="module")
def tiny_eval(tiny):
    model, tokenizer, cfg = load_trained(str(tiny["checkpoint"]), torch.device("cpu"))
    enc = Encoding(cfg["image-size"], cfg["max-length"], 16, 0, torch.device("cpu"), nullcontext())
    return model, tokenizer, enc, os.path.dirname(str(tiny["captions"]))


def row_rule_metrics(model, tokenizer, enc, root):
    """The numbers as they were computed before texts were grouped: every caption row encoded and ranked."""
    with open(os.path.join(root, "captions.csv"), encoding="utf-8") as f:
        pairs = [(r["filename"], r["caption"]) for r in csv.DictReader(f)]
    names = sorted({n for n, _ in pairs})
    img, _, _ = encode_image_files(model, [os.path.join(root, "images", n) for n in names], enc)
    txt = encode_texts(model, tokenizer, [c for _, c in pairs], enc)
    i2t, t2i = retrieval_ranks(img, txt, torch.tensor([names.index(n) for n, _ in pairs]))
    return summarize(i2t), summarize(t2i)


def test_single_image_texts_give_the_same_numbers_to_the_last_digit(tiny_eval):
    model, tokenizer, enc, root = tiny_eval
    i2t, t2i = row_rule_metrics(model, tokenizer, enc, root)
    for group in (True, False):
        m = evaluate(model, tokenizer, root, enc, group_texts=group)
        assert m["num_text_queries"] == m["num_captions"] == 24
        for want, got in ((i2t, m["image_to_text"]), (t2i, m["text_to_image"])):
            assert {k: got[k] for k in want} == want  # exact equality, not approx


def test_evaluate_groups_a_caption_shared_by_two_images(tiny_eval, tmp_path):
    model, tokenizer, enc, root = tiny_eval
    with open(os.path.join(root, "captions.csv"), encoding="utf-8") as f:
        rows = [(r["filename"], r["caption"]) for r in csv.DictReader(f)][:6]
    rows[1] = (rows[1][0], rows[0][1])  # images 0 and 1 now share image 0's caption
    write_csv(tmp_path, rows)
    for name, _ in rows:
        shutil.copy(os.path.join(root, "images", name), tmp_path / "images" / name)
    grouped = evaluate(model, tokenizer, str(tmp_path), enc)
    per_row = evaluate(model, tokenizer, str(tmp_path), enc, group_texts=False)
    assert grouped["num_text_queries"] == 5 and per_row["num_text_queries"] == 6
    names = sorted(n for n, _ in rows)
    img, _, _ = encode_image_files(model, [str(tmp_path / "images" / n) for n in names], enc)
    txt = encode_texts(model, tokenizer, [c for _, c in rows], enc)
    caption_image = torch.tensor([names.index(n) for n, _ in rows])
    want = summarize(grouped_text_ranks(img, txt, caption_image, text_groups([c for _, c in rows])))
    assert grouped["text_to_image"] == pytest.approx(want)
    assert grouped["image_to_text"] == per_row["image_to_text"]  # image -> text is the same rule either way


def test_eval_reports_the_fold_mean_beside_the_whole_set(tiny, tmp_path, capsys, monkeypatch):
    from engine import evaluation
    seen = []
    real = evaluation.fold_metrics
    monkeypatch.setattr(evaluation, "fold_metrics", lambda *a: seen.append(a) or real(*a))
    out = tmp_path / "eval.json"
    metrics = eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(tiny["checkpoint"]),
                                "--valid-root", os.path.dirname(str(tiny["captions"])), "--num-workers", "0",
                                "--device", "cpu", "--folds", "4", "--output", str(out)])
    written = json.loads(out.read_text())
    assert written["set"] == "all 24 images" and written["folds"]["set"] == "mean over 4 folds of 6 images"
    folds = written["folds"]
    assert folds["count"] == 4 and [f["num_images"] for f in folds["each"]] == [6] * 4
    assert folds["mean"]["rsum"] == pytest.approx(sum(f["rsum"] for f in folds["each"]) / 4)
    assert written["rsum"] == pytest.approx(metrics["rsum"])
    # the folds follow captions.csv's order of images, not the sorted file names
    with open(tiny["captions"], encoding="utf-8") as f:
        listed = list(dict.fromkeys(r["filename"] for r in csv.DictReader(f)))
    assert [sorted(listed)[i] for i in seen[0][4].tolist()] == listed
    printed = capsys.readouterr().out
    assert "all 24 images | protocol" in printed and "mean over 4 folds of 6 images | protocol" in printed


def test_a_fold_count_that_does_not_divide_the_images_is_a_one_line_error(tiny, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(tiny["checkpoint"]),
                          "--valid-root", os.path.dirname(str(tiny["captions"])), "--num-workers", "0",
                          "--device", "cpu", "--folds", "5", "--output", str(tmp_path / "eval.json")])
    assert "folds 5 does not divide the 24 images" in one_line_exit(excinfo)
    assert not (tmp_path / "eval.json").exists()
