"""Targets that fork or exec while memtrace traces them, driven line by line
on stdin so that each side allocates only once the test knows memtrace
traces it. `fork`: the parent keeps 10,000 bytes(200) and forks; the child
keeps 20,000 bytes(100). `exec`: the process keeps 10,000 bytes(100), then
execs itself, and its new image keeps 10,000 bytes(300)."""

import os
import sys

keep = []


def wait():
    sys.stdin.readline()


def fork():
    print("ready", flush=True)
    wait()
    for _ in range(10000):
        keep.append(bytes(200))  # MARK:parent
    pid = os.fork()
    if pid == 0:
        print("child %d" % os.getpid(), flush=True)
        wait()
        for _ in range(20000):
            keep.append(bytes(100))  # MARK:child
        print("child-done", flush=True)
        wait()
        os._exit(0)
    os.waitpid(pid, 0)
    print("done", flush=True)
    wait()


def exec_self():
    print("ready", flush=True)
    wait()
    for _ in range(10000):
        keep.append(bytes(100))  # MARK:before
    print("before-done", flush=True)
    wait()
    os.execv(sys.executable, [sys.executable, __file__, "exec-after"])


def exec_after():
    print("after", flush=True)
    wait()
    for _ in range(10000):
        keep.append(bytes(300))  # MARK:after
    print("after-done", flush=True)
    wait()


{"fork": fork, "exec": exec_self, "exec-after": exec_after}[sys.argv[1]]()
