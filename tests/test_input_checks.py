"""Bad input from a user, each case as a reviewer met it: a clear one-line error that says what to do, nothing
already written lost, and values (not just "it ran") checked."""
import json
import os
import subprocess
import sys

import pytest
import transformers
from PIL import Image

import train
from dataset import PairDataset, image_transform, read_captions, read_captions_csv
from engine.config import ConfigError, load_config
from engine.errors import DataError, run_entry
from engine.shards import shard_loader
from model import ModelError, load_text_model, missing_local_folder
from tests.helpers import DEMO_CONFIG, ROOT, write_csv
from tools import demo, prepare_data


def image_folder(root, *names):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(os.path.join(root, "images", name))


# ---------------------------------------------------------------------------------------------- captions.csv

def test_unquoted_commas_are_an_error_naming_the_line(tmp_path):
    image_folder(tmp_path, "00000.jpg", "00001.jpg")
    (tmp_path / "captions.csv").write_text("filename,caption\n00000.jpg,a dog\n00001.jpg,a,b,c\n")
    with pytest.raises(DataError) as e:
        read_captions(str(tmp_path))
    assert str(e.value) == (f"{tmp_path}/captions.csv line 3 has 4 fields, more than the header's 2; put captions "
                            f"that contain commas in double quotes")


def test_line_numbers_are_where_a_row_starts(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text('filename,caption\na.jpg,"two\nlines"\nb.jpg,x\n\nc.jpg,y\n')
    assert read_captions_csv(str(path)) == [(2, ("a.jpg", "two lines")), (4, ("b.jpg", "x")), (6, ("c.jpg", "y"))]
    rows = [f"{i:05d}.jpg,caption {i}" for i in range(180)]  # lines 2-181
    path.write_text("\n".join(["filename,caption", *rows, "00999.jpg," + "x" * 1_000_000, "00998.jpg,ok"]) + "\n")
    with pytest.raises(DataError, match=r"captions.csv line 182 is not valid CSV \(field larger than field limit"):
        read_captions_csv(str(path))


def test_two_spellings_of_one_file_are_one_image(tmp_path):
    image_folder(tmp_path, "00000.jpg", "00001.jpg")
    write_csv(tmp_path, [("./00000.jpg", "a red circle"), ("00000.jpg", "a big red circle"),
                         ("images/../00001.jpg", "a blue star"), (".//00000.jpg", "a red circle")])
    with pytest.warns(UserWarning, match=r"dropped 1 exact duplicate row"):
        dataset = PairDataset(str(tmp_path), transform=None)
    assert dataset.pairs == [("00000.jpg", "a red circle"), ("00000.jpg", "a big red circle"),
                             ("00001.jpg", "a blue star")]
    assert dataset.image_files == ["00000.jpg", "00001.jpg"] and dataset.image_ids == [0, 0, 1]


# ---------------------------------------------------------------------------------------------- what an entry prints

def test_warnings_print_as_one_line_and_pils_bomb_warning_not_at_all(tmp_path):
    Image.new("RGB", (12, 12)).save(tmp_path / "big.png")  # 144 pixels: over a limit of 100, under twice it
    code = f"""if True:
        import warnings
        from PIL import Image
        from engine.errors import run_entry

        def entry():
            warnings.warn("captions.csv: dropped 10 exact duplicate row(s)\\nkept once")
            Image.MAX_IMAGE_PIXELS = 100
            Image.open({str(tmp_path / "big.png")!r}).load()

        run_entry(entry)
        warnings.warn("outside an entry")
        """
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 0 and lines[0] == "warning: captions.csv: dropped 10 exact duplicate row(s) kept once"
    assert "UserWarning: outside an entry" in lines[1]  # Python's own format is back once the entry returns
    assert "DecompressionBomb" not in done.stderr and len(lines) == 2, done.stderr


def test_an_error_in_a_loader_worker_is_its_own_one_line_message(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"not a tar file at all" * 50)
    loader = shard_loader(str(tmp_path / "000000.tar"), image_transform(16), lambda items: items, batch_size=2,
                          num_workers=1, samples_per_epoch=4, shuffle_buffer=0)
    with pytest.raises(SystemExit) as e:
        run_entry(lambda: list(loader))
    assert str(e.value) == (f"error: no readable sample in 1 shard(s) ({tmp_path / '000000.tar'} ...); "
                            f"check the shard files")


# ---------------------------------------------------------------------------------------------- config files

def test_a_key_set_twice_in_a_config_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nseed: 1\nepochs: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(train.SCHEMA, ["--config", str(path)], "unused.yaml", "")
    assert str(e.value) == f"config file '{path}': key 'epochs' is set twice, on lines 1 and 3; keep one"


@pytest.mark.parametrize("key,meant", [("lerning-rate", "learning-rate"), ("warmup-step", "warmup-steps"),
                                       ("batchsize", "batch-size"), ("text-modle", "text-model")])
def test_a_misspelt_key_gets_the_key_it_was_meant_to_be(key, meant):
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}' in the command line \(did you mean '{meant}'"):
        load_config(train.SCHEMA, ["--config", DEMO_CONFIG, f"--{key}", "1"], "unused.yaml", "")


def test_a_folder_given_as_config_is_called_a_folder(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(tmp_path)])
    assert str(e.value) == f"error: config file '{tmp_path}' is a folder; pass a YAML file with --config"


def test_help_shows_the_defaults_the_config_file_sets(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(train.SCHEMA, ["--config", DEMO_CONFIG, "--help"], "unused.yaml", "")
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")}
    assert e.value.code == 0
    assert lines["--epochs"].endswith(f"(default: 4, from {DEMO_CONFIG})")  # the built-in default is 200
    assert lines["--weight-decay"].endswith("(default: 0.05)")  # what demo.yaml and the built-in agree on
    with pytest.raises(SystemExit):
        load_config(train.SCHEMA, ["--help"], os.path.join(ROOT, "configs", "train.yaml"), "")
    assert "(default: 0.0001, from " in capsys.readouterr().out  # projection-learning-rate of train.yaml


# ---------------------------------------------------------------------------------------------- the demo

def test_demo_says_what_exists_when_there_is_nothing_to_write(tmp_path, capsys):
    train_root, valid_root, text = tmp_path / "train", tmp_path / "valid", tmp_path / "text"
    for folder, name in ((train_root, "captions.csv"), (valid_root, "captions.csv"), (text, "config.json")):
        folder.mkdir()
        (folder / name).write_text("already here\n")  # make_demo only looks for these files
    demo.main(["--train-root", str(train_root), "--valid-root", str(valid_root), "--text-model", str(text)])
    assert capsys.readouterr().out == (
        f"demo: nothing to write, the demo data already exists: training split in {train_root}, validation split "
        f"in {valid_root}, text model in {text} (delete a folder to write it again)\n")
    assert (train_root / "captions.csv").read_text() == "already here\n"


# ---------------------------------------------------------------------------------------------- the text model

@pytest.mark.parametrize("name,missing", [
    ("pretrains/roberta-not-downloaded", True), ("./my-model", True), ("/no/such/model", True), ("a/b/c", True),
    ("~/models/roberta", True), ("models\\roberta", True), ("roberta-base", False),
    ("hfl/chinese-roberta-wwm-ext", False)])
def test_a_text_model_path_that_is_not_there_is_told_from_a_hub_id(name, missing):
    assert missing_local_folder(name) is missing


def test_a_missing_text_model_folder_fails_at_once_saying_how_to_download_it(tmp_path, monkeypatch):
    folder = "pretrains/roberta-not-downloaded"
    asked = []  # a hub look-up here would mean network retries (they took ~51 s): none may happen

    def hub_lookup(*args, **kwargs):
        asked.append(args)
        raise AssertionError("a missing local folder was looked up on the hub")
    for cls in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", hub_lookup)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", DEMO_CONFIG, "--demo-data", "false", "--text-model", folder, "--device", "cpu",
                    "--last-path", str(tmp_path / "last.pt"), "--best-path", str(tmp_path / "best.pt")])
    assert str(e.value) == (f"error: text-model '{folder}' is a local folder that does not exist; download a model "
                            f"into it (for the default: hf download roberta-base --local-dir pretrains/roberta, see "
                            f"pretrains/README.md) or name a hub id such as roberta-base")
    assert asked == []
    with pytest.raises(ModelError, match="is a local folder that does not exist"):
        load_text_model(str(tmp_path / "gone"), pretrained=False)


# ---------------------------------------------------------------------------------------------- prepare_data's output

def coco_source(folder, names, size=(64, 48)):
    """prepare_data coco arguments for images `names` (two captions each) under `folder`."""
    images = folder / "images"
    images.mkdir(parents=True)
    for name in names:
        Image.new("RGB", size, (20, 120, 200)).save(images / name)
    annotations = folder / "captions.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"image_id": i, "caption": f"caption {k} of {name}"} for i, name in enumerate(names)
                        for k in range(2)]}))
    return ["coco", "--annotations", str(annotations), "--images", str(images), "--workers", "1"]


def listing(out):
    return sorted(p.name for p in (out / "images").iterdir()), (out / "captions.csv").read_text()


def test_a_finished_dataset_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    first = coco_source(tmp_path / "a", ["1.jpg", "2.jpg", "3.jpg"])
    second = coco_source(tmp_path / "b", ["9.jpg"])
    prepare_data.main(first + ["--output", str(out)])
    before = listing(out)
    assert before[0] == ["1.jpg", "2.jpg", "3.jpg"] and len(before[1].splitlines()) == 7
    with pytest.raises(SystemExit) as e:
        prepare_data.main(second + ["--output", str(out)])
    assert str(e.value) == (f"error: {out} already holds a prepared dataset ({out / 'captions.csv'}); pass "
                            f"--overwrite true to replace it, or choose another --output")
    assert listing(out) == before  # nothing written, nothing mixed
    prepare_data.main(second + ["--output", str(out), "--overwrite", "true"])
    assert listing(out) == (["9.jpg"], "filename,caption\n9.jpg,caption 0 of 9.jpg\n9.jpg,caption 1 of 9.jpg\n")
    # an input inside the images/ that --overwrite would remove is refused, and stays
    inner = coco_source(out / "images" / "src", ["5.jpg"])
    with pytest.raises(SystemExit,
                       match=r"src/captions.json is inside .*out/images, which --overwrite true would remove"):
        prepare_data.main(inner + ["--output", str(out), "--overwrite", "true"])
    assert (out / "images" / "src" / "images" / "5.jpg").is_file() and (out / "captions.csv").is_file()


def test_a_stopped_run_resumes_only_with_the_settings_it_started_with(tmp_path):
    out = tmp_path / "out"
    source = coco_source(tmp_path / "a", ["1.jpg", "2.jpg"])
    prepare_data.main(source + ["--output", str(out), "--resize", "32"])
    (out / "captions.csv").unlink()  # as if killed before its last write
    (out / "images" / "2.jpg").unlink()
    with pytest.raises(SystemExit) as e:
        prepare_data.main(source + ["--output", str(out)])
    assert str(e.value) == (f"error: {out} holds a run stopped part-way with other settings (--resize 32 then, not "
                            f"given now); rerun with its settings to resume it, or pass --overwrite true to start "
                            f"afresh")
    assert not (out / "captions.csv").exists() and os.listdir(out / "images") == ["1.jpg"]
    prepare_data.main(source + ["--output", str(out), "--resize", "32"])  # the same settings: resumed
    assert [Image.open(out / "images" / n).size for n in ("1.jpg", "2.jpg")] == [(43, 32), (43, 32)]
    (out / "captions.csv").unlink()
    prepare_data.main(source + ["--output", str(out), "--overwrite"])  # afresh: linked originals, not resized
    assert os.path.samefile(out / "images" / "2.jpg", tmp_path / "a" / "images" / "2.jpg")
    assert json.loads((out / "prepare.json").read_text())["resize"] is None


def test_files_no_run_recorded_are_not_mixed_into(tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "mine.jpg").write_bytes(b"a user's file")
    with pytest.raises(SystemExit, match=r"out/images already holds files that no run of tools.prepare_data"):
        prepare_data.main(coco_source(tmp_path / "a", ["1.jpg"]) + ["--output", str(out)])
    assert os.listdir(out) == ["images"] and os.listdir(out / "images") == ["mine.jpg"]


def test_shards_take_overwrite_true_like_every_other_entry(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "shards"
    prepare_data.main(coco_source(tmp_path / "a", ["1.jpg", "2.jpg"]) + ["--output", str(data)])
    argv = ["shards", "--input", str(data), "--output", str(out), "--shard-size", "1"]
    prepare_data.main(argv)
    with pytest.raises(SystemExit, match="already holds 2 shard.*pass --overwrite true"):
        prepare_data.main(argv)
    assert prepare_data.main(argv + ["--overwrite", "true"]) == {"shards": 2, "images": 2, "pairs": 4}
    with pytest.raises(SystemExit) as e:
        prepare_data.main(argv + ["--overwrite", "maybe"])
    assert e.value.code == 2 and "expected true or false, got 'maybe'" in capsys.readouterr().err
