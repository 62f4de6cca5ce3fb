"""User errors and the one way an entry script turns them into a one-line exit.

Library code raises; it never calls `sys.exit`. A mistake the user can fix (a wrong path, a bad CSV, an unknown
config key, no GPU for a GPU-only option) is raised as a `UserError` subclass whose message says what to do;
`run_entry` prints it as `error: ...` on stderr and exits with status 1. Argument-syntax mistakes are argparse's
business and exit with status 2.
"""
import sys

from model import ModelError


class UserError(Exception):
    """A mistake the user can fix; the message is one sentence that says how."""


class DataError(UserError, ValueError):
    """A problem with data the user must fix: a missing file, a bad CSV, an image that cannot be decoded."""


# model.py imports only torch, torchvision and transformers, so its error type cannot derive from UserError.
USER_ERRORS = (UserError, ModelError)


def run_entry(fn, *args, cleanup=None):
    """Call `fn(*args)`; a user error becomes one line on stderr and exit status 1, Ctrl-C (or a timeout's
    SIGINT) one line and the shell's status 130. `cleanup` always runs."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        sys.exit(f"error: {message}")
    except KeyboardInterrupt:
        # every file is written whole or not at all (engine/files.atomic_write): what was saved before stays
        print("interrupted: files already written are kept", file=sys.stderr)
        sys.exit(130)
    finally:
        if cleanup is not None:
            cleanup()
