"""Four kinds of service for host mode's example in the README:
`python host_services.py leak|churn|cache|idle NAME`. `leak` keeps 300
Session objects every 0.3 s, `cache` one dict, `churn` maps, touches and
unmaps 8 MiB of private memory, `idle` sleeps."""
import mmap, sys, time
class Session:
    def __init__(self, user): self.user = user
sessions = []
mode = sys.argv[1]
churn = None
while True:
    if mode == 'leak':
        sessions.extend(Session(i) for i in range(300))
    elif mode == 'cache':
        sessions.append({'payload': 'x' * 200})
    elif mode == 'churn':
        if churn:
            churn.close(); churn = None
        else:
            churn = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE)
            for page in range(0, 8 << 20, 4096): churn[page] = 1
    time.sleep(0.3)
