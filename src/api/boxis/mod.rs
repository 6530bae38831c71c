//! The Boxis-compatible front door (SPEC 2.1): parse a form POST into a
//! typed [`BoxisRequest`] and render the documented XML or JSON answers.
//!
//! Everything here is pure and synchronous: bytes in, typed values out; no
//! HTTP types, no balances, no secrets (the authcode is checked by
//! `service::boxis`, which holds the user keys). The flow the service
//! drives:
//!
//! 1. [`parse_form`] on the body; a [`FormError`] is `invalid_request`,
//!    answered in the format [`return_type_of`] can still read (XML when the
//!    body could not be parsed at all).
//! 2. [`classify`] into a [`BoxisRequest`]; a [`RequestError`] is answered
//!    with [`render::error`].
//! 3. The service checks the timestamp window, the authcode and replays, and
//!    answers with [`render::success`] or [`render::error`].

pub mod command;
pub mod form;
pub mod render;

pub use command::{
    classify, return_type_of, Action, BoxisRequest, CalculateCredits, ContentEncoding, Credentials,
    RequestError, ReturnType, API_VERSION, RECIPIENTS_COUNT_MAX,
};
pub use form::{parse_form, Form, FormError, FormLimits, FIELD_NAME_MAX_LEN};
