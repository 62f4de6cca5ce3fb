"""The study at equal wall time: each run trains until its budget is spent, then is stopped and scored.

train.py is given an epoch count it never reaches (NEVER_ENDS, unless --set epochs says otherwise) and runs in a
process group of its own. When the budget is spent it gets SIGTERM; if it is still alive `grace` seconds later,
its whole group gets SIGKILL. Either way the run is then scored by eval.py on its last.pt:

- today train.py has no SIGTERM handler, so SIGTERM ends it at once and last.pt is the state at the end of its
  last finished epoch: the steps of the unfinished epoch are time spent and not scored;
- once train.py stops cleanly on SIGTERM (finish the step, write last.pt, exit non-zero), last.pt holds every
  step done, and the same code scores it.

last.pt, not best.pt: the question is what the budget bought, so every saved step counts. best.pt is chosen only
at epoch ends, so it would drop a clean stop's partial epoch; and where a run got worse before its time was up,
last.pt shows it, as a user stopped by the clock would find it. Steps come from last.pt's "step" and pairs are
steps x its global batch-size (train.py drops the last partial batch), so they count exactly what was scored.
"""
import os
import signal
import subprocess
import sys
import time

from engine.checkpoint import load_checkpoint
from engine.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where eval.py is run, as train.py is
NEVER_ENDS = 100_000  # epochs: the cosine schedule then stays at its peak rate after warm-up for any budget here
SCORE_NAME = "scored.json"  # eval.py's metrics of last.pt, in each run folder


def run_for(cmd, cwd, log_path, budget, grace):
    """Run `cmd` for at most `budget` seconds, then SIGTERM, then SIGKILL `grace` seconds later.
    Returns {"started" (epoch seconds), "seconds", "stopped": finished | terminated | killed, "returncode"}."""
    started, start = time.time(), time.perf_counter()
    stopped = "finished"
    with open(log_path, "w", encoding="utf-8") as out:
        # a session of its own: the kill reaches the data-loading workers too, and nothing else
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if not exited(proc, budget):
                stopped = "terminated"
                proc.send_signal(signal.SIGTERM)  # the main process alone: a clean stop must not lose its workers
                if not exited(proc, grace):
                    stopped = "killed"
            seconds = time.perf_counter() - start
        finally:  # also on Ctrl-C or a kill of the study: never leave a training run behind
            kill_group(proc)
    return {"started": started, "seconds": seconds, "stopped": stopped, "returncode": proc.returncode}


def exited(proc, timeout, poll=0.05):
    """Whether `proc` ends within `timeout` seconds. It is left unreaped (WNOWAIT), so its process group id stays
    its own until kill_group has used it: no other process can be given that id in between."""
    deadline = time.perf_counter() + timeout
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.perf_counter() >= deadline:
            return False
        time.sleep(poll)
    return True


def kill_group(proc):
    """SIGKILL what is left of the process group `proc` leads (its data-loading workers, or all of it), then reap
    `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left in the group
        pass
    proc.wait()


def check_stop(result, folder, log_line):
    """A run that ended by itself before its budget must have succeeded; one we stopped may exit with anything."""
    if result["stopped"] == "finished" and result["returncode"] != 0:
        raise UserError(f"the run in {folder} failed (exit {result['returncode']}) before its time budget: "
                        f"{log_line}; its output is in {os.path.join(folder, 'train.log')}")
    last = os.path.join(folder, "last.pt")
    if not os.path.isfile(last) or os.path.getmtime(last) < result["started"]:
        raise UserError(f"the run in {folder} saved no checkpoint within its time budget (train.py saves at the "
                        f"end of each epoch); raise --budget-seconds")


def score(folder, valid_root, cfg):
    """eval.py on the run's last.pt, on the report set; its metrics JSON goes to folder/scored.json."""
    argv = ["--model-path", os.path.join(folder, "last.pt"), "--valid-root", valid_root,
            "--output", os.path.join(folder, SCORE_NAME), "--device", str(cfg["device"]),
            "--num-workers", str(cfg["num-workers"])]
    log = os.path.join(folder, "eval.log")
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call([sys.executable, "eval.py", *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if code or not os.path.isfile(os.path.join(folder, SCORE_NAME)):
        raise UserError(f"scoring {folder}/last.pt failed (exit {code}); eval.py's output is in {log}")


def read_checkpoint(folder, started):
    """{"steps", "pairs", "saved_at", "temperature"} of the run's last.pt: what was scored, and when it was
    written (seconds after the start), which tells how much of the budget a kill threw away."""
    path = os.path.join(folder, "last.pt")
    last = load_checkpoint(path)  # the safe loader: a run folder is data too
    steps = int(last["step"])
    scale = last["model"]["log_scale"].exp().clamp(max=100).item()  # as model.logit_scale caps it
    return {"steps": steps, "pairs": steps * int(last["config"]["batch-size"]),
            "saved_at": os.path.getmtime(path) - started, "temperature": 1 / scale}
