"""The PASS / FAIL / SKIP table of an acceptance check (bench/gpu.py), one row per measured item."""
import gc
import time
import traceback

import torch


class Table(list):
    """Rows as they finish: PASS or FAIL with the measured value against its criterion, SKIP with a reason.
    `save(rows)` runs after each row, so a run stopped by a timeout still leaves the rows it finished."""

    def __init__(self, save=lambda rows: None):
        super().__init__()
        self.save = save

    def add(self, check, item, precision, measure):
        """`measure()` -> (ok, measured, criterion, values), or None when it added rows of its own; a string is a
        SKIP row's reason. An exception is a FAIL row with its first line (and its traceback in the JSON)."""
        start = time.perf_counter()
        if isinstance(measure, str):
            return self.put(check, item, precision, "SKIP", "", "", measure, {})
        try:
            if (result := measure()) is None:
                return
            ok, measured, criterion, values = result
            reason = None if ok else "criterion not met"
        except Exception as e:  # a broken row is reported, and the other rows still run
            first = (str(e).strip().splitlines() or [""])[0]
            ok, measured, criterion, reason = False, "", "", f"{type(e).__name__}: {first}"[:300]
            values = {"traceback": traceback.format_exc()[-4000:]}
        finally:
            gc.collect()
            torch.cuda.empty_cache()  # the next row, or a child process, gets the memory back (no-op on the CPU)
        self.put(check, item, precision, "PASS" if ok else "FAIL", measured, criterion, reason, values,
                 time.perf_counter() - start)

    def put(self, check, item, precision, status, measured, criterion, reason, values, seconds=0.0):
        self.append(dict(check=check, item=item, precision=precision, status=status, measured=measured,
                         criterion=criterion, reason=reason, seconds=round(seconds, 2), values=values))
        print(f"{status:<4}  {check}: {item} [{precision}] {measured or reason}", flush=True)
        self.save(self)

    def format(self):
        return "\n".join(f"{r['check']:<10} {r['item']:<46} {r['precision']:<22} {r['status']:<4}  {r['measured']} "
                         f"{r['reason'] or ''}  {r['criterion']}  ({r['seconds']:.1f} s)" for r in self)
