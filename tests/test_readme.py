"""Every command the READMEs' fenced blocks name exists as installed: each is run with --help.

A documented command that drifts from what is installed (a renamed module, a tool the requirements no longer
bring, as `huggingface-cli` once was) fails here instead of on a newcomer's first try.
"""
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.config import load_config
from tests.helpers import ROOT

DOCS = ["README.md", "pretrains/README.md", "datasets/README.md", "checkpoints/README.md"]


def fenced_commands(path):
    """Shell commands in ```bash blocks: one per line (or `&&` part), comments and continuations removed."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def help_form(command):
    """The command's program (and sub-command) with --help instead of its arguments."""
    words = shlex.split(command)
    program, rest = words[0], words[1:]
    if program == "python":
        if rest[0] == "-m":
            head = [sys.executable, "-m", rest[1]]
            rest = rest[2:]
        else:
            head = [sys.executable, rest[0]]
            rest = rest[1:]
        if rest and re.fullmatch(r"[a-z0-9]+", rest[0]):  # a sub-command such as `index` or `coco`
            head.append(rest[0])
        return head + ["--help"]
    head = [program] + ([rest[0]] if rest and re.fullmatch(r"[a-z]+", rest[0]) else [])
    return head + ["--help"]


COMMANDS = sorted({tuple(help_form(c)) for doc in DOCS for c in fenced_commands(doc)})


def test_the_readme_documents_the_main_entries():
    programs = {" ".join(c[1:3]) if c[0] == sys.executable else c[0] for c in COMMANDS}
    assert {"train.py --help", "eval.py --help", "-m tools.prepare_data", "-m tools.demo", "-m inference.search",
            "-m inference.serve", "-m inference.classify", "-m inference.export", "-m bench", "-m bench.scaling",
            "-m bench.ann", "-m bench.serve", "-m bench.gpu", "-m bench.study", "hf", "torchrun"} <= programs, programs


def test_every_documented_command_answers_help():
    def run(cmd):
        try:
            done = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=240)
        except FileNotFoundError:
            return cmd, 127, f"{cmd[0]}: not installed"
        out = done.stdout + done.stderr
        return cmd, done.returncode if "usage" in out.lower() else -1, out[-600:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, COMMANDS))
    failed = [f"{' '.join(cmd)} -> {code}: {out}" for cmd, code, out in results if code != 0]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_help_lists_every_config_key_with_its_default(entry):
    done = subprocess.run([sys.executable, entry, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    schema = __import__(entry[:-3]).SCHEMA
    # the defaults as the entry's own config file sets them: what a run without --config gets
    cfg = load_config(schema, ["--config", os.path.join(ROOT, "configs", f"{entry[:-3]}.yaml")], "", "")
    for key in schema.entries:
        shown = "null" if cfg[key] is None else cfg[key]
        assert f"--{key}" in done.stdout and f"(default: {shown}" in done.stdout, key
