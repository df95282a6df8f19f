"""The allocation-heavy loop `cargo xtask bench` times under each tracer.

Usage: workload.py ITERATIONS DEPTH

Prints `ready` and waits for a line on stdin, so that a tracer can attach
before the hot loop starts; runs the loop DEPTH Python frames deep (the
frame walk of a tracer that records Python stacks grows with it); prints
`elapsed SECONDS` for the loop alone; then waits for stdin to close.
"""

import sys
import time


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y


def loop(iterations):
    """Small objects, most freed at once, some kept: a list, a string that
    replaces an older one, an instance with a dict; every tenth instance
    stays alive to the end."""
    kept = []
    names = {}
    for i in range(iterations):
        x = [i]
        names[i % 1000] = str(i)
        p = Point(i, x)
        if i % 10 == 0:
            kept.append(p)
    return len(kept)


def at_depth(depth, iterations):
    if depth > 1:
        return at_depth(depth - 1, iterations)
    return loop(iterations)


def main():
    iterations, depth = int(sys.argv[1]), int(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    at_depth(depth, iterations)
    elapsed = time.perf_counter() - start
    print(f"elapsed {elapsed:.6f}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
