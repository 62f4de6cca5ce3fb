"""What the fuzz tests share: the outcome rule (accepted, a one-line error, a counted skip; never a traceback) and
the loop that runs every case and reports all the cases that broke it.

A bug found here that cannot be fixed at once goes into KNOWN_BUGS (the loops then count it instead of failing)
with a strict-xfail test of the smallest input that triggers it. The five found so far are fixed, and their
smallest inputs stay in the test files as ordinary tests.
"""
import warnings

from engine.config import ConfigError
from engine.errors import DataError

SEED = 1234
UPLOAD_MB = 0.5  # small, so that the over-limit cases send little

KNOWN_BUGS = {}  # name -> predicate on the escaped exception: bugs found here and not yet fixed (none now)


def outcome(fn):
    """("ok", value, warnings) | ("error", message, warnings) | ("known", bug name, []); anything else fails.

    A user error is fine only when its message is one line: run_entry flattens it, but the library may not rely
    on that (a notebook or the server shows str(e) as it is).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn()
        except (DataError, ConfigError) as e:
            if "\n" not in str(e):
                return "error", str(e), [str(w.message) for w in caught]
            error = e
        except SystemExit as e:  # argparse: status 2 (usage on stderr); run_entry: "error: ..." on one line
            if e.code == 2 or (isinstance(e.code, str) and e.code.startswith("error:") and "\n" not in e.code):
                return "error", str(e.code), []
            raise AssertionError(f"exit {e.code!r} is neither argparse's 2 nor one 'error:' line") from None
        except Exception as e:  # noqa: BLE001 - the point of the test is to catch whatever escapes
            error = e
        else:
            return "ok", value, [str(w.message) for w in caught]
    for name, matches in KNOWN_BUGS.items():
        if matches(error):
            return "known", name, []
    raise AssertionError(f"{type(error).__name__}: {error!r}")


def check_all(cases, run):
    """Run every (description, input) case; fail once, listing every case whose outcome is not allowed."""
    tally, bad = {}, []
    for description, value in cases:
        try:
            kind = run(value)
        except AssertionError as e:
            bad.append(f"{description}: {str(e)[:300]}")
            continue
        tally[kind] = tally.get(kind, 0) + 1
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(bad[:20])
    return tally
