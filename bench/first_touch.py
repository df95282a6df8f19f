"""First-touch accuracy workloads: a steady leak of 300-byte bytes objects
(pymalloc's 336-byte size class) from one line, and a busier churn.

python first_touch.py MODE, MODE one of:
  transient  the churn makes and drops short strings one at a time (another
             size class, no pool ever emptied)
  separate   the churn builds and drops lists of 400 short strings (another
             size class, whole pools emptied and handed back)
  same       the churn builds and drops lists of 400 bytes(300) (the leak's
             own size class)
Further arguments are ignored: tests tag the command line with them.
"""
import sys
import time

keep = []
SIZE = 300


def leak():
    keep.append(bytes(SIZE))  # the leak


def transient():
    for i in range(400):
        junk = str(i) * 3


def separate():
    junk = [str(i) * 3 for i in range(400)]
    return len(junk)


def same():
    junk = [bytes(SIZE) for _ in range(400)]
    return len(junk)


churn = {"transient": transient, "separate": separate, "same": same}[sys.argv[1]]
print("ready", flush=True)
while True:
    for _ in range(20):
        leak()
    for _ in range(5):
        churn()
    time.sleep(0.005)
