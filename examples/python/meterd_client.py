"""Calls meterd from Python with the stock xmlrpc.client over its Unix socket.

    from meterd_client import connect
    meter = connect()            # $METERD_SOCKET, $XDG_RUNTIME_DIR/meterd.sock or /run/meterd/meterd.sock
    if meter.query("B1-P7"):
        ...                      # the metered work
        meter.commit("B1-P7")

connect() calls only a socket whose owner it trusts (check_owner, as the
Rust client): another local user's socket could answer every query with
true and collect the CIDs of every login.
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
        check_owner(self.socket_path)
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


SYSTEM_SOCKET = "/run/meterd/meterd.sock"


def default_socket():
    """Where meterd listens unless configured otherwise, as meterd decides."""
    if os.environ.get("METERD_SOCKET"):
        return os.environ["METERD_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "meterd.sock")
    return SYSTEM_SOCKET


class UntrustedSocket(ConnectionError):
    """The socket belongs to a user not trusted to be the meter."""


def configured_owner():
    """The uid in $METERD_SOCKET_OWNER (a number or a user name), or None."""
    value = os.environ.get("METERD_SOCKET_OWNER", "").strip()
    if not value:
        return None
    if value.isdigit():
        return int(value)
    import pwd

    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        return None


def _made_by_root_for(directory, owner):
    """True when `directory` is `owner`'s and only root could have made it."""
    directory = os.path.realpath(directory)
    parent = os.path.dirname(directory)
    try:
        of_directory, of_parent = os.stat(directory), os.stat(parent)
    except OSError:
        return False
    return (
        of_directory.st_uid == owner
        and of_directory.st_mode & 0o022 == 0
        and of_parent.st_uid == 0
        and of_parent.st_mode & 0o022 == 0
    )


def check_owner(socket_path):
    """Refuses (UntrustedSocket) a socket whose owner is not this user, root,
    $METERD_SOCKET_OWNER, or the owner of a directory only root could have
    made (the system-wide meter's /run/meterd). An absent socket passes."""
    try:
        owner = os.stat(socket_path).st_uid
    except OSError:
        return
    if owner in (0, os.geteuid(), configured_owner()):
        return
    if _made_by_root_for(os.path.dirname(socket_path) or ".", owner):
        return
    raise UntrustedSocket(
        f"the socket {socket_path} belongs to uid {owner}, not to you (uid {os.geteuid()}), "
        f"root, or METERD_SOCKET_OWNER: another user may have put it there to answer in the "
        f"meter's place; not calling it (if that user runs your meter, set "
        f"METERD_SOCKET_OWNER={owner})"
    )


def connect(socket_path=None):
    socket_path = socket_path or default_socket()
    return xmlrpc.client.ServerProxy("http://meterd/RPC2", transport=UnixTransport(socket_path))
