"""Atomic file writes: the one implementation every writer in the project goes through.

A file is written under a temporary name in its own folder, then renamed over the target, so a crash (or a kill)
never leaves half a file under the real name. Temporary names end in `.partial` and carry the writer's process
id, so a later run can find and remove what a killed run left (`remove_stale_partials`).
"""
import json
import os

from engine.errors import DataError, UserError

PARTIAL = ".partial"


class WriteError(UserError, OSError):
    """A file could not be written (disk full, no permission); the previous version is untouched."""


def require_file(path, what, advice="fix the path"):
    """`path` when it is an existing file; else a DataError that says whether it is missing or a folder."""
    if os.path.isfile(path):
        return path
    kind = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
    raise DataError(f"{what} '{path}' {kind}; {advice}")


def require_folder(path, what, advice="fix the path"):
    """`path` when it is an existing folder; else a DataError that says whether it is missing or a file."""
    if os.path.isdir(path):
        return path
    kind = "is a file, not a folder" if os.path.exists(path) else "does not exist"
    raise DataError(f"{what} '{path}' {kind}; {advice}")


def temporary_name(path):
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}{PARTIAL}")


def atomic_write(path, write, binary=False):
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`. Returns `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise WriteError(f"could not create the folder {folder} for {path} ({e.strerror or e})") from None
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"could not write {path} ({e.strerror or e}); free disk space or choose another folder "
                         f"(the previous version of the file is untouched)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path, data):
    return atomic_write(path, lambda f: json.dump(data, f, indent=2))


def remove_stale_partials(folder, stem=""):
    """Remove `.{stem}*.<pid>.partial` files that killed writers left in `folder` (every one when `stem` is
    empty); returns their names. Call it only where no other live process is writing."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if name.startswith(f".{stem}") and name.endswith(PARTIAL):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed
