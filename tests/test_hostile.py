"""Broken and hostile input: bounded work per image, everything inside its folder, no run destroys another, and a
one-line error (never a traceback) for each mistake a user can make."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import eval as eval_script
import train
from dataset import PairDataset, image_transform, read_captions
from engine import files as files_module
from engine import rundir
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.errors import DataError, UserError
from engine.files import WriteError
from engine.images import ImageLimits, ImageTooLarge, load_image, open_image
from inference import classify, export, search, serve
from inference import index as search_index
from inference.encoder import Encoder
from tests.helpers import DEMO_EVAL_CONFIG, one_line_exit, tiny_train_args, write_csv
from tests.trusted import TRUSTED
from tools import prepare_data


def png_bytes(size, mode="1"):
    """A PNG of `size` that is tiny on disk (one bit per pixel, all black) but large once decoded."""
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------- resources: bounded work per image
def test_header_limits_refuse_strips_and_huge_images_before_decoding(tmp_path):
    strip = tmp_path / "strip.png"
    strip.write_bytes(png_bytes((1, 100_000)))
    assert strip.stat().st_size < 1000  # a few hundred bytes on disk ...
    with pytest.raises(ImageTooLarge, match="1x100000, an aspect ratio over 20"):
        load_image(str(strip), 32)  # ... refused on the header, before the resize could make it 32 x 3.2M
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes((10_000, 10_000)))
    with pytest.raises(ImageTooLarge, match="100.0 MP, over the 40 MP limit"):
        open_image(str(big), strict=True, min_size=224)
    assert open_image(str(big), strict=False, min_size=224) is None  # training: a skip, not a crash
    assert open_image(str(big), strict=True, min_size=224, limits=ImageLimits(max_pixels=200_000_000)) is not None


def test_jpeg_decodes_at_reduced_size_so_the_pixel_limit_applies_after_draft(tmp_path):
    path = tmp_path / "large.jpg"
    Image.new("RGB", (4000, 3000), (200, 100, 50)).save(path, quality=80)
    # 12 MP at full size, but the 1/8 draft decode needed for 224 px is 500 x 375: within a 1 MP limit
    image = open_image(str(path), strict=True, min_size=224, limits=ImageLimits(max_pixels=1_000_000))
    assert image.size == (500, 375)
    with pytest.raises(ImageTooLarge):  # without the reduced decode it would be refused
        open_image(str(path), strict=True, min_size=None, limits=ImageLimits(max_pixels=1_000_000))


def test_oversized_image_is_skipped_in_training_and_names_the_file_in_eval(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data / "valid", root)
    victim = sorted(os.listdir(root / "images"))[0]
    (root / "images" / victim).write_bytes(png_bytes((1, 100_000)))
    train_set = PairDataset(str(root), image_transform(32, augment=True, jitter=False), strict=False, min_size=32,
                            random_crop=True)
    row = [n for n, _ in train_set.pairs].index(victim)
    image, _, _, skipped = train_set[row]
    assert skipped == 1 and tuple(image.shape) == (3, 32, 32)
    ck = tmp_path / "ck"
    train.main(tiny_train_args(tiny_data, ck, "--epochs", "1"))
    with pytest.raises(SystemExit) as e:
        eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(ck / "best.pt"), "--valid-root",
                          str(root), "--num-workers", "0", "--output", str(tmp_path / "e.json")])
    assert victim in one_line_exit(e) and "aspect ratio" in one_line_exit(e)


def test_indexing_skips_and_the_server_refuses_oversized_images(tiny, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in sorted(os.listdir(tiny["images"]))[:3]:
        shutil.copy(tiny["images"] / name, photos / name)
    (photos / "strip.png").write_bytes(png_bytes((1, 100_000)))
    encoder = Encoder(str(tiny["checkpoint"]), "cpu")
    summary = search_index.build_index(encoder, str(photos), str(tmp_path / "index"), progress=False)
    assert summary["images"] == 3 and summary["failed"] == 1
    app = serve.create_app(str(tiny["checkpoint"]), str(tmp_path / "index"), device="cpu")
    with TestClient(app) as client:
        for data in (png_bytes((1, 100_000)), png_bytes((10_000, 10_000))):
            r = client.post("/api/search/image", files={"file": ("x.png", data, "image/png")})
            assert r.status_code == 413 and ("aspect ratio" in r.json()["detail"] or "MP" in r.json()["detail"])
        assert client.get("/api/health").status_code == 200


# ---------------------------------------------------------------------- paths: everything stays inside its folder
@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/hostname", "a/../../outside.jpg", "link/x.jpg"])
def test_dataset_rows_must_stay_inside_images(tmp_path, name):
    root = tmp_path / "data"
    write_csv(root, [("ok.jpg", "fine"), (name, "hostile")])
    Image.new("RGB", (8, 8)).save(root / "images" / "ok.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    os.symlink(tmp_path, root / "images" / "link")  # a link that leads out of images/
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    with pytest.raises(DataError, match=r"captions.csv line 3: file name .* leads outside"):
        read_captions(str(root))


def test_prepare_data_refuses_names_that_leave_the_output(tmp_path):
    images = tmp_path / "coco"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "../../x/evil.jpg"},
                   {"id": 3, "file_name": "/etc/hostname"}],
        "annotations": [{"image_id": i, "caption": "c"} for i in (1, 2, 3)]}))
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["coco", "--annotations", str(annotations), "--images", str(images),
                           "--output", str(tmp_path / "out" / "deep"), "--workers", "1"])
    assert "2 image file name(s) are absolute or lead outside" in one_line_exit(e)
    assert not (tmp_path / "x").exists() and not (tmp_path / "out" / "deep" / "captions.csv").exists()
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["coco", "--annotations", str(annotations), "--images", str(images),
                           "--output", str(target)])
    assert "is a file" in one_line_exit(e) and target.read_text() == "keep me"


def test_index_with_a_name_outside_its_root_is_refused(tiny, tmp_path):
    out = tmp_path / "index"
    search_index.build_index(Encoder(str(tiny["checkpoint"]), "cpu"), str(tiny["images"]), str(out), progress=False)
    meta = json.loads((out / "index.json").read_text())
    meta["files"][0] = "../../etc/hostname"
    (out / "index.json").write_text(json.dumps(meta))
    with pytest.raises(search_index.SearchError, match="outside its root.*--rebuild"):
        search_index.ImageIndex.load(str(out))


# ---------------------------------------------------------------------- runs: nothing written is ever lost
def test_a_fresh_run_refuses_another_runs_files_before_reading_data(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_train_args(tiny_data, out, "--epochs", "1"))
    best = (out / "best.pt").read_bytes()
    log = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:  # train-root does not exist: the refusal must come first
        train.main(tiny_train_args(tiny_data, out, "--train-root", str(tmp_path / "nowhere")))
    assert "already exist from another run" in one_line_exit(e) and "--overwrite true" in one_line_exit(e)
    assert (out / "best.pt").read_bytes() == best and (out / "metrics.jsonl").read_text() == log
    train.main(tiny_train_args(tiny_data, out, "--epochs", "1", "--overwrite", "true", "--seed", "3"))
    assert [json.loads(s)["epoch"] for s in open(out / "metrics.jsonl")] == [0]  # a new log, not appended


def fake_state(epoch, rsum, best, best_epoch):
    log_line = {"epoch": epoch, "valid": {"rsum": rsum}, "best": best_epoch == epoch}
    return {"model": {"w": torch.full((2,), float(epoch))}, "config": {}, "epoch": epoch, "best_rsum": best,
            "best_epoch": best_epoch, "metrics": {"rsum": rsum}, "log_line": log_line}


@pytest.mark.parametrize("kill_at", range(5))
def test_a_kill_at_any_point_of_the_save_sequence_is_repaired_on_resume(tmp_path, monkeypatch, kill_at):
    """Epochs 0-2 with rsums 1, 3, 5 (each a new best); the save of epoch 2 dies at point `kill_at`:
    0 inside last.pt, 1 after last.pt, 2 inside best.pt, 3 after best.pt, 4 inside the log append."""
    cfg = {"last-path": str(tmp_path / "last.pt"), "best-path": str(tmp_path / "best.pt"),
           "load-path": str(tmp_path / "last.pt")}
    for epoch, rsum in ((0, 1.0), (1, 3.0)):
        rundir.save_epoch(cfg, fake_state(epoch, rsum, rsum, epoch), improved=True)
    real_save, real_append = rundir.save_checkpoint, rundir.append_log

    def dying(real, index):  # write number `index` of the sequence dies inside it or right after it
        def call(path, *a, **k):
            if kill_at == 2 * index:
                if real is real_append:  # an append cut short leaves a torn line
                    with open(path, "a", encoding="utf-8") as f:
                        f.write('{"epoch": 2, "val')
                raise KeyboardInterrupt  # a checkpoint write is atomic: nothing of it is left
            real(path, *a, **k)
            if kill_at == 2 * index + 1:
                raise KeyboardInterrupt
        return call

    save_last, save_best = dying(real_save, 0), dying(real_save, 1)
    monkeypatch.setattr(rundir, "save_checkpoint",
                        lambda path, **s: (save_best if path == cfg["best-path"] else save_last)(path, **s))
    monkeypatch.setattr(rundir, "append_log", dying(real_append, 2))
    with pytest.raises(KeyboardInterrupt):
        rundir.save_epoch(cfg, fake_state(2, 5.0, 5.0, 2), improved=True)
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    monkeypatch.setattr(rundir, "append_log", real_append)

    last = load_checkpoint(cfg["last-path"])
    rundir.repair(cfg, last)
    log = rundir.read_log(str(tmp_path / "metrics.jsonl"))
    best = load_checkpoint(cfg["best-path"])
    assert [e["epoch"] for e in log] == list(range(last["epoch"] + 1))  # the log ends at the resumed epoch
    assert best["epoch"] == last["best_epoch"] and best["metrics"]["rsum"] == last["best_rsum"]
    assert best["metrics"]["rsum"] == max(e["valid"]["rsum"] for e in log)
    assert last["epoch"] == (1 if kill_at == 0 else 2)


def test_a_killed_writers_temporary_is_removed_at_the_next_start(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    leftover = out / ".last.pt.999999.partial"
    leftover.write_bytes(b"\0" * 1000)
    train.main(tiny_train_args(tiny_data, out, "--epochs", "1"))
    assert not leftover.exists() and (out / "last.pt").is_file()


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), model={"w": torch.ones(2)}, config={})
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", full)
    with pytest.raises(WriteError, match="No space left on device.*previous version of the file is untouched"):
        save_checkpoint(str(path), model={"w": torch.zeros(2)}, config={})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


# ---------------------------------------------------------------------- one line, never a traceback
def test_captions_csv_encodings(tmp_path):
    root = tmp_path / "data"
    os.makedirs(root / "images")
    Image.new("RGB", (8, 8)).save(root / "images" / "a.jpg")
    (root / "captions.csv").write_bytes("\ufefffilename,caption\na.jpg,a caf\u00e9\n".encode("utf-8"))
    assert read_captions(str(root)) == [("a.jpg", "a caf\u00e9")]  # a BOM (spreadsheet export) just works
    (root / "captions.csv").write_bytes(b"filename,caption\na.jpg,fine\na.jpg,caf\xe9 in latin-1\n")
    with pytest.raises(DataError, match="line 3 is not UTF-8"):
        read_captions(str(root))


def test_exact_duplicate_rows_are_dropped_with_a_count(tmp_path):
    root = tmp_path / "data"
    write_csv(root, [("a.jpg", "one"), ("a.jpg", "one"), ("a.jpg", "one"), ("a.jpg", "two")])
    Image.new("RGB", (8, 8)).save(root / "images" / "a.jpg")
    with pytest.warns(UserWarning, match="dropped 2 exact duplicate row"):
        assert read_captions(str(root)) == [("a.jpg", "one"), ("a.jpg", "two")]


@pytest.mark.parametrize("key, value, message", [
    ("batch-size", "0", "'batch-size' must be greater than 0"),
    ("batch-size", "-4", "'batch-size' must be greater than 0"),
    ("image-size", "8", "'image-size' must be at least 32"),
    ("temperature", "0", "'temperature' must be greater than 0"),
    ("max-length", "0", "'max-length' must be at least 2"),
    ("epochs", "0", "nothing would be trained"),
    ("amp-dtype", "float8", "must be one of float16, bfloat16"),
])
def test_out_of_range_values_are_one_line_errors(tiny_data, tmp_path, key, value, message):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tiny_data, tmp_path, f"--{key}", value))
    assert message in one_line_exit(e)


def test_validating_on_the_training_data_warns(tiny_data, tmp_path, capsys):
    train.main(tiny_train_args(tiny_data, tmp_path, "--epochs", "1", "--valid-root", str(tiny_data / "train")))
    assert "valid-root is also the training or selection data" in capsys.readouterr().out


def damaged_checkpoints(good, folder):
    """Files that are not usable checkpoints: half of a real one, a JPEG, an empty file, bare tensors, no config."""
    data = good.read_bytes()
    out = {"half": data[:len(data) // 2], "jpeg": None, "empty": b""}
    paths = {}
    for name, content in out.items():
        paths[name] = folder / f"{name}.pt"
        if content is None:
            Image.new("RGB", (8, 8)).save(paths[name], format="JPEG")
        else:
            paths[name].write_bytes(content)
    paths["tensor"] = folder / "tensor.pt"
    torch.save(torch.ones(3), paths["tensor"])
    paths["no-config"] = folder / "noconfig.pt"
    torch.save({"model": load_checkpoint(str(good))["model"]}, paths["no-config"])
    return paths


def test_damaged_checkpoints_are_one_line_errors_in_every_entry(tiny, tiny_data, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    image = str(sorted(tiny["images"].iterdir())[0])
    (tmp_path / "index").mkdir()
    search_index.build_index(Encoder(str(tiny["checkpoint"]), "cpu"), str(tiny["images"]), str(tmp_path / "index"),
                             progress=False)
    for kind, path in damaged_checkpoints(tiny["checkpoint"], folder).items():
        entries = {
            "eval": lambda path=path: eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(path),
                                              "--output", str(tmp_path / "e.json")]),
            "resume": lambda path=path: train.main(tiny_train_args(tiny_data, tmp_path / "resume", "--load-checkpoint",
                                                         "true", "--load-path", str(path))),
            "classify": lambda path=path: classify.main(["--model-path", str(path), "--image", image,
                                                         "--labels", "a,b"]),
            "export": lambda path=path: export.main(["--model-path", str(path), "--output", str(tmp_path / "onnx")]),
            "search": lambda path=path: search.main(["index", "--model-path", str(path),
                                                     "--images", str(tiny["images"]),
                                                     "--output", str(tmp_path / "i2"), "--num-workers", "0"]),
            "serve": lambda path=path: serve.main(["--model-path", str(path), "--index", str(tmp_path / "index"),
                                                   *TRUSTED]),
        }
        for entry, call in entries.items():
            with pytest.raises(SystemExit) as e:
                call()
            message = one_line_exit(e)
            assert "checkpoint" in message and str(path) in message, (kind, entry, message)


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "pickle", "types"])
def test_damaged_index_files_say_rebuild(tiny, tmp_path, damage):
    out = tmp_path / "index"
    search_index.build_index(Encoder(str(tiny["checkpoint"]), "cpu"), str(tiny["images"]), str(out), progress=False)
    meta = json.loads((out / "index.json").read_text())
    npy = out / meta["embeddings"]
    if damage == "truncated":
        npy.write_bytes(npy.read_bytes()[:200])
    elif damage == "empty":
        npy.write_bytes(b"")
    elif damage == "foreign":
        np.save(npy, np.arange(10))
    elif damage == "pickle":
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        meta["sizes"] = "not a list"
        (out / "index.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        search.main(["query", "--index", str(out), *TRUSTED, "--text", "a red circle"])
    assert "--rebuild" in one_line_exit(e)


def test_user_errors_are_one_class(tmp_path):
    """Every user error type derives from UserError, so run_entry's one except clause catches them all."""
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError
    from engine.runtime import DeviceError
    from inference.encoder import InferenceError
    from inference.index import SearchError
    from tools.caption_sources import PrepareError
    for error in (CheckpointError, ConfigError, DeviceError, InferenceError, SearchError, PrepareError, DataError,
                  ImageTooLarge, WriteError):
        assert issubclass(error, UserError), error
