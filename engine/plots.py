"""The training curves as a PNG, from the JSON-lines log that train.py appends to every epoch: the loss, the
selection split's recall (which chooses best.pt) and, when logged, the report set's recall, drawn apart."""
import json

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from engine.files import atomic_write  # noqa: E402

REPORT_KEY = "valid_not_used_for_selection"


def plot_curves(log_path, out_path):
    with open(log_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    epochs = [r["epoch"] for r in rows]
    panels = [("select", "selection split recall (chooses best.pt)")]
    if any(REPORT_KEY in r for r in rows):
        panels.append((REPORT_KEY, "report set recall (not used for selection)"))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5.5 * (1 + len(panels)), 4))
    axes[0].plot(epochs, [r["train"]["loss"] for r in rows], marker="o")
    axes[0].set(title="training loss", xlabel="epoch", ylabel="loss")
    for ax, (key, title) in zip(axes[1:], panels, strict=True):
        shown = [r for r in rows if key in r]
        for direction, label in (("image_to_text", "I2T"), ("text_to_image", "T2I")):
            for k, style in (("R@1", "-"), ("R@5", "--"), ("R@10", ":")):
                ax.plot([r["epoch"] for r in shown], [r[key][direction][k] for r in shown], style,
                        label=f"{label} {k}")
        ax.set(title=title, xlabel="epoch", ylabel="recall", ylim=(0, 1))
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)  # whole or not at all
    plt.close(fig)
    return out_path
