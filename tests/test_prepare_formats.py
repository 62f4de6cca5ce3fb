"""tools/prepare_data.py on the benchmark formats: Karpathy's COCO JSON, Chinese-CLIP's TSV + JSONL, a generic
captions table; names that must be renamed to read back; hostile COCO JSON."""
import base64
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from dataset import read_captions
from tools import prepare_data


def image_bytes(fmt, size=(12, 10), color=(200, 40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def rows(out):
    lines = (out / "captions.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "filename,caption"
    return [tuple(line.split(",", 1)) for line in lines[1:]]  # the tests' captions hold no comma


def error_of(argv):
    with pytest.raises(SystemExit) as info:
        prepare_data.main(argv)
    message = str(info.value)
    assert "\n" not in message and message.startswith("error: ")
    return message


# ---------------------------------------------------------------------------------------------- Karpathy's COCO

KARPATHY = [("train2014", "COCO_train2014_1.jpg", "train"), ("val2014", "COCO_val2014_2.jpg", "restval"),
            ("val2014", "COCO_val2014_3.jpg", "val"), ("val2014", "COCO_val2014_4.jpg", "test"),
            ("val2014", "COCO_val2014_5.jpg", "test")]


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "coco"
    for folder, name, _ in KARPATHY:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_bytes(image_bytes("JPEG"))
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": folder, "filename": name, "split": split, "cocoid": n,
         "sentences": [{"raw": f"{split} caption {k} ", "tokens": []} for k in range(2)]}
        for n, (folder, name, split) in enumerate(KARPATHY)]}))
    return ["coco", "--annotations", str(path), "--images", str(root), "--workers", "1"]


@pytest.mark.parametrize("split, names", [
    ("train+restval", ["COCO_train2014_1.jpg", "COCO_val2014_2.jpg"]),
    ("restval", ["COCO_val2014_2.jpg"]),
    ("test", ["COCO_val2014_4.jpg", "COCO_val2014_5.jpg"]),
    (None, [name for _, name, _ in KARPATHY])])
def test_karpathy_coco_splits_and_image_folders(karpathy, tmp_path, split, names):
    out = tmp_path / "out"
    prepare_data.main(karpathy + ["--output", str(out)] + (["--split", split] if split else []))
    split_of = {name: s for _, name, s in KARPATHY}
    assert rows(out) == [(n, f"{split_of[n]} caption {k}") for n in names for k in range(2)]
    assert sorted(os.listdir(out / "images")) == names
    folder_of = {name: folder for folder, name, _ in KARPATHY}
    assert all(os.path.samefile(out / "images" / n, tmp_path / "coco" / folder_of[n] / n) for n in names)


def test_karpathy_images_keep_the_files_order_which_the_1k_folds_cut(karpathy, tmp_path):
    """The papers' COCO 1K folds are runs of consecutive test images in dataset_coco.json's order, and eval.py cuts
    its folds in captions.csv's order: so a Karpathy file is written in its own order, not sorted by name."""
    path = tmp_path / "dataset_coco.json"
    data = json.loads(path.read_text())
    data["images"].reverse()  # COCO_val2014_5.jpg now comes before COCO_val2014_4.jpg
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    prepare_data.main(karpathy + ["--output", str(out), "--split", "test"])
    assert [name for name, _ in rows(out)] == ["COCO_val2014_5.jpg"] * 2 + ["COCO_val2014_4.jpg"] * 2


def test_karpathy_coco_bad_splits_and_paths(karpathy, tmp_path):
    out = ["--output", str(tmp_path / "out")]
    data = json.loads(Path(karpathy[2]).read_text())
    data["images"] = [e for e in data["images"] if e["split"] != "restval"]
    flickr_like = tmp_path / "no_restval.json"
    flickr_like.write_text(json.dumps(data))
    assert error_of(karpathy[:2] + [str(flickr_like)] + karpathy[3:] + out + ["--split", "restval"]) == (
        f"error: {flickr_like} has no image in split restval (its splits: 'test', 'train', 'val'); choose one of "
        "those")
    data["images"][0]["filepath"] = "../elsewhere"
    flickr_like.write_text(json.dumps(data))
    assert "the filepath of images[0] is '../elsewhere', which leads outside --images" in error_of(
        karpathy[:2] + [str(flickr_like)] + karpathy[3:] + out)
    official = tmp_path / "captions_val2014.json"
    official.write_text(json.dumps({"images": [], "annotations": []}))
    assert error_of(karpathy[:2] + [str(official)] + karpathy[3:] + out + ["--split", "test"]).startswith(
        f"error: --split test needs Karpathy's dataset_coco.json, but {official} is an official COCO caption file")


# ---------------------------------------------------------------------------------------------- Chinese-CLIP

@pytest.fixture
def chinese(tmp_path):
    """A valid split: 101 (JPEG, after a byte-order mark) and 102 (PNG) are right for one text, 103 does not decode,
    104 is in no text."""
    folder = tmp_path / "MUGE"
    folder.mkdir()
    jpeg, png = image_bytes("JPEG"), image_bytes("PNG", color=(10, 200, 10))
    b64 = {k: base64.b64encode(v).decode() for k, v in {"jpeg": jpeg, "png": png}.items()}
    (folder / "valid_imgs.tsv").write_text(
        f"\ufeff101\t{b64['jpeg']}\n102\t{b64['png']}\n103\tbm90IGFuIGltYWdl\n104\t{b64['jpeg']}\n"
        f"no tab on this line\n101\t{b64['png']}\nbad id!\t{b64['jpeg']}\n")
    (folder / "valid_texts.jsonl").write_text("\n".join([
        json.dumps({"text_id": 1, "text": "两只小猫", "image_ids": [101, 102]}, ensure_ascii=False),
        json.dumps({"text_id": 2, "text": "一只  红色的鞋", "image_ids": [101]}, ensure_ascii=False),
        "{not json",
        json.dumps({"text_id": 3, "text": "坏图片", "image_ids": [103]}, ensure_ascii=False),
        json.dumps({"text_id": 4, "text": "no ids"}),
        '{"text_id": 5, "text": "huge id", "image_ids": [' + "9" * 5000 + "]}"]) + "\n")
    return ["chinese-clip", "--input", str(folder), "--split", "valid", "--workers", "1"], jpeg, png


def test_chinese_clip_gives_a_row_per_image_text_pair_and_names_what_it_leaves_out(chinese, tmp_path, capsys):
    argv, jpeg, png = chinese
    out = tmp_path / "out"
    stats = prepare_data.main(argv + ["--output", str(out)])
    assert rows(out) == [("101.jpg", "两只小猫"), ("101.jpg", "一只 红色的鞋"), ("102.png", "两只小猫")]
    assert (out / "images" / "101.jpg").read_bytes() == jpeg  # the first of two lines with id 101
    assert (out / "images" / "102.png").read_bytes() == png
    assert sorted(os.listdir(out / "images")) == ["101.jpg", "102.png"]
    assert stats == {"images": 2, "captions": 3, "unreadable": 0}
    err = capsys.readouterr().err
    tsv, jsonl = tmp_path / "MUGE" / "valid_imgs.tsv", tmp_path / "MUGE" / "valid_texts.jsonl"
    assert f"warning: 3 broken line(s) in {jsonl} are left out; each needs text and a list of image_ids (first: " \
           "line 3, line 5, line 6)" in err
    assert f"warning: 3 broken line(s) in {tsv} are left out" in err and "(first: line 5, line 6, line 7)" in err
    assert f"warning: 1 image(s) in {tsv} failed to decode and are left out with their texts' pairs (first: " \
           "line 3 (image 103))" in err
    assert f"warning: 1 image(s) in {tsv} are in no text and are left out (first: line 4 (image 104))" in err
    read_captions(str(out))  # the trainer reads it back


def test_chinese_clip_resized_missing_ids_and_wrong_split(chinese, tmp_path):
    argv, _, _ = chinese
    prepare_data.main(argv + ["--output", str(tmp_path / "small"), "--resize", "5"])
    with Image.open(tmp_path / "small" / "images" / "102.jpg") as image:  # the PNG, re-encoded
        assert (image.format, image.size) == ("JPEG", (6, 5))
    texts = tmp_path / "MUGE" / "valid_texts.jsonl"
    texts.write_text(texts.read_text() + json.dumps({"text": "gone", "image_ids": [555, 101]}) + "\n")
    assert error_of(argv + ["--output", str(tmp_path / "a")]) == (
        f"error: 1 of 3 images are missing (first: {tmp_path / 'MUGE' / 'valid_imgs.tsv'} image 555); check the "
        "image folder, or pass --skip-missing to leave them out")
    prepare_data.main(argv + ["--output", str(tmp_path / "b"), "--skip-missing"])
    assert rows(tmp_path / "b") == [("101.jpg", "两只小猫"), ("101.jpg", "一只 红色的鞋"),
                                     ("101.jpg", "gone"), ("102.png", "两只小猫")]
    assert error_of(argv[:4] + ["test", "--output", str(tmp_path / "c")]) == (
        f"error: {tmp_path / 'MUGE'} has no test_imgs.tsv and test_texts.jsonl (splits found: valid); pass the "
        "folder of a Chinese-CLIP dataset and one of its splits")
    assert error_of(argv[:4] + ["../valid", "--output", str(tmp_path / "c")]) == (
        "error: --split '../valid' is not a split name (letters, digits, - or _), e.g. train, valid or test")


def test_chinese_clip_an_overlong_tsv_line_is_skipped_not_read(chinese, tmp_path, monkeypatch):
    from tools import chinese_clip
    argv, _, _ = chinese
    monkeypatch.setattr(chinese_clip, "MAX_LINE", 40)  # every line with a real image is now too long
    tsv = tmp_path / "MUGE" / "valid_imgs.tsv"
    lines = list(chinese_clip.tsv_lines(tsv))
    assert [n for n, _, line in lines if line is None] == [1, 2, 4, 6, 7]
    real = tsv.read_bytes().splitlines(True)
    assert [off for _, off, _ in lines] == [sum(len(x) for x in real[:k]) for k in range(7)]
    assert [line for _, _, line in lines if line is not None] == [real[2], real[4]]
    texts = tmp_path / "MUGE" / "valid_texts.jsonl"
    texts.write_text(json.dumps({"text": "t", "image_ids": [101, 103]}) + "\n")
    assert error_of(argv + ["--output", str(tmp_path / "out")]) == (
        f"error: 1 of 1 images are missing (first: {tsv} image 101); check the image folder, or pass "
        "--skip-missing to leave them out")


# ---------------------------------------------------------------------------------------------- any table

@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("a.jpg", "b c.jpg"):
        (folder / name).write_bytes(image_bytes("JPEG"))
    return folder


@pytest.mark.parametrize("suffix, text", [
    (".csv", 'id,picture,description\n1,a.jpg,A dog\n2,b c.jpg,"A cat, asleep"\n3,a.jpg,  A second  dog \n'),
    (".tsv", "picture\tdescription\na.jpg\tA dog\nb c.jpg\tA cat, asleep\na.jpg\tA second dog\n"),
    (".jsonl", ('{"picture": "a.jpg", "description": ["A dog", "A second dog"]}\n\n'
                '{"picture": "b c.jpg", "description": "A cat, asleep", "extra": 1}\n'))])
def test_a_table_with_other_column_names(pictures, tmp_path, suffix, text):
    table = tmp_path / f"table{suffix}"
    table.write_text(text)
    out = tmp_path / "out"
    prepare_data.main(["table", "--captions", str(table), "--images", str(pictures), "--image-column", "picture",
                       "--caption-column", "description", "--workers", "1", "--output", str(out)])
    assert read_captions(str(out)) == [("a.jpg", "A dog"), ("a.jpg", "A second dog"), ("b c.jpg", "A cat, asleep")]


def test_a_table_row_that_cannot_be_read_is_an_error_naming_its_line(pictures, tmp_path):
    def table_error(text, suffix=".csv", *extra):
        table = tmp_path / f"t{suffix}"
        table.write_text(text)
        return error_of(["table", "--captions", str(table), "--images", str(pictures), "--image-column", "image",
                         "--caption-column", "caption", "--output", str(tmp_path / "out"), *extra])

    t = tmp_path / "t.csv"
    assert table_error('image,caption\na.jpg,ok\na.jpg,"opened\nb c.jpg,x\na.jpg,y"\n') == (
        f"error: {t} line 3: a quoted field opened here runs over 3 lines that look like rows of their own; close "
        "the quote")
    assert table_error('image,caption\na.jpg,ok\na.jpg,"never closed\n').startswith(
        f"error: {t} line 3 is not valid CSV (unexpected end of data)")
    assert table_error("image,text\na.jpg,x\n") == (
        f"error: {t} needs a header row with the column 'caption' once; its header is 'image,text' (pass "
        "--image-column and --caption-column)")
    assert table_error("image,caption\na.jpg,x,y\n") == (
        f"error: {t} line 2 has 3 fields, the header 2; quote fields that contain the delimiter")
    assert table_error('{"image": "a.jpg", "caption": "x"}\n{"image": 5, "caption": "y"}\n', ".jsonl") == (
        f"error: {tmp_path / 't.jsonl'} line 2: the image name 5 is not a file name")
    assert table_error("image,caption\n", ".txt").endswith("pass --format csv, tsv or jsonl")


# ---------------------------------------------------------------------------------------------- names that read back

def test_names_that_would_not_read_back_are_renamed_and_recorded(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    names = ["tab\there.jpg", "two  spaces.jpg", " leading.jpg", "new\nline.jpg", "two spaces.jpg", "sub/./x.jpg",
             "sub/ x .jpg", "plain.jpg"]
    (images / "sub").mkdir()
    for name in names:
        (images / name).write_bytes(image_bytes("JPEG"))
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                                       "annotations": [{"image_id": i, "caption": f"c{i}"} for i in range(8)]}))
    out = tmp_path / "out"
    prepare_data.main(["coco", "--annotations", str(annotations), "--images", str(images), "--workers", "1",
                       "--output", str(out)])
    assert (f"warning: 5 image name(s) would not read back from captions.csv as written (tabs, newlines, double or "
            f"leading spaces, ./ or //) and are renamed; the mapping is in {out / 'renamed.json'}"
            ) in capsys.readouterr().err
    renamed = json.loads((out / "renamed.json").read_text())
    assert renamed == {" leading.jpg": "leading.jpg", "new\nline.jpg": "new line.jpg", "sub/./x.jpg": "sub/x.jpg",
                       "tab\there.jpg": "tab here.jpg",
                       "two  spaces.jpg": "two spaces-2.jpg"}
    written = {renamed.get(n, n): f"c{i}" for i, n in enumerate(names)}
    assert sorted(read_captions(str(out))) == sorted(written.items())  # every row reads back, every image found
    for old, new in renamed.items():
        assert os.path.samefile(out / "images" / new, images / old)
    # a run without such names leaves no stale mapping behind
    prepare_data.main(["coco", "--annotations", str(annotations), "--images", str(images), "--workers", "1",
                       "--output", str(out), "--overwrite"])
    assert (out / "renamed.json").exists()
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"images": [{"id": 7, "file_name": "plain.jpg"}],
                                 "annotations": [{"image_id": 7, "caption": "c"}]}))
    prepare_data.main(["coco", "--annotations", str(plain), "--images", str(images), "--workers", "1",
                       "--output", str(out), "--overwrite"])
    assert not (out / "renamed.json").exists()


# ---------------------------------------------------------------------------------------------- hostile COCO JSON

@pytest.mark.parametrize("images, expected", [
    ([{"id": 1, "file_name": 5}], "the file_name of images[0] is 5; image file names must be non-empty strings"),
    ([{"id": 1, "file_name": None}], "the file_name of images[0] is None; image file names must be non-empty"),
    ([{"id": 1, "file_name": ["a.jpg"]}], "the file_name of images[0] is ['a.jpg']; image file names must be"),
    ([{"id": [1], "file_name": "a.jpg"}], "the id of images[0] is [1]; ids must be integers or strings")])
def test_hostile_coco_fields_are_one_line_errors(tmp_path, images, expected):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": [{"image_id": 1, "caption": "c"}]}))
    (tmp_path / "images").mkdir()
    assert expected in error_of(["coco", "--annotations", str(path), "--images", str(tmp_path / "images"),
                                 "--output", str(tmp_path / "out")])


@pytest.mark.parametrize("text, expected", [
    ("[" * 100_000 + "]" * 100_000, "is nested too deeply to be a caption file"),
    ('{"images": [{"id": ' + "1" * 5000 + ', "file_name": "a.jpg"}], "annotations": []}',
     "holds a number too long to be an id or a count; it is not a caption file")])
def test_hostile_coco_json_is_a_one_line_error(tmp_path, text, expected):
    path = tmp_path / "captions.json"
    path.write_text(text)
    (tmp_path / "images").mkdir()
    assert error_of(["coco", "--annotations", str(path), "--images", str(tmp_path / "images"),
                     "--output", str(tmp_path / "out")]) == f"error: {path} {expected}"


def test_stopped_runs_resume_from_a_tsv_and_from_a_record_older_than_split(chinese, karpathy, tmp_path):
    argv, jpeg, _ = chinese
    out = tmp_path / "zh"
    prepare_data.main(argv + ["--output", str(out)])
    (out / "captions.csv").unlink()  # as if killed before the last write, with one image not yet written
    (out / "images" / "101.jpg").unlink()
    prepare_data.main(argv + ["--output", str(out)])
    assert (out / "images" / "101.jpg").read_bytes() == jpeg and len(rows(out)) == 3
    # a run recorded before coco had --split: its record lacks the key, and the same command still resumes it
    out = tmp_path / "coco"
    prepare_data.main(karpathy + ["--output", str(out)])
    (out / "captions.csv").unlink()
    record = json.loads((out / "prepare.json").read_text())
    del record["split"]
    (out / "prepare.json").write_text(json.dumps(record))
    prepare_data.main(karpathy + ["--output", str(out)])
    assert len(rows(out)) == 10
    (out / "captions.csv").unlink()
    assert "--split not given then, test now" in error_of(karpathy + ["--output", str(out), "--split", "test"])
