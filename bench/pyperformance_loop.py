"""One pyperformance benchmark's work, in a loop, in this one process.

Usage: pyperformance_loop.py NAME LOOPS
       pyperformance_loop.py NAME --calibrate SECONDS

Runs pyperformance's own bm_NAME/run_benchmark.py as __main__ with
pyperf.Runner replaced by a stand-in that only records what the script
registers (bench_func: a function and its arguments, called once per loop;
bench_time_func: a function that takes the loop count first), so that the
work and its set-up are exactly pyperformance's while pyperf's runner, which
spawns worker processes and times them itself, never runs. Every registered
function runs once as a warm-up; then, as bench/workload.py does, the script
prints `ready`, waits for a line on stdin (a tracer attaches meanwhile),
runs LOOPS loops of every registered function timed with
time.perf_counter(), prints `elapsed SECONDS` and waits for stdin to close.
With --calibrate it prints `loops N` instead: how many loops take about
SECONDS untraced.
"""

import argparse
import os
import runpy
import sys
import time

import pyperf
import pyperformance


class RecordingRunner:
    """What a benchmark script uses of pyperf.Runner, recording the work."""

    registered = []

    def __init__(self, *args, **kwargs):
        self.argparser = argparse.ArgumentParser()
        self.metadata = {}

    def parse_args(self, args=None):
        # The script's own defaults: what pyperformance runs.
        return self.argparser.parse_args([])

    def bench_func(self, name, func, *args, **kwargs):
        self.registered.append(lambda loops: [func(*args) for _ in range(loops)])

    def bench_time_func(self, name, func, *args, **kwargs):
        self.registered.append(lambda loops: func(loops, *args))


def load(name):
    """The loops of benchmark NAME, as one function of the loop count."""
    script = os.path.join(
        os.path.dirname(pyperformance.__file__), "data-files", "benchmarks", f"bm_{name}", "run_benchmark.py"
    )
    if not os.path.exists(script):
        sys.exit(f"pyperformance_loop: pyperformance {pyperformance.__version__} has no benchmark {name!r}")
    pyperf.Runner = RecordingRunner
    sys.argv = [script]
    runpy.run_path(script, run_name="__main__")
    if not RecordingRunner.registered:
        sys.exit(f"pyperformance_loop: {script} registered no benchmark function")
    work = list(RecordingRunner.registered)

    def run(loops):
        for func in work:
            func(loops)

    return run


def timed(run, loops):
    start = time.perf_counter()
    run(loops)
    return time.perf_counter() - start


def main():
    name, mode, *rest = sys.argv[1:]
    run = load(name)
    run(1)
    if mode == "--calibrate":
        target, loops = float(rest[0]), 1
        # Long enough to measure, then scaled to the target; the fastest of
        # three, since a busy machine only ever makes a run slower.
        while timed(run, loops) < target / 5:
            loops *= 2
        took = min(timed(run, loops) for _ in range(3))
        print(f"loops {max(1, round(loops * target / took))}", flush=True)
        return
    loops = int(mode)
    print("ready", flush=True)
    sys.stdin.readline()
    elapsed = timed(run, loops)
    print(f"elapsed {elapsed:.6f}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
