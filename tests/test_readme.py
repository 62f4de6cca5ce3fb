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

DOCS = ["README.md", "README.zh-CN.md", "pretrains/README.md", "datasets/README.md", "checkpoints/README.md"]


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
        if rest and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", rest[0]):  # a sub-command: `index`, `chinese-clip`
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


def test_every_config_a_documented_command_names_exists():
    # the shipped ones: a user's own file (`--config my.yaml`) is only an example name
    named = {m for doc in DOCS for c in fenced_commands(doc) for m in re.findall(r"--config (configs/\S+)", c)}
    assert {"configs/demo-zh.yaml", "configs/demo-zh-eval.yaml", "configs/train-zh.yaml"} <= named, named
    assert not [path for path in named if not os.path.isfile(os.path.join(ROOT, path))]


def test_the_chinese_guide_gives_the_chinese_commands():
    commands = fenced_commands("README.zh-CN.md")
    assert "python train.py --config configs/demo-zh.yaml" in commands
    assert "python eval.py --config configs/demo-zh-eval.yaml" in commands
    assert any(c.startswith("python -m tools.prepare_data chinese-clip") for c in commands)
    assert any(c.startswith("python train.py --config configs/train-zh.yaml") for c in commands)


@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_help_lists_every_config_key_with_its_default(entry):
    done = subprocess.run([sys.executable, entry, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    schema = __import__(entry[:-3]).SCHEMA
    # the defaults as the entry's own config file sets them: what a run without --config gets
    cfg = load_config(schema, ["--config", os.path.join(ROOT, "configs", f"{entry[:-3]}.yaml")], "", "")
    for key in schema.entries:
        shown = "null" if cfg[key] is None else cfg[key]
        assert f"--{key}" in done.stdout and f"(default: {shown}" in done.stdout, key
