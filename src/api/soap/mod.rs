//! The 2sms-compatible SOAP front door (SPEC 2.2): parse a SOAP 1.1 or 1.2
//! envelope into a typed [`Call`], render the operation responses, SOAP
//! Faults and the WSDL.
//!
//! Pure and synchronous: bytes in, typed values out; no HTTP types, no
//! balances, no credential checks (that is `service::soap`). The flow the
//! service drives:
//!
//! 1. [`parse_envelope`]: structural reading with no DTD, no entity
//!    expansion and bounded depth; an [`EnvelopeFailure`] is answered with a
//!    [`fault`] in the envelope's version when known, else the one the
//!    `Content-Type` implies.
//! 2. [`call_from_envelope`]: an unknown operation is a fault; bad
//!    parameters of a known one are answered with its own response and
//!    `invalid_request`.
//! 3. [`check_action`] against the `SOAPAction` / `action` the client sent.
//! 4. [`balance_response`] / [`give_credit_response`].

pub mod call;
pub mod envelope;
pub mod render;
pub mod wsdl;

pub use call::{
    call_from_envelope, check_action, parse_decimal_milli, Call, CallError, OperationName,
    SoapCredentials, SERVICE_NS,
};
pub use envelope::{
    parse_envelope, Envelope, EnvelopeError, EnvelopeFailure, EnvelopeLimits, SoapVersion,
    SOAP11_ENV_NS, SOAP12_ENV_NS,
};
pub use render::{
    balance_response, fault, give_credit_response, BalanceAnswer, Balances, FaultKind,
    GiveCreditAnswer,
};
pub use wsdl::wsdl;

impl EnvelopeError {
    /// The kind of fault this error is answered with.
    pub fn fault_kind(&self) -> FaultKind {
        match self {
            EnvelopeError::VersionMismatch => FaultKind::VersionMismatch,
            EnvelopeError::MustUnderstand(_) => FaultKind::MustUnderstand,
            _ => FaultKind::Client,
        }
    }
}
