"""Calls the local superdistribution meter (meterd) over its Unix socket.

    from meterd_client import connect
    meter = connect()
    with meter.use("B1-P7"):       # query; commit at the end, cancel on an exception
        ...                        # the metered work

Speaks HTTP/1.1 and XML-RPC on the socket itself, one kept-alive
connection per `Meter`, standard library only. `query` fails closed: it
answers False whenever the meter cannot say yes. The meter's calls and
faults are in docs/protocol.md of the project.
"""

import contextlib
import os
import socket
import time
import xml.etree.ElementTree as ElementTree

__all__ = [
    "CacheFull",
    "ContextsFull",
    "FramesFull",
    "GrantFailed",
    "Meter",
    "MeterError",
    "MeterFault",
    "MeterStopped",
    "MeterUnavailable",
    "NotGranted",
    "RecordingInDoubt",
    "StorageFailed",
    "UnmatchedCommit",
    "UntrustedSocket",
    "UseRefused",
    "check_owner",
    "connect",
    "default_socket",
]

SYSTEM_SOCKET = "/run/meterd/meterd.sock"
# The most bytes of an answer read: meterd's answers are small (status and
# grant lists are the largest); a peer sending more is not the meter.
ANSWER_BYTES_MAX = 1 << 20
# Seconds a call may wait for its answer; a commit waits for the disk.
TIMEOUT_S = 30.0
# Seconds a call answered from the meter's memory polls for its answer
# before sleeping in `recv`, as the Rust client does: waking a sleeping
# caller costs more than the meter's whole answer (docs/benchmarks.md).
POLL_S = 100e-6
# The calls answered from memory, which poll; commit and flush wait for
# the disk or the network and sleep at once.
POLLED = frozenset(("query", "cancel", "login", "logout", "status"))
# meterd's answers to `true`/`false` calls, byte for byte: read without a
# parser (anything else goes through ElementTree).
_BOOLEAN_ANSWERS = {
    b'<?xml version="1.0"?><methodResponse><params><param><value><boolean>'
    + digit
    + b"</boolean></value></param></params></methodResponse>": digit == b"1"
    for digit in (b"0", b"1")
}


class MeterError(Exception):
    """Anything that kept a call from being answered."""


class MeterUnavailable(MeterError):
    """No meter answered: not running, the socket missing, the connection
    broken, or an answer that is not one."""


class UntrustedSocket(MeterUnavailable):
    """The socket belongs to a user not trusted to be the meter."""


class UseRefused(MeterError):
    """`use(pid)`: the meter answered false to the query; nothing was opened."""


class MeterFault(MeterError):
    """The meter answered with a fault: `code` and `message`."""

    def __init__(self, code, message):
        super().__init__(f"{message} (fault {code})")
        self.code = code
        self.message = message


class CacheFull(MeterFault):
    """101: the meter's cache is full; this reading was not recorded."""


class StorageFailed(MeterFault):
    """102: the meter could not make this reading durable; not recorded."""


class ContextsFull(MeterFault):
    """103: the meter tracks its most open contexts; not recorded."""


class UnmatchedCommit(MeterFault):
    """104: commit without an open query of that PID in this context."""


class FramesFull(MeterFault):
    """105: this context holds its most open logins and queries."""


class NotGranted(MeterFault):
    """106: login of a customer who gave this local user no grant."""


class GrantFailed(MeterFault):
    """107: the grant was not made."""


class MeterStopped(MeterFault):
    """108: the meter's storage failed; nothing is recorded until a restart."""


class RecordingInDoubt(MeterFault):
    """109: the storage failed while recording this reading; it may be recorded."""


FAULTS = {
    101: CacheFull,
    102: StorageFailed,
    103: ContextsFull,
    104: UnmatchedCommit,
    105: FramesFull,
    106: NotGranted,
    107: GrantFailed,
    108: MeterStopped,
    109: RecordingInDoubt,
}


def default_socket():
    """Where meterd listens unless configured otherwise, as meterd decides."""
    if os.environ.get("METERD_SOCKET"):
        return os.environ["METERD_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "meterd.sock")
    return SYSTEM_SOCKET


def _configured_owner():
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
    """Raises UntrustedSocket for a socket whose owner is not this user,
    root, $METERD_SOCKET_OWNER, or the owner of a folder only root could
    have made (the system-wide meter's /run/meterd): another local user's
    socket could answer every query with true and collect every login."""
    try:
        owner = os.stat(socket_path).st_uid
    except OSError:
        return
    if owner in (0, os.geteuid(), _configured_owner()):
        return
    if _made_by_root_for(os.path.dirname(socket_path) or ".", owner):
        return
    raise UntrustedSocket(
        f"the socket {socket_path} belongs to uid {owner}, not to you (uid {os.geteuid()}), "
        f"root, or METERD_SOCKET_OWNER: another user may have put it there to answer in the "
        f"meter's place; not calling it (if that user runs your meter, set "
        f"METERD_SOCKET_OWNER={owner})"
    )


def _escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _param(value):
    if isinstance(value, bool):
        return f"<boolean>{int(value)}</boolean>"
    if isinstance(value, int):
        return f"<int>{value}</int>"
    if isinstance(value, str):
        return f"<string>{_escape(value)}</string>"
    raise TypeError(f"a meter call takes strings, booleans and integers, not {type(value).__name__}")


def _call_body(method, params):
    values = "".join(f"<param><value>{_param(param)}</value></param>" for param in params)
    return (
        f"<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName>"
        f"<params>{values}</params></methodCall>"
    ).encode()


def _value(element):
    """The Python value of an XML-RPC <value> element."""
    children = list(element)
    if not children:
        return element.text or ""
    typed = children[0]
    kind = typed.tag
    if kind == "boolean":
        return (typed.text or "").strip() == "1"
    if kind in ("int", "i4", "i8"):
        return int((typed.text or "").strip())
    if kind == "string":
        return typed.text or ""
    if kind == "double":
        return float((typed.text or "").strip())
    if kind == "nil":
        return None
    if kind == "struct":
        return {
            member.findtext("name"): _value(member.find("value"))
            for member in typed.findall("member")
        }
    if kind == "array":
        return [_value(value) for value in typed.findall("data/value")]
    return typed.text or ""


def _answer(body):
    """The result of a methodResponse, or the MeterFault it carries."""
    known = _BOOLEAN_ANSWERS.get(body)
    if known is not None:
        return known
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as error:
        raise MeterUnavailable(f"the meter's answer is not XML: {error}") from None
    fault = root.find("fault/value")
    if fault is not None:
        detail = _value(fault)
        if not isinstance(detail, dict):
            raise MeterUnavailable("the meter's fault is not a struct")
        code = detail.get("faultCode")
        message = detail.get("faultString", "")
        raise FAULTS.get(code, MeterFault)(code, message)
    value = root.find("params/param/value")
    if value is None:
        raise MeterUnavailable("the meter's answer holds no value")
    return _value(value)


class Meter:
    """One kept-alive connection to meterd; for one thread at a time."""

    def __init__(self, socket_path=None, timeout=TIMEOUT_S):
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout
        self._sock = None
        self._buffer = b""

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Cox's calls.

    def login(self, cid, context=None):
        """Uses in this context are charged to `cid` until `logout`."""
        self._call("login", cid, context)

    def logout(self, cid, context=None):
        """Ends the login of `cid`; True when one was open."""
        return self._call("logout", cid, context) is True

    def query(self, pid, context=None):
        """May a use of `pid` begin? False whenever the meter cannot say yes
        (fail closed). Prefer `use`, which never leaves a query open."""
        try:
            return self.try_query(pid, context)
        except MeterError:
            return False

    def try_query(self, pid, context=None):
        """`query`, raising the reason when the meter did not answer."""
        return self._call("query", pid, context) is True

    def commit(self, pid, context=None):
        """The use happened; returns once it is on the meter's disk."""
        self._call("commit", pid, context)

    def cancel(self, pid, context=None):
        """Closes an open query without a use; True when one was open."""
        return self._call("cancel", pid, context) is True

    def flush(self):
        """Uploads now; True when the upload succeeded."""
        return self._call("flush") is True

    def status(self):
        """The meter's state: pending readings, last upload, ..."""
        return self._call("status")

    def call(self, method, *params):
        """Any meter call by name (the grant calls: `call("grant.list")`),
        with string, boolean and integer parameters; its answer as Python
        values (struct: dict, array: list)."""
        return self._call(method, *params)

    @contextlib.contextmanager
    def use(self, pid, context=None):
        """One use of `pid`: queried now (UseRefused when the answer is
        false or none), committed when the block ends, cancelled when it
        raises (and not charged)."""
        if not self.try_query(pid, context):
            raise UseRefused(f"the meter does not allow a use of {pid} now")
        try:
            yield
        except BaseException:
            with contextlib.suppress(MeterError):
                self.cancel(pid, context)
            raise
        self.commit(pid, context)

    # The wire.

    def _call(self, method, *params):
        body = _call_body(method, [param for param in params if param is not None])
        request = (
            b"POST /RPC2 HTTP/1.1\r\nHost: meterd\r\nContent-Type: text/xml\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        reused = self._sock is not None
        poll = method in POLLED
        try:
            return _answer(self._exchange(request, poll))
        except _ClosedBeforeAnswer:
            self.close()
            if not reused:
                raise MeterUnavailable("the meter closed the connection without an answer") from None
        # The kept-alive connection was closed by the meter before it read
        # this request (it answers every request it reads): send it again,
        # once, on a new connection.
        try:
            return _answer(self._exchange(request, poll))
        except _ClosedBeforeAnswer:
            self.close()
            raise MeterUnavailable("the meter closed the connection without an answer") from None

    def _connect(self):
        check_owner(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as error:
            sock.close()
            raise MeterUnavailable(f"no meter at {self.socket_path}: {error}") from None
        self._sock = sock
        self._buffer = b""

    def _exchange(self, request, poll):
        if self._sock is None:
            self._connect()
        try:
            self._sock.sendall(request)
            if poll:
                self._poll()
            return self._read_answer()
        except _ClosedBeforeAnswer:
            raise
        except (OSError, ValueError) as error:
            self.close()
            raise MeterUnavailable(f"the meter did not answer: {error}") from None
        except MeterUnavailable:
            self.close()
            raise

    def _poll(self):
        """Reads what the meter answers within POLL_S without sleeping."""
        sock = self._sock
        sock.setblocking(False)
        try:
            deadline = time.perf_counter() + POLL_S
            while True:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    if time.perf_counter() >= deadline:
                        return
                    continue
                if chunk:
                    self._buffer += chunk
                # An answer begun (or the connection closed): the rest
                # follows in `_read_answer`.
                return
        finally:
            sock.settimeout(self.timeout)

    def _receive(self):
        chunk = self._sock.recv(65536)
        if not chunk:
            return False
        self._buffer += chunk
        if len(self._buffer) > ANSWER_BYTES_MAX + 16384:
            raise MeterUnavailable("the meter's answer is too large")
        return True

    def _read_answer(self):
        while b"\r\n\r\n" not in self._buffer:
            if not self._receive():
                if self._buffer:
                    raise MeterUnavailable("the meter's answer ended in its head")
                raise _ClosedBeforeAnswer()
            if len(self._buffer) > 16384 and b"\r\n\r\n" not in self._buffer:
                raise MeterUnavailable("the meter's answer head is too long")
        head, _, rest = self._buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/1."):
            raise MeterUnavailable(f"not an HTTP answer: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, rest = self._read_chunked(rest)
        else:
            try:
                length = int(headers.get("content-length", ""))
            except ValueError:
                raise MeterUnavailable("the meter's answer has no length") from None
            if length < 0 or length > ANSWER_BYTES_MAX:
                raise MeterUnavailable("the meter's answer is too large")
            self._buffer = rest
            while len(self._buffer) < length:
                if not self._receive():
                    raise MeterUnavailable("the meter's answer ended early")
            body, rest = self._buffer[:length], self._buffer[length:]
        self._buffer = rest
        if headers.get("connection", "").lower() == "close":
            self.close()
        if status[1] != "200":
            raise MeterUnavailable(f"the meter answered HTTP {status[1]}")
        return body

    def _read_chunked(self, rest):
        self._buffer = rest
        body = b""
        while True:
            while b"\r\n" not in self._buffer:
                if not self._receive():
                    raise MeterUnavailable("the meter's answer ended early")
            size_line, _, self._buffer = self._buffer.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                raise MeterUnavailable("the meter's answer has a bad chunk") from None
            if size == 0:
                while b"\r\n" not in self._buffer:
                    if not self._receive():
                        raise MeterUnavailable("the meter's answer ended early")
                _, _, self._buffer = self._buffer.partition(b"\r\n")
                return body, self._buffer
            if len(body) + size > ANSWER_BYTES_MAX:
                raise MeterUnavailable("the meter's answer is too large")
            while len(self._buffer) < size + 2:
                if not self._receive():
                    raise MeterUnavailable("the meter's answer ended early")
            body += self._buffer[:size]
            self._buffer = self._buffer[size + 2 :]


class _ClosedBeforeAnswer(Exception):
    """The connection ended before any byte of an answer."""


def connect(socket_path=None, timeout=TIMEOUT_S):
    """A Meter on `socket_path` (default: `default_socket()`). Connects on the
    first call, checking the socket's owner first."""
    return Meter(socket_path, timeout)
