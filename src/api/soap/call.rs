//! The 2sms operations tollgate serves (SPEC 2.2), read from a parsed
//! [`Envelope`] into typed calls.
//!
//! An operation tollgate does not know, or one outside the 2sms namespace,
//! is a [`CallError::UnknownOperation`] (a SOAP Fault). A known operation
//! with bad parameters is a [`CallError::InvalidParams`]: it is answered
//! with the operation's own response carrying `invalid_request`, so a
//! client sees a `Code` rather than a transport error.
//!
//! Amounts are `xs:decimal` text read exactly into milli-credits: more than 3
//! significant decimals is an error, never a rounding; zeros past the third
//! decimal (`10.0000`, as .NET writes decimals of scale 4) are exact and
//! accepted. An absent amount is 0, as for the value-typed ASMX original.
//! The output-only elements of the original (`ParentAnyTimeBalance`,
//! `ResultText`, `Code`, …) may be sent and are ignored.

use std::fmt;

use super::envelope::{Envelope, SoapVersion};
use crate::money::{parse_credits, AmountError};

/// The 2sms "Simple" web service namespace.
pub const SERVICE_NS: &str = "http://www.2sms.com/WebServices/2.2/Simple/";
/// Longest `Username`, `Password` or `SubAccount` accepted.
pub const CREDENTIAL_MAX_LEN: usize = 256;
/// Longest amount text accepted (before trailing zeros are dropped).
const AMOUNT_TEXT_MAX_LEN: usize = 64;

/// The operations of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperationName {
    GetBalance,
    SubAccountGiveCredit,
}

impl OperationName {
    pub const ALL: [OperationName; 2] = [
        OperationName::GetBalance,
        OperationName::SubAccountGiveCredit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OperationName::GetBalance => "GetBalance",
            OperationName::SubAccountGiveCredit => "SubAccountGiveCredit",
        }
    }

    /// A bounded lower-case label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            OperationName::GetBalance => "getbalance",
            OperationName::SubAccountGiveCredit => "subaccountgivecredit",
        }
    }

    /// The `SOAPAction` (1.1) / `action` (1.2) of the operation.
    pub fn action_uri(self) -> String {
        format!("{SERVICE_NS}{}", self.as_str())
    }

    pub fn from_local_name(name: &str) -> Option<OperationName> {
        OperationName::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

/// `Username` and `Password`; the password never reaches `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SoapCredentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for SoapCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoapCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    GetBalance {
        credentials: SoapCredentials,
    },
    /// Move credit from the caller to its sub-account (negative: back).
    SubAccountGiveCredit {
        credentials: SoapCredentials,
        sub_account: String,
        anytime_milli: i64,
        offpeak_milli: i64,
    },
}

impl Call {
    pub fn operation(&self) -> OperationName {
        match self {
            Call::GetBalance { .. } => OperationName::GetBalance,
            Call::SubAccountGiveCredit { .. } => OperationName::SubAccountGiveCredit,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Not an operation of this service: a Client/Sender fault.
    UnknownOperation(String),
    /// A known operation with bad parameters: its response with
    /// `invalid_request`. `reason` names parameters, never values.
    InvalidParams {
        operation: OperationName,
        reason: String,
    },
}

/// Reads the typed call out of an envelope.
pub fn call_from_envelope(envelope: &Envelope) -> Result<Call, CallError> {
    let operation = match (
        envelope.operation_ns.as_deref(),
        OperationName::from_local_name(&envelope.operation),
    ) {
        (Some(SERVICE_NS), Some(op)) => op,
        _ => {
            return Err(CallError::UnknownOperation(format!(
                "{{{}}}{}",
                envelope.operation_ns.as_deref().unwrap_or(""),
                envelope.operation
            )))
        }
    };
    let invalid = |reason: String| CallError::InvalidParams { operation, reason };
    let text = |name: &str| -> Result<String, CallError> {
        match envelope.param(name) {
            None => Err(invalid(format!("{name} is missing"))),
            Some("") => Err(invalid(format!("{name} is empty"))),
            Some(v) if v.len() > CREDENTIAL_MAX_LEN => Err(invalid(format!("{name} is too long"))),
            Some(v) => Ok(v.to_string()),
        }
    };
    let credentials = SoapCredentials {
        username: text("Username")?,
        password: text("Password")?,
    };
    match operation {
        OperationName::GetBalance => Ok(Call::GetBalance { credentials }),
        OperationName::SubAccountGiveCredit => {
            let amount = |name: &str| -> Result<i64, CallError> {
                match envelope.param(name) {
                    None => Ok(0),
                    Some(v) => parse_decimal_milli(v).map_err(|e| invalid(format!("{name}: {e}"))),
                }
            };
            Ok(Call::SubAccountGiveCredit {
                sub_account: text("SubAccount")?,
                anytime_milli: amount("AnyTimeBalance")?,
                offpeak_milli: amount("OffPeakBalance")?,
                credentials,
            })
        }
    }
}

/// Reads `xs:decimal` text into milli-credits, exactly: at most 3
/// significant decimals; zeros beyond them are dropped (they change nothing).
pub fn parse_decimal_milli(text: &str) -> Result<i64, AmountError> {
    let t = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'));
    if t.len() > AMOUNT_TEXT_MAX_LEN {
        return Err(AmountError::TooLong);
    }
    match t.split_once('.') {
        Some((whole, frac)) if frac.len() > 3 => {
            let significant = frac.trim_end_matches('0');
            if significant.len() > 3 {
                return Err(AmountError::TooPrecise(t.to_string()));
            }
            parse_credits(&format!("{whole}.{significant}"))
        }
        _ => parse_credits(t),
    }
}

/// Checks the declared action (`SOAPAction` header for 1.1, the `action`
/// media-type parameter for 1.2) against the operation in the Body. An
/// absent or empty action is allowed: the Body says what is called.
pub fn check_action(
    version: SoapVersion,
    declared: Option<&str>,
    operation: OperationName,
) -> Result<(), String> {
    let Some(declared) = declared.map(|a| a.trim().trim_matches('"')) else {
        return Ok(());
    };
    if declared.is_empty() || declared == operation.action_uri() {
        return Ok(());
    }
    let header = match version {
        SoapVersion::V11 => "SOAPAction",
        SoapVersion::V12 => "action",
    };
    Err(format!(
        "{header} does not match the operation {} in the Body",
        operation.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(op: &str, ns: Option<&str>, params: &[(&str, &str)]) -> Envelope {
        Envelope {
            version: SoapVersion::V11,
            operation_ns: ns.map(str::to_string),
            operation: op.to_string(),
            params: params
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn reads_both_operations() {
        let e = envelope(
            "SubAccountGiveCredit",
            Some(SERVICE_NS),
            &[
                ("Username", "boss"),
                ("Password", "pw"),
                ("SubAccount", "kid"),
                ("AnyTimeBalance", "-2.5"),
                ("ParentAnyTimeBalance", "ignored"),
            ],
        );
        let call = call_from_envelope(&e).unwrap();
        assert_eq!(
            call,
            Call::SubAccountGiveCredit {
                credentials: SoapCredentials {
                    username: "boss".into(),
                    password: "pw".into()
                },
                sub_account: "kid".into(),
                anytime_milli: -2500,
                offpeak_milli: 0,
            }
        );
        assert!(!format!("{call:?}").contains("pw\""));
        let e = envelope(
            "GetBalance",
            Some(SERVICE_NS),
            &[("Username", "u"), ("Password", "p")],
        );
        assert_eq!(
            call_from_envelope(&e).unwrap().operation(),
            OperationName::GetBalance
        );
    }

    #[test]
    fn unknown_operations_and_bad_params() {
        for e in [
            envelope("GetBalance", None, &[]),
            envelope("GetBalance", Some("urn:other"), &[]),
            envelope("SendSMS", Some(SERVICE_NS), &[]),
        ] {
            assert!(matches!(
                call_from_envelope(&e),
                Err(CallError::UnknownOperation(_))
            ));
        }
        let bad = |params: &[(&str, &str)]| {
            matches!(
                call_from_envelope(&envelope("SubAccountGiveCredit", Some(SERVICE_NS), params)),
                Err(CallError::InvalidParams {
                    operation: OperationName::SubAccountGiveCredit,
                    ..
                })
            )
        };
        assert!(bad(&[("Username", "u")]));
        assert!(bad(&[("Username", "u"), ("Password", "")]));
        assert!(bad(&[("Username", "u"), ("Password", "p")]));
        assert!(bad(&[
            ("Username", "u"),
            ("Password", "p"),
            ("SubAccount", "s"),
            ("AnyTimeBalance", "1.2345")
        ]));
        assert!(bad(&[
            ("Username", "u"),
            ("Password", "p"),
            ("SubAccount", "s"),
            ("OffPeakBalance", "1e3")
        ]));
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_decimal_milli("10"), Ok(10_000));
        assert_eq!(parse_decimal_milli(" -0.125\n"), Ok(-125));
        assert_eq!(parse_decimal_milli("10.0000"), Ok(10_000));
        assert_eq!(parse_decimal_milli("2.5000000"), Ok(2_500));
        assert!(matches!(
            parse_decimal_milli("0.0001"),
            Err(AmountError::TooPrecise(_))
        ));
        assert!(parse_decimal_milli("").is_err());
        assert!(parse_decimal_milli("NaN").is_err());
        assert!(parse_decimal_milli(&"1".repeat(100)).is_err());
    }

    #[test]
    fn actions_must_match_the_body() {
        let op = OperationName::GetBalance;
        assert!(check_action(SoapVersion::V11, None, op).is_ok());
        assert!(check_action(SoapVersion::V11, Some("\"\""), op).is_ok());
        assert!(check_action(
            SoapVersion::V11,
            Some("\"http://www.2sms.com/WebServices/2.2/Simple/GetBalance\""),
            op
        )
        .is_ok());
        assert!(check_action(
            SoapVersion::V12,
            Some("http://www.2sms.com/WebServices/2.2/Simple/SubAccountGiveCredit"),
            op
        )
        .is_err());
    }
}
