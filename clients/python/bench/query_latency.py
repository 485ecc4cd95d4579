"""`query` round trips from Python against the raw socket floor, same run.

usage: python3 clients/python/bench/query_latency.py SOCKET [COUNT]

Prints the median and p99 of COUNT (default 20000) round trips each for:
  raw:        300 bytes out, 200 back, over a Unix socket to a Python
              thread that answers at once (the machine's floor for a
              blocking Python caller, no HTTP, no XML);
  package:    meterd_client's try_query on one kept-alive connection;
  xmlrpc:     the stock xmlrpc.client over http.client on the same socket.
The meter at SOCKET must be running; the queries are refused (no login),
which costs the meter the same as allowed ones without the cancel.
"""

import os
import socket
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import meterd_client  # noqa: E402


def timed(call, count):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6


def raw_floor(count):
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "echo.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def answer():
        connection, _ = listener.accept()
        with connection:
            while True:
                got = 0
                while got < 300:
                    chunk = connection.recv(300 - got)
                    if not chunk:
                        return
                    got += len(chunk)
                connection.sendall(b"a" * 200)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    caller.connect(path)

    def round_trip():
        caller.sendall(b"q" * 300)
        got = 0
        while got < 200:
            got += len(caller.recv(200 - got))

    result = timed(round_trip, count)
    caller.close()
    thread.join()
    listener.close()
    os.unlink(path)
    os.rmdir(folder)
    return result


def stock_client(path):
    import http.client
    import xmlrpc.client

    class Connection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(path)

    class Transport(xmlrpc.client.Transport):
        def make_connection(self, host):
            if self._connection and host == self._connection[0]:
                return self._connection[1]
            self._connection = host, Connection("meterd")
            return self._connection[1]

    return xmlrpc.client.ServerProxy("http://meterd/RPC2", transport=Transport())


def main(path, count):
    meter = meterd_client.connect(path)
    proxy = stock_client(path)
    meter.try_query("B1-P1")
    proxy.query("B1-P1")
    rows = [
        ("raw", raw_floor(count)),
        ("package", timed(lambda: meter.try_query("B1-P1"), count)),
        ("xmlrpc", timed(lambda: proxy.query("B1-P1"), count)),
        ("raw again", raw_floor(count)),
    ]
    floor = rows[0][1][0]
    for name, (median, p99) in rows:
        print(f"{name}: median {median:.1f} us, p99 {p99:.1f} us, {median / floor:.2f}x the raw floor")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 20000)
