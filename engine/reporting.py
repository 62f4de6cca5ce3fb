"""Live training curves: TensorBoard event files in the run folder, and Weights & Biases when installed.

Rank 0 builds one `Reporter` from the config key `report-to` (`tensorboard`, `wandb`, both as
`tensorboard,wandb`, or `none`) and tells it:
  - `step(global_step, scalars)` every `every` optimizer steps (`due(global_step)` says when): loss, learning
    rates, logit scale, grad norm, pairs/s, data-wait share, skipped images, CUDA peak memory (`step_scalars`);
  - `epoch(global_step, epoch, scalars)` after each epoch's validation, *before* the epoch is saved
    (`recall_scalars` flattens an evaluation dict);
  - `config(cfg)` once at the start, `final(global_step, report, cfg)` once at the end (the report-set table as
    text, its recalls as scalars, and the config with the final scores as hyperparameters);
  - `close()`.
Every point is placed at an optimizer step, the epoch curves too, so a resume has one number to cut at.

Resumes continue the same curves. A run resumed from a checkpoint saved at global step S (`start_step=S`)
first cuts every event after step S out of the folder's event files (what a killed run logged after its last
checkpoint), then logs those steps again, once. This holds because everything up to step S was logged and
flushed before the checkpoint at S was written (`epoch` flushes). The cut is made in the files (`cut_events`),
not with the writer's purge_step: TensorBoard reads a folder's files in name order, names (start second,
host, pid) need not sort in run order, and a purge marker read out of order hides the wrong points. A fresh run
removes the event files an earlier run left in the folder (killed before its first save, or replaced with
`overwrite`) when it reaches its own first save, as engine/rundir.py keeps a replaced run's files until then.
"""
import json
import os
import uuid

from engine.config import ConfigError
from engine.files import atomic_write

TARGETS = ("tensorboard", "wandb", "none")
EVENTS_PREFIX = "events.out.tfevents."  # how TensorBoard's writer names its files
MERGED_EVENTS = EVENTS_PREFIX + "0000000000.resumed"  # before any writer's name: its second comes first
WANDB_ID_FILE = "wandb-run.json"  # in the run folder: the W&B run id, so a resumed run continues the same run


def report_to_rule(value):
    """The Schema value rule for `report-to` (as engine.config's rules): None when fine, else what is wrong."""
    names = [n.strip() for n in str(value).split(",")]
    if not all(names) or any(n not in TARGETS for n in names):
        return "must be tensorboard, wandb, both as tensorboard,wandb, or none"
    if "none" in names and len(names) > 1:
        return "must be none alone, or reporters without none"
    return None


def parse_targets(value):
    """`report-to` as written ('tensorboard', 'tensorboard,wandb', 'none') -> the list of reporters to build."""
    problem = report_to_rule(value)
    if problem:
        raise ConfigError(f"config key 'report-to' {problem}, got {value!r}")
    return [n for n in dict.fromkeys(n.strip() for n in value.split(",")) if n != "none"]


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("report-to asks for wandb, which is not installed; pip install wandb, or set "
                          "report-to tensorboard") from None
    return wandb


# ---------------------------------------------------------------- what is logged

def step_scalars(out, optimizer, model, loss_fn, grad_norm=None, pairs_per_s=None, data_wait_share=None,
                 skipped_images=None, device=None):
    """{tag: number} for one optimizer step. `out` is the loss dict of the step; `model` the unwrapped model;
    `grad_norm` the norm before clipping (clip_grad_norm_'s return value); the speed figures over the steps since
    the last report. Items given as None are left out."""
    import torch  # here, not at the top: train.py reads report_to_rule from this module before torch loads
    scalars = {f"train/{k}": float(out[k].detach()) for k in ("loss", "acc_i2t", "acc_t2i") if k in out}
    for i, group in enumerate(optimizer.param_groups):
        scalars[f"train/lr/group{i}"] = float(group["lr"])
    scalars["train/logit_scale"] = float(model.logit_scale().detach())
    if isinstance(getattr(loss_fn, "bias", None), torch.nn.Parameter):  # the sigmoid loss's learnable bias
        scalars["train/sigmoid_bias"] = float(loss_fn.bias.detach())
    named = {"train/grad_norm": grad_norm, "train/pairs_per_s": pairs_per_s,
             "train/data_wait_share": data_wait_share, "train/skipped_images": skipped_images}
    scalars.update({k: float(v) for k, v in named.items() if v is not None})
    if device is not None and torch.device(device).type == "cuda":
        scalars["train/cuda_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return scalars


def recall_scalars(prefix, metrics):
    """An evaluation dict (engine.metrics.retrieval_metrics) -> {prefix/i2t_R@1: ..., prefix/rsum: ...}."""
    scalars = {}
    for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        for key in ("R@1", "R@5", "R@10", "median_rank"):
            scalars[f"{prefix}/{short}_{key}"] = float(metrics[direction][key])
    scalars[f"{prefix}/rsum"] = float(metrics["rsum"])
    return scalars


def config_text(cfg):
    """The config as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    rows = [f"| {k} | {json.dumps(v)} |" for k, v in cfg.items()]
    return "\n".join(["| key | value |", "|---|---|", *rows])


def hparam_value(value):
    """HParams take numbers, strings and booleans; null becomes the string 'null'."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


# ---------------------------------------------------------------- the reporter

class Reporter:
    """One run's live logs (see the module docstring). `targets` is `parse_targets`'s list; with none the
    reporter does nothing, so the training loop never asks which reporters are on."""

    def __init__(self, targets, folder, every=10, start_step=0, wandb_project="image-text-retrieval"):
        self.every, self.folder = every, folder
        self.writer = self.wandb = None
        self.stale = []  # event files of an earlier run, removed when this run reaches its first save
        if "wandb" in targets:  # checked first: a missing package is refused before any file is written
            self.wandb = start_wandb(import_wandb(), folder, start_step, wandb_project)
        if "tensorboard" in targets:
            # TensorBoard's own writer: the tool users already have (open_clip's --report-to does the same)
            from torch.utils.tensorboard import SummaryWriter
            if start_step:
                cut_events(folder, start_step)
            else:  # a fresh start: what a run killed before its first save, or a replaced run, left here
                self.stale = event_files(folder)
            self.writer = SummaryWriter(folder)

    def due(self, global_step):
        return bool(self.writer or self.wandb) and global_step % self.every == 0

    def step(self, global_step, scalars):
        self._scalars(global_step, scalars)

    def epoch(self, global_step, epoch, scalars):
        self._scalars(global_step, {"epoch": epoch, **scalars})
        for path in self.stale:  # kept until now, as rundir keeps a replaced run's files until the first save
            if os.path.exists(path):
                os.remove(path)
        self.stale = []
        self.flush()  # before the epoch's checkpoint: a kill after it loses nothing logged up to this step

    def config(self, cfg):
        if self.writer:
            self.writer.add_text("config", config_text(cfg), 0)
            self.writer.flush()
        if self.wandb:
            self.wandb.config.update(dict(cfg), allow_val_change=True)

    def final(self, global_step, report, cfg, table=""):
        """The report set's scores with best.pt (`report`: an evaluation dict, or None when it was skipped)."""
        scores = recall_scalars("final", report) if report else {}
        self._scalars(global_step, scores)
        if self.writer:
            if table:
                self.writer.add_text("final/table", f"```\n{table}\n```", global_step)
            from torch.utils.tensorboard.summary import hparams
            hp = {k: hparam_value(v) for k, v in cfg.items()}
            # one run per folder in the HParams view (add_hparams would open a run of its own): its metrics are
            # the final/* scalars logged above, which the view reads by tag
            for summary in hparams(hp, scores):
                self.writer.file_writer.add_summary(summary, global_step)
        if self.wandb:
            self.wandb.summary.update(scores)
        self.flush()

    def flush(self):
        if self.writer:
            self.writer.flush()

    def close(self):
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
        self.writer = self.wandb = None

    def _scalars(self, global_step, scalars):
        if self.writer:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step)
        if self.wandb and scalars:
            self.wandb.log(dict(scalars), step=global_step)


def event_files(folder):
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.startswith(EVENTS_PREFIX) and os.path.isfile(os.path.join(folder, n))]


def cut_events(folder, last_step):
    """Keep the events of `folder` up to `last_step` in one file, in step order, named to be read before any
    file a writer makes next (TensorBoard reads a folder's files in name order); remove the others. Events are
    read as TensorBoard's record format (protobuf), never unpickled; a torn last record (a kill mid-write) is
    dropped by the reader. Byte-identical records are kept once, so a kill between the write and the removals
    leaves nothing twice for the next resume."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    files = event_files(folder)
    records = dict.fromkeys(r for path in files for r in RawEventFileLoader(path).Load())
    steps = {r: Event.FromString(r).step for r in records}
    kept = sorted((r for r in records if steps[r] <= last_step), key=steps.get)  # stable: file order within a step
    merged = os.path.join(folder, MERGED_EVENTS)
    atomic_write(merged, lambda f: [RecordWriter(f).write(r) for r in kept], binary=True)
    for path in files:
        if path != merged:
            os.remove(path)


def start_wandb(wandb, folder, start_step, project):
    """A W&B run in `folder`: the one recorded there when resuming, else a new one whose id is recorded. W&B
    refuses steps below its last one, so steps a killed run logged past its checkpoint keep their first values."""
    path = os.path.join(folder, WANDB_ID_FILE)
    run_id = None
    if start_step and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                run_id = str(json.load(f)["id"])
        except (ValueError, KeyError, TypeError, OSError):
            run_id = None  # a damaged id file: a new W&B run, the event files still hold the whole curve
    run_id = run_id or uuid.uuid4().hex[:12]
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda f: json.dump({"id": run_id}, f))
    return wandb.init(project=project, dir=folder, id=run_id, resume="allow", name=os.path.basename(folder))
