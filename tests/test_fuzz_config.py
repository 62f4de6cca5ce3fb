"""Seeded fuzzing of config values, one of the three places a user hands the project raw input (see tests/fuzzing.py).

Each generator makes a fixed list of malformed inputs from one seed, so a failure names a case that comes back on
every run. Every outcome must be one a user can act on: accepted (and then checked for what it returned), a
one-line error, a counted skip, or an HTTP 4xx with a JSON `detail`; never a traceback and never a 5xx.
"""
import random
import subprocess
import sys

import pytest

import train
from engine.config import ConfigError, load_config
from tests.fuzzing import SEED, check_all, outcome
from tests.helpers import DEMO_CONFIG, ROOT

# ---------------------------------------------------------------------- (b) config overrides
ODD_VALUES = ["[1,2]", "{a: 1}", ".nan", ".inf", "-.inf", "~", "null", "!!python/object:os.system",
              "!!python/object/apply:os.system ['true']", "!!binary aGk=", "&a", "*a", "|", ">", "- a", "2001-01-01",
              "0x10", "0o17", "1_000", "2:30", "yes", "off", "'", '"', "{", "[", "\x00", "", "@x", "%YAML 1.2",
              "--- a", "a: b", "? a", "1e400", "-1e400", "9" * 30, "-9" + "9" * 30, "0", "-1", "-0.5", "1e-400",
              "true", "3.5", "x" * 10000, "\u00e9", " 4 ", "4 5"]
ODD_KEYS = ["bacth-size", "batch_size", "BATCH-SIZE", "x" * 200, "epochs ", "\u00e9pochs", "-epochs", "config-x",
            "help-me", "="]
ODD_FILES = [b"- a\n- b\n", b"just a string\n", b"epochs: [\n", b"epochs: !!python/object:os.system {}\n",
             b"\tepochs: 3\n", b"epochs: 3\nepochs: 4\n", b"", b"~\n", b"epochs: 2\nunknown: 1\n", b"\xff\n",
             b"\xff\xfe", b"epochs: 2\x00\n", b"\xef\xbb\xbfepochs: 2\n", b"epochs: &a 2\nseed: *a\n"]


def good_value(rng, key):
    default, types = train.SCHEMA.entries[key][:2]
    if bool in types:
        return rng.choice(["true", "false"])
    if int in types:
        return str(rng.randint(1, 64))
    if float in types:
        return rng.choice(["0.5", "2e-3", "1.0e-4", "3"])
    return str(default)


def config_cases(rng, count, tmp_path):
    keys = list(train.SCHEMA.entries)
    cases = []
    for i in range(count):
        argv = []
        for _ in range(rng.randint(1, 4)):
            key = rng.choice(keys) if rng.random() < 0.8 else rng.choice(ODD_KEYS)
            value = good_value(rng, key) if key in keys and rng.random() < 0.5 else rng.choice(ODD_VALUES)
            form = rng.randrange(10)
            if form < 6:
                argv += [f"--{key}", value]
            elif form < 8:
                argv.append(f"--{key}={value}")
            elif form == 8:
                argv.append(rng.choice([value, "--", "-x", f"--{key}"]))  # a bare value, a stray dash, no value
            else:
                path = tmp_path / f"c{i}.yaml"
                path.write_bytes(rng.choice(ODD_FILES))
                argv += ["--config", str(path) if rng.random() < 0.8 else str(tmp_path / "missing.yaml")]
        if rng.random() < 0.05:
            argv.append("--config")  # argparse: expected one argument, exit 2
        cases.append((f"argv #{i} {argv!r:.200}", argv))
    return cases


def conforms(cfg):
    """Every key of the schema, each value of an allowed type and inside its rule."""
    assert set(cfg) == set(train.SCHEMA.entries)
    for key, (_, types, _, *rule) in train.SCHEMA.entries.items():
        value = cfg[key]
        assert any(type(value) is t for t in types), (key, value)
        if rule and value is not None:
            assert rule[0](value) is None, (key, value)


def check_number(key, raw, cfg):
    """A decimal override of an int key arrives as that int, and of a float key as Python's float() of it."""
    types = train.SCHEMA.entries[key][1]
    if int in types and raw.isascii() and raw.isdigit() and not raw.startswith("0"):  # YAML 1.1: 010 is octal
        assert cfg[key] == int(raw), (key, raw, cfg[key])
    elif float in types:
        try:
            number = float(raw)
        except ValueError:  # .inf, null, 2:30 ...: YAML's own spellings
            return
        assert cfg[key] == number, (key, raw, cfg[key])


def test_fuzzed_config_overrides_load_or_fail_in_one_line(tmp_path, capsys):
    cases = config_cases(random.Random(SEED), 100, tmp_path)

    def run(argv):
        kind, value, _ = outcome(lambda: load_config(train.SCHEMA, argv, DEMO_CONFIG, ""))
        if kind == "ok":
            conforms(value)
            if "--config" not in argv and not any("=" in a for a in argv):  # plain pairs: check what came through
                # the last of a repeated key wins
                for key, raw in dict(zip(argv[::2], argv[1::2], strict=True)).items():
                    check_number(key[2:].replace("_", "-"), raw, value)
        elif kind == "error" and value != "2":  # a ConfigError (2 is argparse's exit status)
            assert "config" in value or "command line" in value or "command-line" in value, value
        return kind

    tally = check_all(cases, run)
    capsys.readouterr()  # argparse's usage lines for the exit-2 cases
    assert tally.get("ok", 0) >= 5 and tally.get("error", 0) >= 50, tally


@pytest.mark.parametrize("argv", [["--a\nb", "1"], ["--config", DEMO_CONFIG + "\n"]])
def test_newline_in_a_config_key_or_path_stays_one_line(argv):
    with pytest.raises(ConfigError) as e:
        load_config(train.SCHEMA, argv, DEMO_CONFIG, "")
    assert "\n" not in str(e.value)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe")  # UTF-16's byte-order mark, as some Windows editors save
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(train.SCHEMA, ["--config", str(path)], DEMO_CONFIG, "")


def test_a_negative_seed_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", DEMO_CONFIG, "--seed", "-1", "--device", "cpu", "--demo-data", "false",
                    "--last-path", str(tmp_path / "last.pt"), "--best-path", str(tmp_path / "best.pt")])
    assert str(e.value.code).startswith("error:") and "seed" in str(e.value.code)


# ---------------------------------------------------------------------- (c) resources and repeated keys
def alias_bomb(levels):
    """A few hundred bytes of nested YAML aliases that expand to 9**levels strings when constructed."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [2, 9])
def test_yaml_aliases_are_refused_before_they_expand(tmp_path, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels))
    assert path.stat().st_size < 500
    with pytest.raises(ConfigError, match=r"bomb.yaml': line 2 uses a YAML alias") as e:
        load_config(train.SCHEMA, ["--config", str(path)], DEMO_CONFIG, "")
    assert len(str(e.value)) < 300


def test_a_yaml_alias_on_the_command_line_is_refused():
    value = "[&a [1,1,1,1,1,1,1,1], [*a,*a,*a,*a,*a,*a,*a,*a]]"
    with pytest.raises(ConfigError, match=r"command-line key --seed: line 1 uses a YAML alias"):
        load_config(train.SCHEMA, ["--seed", value], DEMO_CONFIG, "")


def test_deep_nesting_and_huge_files_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nests lists or mappings more than 20 deep"):
        load_config(train.SCHEMA, ["--config", str(deep)], DEMO_CONFIG, "")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(train.SCHEMA, ["--config", str(big)], DEMO_CONFIG, "")


@pytest.mark.parametrize("argv", [["--epochs", "x" * 100_000], ["--" + "k" * 100_000, "1"],
                                  ["--epochs", "[" + "1," * 50_000 + "1]"], ["x" * 100_000]])
def test_an_error_quotes_a_long_value_shortened(argv):
    with pytest.raises(ConfigError) as e:
        load_config(train.SCHEMA, argv, DEMO_CONFIG, "")
    assert len(str(e.value)) < 300 and "..." in str(e.value), str(e.value)[:400]


@pytest.mark.parametrize("argv", [["--epochs", "1", "--epochs", "2"], ["--epochs=1", "--epochs", "2"],
                                  ["--batch_size", "2", "--batch-size", "3"]])
def test_a_key_given_twice_on_the_command_line_is_an_error_as_in_yaml(argv):
    with pytest.raises(ConfigError, match=r"command-line key --(epochs|batch-size) is given twice; keep one"):
        load_config(train.SCHEMA, argv, DEMO_CONFIG, "")


def test_config_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="--config is given twice"):
        load_config(train.SCHEMA, ["--config", DEMO_CONFIG, "--config", DEMO_CONFIG], DEMO_CONFIG, "")


@pytest.mark.parametrize("argv", [["--bad-key", "1"], ["--help"]])
def test_a_config_mistake_is_answered_before_torch_is_imported(argv):
    """`python -X importtime` lists every module the script imported before it exited."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "train.py", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "engine.config" in imported and "torch" not in imported and "transformers" not in imported
    if argv == ["--help"]:
        assert proc.returncode == 0 and "--batch-size" in proc.stdout
    else:
        assert proc.returncode == 1 and "error: unknown config key 'bad-key'" in proc.stderr
