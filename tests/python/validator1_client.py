"""Drives the validator1 suite with Python's stock xmlrpc.client.

usage: python3 validator1_client.py URL

Every call is checked against an answer computed here; any mismatch or
unexpected fault exits non-zero. Also checks that bad calls come back as
faults and that the server keeps answering after them.
"""

import base64
import datetime
import random
import sys
import xmlrpc.client


def check(label, got, want):
    if got != want:
        raise SystemExit(f"{label}: got {got!r}, want {want!r}")


def expect_fault(label, call):
    try:
        call()
    except xmlrpc.client.Fault as fault:
        if not isinstance(fault.faultCode, int) or not fault.faultString:
            raise SystemExit(f"{label}: malformed fault {fault!r}")
        return fault.faultCode
    raise SystemExit(f"{label}: expected a fault")


def stooges(rng):
    return {name: rng.randint(-1000, 1000) for name in ("moe", "larry", "curly")}


def main(url):
    rng = random.Random(1998)
    server = xmlrpc.client.ServerProxy(url, use_builtin_types=True)
    checks = 0

    structs = [stooges(rng) for _ in range(rng.randint(5, 50))]
    check("arrayOfStructsTest", server.validator1.arrayOfStructsTest(structs), sum(s["curly"] for s in structs))
    check("arrayOfStructsTest known", server.validator1.arrayOfStructsTest(
        [{"moe": 1, "larry": 2, "curly": 3}, {"moe": -98, "larry": 23, "curly": -6}]), -3)
    checks += 2

    for text in ["<\"\"><&><'><", "foo <<< bar '> && '' #fo>o \" bar", "plain", "\u00e9\u4e2d<&>"]:
        want = {
            "ctLeftAngleBrackets": text.count("<"),
            "ctRightAngleBrackets": text.count(">"),
            "ctAmpersands": text.count("&"),
            "ctApostrophes": text.count("'"),
            "ctQuotes": text.count('"'),
        }
        check("countTheEntities", server.validator1.countTheEntities(text), want)
        checks += 1

    s = stooges(rng)
    check("easyStructTest", server.validator1.easyStructTest(s), s["moe"] + s["larry"] + s["curly"])
    checks += 1

    nested = {f"sub{i}": {"a": i, "b": f"text {i} <&>", "c": [i, str(i), True]} for i in range(5)}
    check("echoStructTest", server.validator1.echoStructTest(nested), nested)
    checks += 1

    when = datetime.datetime(1998, 7, 17, 14, 8, 55)
    blob = bytes(range(256))
    many = server.validator1.manyTypesTest(42, True, "string <&>", -12.53, when, blob)
    check("manyTypesTest", many, [42, True, "string <&>", -12.53, when, blob])
    checks += 1

    words = [f"word{rng.randint(0, 10**6)}" for _ in range(rng.randint(100, 200))]
    check("moderateSizeArrayCheck", server.validator1.moderateSizeArrayCheck(words), words[0] + words[-1])
    checks += 1

    calendar = {}
    for year in range(1999, 2002):
        months = {}
        for month in range(1, 13):
            days = {f"{day:02d}": stooges(rng) for day in range(1, 29)}
            months[f"{month:02d}"] = days
        calendar[str(year)] = months
    day = calendar["2000"]["04"]["01"]
    check("nestedStructTest", server.validator1.nestedStructTest(calendar), day["moe"] + day["larry"] + day["curly"])
    checks += 1

    n = rng.randint(-1000, 1000)
    check("simpleStructReturnTest", server.validator1.simpleStructReturnTest(n),
          {"times10": n * 10, "times100": n * 100, "times1000": n * 1000})
    checks += 1

    methods = server.system.listMethods()
    check("listMethods", "validator1.manyTypesTest" in methods, True)
    multi = xmlrpc.client.MultiCall(server)
    multi.validator1.simpleStructReturnTest(2)
    multi.validator1.easyStructTest({"moe": 1, "larry": 2, "curly": 3})
    check("multicall", list(multi()), [{"times10": 20, "times100": 200, "times1000": 2000}, 6])
    checks += 2

    check("unknown method", expect_fault("unknown", lambda: server.no.such.method()), -32601)
    check("wrong type", expect_fault("type", lambda: server.validator1.simpleStructReturnTest("x")), -32602)
    check("wrong arity", expect_fault("arity", lambda: server.validator1.easyStructTest()), -32602)
    checks += 3

    # Still serving after faults.
    check("after faults", server.validator1.simpleStructReturnTest(1)["times10"], 10)
    checks += 1
    print(f"ok: {checks} checks against {url}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
