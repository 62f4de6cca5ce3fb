"""The output folder of tools.prepare_data: a finished dataset is never replaced unless asked, and a run stopped
part-way is resumed only with the settings it started with.

A run writes OUT/prepare.json (the settings that decide what it writes) before its first image and
OUT/captions.csv after its last, so what a folder holds says what happened to it:

  captions.csv                   a finished dataset: refused unless --overwrite true
  prepare.json, no captions.csv  a run stopped part-way: resumed with the same settings, refused with others
  neither, files in images/      files no run recorded: refused unless --overwrite true

`--overwrite true` removes what a run writes (captions.csv, unreadable.txt, renamed.json, images/, prepare.json)
just before the new run writes its first image, after its input has been read and checked.
"""
import argparse
import json
import os
import shutil
from pathlib import Path

from engine.files import write_json
from tools.caption_sources import fail

RECORD = "prepare.json"
# the inputs of each command, by option name; with the options below they decide what a run writes
INPUTS = {"coco": ("annotations", "images", "split"), "flickr30k": ("captions", "images", "split"),
          "chinese-clip": ("input", "split"), "merge": ("sources",),
          "table": ("captions", "images", "image_column", "caption_column", "format")}
OPTIONS = ("resize", "captions_per_image", "seed")


def yes_no(text):
    """`--overwrite true|false` as in train.py; a bare `--overwrite` means true (argparse's const)."""
    value = text.strip().lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "yes", "1")


def settings(args):
    """{option: value} of a coco, flickr30k or merge run, with input paths made absolute."""
    out = {"command": args.command}
    for name in INPUTS[args.command] + OPTIONS:
        value = getattr(args, name)
        if isinstance(value, Path):
            value = str(value.resolve())
        elif isinstance(value, list):
            value = [str(Path(v).resolve()) for v in value]
        out[name] = value
    return out


def _option(name):
    return name if name in ("command", "sources") else "--" + name.replace("_", "-")


def _shown(value):
    return "not given" if value is None else " ".join(value) if isinstance(value, list) else str(value)


def _recorded(out):
    try:
        with open(out / RECORD, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _holds_files(folder):
    return any(files for _, _, files in os.walk(folder))


def refuse_or_resume(out, wanted, overwrite):
    """Refuse, before any input is read, an OUT that holds a finished dataset, another run's part or files no
    run recorded; `overwrite` lets everything through (`start` then clears it)."""
    if overwrite:
        return
    if (out / "captions.csv").exists():
        fail(f"{out} already holds a prepared dataset ({out / 'captions.csv'}); pass --overwrite true to replace "
             f"it, or choose another --output")
    recorded = _recorded(out)
    if recorded is None and _holds_files(out / "images"):
        fail(f"{out / 'images'} already holds files that no run of tools.prepare_data recorded; choose an empty "
             f"--output, or pass --overwrite true to replace them")
    if recorded is not None and recorded != wanted:
        keys = list(wanted) + [k for k in recorded if k not in wanted]
        changed = [f"{_option(k)} {_shown(recorded.get(k))} then, {_shown(wanted.get(k))} now"
                   for k in keys if recorded.get(k) != wanted.get(k)]
        if changed:  # none: a record from before an option existed, which it leaves unset (None)
            fail(f"{out} holds a run stopped part-way with other settings ({'; '.join(changed)}); rerun with "
                 f"its settings to resume it, or pass --overwrite true to start afresh")


def start(out, wanted, overwrite):
    """Clear OUT for a fresh run when `overwrite` (never when an input lies inside OUT/images), then record the
    run's settings before its first image is written."""
    images = (out / "images").resolve()
    if overwrite:
        inputs = [wanted[k] for k in INPUTS[wanted["command"]] if isinstance(wanted[k], str)
                  and k in ("annotations", "images", "captions", "input")]
        inputs += wanted.get("sources", [])
        for path in inputs:
            if Path(path) == images or images in Path(path).parents:
                fail(f"{path} is inside {out / 'images'}, which --overwrite true would remove; choose another "
                     f"--output")
        try:  # captions.csv first: a kill part-way leaves a stopped run that its own settings resume
            for name in ("captions.csv", "unreadable.txt", "renamed.json"):
                (out / name).unlink(missing_ok=True)
            if (out / "images").is_symlink():
                (out / "images").unlink()
            elif (out / "images").exists():
                shutil.rmtree(out / "images")
            (out / RECORD).unlink(missing_ok=True)
        except OSError as e:
            fail(f"could not remove the old dataset in {out} ({e.strerror or e}: {e.filename}); remove it yourself "
                 f"or choose another --output")
    if _recorded(out) != wanted:
        write_json(out / RECORD, wanted)
