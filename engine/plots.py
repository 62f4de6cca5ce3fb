"""The training curves as a PNG, from the JSON-lines log that train.py appends to every epoch."""
import json

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(log_path, out_path):
    with open(log_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train"]["loss"] for r in rows], marker="o")
    ax_loss.set(title="training loss (i2t + t2i)", xlabel="epoch", ylabel="loss")
    for direction, label in (("image_to_text", "I2T"), ("text_to_image", "T2I")):
        for k, style in (("R@1", "-"), ("R@5", "--"), ("R@10", ":")):
            ax_recall.plot(epochs, [r["valid"][direction][k] for r in rows], style, label=f"{label} {k}")
    ax_recall.set(title="validation recall", xlabel="epoch", ylabel="recall", ylim=(0, 1))
    ax_recall.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
