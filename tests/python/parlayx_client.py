"""A Parlay X Payment client as integrators write one: Python's zeep loads
the WSDL the backoffice serves and calls it with a WS-Security
UsernameToken (password digest). Used by tests/it/parlayx.rs.

Usage: parlayx_client.py BASE_URL USERNAME PASSWORD SCENARIO ARGS...

Prints one JSON object per call: {"call": name, "ok": result} or
{"call": name, "fault": {"code": ..., "messageId": ..., "variables": [...]}}.
"""

import json
import sys
from decimal import Decimal

import zeep
from zeep.exceptions import Fault
from zeep.wsse.username import UsernameToken

BASE, USER, PASSWORD, SCENARIO, *ARGS = sys.argv[1:]
COMMON = "http://www.csapi.org/schema/parlayx/common/v2_1"


def client(interface):
    wsdl = f"{BASE}/{interface}Service/services/{interface}?wsdl"
    # A fresh nonce and creation time for every call.
    return zeep.Client(wsdl, wsse=UsernameToken(USER, PASSWORD, use_digest=True))


def report(name, call):
    try:
        result = call()
        print(json.dumps({"call": name, "ok": None if result is None else str(result)}))
    except Fault as fault:
        detail = {}
        if fault.detail is not None:
            for exception in fault.detail:
                detail["kind"] = exception.tag.split("}")[-1]
                detail["messageId"] = exception.findtext("messageId")
                detail["variables"] = [v.text for v in exception.findall("variables")]
        print(json.dumps({"call": name, "fault": {"code": fault.code, **detail}}))
    sys.stdout.flush()


def charge(amount, description="Ring tone", currency="EUR"):
    return {"description": description, "currency": currency, "amount": Decimal(amount)}


if SCENARIO == "amounts":
    payer, stranger = ARGS
    amounts = client("AmountCharging").service
    report("charge", lambda: amounts.chargeAmount(f"mailto:{payer}", charge("1.25"), "r-1"))
    report("charge again", lambda: amounts.chargeAmount(f"mailto:{payer}", charge("1.25"), "r-1"))
    report("charge other", lambda: amounts.chargeAmount(f"mailto:{payer}", charge("2"), "r-1"))
    report("stranger", lambda: amounts.chargeAmount(f"mailto:{stranger}", charge("1"), "r-9"))
    report("nobody", lambda: amounts.chargeAmount("mailto:nobody@example.org", charge("1"), "r-11"))
    report("refund stranger", lambda: amounts.refundAmount(f"mailto:{stranger}", charge("0.5"), "r-12"))
    report("refund nobody", lambda: amounts.refundAmount("mailto:nobody@example.org", charge("0.5"), "r-13"))
    report("dollars", lambda: amounts.chargeAmount(f"mailto:{payer}", charge("1", currency="USD"), "r-8"))
    report("too much", lambda: amounts.chargeAmount(f"mailto:{payer}", charge("5.01"), "r-7"))
    report("no amount", lambda: amounts.chargeAmount(f"mailto:{payer}", {"description": "x"}, "r-6"))
    report("refund", lambda: amounts.refundAmount(f"mailto:{payer}", charge("0.25", "Goodwill"), "r-2"))
    report(
        "split with stranger",
        lambda: amounts.chargeSplitAmount(
            [
                {"endUserIdentifier": f"mailto:{payer}", "percent": Decimal(60)},
                {"endUserIdentifier": f"mailto:{stranger}", "percent": Decimal(40)},
            ],
            charge("1"),
            "r-5",
        ),
    )
    reserve = client("ReserveAmountCharging").service
    report("reserve", lambda: reserve.reserveAmount(f"mailto:{payer}", charge("3", "Match")))
    report("reserve more", lambda: reserve.reserveAdditionalAmount("H0", charge("1", "Extra time")))
    report("charge part", lambda: reserve.chargeReservation("H0", charge("2.5", "First half"), "r-3"))
    report("charge beyond", lambda: reserve.chargeReservation("H0", charge("2", "Second half"), "r-4"))
    report("charge rest", lambda: reserve.chargeReservation("H0", charge("1.5", "Second half"), "r-4"))
    report("release", lambda: reserve.releaseReservation("H0"))
    report("release again", lambda: reserve.releaseReservation("H0"))
    report("charge released", lambda: reserve.chargeReservation("H0", charge("1", "After"), "r-10"))
    report("reserve too much", lambda: reserve.reserveAmount(f"mailto:{payer}", charge("5.5")))
    report("unknown reservation", lambda: reserve.releaseReservation("H99"))
elif SCENARIO == "volumes":
    (payer, pid) = ARGS
    mb = [{"name": "unit", "value": "MB"}]
    volumes = client("VolumeCharging").service
    report("price", lambda: volumes.getAmount(f"mailto:{payer}", 500, mb).amount)
    report("charge", lambda: volumes.chargeVolume(f"mailto:{payer}", 1000, "Download", "v-1", mb))
    report("charge again", lambda: volumes.chargeVolume(f"mailto:{payer}", 1000, "Download", "v-1", mb))
    report(
        "unknown unit",
        lambda: volumes.chargeVolume(
            f"mailto:{payer}", 1, "x", "v-9", [{"name": "unit", "value": "parsec"}]
        ),
    )
    report(
        "unknown parameter",
        lambda: volumes.chargeVolume(
            f"mailto:{payer}", 1, "x", "v-8", [{"name": "colour", "value": "red"}]
        ),
    )
    report("too much", lambda: volumes.chargeVolume(f"mailto:{payer}", 3000, "x", "v-7", mb))
    report("refund", lambda: volumes.refundVolume(f"mailto:{payer}", 250, "Partial", "v-2", mb))
    reserve = client("ReserveVolumeCharging").service
    report("reserve", lambda: reserve.reserveVolume(f"mailto:{payer}", 1000, "Stream", mb))
    report("reserve more", lambda: reserve.reserveAdditionalVolume("H0", 500, "More"))
    report("charge part", lambda: reserve.chargeReservation("H0", 750, None, "v-3"))
    report("charge beyond", lambda: reserve.chargeReservation("H0", 1000, "Rest", "v-4"))
    report("release", lambda: reserve.releaseReservation("H0"))
    amounts = client("AmountCharging").service
    report(
        "by code",
        lambda: amounts.chargeAmount(f"mailto:{payer}", {"description": "A call", "code": pid}, "c-1"),
    )
    report(
        "by other code",
        lambda: amounts.chargeAmount(f"mailto:{payer}", {"description": "A call", "code": "B1-P99"}, "c-2"),
    )
elif SCENARIO == "evidence":
    (payer, batch) = ARGS
    amounts = client("AmountCharging").service
    user = f"mailto:{payer}"
    report("with evidence", lambda: amounts.chargeAmount(user, charge("1"), "e-1", [f"{batch}:1"]))
    report("again", lambda: amounts.chargeAmount(user, charge("1"), "e-1", [f"{batch}:1"]))
    report("used", lambda: amounts.chargeAmount(user, charge("1"), "e-2", [f"{batch}:01"]))
    report("missing", lambda: amounts.chargeAmount(user, charge("1"), "e-3", [f"{batch}:9"]))
    report("malformed", lambda: amounts.chargeAmount(user, charge("1"), "e-4", ["nothing"]))
    report("twice in one", lambda: amounts.chargeAmount(user, charge("1"), "e-5", [f"{batch}:2", f"{batch}:2"]))
    report("too many", lambda: amounts.chargeAmount(user, charge("1"), "e-6", [f"{batch}:2"] * 17))
    report("two", lambda: amounts.chargeAmount(user, charge("1"), "e-7", [f"{batch}:2", f"{batch}:3"]))
elif SCENARIO == "expiry-before":
    (payer,) = ARGS
    reserve = client("ReserveAmountCharging").service
    report("first", lambda: reserve.reserveAmount(f"mailto:{payer}", charge("5", "Match")))
    report("second", lambda: reserve.reserveAmount(f"mailto:{payer}", charge("5", "Match")))
    report("beyond balance", lambda: reserve.reserveAmount(f"mailto:{payer}", charge("0.01", "Match")))
elif SCENARIO == "expiry-after":
    (payer,) = ARGS
    reserve = client("ReserveAmountCharging").service
    report("charge expired", lambda: reserve.chargeReservation("H0", charge("1", "Late"), "x-1"))
    report("again", lambda: reserve.reserveAmount(f"mailto:{payer}", charge("5", "Match")))
else:
    sys.exit(f"unknown scenario {SCENARIO}")
