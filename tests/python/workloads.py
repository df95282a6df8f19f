"""Workloads with known allocation patterns, for comparing memtrace with
tracemalloc on the same code.

    python workloads.py MODE WORKLOAD

prints "ready", waits for "go" on stdin, runs WORKLOAD once, prints "done",
then waits for a signal (signal.pause allocates nothing, so the process
holds still while memtrace reports). With MODE "tracemalloc" (run under
-X tracemalloc=25) it snapshots before and after the workload and prints the
top 10 of compare_to('lineno') as "TM <line>", and the oldest-first frames
of compare_to('traceback')'s biggest offender as "TB <file>:<line>", before
"done". With MODE "plain" it prints nothing else: memtrace watches it.
"""
import ctypes
import os
import signal
import sys
import threading

keep = []


# Workloads allocate objects CPython keeps no free lists for (bytes, str,
# bytearray, instances, functions): a free list's contents differ between
# any two processes, and with them the count of allocator calls.


class Holder:
    def __init__(self, i):
        self.data = os.urandom(100)  # MARK:holder-data
        self.label = "holder-%d" % i  # MARK:holder-label


def nested_lists():
    for _ in range(100):
        inner = []
        for j in range(100):
            inner.append(Holder(j))  # MARK:holder
        keep.append(inner)


def dict_cache():
    cache = {}
    for i in range(20000):
        key = "key-%d" % i  # MARK:cache-key
        value = str(i) * 10  # MARK:cache-value
        cache[key] = value  # MARK:cache-insert
    keep.append(cache)


def make_closure(size):
    buffer = bytearray(size)  # MARK:closure-buffer

    def closure():  # MARK:closure-def
        return len(buffer)

    return closure


def closures():
    for _ in range(2000):
        keep.append(make_closure(20000))  # MARK:closure


def churn():
    total = 0
    for _ in range(20000):
        scratch = [os.urandom(50) for _ in range(5)]  # MARK:churn
        total += len(scratch)
    return total


def deep_leak(depth):
    if depth == 0:
        for _ in range(5000):
            keep.append(os.urandom(200))  # MARK:deep
        return
    deep_leak(depth - 1)  # MARK:deep-recurse


def deep():
    deep_leak(5)  # MARK:deep-start


def thread_one():
    mine = []  # each thread's own list: its growth is its own
    for _ in range(3000):
        mine.append(os.urandom(300))  # MARK:thread-one
    keep.append(mine)


def thread_two():
    mine = []  # each thread's own list: its growth is its own
    for _ in range(3000):
        mine.append(os.urandom(600))  # MARK:thread-two
    keep.append(mine)


def thread_three():
    mine = []  # each thread's own list: its growth is its own
    for _ in range(3000):
        mine.append(os.urandom(900))  # MARK:thread-three
    keep.append(mine)


def threads():
    workers = [threading.Thread(target=f) for f in (thread_one, thread_two, thread_three)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def native_leak():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    for _ in range(1000):
        keep.append(libc.malloc(8192))  # MARK:ctypes-malloc


def bytes_kept():
    """1000 objects of one size, each one allocation (bytes above pymalloc's
    512-byte limit, 1000 bytes and a 33-byte header): exact numbers."""
    kept = [None] * 1000
    for i in range(1000):
        kept[i] = bytes(1000)  # MARK:bytes-kept
    keep.append(kept)


def code_reuse():
    """Functions compiled one at a time and freed: the allocator hands each
    new code object the address of the last. Each lives 20 ms after it
    allocates, as real code does, so memtrace can read it; each starts on its
    own line, so each is another function. Prints how many code objects
    reused an address."""
    import time

    seen, reused = set(), 0
    for i in range(12):
        source = "\n" * i + "def generated():\n    kept = [bytes(100) for _ in range(10)]\n    time.sleep(0.02)\n    return kept\n"
        namespace = {"time": time}
        exec(compile(source, "generated_%d.py" % i, "exec"), namespace)
        address = id(namespace["generated"].__code__)
        reused += address in seen
        seen.add(address)
        keep.append(namespace["generated"]())  # MARK:code-reuse
        namespace.clear()  # the function and its globals form a cycle
    print("REUSED", reused, flush=True)


WORKLOADS = {
    "nested_lists": nested_lists,
    "dict_cache": dict_cache,
    "closures": closures,
    "churn": churn,
    "deep": deep,
    "threads": threads,
    "native_leak": native_leak,
    "code_reuse": code_reuse,
    "bytes_kept": bytes_kept,
}


def main():
    mode, name = sys.argv[1], sys.argv[2]
    workload = WORKLOADS[name]
    traced = mode == "tracemalloc"
    if traced:
        import tracemalloc
    print("ready", flush=True)
    sys.stdin.readline()
    if traced:
        before = tracemalloc.take_snapshot()
    workload()
    if traced:
        after = tracemalloc.take_snapshot()
        for stat in after.compare_to(before, "lineno")[:10]:
            print("TM", stat, flush=True)
        biggest = after.compare_to(before, "traceback")[0]
        for frame in biggest.traceback:
            print("TB %s:%d" % (frame.filename, frame.lineno), flush=True)
    print("done", flush=True)
    signal.pause()


main()
