//! The Ozeki NG HTTP API front door (SPEC 1): parse a request into a typed
//! [`Command`], render the answers tollgate gives itself, and read the
//! gateway's `sendmessage` answer to settle reservations.
//!
//! Everything here is pure and synchronous: byte slices and strings in,
//! typed values out; no pingora or HTTP types, no balances. The flow the
//! proxy drives:
//!
//! 1. [`parse_params`] on the query and form body. A [`ParamError`] is
//!    answered locally with `invalid_request` ([`sniff_action`] recovers the
//!    action to echo); such a request is never forwarded, since it could be
//!    a send tollgate cannot price.
//! 2. [`classify`]: [`Command::Other`] is forwarded untouched; credit actions
//!    are answered with [`credits_answer`] / [`error_answer`]; a
//!    [`RequestError`] with [`error_answer`].
//! 3. A refused send is answered with [`send_refusal`]; a forwarded one is
//!    settled from [`parse_send_answer`] + [`match_reports`], where every
//!    error and every `None` means *in doubt*.
//! 4. With a receive price set, a forwarded `receivemessage` is charged per
//!    message [`inbox::count_messages`] finds in the gateway's answer.

pub mod answer;
pub mod command;
pub mod inbox;
pub mod params;
pub mod render;

pub use answer::{match_reports, parse_send_answer, AcceptReport, AnswerError, ANSWER_MAX_BYTES};
pub use command::{
    action_of, classify, Command, Credentials, OutgoingMessage, RequestError, ResponseFormat,
    SendMessage, CREDENTIAL_MAX_LEN, DEFAULT_MESSAGE_TYPE, MAX_BATCH,
};
pub use params::{parse_params, sniff_action, ParamError, ParamLimits, Params, NAME_MAX_LEN};
pub use render::{content_type, credits_answer, error_answer, send_refusal, XML_PROLOG};
