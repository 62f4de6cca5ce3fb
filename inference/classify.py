"""Zero-shot classification: score an image against label names written into prompt templates.

    python -m inference.classify --model-path checkpoints/best.pt --image cat.jpg --labels "cat,dog,car"
    python -m inference.classify --model-path checkpoints/best.pt --image a.jpg b.jpg --labels-file labels.txt \
        --templates-file templates.txt

Each label is written into every template ("a photo of a {}."); the template embeddings are averaged and
renormalised into one label embedding, and the probabilities are softmax(logit_scale * cosine) over labels.
A templates file holds one template per line, with {} where the label goes.
"""
import argparse
import sys

from inference.options import add_image_limits, image_limits


def parse_args(argv):
    p = argparse.ArgumentParser(description="Zero-shot image classification with a trained checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--text-model", help="tokenizer/config folder; default: the one named in the checkpoint")
    p.add_argument("--image", required=True, nargs="+", help="image file(s) to classify")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated label names, e.g. 'cat,dog,car'")
    labels.add_argument("--labels-file", help="text file with one label per line")
    p.add_argument("--templates-file", help="one prompt template per line with {} for the label "
                                            "(default: 'a photo of a {}.' and similar)")
    p.add_argument("--top", type=int, default=None, help="show only the best N labels per image")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_image_limits(p)
    return p.parse_args(argv)


# --help or a mistyped option is answered before torch and transformers load (seconds, hundreds of MB): the command
# line is checked here, and the heavy imports below run only once it parses.
if __name__ == "__main__":
    parse_args(sys.argv[1:])

from engine.errors import run_entry
from engine.files import require_file
from inference.encoder import DEFAULT_TEMPLATES, Encoder, InferenceError, check_labels, read_lines, zero_shot_probs

BAR_WIDTH = 30  # characters of the text bar chart at probability 1


def run(a):
    labels = check_labels(a.labels.split(",") if a.labels is not None else read_lines(a.labels_file, "labels"))
    templates = read_lines(a.templates_file, "templates") if a.templates_file else DEFAULT_TEMPLATES
    if a.top is not None and a.top < 1:
        raise InferenceError(f"--top must be at least 1, got {a.top}")
    for path in a.image:
        require_file(path, "image")
    encoder = Encoder(a.model_path, a.device, a.text_model, limits=image_limits(a))
    weights = encoder.label_embeddings(labels, templates)  # (L, D)
    images = encoder.encode_images([encoder.open_image(p) for p in a.image])  # (N, D)
    probs = zero_shot_probs(images, weights, encoder.logit_scale())  # (N, L)
    results = []
    for path, row in zip(a.image, probs.tolist(), strict=True):
        ranked = sorted(zip(labels, row, strict=True), key=lambda x: -x[1])[:a.top]
        results.append({"image": path, "labels": [{"label": n, "prob": p} for n, p in ranked]})
        print(path)
        width = max(len(n) for n, _ in ranked)
        for name, prob in ranked:
            print(f"  {name:<{width}}  {prob:6.2%}  {'#' * round(prob * BAR_WIDTH)}")
    return results


def main(argv=None):
    return run_entry(run, parse_args(argv))


if __name__ == "__main__":
    main()
