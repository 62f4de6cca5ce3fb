"""A clean stop on a scheduler's signal: finish the step, write last.pt, say how to resume, exit for a requeue.

Shared clusters stop jobs with SIGTERM (preemption, maintenance, the time limit) and Slurm can send SIGUSR1 ahead
of the time limit (`--signal`). While `StopSignals` is active, either one only sets a flag; the epoch loop looks at
it after every optimizer step, agrees with the other processes (every rank stops after the same step), saves
last.pt once and raises `Stopped`, which ends the process with STOPPED_EXIT.

Two escapes keep a stop bounded: a second signal, or `timeout_s` passing after the first without the save done,
exits at once (status 128 + the signal's number, as if killed by it). Every file is written under a temporary
name and renamed (engine.files), so such an exit leaves the previous last.pt whole; the temporary is removed at
the next start. A repeat that comes within DUPLICATE_S of the first is the same stop, not a second one: Slurm
signals every process of a job, and torchrun passes its own copy on to its workers as well.
"""
import os
import signal
import sys
import threading
import time

from engine.errors import Stopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DUPLICATE_S = 2.0


class StopSignals:
    """Context manager: SIGTERM and SIGUSR1 set `requested` (the signal's name) instead of killing the process."""

    def __init__(self, timeout_s):
        self.timeout_s = timeout_s
        self.requested = None
        self.first = None
        self.previous = {}
        self.watchdog = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.watchdog is not None:
            self.watchdog.cancel()
        return False

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.first is None:
            self.first, self.requested = now, signal.Signals(signum).name
            self.watchdog = threading.Timer(self.timeout_s, self._give_up, args=(signum,))
            self.watchdog.daemon = True
            self.watchdog.start()
        elif now - self.first > DUPLICATE_S:
            self._exit_now(signum, f"a second {signal.Signals(signum).name}")

    def _give_up(self, signum):
        self._exit_now(signum, f"the stop did not finish within {self.timeout_s:g} s")

    @staticmethod
    def _exit_now(signum, why):
        print(f"stopped at once: {why}; the last complete last.pt is kept", file=sys.stderr, flush=True)
        os._exit(128 + signum)


def stop_message(cfg, signame, epoch, step, steps, global_step):
    """The one line a stopped run ends with (rank 0), as a `Stopped` to raise."""
    return Stopped(f"stopped by {signame} at epoch {epoch}, step {step} of {steps} (optimizer step {global_step}); "
                   f"{cfg['last-path']} holds it: run the same command with --load-checkpoint auto to continue")
