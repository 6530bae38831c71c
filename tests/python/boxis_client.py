#!/usr/bin/env python3
"""A Boxis API client written from Boxis' public documentation, run
against tollgate's Boxis-compatible door by tests/boxis.rs.

It does only what the documentation says a client does: an
application/x-www-form-urlencoded POST of version, returntype, timestamp
(Unix seconds), username (the account's e-mail), authcode =
md5(timestamp + user_key) in lowercase hex, section=sms and action, and
reads <return><result>/<resulttxt>/<params><credit>/<timestamp> (XML) or
the same keys in JSON.

An authcode is only good once, and it changes only when the timestamp
does, so the client never makes two calls within the same second.

Usage: boxis_client.py URL EMAIL USER_KEY EXPECTED_CREDIT_LIMIT
Exits 0 and prints "N passed, 0 failed" when every check holds.
"""

import hashlib
import json
import sys
import time
import xml.etree.ElementTree as ET

import requests

URL, EMAIL, USER_KEY, EXPECTED_LIMIT = sys.argv[1:5]

_last_timestamp = [0]


def fresh_timestamp():
    """The current Unix second, waiting for the next one if this second's
    authcode was already used."""
    while True:
        now = int(time.time())
        if now > _last_timestamp[0]:
            _last_timestamp[0] = now
            return now
        time.sleep(0.05)


def call(action, returntype="xml", timestamp=None, key=USER_KEY, **params):
    ts = fresh_timestamp() if timestamp is None else timestamp
    authcode = hashlib.md5((str(ts) + key).encode("utf-8")).hexdigest()
    data = {
        "version": "1.0",
        "returntype": returntype,
        "timestamp": str(ts),
        "username": EMAIL,
        "authcode": authcode,
        "section": "sms",
        "action": action,
    }
    data.update(params)
    r = requests.post(URL, data=data, timeout=10)
    r.raise_for_status()
    if returntype == "json":
        return r.json()
    root = ET.fromstring(r.content)
    assert root.tag == "return", root.tag
    out = {
        "result": root.findtext("result"),
        "resulttxt": root.findtext("resulttxt"),
        "timestamp": int(root.findtext("timestamp")),
    }
    credit = root.find("params/credit")
    if credit is not None:
        out["params"] = {"credit": credit.text}
    return out


checks = []


def check(name, condition, detail=""):
    checks.append((name, bool(condition)))
    print(("ok   " if condition else "FAIL ") + name + (" " + str(detail) if detail else ""))


# The documentation's own example: 4 recipients of "test1".
r = call("calculateCredits", recipients_count=4, content="test1", encoding="UTF-8")
check("xml calculateCredits succeeds", r["result"] == "1" and r["resulttxt"] == "success", r)
check("xml calculateCredits credit", r["params"]["credit"] == "4", r)
check("xml timestamp is now", abs(r["timestamp"] - time.time()) < 30, r)

r = call("calculateCredits", returntype="json", recipients_count=4, content="test1",
         encoding="UTF-8")
check("json result is the string 1", r["result"] == "1", r)
check("json credit is a number", r["params"]["credit"] == 4 and not isinstance(
    r["params"]["credit"], str), r)
check("json timestamp is a number", isinstance(r["timestamp"], int), r)

# Fast mode: 1.5 x 1 credit, rounded up to 2 per message.
r = call("calculateCredits", returntype="json", recipients_count=3, content="hello",
         encoding="UTF-8", fast="1")
check("fast mode costs more", r["params"]["credit"] == 6, r)

# Text in ISO-8859-2, encoded by requests from a Python str.
r = call("calculateCredits", returntype="json", recipients_count=1,
         content="árvíztűrő tükörfúrógép".encode("iso-8859-2"), encoding="ISO-8859-2")
check("ISO-8859-2 content is priced", r["result"] == "1" and r["params"]["credit"] == 1, r)

r = call("getCreditLimit", returntype="json")
check("json getCreditLimit", r["result"] == "1" and str(r["params"]["credit"]) == EXPECTED_LIMIT, r)

r = call("getCreditLimit")
check("xml getCreditLimit", r["params"]["credit"] == EXPECTED_LIMIT, r)

# A wrong key, a stale timestamp.
r = call("getCreditLimit", key="not-the-key")
check("wrong key is refused", r["result"] == "0" and r["resulttxt"] == "error: auth_failed", r)
r = call("getCreditLimit", returntype="json", timestamp=int(time.time()) - 3600)
check("stale timestamp is refused",
      r["result"] == "0" and r["resulttxt"] == "error: timestamp_out_of_window", r)
check("stale answer carries the server time", abs(r["timestamp"] - time.time()) < 30, r)
check("stale answer says timestamperror", r.get("timestamperror") == 1, r)

# The documentation's PHP class resynchronises on timestamperror: it calls
# again with the answer's timestamp (a clock an hour slow here).
r = call("getCreditLimit", returntype="json", timestamp=int(time.time()) - 3600)
if r.get("timestamperror"):
    r = call("getCreditLimit", returntype="json", timestamp=r["timestamp"])
check("resynchronised call succeeds", r["result"] == "1", r)

# calculateCredits without content is an error that names the field.
r = call("calculateCredits", returntype="json", recipients_count=1, encoding="UTF-8")
check("missing content is refused",
      r["result"] == "0" and r["resulttxt"] == "error: invalid_request: content is missing", r)

failed = sum(1 for _, ok in checks if not ok)
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
