"""bench/recall.py: its naive recall loop against engine/metrics.py on exact features; `python -m bench`: small runs."""
import json

import pytest
import torch

import bench.__main__ as bench
from bench import recall as bench_recall
from engine.metrics import retrieval_metrics, retrieval_ranks


def test_exact_features_score_the_same_in_any_order():
    img, txt, _ = bench_recall.exact_features(50, 150, dim=96)
    sims = img @ txt.t()  # (50, 150) one matmul
    rows = torch.stack([txt @ img[i] for i in range(50)])  # one matrix-vector product per image
    assert torch.equal(sims, rows)
    assert torch.equal(sims.double(), img.double() @ txt.double().t())  # float32 is exact here
    assert torch.allclose(img.norm(dim=1), torch.ones(50), atol=0.01)


def test_loop_on_hand_made_features():
    # image i is basis vector i; caption c has its image's vector, except caption 3 which looks like image 0
    img = torch.eye(12)[:12, :16]  # (12, 16)
    caption_image = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    txt = img[caption_image].clone()
    txt[3] = 0.9 * img[0] + 0.1 * img[3]  # caption 3 ranks image 0 first, its own image second
    everything = torch.arange(12)
    t2i = bench_recall.loop_caption_queries(img, txt, caption_image, everything)  # (12, 3) hits at K = 1, 5, 10
    assert t2i[3].tolist() == [False, True, True]
    assert t2i.sum(0).tolist() == [11, 12, 12]
    i2t = bench_recall.loop_image_queries(img, txt, caption_image, everything)
    assert bool(i2t.all())  # image 0's caption still beats caption 3 (1 > 0.9); image 3 only has caption 3


def test_loop_recall_equals_metrics_recall():
    img, txt, caption_image = bench_recall.exact_features(80, 240, dim=64, noise=3.0, seed=1)
    everything_i, everything_c = torch.arange(80), torch.arange(240)
    assert not bench_recall.ambiguous(img, txt, caption_image, everything_i, everything_c)
    i2t = bench_recall.loop_image_queries(img, txt, caption_image, everything_i)
    t2i = bench_recall.loop_caption_queries(img, txt, caption_image, everything_c)
    m = retrieval_metrics(img, txt, caption_image)
    loop = [i2t[:, j].double().mean().item() for j in range(3)] + [t2i[:, j].double().mean().item() for j in range(3)]
    vectorised = [m[d][f"R@{k}"] for d in ("image_to_text", "text_to_image") for k in bench_recall.KS]
    assert loop == vectorised
    assert 0.2 < vectorised[3] < 0.95  # hard enough that the comparison means something
    # the per-query ranks for a subset are metrics.py's full ranks for those queries
    full_i2t, full_t2i = retrieval_ranks(img, txt, caption_image)
    qi, qc = torch.tensor([5, 0, 79, 33]), torch.tensor([239, 7, 100])
    sub_i2t, sub_t2i = bench_recall.query_ranks(img, txt, caption_image, qi, qc)
    assert torch.equal(sub_i2t, full_i2t[qi]) and torch.equal(sub_t2i, full_t2i[qc])


def test_ambiguous_catches_a_tie_at_the_boundary():
    img = torch.eye(4)
    caption_image = torch.arange(4)
    txt = img.clone()
    txt[0] = (img[0] + img[1]) / 2  # caption 0 scores images 0 and 1 the same: R@1 depends on tie order
    assert bench_recall.ambiguous(img, txt, caption_image, torch.arange(4), torch.arange(4))
    assert not bench_recall.ambiguous(img, img.clone(), caption_image, torch.arange(4), torch.arange(4))


def test_recall_only_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--only", "recall", "--recall-sizes", "300x100,200x200", "--loop-queries", "30",
                         "--repeats", "2", "--device", "cpu", "--output", str(out)])
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(result["results"]))
    machine = data["machine"]
    assert machine["cpu"] and machine["torch"] == torch.__version__ and machine["device"] == "cpu"
    assert machine["torch_threads"] >= 1
    rows = data["results"]
    assert [r["section"] for r in rows] == ["recall"] * 6  # per size: loop, metrics.py, bare product
    for r in rows:
        assert r["median"] > 0 and len(r["runs"]) == 2 and all(v > 0 for v in r["runs"])
    loop, vectorised = rows[0], rows[1]
    assert loop["item"].startswith("per-query loop") and "(extrapolated)" in loop["item"]
    assert vectorised["baseline"] == loop["item"] and vectorised["ratio"] > 0
    assert vectorised["identical"] is True and vectorised["status"] == "PASS"
    assert vectorised["recall_loop"] == vectorised["recall_metrics"]
    assert vectorised["queries_compared"] == 60
    product = rows[2]  # timed alternating with metrics.py; its ratio is metrics time / product time
    assert product["item"] == "bare product img @ txt.T, 300x100" and product["baseline"] == vectorised["item"]
    assert product["ratio"] == vectorised["median"] / product["median"]
    assert product["status"] == ("PASS" if product["ratio"] <= 1.3 else "MISS")
    per_round = product["metrics_over_product_per_round"]
    assert per_round == [m / p for m, p in zip(vectorised["runs"], product["runs"], strict=True)]
    printed = capsys.readouterr().out
    assert "metrics.retrieval_metrics, 300x100" in printed and "PASS" in printed


def test_float_baseline_transform_gives_the_same_model_input():
    from PIL import Image

    from bench.cases import float_transform
    from dataset import image_transform, normalize
    img = Image.new("RGB", (40, 30), (200, 30, 90))
    img.paste((10, 220, 40), (0, 0, 15, 30))
    torch.manual_seed(0)
    want = float_transform(16)(img)  # float32 out of the worker
    torch.manual_seed(0)
    got = normalize(image_transform(16, augment=True)(img))  # uint8 out of the worker, normalised later
    assert want.dtype == got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5, rtol=0)


def test_tiny_data_and_train_run(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--only", "data,train", "--data-images", "4", "--workers", "0", "--repeats", "1",
                "--steps", "1", "--batch-size", "4", "--image-size", "32", "--device", "cpu", "--output", str(out)])
    data = json.loads(out.read_text())
    rows = {r["item"]: r for r in data["results"]}
    naive = next(r for r in data["results"] if r["section"] == "data" and r.get("is_baseline"))
    assert "float32 out" in naive["item"]
    real = rows["real PairDataset: crop-scale decode, crop only in worker, uint8 out; jitter + normalize on device"]
    assert real["baseline"] == naive["item"] and real["ratio"] > 0 and real["median"] > 0
    alone = rows["real PairDataset, loader alone (jitter + normalize left to a GPU)"]
    assert alone["baseline"] == naive["item"] and alone["median"] > 0
    stages = data["data_stages"]
    assert stages["ms_per_sample"]["collate: stack + shared memory (real, uint8)"] > 0
    assert stages["real_image_ms"] > 0 and stages["ratio_from_stages"] > 0
    jitter = next(r for r in data["results"] if r["item"].startswith("engine.augment.color_jitter alone"))
    assert jitter["unit"] == "ms" and jitter["median"] > 0 and "batch 4 at 224 px on cpu" in jitter["item"]
    assert stages["real_device_ms"] >= stages["ms_per_sample"]["color_jitter on the batch (real, on the device: "
                                                                "not in a worker)"] > 0
    train = [r for r in data["results"] if r["section"] == "train"]
    assert [r["item"] for r in train] == ["bare fwd+bwd+AdamW (fp32)", "train_one_epoch step (fp32)"]
    assert train[1]["median"] > 0 and train[1]["ratio"] == pytest.approx(train[1]["median"] / train[0]["median"])
    assert train[1]["status"] == ("PASS" if train[1]["ratio"] >= 0.9 else "MISS")  # the target, applied
