//! What one request came to: a closed set, so the `outcome` label of
//! `tollgate_requests_total` and the access line can only carry these
//! values (bounded cardinality), and code that decides on outcomes (the
//! idempotency rules, the metrics) matches on variants, not strings.

use crate::error::ErrorCode;

/// The outcome of a request, from the first phase that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered by tollgate with a success (credit actions, the credit
    /// doors' operations).
    Ok,
    /// Forwarded to the gateway uncharged (not owned, shadow-less
    /// uncharged sends of unknown accounts, pingora's streamed path).
    Forwarded,
    /// A send settled from the gateway's per-recipient answer.
    Settled,
    /// A send whose reservation was voided (the gateway refused it whole).
    Voided,
    /// A send whose outcome is unknown: its reservation stays in doubt.
    InDoubt,
    /// A send whose reservation an operator or the sweep resolved first.
    AlreadyResolved,
    /// Shadow mode: priced and counted, forwarded uncharged.
    Shadow,
    /// A priced `receivemessage` charged in full.
    ReceiveCharged,
    /// A priced `receivemessage` the account could not pay in full.
    ReceiveShortfall,
    /// A priced `receivemessage` whose answer could not be counted.
    Uncounted,
    /// Refused with one of tollgate's error codes.
    Refused(ErrorCode),
    /// An `Idempotency-Key` retry answered with the stored answer.
    IdempotentReplay,
    /// An `Idempotency-Key` reused with a different request.
    IdempotencyMismatch,
    /// An `Idempotency-Key` whose first request is running or never ended.
    IdempotencyConflict,
    /// A SOAP Fault (malformed envelope, wrong binding, unknown operation).
    Fault,
    /// A path in `ozeki.blocked_paths`.
    Blocked,
    /// A request header over `downstream.header_limit_bytes` (431).
    HeaderTooLarge,
    /// A body over the door's limit (413).
    BodyTooLarge,
    /// A body not received in time (408).
    BodyTimeout,
    /// Malformed framing from the client (400).
    BadRequest,
    /// The client went away before its answer.
    ClientClosed,
    /// The client stalled past a read timeout on pingora's path (408).
    ClientTimeout,
    /// Another client-side HTTP error on pingora's path.
    ClientError,
    /// The gateway failed on pingora's path, or lost a forwarded answer.
    UpstreamError,
    /// A failure inside tollgate.
    InternalError,
}

impl Outcome {
    /// The label value (`tollgate_requests_total{outcome=…}`).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Forwarded => "forwarded",
            Outcome::Settled => "settled",
            Outcome::Voided => "voided",
            Outcome::InDoubt => "in_doubt",
            Outcome::AlreadyResolved => "already_resolved",
            Outcome::Shadow => "shadow",
            Outcome::ReceiveCharged => "receive_charged",
            Outcome::ReceiveShortfall => "receive_shortfall",
            Outcome::Uncounted => "uncounted",
            Outcome::Refused(code) => code.name(),
            Outcome::IdempotentReplay => "idempotent_replay",
            Outcome::IdempotencyMismatch => "idempotency_mismatch",
            Outcome::IdempotencyConflict => "idempotency_conflict",
            Outcome::Fault => "fault",
            Outcome::Blocked => "blocked",
            Outcome::HeaderTooLarge => "header_too_large",
            Outcome::BodyTooLarge => "body_too_large",
            Outcome::BodyTimeout => "body_timeout",
            Outcome::BadRequest => "bad_request",
            Outcome::ClientClosed => "client_closed",
            Outcome::ClientTimeout => "client_timeout",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::InternalError => "internal_error",
        }
    }

    /// The outcome whose [`Self::label`] is `label` (the relay carries
    /// outcomes by label, `handover/frame.rs`).
    pub fn from_label(label: &str) -> Option<Outcome> {
        Self::ALL_FIXED
            .into_iter()
            .chain(ErrorCode::ALL.into_iter().map(Outcome::Refused))
            .find(|o| o.label() == label)
    }

    /// Whether nothing happened that a retry must not repeat: the request
    /// was refused before any change (so an `Idempotency-Key` is released
    /// and a retry runs afresh). `store_unavailable` releases a send (its
    /// reservation was voided before forwarding) but not a credit change,
    /// which may have been made in memory and queued, only not yet
    /// acknowledged.
    pub fn changed_nothing(self, is_send: bool) -> bool {
        match self {
            Outcome::Refused(ErrorCode::StoreUnavailable) => is_send,
            Outcome::Refused(
                ErrorCode::AuthFailed
                | ErrorCode::RateLimited
                | ErrorCode::InvalidRequest
                | ErrorCode::UnknownAccount
                | ErrorCode::Forbidden
                | ErrorCode::InsufficientCredit
                | ErrorCode::NotASubaccount
                | ErrorCode::UpstreamUnavailable,
            )
            | Outcome::BodyTooLarge
            | Outcome::Fault => true,
            _ => false,
        }
    }

    /// Every outcome, for documentation and tests.
    pub const ALL_FIXED: [Outcome; 24] = [
        Outcome::Ok,
        Outcome::Forwarded,
        Outcome::Settled,
        Outcome::Voided,
        Outcome::InDoubt,
        Outcome::AlreadyResolved,
        Outcome::Shadow,
        Outcome::ReceiveCharged,
        Outcome::ReceiveShortfall,
        Outcome::Uncounted,
        Outcome::IdempotentReplay,
        Outcome::IdempotencyMismatch,
        Outcome::IdempotencyConflict,
        Outcome::Fault,
        Outcome::Blocked,
        Outcome::HeaderTooLarge,
        Outcome::BodyTooLarge,
        Outcome::BodyTimeout,
        Outcome::BadRequest,
        Outcome::ClientClosed,
        Outcome::ClientTimeout,
        Outcome::ClientError,
        Outcome::UpstreamError,
        Outcome::InternalError,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_snake_case() {
        let mut labels: Vec<&str> = Outcome::ALL_FIXED.iter().map(|o| o.label()).collect();
        labels.extend(ErrorCode::ALL.iter().map(|c| Outcome::Refused(*c).label()));
        let n = labels.len();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), n, "two outcomes share a label");
        for l in labels {
            assert!(
                l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
        }
    }

    #[test]
    fn only_refusals_before_any_change_release_a_key() {
        assert!(Outcome::Refused(ErrorCode::InsufficientCredit).changed_nothing(true));
        assert!(Outcome::Refused(ErrorCode::StoreUnavailable).changed_nothing(true));
        for o in [
            Outcome::Settled,
            Outcome::InternalError,
            Outcome::Refused(ErrorCode::StoreUnavailable),
        ] {
            assert_eq!(Outcome::from_label(o.label()), Some(o));
        }
        assert_eq!(Outcome::from_label("nonsense"), None);
        assert!(!Outcome::Refused(ErrorCode::StoreUnavailable).changed_nothing(false));
        for o in [
            Outcome::Settled,
            Outcome::InDoubt,
            Outcome::Ok,
            Outcome::UpstreamError,
        ] {
            assert!(!o.changed_nothing(true), "{o:?}");
        }
    }
}
