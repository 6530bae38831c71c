#!/usr/bin/env python3
"""A stock SOAP client (zeep, from PyPI) against tollgate's 2sms-compatible
door, run by tests/soap.rs.

It loads the WSDL from ?WSDL, calls GetBalance and SubAccountGiveCredit over
the SOAP 1.1 port (the default) and the SOAP 1.2 port
(Client.bind("Account", "AccountSoap12")), and checks the values and the
transport each binding used.

Usage: zeep_client.py WSDL_URL MASTER PASSWORD SUB OTHER_SUB
where MASTER starts with 100 any-time and 50 off-peak credits, SUB (a
sub-account of MASTER) with nothing, and OTHER_SUB belongs to someone else.
Exits 0 and prints "N passed, 0 failed" when every check holds.
"""

import sys
from decimal import Decimal

import zeep
from zeep.plugins import HistoryPlugin

WSDL, MASTER, PASSWORD, SUB, OTHER_SUB = sys.argv[1:6]

history = HistoryPlugin()
client = zeep.Client(WSDL, plugins=[history])
soap11 = client.service
soap12 = client.bind("Account", "AccountSoap12")

checks = []


def check(name, condition, detail=""):
    checks.append((name, bool(condition)))
    print(("ok   " if condition else "FAIL ") + name + (" " + str(detail) if detail else ""))


def sent_content_type():
    headers = history.last_sent["http_headers"]
    return headers.get("Content-Type", "")


# SOAP 1.1: GetBalance.
r = soap11.GetBalance(Username=MASTER, Password=PASSWORD)
check("1.1 GetBalance ok", r.GetBalanceResult is True and r.Code == 0, r)
check("1.1 GetBalance balances",
      r.AnyTimeBalance == Decimal("100") and r.OffPeakBalance == Decimal("50"), r)
check("1.1 sent text/xml", sent_content_type().startswith("text/xml"), sent_content_type())
check("1.1 sent SOAPAction",
      history.last_sent["http_headers"].get("SOAPAction", "").strip('"')
      == "http://www.2sms.com/WebServices/2.2/Simple/GetBalance",
      history.last_sent["http_headers"])

# SOAP 1.1: give decimals to the sub-account.
r = soap11.SubAccountGiveCredit(Username=MASTER, Password=PASSWORD, SubAccount=SUB,
                                AnyTimeBalance=Decimal("10.5"), OffPeakBalance=Decimal("2.25"))
check("1.1 give ok", r.SubAccountGiveCreditResult is True and r.Code == 0, r)
check("1.1 give parent balances",
      r.ParentAnyTimeBalance == Decimal("89.5") and r.ParentOffPeakBalance == Decimal("47.75"), r)
check("1.1 give sub balances",
      r.SubAnyTimeBalance == Decimal("10.5") and r.SubOffPeakBalance == Decimal("2.25"), r)
check("1.1 give result text",
      r.ResultText == f"Credits successfully exchanged between {MASTER} (master account) "
                      f"and {SUB} (sub account).", r.ResultText)

# SOAP 1.2: move some back (negative amounts), then read the balance.
r = soap12.SubAccountGiveCredit(Username=MASTER, Password=PASSWORD, SubAccount=SUB,
                                AnyTimeBalance=Decimal("-0.5"), OffPeakBalance=Decimal("-2.25"))
check("1.2 give back ok", r.SubAccountGiveCreditResult is True and r.Code == 0, r)
check("1.2 give back balances",
      r.ParentAnyTimeBalance == Decimal("90") and r.ParentOffPeakBalance == Decimal("50")
      and r.SubAnyTimeBalance == Decimal("10") and r.SubOffPeakBalance == Decimal("0"), r)
check("1.2 sent application/soap+xml",
      sent_content_type().startswith("application/soap+xml"), sent_content_type())
check("1.2 sent the action parameter",
      "SubAccountGiveCredit" in sent_content_type(), sent_content_type())

r = soap12.GetBalance(Username=SUB, Password=PASSWORD)
check("1.2 GetBalance of the sub-account",
      r.GetBalanceResult is True and r.AnyTimeBalance == Decimal("10")
      and r.OffPeakBalance == Decimal("0"), r)

# Failures are answers with a Code, not faults, and change nothing.
r = soap12.SubAccountGiveCredit(Username=MASTER, Password=PASSWORD, SubAccount=SUB,
                                AnyTimeBalance=Decimal("1000"), OffPeakBalance=Decimal("0"))
check("insufficient credit", r.SubAccountGiveCreditResult is False and r.Code == 1001, r)
r = soap11.SubAccountGiveCredit(Username=MASTER, Password=PASSWORD, SubAccount=OTHER_SUB,
                                AnyTimeBalance=Decimal("1"), OffPeakBalance=Decimal("0"))
check("not a sub-account", r.SubAccountGiveCreditResult is False and r.Code == 1007, r)
r = soap11.GetBalance(Username=MASTER, Password="wrong-password")
check("wrong password", r.GetBalanceResult is False and r.Code == 1003, r)
r = soap11.GetBalance(Username=MASTER, Password=PASSWORD)
check("balances unchanged by failures",
      r.AnyTimeBalance == Decimal("90") and r.OffPeakBalance == Decimal("50"), r)

# A malformed envelope, sent through zeep's own transport, is a SOAP Fault.
try:
    soap11_raw = client.transport.post(
        WSDL.split("?")[0], "<not-soap/>", {"Content-Type": "text/xml; charset=utf-8"})
    check("malformed envelope is HTTP 500", soap11_raw.status_code == 500, soap11_raw.status_code)
    check("malformed envelope is a Fault", b"Fault" in soap11_raw.content, soap11_raw.content)
except Exception as e:  # pragma: no cover - reported as a failed check
    check("malformed envelope request", False, repr(e))

failed = sum(1 for _, ok in checks if not ok)
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
