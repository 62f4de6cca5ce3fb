"""One way to configure a run: defaults in code, then a YAML file, then `--key value` overrides.

Keys are spelled with dashes, exactly as in the shipped YAML files (`batch-size`, `learning-rate`). A key that
the script does not know, a value of the wrong type, or one outside its allowed range is a `ConfigError` naming
the key; entry scripts turn it into a one-line message. `--help` lists every key with its help and the value the
config file in use gives it.
"""
import argparse
import difflib
import math
import os

import yaml

from engine.errors import UserError, shorten

# A config is a few kilobytes of key: value; these bounds keep a hostile or mistaken file from taking the machine
MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is refused unread
MAX_CONFIG_DEPTH = 20  # nesting of lists/mappings inside a config file or a command-line value


class ConfigError(UserError, ValueError):
    """A mistake in a config file or on the command line that the user can fix."""


# Value rules a schema entry may name as its fourth field: each returns None when the value is fine, else what is
# wrong with it. None values (where allowed) are never checked.
def positive(value):
    return None if value > 0 and math.isfinite(value) else "must be greater than 0 (and finite)"


def at_least(low):
    def rule(value):
        return None if value >= low and math.isfinite(value) else f"must be at least {low} (and finite)"
    return rule


def between(low, high):
    def rule(value):
        return None if low <= value <= high else f"must be between {low} and {high}"
    return rule


def workers(value):
    """num-workers: 'auto' or a whole number >= 0."""
    ok = value == "auto" or (isinstance(value, int) and value >= 0)
    return None if ok else "must be 'auto' or a whole number >= 0"


def one_of(*choices):
    def rule(value):
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"
    return rule


def _coerce(key, value, types):
    """Return value if it fits one of `types` (ints are accepted where floats are), else raise."""
    if value is None and type(None) in types:
        return None
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is str and isinstance(value, str):
            return value
    expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
    shown = "null" if value is None else shorten(value)
    raise ConfigError(f"config key {key!r} expects {expected}, got {shown}")


class Schema:
    """The keys a script accepts: name -> (default, allowed types, one-line help[, value rule]).

    Keys that take a number or a word (`num-workers: auto`) list both types; keys that may be unset list
    `type(None)`. A value rule (`positive`, `at_least(n)`, `one_of(...)`) bounds the value.
    """

    def __init__(self, entries):
        self.entries = entries

    def defaults(self):
        return {k: v[0] for k, v in self.entries.items()}

    def check(self, cfg, source):
        out = {}
        for key, value in cfg.items():
            if key not in self.entries:
                close = self.close_keys(key)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key {shorten(key)} in {source}{hint}")
            entry = self.entries[key]
            out[key] = _coerce(key, value, entry[1])
            problem = entry[3](out[key]) if len(entry) > 3 and isinstance(out[key], (int, float, str)) else None
            if problem:
                raise ConfigError(f"config key {key!r} {problem}, got {shorten(out[key])} in {source}")
        return out

    def close_keys(self, key):
        """Known keys the user probably meant: the same letters with `_` or without dashes, else a near spelling."""
        if not isinstance(key, str):
            return []
        spelled = key.replace("_", "-")
        same = [k for k in self.entries if k.replace("-", "") == spelled.replace("-", "")]
        return same or difflib.get_close_matches(spelled, list(self.entries), n=1, cutoff=0.75)

    def help_text(self, file_values=None, source=None):
        """Every key with its help and default, for `--help`: the value of `file_values` (a checked config file,
        `source`) where it sets the key to something other than the built-in default."""
        file_values = file_values or {}
        width = max(len(k) for k in self.entries)
        lines = ["config keys (set in the YAML file or as --key value):"]
        for key, (default, _, text, *_) in self.entries.items():
            value = file_values.get(key, default)
            shown = "null" if value is None else value
            where = f", from {source}" if key in file_values and value != default else ""
            lines.append(f"  --{key:<{width}}  {text} (default: {shown}{where})")
        return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error instead of last-one-wins,
    and that aliases (`*name`) and deep nesting are refused: a few hundred bytes of nested aliases expand to
    gigabytes, and no config key needs either."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            raise ConfigError(f"line {line} uses a YAML alias (*name), which can expand a small file into "
                              "gigabytes; write the value out instead")
        self.depth += 1
        if self.depth > MAX_CONFIG_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise ConfigError(f"line {line} nests lists or mappings more than {MAX_CONFIG_DEPTH} deep; "
                              "a config holds plain key: value pairs")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` is not a key of its own
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise ConfigError(f"key {shorten(key)} is set twice, on lines {first[key]} and {line}; "
                                          "keep one")
                except TypeError:  # an unhashable key: the safe loader reports it below
                    continue
                first[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path):
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a folder; pass a YAML file with --config")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass an existing file with --config")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config holds "
                          "key: value pairs, pass the right file with --config")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"config file {path!r}: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {shorten(str(e).splitlines()[0], 200)}"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of key: value")
    return data


def parse_overrides(tokens):
    """`['--batch-size', '64', '--use-amp', 'false']` -> {'batch-size': 64, 'use-amp': False}.

    Values are read as YAML scalars so that numbers, booleans and null get their natural type. A key given twice
    is an error, as it is in a YAML file.
    """
    out = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"expected '--key value' on the command line, got {shorten(tok)}")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"command-line key {shorten(tok)} has no value; "
                                  f"write '{shorten(tok, quote=False)} VALUE'")
            key, raw = tok[2:], tokens[i + 1]
            i += 2
        key = key.replace("_", "-")
        if key in out:
            raise ConfigError(f"command-line key --{shorten(key, quote=False)} is given twice; keep one")
        try:
            out[key] = yaml.load(raw, Loader=_UniqueKeyLoader) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
        except ConfigError as e:
            raise ConfigError(f"command-line key --{shorten(key, quote=False)}: {e}") from None
    return out


def load_config(schema, argv, default_config, description):
    """Merge code defaults, the YAML file (`--config`, else `default_config`) and command-line overrides.

    The file is read before `--help` is answered, so the help shows the defaults as that file sets them; a file
    that cannot be read still gets the help (with the built-in defaults) when help is asked for.
    """
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config", action="append")
    args, rest = first.parse_known_args(argv)
    if args.config and len(args.config) > 1:
        raise ConfigError("--config is given twice; keep one (a second file does not merge into the first)")
    args.config = args.config[0] if args.config else default_config
    try:
        file_values, problem = schema.check(load_yaml(args.config), args.config), None
    except ConfigError as e:
        if not {"-h", "--help"} & set(rest):
            raise
        file_values, problem = {}, f"\n(built-in defaults shown: {e})"
    parser = argparse.ArgumentParser(description=description, add_help=True, allow_abbrev=False,
                                     epilog=schema.help_text(file_values, args.config) + (problem or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config file (default {default_config})")
    args, rest = parser.parse_known_args(argv)  # answers --help
    cfg = schema.defaults()
    cfg.update(file_values)
    cfg.update(schema.check(parse_overrides(rest), "the command line"))
    return cfg


# What loading a trained checkpoint reads from the config stored in it, with the types training wrote
TRAINED_MODEL_KEYS = {"text-model": (str,), "image-model": (str,), "image-size": (int,), "max-length": (int,),
                      "temperature": (float,), "learnable-temperature": (bool,)}


def check_stored_config(config, source, needs=None):
    """The config stored in a checkpoint (`source`, its path) as a dict, checked to hold every key of `needs`
    ({key: types}, default TRAINED_MODEL_KEYS) with a value of those types: a hand-edited or foreign checkpoint is
    a ConfigError naming the key, never a KeyError or AttributeError deep in model building."""
    if not isinstance(config, dict):
        raise ConfigError(f"checkpoint '{source}' stores no config mapping; it was not written by train.py")
    out = dict(config)
    for key, types in (needs or TRAINED_MODEL_KEYS).items():
        if key not in config:
            raise ConfigError(f"checkpoint '{source}' lacks config key {key!r}; it was not written by train.py "
                              f"or was edited")
        try:
            out[key] = _coerce(key, config[key], types)
        except ConfigError as e:
            raise ConfigError(f"checkpoint '{source}': {e}; it was not written by train.py or was edited") from None
    return out


def format_config(cfg):
    width = max(len(k) for k in cfg)
    return "\n".join(f"  {k:<{width}} : {v}" for k, v in cfg.items())
