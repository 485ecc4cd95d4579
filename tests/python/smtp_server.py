"""A real SMTP server for the mail test (aiosmtpd from PyPI).

    python3 smtp_server.py PORT FOLDER USER PASSWORD

Listens on 127.0.0.1:PORT, requires AUTH with USER and PASSWORD (over the
plain connection: the test's relay is on this machine), and saves each
message it takes as FOLDER/N.eml (written to a temporary name first, then
renamed); refuses the recipient bounce@... with 550. Prints "ready" once it listens; stops when its stdin closes.
"""

import os
import sys
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

# AUTH without TLS is what this test wants: the relay is on this machine.
warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")

port, folder, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]


class Save:
    count = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # A mailbox that does not exist, refused for good.
        if address.startswith("bounce@"):
            return "550 5.1.1 No such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        Save.count += 1
        path = os.path.join(folder, f"{Save.count}.eml")
        with open(path + ".part", "wb") as out:
            out.write(b"X-Envelope-From: " + envelope.mail_from.encode() + b"\r\n")
            out.write(b"X-Envelope-To: " + ",".join(envelope.rcpt_tos).encode() + b"\r\n")
            out.write(envelope.original_content)
        os.rename(path + ".part", path)
        return "250 Message accepted for delivery"


def authenticate(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == user.encode()
        and auth_data.password == password.encode()
    )
    # handled=False: a refusal is answered 535 (not a closed connection).
    return AuthResult(success=ok, handled=False)


controller = Controller(
    Save(),
    hostname="127.0.0.1",
    port=port,
    authenticator=authenticate,
    auth_required=True,
    auth_require_tls=False,
)
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
