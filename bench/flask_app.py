"""The bench's web service: a small Flask app on Flask's development server.

Usage: flask_app.py PORT

Every request to / appends a dict describing it to an audit list that is
never trimmed, as an app that keeps an in-memory audit trail does, and
answers with the list's length. It listens on 127.0.0.1:PORT with the
development server's defaults (a thread per request), its per-request log
lines off so that they do not flood the bench's output; prints `ready` once
listening; and serves until stdin closes.
"""

import logging
import sys
import threading
import time

from flask import Flask, request
from werkzeug.serving import make_server

app = Flask(__name__)
audit = []


@app.route("/")
def index():
    audit.append({"time": time.time(), "method": request.method, "path": request.path,
                  "client": request.remote_addr, "agent": request.headers.get("User-Agent", "")})
    return f"{len(audit)}\n"


def main():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = make_server("127.0.0.1", int(sys.argv[1]), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
