"""A target that forges what memtrace reads of it, through ctypes, and
allocates in the forged code: a function whose line table's bytes are
garbage, one whose line table claims a terabyte, one whose file name is a
FIFO (which a reader of its source would block on), a cycle on the GC's
youngest list that skips the list's head, and a class whose tp_name points
into unmapped memory (its instances frozen onto the permanent generation). The collector is off, so the interpreter never walks
what it forged; everything is mended before it exits.

Prints `ready` once forged, then on each line of stdin allocates for a
second in the forged code and prints `allocated`; on `done` mends, uses
what it had forged, and prints `mended`."""

import ctypes
import gc
import os
import sys
import tempfile
import time

# PyVarObject.ob_size and PyBytesObject.ob_sval on every 64-bit CPython.
BYTES_SIZE, BYTES_DATA = 16, 32
TYPE_NAME = 24  # PyTypeObject.tp_name


def word(address):
    return ctypes.c_uint64.from_address(address)


def function(name, filename):
    source = "def %s(n, keep):\n    for _ in range(n):\n        keep.append(bytearray(64))\n" % name
    scope = {}
    exec(compile(source, filename, "exec"), scope)
    return scope[name]


def table_of(code):
    return code.co_linetable if sys.version_info >= (3, 10) else code.co_lnotab


gc.disable()
fifo_dir = tempfile.mkdtemp(prefix="memtrace-hostile-")
fifo = os.path.join(fifo_dir, "source.py")
os.mkfifo(fifo)
garbage = function("garbage_table", "/nonexistent/hostile/garbage_table.py")
huge = function("huge_table", "/nonexistent/hostile/huge_table.py")
from_fifo = function("from_fifo", fifo)

table = table_of(garbage.__code__)
ctypes.memmove(id(table) + BYTES_DATA, bytes((i * 37 + 11) & 0xFF for i in range(len(table))), len(table))
huge_size = word(id(table_of(huge.__code__)) + BYTES_SIZE)
real_size = huge_size.value
huge_size.value = 1 << 40



class Nameless:
    pass


instances = [Nameless() for _ in range(100)]
name = word(id(Nameless) + TYPE_NAME)
real_name = name.value
name.value = 0x10
# Onto the permanent generation, which the cycle below does not hide.
gc.freeze()

# Lists born one after another sit next to each other on the youngest
# generation's list; a PyGC_Head is the two words before. The third keeps
# the second from being the list's tail, which the interpreter rewrites.
first, second, third = [], [], []
head_first, head_second = id(first) - 16, id(second) - 16
assert word(head_first).value == head_second, "consecutive on the GC list"
assert word(head_second).value == id(third) - 16, "consecutive on the GC list"
after_second = word(head_second).value
word(head_second).value = head_first

print("ready", flush=True)
keep = []
for line in sys.stdin:
    if line.strip() == "done":
        break
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        for f in (garbage, huge, from_fifo):
            f(100, keep)
        instances.append(Nameless())
        time.sleep(0.01)
    print("allocated", flush=True)

name.value = real_name
word(head_second).value = after_second
huge_size.value = real_size
os.unlink(fifo)
os.rmdir(fifo_dir)
gc.unfreeze()
gc.enable()
gc.collect()
print("mended", "Nameless object at" in repr(instances[0]), len(keep) > 0, flush=True)
