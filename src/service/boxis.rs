//! What the Boxis-compatible door does (SPEC 2.1): authenticate a request by
//! its authcode, refuse stale and replayed ones, and answer
//! `calculateCredits` and `getCreditLimit` from the tariff and the ledger.
//!
//! Owns the Boxis user keys ([`UserKeys`]: the per-account secret the
//! authcode is computed with, which must be held in clear because
//! `authcode = md5(timestamp + user_key)`) and the replay cache
//! ([`ReplayCache`]). It never moves a balance: both actions only read.
//! It never logs a user key or an authcode.
//!
//! Order of checks, so that a refused request costs little and reveals
//! nothing: parse and validate every field (`invalid_request`), then the
//! timestamp window (`timestamp_out_of_window`; the answer carries the
//! server's time so clients can resynchronise), then the authcode
//! (`auth_failed`, the same answer for an unknown user, an account without
//! a key and a wrong code, compared in constant time), then replay
//! (`replayed`). Only an authcode that verified is remembered, so nobody
//! can poison the cache for someone else.
//!
//! Failure modes and approximations:
//! - an authcode is `md5(timestamp + key)`, so a client that makes two
//!   calls within the same second sends the same authcode twice and its
//!   second call is `replayed`; this is the documented rule, not a bug;
//! - the replay cache holds at most `boxis.replay_cache_entries` authcodes
//!   still inside the window; when that many fresh ones are held, new
//!   requests are refused (`rate_limited`) rather than risk a replay;
//! - a restart forgets the cache: a request captured less than the window
//!   before a restart can be replayed once after it (not on a cluster
//!   node: see below).
//!
//! On a cluster node (`cluster:`) an authcode fresh in this process's cache
//! is then claimed in PostgreSQL (`cluster::sql::claim_authcode`, one
//! statement), so one accepted on any node is `replayed` on every other,
//! and after a restart; the local cache stays in front (it refuses most
//! replays without a round trip, and bounds the work). A database error
//! during the claim refuses the request `store_unavailable` (fail closed;
//! its authcode stays used on this node, so a retry needs a new
//! timestamp). `getCreditLimit` there answers the account's any-time
//! balance across the cluster, read from PostgreSQL (the node's ledger
//! holds only its grants), as Ozeki's `getcredits` does.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;

use md5::{Digest, Md5};
use parking_lot::{Mutex, RwLock};
use subtle::ConstantTimeEq;

use crate::api::boxis::form::{parse_multipart_form, Form};
use crate::api::boxis::{
    classify, parse_form, render, return_type_of, Action, BoxisRequest, CalculateCredits,
    FormLimits, ReturnType,
};
use crate::cluster::node::ClusterNode;
use crate::config::BoxisConfig;
use crate::error::ErrorCode;
use crate::service::respond::{self, Refusal, Reply, Shape};
use crate::service::{App, Outcome};

/// A Boxis user key: a secret that must be kept in clear. Never printed.
#[derive(Clone)]
pub struct UserKey(Arc<str>);

impl UserKey {
    pub fn new(key: &str) -> UserKey {
        UserKey(Arc::from(key))
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserKey(<redacted>)")
    }
}

/// Boxis identities: account name → user key, and e-mail → account name
/// (Boxis clients log in with their e-mail address).
#[derive(Default)]
pub struct UserKeys {
    inner: RwLock<KeysInner>,
}

#[derive(Default)]
struct KeysInner {
    keys: HashMap<String, UserKey>,
    /// Lower-cased e-mail → account name.
    emails: HashMap<String, String>,
}

impl fmt::Debug for UserKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.read();
        f.debug_struct("UserKeys")
            .field("keys", &inner.keys.len())
            .field("emails", &inner.emails.len())
            .finish()
    }
}

impl UserKeys {
    pub fn new() -> UserKeys {
        UserKeys::default()
    }

    /// Sets (or replaces) an account's e-mail and user key; `None` removes
    /// them.
    pub fn set(&self, account: &str, email: Option<&str>, key: Option<&str>) {
        let mut inner = self.inner.write();
        // Critical section: two map updates, no I/O.
        inner.emails.retain(|_, name| name != account);
        if let Some(email) = email {
            inner
                .emails
                .insert(email.to_lowercase(), account.to_string());
        }
        match key {
            Some(k) => inner.keys.insert(account.to_string(), UserKey::new(k)),
            None => inner.keys.remove(account),
        };
    }

    /// Resolves a Boxis `username` (account name first, then e-mail,
    /// case-insensitively) to the account and its key.
    pub fn resolve(&self, username: &str) -> Option<(String, Option<UserKey>)> {
        let inner = self.inner.read();
        // Critical section: lookups and clones only.
        let name = if inner.keys.contains_key(username) {
            username.to_string()
        } else {
            inner.emails.get(&username.to_lowercase())?.clone()
        };
        let key = inner.keys.get(&name).cloned();
        Some((name, key))
    }

    /// Accounts with a user key.
    pub fn len(&self) -> usize {
        self.inner.read().keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Lowercase hex `md5(timestamp_text + key)`.
pub fn authcode(timestamp_text: &str, key: &str) -> [u8; 32] {
    let mut h = Md5::new();
    h.update(timestamp_text.as_bytes());
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut out = [0u8; 32];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    out
}

/// Constant-time comparison of a supplied authcode (hex, any case) with the
/// expected one. The length is not secret.
fn authcode_matches(expected: &[u8; 32], supplied: &str) -> bool {
    let Ok(supplied) = <[u8; 32]>::try_from(supplied.as_bytes()) else {
        return false;
    };
    let lowered = supplied.map(|b| b.to_ascii_lowercase());
    expected.ct_eq(&lowered).into()
}

/// Whether an authcode may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayCheck {
    /// First use inside the window; now remembered.
    Fresh,
    /// Already used inside the window.
    Replayed,
    /// The cache is full of unexpired authcodes: refuse rather than forget.
    Full,
}

/// Authcodes seen inside the timestamp window, bounded in count. Each entry
/// expires when its timestamp leaves the window (after which the window
/// check refuses the request anyway).
pub struct ReplayCache {
    capacity: usize,
    inner: Mutex<ReplayInner>,
}

#[derive(Default)]
struct ReplayInner {
    /// Key → expiry (Unix seconds).
    seen: HashMap<[u8; 16], i64>,
    /// The same entries by expiry, soonest first, for eviction.
    by_expiry: BinaryHeap<Reverse<(i64, [u8; 16])>>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            capacity: capacity.max(1),
            inner: Mutex::new(ReplayInner::default()),
        }
    }

    /// The cache key of one account's authcode.
    pub fn key(account: &str, authcode: &str) -> [u8; 16] {
        let mut h = blake3::Hasher::new();
        h.update(&(account.len() as u64).to_le_bytes());
        h.update(account.as_bytes());
        h.update(authcode.to_ascii_lowercase().as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    /// Drops expired entries, then checks `key` and remembers it until
    /// `expires_at_s` if it is fresh.
    pub fn check_and_remember(&self, key: [u8; 16], expires_at_s: i64, now_s: i64) -> ReplayCheck {
        let mut inner = self.inner.lock();
        // Critical section: amortised O(log n) heap and map work, no I/O.
        while let Some(&Reverse((expiry, k))) = inner.by_expiry.peek() {
            if expiry > now_s {
                break;
            }
            inner.by_expiry.pop();
            inner.seen.remove(&k);
        }
        if inner.seen.contains_key(&key) {
            return ReplayCheck::Replayed;
        }
        if inner.seen.len() >= self.capacity {
            return ReplayCheck::Full;
        }
        inner.seen.insert(key, expires_at_s);
        inner.by_expiry.push(Reverse((expires_at_s, key)));
        ReplayCheck::Fresh
    }

    pub fn len(&self) -> usize {
        self.inner.lock().seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Boxis door's state, part of [`App`].
#[derive(Debug)]
pub struct BoxisState {
    pub keys: UserKeys,
    pub replay: ReplayCache,
}

impl fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl BoxisState {
    pub fn new(config: &BoxisConfig) -> BoxisState {
        BoxisState {
            keys: UserKeys::new(),
            replay: ReplayCache::new(config.replay_cache_entries),
        }
    }
}

/// The parts of an HTTP request the door looks at.
#[derive(Debug, Clone, Copy)]
pub struct BoxisHttpRequest<'a> {
    /// For the per-(IP, user) authentication lockout (SPEC 7).
    pub client_ip: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

/// The answer (HTTP 200 for every application error, as Boxis does),
/// labelled with its action for metrics and the access line.
pub async fn handle(app: &App, req: &BoxisHttpRequest<'_>, now_s: i64) -> Reply {
    let (label, reply) = match verify(app, req, now_s) {
        Ok(v) => match &app.cluster {
            // Boxed: only cluster nodes wait here, so the future of every
            // other request does not grow by this one's.
            Some(node) => (v.label, Box::pin(answer_cluster(app, node, v, now_s)).await),
            None => (v.label, answer(app, &v, now_s)),
        },
        Err(refused) => *refused,
    };
    reply.for_action(label)
}

/// The answer of a process that cannot decide credit now (a successor
/// whose store is not loaded in time, `handover.rs`): the request is read
/// as [`handle`] reads it, and a valid one is refused `store_unavailable`
/// before anything is checked or moved.
pub fn unavailable(app: &App, req: &BoxisHttpRequest<'_>, now_s: i64) -> Reply {
    let (label, reply) = match read(app, req, now_s) {
        Ok((label, request)) => {
            let code = ErrorCode::StoreUnavailable;
            let rt = request.return_type;
            (label, refuse(rt, code, now_s, code.message()))
        }
        Err(refused) => *refused,
    };
    reply.for_action(label)
}

/// A refused request: its action label and the refusal (boxed: the
/// accepted path stays small).
type Refused = Box<(&'static str, Reply)>;

/// A request whose authcode verified and was fresh in this process's
/// replay cache.
struct Verified {
    label: &'static str,
    rt: ReturnType,
    account: String,
    action: Action,
    replay_key: [u8; 16],
    expires_at_s: i64,
}

/// Parses and validates every field (`invalid_request`).
fn read(
    app: &App,
    req: &BoxisHttpRequest<'_>,
    now_s: i64,
) -> Result<(&'static str, BoxisRequest), Refused> {
    let sniffed = sniff_return_type(req.body);
    if !req.method.eq_ignore_ascii_case("POST") {
        return Err(Box::new((
            "other",
            refuse(sniffed, ErrorCode::InvalidRequest, now_s, "not a POST"),
        )));
    }
    let limits = FormLimits {
        max_value_len: app.config.boxis.body_limit_bytes,
        ..FormLimits::default()
    };
    let form = match read_form(req.content_type, req.body, &limits) {
        Ok(f) => f,
        Err(reason) => {
            return Err(Box::new((
                "other",
                refuse(sniffed, ErrorCode::InvalidRequest, now_s, &reason),
            )))
        }
    };
    match classify(&form) {
        Ok(r) => Ok((r.action.label(), r)),
        Err(e) => {
            let label = match form.get("action") {
                Some(a) if a.eq_ignore_ascii_case(b"calculateCredits") => "calculatecredits",
                Some(a) if a.eq_ignore_ascii_case(b"getCreditLimit") => "getcreditlimit",
                _ => "other",
            };
            Err(Box::new((
                label,
                refuse(return_type_of(&form), e.code, now_s, &e.reason),
            )))
        }
    }
}

/// Reads the request, then checks the timestamp window, the lockout, the
/// authcode and this process's replay cache (see the module docs).
fn verify(app: &App, req: &BoxisHttpRequest<'_>, now_s: i64) -> Result<Verified, Refused> {
    let (label, request) = read(app, req, now_s)?;
    let rt = request.return_type;
    let creds = &request.credentials;

    let window_s = app.config.boxis.timestamp_window_s;
    if now_s.abs_diff(creds.timestamp_s) > window_s {
        return Err(Box::new((
            label,
            refuse(
                rt,
                ErrorCode::TimestampOutOfWindow,
                now_s,
                "stale timestamp",
            ),
        )));
    }

    let resolved = app.boxis.keys.resolve(&creds.username);
    // SPEC 7: a locked (IP, user) pair is refused before any check. The
    // user is the account, so an e-mail in another case is the same user;
    // an unknown name counts lowercased.
    let lockout_user = match &resolved {
        Some((name, _)) => name.clone(),
        None => creds.username.to_lowercase(),
    };
    let snapshot = app.snapshot.load();
    if app
        .check_auth_lockout(&snapshot, req.client_ip, &lockout_user)
        .is_err()
    {
        let code = ErrorCode::RateLimited;
        return Err(Box::new((label, refuse(rt, code, now_s, code.message()))));
    }
    // Unknown users are checked against a dummy key, so the work done does
    // not reveal which names exist.
    let (account, key) = match &resolved {
        Some((name, Some(key))) => (Some(name.as_str()), key.expose()),
        _ => (None, "tollgate-no-such-boxis-user-key"),
    };
    let expected = authcode(&creds.timestamp_text, key);
    let matches = authcode_matches(&expected, &creds.authcode);
    let verified = account.filter(|_| matches);
    app.record_auth(&snapshot, req.client_ip, &lockout_user, verified.is_some());
    let Some(account) = verified else {
        return Err(Box::new((
            label,
            refuse(rt, ErrorCode::AuthFailed, now_s, "authcode"),
        )));
    };

    let replay_key = ReplayCache::key(account, &creds.authcode);
    let expires_at_s = creds
        .timestamp_s
        .saturating_add(i64::try_from(window_s).unwrap_or(i64::MAX))
        .saturating_add(1);
    match app
        .boxis
        .replay
        .check_and_remember(replay_key, expires_at_s, now_s)
    {
        ReplayCheck::Fresh => {}
        ReplayCheck::Replayed => {
            return Err(Box::new((
                label,
                refuse(rt, ErrorCode::Replayed, now_s, "authcode reused"),
            )))
        }
        ReplayCheck::Full => {
            tracing::warn!("boxis replay cache full; refusing until authcodes expire");
            return Err(Box::new((
                label,
                refuse(rt, ErrorCode::RateLimited, now_s, "replay cache full"),
            )));
        }
    }
    Ok(Verified {
        label,
        rt,
        account: account.to_string(),
        action: request.action,
        replay_key,
        expires_at_s,
    })
}

/// The answer of one process (no `cluster:`): from its ledger.
fn answer(app: &App, v: &Verified, now_s: i64) -> Reply {
    let rt = v.rt;
    let Some(view) = app.ledger.account(&v.account) else {
        return refuse(rt, ErrorCode::UnknownAccount, now_s, "no ledger account");
    };
    let credit_milli = match &v.action {
        // A balance only its store's owner may answer (pricing needs none).
        Action::GetCreditLimit => match app.ensure_owner() {
            Ok(()) => view.anytime.available_milli(),
            Err(code) => return refuse(rt, code, now_s, code.message()),
        },
        Action::CalculateCredits(calc) => match price(app, calc, view.tariff_class.as_deref()) {
            Ok(c) => c,
            Err(reason) => return refuse(rt, ErrorCode::InvalidRequest, now_s, &reason),
        },
    };
    success(rt, credit_milli, now_s)
}

/// The answer of a cluster node: the authcode must also be fresh across
/// the cluster (claimed in PostgreSQL: a replay on another node is
/// refused), and `getCreditLimit` answers the account's balance across the
/// cluster (this node's ledger holds only its grants). A database error
/// refuses the request `store_unavailable`: nothing is answered from a
/// claim that was not confirmed (the authcode stays used on this node).
async fn answer_cluster(app: &App, node: &ClusterNode, v: Verified, now_s: i64) -> Reply {
    let rt = v.rt;
    match node
        .claim_authcode(v.replay_key, v.expires_at_s, now_s)
        .await
    {
        Ok(true) => {}
        Ok(false) => return refuse(rt, ErrorCode::Replayed, now_s, "authcode reused"),
        Err(e) => {
            tracing::warn!(error = %e, "cluster: claiming a Boxis authcode failed");
            let code = ErrorCode::StoreUnavailable;
            return refuse(rt, code, now_s, code.message());
        }
    }
    match &v.action {
        Action::GetCreditLimit => {
            if app.ledger.account(&v.account).is_none() {
                return refuse(rt, ErrorCode::UnknownAccount, now_s, "no ledger account");
            }
            if let Err(code) = app.ensure_owner() {
                return refuse(rt, code, now_s, code.message());
            }
            match super::ozeki::cluster_balance(node, &v.account).await {
                Ok(balance_milli) => success(rt, balance_milli, now_s),
                Err(code) => refuse(rt, code, now_s, code.message()),
            }
        }
        // Pricing reads the tariff only.
        Action::CalculateCredits(_) => answer(app, &v, now_s),
    }
}

fn success(rt: ReturnType, credit_milli: i64, now_s: i64) -> Reply {
    Reply::local(
        200,
        render::content_type(rt),
        render::success(rt, credit_milli, now_s),
        Outcome::Ok,
    )
}

/// Credits = recipients × (parts × the account's default price), with the
/// fast-mode multiplier and its rounding applied per message.
fn price(app: &App, calc: &CalculateCredits, class: Option<&str>) -> Result<i64, String> {
    let snapshot = app.snapshot.load();
    let tariff = &snapshot.tariff;
    let count = tariff
        .count_parts(&calc.content, "")
        .map_err(|e| e.to_string())?;
    let per_message = tariff
        .default_price_milli(class)
        .checked_mul(i64::from(count.parts))
        .ok_or("price out of range")?;
    let per_message = if calc.fast {
        tariff.fast_price(per_message)
    } else {
        per_message
    };
    per_message
        .checked_mul(i64::from(calc.recipients_count))
        .ok_or_else(|| "price out of range".to_string())
}

/// The form of a request: `application/x-www-form-urlencoded` (also when
/// no `Content-Type` is given) or `multipart/form-data` (PHP's curl with
/// an array of fields); anything else is refused, naming the header.
fn read_form(content_type: Option<&str>, body: &[u8], limits: &FormLimits) -> Result<Form, String> {
    use crate::api::multipart;
    match content_type {
        Some(ct) if multipart::is_multipart(ct) => {
            let boundary = multipart::boundary(ct).map_err(|e| e.to_string())?;
            parse_multipart_form(body, &boundary, limits).map_err(|e| e.to_string())
        }
        Some(ct)
            if !ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded") =>
        {
            Err(
                "Content-Type must be application/x-www-form-urlencoded or multipart/form-data"
                    .into(),
            )
        }
        _ => parse_form(body, limits).map_err(|e| e.to_string()),
    }
}

/// The answer to a body over `boxis.body_limit_bytes` (HTTP 413).
pub fn too_large(body_prefix: &[u8], now_s: i64) -> Reply {
    let shape = Shape::Boxis {
        return_type: sniff_return_type(body_prefix),
        now_s,
    };
    let refusal = Refusal::with_text(ErrorCode::InvalidRequest, "body too large")
        .status(413)
        .outcome(Outcome::BodyTooLarge);
    respond::refuse(shape, refusal).for_action("other")
}

fn refuse(rt: ReturnType, code: ErrorCode, now_s: i64, reason: &str) -> Reply {
    let shape = Shape::Boxis {
        return_type: rt,
        now_s,
    };
    respond::refuse(shape, Refusal::with_text(code, reason))
}

/// The answer format of a body that could not be parsed: JSON only if it
/// plainly asks for it.
fn sniff_return_type(body: &[u8]) -> ReturnType {
    const NEEDLE: &[u8] = b"returntype=json";
    if body
        .windows(NEEDLE.len())
        .any(|w| w.eq_ignore_ascii_case(NEEDLE))
    {
        ReturnType::Json
    } else {
        ReturnType::Xml
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authcode_is_lowercase_hex_md5_of_timestamp_and_key() {
        // md5("1336553826BX3KwWU2SuqvoEWnjYmOibf"), computed independently.
        let code = authcode("1336553826", "BX3KwWU2SuqvoEWnjYmOibf");
        let text = std::str::from_utf8(&code).unwrap();
        assert_eq!(text.len(), 32);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(
            text,
            format!("{:x}", Md5::digest(b"1336553826BX3KwWU2SuqvoEWnjYmOibf"))
        );
        assert!(authcode_matches(&code, text));
        assert!(authcode_matches(&code, &text.to_ascii_uppercase()));
        assert!(!authcode_matches(&code, &text[..31]));
        assert!(!authcode_matches(&code, &format!("{}0", &text[..31])));
    }

    #[test]
    fn keys_resolve_by_name_then_email_and_never_print() {
        let keys = UserKeys::new();
        keys.set("john", Some("John@Example.com"), Some("k1-secret"));
        keys.set("nokey", Some("nokey@example.com"), None);
        let (name, key) = keys.resolve("john@example.COM").unwrap();
        assert_eq!(name, "john");
        assert_eq!(key.unwrap().expose(), "k1-secret");
        assert_eq!(keys.resolve("john").unwrap().0, "john");
        assert!(keys.resolve("nokey@example.com").unwrap().1.is_none());
        assert!(keys.resolve("nobody").is_none());
        keys.set("john", None, Some("k2"));
        assert!(keys.resolve("john@example.com").is_none());
        assert!(!format!("{keys:?} {:?}", UserKey::new("k1-secret")).contains("secret"));
    }

    #[test]
    fn replay_cache_remembers_expires_and_stays_bounded() {
        let cache = ReplayCache::new(3);
        let k = |i: u8| [i; 16];
        assert_eq!(cache.check_and_remember(k(1), 100, 0), ReplayCheck::Fresh);
        assert_eq!(
            cache.check_and_remember(k(1), 100, 50),
            ReplayCheck::Replayed
        );
        assert_eq!(cache.check_and_remember(k(2), 10, 0), ReplayCheck::Fresh);
        assert_eq!(cache.check_and_remember(k(3), 20, 0), ReplayCheck::Fresh);
        // Full of unexpired authcodes: refuse, never forget one.
        assert_eq!(cache.check_and_remember(k(4), 30, 5), ReplayCheck::Full);
        assert_eq!(
            cache.check_and_remember(k(1), 100, 5),
            ReplayCheck::Replayed
        );
        // Time passes: k2 and k3 expire and make room.
        assert_eq!(cache.check_and_remember(k(4), 30, 20), ReplayCheck::Fresh);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.check_and_remember(k(2), 40, 21), ReplayCheck::Fresh);
        assert_eq!(cache.check_and_remember(k(1), 200, 101), ReplayCheck::Fresh);
        // Keys are per account.
        assert_ne!(ReplayCache::key("a", "x"), ReplayCache::key("b", "x"));
        assert_eq!(ReplayCache::key("a", "AB"), ReplayCache::key("a", "ab"));
    }

    #[test]
    fn sniffs_json_only_when_asked() {
        assert_eq!(
            sniff_return_type(b"a=%zz&returntype=JSON"),
            ReturnType::Json
        );
        assert_eq!(sniff_return_type(b"a=%zz"), ReturnType::Xml);
    }
}
