"""Targets for memtrace's census tests. `population`: builds 10,000
instances of a class, 5,000 dicts (tracked: each holds a list) and 20,000
bytes objects, prints its own gc.get_objects() counts, then adds 1,000 more
instances. `churn`: makes and drops instances forever, keeping none.
`corrupt`: breaks its own GC list and a type's name through
ctypes, one way at a time, with the collector off, and mends each before
going on. Each step waits for a line on stdin."""

import ctypes
import gc
import os
import sys


class MyObject:
    pass


def step(name, *values):
    print(name, *values, flush=True)
    sys.stdin.readline()


def gc_counts():
    objects = gc.get_objects()
    mine = sum(1 for o in objects if type(o) is MyObject)
    dicts = sum(1 for o in objects if type(o) is dict)
    del objects
    return mine, dicts


def population():
    step("ready")
    keep = [MyObject() for _ in range(10_000)]
    tables = [{"i": [i]} for i in range(5_000)]
    blobs = [os.urandom(100) for _ in range(20_000)]
    step("built", *gc_counts())
    keep.extend(MyObject() for _ in range(1_000))
    step("more", *gc_counts())
    return keep, tables, blobs


def word(address):
    return ctypes.c_uint64.from_address(address)


def corrupt():
    gc.disable()
    # Lists born one after another sit next to each other on the youngest
    # generation's list; a PyGC_Head is the two words before. The third
    # keeps the second from being the list's tail, whose next pointer the
    # interpreter rewrites whenever it tracks a new object.
    first, second, third = [], [], []
    head_first, head_second = id(first) - 16, id(second) - 16
    assert word(head_first).value == head_second, "consecutive on the GC list"
    assert word(head_second).value == id(third) - 16, "consecutive on the GC list"
    nxt = word(head_second).value
    step("ready")
    word(head_second).value = head_first  # a cycle that skips the head
    step("cycle")
    word(head_second).value = 0x10  # into unmapped memory
    step("unmapped")
    word(head_second).value = nxt

    class Named:
        pass

    named = Named()
    name = word(id(Named) + 24)  # tp_name
    kept = name.value
    name.value = 0x10
    step("garbage-name")
    name.value = kept
    step("mended", "Named object at" in repr(named))
    gc.enable()
    gc.collect()
    step("collected", len(gc.get_objects()) > 0)


def churn():
    """Allocates and drops the same objects over and over, keeping none."""
    import time

    print("ready", flush=True)
    while True:
        scratch = [MyObject() for _ in range(2_000)]
        del scratch
        time.sleep(0.01)


{"population": population, "corrupt": corrupt, "churn": churn}[sys.argv[1]]()
