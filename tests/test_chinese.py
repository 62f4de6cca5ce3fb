"""Any Hugging Face encoder as the text tower: a tiny BERT with a WordPiece tokenizer and Chinese captions."""
import json
import os
import random

import torch
from tokenizers import BertWordPieceTokenizer
from transformers import BertConfig, BertModel

from tools import demo
import eval as eval_script
import train
from model import load_tokenizer
from tests.helpers import DEMO_EVAL_CONFIG, tiny_train_args, write_csv

COLOURS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
           "white": "白色", "black": "黑色"}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
SIZES = {"small": "小", "large": "大"}
PLACES = {"top left": "左上角", "top": "上方", "top right": "右上角", "left": "左边", "centre": "中间",
          "right": "右边", "bottom left": "左下角", "bottom": "下方", "bottom right": "右下角"}


def chinese_caption(scene):
    colour, shape, size, place = scene
    return f"{PLACES[place]}有一个{SIZES[size]}的{COLOURS[colour]}{SHAPES[shape]}"


def write_chinese_split(root, scenes, rng):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i, scene in enumerate(scenes):
        demo.draw(scene, rng).save(os.path.join(root, "images", f"{i}.jpg"))
        rows.append((f"{i}.jpg", chinese_caption(scene)))
    write_csv(root, rows)
    return [c for _, c in rows]


def write_tiny_bert(folder, captions):
    os.makedirs(folder, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(handle_chinese_chars=True, lowercase=False)
    wordpiece.train_from_iterator(captions, vocab_size=200, min_frequency=1)
    wordpiece.save_model(folder)  # vocab.txt
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=40)
    config.save_pretrained(folder)
    BertModel(config).save_pretrained(folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": False, "tokenize_chinese_chars": True}, f)


def test_chinese_bert_text_tower_trains_and_evaluates(tmp_path):
    rng = random.Random(0)
    scenes = demo.all_scenes()
    captions = write_chinese_split(str(tmp_path / "train"), rng.sample(scenes, 32), rng)
    write_chinese_split(str(tmp_path / "valid"), rng.sample(scenes, 10), rng)
    write_tiny_bert(str(tmp_path / "bert"), captions)

    tokenizer = load_tokenizer(str(tmp_path / "bert"))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("左上角有一个小的红色圆形")["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[UNK]" not in tokens
    assert tokens[1:4] == ["左", "上", "角"]  # Chinese is split per character

    out = tmp_path / "run"
    args = tiny_train_args(tmp_path, out, "--text-model", str(tmp_path / "bert"), "--epochs", "1")
    train.main(args)
    metrics = eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(out / "last.pt"),
                                "--valid-root", str(tmp_path / "valid"), "--num-workers", "0",
                                "--output", str(out / "eval.json")])
    assert metrics["num_images"] == 10 and metrics["num_captions"] == 10
    model, tok, cfg = eval_script.load_trained(str(out / "last.pt"), torch.device("cpu"))
    assert type(model.text.model).__name__ == "BertModel" and model.text.model.pooler is None
    ids = tok(["左上角有一个小的红色圆形", "中间有一个大的蓝色星形"], padding=True, return_tensors="pt")
    feats = model.encode_text(ids["input_ids"], ids["attention_mask"])
    assert feats.shape == (2, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
