"""A small metered program: an editor with a metered spell checker inside.

usage: python3 examples/python/editor.py PRODUCT COMPONENT [USES]

Uses PRODUCT USES times (default 3); every use runs one use of COMPONENT
inside it, which the meter charges to PRODUCT's owner, not to whoever uses
the editor. The user is whoever the calling shell logged in
(`meterd login CID`). Exits 1 when the meter refuses a use.
"""

import os
import sys

try:
    from meterd_client import connect  # pip install ./clients/python
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../clients/python/src"))
    from meterd_client import connect


def main(product, component, uses):
    meter = connect()
    for n in range(uses):
        if not meter.query(product):
            raise SystemExit(f"use {n + 1}: the meter refused {product} (no login, denied or no funds)")
        # The spell checker runs inside the editor's use.
        if not meter.query(component):
            meter.cancel(product)
            raise SystemExit(f"use {n + 1}: the meter refused {component} for {product}'s owner")
        meter.commit(component)
        meter.commit(product)
    print(f"used {product} {uses} times, with {component} inside each use")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 3)
