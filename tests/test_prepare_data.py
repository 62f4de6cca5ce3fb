"""tools/prepare_data.py on tiny hand-made files in each real format, checked row by row."""
import csv
import json
import os
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so plain `pytest` finds the script
from tools import prepare_data  # noqa: E402

# COCO: (image id, file name, mode, size); id 3 is a corrupt file, id 5 has no caption
COCO_IMAGES = [(1, "000000000001.jpg", "RGB", (256, 192)),
               (2, "000000000002.jpg", "L", (40, 80)),
               (3, "000000000003.jpg", None, None),
               (4, "000000000004.png", "RGBA", (10, 8)),
               (5, "000000000005.jpg", "RGB", (20, 20))]
# annotations interleave images, as in the real file; raw text on purpose: newlines, spaces, empty
COCO_ANNOTATIONS = [(1, "A red square on a table.\n"), (2, "A gray picture."),
                    (1, '  Two  cats, one "grumpy". '), (1, ""), (3, "A broken file."),
                    (1, "Third caption."), (4, "A tiny image.\n"), (1, "Fourth caption."),
                    (1, "Fifth caption.")]
IMAGE_1_CAPTIONS = ["A red square on a table.", 'Two cats, one "grumpy".', "Third caption.",
                    "Fourth caption.", "Fifth caption."]
COCO_ROWS = ([("000000000001.jpg", c) for c in IMAGE_1_CAPTIONS]
             + [("000000000002.jpg", "A gray picture."), ("000000000003.jpg", "A broken file."),
                ("000000000004.png", "A tiny image.")])


def save_image(path, mode, size):
    if mode is None:
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    else:
        color = 128 if mode == "L" else (200, 100, 50, 255)[:len(mode)]
        Image.new(mode, size, color).save(path)


@pytest.fixture
def coco(tmp_path):
    """Returns main() arguments for a tiny COCO caption file and its image folder."""
    images = tmp_path / "coco_images"
    images.mkdir()
    for _, name, mode, size in COCO_IMAGES:
        save_image(images / name, mode, size)
    annotations = tmp_path / "captions_train2017.json"
    annotations.write_text(json.dumps({
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": name, "width": 0, "height": 0}
                   for i, name, _, _ in COCO_IMAGES],
        "annotations": [{"id": 100 + n, "image_id": i, "caption": caption}
                        for n, (i, caption) in enumerate(COCO_ANNOTATIONS)]}))
    return ["coco", "--annotations", str(annotations), "--images", str(images), "--workers", "1"]


@pytest.fixture
def flickr_images(tmp_path):
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    for name in ["1000.jpg", "2000.jpg", "3000.jpg"]:
        save_image(images / name, "RGB", (30, 20))
    return images


def read_rows(out):
    with open(out / "captions.csv", newline="", encoding="utf-8") as f:
        rows = [tuple(row) for row in csv.reader(f)]
    assert rows[0] == ("filename", "caption")
    return rows[1:]


def error_of(argv):
    with pytest.raises(SystemExit) as info:
        prepare_data.main(argv)
    return str(info.value)


def test_coco_keeps_all_cleaned_captions_and_links_images(coco, tmp_path, capsys):
    out = tmp_path / "out"
    stats = prepare_data.main(coco + ["--output", str(out)])
    assert read_rows(out) == COCO_ROWS
    # quoting by the csv module: the caption with a comma and quotes survives as one field
    assert '000000000001.jpg,"Two cats, one ""grumpy""."\n' in (out / "captions.csv").read_text()
    assert os.path.samefile(out / "images" / "000000000001.jpg",
                            tmp_path / "coco_images" / "000000000001.jpg")
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted({n for n, _ in COCO_ROWS})
    assert stats == {"images": 4, "captions": 8, "unreadable": 0}
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"done: 4 images, 8 captions in {out}"
    assert "warning: 1 images have no caption and are left out" in captured.err


def test_captions_per_image_is_a_seeded_choice_in_original_order(coco, tmp_path):
    def run(k, seed, name):
        prepare_data.main(coco + ["--output", str(tmp_path / name),
                                  "--captions-per-image", str(k), "--seed", str(seed)])
        return read_rows(tmp_path / name)

    def expected(seed):  # the rule documented in prepare_data.py
        keep = sorted(random.Random(f"{seed}:000000000001.jpg").sample(range(5), 2))
        return [("000000000001.jpg", IMAGE_1_CAPTIONS[i]) for i in keep] + COCO_ROWS[5:]

    seed0 = run(2, 0, "a")
    assert seed0 == expected(0)
    assert run(2, 0, "b") == seed0  # deterministic
    seed1 = run(2, 1, "c")
    assert seed1 == expected(1)
    assert seed1[:2] != seed0[:2]  # another seed picks other captions of the 5-caption image
    assert seed1[2:] == seed0[2:]  # images with fewer than K captions keep them all
    # one caption per image, as for the validation set
    assert [name for name, _ in run(1, 0, "d")] == ["000000000001.jpg", "000000000002.jpg",
                                                    "000000000003.jpg", "000000000004.png"]


def test_resize_writes_rgb_jpegs_with_short_side_s_and_reports_unreadable(coco, tmp_path, capsys):
    out = tmp_path / "out"
    argv = coco[:-1] + ["2", "--output", str(out), "--resize", "32"]  # two worker processes
    stats = prepare_data.main(argv)
    sizes = {}
    for path in (out / "images").iterdir():
        with Image.open(path) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")
            sizes[path.name] = image.size
    # 256x192 decodes at 1/4 scale (JPEG draft), then 64x48 -> 32 short side, 256 * 32 / 192 = 42.7
    assert sizes == {"000000000001.jpg": (43, 32),
                     "000000000002.jpg": (32, 64),  # grayscale 40x80, now RGB
                     "000000000004.jpg": (10, 8)}  # PNG smaller than 32: never upscaled
    # the corrupt image and its caption are left out, and said so
    assert read_rows(out) == COCO_ROWS[:6] + [("000000000004.jpg", "A tiny image.")]
    report = (out / "unreadable.txt").read_text().splitlines()
    assert len(report) == 1
    assert report[0].startswith(str(tmp_path / "coco_images" / "000000000003.jpg") + "\t")
    assert stats == {"images": 3, "captions": 7, "unreadable": 1}
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"done: 3 images, 7 captions in {out} (1 unreadable images left out, "
        f"listed in {out / 'unreadable.txt'})")


def test_rerun_skips_finished_images_and_redoes_the_rest(coco, tmp_path):
    out = tmp_path / "out"
    argv = coco + ["--output", str(out), "--resize", "32"]
    prepare_data.main(argv)
    images = out / "images"
    # a marker in place of a finished image: a rerun must leave it alone
    Image.new("RGB", (5, 5)).save(images / "000000000001.jpg")
    # a crash halfway through image 2: the output is missing, a half-written temp file is left, and
    # captions.csv (written last) is not there yet
    (images / "000000000002.jpg").unlink()
    (images / ".000000000002.jpg.12345.partial").write_bytes(b"half")
    (out / "captions.csv").unlink()
    prepare_data.main(argv)
    with Image.open(images / "000000000001.jpg") as image:
        assert image.size == (5, 5)
    with Image.open(images / "000000000002.jpg") as image:
        assert image.size == (32, 64)
    assert sorted(p.name for p in images.iterdir()) == ["000000000001.jpg", "000000000002.jpg",
                                                        "000000000004.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["captions.csv", "images", "prepare.json", "unreadable.txt"]


def test_flickr30k_karpathy_json_and_its_splits(tmp_path, flickr_images):
    captions = tmp_path / "dataset_flickr30k.json"
    captions.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": "2000.jpg", "split": "train", "imgid": 0,
         "sentences": [{"raw": "A man runs.", "tokens": ["a"]}, {"raw": " A man, running. "}]},
        {"filename": "1000.jpg", "split": "val", "sentences": [{"raw": "Two dogs."}]},
        {"filename": "3000.jpg", "split": "test", "sentences": [{"raw": "A cat."}]}]}))
    argv = ["flickr30k", "--captions", str(captions), "--images", str(flickr_images),
            "--workers", "1", "--out"]
    prepare_data.main(argv + [str(tmp_path / "all")])
    # in the file's order: Karpathy's order is the one the papers' folds cut
    assert read_rows(tmp_path / "all") == [("2000.jpg", "A man runs."), ("2000.jpg", "A man, running."),
                                           ("1000.jpg", "Two dogs."), ("3000.jpg", "A cat.")]
    prepare_data.main(argv + [str(tmp_path / "val"), "--split", "val"])
    assert read_rows(tmp_path / "val") == [("1000.jpg", "Two dogs.")]
    assert os.listdir(tmp_path / "val" / "images") == ["1000.jpg"]


def test_flickr30k_results_csv(tmp_path, flickr_images):
    captions = tmp_path / "results.csv"
    captions.write_text("image_name| comment_number| comment\n"
                        '2000.jpg| 0| A man, "running" .\n'
                        "1000.jpg| 0| Two dogs | one ball .\n"
                        "2000.jpg| 1| A man runs .\n"
                        "2000.jpg| 4   A row with the second bar missing .\n\n")
    prepare_data.main(["flickr30k", "--captions", str(captions), "--images", str(flickr_images),
                       "--workers", "1", "--output", str(tmp_path / "out")])
    assert read_rows(tmp_path / "out") == [("1000.jpg", "Two dogs | one ball ."),
                                           ("2000.jpg", 'A man, "running" .'),
                                           ("2000.jpg", "A man runs ."),
                                           ("2000.jpg", "A row with the second bar missing .")]


def test_flickr30k_token_file(tmp_path, flickr_images):
    captions = tmp_path / "results_20130124.token"
    captions.write_text("2000.jpg#0\tA man runs .\n1000.jpg#0\tTwo dogs .\n"
                        "1000.jpg#1\tTwo dogs play , outside .\n")
    prepare_data.main(["flickr30k", "--captions", str(captions), "--images", str(flickr_images),
                       "--workers", "1", "--output", str(tmp_path / "out")])
    assert read_rows(tmp_path / "out") == [("1000.jpg", "Two dogs ."),
                                           ("1000.jpg", "Two dogs play , outside ."),
                                           ("2000.jpg", "A man runs .")]


def test_merge_prefixes_names_with_the_source_folder(coco, tmp_path, flickr_images):
    captions = tmp_path / "results_20130124.token"
    captions.write_text("2000.jpg#0\tA man runs .\n1000.jpg#0\tTwo dogs .\n")
    prepare_data.main(coco + ["--output", str(tmp_path / "coco")])
    prepare_data.main(["flickr30k", "--captions", str(captions), "--images", str(flickr_images),
                       "--workers", "1", "--output", str(tmp_path / "flickr")])
    train = tmp_path / "train"
    stats = prepare_data.main(["merge", "--workers", "1", "--output", str(train),
                               str(tmp_path / "coco"), str(tmp_path / "flickr")])
    assert read_rows(train) == ([("coco_" + name, caption) for name, caption in COCO_ROWS]
                                + [("flickr_1000.jpg", "Two dogs ."),
                                   ("flickr_2000.jpg", "A man runs .")])
    assert stats == {"images": 6, "captions": 10, "unreadable": 0}
    assert os.path.samefile(train / "images" / "flickr_1000.jpg", flickr_images / "1000.jpg")
    # two sources with the same folder name would give the same output names
    (tmp_path / "other").mkdir()
    prepare_data.main(coco + ["--output", str(tmp_path / "other" / "coco")])
    message = error_of(["merge", "--output", str(tmp_path / "train2"), str(tmp_path / "coco"),
                        str(tmp_path / "other" / "coco")])
    assert message.startswith("error: two images would both be written as coco_000000000001.jpg")
    assert "give the source folders different names" in message
    assert error_of(["merge", "--output", str(tmp_path / "x"), str(tmp_path / "nothing")]) == (
        f"error: {tmp_path / 'nothing' / 'captions.csv'} not found; prepare "
        f"{tmp_path / 'nothing'} first with the coco or flickr30k command")


def test_missing_images_stop_or_are_skipped_with_a_warning(coco, tmp_path, capsys):
    images = tmp_path / "coco_images"
    (images / "000000000004.png").unlink()
    (images / "000000000002.jpg").unlink()
    message = error_of(coco + ["--output", str(tmp_path / "out")])
    assert message == (f"error: 2 of 4 images are missing (first: {images / '000000000002.jpg'}, "
                       f"{images / '000000000004.png'}); check the image folder, or pass "
                       "--skip-missing to leave them out")
    assert not (tmp_path / "out" / "captions.csv").exists()
    prepare_data.main(coco + ["--output", str(tmp_path / "out"), "--skip-missing"])
    assert read_rows(tmp_path / "out") == [row for row in COCO_ROWS
                                           if row[0] in ("000000000001.jpg", "000000000003.jpg")]
    assert "warning: 2 of 4 images are missing" in capsys.readouterr().err


def test_bad_input_is_a_one_line_error(coco, tmp_path, flickr_images):
    annotations, out = Path(coco[2]), ["--output", str(tmp_path / "out")]
    data = json.loads(annotations.read_text())

    def coco_error(json_text):
        path = tmp_path / "bad.json"
        path.write_text(json_text)
        return error_of(coco[:2] + [str(path)] + coco[3:] + out)

    assert coco_error(json.dumps({"images": data["images"]})) == (
        f"error: {tmp_path / 'bad.json'} is not a COCO caption file (it needs 'images' and "
        "'annotations' lists); pass annotations/captions_<split>2017.json")
    instances = dict(data, annotations=[{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}])
    assert "has annotations without 'caption' (an instances or keypoints file?)" in coco_error(
        json.dumps(instances))
    assert coco_error("{not json").startswith(f"error: {tmp_path / 'bad.json'} is not valid JSON")
    same_name = dict(data, images=data["images"] + [{"id": 9, "file_name": "000000000001.jpg"}],
                     annotations=data["annotations"] + [{"image_id": 9, "caption": "Again."}])
    assert coco_error(json.dumps(same_name)).startswith(
        "error: two images would both be written as 000000000001.jpg")
    assert error_of(coco[:4] + [str(tmp_path / "nowhere")] + coco[5:] + out) == (
        f"error: --images {tmp_path / 'nowhere'} is not a folder")

    def flickr_error(text, *extra):
        path = tmp_path / "captions.txt"
        path.write_text(text)
        return error_of(["flickr30k", "--captions", str(path), "--images", str(flickr_images),
                         *extra] + out)

    assert flickr_error("1000.jpg| 0| Two dogs .\n", "--split", "train") == (
        f"error: --split train needs Karpathy's dataset_flickr30k.json, but "
        f"{tmp_path / 'captions.txt'} is a plain caption list without splits; "
        "leave out --split to use all of it")
    assert flickr_error("just some text\n").startswith(
        f"error: {tmp_path / 'captions.txt'} is not a Flickr30k caption file")
    assert flickr_error("1000.jpg#0\tTwo dogs .\nno tab here\n") == (
        f"error: {tmp_path / 'captions.txt'} line 2 does not look like the lines before it: "
        "'no tab here'")
    assert flickr_error('{"images": [{"file": "1000.jpg"}]}').startswith(
        f"error: {tmp_path / 'captions.txt'} is not Karpathy's dataset_flickr30k.json")
