"""The model folder (issue 17): export --format hf writes safetensors weights, config.json, the tokenizer and a
model card; the folder is a --model-path for every entry and gives the same numbers as its .pt; a missing,
damaged or mismatched file is a one-line error naming it."""
import json
import os
import shutil
import struct

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

import eval as eval_entry
from engine.checkpoint import load_trained
from inference import classify, export, search, serve
from inference.encoder import Encoder
from tests.helpers import one_line_exit
from tests.trusted import TRUSTED

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-model"
    export.main(["--format", "hf", "--model-path", str(tiny["checkpoint"]), "--output", str(out)])
    return out


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def recall_lines(capsys):
    """The recall table eval printed: its direction and rsum lines, digits and all."""
    out = capsys.readouterr().out
    return [line for line in out.splitlines() if line.startswith(("image->text", "text->image", "rsum"))]


def test_eval_from_the_folder_prints_the_same_recall_digits(tiny, folder, tmp_path, capsys):
    common = ["--valid-root", str(tiny["images"].parent), "--device", "cpu", "--num-workers", "0"]
    eval_entry.main(["--model-path", str(tiny["checkpoint"]), "--output", str(tmp_path / "a.json"), *common])
    from_pt = recall_lines(capsys)
    eval_entry.main(["--model-path", str(folder), "--output", str(tmp_path / "b.json"), *common])
    assert len(from_pt) == 3 and recall_lines(capsys) == from_pt


def test_the_folder_holds_weights_only_config_tokenizer_and_card(tiny, folder):
    model, _, cfg = load_trained(str(tiny["checkpoint"]), CPU)
    param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = os.path.getsize(folder / "model.safetensors")
    assert param_bytes <= size <= param_bytes * 1.01 + 100_000  # the bytes of the weights plus a JSON header
    assert os.path.getsize(tiny["checkpoint"]) > 2 * size  # the .pt carries the optimizer's two moments too
    config = json.loads((folder / "config.json").read_text())
    assert config["image_model"] == cfg["image-model"] and config["image_size"] == cfg["image-size"]
    assert config["max_length"] == cfg["max-length"] and config["embedding_dim"] == model.dim
    assert config["text_pooling"] == cfg["text-pooling"] and config["temperature"] == cfg["temperature"]
    assert config["image_mean"] == [0.485, 0.456, 0.406] and len(config["image_std"]) == 3
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder / "text"))


def test_the_model_card_has_hub_front_matter_and_the_report(tiny, folder):
    card = (folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "pytorch" and "clip" in meta["tags"] and meta["metrics"] == ["recall"]
    assert meta["datasets"] == ["train"] and meta["pipeline_tag"] == "zero-shot-image-classification"
    report = json.loads((tiny["checkpoint"].parent / "report.json").read_text())
    r5 = f"{100 * report['image_to_text']['R@5']:.1f}"
    assert f"| image → text | {100 * report['image_to_text']['R@1']:.1f} | {r5} |" in body
    assert f"epoch {report['epoch']}" in body and report["protocol"] in body
    assert f"python eval.py --model-path {folder.name}" in body and f"hf upload <your-user>/{folder.name}" in body
    assert '"learning-rate"' in body  # the training config


def test_classify_and_search_take_the_folder(tiny, folder, tmp_path):
    image = str(min(tiny["images"].iterdir()))
    args = ["--image", image, "--labels", "circle,star,square", "--device", "cpu"]
    assert classify.main(["--model-path", str(folder), *args]) == classify.main(
        ["--model-path", str(tiny["checkpoint"]), *args])
    out = tmp_path / "index"
    search.main(["index", "--model-path", str(folder), "--images", str(tiny["images"]), "--output", str(out),
                 "--device", "cpu"])
    hits = search.main(["query", "--index", str(out), "--model-path", str(folder), "--text", "a red circle",
                        "-k", "3", "--device", "cpu", *TRUSTED])
    assert len(hits) == 3
    app = serve.create_app(str(folder), str(out), device="cpu")  # the web service, on the folder and its index
    with TestClient(app) as client:
        found = client.get("/api/search", params={"q": "a red circle", "k": 3}).json()
    assert [r["id"] for r in found["results"]] == [h["id"] for h in hits]


def test_onnx_export_from_the_folder_matches_the_checkpoint(tiny, folder, tmp_path):
    import onnxruntime as ort
    paths = export.main(["--model-path", str(folder), "--output", str(tmp_path / "onnx")])
    model = Encoder(str(tiny["checkpoint"]), "cpu").model
    pixels = torch.randn(2, 3, 32, 32)
    got = ort.InferenceSession(paths["image"], providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        want = model.encode_image(pixels.contiguous(memory_format=torch.channels_last))
    assert abs(got - want.numpy()).max() <= 1e-4


def test_export_refuses_a_folder_that_holds_files(tiny, folder):
    before = (folder / "config.json").read_bytes()
    with pytest.raises(SystemExit) as excinfo:
        export.main(["--format", "hf", "--model-path", str(tiny["checkpoint"]), "--output", str(folder)])
    assert "already holds files" in one_line_exit(excinfo) and (folder / "config.json").read_bytes() == before


# ---------------------------------------------------------------- broken folders
def lie_about_offsets(path):
    """Rewrite the header so one tensor claims 1000 times its bytes (past the end of the file)."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, begin + 1000 * (end - begin)]
    header[name]["shape"] = [1000 * (end - begin) // 4]
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length:])


def edit_config(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def rename_a_weight(path):
    from safetensors.torch import load_file, save_file
    weights = load_file(path)
    weights["image.renamed"] = weights.pop(next(iter(weights)))
    save_file(weights, path)


DAMAGE = {
    "no config.json": (lambda d: os.remove(d / "config.json"), "has no config.json"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{oops"), "config.json' is not readable JSON"),
    "config.json foreign": (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
                            "config.json' does not describe a model of this project"),
    "config.json bad size": (lambda d: edit_config(d / "config.json", image_size=-3), "has image_size -3"),
    "no weights": (lambda d: os.remove(d / "model.safetensors"), "model.safetensors' does not exist"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), "model.safetensors' is damaged"),
    "header longer than the file": (lambda d: (d / "model.safetensors").write_bytes(
        struct.pack("<Q", 1 << 40) + b"{}"), "its header claims 1099511627776 bytes"),
    "header lies about sizes": (lambda d: lie_about_offsets(d / "model.safetensors"), "claims bytes"),
    "weights of another model": (lambda d: edit_config(d / "config.json", image_model="resnet34"),
                                 "model.safetensors' do not fit the model its config describes"),
    "a renamed weight": (lambda d: rename_a_weight(d / "model.safetensors"),
                         "model.safetensors' do not fit the model its config describes"),
    "another vocabulary": (lambda d: edit_config(d / "config.json", text_vocab="0123456789abcdef"),
                           "does not fit the checkpoint"),
    "no text config": (lambda d: os.remove(d / "text" / "config.json"), "lacks text/config.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_broken_folder_is_one_line_naming_the_file(damage, folder, tmp_path):
    broken = copy_of(folder, tmp_path)
    spoil, expected = DAMAGE[damage]
    spoil(broken)
    with pytest.raises(SystemExit) as excinfo:
        eval_entry.main(["--model-path", str(broken), "--valid-root", str(tmp_path), "--device", "cpu",
                         "--output", str(tmp_path / "e.json")])
    message = one_line_exit(excinfo)
    assert expected in message and str(broken) in message, message
