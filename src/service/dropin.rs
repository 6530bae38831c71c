//! Who is calling: the authentication path of the Ozeki door, including
//! drop-in mode (SPEC 5.3, 7).
//!
//! [`authenticate`] runs, in order:
//! 1. the `auth_lockout` limit for (client IP, username): a locked pair is
//!    refused before anything else runs (no argon2, no gateway call);
//! 2. the local credential store (argon2id behind a MAC cache);
//! 3. with `auth.verify_upstream: true`, for a username tollgate has no
//!    credentials for: one `getcredits` call to the gateway
//!    ([`verify_upstream`]). On success the account is *adopted*: opened in
//!    the ledger (as a `user`), its balance imported with an `add` entry
//!    when `auth.adopt_balance: true` (persisted like any change), and an
//!    argon2id hash of the verified password stored for
//!    `auth.verified_ttl_s`, after which the gateway is asked again. A
//!    refusal is remembered for `auth.negative_ttl_s` under a MAC of the
//!    credentials, so the same wrong credentials never reach the gateway
//!    twice in that time; different guesses are bounded by the lockout.
//!    Concurrent verifications of the same credentials are coalesced into
//!    one gateway call;
//! 4. the failure or success is recorded for the lockout.
//!
//! Never logged or stored: a password (only MACs under a per-process key
//! and argon2id hashes). The verification URL carries the password as the
//! gateway requires; it is built here and handed to `upstream`, never
//! logged. Failure modes: the gateway unreachable or answering something
//! unreadable → `Unavailable` (`upstream_unavailable` to the client),
//! nothing cached, nothing adopted.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use pingora::http::RequestHeader;
use rand::RngCore;

use crate::auth::{AuthOutcome, SingleFlight};
use crate::config::AuthConfig;
use crate::ledger::{Bucket, LedgerError, Role};
use crate::limits::Refusal;
use crate::service::{App, Snapshot};
use crate::upstream::Forwarded;

/// Most refused credentials remembered at once.
const NEGATIVE_CACHE_MAX: usize = 100_000;

/// The result of [`authenticate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Verified,
    /// Unknown name or wrong password (never says which).
    Failed,
    /// The (IP, username) pair is locked out.
    Locked(Refusal),
    /// Drop-in mode could not ask the gateway.
    Unavailable,
}

/// The gateway's verdict on credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    Verified,
    Rejected,
    Unavailable,
}

/// Drop-in state: the negative cache and the single-flight gates.
pub struct DropIn {
    mac_key: [u8; 32],
    /// MAC(username, password) → when the refusal stops counting.
    refused: DashMap<[u8; 32], Instant>,
    in_flight: SingleFlight,
    verified_ttl: Duration,
    negative_ttl: Duration,
}

impl DropIn {
    pub fn new(cfg: &AuthConfig) -> Self {
        let mut mac_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut mac_key);
        DropIn {
            mac_key,
            refused: DashMap::new(),
            in_flight: SingleFlight::default(),
            verified_ttl: cfg.verified_ttl,
            negative_ttl: cfg.negative_ttl,
        }
    }

    fn mac(&self, username: &str, password: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(&(username.len() as u64).to_le_bytes());
        h.update(username.as_bytes());
        h.update(password.as_bytes());
        *h.finalize().as_bytes()
    }

    fn refused_recently(&self, mac: &[u8; 32]) -> bool {
        let now = Instant::now();
        match self.refused.get(mac).map(|e| *e) {
            Some(until) if until > now => true,
            Some(_) => {
                self.refused.remove_if(mac, |_, until| *until <= now);
                false
            }
            None => false,
        }
    }

    fn remember_refusal(&self, mac: [u8; 32]) {
        let now = Instant::now();
        if self.refused.len() >= NEGATIVE_CACHE_MAX {
            self.refused.retain(|_, until| *until > now);
            if self.refused.len() >= NEGATIVE_CACHE_MAX {
                // Full of live refusals: forget an arbitrary eighth (they
                // are re-asked at most once more each; the lockout still
                // bounds guessing).
                let victims: Vec<[u8; 32]> = self
                    .refused
                    .iter()
                    .take(NEGATIVE_CACHE_MAX / 8)
                    .map(|e| *e.key())
                    .collect();
                for k in victims {
                    self.refused.remove(&k);
                }
            }
        }
        self.refused.insert(mac, now + self.negative_ttl);
    }

    /// Drops expired refusals (the sweeper).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.refused.retain(|_, until| *until > now);
    }
}

/// The authentication path of a request (see the module docs).
pub async fn authenticate(
    app: &App,
    snapshot: &Snapshot,
    client_ip: Option<IpAddr>,
    username: &str,
    password: &str,
) -> Auth {
    if let Err(refusal) = app.check_auth_lockout(snapshot, client_ip, username) {
        return Auth::Locked(refusal);
    }
    let auth = match app.credentials.verify(username, password).await {
        AuthOutcome::Verified => Auth::Verified,
        AuthOutcome::UnknownAccount if app.config.auth.verify_upstream => {
            match verify_upstream(app, username, password).await {
                Verification::Verified => Auth::Verified,
                Verification::Rejected => Auth::Failed,
                Verification::Unavailable => Auth::Unavailable,
            }
        }
        _ => Auth::Failed,
    };
    if let Auth::Verified | Auth::Failed = auth {
        app.record_auth(snapshot, client_ip, username, auth == Auth::Verified);
    }
    auth
}

/// Asks the gateway about credentials tollgate does not know, once per
/// credentials at a time, and adopts the account on success.
pub async fn verify_upstream(app: &App, username: &str, password: &str) -> Verification {
    let dropin = &app.dropin;
    let metrics = &app.metrics.upstream_verifications;
    let mac = dropin.mac(username, password);
    if dropin.refused_recently(&mac) {
        metrics.with_label_values(&["cached_rejection"]).inc();
        return Verification::Rejected;
    }
    dropin
        .in_flight
        .run(mac, || async {
            // Whoever held the gate before may have settled it.
            if app.credentials.check_cached(username, password) == Some(AuthOutcome::Verified) {
                return Verification::Verified;
            }
            if dropin.refused_recently(&mac) {
                metrics.with_label_values(&["cached_rejection"]).inc();
                return Verification::Rejected;
            }
            let verdict = match ask_gateway(app, username, password).await {
                Ok(Some(balance_milli)) => adopt(app, username, password, balance_milli).await,
                Ok(None) => {
                    dropin.remember_refusal(mac);
                    Verification::Rejected
                }
                Err(reason) => {
                    tracing::warn!(%reason, "drop-in verification: the gateway could not be asked");
                    Verification::Unavailable
                }
            };
            let label = match verdict {
                Verification::Verified => "verified",
                Verification::Rejected => "rejected",
                Verification::Unavailable => "unavailable",
            };
            metrics.with_label_values(&[label]).inc();
            verdict
        })
        .await
}

/// The `getcredits` URL for the gateway, credentials percent-encoded.
pub fn getcredits_path(api_path: &str, username: &str, password: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    format!(
        "{api_path}?action=getcredits&username={}&password={}",
        utf8_percent_encode(username, NON_ALPHANUMERIC),
        utf8_percent_encode(password, NON_ALPHANUMERIC)
    )
}

/// `Ok(Some(balance))` if the gateway accepted the credentials,
/// `Ok(None)` if it refused them, `Err` if it could not be asked or its
/// answer could not be read.
async fn ask_gateway(app: &App, username: &str, password: &str) -> Result<Option<i64>, String> {
    let api_path = app
        .config
        .ozeki
        .paths
        .first()
        .map(String::as_str)
        .unwrap_or("/api");
    let mut req = RequestHeader::build(
        "GET",
        getcredits_path(api_path, username, password).as_bytes(),
        Some(2),
    )
    .map_err(|e| format!("building the request: {:?}", e.etype()))?;
    req.insert_header("Host", app.config.upstream.address.to_string())
        .map_err(|e| format!("building the request: {:?}", e.etype()))?;
    let forwarded = app.gateway.forward(&req, Bytes::new(), None).await;
    super::forward::observe(app, "getcredits", &forwarded);
    match forwarded {
        Forwarded::Answered { header, body, .. } => {
            if !header.status.is_success() {
                return Err(format!("gateway answered HTTP {}", header.status.as_u16()));
            }
            read_credits_answer(&body)
        }
        Forwarded::NotSent(reason) => Err(reason),
        Forwarded::Unknown(lost) => Err(lost.detail),
    }
}

/// Reads an Ozeki `getcredits` answer: the balance, or `None` for an
/// error answer (wrong credentials).
pub fn read_credits_answer(body: &[u8]) -> Result<Option<i64>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "answer is not UTF-8".to_string())?;
    let field = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{name}>"))? + start;
        Some(text[start..end].trim())
    };
    if let Some(balance) = field("balance") {
        return crate::money::parse_credits(balance)
            .map(Some)
            .map_err(|e| format!("unreadable balance: {e}"));
    }
    if field("errorcode").is_some() || field("errormessage").is_some() {
        return Ok(None);
    }
    Err("answer has neither a balance nor an error".into())
}

/// Opens the verified account with its imported balance (if configured)
/// as one ledger operation, then stores the verified credentials — in that
/// order, so no request is authenticated before the balance is there.
///
/// Back-pressure comes first, before anything changes; a refusal there
/// leaves the account unopened, so the next request tries again. Once
/// opened, the account holds its balance: an import whose commit did not
/// come in time is made in memory and stays queued (it commits when the
/// store recovers), and a retry finds the account with its balance — the
/// gateway's balance is never lost nor imported twice.
async fn adopt(app: &App, username: &str, password: &str, balance_milli: i64) -> Verification {
    if app.ledger.account(username).is_none() {
        let imported_milli = if app.config.auth.adopt_balance {
            balance_milli.max(0)
        } else {
            0
        };
        if imported_milli > 0 {
            if let Err(code) = app.admit_change().await {
                tracing::warn!(
                    account = username,
                    code = code.name(),
                    "adopting: the store is behind; not adopted yet"
                );
                return Verification::Unavailable;
            }
        }
        match app.ledger.open_account_with_balance(
            username,
            None,
            Role::User,
            None,
            Bucket::Anytime,
            imported_milli,
            Some("adopt"),
        ) {
            Ok(()) => {
                if imported_milli > 0 {
                    if let Err(code) = app.change_durable().await {
                        tracing::warn!(
                            account = username,
                            code = code.name(),
                            "adopted balance not yet durable"
                        );
                    }
                }
                tracing::info!(
                    account = username,
                    imported_milli,
                    "account adopted from the gateway"
                );
            }
            Err(LedgerError::AccountExists(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the gateway verified credentials whose name the ledger cannot hold");
                return Verification::Rejected;
            }
        }
    }
    let pw = password.to_string();
    let phc = match tokio::task::spawn_blocking(move || crate::config::accounts::hash_password(&pw))
        .await
    {
        Ok(phc) => phc,
        Err(_) => return Verification::Unavailable,
    };
    app.credentials
        .set_expiring(username, &phc, Instant::now() + app.dropin.verified_ttl);
    app.credentials.remember(username, password);
    Verification::Verified
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verification_url_encodes_credentials() {
        assert_eq!(
            getcredits_path("/api", "jo hn", "p&ss=w%rd+é"),
            "/api?action=getcredits&username=jo%20hn&password=p%26ss%3Dw%25rd%2B%C3%A9"
        );
    }

    #[test]
    fn credits_answers_are_read() {
        let ok = b"<?xml version=\"1.0\"?><response><action>getcredits</action><data><account><username>x</username><balance>12.5</balance></account></data></response>";
        assert_eq!(read_credits_answer(ok), Ok(Some(12_500)));
        let refused = b"<response><action>getcredits</action><data><errormessage>Invalid username or password</errormessage><errorcode>1</errorcode></data></response>";
        assert_eq!(read_credits_answer(refused), Ok(None));
        assert!(read_credits_answer(b"<html>proxy error</html>").is_err());
        assert!(read_credits_answer(b"<balance>lots</balance>").is_err());
    }
}
