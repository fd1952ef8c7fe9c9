"""A bus consumer that dies mid-batch, for tests/test_bus_crash.py.

    python -m tests.bus_crash_consumer URL TENANT LOG --max 10 --process 4

Takes one batch as consumer ``doomed``, processes the first ``--process``
messages (processing = appending the message id to LOG, fsync'd: the
consumer's durable dedup record), prints the batch ids as one JSON line,
then hangs without acknowledging anything until it is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("tenant")
    parser.add_argument("log")
    parser.add_argument("--max", type=int, default=10)
    parser.add_argument("--process", type=int, default=4)
    args = parser.parse_args()
    request = urllib.request.Request(
        f"{args.url}/topics/t/subscriptions/g/messages?consumer=doomed&max={args.max}&wait=2",
        headers={"X-Nops-Tenant": args.tenant},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        messages = json.load(response)["messages"]
    with open(args.log, "a") as log:
        for message in messages[: args.process]:
            log.write(message["id"] + "\n")
            log.flush()
            os.fsync(log.fileno())
    print(json.dumps([m["id"] for m in messages]), flush=True)
    time.sleep(3600)  # never acks: the test kills us here


if __name__ == "__main__":
    main()
