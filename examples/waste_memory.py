"""A small service that leaks: the example memtrace traces when no --pid is
given (after the waste_memory example of the tracemalloc documentation).
Every 100 ms it keeps 500 objects holding 100 random bytes each, and churns
through a batch it does not keep."""
import os
import time


class Record:
    def __init__(self, payload):
        self.payload = payload


def handle_request(cache):
    for _ in range(500):
        cache.append(Record(os.urandom(100)))  # kept forever: the leak


def churn():
    scratch = [bytes(200) for _ in range(500)]  # freed at return
    return len(scratch)


def main():
    cache = []
    while True:
        handle_request(cache)
        churn()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
