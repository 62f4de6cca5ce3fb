"""A trained model as a folder anyone can load and the Hugging Face hub can host: weights in safetensors, the
model's description in JSON, the tokenizer beside them. Nothing in it is code, and no path it names is used.

    model.safetensors   the model's weights only (no optimizer, no RNG state)
    config.json         what rebuilds the model: towers, sizes, pooling, temperature, image size and
                        normalisation, max length, the tokenizer's vocabulary fingerprint, the training config
    text/               the text tower's Hugging Face config and the tokenizer files
    README.md           the model card (inference.model_card)

`read_model_folder` gives what `engine.checkpoint.load_trained` needs, so every entry's --model-path takes a
folder as it takes a .pt file. A missing, damaged or mismatched file is a one-line error naming it.
"""
import json
import math
import os
import shutil

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.errors import UserError
from engine.files import WriteError, temporary_name

FORMAT = "clip-retrieval-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TEXT = "text"  # the subfolder with the text tower's config and the tokenizer: a fixed name, never read from a file
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few kB
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on its JSON header
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
# config.json key -> (run config key, accepted types): what build_model and the encoders read
MODEL_KEYS = {"image_model": ("image-model", (str,)), "text_pooling": ("text-pooling", (str,)),
              "temperature": ("temperature", (int, float)), "learnable_temperature": ("learnable-temperature", (bool,)),
              "image_size": ("image-size", (int,)), "max_length": ("max-length", (int,))}


class ModelFolderError(UserError, ValueError):
    """A model folder whose files are missing, damaged or do not match each other."""


def is_model_folder(path):
    """True for a folder meant as a model folder (it has either of its two main files)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in (CONFIG, WEIGHTS))


# ---------------------------------------------------------------- writing
def write_model_folder(model, tokenizer, run_cfg, out, text_vocab, card=None, extra=None):
    """Write the folder at `out` (which must not hold files yet) from a model and its run config; returns `out`.

    The files go to a temporary folder beside `out` that is renamed at the end, so an interrupted export leaves
    no half folder. `card` is the README.md text; `extra` adds keys to config.json."""
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise WriteError(f"--output '{out}' already holds files; choose a new folder or remove it")
    tmp = temporary_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(os.path.join(tmp, TEXT))
        # contiguous, unshared copies: safetensors stores each tensor's own bytes
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(weights, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(tmp, WEIGHTS), 0o666 & ~umask)  # safetensors writes it private; a share is not
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "text_model": TEXT,
                  **{key: {"text-pooling": "first", **run_cfg}[name] for key, (name, _) in MODEL_KEYS.items()},
                  "embedding_dim": model.dim,
                  "logit_scale": float(model.logit_scale()), "text_vocab": text_vocab,
                  **(extra or {}), "training_config": run_cfg}
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        model.text.model.config.save_pretrained(os.path.join(tmp, TEXT))
        tokenizer.save_pretrained(os.path.join(tmp, TEXT))
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above): the rename takes its place
        os.replace(tmp, out)
    except OSError as e:
        raise WriteError(f"could not write the model folder {out} ({e.strerror or e}); free disk space or "
                         f"choose another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- reading
def read_model_folder(path):
    """({"model": state dict, "config": run config, "text_vocab": fingerprint}, the weights file) of a model
    folder; the run config's text-model is the folder's own text/ subfolder."""
    config = read_config(path)
    cfg = dict(config["training_config"]) if isinstance(config.get("training_config"), dict) else {}
    for key, (name, _) in MODEL_KEYS.items():
        cfg[name] = config[key]
    cfg["text-model"] = os.path.join(os.path.abspath(path), TEXT)
    cfg["load-pretrained"] = False
    text_config = os.path.join(cfg["text-model"], "config.json")
    if not os.path.isfile(text_config):
        raise ModelFolderError(f"model folder '{path}' lacks {os.path.join(TEXT, 'config.json')} (the text tower's "
                               f"config); export the folder again with python -m inference.export --format hf")
    weights = os.path.join(path, WEIGHTS)
    return {"model": read_weights(weights), "config": cfg, "text_vocab": config.get("text_vocab")}, weights


def read_config(path):
    """config.json of a model folder, checked: our format, and every key that rebuilds the model present with
    the right type."""
    file = os.path.join(path, CONFIG)
    redo = "export the folder again with python -m inference.export --format hf"
    if not os.path.isfile(file):
        raise ModelFolderError(f"model folder '{path}' has no {CONFIG}; {redo}")
    try:
        if os.path.getsize(file) > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES} bytes")
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"'{file}' is not readable JSON ({str(e).splitlines()[0][:100]}); {redo}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFolderError(f"'{file}' does not describe a model of this project (no \"format\": \"{FORMAT}\"); "
                               f"pass a folder written by python -m inference.export --format hf")
    if not isinstance(config.get("format_version"), int) or config["format_version"] > FORMAT_VERSION:
        raise ModelFolderError(f"'{file}' has format_version {config.get('format_version')!r}, newer than this "
                               f"code reads ({FORMAT_VERSION}); update the project")
    for key, (_, types) in MODEL_KEYS.items():
        value = config.get(key)
        if not isinstance(value, types) or (bool in types) != isinstance(value, bool) or \
                (not isinstance(value, (str, bool)) and not (math.isfinite(value) and value > 0)):
            raise ModelFolderError(f"'{file}' has {key} {value!r}, not a valid value; {redo}")
    if config.get("text_vocab") is not None and not isinstance(config["text_vocab"], str):
        raise ModelFolderError(f"'{file}' has text_vocab {config['text_vocab']!r}, not a fingerprint; {redo}")
    return config


def read_weights(file):
    """The tensors of a safetensors file, after checking that its header's names, shapes and offsets describe
    exactly the bytes the file has (a header that lies about its sizes is refused, never read past)."""
    redo = "export the folder again with python -m inference.export --format hf"
    if not os.path.isfile(file):
        raise ModelFolderError(f"'{file}' does not exist; a model folder needs its weights: {redo}")
    check_header(file, redo)
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"'{file}' is not readable safetensors ({str(e).splitlines()[0][:100]}); "
                               f"{redo}") from None


def check_header(file, redo):
    size = os.path.getsize(file)

    def bad(why):
        return ModelFolderError(f"'{file}' is damaged ({why}); {redo}")
    with open(file, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise bad(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(start, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"its header claims {length} bytes, the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a table of tensors")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in DTYPE_BYTES and isinstance(entry.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"]) \
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2 \
            and all(isinstance(o, int) for o in entry["data_offsets"])
        if not ok:
            raise bad(f"tensor {name!r} has no valid dtype, shape and offsets")
        begin, end = entry["data_offsets"]
        need = math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]
        if not 0 <= begin <= end <= data or end - begin != need:
            raise bad(f"tensor {name!r} claims bytes {begin}..{end} for {need} bytes of data, the file has {data}")


def weights_identity_file(path):
    """The file whose bytes identify a --model-path: the .pt itself, or a model folder's weights."""
    return os.path.join(path, WEIGHTS) if os.path.isdir(path) else path

