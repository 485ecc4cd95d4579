"""Calls meterd from Python with the stock xmlrpc.client over its Unix socket.

    from meterd_client import connect
    meter = connect()            # $METERD_SOCKET, $XDG_RUNTIME_DIR/meterd.sock or /tmp/meterd.sock
    if meter.query("B1-P7"):
        ...                      # the metered work
        meter.commit("B1-P7")
"""

import http.client
import os
import socket
import xmlrpc.client


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path):
        super().__init__("meterd")
        self.socket_path = socket_path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


class UnixTransport(xmlrpc.client.Transport):
    """xmlrpc.client's transport, connecting to a Unix socket instead of TCP."""

    def __init__(self, socket_path):
        super().__init__()
        self.socket_path = socket_path

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        self._connection = host, UnixConnection(self.socket_path)
        return self._connection[1]


def default_socket():
    """Where meterd listens unless configured otherwise, as meterd decides."""
    if os.environ.get("METERD_SOCKET"):
        return os.environ["METERD_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "meterd.sock")
    return "/tmp/meterd.sock"


def connect(socket_path=None):
    socket_path = socket_path or default_socket()
    return xmlrpc.client.ServerProxy("http://meterd/RPC2", transport=UnixTransport(socket_path))
