//! tollgate's own error codes: one table shared by every front door.
//!
//! Ozeki answers carry the number as `errorcode`/`statuscode`, Boxis carries
//! the symbolic name in `resulttxt`, 2sms carries the number as `Code`. The
//! README's error-code table is generated from [`ErrorCode::ALL`] by hand;
//! a test keeps the two in step.

use std::fmt;

/// A failure a client can be told about. The numbers are stable API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InsufficientCredit,
    RateLimited,
    AuthFailed,
    Forbidden,
    UnknownAccount,
    InvalidRequest,
    NotASubaccount,
    StoreUnavailable,
    UpstreamUnavailable,
    Replayed,
    TimestampOutOfWindow,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::InsufficientCredit,
        ErrorCode::RateLimited,
        ErrorCode::AuthFailed,
        ErrorCode::Forbidden,
        ErrorCode::UnknownAccount,
        ErrorCode::InvalidRequest,
        ErrorCode::NotASubaccount,
        ErrorCode::StoreUnavailable,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::Replayed,
        ErrorCode::TimestampOutOfWindow,
    ];

    /// The stable number; 0 is reserved for success.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::InsufficientCredit => 1001,
            ErrorCode::RateLimited => 1002,
            ErrorCode::AuthFailed => 1003,
            ErrorCode::Forbidden => 1004,
            ErrorCode::UnknownAccount => 1005,
            ErrorCode::InvalidRequest => 1006,
            ErrorCode::NotASubaccount => 1007,
            ErrorCode::StoreUnavailable => 1008,
            ErrorCode::UpstreamUnavailable => 1009,
            ErrorCode::Replayed => 1010,
            ErrorCode::TimestampOutOfWindow => 1011,
        }
    }

    /// The symbolic name used in docs, logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::InsufficientCredit => "insufficient_credit",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownAccount => "unknown_account",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotASubaccount => "not_a_subaccount",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::Replayed => "replayed",
            ErrorCode::TimestampOutOfWindow => "timestamp_out_of_window",
        }
    }

    /// A human sentence for clients; never contains request data.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::InsufficientCredit => "Insufficient credit",
            ErrorCode::RateLimited => "Rate limit exceeded, retry later",
            ErrorCode::AuthFailed => "Authentication failed",
            ErrorCode::Forbidden => "Not permitted for this account",
            ErrorCode::UnknownAccount => "Unknown account",
            ErrorCode::InvalidRequest => "Invalid request",
            ErrorCode::NotASubaccount => "Not a sub-account of the caller",
            ErrorCode::StoreUnavailable => "Ledger store unavailable, retry later",
            ErrorCode::UpstreamUnavailable => "SMS gateway unavailable",
            ErrorCode::Replayed => "Request replayed",
            ErrorCode::TimestampOutOfWindow => "Timestamp outside the accepted window",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_are_unique() {
        let mut codes: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        assert!(codes.iter().all(|&c| c != 0));
    }
}
