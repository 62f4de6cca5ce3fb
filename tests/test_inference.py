"""The inference encoder, search, classify and export on a tiny trained checkpoint, checked against evaluation."""
import copy
import dataclasses
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import tokenize
from engine import evaluation
from engine.checkpoint import load_trained
from engine.runtime import amp_context
from inference import classify, export, search
from inference import index as search_index
from inference.encoder import DEFAULT_TEMPLATES, Encoder, InferenceError, check_labels, check_templates, zero_shot_probs
from tests.trusted import TRUSTED

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def encoder(tiny):
    return Encoder(str(tiny["checkpoint"]), "cpu", batch_size=8)


_ENCODERS = {}  # checkpoint path -> Encoder, shared by the tests of this module


@pytest.fixture(autouse=True)
def load_each_checkpoint_once(monkeypatch):
    """The entry scripts build an Encoder per call (~1-3 s); reuse one per checkpoint path in this module."""
    cache = _ENCODERS

    def cached(model_path, device="auto", text_model=None, batch_size=64, num_workers=0, **kwargs):
        key = (os.path.abspath(model_path), text_model)
        if key not in cache:
            cache[key] = Encoder(model_path, "cpu", text_model, **kwargs)
        enc = copy.copy(cache[key])
        enc.enc = dataclasses.replace(enc.enc, batch_size=batch_size, num_workers=num_workers)
        return enc

    for module in (classify, search):
        monkeypatch.setattr(module, "Encoder", cached)


@pytest.fixture()
def photos(tiny, tmp_path):
    """12 demo images in two folders, plus a corrupt .jpg and a text file that indexing must pass over."""
    root = tmp_path / "photos"
    names = sorted(os.listdir(tiny["images"]))[:12]
    for i, name in enumerate(names):
        target = root / ("a" if i < 6 else "b/c") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny["images"] / name, target)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def exit_message(excinfo):
    return str(excinfo.value.code)


def rows(index):
    """An index's memory-mapped float16 embeddings as a float32 tensor, (N, D)."""
    return torch.from_numpy(np.asarray(index.embeddings, dtype=np.float32))


# ---------------------------------------------------------------------- encoding is eval's encoding
def test_encoder_matches_eval(tiny, encoder):
    model, tokenizer, cfg = load_trained(str(tiny["checkpoint"]), CPU)
    paths = sorted(str(p) for p in tiny["images"].iterdir())[:10]
    amp = amp_context(CPU, False)
    enc = evaluation.Encoding(cfg["image-size"], cfg["max-length"], 4, 0, CPU, amp)
    want, kept, failed = evaluation.encode_image_files(model, paths, enc)
    assert kept == list(range(10)) and failed == []
    assert torch.allclose(encoder.encode_images(paths), want, atol=1e-5)
    feats, kept, failed = encoder.encode_image_files(paths)
    assert kept == list(range(10)) and failed == []
    assert torch.allclose(feats, want, atol=1e-5)
    texts = ["a big red circle in the top left", "star", "green square, large, right"]
    want = evaluation.encode_texts(model, tokenizer, texts, dataclasses.replace(enc, batch_size=2))
    assert torch.allclose(encoder.encode_texts(texts), want, atol=1e-5)
    assert torch.allclose(want.norm(dim=1), torch.ones(3), atol=1e-5)


def test_pil_images_of_any_mode_match_files(encoder, tmp_path):
    """An RGBA picture in memory is flattened on white exactly as the same picture read from a PNG file."""
    rgba = Image.new("RGBA", (40, 30), (200, 30, 30, 0))
    rgba.paste((20, 20, 200, 255), (5, 5, 25, 20))
    rgba.save(tmp_path / "x.png")
    from_memory = encoder.encode_images([rgba])
    from_file = encoder.encode_images([str(tmp_path / "x.png")])
    assert torch.allclose(from_memory, from_file, atol=1e-6)
    opaque = encoder.encode_images([rgba.convert("RGB")])  # black where transparent, not white
    assert not torch.allclose(from_memory, opaque, atol=1e-3)


# ---------------------------------------------------------------------- zero-shot
def test_zero_shot_probs_on_hand_made_features():
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # (N=2, D=2), unit rows
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (L=2, D=2)
    probs = zero_shot_probs(images, labels, logit_scale=10.0)
    # softmax([10, 0]) and softmax([6, 8])
    want = torch.tensor([[1 / (1 + np.exp(-10)), 1 / (1 + np.exp(10))], [1 / (1 + np.exp(2)), 1 / (1 + np.exp(-2))]])
    assert torch.allclose(probs, want.float(), atol=1e-6)


def test_label_embeddings_average_templates(encoder):
    templates = ["a photo of a {}.", "{} in the picture"]
    got = encoder.label_embeddings(["red circle", "blue star"], templates)  # (2, D)
    feats = encoder.encode_texts(["a photo of a red circle.", "red circle in the picture",
                                  "a photo of a blue star.", "blue star in the picture"])
    want = torch.stack([feats[:2].mean(0), feats[2:].mean(0)])
    want = want / want.norm(dim=1, keepdim=True)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-6)


def test_label_and_template_checks():
    assert check_labels([" cat ", "", "big  dog"]) == ["cat", "big dog"]
    with pytest.raises(InferenceError, match="no labels"):
        check_labels([" ", ""])
    with pytest.raises(InferenceError, match="twice"):
        check_labels(["cat", "cat "])
    with pytest.raises(InferenceError, match="no {}"):
        check_templates(["a photo of a {}.", "a photo"])


def test_classify_cli(tiny, encoder, tmp_path, capsys):
    image = str(sorted(tiny["images"].iterdir())[0])
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n\nthere is a {}\n")
    out = classify.main(["--model-path", str(tiny["checkpoint"]), "--image", image, "--labels", "circle, star,square",
                         "--templates-file", str(templates), "--device", "cpu"])
    labels = out[0]["labels"]
    probs = [x["prob"] for x in labels]
    assert sorted(x["label"] for x in labels) == ["circle", "square", "star"]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    names = ["circle", "star", "square"]
    want = encoder.classify(encoder.encode_images([image]), names, ["a photo of a {}.", "there is a {}"])[0]
    want_by_name = dict(zip(names, want.tolist(), strict=True))
    assert {x["label"]: x["prob"] for x in labels} == pytest.approx(want_by_name, abs=1e-6)
    assert "circle" in capsys.readouterr().out
    # defaults: the built-in templates
    out = classify.main(["--model-path", str(tiny["checkpoint"]), "--image", image, "--labels", "a,b", "--top", "1"])
    assert len(out[0]["labels"]) == 1 and len(DEFAULT_TEMPLATES) > 3


@pytest.mark.parametrize("args, message", [
    (["--labels", " , "], "no labels"),
    (["--labels", "a,a"], "twice"),
    (["--labels-file", "missing.txt"], "does not exist"),
])
def test_classify_user_errors(tiny, args, message):
    image = str(sorted(tiny["images"].iterdir())[0])
    with pytest.raises(SystemExit) as e:
        classify.main(["--model-path", str(tiny["checkpoint"]), "--image", image, *args])
    assert exit_message(e).startswith("error:") and message in exit_message(e)


def test_classify_missing_checkpoint_and_bad_image(tiny, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(SystemExit) as e:
        classify.main(["--model-path", str(tmp_path / "none.pt"), "--image", str(bad), "--labels", "a"])
    assert "does not exist" in exit_message(e)
    with pytest.raises(SystemExit) as e:
        classify.main(["--model-path", str(tiny["checkpoint"]), "--image", str(bad), "--labels", "a"])
    assert "cannot decode image" in exit_message(e)


# ---------------------------------------------------------------------- index and search
def index_cmd(tiny, photos, out, *extra):
    return search.main(["index", "--model-path", str(tiny["checkpoint"]), "--images", str(photos), "--output", str(out),
                        "--num-workers", "0", "--device", "cpu", *extra])


def test_index_then_update_only_encodes_changes(tiny, encoder, photos, tmp_path, capsys):
    out = tmp_path / "index"
    summary = index_cmd(tiny, photos, out)
    assert summary == {"images": 12, "new": 12, "unchanged": 0, "removed": 0, "failed": 1, "outside": 0,
                       "index_type": "flat", "ann": None}
    assert "broken.jpg" in capsys.readouterr().err
    index = search_index.ImageIndex.load(str(out))
    assert index.files == ([f"a/{n}" for n in sorted(os.listdir(photos / "a"))]
                           + [f"b/c/{n}" for n in sorted(os.listdir(photos / "b/c"))])
    assert index.meta["failed"] == ["broken.jpg"] and index.checkpoint["sha256"] == encoder.identity()["sha256"]
    # stored rows are the encoder's features, rounded to float16
    want = encoder.encode_images([index.path(i) for i in range(len(index))])
    assert isinstance(index.embeddings, np.memmap) and not index.embeddings.flags.writeable
    assert torch.allclose(rows(index), want, atol=2e-3)
    before = {n: rows(index)[i] for i, n in enumerate(index.files)}

    # grow by two (one in a new sub-folder), delete one, and re-run
    src = sorted(tiny["images"].iterdir())
    shutil.copy(src[20], photos / "a" / "new1.jpg")
    (photos / "d").mkdir()
    shutil.copy(src[21], photos / "d" / "new2.png")  # a JPEG named .png: decoded by content
    os.remove(photos / index.files[0])
    summary = index_cmd(tiny, photos, out)
    assert summary == {"images": 13, "new": 2, "unchanged": 11, "removed": 1, "failed": 1, "outside": 0,
                       "index_type": "flat", "ann": None}
    index = search_index.ImageIndex.load(str(out))
    # unchanged files keep their order; new ones are appended (so that additions change no id)
    assert index.files[-2:] == ["a/new1.jpg", "d/new2.png"] and before.keys() - set(index.files)
    assert index.files[:11] == [n for n in before if n in index.files]
    for i, name in enumerate(index.files):
        if name in before:
            assert torch.equal(rows(index)[i], before[name])
    assert len([f for f in os.listdir(out) if f.endswith(".npy")]) == 1  # the old embeddings file is gone

    # image -> image: every indexed image finds itself first
    scores, ids = index.search(encoder.encode_images([index.path(i) for i in range(len(index))]), k=3)
    assert ids[:, 0].tolist() == list(range(len(index)))
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert scores[:, 0].min() > 0.998


def test_index_with_another_checkpoint(tiny, photos, tmp_path):
    out = tmp_path / "index"
    index_cmd(tiny, photos, out)
    other = tmp_path / "other.pt"
    ckpt = torch.load(tiny["checkpoint"], weights_only=False)
    ckpt["model"]["image.proj.bias"] = ckpt["model"]["image.proj.bias"] + 0.5  # a different model
    torch.save(ckpt, other)
    cmd = ["index", "--model-path", str(other), "--images", str(photos), "--output", str(out), "--num-workers", "0"]
    with pytest.raises(SystemExit) as e:
        search.main(cmd)
    assert "another checkpoint" in exit_message(e) and "--rebuild" in exit_message(e)
    with pytest.raises(SystemExit) as e:  # querying with the wrong model is refused too
        search.main(["query", "--index", str(out), *TRUSTED, "--model-path", str(other), "--text", "a red star"])
    assert "was built with" in exit_message(e)
    old = rows(search_index.ImageIndex.load(str(out)))
    assert search.main(cmd + ["--rebuild"])["new"] == 12
    index = search_index.ImageIndex.load(str(out))
    assert index.checkpoint["path"] == str(other) and not torch.allclose(rows(index), old, atol=1e-2)


def test_query_cli(tiny, encoder, photos, tmp_path, capsys):
    out = tmp_path / "index"
    index_cmd(tiny, photos, out)
    index = search_index.ImageIndex.load(str(out))
    capsys.readouterr()

    results = search.main(["query", "--index", str(out), *TRUSTED, "--text", "a big red circle", "-k", "5"])
    scores = rows(index) @ encoder.encode_texts(["a big red circle"])[0]  # (N,)
    assert [r["id"] for r in results] == scores.topk(5).indices.tolist()
    assert [r["score"] for r in results] == pytest.approx(scores.topk(5).values.tolist(), abs=1e-5)
    assert capsys.readouterr().out.count("\n") == 6  # a title and five ranked lines

    query = index.path(7)
    results = search.main(["query", "--index", str(out), *TRUSTED, "--image", query, "-k", "50"])
    assert results[0]["path"] == query and len(results) == len(index)  # k larger than the index: all of it

    # image -> text over a captions CSV (duplicates ranked once) and over a plain text file
    captions = tmp_path / "caps.csv"
    captions.write_text("filename,caption\nx.jpg,a red star\ny.jpg,a blue circle\nz.jpg,a red star\n")
    results = search.main(["query", "--model-path", str(tiny["checkpoint"]), "--captions", str(captions),
                           "--image", query])
    text = encoder.encode_texts(["a red star", "a blue circle"])
    sims = (encoder.encode_images([query]) @ text.T)[0].tolist()
    assert sorted(r["caption"] for r in results) == ["a blue circle", "a red star"]
    assert {r["caption"]: r["score"] for r in results} == pytest.approx(
        {"a red star": sims[0], "a blue circle": sims[1]}, abs=1e-5)
    lines = tmp_path / "caps.txt"
    lines.write_text("a red star\n\na blue circle\n")
    assert len(search.main(["query", "--index", str(out), *TRUSTED, "--captions", str(lines), "--image", query])) == 2


def test_hnsw_matches_exact_or_says_how_to_install(tiny, photos, tmp_path, monkeypatch):
    """On 12 images an hnsw search keeps every image as a candidate (ef_search 128), so it is exact."""
    flat, hnsw = tmp_path / "flat", tmp_path / "hnsw"
    index_cmd(tiny, photos, flat)
    exact = search.main(["query", "--index", str(flat), *TRUSTED, "--text", "a small green star", "-k", "4"])
    try:
        import faiss  # noqa: F401
    except ImportError:
        pass
    else:
        index_cmd(tiny, photos, hnsw, "--index-type", "hnsw")
        fast = search.main(["query", "--index", str(hnsw), *TRUSTED, "--text", "a small green star", "-k", "4"])
        assert [r["id"] for r in fast] == [r["id"] for r in exact]
        assert [r["score"] for r in fast] == pytest.approx([r["score"] for r in exact], abs=1e-5)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed
    calls = [["index", "--model-path", str(tiny["checkpoint"]), "--images", str(photos), "--output",
              str(tmp_path / "ivf"), "--index-type", "ivf", "--num-workers", "0"]]
    if hnsw.exists():
        calls.append(["query", "--index", str(hnsw), *TRUSTED, "--text", "a star"])
    for args in calls:
        with pytest.raises(SystemExit) as e:
            search.main(args)
        assert exit_message(e).startswith("error:") and "pip install faiss-cpu" in exit_message(e)
    assert not (tmp_path / "ivf").exists()  # refused before anything was encoded or written


@pytest.mark.parametrize("make_args, message", [
    (lambda t, p: ["index", "--model-path", str(t["checkpoint"]), "--images", str(p / "nowhere"),
                   "--output", str(p / "i")],
     "does not exist"),
    (lambda t, p: ["query", "--index", str(p), "--text", "x"], "not an index"),
    (lambda t, p: ["query", "--text", "x"], "--index is required"),
    (lambda t, p: ["query", "--index", str(p), "--text", "x", "-k", "0"], "at least 1"),
])
def test_search_user_errors(tiny, photos, make_args, message, capsys):
    with pytest.raises(SystemExit) as e:
        search.main(make_args(tiny, photos))
    if e.value.code == 2:  # a usage error: argparse prints it on stderr
        assert message in capsys.readouterr().err
    else:
        assert exit_message(e).startswith("error:") and message in exit_message(e)


def test_index_of_folder_without_images(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        search.main(["index", "--model-path", str(tiny["checkpoint"]), "--images", str(tmp_path / "empty"),
                     "--output", str(tmp_path / "i")])
    assert "no .jpg/.jpeg/.png/.webp images" in exit_message(e)


# ---------------------------------------------------------------------- ONNX export
def test_export_leaves_the_encoder_in_eval_mode(tiny, tmp_path):
    encoder = Encoder(str(tiny["checkpoint"]), "cpu")
    export.export(encoder, str(tmp_path / "onnx"))
    assert not encoder.model.training  # the tracer must not hand the model back in training mode


def test_export_matches_pytorch(tiny, tmp_path):
    import json

    import onnxruntime as ort
    paths = export.main(["--model-path", str(tiny["checkpoint"]), "--output", str(tmp_path / "onnx")])
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    model, tokenizer, cfg = load_trained(str(tiny["checkpoint"]), CPU)  # a fresh, untouched model
    assert info["image_size"] == cfg["image-size"] and info["max_length"] == cfg["max-length"]
    assert info["logit_scale"] == pytest.approx(float(model.logit_scale()))
    assert len(info["mean"]) == len(info["std"]) == 3 and info["embedding_dim"] == model.dim

    image_session = ort.InferenceSession(paths["image"], providers=["CPUExecutionProvider"])
    text_session = ort.InferenceSession(paths["text"], providers=["CPUExecutionProvider"])
    size = info["image_size"]
    for batch in (1, 5):
        pixels = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            want = model.encode_image(pixels.contiguous(memory_format=torch.channels_last))
        got = image_session.run(None, {"pixel_values": pixels.numpy()})[0]
        assert got.shape == (batch, model.dim) and np.abs(got - want.numpy()).max() <= 1e-4

    from transformers import AutoTokenizer
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "onnx")  # the files written beside the graphs
    for texts in (["a red circle"], ["a big red circle in the top left", "star", "upper right: a huge white square"]):
        ids, mask = tokenize(exported_tokenizer, texts, info["max_length"])  # (B, T): padded in the second case
        assert torch.equal(ids, tokenize(tokenizer, texts, cfg["max-length"])[0])
        with torch.no_grad():
            want = model.encode_text(ids, mask)
        got = text_session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert got.shape == (len(texts), model.dim) and np.abs(got - want.numpy()).max() <= 1e-4
