import glob
import os

import pytest
import yaml

import eval as eval_script
import train
from engine.config import TRAINED_MODEL_KEYS, ConfigError, check_stored_config, load_config, parse_overrides
from tests.helpers import ROOT


def test_overrides_get_natural_types():
    assert parse_overrides(["--batch-size", "64", "--use-amp", "false", "--learning-rate", "2e-3",
                            "--micro-batch-size", "null", "--text-model=pretrains/x"]) == {
        "batch-size": 64, "use-amp": False, "learning-rate": "2e-3", "micro-batch-size": None,
        "text-model": "pretrains/x"}


def test_command_line_beats_file_beats_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlearning-rate: 1e-4\n")
    cfg = load_config(train.SCHEMA, ["--config", str(path), "--epochs", "5"], "unused.yaml", "")
    assert cfg["epochs"] == 5 and cfg["learning-rate"] == 1e-4 and cfg["batch-size"] == 192


@pytest.mark.parametrize("argv,message", [
    (["--bacth-size", "3"], "unknown config key 'bacth-size' in the command line"),
    (["--batch-size", "many"], "config key 'batch-size' expects int, got 'many'"),
    (["--use-amp", "3"], "config key 'use-amp' expects bool, got 3"),
    (["--epochs"], "command-line key '--epochs' has no value"),
    (["epochs", "3"], "expected '--key value' on the command line, got 'epochs'"),
])
def test_bad_keys_and_types_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", os.path.join(ROOT, "configs", "demo.yaml"), *argv])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_a_file_names_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size' in .*c.yaml \(did you mean 'batch-size'"):
        load_config(train.SCHEMA, ["--config", str(path)], "unused.yaml", "")


def test_missing_config_file(tmp_path):
    with pytest.raises(SystemExit, match="config file '.*nope.yaml' does not exist"):
        eval_script.main(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load_and_every_key_has_a_comment(path):
    schema = eval_script.SCHEMA if "eval" in os.path.basename(path) else train.SCHEMA
    cfg = load_config(schema, ["--config", path], "unused.yaml", "")
    with open(path, encoding="utf-8") as f:
        keyed = [line for line in f if line.strip() and not line.startswith("#")]
    assert keyed and all("#" in line for line in keyed)
    # a shipped config documents every key its script takes, and the file's values are the ones used
    written = yaml.safe_load(open(path))
    assert set(written) == set(schema.entries), set(schema.entries) ^ set(written)
    assert all(cfg[k] == (float(v) if isinstance(cfg[k], float) else v) for k, v in written.items())


def test_reference_run_values_are_kept():
    cfg = load_config(train.SCHEMA, ["--config", os.path.join(ROOT, "configs", "train.yaml")], "", "")
    assert (cfg["epochs"], cfg["learning-rate"], cfg["batch-size"], cfg["use-amp"], cfg["use-augment"],
            cfg["temperature"]) == (200, 5e-6, 192, True, True, 0.07)


@pytest.mark.parametrize("stored, message", [
    (None, "stores no config mapping"),
    ([1, 2], "stores no config mapping"),
    ({"image-model": "resnet18"}, "lacks config key 'text-model'"),
    ({**train.SCHEMA.defaults(), "max-length": "64"}, "config key 'max-length' expects int, got '64'"),
    ({**train.SCHEMA.defaults(), "text-model": ["x"]}, "config key 'text-model' expects str, got ['x']"),
])
def test_a_checkpoints_stored_config_is_checked_key_by_key(stored, message):
    with pytest.raises(ConfigError, match="checkpoint 'ck.pt'") as e:
        check_stored_config(stored, "ck.pt")
    assert message in str(e.value)


def test_a_config_train_wrote_passes_the_stored_config_check():
    cfg = train.SCHEMA.defaults()
    assert check_stored_config(cfg, "ck.pt") == cfg
    assert set(TRAINED_MODEL_KEYS) <= set(train.SCHEMA.entries)  # every key checked is one training writes
