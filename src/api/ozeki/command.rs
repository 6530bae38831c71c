//! Typed commands of the Ozeki HTTP API: turns decoded [`Params`] into the
//! few actions tollgate handles itself (credit actions, `sendmessage`) and
//! [`Command::Other`] for everything that is forwarded untouched.
//!
//! Owns the validation rules of SPEC 1.1–1.3 (credential lengths, amounts,
//! recipient lists, the batch form). It never touches a balance, and never
//! puts a parameter value into a [`RequestError`] (passwords travel here).
//!
//! Ambiguity is refused rather than guessed: a parameter that decides what is
//! sent or who pays (`action`, credentials, recipients, message type and
//! text, amounts) given twice with different values — for instance once in
//! the query and once in the body — is an `invalid_request`, because the
//! gateway might read the other copy than tollgate priced.

use std::fmt;

use thiserror::Error;

use super::params::Params;
use crate::api::owned::{fold, read_action, ActionReading, OwnedAction};
use crate::error::ErrorCode;
use crate::money::parse_whole_credits;

/// Most messages in one `sendmessage` (batch form or recipient list).
pub const MAX_BATCH: usize = 20_000;
/// Ozeki's limit on `username` and `password`, in characters.
pub const CREDENTIAL_MAX_LEN: usize = 16;
/// Message type when the request names none.
pub const DEFAULT_MESSAGE_TYPE: &str = "SMS:TEXT";

/// What a client authenticates with on every request.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    /// Plain text as sent by the client. Compare it only through the
    /// credential store (constant time); never log or format it.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Shape of the gateway's (and tollgate's) `sendmessage` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseFormat {
    #[default]
    Xml,
    Html,
}

/// One (recipient, message) pair: the unit that is priced, reserved and
/// settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub recipient: String,
    pub message_type: String,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct SendMessage {
    pub credentials: Credentials,
    /// One entry per recipient, in request order (the batch index for the
    /// batch form).
    pub messages: Vec<OutgoingMessage>,
    pub format: ResponseFormat,
    /// The batch form (`messagecount` + indexed parameters): the gateway's
    /// answer then carries index-suffixed elements (`statuscode0`).
    pub batch: bool,
    /// The client's `reporturl` template (the gateway calls it with a
    /// delivery report); two different values are refused as ambiguous.
    pub report_url: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Command {
    GetCredits {
        credentials: Credentials,
        /// Whose balance; `None` is the caller's own account.
        useraccount: Option<String>,
    },
    SetCredits {
        credentials: Credentials,
        useraccount: Option<String>,
        /// `None` (empty or absent `newbalance`): leave the balance unchanged.
        new_balance_milli: Option<i64>,
    },
    AddCredits {
        credentials: Credentials,
        useraccount: Option<String>,
        /// Negative deducts.
        add_milli: i64,
    },
    SendMessage(SendMessage),
    /// Any other action (or none): forwarded to the gateway untouched.
    Other,
}

/// A request tollgate refuses before any credit logic; answered locally.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{action}: {code}: {detail}")]
pub struct RequestError {
    /// Lower-case action to echo in the error answer.
    pub action: String,
    pub code: ErrorCode,
    /// Safe for clients and logs: names parameters, never their values.
    pub detail: String,
}

/// The `action` parameter, folded (trimmed, lower-cased).
pub fn action_of(params: &Params) -> Option<String> {
    params.get("action").map(|a| fold(a.to_string()))
}

/// Whether any `action` of the request reads as an owned action or a
/// lookalike of one: such a request must go through [`classify`], never
/// straight to the gateway.
pub fn names_owned_action(params: &Params) -> bool {
    params
        .iter()
        .any(|(n, v)| n == "action" && read_action(v).is_owned_or_lookalike())
}

/// Classifies a request by the rules of [`crate::api::owned`]: actions
/// other than the four tollgate owns are [`Command::Other`] without further
/// checks; a lookalike of an owned action is refused.
pub fn classify(params: &Params) -> Result<Command, RequestError> {
    let Some(raw) = params.get("action") else {
        return Ok(Command::Other);
    };
    let action = fold(raw.to_string());
    let reading = read_action(raw);
    // Two different actions: refuse if either is one we would charge or
    // answer for, so `action=getversion&action=sendmessage` cannot slip a
    // send past the ledger.
    let conflicting = params
        .iter()
        .filter(|(n, _)| *n == "action")
        .map(|(_, v)| read_action(v))
        .find(|other| *other != reading);
    if let Some(other) = conflicting {
        if reading.is_owned_or_lookalike() || other.is_owned_or_lookalike() {
            return Err(invalid(&action, "conflicting values for parameter action"));
        }
    }
    let owned = match reading {
        ActionReading::Owned(owned) => owned,
        ActionReading::Lookalike => {
            return Err(invalid(
                &action,
                "action spells a credit or send action with extra characters",
            ))
        }
        ActionReading::Other(_) => return Ok(Command::Other),
    };
    let req = Request {
        params,
        action: owned.as_str(),
    };
    let credentials = req.credentials()?;
    match owned {
        OwnedAction::GetCredits => Ok(Command::GetCredits {
            credentials,
            useraccount: req.useraccount()?,
        }),
        OwnedAction::SetCredits => Ok(Command::SetCredits {
            credentials,
            useraccount: req.useraccount()?,
            new_balance_milli: req.new_balance()?,
        }),
        OwnedAction::AddCredits => Ok(Command::AddCredits {
            credentials,
            useraccount: req.useraccount()?,
            add_milli: req.add()?,
        }),
        OwnedAction::SendMessage => req.send_message(credentials).map(Command::SendMessage),
    }
}

/// The credentials of a request for `action` that tollgate charges but does
/// not answer itself (a priced `receivemessage`), by the same rules as the
/// actions it owns.
pub fn credentials_for(params: &Params, action: &str) -> Result<Credentials, RequestError> {
    Request { params, action }.credentials()
}

fn invalid(action: &str, detail: impl Into<String>) -> RequestError {
    RequestError {
        action: action.to_string(),
        code: ErrorCode::InvalidRequest,
        detail: detail.into(),
    }
}

/// Parameters of one intercepted request, with its action for errors.
struct Request<'a> {
    params: &'a Params,
    action: &'a str,
}

impl<'a> Request<'a> {
    fn invalid(&self, detail: impl Into<String>) -> RequestError {
        invalid(self.action, detail)
    }

    /// The value of `name`; an error if it is given again with another value.
    fn single(&self, name: &str) -> Result<Option<&'a str>, RequestError> {
        let mut values = self
            .params
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v);
        let first = values.next();
        if let Some(f) = first {
            if values.any(|v| v != f) {
                return Err(self.invalid(format!("conflicting values for parameter {name}")));
            }
        }
        Ok(first)
    }

    /// Like [`Self::single`], with an empty (or blank) value read as absent.
    fn non_empty(&self, name: &str) -> Result<Option<&'a str>, RequestError> {
        Ok(self.single(name)?.filter(|v| !v.trim().is_empty()))
    }

    fn credentials(&self) -> Result<Credentials, RequestError> {
        let username = self.single("username")?.filter(|u| !u.is_empty());
        let password = self.single("password")?.filter(|p| !p.is_empty());
        let (Some(username), Some(password)) = (username, password) else {
            // Which one is missing is not told: it helps nobody but a prober.
            return Err(RequestError {
                action: self.action.to_string(),
                code: ErrorCode::AuthFailed,
                detail: "missing credentials".into(),
            });
        };
        if username.chars().count() > CREDENTIAL_MAX_LEN
            || password.chars().count() > CREDENTIAL_MAX_LEN
        {
            return Err(self.invalid(format!(
                "username and password are at most {CREDENTIAL_MAX_LEN} characters"
            )));
        }
        Ok(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        })
    }

    fn useraccount(&self) -> Result<Option<String>, RequestError> {
        Ok(self.non_empty("useraccount")?.map(str::to_string))
    }

    fn new_balance(&self) -> Result<Option<i64>, RequestError> {
        let Some(text) = self.non_empty("newbalance")? else {
            return Ok(None);
        };
        match parse_whole_credits(text) {
            Ok(milli) if milli >= 0 => Ok(Some(milli)),
            Ok(_) => Err(self.invalid("newbalance must not be negative")),
            Err(_) => Err(self.invalid("newbalance must be a whole number of credits")),
        }
    }

    fn add(&self) -> Result<i64, RequestError> {
        let Some(text) = self.non_empty("add")? else {
            return Err(self.invalid("add is required"));
        };
        parse_whole_credits(text).map_err(|_| self.invalid("add must be a whole number of credits"))
    }

    fn send_message(&self, credentials: Credentials) -> Result<SendMessage, RequestError> {
        let format = match self.single("responseformat")? {
            Some(f) if f.trim().eq_ignore_ascii_case("html") => ResponseFormat::Html,
            _ => ResponseFormat::Xml,
        };
        let message_type = self
            .non_empty("messagetype")?
            .map(str::trim)
            .unwrap_or(DEFAULT_MESSAGE_TYPE);
        let text = self.single("messagedata")?.unwrap_or("");
        let (messages, batch) = match self.single("messagecount")? {
            Some(count) => (self.batch_messages(count, message_type, text)?, true),
            None => (self.list_messages(message_type, text)?, false),
        };
        let report_url = self
            .single("reporturl")?
            .filter(|u| !u.trim().is_empty())
            .map(str::to_string);
        Ok(SendMessage {
            credentials,
            messages,
            format,
            batch,
            report_url,
        })
    }

    /// `recipient` holding one or more numbers separated by `,` or `;`.
    fn list_messages(
        &self,
        message_type: &str,
        text: &str,
    ) -> Result<Vec<OutgoingMessage>, RequestError> {
        let Some(list) = self.single("recipient")? else {
            return Err(self.invalid("recipient is required"));
        };
        let mut messages = Vec::new();
        for recipient in list
            .split([',', ';'])
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            if messages.len() == MAX_BATCH {
                return Err(self.invalid(format!("more than {MAX_BATCH} recipients")));
            }
            if has_control(recipient) {
                return Err(self.invalid("recipient contains control characters"));
            }
            messages.push(OutgoingMessage {
                recipient: recipient.to_string(),
                message_type: message_type.to_string(),
                text: text.to_string(),
            });
        }
        if messages.is_empty() {
            return Err(self.invalid("recipient holds no number"));
        }
        Ok(messages)
    }

    /// The batch form: `messagecount=N` with `recipient0..N-1` and optional
    /// `messagetypeI`/`messagedataI` (falling back to the unindexed ones).
    /// One pass over the parameters, so 20 000 messages cost O(params).
    fn batch_messages(
        &self,
        count: &str,
        default_type: &str,
        default_text: &str,
    ) -> Result<Vec<OutgoingMessage>, RequestError> {
        let count = match count.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_BATCH).contains(&n) => n,
            _ => {
                return Err(self.invalid(format!(
                    "messagecount must be an integer from 1 to {MAX_BATCH}"
                )))
            }
        };
        let mut recipients: Vec<Option<&str>> = vec![None; count];
        let mut types: Vec<Option<&str>> = vec![None; count];
        let mut texts: Vec<Option<&str>> = vec![None; count];
        for (name, value) in self.params.iter() {
            let (slots, base) = if let Some(i) = name.strip_prefix("recipient") {
                (&mut recipients, i)
            } else if let Some(i) = name.strip_prefix("messagetype") {
                (&mut types, i)
            } else if let Some(i) = name.strip_prefix("messagedata") {
                (&mut texts, i)
            } else {
                continue;
            };
            let Some(index) = parse_index(base).filter(|&i| i < count) else {
                continue;
            };
            match slots[index] {
                None => slots[index] = Some(value),
                Some(previous) if previous == value => {}
                Some(_) => {
                    return Err(self.invalid(format!("conflicting values for parameter {name}")))
                }
            }
        }
        let mut messages = Vec::with_capacity(count);
        for i in 0..count {
            let recipient = recipients[i].map(str::trim).unwrap_or("");
            if recipient.is_empty() {
                return Err(self.invalid(format!("recipient{i} is required")));
            }
            // A list inside one batch slot would be sent to several numbers
            // but priced as one.
            if recipient.contains([',', ';']) {
                return Err(self.invalid(format!("recipient{i} must hold a single number")));
            }
            if has_control(recipient) {
                return Err(self.invalid(format!("recipient{i} contains control characters")));
            }
            let message_type = types[i]
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .unwrap_or(default_type);
            messages.push(OutgoingMessage {
                recipient: recipient.to_string(),
                message_type: message_type.to_string(),
                text: texts[i].unwrap_or(default_text).to_string(),
            });
        }
        Ok(messages)
    }
}

/// Control characters (line breaks above all) have no place in a number,
/// and could forge extra lines in the gateway's HTML answer that settlement
/// reads.
fn has_control(recipient: &str) -> bool {
    recipient.chars().any(char::is_control)
}

/// A batch index in canonical decimal (`0`, `17`; not `017` or `+1`).
fn parse_index(digits: &str) -> Option<usize> {
    let canonical = !digits.is_empty()
        && digits.len() <= 5
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if canonical {
        digits.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ozeki::params::{parse_params, ParamLimits};

    fn params(q: &str) -> Params {
        parse_params(Some(q.as_bytes()), None, &ParamLimits::default()).unwrap()
    }

    fn classify_q(q: &str) -> Result<Command, RequestError> {
        classify(&params(q))
    }

    fn send(q: &str) -> SendMessage {
        match classify_q(q).unwrap() {
            Command::SendMessage(s) => s,
            other => panic!("not a send: {other:?}"),
        }
    }

    fn err(q: &str) -> RequestError {
        classify_q(q).unwrap_err()
    }

    const AUTH: &str = "username=john&password=pw";

    #[test]
    fn other_actions_are_forwarded() {
        for q in [
            "",
            "action=receivemessage&username=x",
            "action=getversion",
            "foo=bar",
        ] {
            assert!(matches!(classify_q(q).unwrap(), Command::Other), "{q}");
        }
        // Not intercepted: no credential checks either.
        assert!(matches!(
            classify_q("action=reporting&username=aaaaaaaaaaaaaaaaaaaaaa").unwrap(),
            Command::Other
        ));
        assert_eq!(
            action_of(&params("ACTION=%20SendMessage+")).as_deref(),
            Some("sendmessage")
        );
        assert_eq!(action_of(&params("x=1")), None);
    }

    #[test]
    fn getcredits() {
        match classify_q(&format!("action=GetCredits&{AUTH}")).unwrap() {
            Command::GetCredits {
                credentials,
                useraccount,
            } => {
                assert_eq!(credentials.username, "john");
                assert_eq!(credentials.password, "pw");
                assert_eq!(useraccount, None);
            }
            other => panic!("{other:?}"),
        }
        match classify_q(&format!("action=getcredits&{AUTH}&UserAccount=bob")).unwrap() {
            Command::GetCredits { useraccount, .. } => {
                assert_eq!(useraccount.as_deref(), Some("bob"))
            }
            other => panic!("{other:?}"),
        }
        match classify_q(&format!("action=getcredits&{AUTH}&useraccount=")).unwrap() {
            Command::GetCredits { useraccount, .. } => assert_eq!(useraccount, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn setcredits() {
        let nb = |q: &str| match classify_q(&format!("action=setcredits&{AUTH}{q}")) {
            Ok(Command::SetCredits {
                new_balance_milli, ..
            }) => Ok(new_balance_milli),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(nb("&newbalance=744").unwrap(), Some(744_000));
        assert_eq!(nb("&newbalance=+5").unwrap(), Some(5_000));
        assert_eq!(nb("&newbalance=0").unwrap(), Some(0));
        assert_eq!(nb("&newbalance=").unwrap(), None);
        assert_eq!(nb("").unwrap(), None);
        for bad in ["&newbalance=-1", "&newbalance=1.5", "&newbalance=abc"] {
            let e = nb(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
            assert_eq!(e.action, "setcredits");
        }
        match classify_q(&format!(
            "action=setcredits&{AUTH}&useraccount=bob&newbalance=3"
        ))
        .unwrap()
        {
            Command::SetCredits { useraccount, .. } => {
                assert_eq!(useraccount.as_deref(), Some("bob"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn addcredits() {
        let add = |q: &str| match classify_q(&format!("action=AddCredits&{AUTH}{q}")) {
            Ok(Command::AddCredits { add_milli, .. }) => Ok(add_milli),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(add("&add=10").unwrap(), 10_000);
        assert_eq!(add("&add=%2B5").unwrap(), 5_000);
        assert_eq!(add("&add=-5").unwrap(), -5_000);
        for bad in ["", "&add=", "&add=1.5", "&add=x", "&add=1e3"] {
            let e = add(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
            assert_eq!(e.action, "addcredits");
        }
    }

    #[test]
    fn credentials_rules() {
        for q in [
            "action=getcredits",
            "action=getcredits&username=john",
            "action=getcredits&password=pw",
            "action=getcredits&username=&password=pw",
            "action=sendmessage&username=john&recipient=1",
        ] {
            let e = err(q);
            assert_eq!(e.code, ErrorCode::AuthFailed, "{q}");
            assert_eq!(e.detail, "missing credentials");
        }
        let e = err("action=addcredits&username=abcdefghijklmnopq&password=pw&add=1");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = err("action=sendmessage&username=john&password=abcdefghijklmnopq&recipient=1");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(!e.to_string().contains("abcdefghijklmnopq"));
        // 16 characters (not bytes) is fine.
        let s = send("action=sendmessage&username=%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1%C3%A1&password=pw&recipient=1");
        assert_eq!(s.credentials.username.chars().count(), 16);
    }

    #[test]
    fn credentials_debug_redacts_the_password() {
        let c = Credentials {
            username: "john".into(),
            password: "s3cr3t-pa55".into(),
        };
        let shown = format!("{c:?} {c:#?}");
        assert!(shown.contains("john"));
        assert!(!shown.contains("s3cr3t-pa55"), "{shown}");
        let cmd = classify_q("action=getcredits&username=john&password=s3cr3t-pa55").unwrap();
        assert!(!format!("{cmd:?}").contains("s3cr3t-pa55"));
    }

    #[test]
    fn send_single_recipient_defaults() {
        let s = send(&format!(
            "action=sendMessage&{AUTH}&recipient=%2B36201234567&messageData=Hello+world"
        ));
        assert!(!s.batch);
        assert_eq!(s.format, ResponseFormat::Xml);
        assert_eq!(
            s.messages,
            vec![OutgoingMessage {
                recipient: "+36201234567".into(),
                message_type: "SMS:TEXT".into(),
                text: "Hello world".into(),
            }]
        );
    }

    #[test]
    fn send_recipient_lists_and_alias() {
        let s = send(&format!(
            "action=sendmessage&{AUTH}&recepient=%2B361,+362+;363;;,&messagetype=SMS:TEXT:UCS2&messagedata=x&responseformat=HTML"
        ));
        let r: Vec<_> = s.messages.iter().map(|m| m.recipient.as_str()).collect();
        assert_eq!(r, ["+361", "362", "363"]);
        assert!(s
            .messages
            .iter()
            .all(|m| m.message_type == "SMS:TEXT:UCS2" && m.text == "x"));
        assert_eq!(s.format, ResponseFormat::Html);
        let s = send(&format!(
            "action=sendmessage&{AUTH}&recipient=1&responseformat=json"
        ));
        assert_eq!(s.format, ResponseFormat::Xml);
        assert_eq!(s.messages[0].text, "");

        for q in [
            "",
            "&recipient=",
            "&recipient=+,+;",
            "&recipient=1%0AStatus+code:+0,2",
            "&messagecount=1&recipient0=1%0D2",
        ] {
            let e = err(&format!("action=sendmessage&{AUTH}{q}"));
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{q}");
            assert_eq!(e.action, "sendmessage");
        }
    }

    #[test]
    fn send_recipient_list_is_bounded() {
        let list = vec!["1"; MAX_BATCH].join(",");
        assert_eq!(
            send(&format!("action=sendmessage&{AUTH}&recipient={list}"))
                .messages
                .len(),
            MAX_BATCH
        );
        let e = err(&format!("action=sendmessage&{AUTH}&recipient={list},2"));
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn send_batch_form() {
        let s = send(&format!(
            "action=sendmessage&{AUTH}&messagecount=3&messagetype=SMS:TEXT:GSM7BIT&messagedata=common\
             &recipient0=%2B361&messagedata0=first&Recepient1=362&messageType1=SMS:BINARY\
             &recipient2=363&messagedata1=second&recipient3=ignored"
        ));
        assert!(s.batch);
        assert_eq!(
            s.messages,
            vec![
                OutgoingMessage {
                    recipient: "+361".into(),
                    message_type: "SMS:TEXT:GSM7BIT".into(),
                    text: "first".into()
                },
                OutgoingMessage {
                    recipient: "362".into(),
                    message_type: "SMS:BINARY".into(),
                    text: "second".into()
                },
                OutgoingMessage {
                    recipient: "363".into(),
                    message_type: "SMS:TEXT:GSM7BIT".into(),
                    text: "common".into()
                },
            ]
        );
        let s = send(&format!(
            "action=sendmessage&{AUTH}&messagecount=1&recipient0=1"
        ));
        assert_eq!(s.messages[0].message_type, "SMS:TEXT");
    }

    #[test]
    fn send_batch_errors() {
        for q in [
            "&messagecount=2&recipient0=1",               // recipient1 missing
            "&messagecount=2&recipient0=1&recipient01=2", // non-canonical index
            "&messagecount=1&recipient0=",
            "&messagecount=1&recipient0=1,2",
            "&messagecount=0",
            "&messagecount=x&recipient0=1",
            "&messagecount=&recipient0=1",
            "&messagecount=20001&recipient0=1",
            "&messagecount=1&recipient0=1&recipient0=2",
        ] {
            let e = err(&format!("action=sendmessage&{AUTH}{q}"));
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{q}");
        }
        let e = err(&format!(
            "action=sendmessage&{AUTH}&messagecount=2&recipient0=1"
        ));
        assert_eq!(e.detail, "recipient1 is required");
    }

    #[test]
    fn send_batch_at_the_limit() {
        let mut q = format!("action=sendmessage&{AUTH}&messagedata=hi&messagecount={MAX_BATCH}");
        for i in 0..MAX_BATCH {
            q.push_str(&format!("&recipient{i}=36{i}&messagetype{i}=SMS:TEXT"));
        }
        let s = send(&q);
        assert_eq!(s.messages.len(), MAX_BATCH);
        assert_eq!(s.messages[19_999].recipient, "3619999");

        let q = q.replace(&format!("messagecount={MAX_BATCH}"), "messagecount=20001")
            + "&recipient20000=1";
        assert_eq!(err(&q).code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn conflicting_duplicates_are_refused() {
        let e = err("action=getversion&action=sendmessage&username=a&password=b&recipient=1");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = err(&format!(
            "action=sendmessage&{AUTH}&recipient=1&recipient=2"
        ));
        assert_eq!(e.detail, "conflicting values for parameter recipient");
        let e = err(&format!(
            "action=sendmessage&{AUTH}&recipient=1&messagedata=a&messageData=b"
        ));
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = err("action=getcredits&username=a&password=b&password=c");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert_eq!(e.detail, "conflicting values for parameter password");
        // Identical duplicates (e.g. query and body both carrying them) are fine.
        assert!(classify_q(&format!(
            "action=sendmessage&action=SendMessage&{AUTH}&{AUTH}&recipient=1&recipient=1"
        ))
        .is_ok());
        // Two non-intercepted actions are still just forwarded.
        assert!(matches!(
            classify_q("action=a&action=b").unwrap(),
            Command::Other
        ));
    }
}
