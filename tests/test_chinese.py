"""Any Hugging Face encoder as the text tower: the Chinese demo's tiny BERT with a WordPiece tokenizer."""
import random

import pytest
import torch

import eval as eval_script
import train
from model import load_tokenizer
from tests.helpers import DEMO_EVAL_CONFIG, tiny_train_args
from tools import demo


def test_chinese_captions_say_the_scene_in_chinese_words():
    rng = random.Random(0)
    scene = ("red", "circle", "large", "top left")
    captions = demo.distinct_captions(scene, 3, rng, "zh")
    assert len(set(captions)) == 3
    for c in captions:
        # each caption names all four attributes with one of their Chinese synonyms, and no English word
        for words in (demo.COLOUR_WORDS_ZH["red"], demo.SHAPE_WORDS_ZH["circle"], demo.SIZE_WORDS_ZH["large"],
                      demo.PLACE_WORDS_ZH["top left"]):
            assert any(w in c for w in words), (c, words)
        assert not any("a" <= ch.lower() <= "z" for ch in c), c
    # every English word of the demo has its Chinese counterparts, so both demos draw the same scenes
    assert set(demo.COLOUR_WORDS_ZH) == set(demo.COLOURS) and set(demo.SHAPE_WORDS_ZH) == set(demo.SHAPES)
    assert set(demo.SIZE_WORDS_ZH) == set(demo.SIZES) and set(demo.PLACE_WORDS_ZH) == set(demo.PLACES.values())


def test_an_unknown_demo_language_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="en, zh.*'fr'"):
        demo.make_demo(str(tmp_path / "t"), str(tmp_path / "v"), str(tmp_path / "m"), language="fr")
    assert not any(tmp_path.iterdir())


def test_chinese_bert_text_tower_trains_and_evaluates(tmp_path):
    rng = random.Random(0)
    scenes = demo.all_scenes()
    rows = demo.write_split(str(tmp_path / "train"), rng.sample(scenes, 32), 1, rng, "zh")
    demo.write_split(str(tmp_path / "valid"), rng.sample(scenes, 10), 1, rng, "zh")
    # a smaller encoder than the demo's (hidden 32, one layer): the test is about the Chinese path, not recall
    demo.write_text_model(str(tmp_path / "bert"), [c for _, c in rows], "zh", hidden=32, layers=1)

    tokenizer = load_tokenizer(str(tmp_path / "bert"))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("左上角有一个小的红色圆形")["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[UNK]" not in tokens
    assert tokens[1:-1] == list("左上角有一个小的红色圆形")  # Chinese is split per character

    out = tmp_path / "run"
    args = tiny_train_args(tmp_path, out, "--text-model", str(tmp_path / "bert"), "--epochs", "1")
    train.main(args)
    metrics = eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(out / "last.pt"),
                                "--valid-root", str(tmp_path / "valid"), "--num-workers", "0",
                                "--output", str(out / "eval.json")])
    assert metrics["num_images"] == 10 and metrics["num_captions"] == 10
    model, tok, _ = eval_script.load_trained(str(out / "last.pt"), torch.device("cpu"))
    assert type(model.text.model).__name__ == "BertModel" and model.text.model.pooler is None
    ids = tok(["左上角有一个小的红色圆形", "中间有一个大的蓝色星形"], padding=True, return_tensors="pt")
    feats = model.encode_text(ids["input_ids"], ids["attention_mask"])
    assert feats.shape == (2, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
