"""The README.md of a model folder: a model card with the YAML front matter the Hugging Face hub reads, the
run's recall table, its training config, and the commands that load the folder here.

The recall table comes from the run's report.json (written by train.py beside best.pt). That file is data: only
its numbers and short strings are used, and a report about another checkpoint is left out, not shown as this one's.
"""
import json
import os

MAX_REPORT_BYTES = 1 << 20  # a report.json is under a kB
DIRECTIONS = (("image_to_text", "image → text"), ("text_to_image", "text → image"))
RECALLS = ("R@1", "R@5", "R@10")


def read_report(model_path):
    """(the run's report.json as a dict, or None; a note on why it is None). Only a report about `model_path`
    itself counts: train.py writes it for best.pt, so one exported from last.pt has no table."""
    if not os.path.isfile(model_path):
        return None, "exported from a model folder: no report.json to take the recall table from"
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "report.json")
    try:
        if os.path.getsize(path) > MAX_REPORT_BYTES:
            return None, "report.json beside the checkpoint is too large to be a report"
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        return None, "no report.json beside the checkpoint (the run did not finish?)"
    except (OSError, ValueError):
        return None, "report.json beside the checkpoint is not readable JSON"
    if not isinstance(report, dict) or not isinstance(report.get("checkpoint"), str) or \
            os.path.realpath(report["checkpoint"]) != os.path.realpath(model_path):
        return None, f"report.json beside the checkpoint scores {str(report.get('checkpoint'))[:200]!s}, not this file"
    if not all(isinstance(report.get(d), dict) and all(isinstance(report[d].get(k), (int, float)) for k in RECALLS)
               for d, _ in DIRECTIONS):
        return None, "report.json beside the checkpoint has no recall numbers"
    return report, None


def recall_table(report):
    """Markdown lines: one row per direction, recall in percent."""
    lines = ["| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    for key, label in DIRECTIONS:
        lines.append(f"| {label} | " + " | ".join(f"{100 * report[key][k]:.1f}" for k in RECALLS) + " |")
    if isinstance(report.get("rsum"), (int, float)):
        lines.append(f"\nrsum (the sum of the six recalls, in [0, 6]): {report['rsum']:.4f}")
    return lines


def short(value, limit=200):
    return str(value)[:limit].replace("\n", " ")


def model_card(run_cfg, config, report, note, name):
    """The README.md text. `config` is the folder's config.json dict, `report` the run's report (or None, with
    `note` saying why), `name` the folder's name (for the example upload command)."""
    dataset = os.path.basename(os.path.normpath(str(run_cfg.get("train-root", "")))) or "custom"
    text_type = short(config.get("text_model_type", "text-encoder"), 60)
    front = ["---", "library_name: pytorch", "tags:", "- clip", "- image-text-retrieval", "- contrastive-learning",
             f"- {short(config['image_model'], 60)}", f"- {text_type}", "datasets:", f"- {json.dumps(dataset)}",
             "metrics:", "- recall", "pipeline_tag: zero-shot-image-classification", "---", ""]
    body = [f"# {name}", "",
            (f"A CLIP-style image-text retrieval model: a {config['image_model']} image tower and a {text_type} text "
            f"tower ({config['text_pooling']} pooling), trained with a contrastive loss to put an image and its "
            f"captions close together in a {config['embedding_dim']}-dimensional space. Images are resized and "
            f"centre-cropped to {config['image_size']} px and normalised with the ImageNet mean and std; captions "
            f"are cut at {config['max_length']} tokens."), "",
            "## Files", "",
            "- `model.safetensors`: the weights (no optimizer or RNG state)",
            "- `config.json`: what rebuilds the model, and the training config under `training_config`",
            "- `text/`: the text tower's config and the tokenizer", "",
            "## Recall", ""]
    if report is None:
        body += [f"No recall table: {note}.", ""]
    else:
        protocol = short(report.get("protocol", "all captions of each image"))
        body += [(f"Scored on `{short(report.get('valid_root', 'the validation set'))}` "
                 f"({short(report.get('num_images', '?'))} images, {short(report.get('num_captions', '?'))} "
                 f"captions; protocol: {protocol}) with the checkpoint of epoch {short(report.get('epoch', '?'))}, "
                 f"chosen on a separate selection split. Recall in percent."), ""]
        body += recall_table(report) + [""]
    body += ["## Use it", "", "From a checkout of the training project, pass the folder as `--model-path`:", "",
             "```bash",
             f"python eval.py --model-path {name} --valid-root datasets/valid",
             f"python -m inference.classify --model-path {name} --image cat.jpg --labels \"cat,dog,car\"",
             f"python -m inference.search index --model-path {name} --images photos/ --output indexes/photos",
             f"python -m inference.export --model-path {name} --output exported/   # ONNX",
             "```", "", "Share it on the Hugging Face hub:", "", "```bash",
             f"hf upload <your-user>/{name} {name} .", "```", "",
             "## Training config", "", "```json", json.dumps(run_cfg, indent=2, default=str), "```", ""]
    return "\n".join(front + body)
