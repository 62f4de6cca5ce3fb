"""Bad input to eval.py and the inference entries: each mistake is one line that says what the path is and what
to do, refused before any work; nothing already written is lost, and nothing outside the given folders is read,
written or served."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import eval as eval_script
from engine.checkpoint import CheckpointError, load_trained
from inference import classify, search, serve
from inference import index as search_index
from inference.encoder import Encoder, InferenceError, check_templates
from tests.helpers import DEMO_EVAL_CONFIG, ROOT, one_line_exit
from tests.trusted import TRUSTED
from tools import demo


def fails(call):
    """The one-line message of an entry that must refuse."""
    with pytest.raises(SystemExit) as e:
        call()
    return one_line_exit(e)


def jpeg(path, size=(40, 30)):
    Image.new("RGB", size, (200, 100, 50)).save(path, format="JPEG")
    return path


@pytest.fixture(scope="module")
def client(tiny, index_dir):
    with TestClient(serve.create_app(str(tiny["checkpoint"]), str(index_dir), device="cpu")) as c:
        yield c


def image_path(tiny, i=0):
    return str(sorted(tiny["images"].iterdir())[i])


# ---------------------------------------------------------------------- 1. eval --output
def eval_args(tiny, output, *extra):
    """eval.py's arguments; each `--key value` pair of `extra` replaces a default (a key given twice is an error)."""
    args = {"--config": DEMO_EVAL_CONFIG, "--model-path": str(tiny["checkpoint"]),
            "--valid-root": str(tiny["captions"].parent), "--num-workers": "0", "--device": "cpu",
            "--output": str(output)}
    args.update(zip(extra[::2], extra[1::2], strict=True))
    return [token for pair in args.items() for token in pair]


@pytest.mark.parametrize("kind, fragment", [
    ("checkpoint", "not a metrics file written by eval.py"),
    ("text", "not a metrics file written by eval.py"),
    ("other json", "not a metrics file written by eval.py"),
    ("folder", "is a folder"),
    ("empty", "output is empty"),
])
def test_eval_refuses_an_output_it_did_not_write_before_evaluating(tiny, tmp_path, monkeypatch, kind, fragment):
    target = {"checkpoint": tmp_path / "best.pt", "text": tmp_path / "precious.txt",
              "other json": tmp_path / "settings.json", "folder": tmp_path / "out", "empty": ""}[kind]
    if kind == "checkpoint":
        shutil.copy(tiny["checkpoint"], target)
    elif kind == "text":
        target.write_text("my notes\n")
    elif kind == "other json":
        target.write_text(json.dumps({"rsum": "mine", "theme": "dark"}))
    elif kind == "folder":
        target.mkdir()
    before = target.read_bytes() if kind not in ("folder", "empty") else None
    loaded = []
    monkeypatch.setattr(eval_script, "load_trained", lambda *a, **k: loaded.append(a) or pytest.fail("evaluated"))
    message = fails(lambda: eval_script.main(eval_args(tiny, target)))
    assert fragment in message and "--output" in message and loaded == []
    if before is not None:
        assert target.read_bytes() == before


def test_eval_rewrites_its_own_json_and_needs_overwrite_for_another_runs(tiny, tmp_path):
    out = tmp_path / "eval.json"
    first = eval_script.main(eval_args(tiny, out))
    second = eval_script.main(eval_args(tiny, out))  # the same evaluation again: its own file is replaced
    own = json.loads(out.read_text())
    assert own["written_by"] == "eval.py" and own["checkpoint"] == str(tiny["checkpoint"])
    assert second["rsum"] == pytest.approx(first["rsum"]) and json.loads(out.read_text())["rsum"] == first["rsum"]
    other = json.loads(out.read_text())
    other["checkpoint"] = str(tmp_path / "another.pt")  # the metrics of another checkpoint
    out.write_text(json.dumps(other))
    message = fails(lambda: eval_script.main(eval_args(tiny, out)))
    assert "another.pt" in message and "--overwrite true" in message
    assert json.loads(out.read_text())["checkpoint"] == str(tmp_path / "another.pt")
    eval_script.main(eval_args(tiny, out, "--overwrite", "true"))
    assert json.loads(out.read_text())["checkpoint"] == str(tiny["checkpoint"])
    older = {k: v for k, v in json.loads(out.read_text()).items() if k not in ("checkpoint", "valid_root")}
    out.write_text(json.dumps(older))  # written before eval recorded what it scored: another evaluation's
    message = fails(lambda: eval_script.main(eval_args(tiny, out)))
    assert "another checkpoint" in message and "--overwrite true" in message
    report = {k: v for k, v in own.items() if k != "written_by"}  # train.py's report.json: the same checkpoint
    report["epoch"] = 3  # and data, but not eval's file
    out.write_text(json.dumps(report))
    assert "--overwrite true" in fails(lambda: eval_script.main(eval_args(tiny, out)))
    assert json.loads(out.read_text())["epoch"] == 3
    eval_script.main(eval_args(tiny, out, "--overwrite", "true"))
    assert json.loads(out.read_text())["checkpoint"] == str(tiny["checkpoint"])


# ---------------------------------------------------------------------- 2. a tokenizer that does not fit
def permuted_tokenizer(tiny, folder):
    """The checkpoint's tokenizer folder with two token ids swapped: the same vocabulary size, other ids."""
    shutil.copytree(tiny["text_model"], folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "tokenizer.json").unlink()  # rebuilt from vocab.json and merges.txt
    return folder


def test_a_tokenizer_with_the_same_size_but_other_ids_is_refused(tiny, tmp_path):
    other = permuted_tokenizer(tiny, tmp_path / "other-text")
    message = fails(lambda: eval_script.main(eval_args(tiny, tmp_path / "e.json", "--text-model", str(other))))
    assert str(other) in message and "damaged" not in message and str(tiny["text_model"]) in message
    assert not (tmp_path / "e.json").exists()
    model, tokenizer, _ = load_trained(str(tiny["checkpoint"]), torch.device("cpu"), str(tiny["text_model"]))
    assert len(tokenizer) == model.text.model.get_input_embeddings().num_embeddings  # the same folder: fine


def test_the_stored_vocabulary_fingerprint_decides_once_the_training_folder_is_gone(tiny, tmp_path):
    ckpt = torch.load(tiny["checkpoint"], weights_only=False)
    assert len(ckpt["text_vocab"]) == 16  # train.py stores it
    ckpt["config"]["text-model"] = str(tmp_path / "gone")  # the folder it was trained with no longer exists
    moved = tmp_path / "moved.pt"
    torch.save(ckpt, moved)
    copy = tmp_path / "copy-text"
    shutil.copytree(tiny["text_model"], copy)
    load_trained(str(moved), torch.device("cpu"), str(copy))  # a moved copy of the same vocabulary: fine
    with pytest.raises(CheckpointError) as e:
        load_trained(str(moved), torch.device("cpu"), str(permuted_tokenizer(tiny, tmp_path / "other")))
    assert "other ids" in str(e.value) and "damaged" not in str(e.value)


def test_a_tokenizer_of_another_size_names_the_text_model_not_the_checkpoint(tiny, tmp_path):
    other = tmp_path / "small-text"
    demo.write_text_model(str(other), ["a red circle", "a blue star in the top left"])  # hidden 128, a few merges
    rows = torch.load(tiny["checkpoint"], weights_only=False)["model"]["text.model.embeddings.word_embeddings.weight"]
    with pytest.raises(CheckpointError) as e:
        load_trained(str(tiny["checkpoint"]), torch.device("cpu"), str(other))
    message = str(e.value)
    assert str(other) in message and "damaged" not in message and f"{rows.shape[0]} tokens" in message


# ---------------------------------------------------------------------- 3. say what a path is
def test_a_path_of_the_wrong_kind_is_named_as_such(tiny, tmp_path):
    folder, text = tmp_path / "somedir", os.path.join(ROOT, "README.md")
    folder.mkdir()
    image = image_path(tiny)
    message = fails(lambda: eval_script.main(eval_args(tiny, tmp_path / "e.json", "--model-path", str(folder))))
    assert "is a folder, not a checkpoint file" in message
    message = fails(lambda: search.main(["index", "--model-path", str(tiny["checkpoint"]), "--images", text,
                                         "--output", str(tmp_path / "i")]))
    assert "is a file, not a folder" in message
    for args in (["--labels-file", str(folder)], ["--labels", "a,b", "--templates-file", str(folder)]):
        message = fails(lambda args=args: classify.main(["--model-path", str(tiny["checkpoint"]), "--image", image,
                                                         *args]))
        assert "is a folder, not a file" in message and "does not exist" not in message
    message = fails(lambda: classify.main(["--model-path", str(tiny["checkpoint"]), "--image", str(folder),
                                           "--labels", "a,b"]))
    assert "is a folder, not a file" in message
    message = fails(lambda: search.main(["query", "--model-path", str(tiny["checkpoint"]), "--captions",
                                         str(folder), "--image", image]))
    assert "is a folder, not a file" in message


# ---------------------------------------------------------------------- 4. index --output
def index_args(tiny, out, *extra):
    return ["index", "--model-path", str(tiny["checkpoint"]), "--images", str(tiny["images"]), "--output", str(out),
            "--num-workers", "0", "--device", "cpu", *extra]


def test_index_output_that_is_a_file_or_holds_something_else(tiny, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert "is a file, not a folder" in fails(lambda: search.main(index_args(tiny, afile)))
    assert afile.read_text() == "keep me"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "index.json").write_text(json.dumps({"format": 7, "owner": "another tool"}))
    message = fails(lambda: search.main(index_args(tiny, busy)))
    assert "holds another index" in message and "another --output" in message and "--rebuild" in message
    assert json.loads((busy / "index.json").read_text())["owner"] == "another tool"
    home = tmp_path / "home"
    home.mkdir()
    (home / "embeddings-mine.npy").write_bytes(b"my own file")
    message = fails(lambda: search.main(index_args(tiny, home, "--rebuild")))
    assert "not an index" in message and "another --output" in message
    assert (home / "embeddings-mine.npy").read_bytes() == b"my own file" and not (home / "index.json").exists()


# ---------------------------------------------------------------------- 5. text files that are not text
def test_non_utf8_text_files_and_bad_templates_are_one_line_errors(tiny, tmp_path, capsys):
    picture, image = jpeg(tmp_path / "labels.jpg"), image_path(tiny)
    for args in (["--labels-file", str(picture)], ["--labels", "a,b", "--templates-file", str(picture)]):
        message = fails(lambda args=args: classify.main(["--model-path", str(tiny["checkpoint"]), "--image", image,
                                                         *args]))
        assert "not UTF-8 text" in message and str(picture) in message
    message = fails(lambda: search.main(["query", "--model-path", str(tiny["checkpoint"]), "--captions",
                                         str(picture), "--image", image]))
    assert "not UTF-8 text" in message and capsys.readouterr().out.isprintable()
    with pytest.raises(InferenceError, match="exactly one {}"):
        check_templates(["a photo of a {}.", "a {} and {}"])
    templates = tmp_path / "t.txt"
    templates.write_text("a {} and {}\n")
    message = fails(lambda: classify.main(["--model-path", str(tiny["checkpoint"]), "--image", image,
                                           "--labels", "a,b", "--templates-file", str(templates)]))
    assert "exactly one {}" in message


# ---------------------------------------------------------------------- 6. links out of the image folder
def test_indexing_skips_files_that_resolve_outside_the_folder(tiny, tmp_path, capsys):
    grow, elsewhere = tmp_path / "grow", tmp_path / "h"
    grow.mkdir()
    elsewhere.mkdir()
    for i in range(2):
        shutil.copy(image_path(tiny, i), grow / f"{i}.jpg")
    shutil.copy(image_path(tiny, 2), elsewhere / "gray.jpg")
    os.symlink(elsewhere / "gray.jpg", grow / "link.jpg")
    os.symlink(grow / "0.jpg", grow / "inner.jpg")  # a link that stays inside is indexed
    summary = search.main(index_args(tiny, tmp_path / "i", "--images", str(grow)))
    assert summary["images"] == 3 and summary["outside"] == 1
    printed = capsys.readouterr()
    assert "1 outside the folder" in printed.out and "link.jpg" in printed.err
    index = search_index.ImageIndex.load(str(tmp_path / "i"))
    assert sorted(index.files) == ["0.jpg", "1.jpg", "inner.jpg"]
    assert all(index.path(i) is not None for i in range(len(index)))


# ---------------------------------------------------------------------- 7. serve --port
@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_a_port_out_of_range_is_a_usage_error(port, capsys):
    with pytest.raises(SystemExit) as e:
        serve.parse_args(["--index", "x", "--port", port])
    assert e.value.code == 2 and "1 to 65535" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_before_serving(tiny, index_dir, monkeypatch):
    monkeypatch.setattr(serve, "Encoder", lambda *a, **k: Encoder(str(tiny["checkpoint"]), "cpu"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        message = fails(lambda: serve.main(["--index", str(index_dir), "--device", "cpu", "--port", str(port),
                                            *TRUSTED]))
    assert f"port {port}" in message and "in use" in message and "--port" in message


# ---------------------------------------------------------------------- 8. the same limit flags everywhere
def test_every_entry_takes_the_image_limit_flags_named_as_in_the_config(tiny, tmp_path):
    a = serve.parse_args(["--index", "x", "--max-image-pixels", "1000", "--max-aspect-ratio", "2.5"])
    assert (a.max_image_pixels, a.max_aspect_ratio) == (1000, 2.5)
    assert serve.parse_args(["--index", "x", "--max-megapixels", "2"]).max_image_pixels == 2_000_000  # old name
    assert serve.parse_args(["--index", "x"]).max_image_pixels == 40_000_000
    image = image_path(tiny)
    message = fails(lambda: classify.main(["--model-path", str(tiny["checkpoint"]), "--image", image,
                                           "--labels", "a,b", "--max-image-pixels", "100"]))
    assert "raise --max-image-pixels" in message
    wide = str(jpeg(tmp_path / "wide.jpg", (40, 30)))
    message = fails(lambda: search.main(["query", "--model-path", str(tiny["checkpoint"]), "--captions",
                                         str(tiny["captions"]), "--image", wide, "--max-aspect-ratio", "1.2"]))
    assert "raise --max-aspect-ratio" in message
    message = fails(lambda: search.main(index_args(tiny, tmp_path / "i", "--max-image-pixels", "100")))
    assert "could be decoded" in message and not (tmp_path / "i").exists()
    ok = classify.main(["--model-path", str(tiny["checkpoint"]), "--image", image, "--labels", "a,b",
                        "--max-image-pixels", "1000000", "--max-aspect-ratio", "1.5"])
    assert len(ok[0]["labels"]) == 2


# ---------------------------------------------------------------------- 9. one pixel count for uploads and files
def test_server_and_classify_measure_a_jpeg_at_its_reduced_decoding_scale(tiny, index_dir, tmp_path):
    big = jpeg(tmp_path / "big.jpg", (2000, 2000))  # 4 MP; 250 x 250 at the 1/8 scale a 32-px model decodes at
    for limit, accepted in ((1_000_000, True), (10_000, False)):
        app = serve.create_app(str(tiny["checkpoint"]), str(index_dir), max_pixels=limit, device="cpu")
        with TestClient(app) as client:
            r = client.post("/api/classify", data={"labels": "a,b"},
                            files={"file": ("big.jpg", big.read_bytes(), "image/jpeg")})
        args = ["--model-path", str(tiny["checkpoint"]), "--image", str(big), "--labels", "a,b",
                "--max-image-pixels", str(limit)]
        if accepted:
            assert r.status_code == 200 and len(classify.main(args)[0]["labels"]) == 2
        else:
            assert r.status_code == 413 and "250x250" in r.json()["detail"]
            assert "250x250" in fails(lambda args=args: classify.main(args))


# ---------------------------------------------------------------------- 10. the HTTP API
def test_http_errors_use_http_wording_and_never_echo_the_input(client, tiny):
    good = open(image_path(tiny), "rb").read()
    r = client.post("/api/classify", data={"labels": ",,,"}, files={"file": ("a.jpg", good, "image/jpeg")})
    assert r.status_code == 422 and "no labels" in r.json()["detail"] and "--labels" not in r.json()["detail"]
    assert "'labels'" in r.json()["detail"]
    r = client.get("/api/search", params={"q": "x" * 5_000})  # a URL the server reads, a query it refuses
    assert r.status_code == 422 and "at most 500 characters" in r.json()["detail"] and len(r.content) < 300
    r = client.get("/api/search", params={"q": "x" * 60_000})  # past the server's 8192-character URL limit
    assert r.status_code == 414 and "xxxx" not in r.text and len(r.content) < 300
    r = client.get("/api/search", params={"q": "red", "k": "y" * 5000})
    assert r.status_code == 422 and "valid integer" in str(r.json()["detail"]) and "yyyy" not in r.text
    files = [("file", ("a.jpg", good, "image/jpeg")), ("file", ("b.jpg", good, "image/jpeg"))]
    for url, data in (("/api/search/image", None), ("/api/classify", {"labels": "a,b"})):
        r = client.post(url, data=data, files=files)
        assert r.status_code == 400 and "one file" in r.json()["detail"]
    assert client.get("/api/health").status_code == 200


def test_reported_cosine_scores_stay_within_one(tmp_path):
    rows = np.array([[1.001, 0.0], [0.0, -1.001], [0.6, 0.8]], dtype=np.float16)  # float16 rounding: norms over 1
    meta = {"root": str(tmp_path), "files": ["a.jpg", "b.jpg", "c.jpg"], "index_type": "flat", "checkpoint": {}}
    index = search_index.ImageIndex(str(tmp_path), meta, rows)
    scores, ids = index.search(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 3)
    assert scores[0, 0].item() == 1.0 and ids[0, 0].item() == 0
    assert scores[1, 2].item() == -1.0 and ids[1, 2].item() == 1
    assert scores.abs().max().item() <= 1.0


@pytest.mark.parametrize("module, argv", [("inference.search", ["query", "--bogus"]), ("inference.search", ["--help"]),
                                          ("inference.serve", ["--index", "x", "--port", "0"]),
                                          ("inference.classify", ["--help"])])
def test_an_option_mistake_or_help_is_answered_before_torch_is_imported(module, argv):
    """`python -X importtime` lists every module the entry imported before it exited."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "inference.options" in imported and not {"torch", "transformers", "fastapi"} & imported
    assert proc.returncode == (0 if argv == ["--help"] else 2)
