"""Calls meterd from Python with the meterd_client package (clients/python).

usage: python3 meter_client.py SOCKET CID PRODUCT COMPONENT THREADS USES

Logs CID in, then THREADS threads, each in a context of its own, use PRODUCT
USES times with one use of COMPONENT inside each; prints the uses committed.
"""

import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../clients/python/src"))
from meterd_client import UnmatchedCommit, UseRefused, connect  # noqa: E402


def work(socket_path, product, component, uses, context, results):
    meter = connect(socket_path)
    committed = 0
    for _ in range(uses):
        try:
            with meter.use(product, context):  # committed when the block ends
                if meter.query(component, context):
                    meter.commit(component, context)  # charged to the product's owner
        except UseRefused:
            continue
        committed += 1
    # A use whose work raises is cancelled, not charged, and leaves no
    # query open behind it.
    try:
        with meter.use(product, context):
            raise RuntimeError("the work failed")
    except RuntimeError:
        pass
    assert meter.cancel(product, context) is False
    # A query that is never committed is cancelled and not charged.
    if meter.query(product, context):
        assert meter.cancel(product, context) is True
    results.append(committed)


def main(socket_path, cid, product, component, threads, uses):
    meter = connect(socket_path)
    meter.login(cid)
    results = []
    workers = [
        threading.Thread(target=work, args=(socket_path, product, component, uses, f"py{n}", results))
        for n in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if len(results) != threads:
        raise SystemExit("a worker failed")
    try:
        meter.commit("B1-P404")
        raise SystemExit("commit without query must be refused")
    except UnmatchedCommit as fault:
        assert fault.code == 104, fault
    assert meter.logout(cid) is True
    print(f"committed {sum(results)} uses of {product}")


if __name__ == "__main__":
    if len(sys.argv) != 7:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
