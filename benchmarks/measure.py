"""Measuring helpers shared by the CPU benchmarks: wall time over repetitions and peak RSS (Linux).

Peak memory of a region = the process's peak RSS (``VmHWM``) during it minus its RSS just before, after
``/proc/self/clear_refs`` has reset the peak to the current RSS. Run each method in its own process so that
memory freed by one method cannot be reused by the next.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time


def rss_mib(field: str = "VmRSS") -> float:
    """Current (``VmRSS``) or peak (``VmHWM``) resident memory of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) restarts from the current RSS


def measure(fn, reps: int, warmup: bool = True) -> dict:
    """Run ``fn`` (after one warm-up call if ``warmup``) ``reps`` times.

    Returns best_s, median_s, peak_mib (peak RSS above the RSS before the timed calls) and the last result.
    """
    if warmup:
        fn()
    before = rss_mib()
    reset_peak_rss()
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "peak_mib": max(0.0, rss_mib("VmHWM") - before),
        "result": result,
    }


def run_worker(script: str, *args) -> dict:
    """Run ``python script --worker *args`` in a fresh process; return the JSON of its last stdout line.

    Raises RuntimeError with the worker's last stderr line when it fails (e.g. out of memory).
    """
    cmd = [sys.executable, script, "--worker", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        raise RuntimeError(f"exit {proc.returncode}: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
