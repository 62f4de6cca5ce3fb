"""User errors and the one way an entry script turns them into a one-line exit.

Library code raises; it never calls `sys.exit`. A mistake the user can fix (a wrong path, a bad CSV, an unknown
config key, no GPU for a GPU-only option) is raised as a `UserError` subclass whose message says what to do;
`run_entry` prints it as `error: ...` on stderr and exits with status 1. Argument-syntax mistakes are argparse's
business and exit with status 2. While an entry runs, a warning prints as one line `warning: ...`.

Under torchrun one line speaks for the whole run: rank 0's. A user error that every process meets alike (a config
mistake) and a `PeerError` (this process stops because another one failed, and that one's message is printed by
rank 0) end the other ranks without a word. Any other user error on another rank is printed with its rank, and a
failed collective (a process that died or stopped answering) is one line, never a traceback.
A `Stopped` run (engine.preempt) prints its line on rank 0 and exits with STOPPED_EXIT on every rank.
"""
import os
import reprlib
import sys
import warnings

from PIL import Image


class UserError(Exception):
    """A mistake the user can fix; the message is one sentence that says how."""


class DataError(UserError, ValueError):
    """A problem with data the user must fix: a missing file, a bad CSV, an image that cannot be decoded."""


class PeerError(UserError):
    """Another process of the run failed; rank 0 prints why, this process ends quietly."""


# "Temporary failure, try again" (sysexits.h EX_TEMPFAIL): a stopped run whose last.pt resumes it; a scheduler
# that sees it requeues the job (docs/slurm/)
STOPPED_EXIT = 75


class Stopped(Exception):
    """Training stopped on a signal after saving last.pt; the message says where and how to resume."""


def process_rank():
    """This process's rank under torchrun (0 otherwise), read from its environment as torchrun sets it."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def quiet_on_other_ranks(error):
    """True for errors that rank 0 reports for the whole run (see the module docstring)."""
    config = sys.modules.get("engine.config")
    same_everywhere = (PeerError,) + ((config.ConfigError,) if config is not None else ())
    return isinstance(error, same_everywhere)


# how gloo's transport says that the other end of a collective is gone (it raises a plain RuntimeError)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "/gloo/transport/")


def collective_failure(error):
    """True for the error torch.distributed raises when another process died or a collective timed out."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return False
    return isinstance(error, getattr(dist, "DistError", ())) or \
        (type(error) is RuntimeError and any(mark in str(error) for mark in PEER_GONE))


def user_errors():
    """The exception types that mean a user mistake. model.py imports only torch, torchvision and transformers, so
    its ModelError cannot derive from UserError; it is looked up only once model.py is loaded, which keeps this
    file (and a config check before the heavy imports) free of torch."""
    model = sys.modules.get("model")
    return (UserError, model.ModelError) if model is not None else (UserError,)


MAX_MESSAGE = 2000  # characters of an error message printed; what a message quotes is shortened before that


def one_line(text):
    return " ".join(str(text)[:4 * MAX_MESSAGE].split())[:MAX_MESSAGE]


# reprlib stops at a few items per level, so even a huge or deeply nested value costs little to quote
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 200, 200


def shorten(value, limit=60, quote=True):
    """`value` as a message quotes it, cut to `limit` characters: a string's repr (or the string, `quote=False`)
    with its full length said, anything else as reprlib abbreviates it. A 100 KB value never floods a message."""
    if isinstance(value, str):
        text = repr(value[:limit + 10]) if quote else value[:limit + 10]
        return text if len(value) <= limit else f"{text[:limit]}... ({len(value)} characters)"
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def original_message(error):
    """The message of `error` as it was raised. An exception raised in a DataLoader worker comes back re-raised
    with the worker's whole traceback as its message ("Caught ShardError in DataLoader worker process 0.
    Original Traceback ... engine.shards.ShardError: <message>"); only <message> is for the user."""
    text = str(error)
    first = text.split("\n", 1)[0]
    if first.startswith("Caught ") and "worker" in first and "\nOriginal Traceback" in text:
        return text.rsplit(f"{type(error).__name__}: ", 1)[-1]
    return text


def _format_warning(message, category, filename, lineno, line=None):
    # the file, line and source line of a warning are the library's business; the user needs the message
    return f"warning: {one_line(message)}\n"


def run_entry(fn, *args, cleanup=None):
    """Call `fn(*args)`; a user error becomes one line on stderr and exit status 1, Ctrl-C (or a timeout's
    SIGINT) one line and the shell's status 130. Warnings print as one line `warning: ...` meanwhile. `cleanup`
    always runs."""
    formatwarning = warnings.formatwarning
    try:
        with warnings.catch_warnings():  # the filters and the format are restored when the entry returns
            # decoding checks its own pixel limits (engine/images.py, max-image-pixels), which may exceed PIL's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.formatwarning = _format_warning
            return fn(*args)
    except Stopped as e:
        if process_rank() == 0:
            print(one_line(e), file=sys.stderr, flush=True)
        sys.exit(STOPPED_EXIT)
    except Exception as e:
        rank = process_rank()
        if collective_failure(e):
            if rank:  # rank 0 says what happened, or the process that failed first does
                sys.exit(1)
            sys.exit(f"error: another process of this run stopped or stopped answering "
                     f"({one_line(str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]}); its own error "
                     f"line, or torchrun's report, says why")
        if not isinstance(e, user_errors()):
            raise
        if rank and quiet_on_other_ranks(e):
            sys.exit(1)
        sys.exit(f"error: {f'rank {rank}: ' if rank else ''}{one_line(original_message(e))}")
    except KeyboardInterrupt:
        # every file is written whole or not at all (engine/files.atomic_write): what was saved before stays
        print("interrupted: files already written are kept", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.formatwarning = formatwarning
        if cleanup is not None:
            cleanup()
