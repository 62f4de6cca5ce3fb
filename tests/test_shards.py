"""tools/shards.py writes WebDataset shards, engine/shards.py streams them: checked pair by pair on tiny data."""
import csv
import json
import os
import tarfile
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from dataset import PairCollate, PairDataset, image_transform, make_loader, read_captions
from engine.shards import ShardError, expand_pattern, shard_loader
from loss import ContrastiveLoss
from model import load_tokenizer
from tools import demo, prepare_data
from tools.shards import write_shards

# (file name, number of captions): PNGs and JPEGs, 1-3 captions each, 15 pairs in all
IMAGES = [("red.png", 1), ("b/blue.jpg", 3), ("green.jpeg", 2), ("grey.png", 1), ("dark.jpg", 2),
          ("teal.png", 3), ("plum.jpg", 1), ("sand.png", 2)]
PAIRS = sum(n for _, n in IMAGES)
PATTERN = "{000000..000002}.tar"  # 8 images at 3 per shard: 3, 3 and 2 images (6, 6 and 3 pairs)


def make_folder(root):
    """A dataset folder in the project's layout; each image's rows together, as prepare_data writes them."""
    rows = []
    for i, (name, captions) in enumerate(IMAGES):
        path = os.path.join(root, "images", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image = Image.new("RGB", (24 + 3 * i, 20), (30 * i, 200 - 20 * i, 90))
        image.paste((255 - 30 * i, 10 * i, 40), (2, 2, 10 + i, 12))  # something for the crop to keep
        image.save(path)
        rows += [(name, f"caption {k} of {name}") for k in range(captions)]
    with open(os.path.join(root, "captions.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("filename", "caption"), *rows])
    return rows


def image_ids():
    """What both loaders must give: the index among the sorted file names."""
    return {name: i for i, name in enumerate(sorted(name for name, _ in IMAGES))}


def collect(items):
    """A collate_fn that keeps the captions as text, so tests can compare pairs."""
    images, captions, ids, skipped = zip(*items, strict=True)
    return {"images": torch.stack(images), "captions": list(captions), "image_ids": torch.tensor(ids),
            "skipped": sum(skipped)}


def pairs_of(batches):
    return [(int(i), c) for b in batches for i, c in zip(b["image_ids"], b["captions"], strict=True)]


@pytest.fixture
def shards(tmp_path):
    rows = make_folder(tmp_path / "data")
    write_shards(str(tmp_path / "data"), str(tmp_path / "shards"), 3, progress=False)
    return tmp_path / "shards", rows


def loader(folder, pattern=PATTERN, **kw):
    kw = {"transform": image_transform(16), "collate_fn": collect, "batch_size": 4, **kw}
    return shard_loader(str(folder / pattern), **kw)


# ---------------------------------------------------------------------------------------------- writing

def test_shards_hold_every_pair_with_the_image_bytes_and_a_global_id(shards, tmp_path):
    folder, rows = shards
    assert sorted(os.listdir(folder)) == ["000000.tar", "000001.tar", "000002.tar", "sizes.json"]
    ids = image_ids()
    read_back = []
    for shard in ["000000.tar", "000001.tar", "000002.tar"]:  # read with tarfile, not with our reader
        with tarfile.open(folder / shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for member, data in members.items():
            if member.endswith(".json"):
                meta = json.loads(data)
                key = member[:-len(".json")]
                image = members[f"{key}.{os.path.splitext(meta['filename'])[1][1:]}"]
                assert image == (tmp_path / "data" / "images" / meta["filename"]).read_bytes()
                assert meta["image_id"] == ids[meta["filename"]] == int(key)
                read_back += [(shard, meta["filename"], c) for c in meta["captions"]]
    assert [(n, c) for _, n, c in read_back] == rows  # every pair, once, in captions.csv order
    assert json.loads((folder / "sizes.json").read_text()) == {"000000.tar": 6, "000001.tar": 6, "000002.tar": 3}
    assert Counter(s for s, _, _ in read_back) == {"000000.tar": 6, "000001.tar": 6, "000002.tar": 3}


def test_a_folder_with_shards_is_refused_unless_overwrite(shards, tmp_path):
    folder, _ = shards
    with pytest.raises(ShardError, match="already holds 3 shard.*pass --overwrite"):
        write_shards(str(tmp_path / "data"), str(folder), 5, progress=False)
    counts = write_shards(str(tmp_path / "data"), str(folder), 5, overwrite=True, progress=False)
    assert counts == {"shards": 2, "images": 8, "pairs": PAIRS}
    assert sorted(os.listdir(folder)) == ["000000.tar", "000001.tar", "sizes.json"]  # stale 000002 gone


def test_command_line_writes_shards_and_reports_mistakes_in_one_line(tmp_path):
    make_folder(tmp_path / "data")
    counts = prepare_data.main(["shards", "--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                                "--shard-size", "4"])
    assert counts == {"shards": 2, "images": 8, "pairs": PAIRS}
    assert sorted(os.listdir(tmp_path / "out")) == ["000000.tar", "000001.tar", "sizes.json"]
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["shards", "--input", str(tmp_path / "data"), "--output", str(tmp_path / "x"),
                           "--shard-size", "0"])
    assert str(exit_info.value) == "error: shard size must be a whole number of images >= 1, got 0"
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_is_one_pass_over_every_pair(shards, workers):
    folder, rows = shards
    ids = image_ids()
    batches = list(loader(folder, num_workers=workers, shuffle_buffer=5, seed=3))
    assert Counter(pairs_of(batches)) == Counter((ids[n], c) for n, c in rows)
    assert all(b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, 16, 16) for b in batches)
    assert sum(b["skipped"] for b in batches) == 0


def test_two_ranks_see_disjoint_shards_and_the_same_number_of_batches(shards):
    folder, _ = shards
    ids_by_shard = {}
    for shard in ["000000.tar", "000001.tar", "000002.tar"]:
        with tarfile.open(folder / shard) as tar:
            ids_by_shard[shard] = {int(m.name.split(".")[0]) for m in tar.getmembers()}
    for epoch in range(3):
        runs = [loader(folder, rank=r, world_size=2, samples_per_epoch=24, epoch=epoch, batch_size=3)
                for r in range(2)]
        batches = [list(run) for run in runs]
        # 24 pairs per epoch over 2 ranks x 3 = 4 batches each, though one rank holds 2 shards and the other 1
        assert [len(b) for b in batches] == [len(run) for run in runs] == [4, 4]
        assert all(len(b["captions"]) == 3 for rank in batches for b in rank)
        seen = [{i for i, _ in pairs_of(rank)} for rank in batches]
        assert not seen[0] & seen[1]
        shards_of = [runs[r].stream.rank_shards(epoch) for r in range(2)]
        assert sorted(len(s) for s in shards_of) == [1, 2]
        for r in range(2):
            assert seen[r] <= set().union(*(ids_by_shard[os.path.basename(s)] for s in shards_of[r]))
    # without samples_per_epoch, several ranks take the pair count from sizes.json: 15 // (2 x 3)
    assert len(loader(folder, rank=1, world_size=2, batch_size=3)) == 2


def test_loader_workers_share_a_process_batches_exactly(shards):
    folder, _ = shards
    run = loader(folder, samples_per_epoch=14, batch_size=2, num_workers=2)  # 7 batches: 4 + 3 over 2 workers
    for epoch in range(2):
        run.set_epoch(epoch)
        batches = list(run)
        assert len(batches) == len(run) == 7
        assert all(len(b["captions"]) == 2 for b in batches)


def test_the_same_epoch_replays_the_same_order_and_a_new_epoch_reshuffles(shards):
    folder, _ = shards
    resumed = pairs_of(loader(folder, epoch=1, shuffle_buffer=6))
    running = loader(folder, epoch=0, shuffle_buffer=6)
    first = pairs_of(running)
    running.set_epoch(1)
    assert pairs_of(running) == resumed
    assert sorted(first) == sorted(resumed) and first != resumed


def test_bad_samples_and_a_missing_shard_are_skipped_and_counted(shards, tmp_path):
    folder, rows = shards
    ids = image_ids()
    good = (tmp_path / "data" / "images" / "red.png").read_bytes()
    with open(folder / "000003.tar", "wb") as f, wds.TarWriter(f, encoder=False) as tar:
        def meta(captions, image_id):
            return json.dumps({"filename": "x.png", "captions": captions, "image_id": image_id}).encode()
        tar.write({"__key__": "000000100", "png": b"not an image", "json": meta(["garbage bytes"], 100)})
        tar.write({"__key__": "000000101", "png": good, "json": b"{not json"})
        tar.write({"__key__": "000000102", "png": good, "json": meta([], 102)})  # no caption
        tar.write({"__key__": "000000103", "json": meta(["no image"], 103)})
        tar.write({"__key__": "000000104", "png": good, "json": meta(["the good one"], 104)})
    os.remove(folder / "000001.tar")
    batches = list(loader(folder, "{000000..000003}.tar", shuffle_buffer=0))
    kept = [(ids[n], c) for n, c in rows[:6] + rows[12:]] + [(104, "the good one")]
    assert pairs_of(batches) == kept
    assert sum(b["skipped"] for b in batches) == 5  # the missing shard and four bad samples


def test_a_truncated_shard_keeps_the_samples_before_the_cut(shards):
    folder, rows = shards
    ids = image_ids()
    with tarfile.open(folder / "000001.tar") as tar:
        members = tar.getmembers()
    cut = members[-1].offset_data + 10  # inside the last member: its sample is incomplete
    data = (folder / "000001.tar").read_bytes()
    (folder / "000001.tar").write_bytes(data[:cut])
    batches = list(loader(folder, shuffle_buffer=0))
    complete = [n for n, _ in IMAGES[3:6]][:2]  # the shard's first two of three images
    assert pairs_of(batches) == [(ids[n], c) for n, c in rows if n not in dict(IMAGES[3:6]) or n in complete]
    # the read error and the incomplete sample; how many exceptions the tar reader raises is its business
    assert sum(b["skipped"] for b in batches) >= 1


def test_a_rank_whose_shards_are_all_missing_stops_instead_of_waiting(shards):
    folder, _ = shards
    os.remove(folder / "000001.tar")
    run = loader(folder, "{000000..000001}.tar", rank=1, world_size=2, samples_per_epoch=8, batch_size=2,
                 shuffle_buffer=0)
    with pytest.raises(ShardError, match="no readable sample in 1 shard"):
        list(run)


def test_patterns_expand_and_a_pattern_matching_nothing_is_a_one_line_error(shards, tmp_path):
    folder, _ = shards
    assert expand_pattern(str(folder / PATTERN)) == [str(folder / f"00000{i}.tar") for i in range(3)]
    assert expand_pattern("pipe:cat a.tar::pipe:cat b.tar") == ["pipe:cat a.tar", "pipe:cat b.tar"]
    with pytest.raises(ShardError) as error:
        expand_pattern(str(tmp_path / "nowhere" / PATTERN))
    assert str(error.value).startswith(f"no shard file matches '{tmp_path / 'nowhere' / PATTERN}'")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kw,message", [({"world_size": 4, "rank": 0}, "3 shard.* cannot feed 4 processes"),
                                        ({"samples_per_epoch": 3}, "3 is less than one global batch \\(4 x 1")])
def test_settings_that_cannot_work_are_clear_errors(shards, kw, message):
    folder, _ = shards
    with pytest.raises(ShardError, match=message):
        loader(folder, batch_size=4, **kw)


# ---------------------------------------------------------------------------------------------- the loss

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    demo.write_text_model(str(folder), [f"caption {k} of {n}" for n, c in IMAGES for k in range(c)], hidden=16,
                          layers=1)
    return load_tokenizer(str(folder))


def fixed_features(batch):
    """Features that depend only on the pixels and the tokens, the same whichever loader made the batch."""
    images = batch["images"].float()  # (B, 3, H, W)
    img = torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)  # (B, 6)
    table = torch.randn(1000, 6, generator=torch.Generator().manual_seed(0))
    mask = batch["attention_mask"][..., None].float()  # (B, T, 1)
    txt = (table[batch["input_ids"]] * mask).sum(1) / mask.sum(1)  # (B, 6)
    return torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)


def test_the_loss_equals_the_folder_loaders_on_the_same_pairs(shards, tmp_path, tokenizer):
    folder, rows = shards
    collate = PairCollate(tokenizer, 16)
    transform = image_transform(16)
    from_folder = list(make_loader(PairDataset(str(tmp_path / "data"), transform), 5, 0, "cpu",
                                   collate_fn=collate))
    from_shards = list(shard_loader(str(folder / PATTERN), transform, collate, 5, shuffle_buffer=0))
    assert len(from_folder) == len(from_shards) == 3
    loss_fn = ContrastiveLoss()
    masked = 0
    for a, b in zip(from_folder, from_shards, strict=True):
        for key in ("images", "input_ids", "attention_mask", "image_ids"):
            assert torch.equal(a[key], b[key])
        loss_a = loss_fn(*fixed_features(a), 10.0, a["image_ids"])["loss"]
        loss_b = loss_fn(*fixed_features(b), 10.0, b["image_ids"])["loss"]
        assert torch.allclose(loss_a, loss_b, atol=0, rtol=1e-6)
        without_mask = loss_fn(*fixed_features(b), 10.0)["loss"]
        masked += not torch.allclose(loss_b, without_mask)
    assert masked == 3  # the same-image mask changed the loss, so the ids were really compared
    assert read_captions(str(tmp_path / "data")) == rows
