"""The house rules of the layout, checked on the source itself: five research files at the root, entry scripts
imported by nothing, model.py free of the trainer, library code that raises instead of exiting."""
import ast
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

RESEARCH_FILES = {"train.py", "eval.py", "model.py", "dataset.py", "loss.py"}
FOLDERS = ("engine", "inference", "bench", "tools")
MAX_LINES = 330  # "every file under ~300 lines": a little slack, never a 400-line file
STDLIB = set(sys.stdlib_module_names)


def source_files():
    out = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    for folder in FOLDERS:
        out += sorted(os.path.join(folder, f) for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py"))
    return out


def imported_modules(path):
    """Every module an `import` or `from ... import` in the file names (top level or inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_root_holds_only_the_five_research_files():
    assert {f for f in os.listdir(ROOT) if f.endswith(".py")} == RESEARCH_FILES
    for folder in FOLDERS:
        assert os.path.isfile(os.path.join(ROOT, folder, "__init__.py")), folder


@pytest.mark.parametrize("path", source_files())
def test_nothing_imports_an_entry_script(path):
    imports = {name.split(".")[0] for name in imported_modules(path)}
    assert not imports & {"train", "eval"}, f"{path} imports an entry script"


def test_model_imports_only_torch_torchvision_and_transformers():
    third_party = {n.split(".")[0] for n in imported_modules("model.py")} - STDLIB
    assert third_party == {"torch", "torchvision", "transformers"}


@pytest.mark.parametrize("path", ["model.py", "dataset.py", "loss.py"] +
                         [p for p in source_files() if p.startswith("engine")])
def test_the_core_and_engine_do_not_reach_into_the_product_or_tools(path):
    roots = {n.split(".")[0] for n in imported_modules(path)}
    assert not roots & {"inference", "bench", "tools"}, f"{path} imports {roots & {'inference', 'bench', 'tools'}}"


@pytest.mark.parametrize("path", source_files())
def test_library_code_raises_and_stays_small(path):
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    tree = ast.parse(text)
    exits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "exit" and getattr(n.func.value, "id", "") == "sys"]
    assert not exits or path == os.path.join("engine", "errors.py"), f"{path} calls sys.exit at lines {exits}"
    asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    assert not asserts, f"{path}: `python -O` would drop the checks at lines {asserts}; raise instead"
    assert len(text.splitlines()) <= MAX_LINES, f"{path} has {len(text.splitlines())} lines; split it by topic"


def test_the_rules_hold_when_the_checks_run_in_a_fresh_interpreter():
    """Importing every module from a clean process works: no import cycle, no work at import time that fails."""
    modules = [p[:-3].replace(os.sep, ".") for p in source_files() if not p.endswith("__main__.py")]
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\nprint('ok')" % modules
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("path", source_files())
def test_library_code_never_unpickles(path):
    """A checkpoint or model file is data from elsewhere: it is read with torch.load(weights_only=True) or
    safetensors, never by an unpickler that can run code it names (issue 17)."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    tree = ast.parse(text)
    unsafe_loads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "weights_only"
                    and not (isinstance(n.value, ast.Constant) and n.value.value is True)]
    assert not unsafe_loads, f"{path}: weights_only other than True at lines {unsafe_loads}"
    picklers = {n.split(".")[0] for n in imported_modules(path)} & {"pickle", "_pickle", "cPickle", "dill",
                                                                    "cloudpickle", "joblib"}
    assert not picklers, f"{path} imports {picklers}"
    allow = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "allow_pickle"
             and not (isinstance(n.value, ast.Constant) and n.value.value is False)]
    assert not allow, f"{path}: allow_pickle other than False at lines {allow}"
