//! Shared mutable state of a running simulator: users and balances, the
//! inbox, armed faults, run-time latency, counters and the request log.
//!
//! The benchmark path touches only atomics and (for credit actions) one
//! short-lived lock; the request log is a mutex-protected `Vec` that can be
//! switched off with `--no-record`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::render::InboxMessage;

/// One simulated Ozeki user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub password: String,
    pub balance: i64,
    pub admin: bool,
}

impl User {
    /// Parses `NAME:PASSWORD:BALANCE[:admin]`.
    pub fn parse_spec(spec: &str) -> Result<User, String> {
        let parts: Vec<&str> = spec.split(':').collect();
        let bad = || format!("invalid user spec {spec:?}: expected NAME:PASSWORD:BALANCE[:admin]");
        let (name, password, balance, admin) = match parts.as_slice() {
            [n, p, b] => (n, p, b, false),
            [n, p, b, a] if a.eq_ignore_ascii_case("admin") => (n, p, b, true),
            _ => return Err(bad()),
        };
        if name.is_empty() {
            return Err(bad());
        }
        let balance = balance.trim().parse::<i64>().map_err(|_| bad())?;
        Ok(User {
            name: name.to_string(),
            password: password.to_string(),
            balance,
            admin,
        })
    }
}

/// A fault injected into upcoming API requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// HTTP 500 with a small HTML body.
    Http500,
    /// HTTP 503 with a small HTML body.
    Http503,
    /// Read the whole request, then drop the connection without answering.
    Reset,
    /// HTTP 200 `application/xml` whose body is not XML.
    Garbage,
    /// Read the request, wait 60 s, then answer normally.
    Hang,
    /// Wait this long, then answer normally.
    Delay(Duration),
}

impl FaultMode {
    /// The mode's name as accepted by `/sim/fault?mode=`.
    pub fn name(&self) -> &'static str {
        match self {
            FaultMode::Http500 => "http500",
            FaultMode::Http503 => "http503",
            FaultMode::Reset => "reset",
            FaultMode::Garbage => "garbage",
            FaultMode::Hang => "hang",
            FaultMode::Delay(_) => "delay",
        }
    }

    /// Parses a `mode` (and `ms` for `delay`); `Ok(None)` means `none`.
    pub fn parse(mode: &str, ms: Option<u64>) -> Result<Option<FaultMode>, String> {
        Ok(Some(match mode.to_ascii_lowercase().as_str() {
            "none" | "" => return Ok(None),
            "http500" | "500" => FaultMode::Http500,
            "http503" | "503" => FaultMode::Http503,
            "reset" => FaultMode::Reset,
            "garbage" => FaultMode::Garbage,
            "hang" => FaultMode::Hang,
            "delay" => FaultMode::Delay(Duration::from_millis(
                ms.ok_or_else(|| "mode=delay needs ms=N".to_string())?,
            )),
            other => return Err(format!("unknown fault mode {other:?}")),
        }))
    }
}

#[derive(Debug)]
struct ArmedFault {
    mode: FaultMode,
    /// `None`: until cleared.
    remaining: Option<u64>,
}

/// One recorded API request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub seq: u64,
    pub conn: u64,
    pub remote: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: bytes::Bytes,
    pub headers: Vec<(String, String)>,
    pub action: Option<String>,
    pub recipients: usize,
    pub fault: Option<FaultMode>,
}

impl RequestRecord {
    /// JSON form used by `GET /sim/requests`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut headers = serde_json::Map::new();
        for (name, value) in &self.headers {
            match headers.get_mut(name) {
                Some(serde_json::Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(value);
                }
                _ => {
                    headers.insert(name.clone(), value.clone().into());
                }
            }
        }
        serde_json::json!({
            "seq": self.seq,
            "conn": self.conn,
            "remote": self.remote,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "body": String::from_utf8_lossy(&self.body),
            "body_len": self.body.len(),
            "body_blake3": blake3::hash(&self.body).to_hex().as_str(),
            "headers": headers,
            "action": self.action,
            "recipients": self.recipients,
            "fault": self.fault.map(|f| f.name()),
        })
    }
}

/// Counters reported by `GET /sim/stats`.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub sendmessage: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub messages_rejected: AtomicU64,
    pub faults: AtomicU64,
}

/// Everything a running simulator shares between connections.
#[derive(Debug)]
pub struct SimState {
    pub users: Mutex<HashMap<String, User>>,
    pub reject_prefixes: Vec<String>,
    pub record: bool,
    pub verbose: bool,
    pub counters: Counters,
    latency_ms: AtomicU64,
    fault_armed: AtomicBool,
    fault: Mutex<Option<ArmedFault>>,
    log: Mutex<Vec<RequestRecord>>,
    seq: AtomicU64,
    conn_seq: AtomicU64,
    inbox: Mutex<VecDeque<InboxMessage>>,
    inbox_seq: AtomicU64,
    id_seed: u64,
    id_seq: AtomicU64,
    /// Delivery-report rules and the calls made (`super::dlr`).
    pub dlr: super::dlr::DlrSim,
}

/// 36^8: the number of distinct 8-character message ids.
const ID_SPACE: u64 = 2_821_109_907_456;
/// A prime step (coprime with 36): consecutive ids look unrelated but never
/// repeat within `ID_SPACE` messages.
const ID_STEP: u64 = 2_654_435_761;
const ID_ALPHABET: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

impl SimState {
    pub fn new(
        users: Vec<User>,
        reject_prefixes: Vec<String>,
        latency_ms: u64,
        record: bool,
        verbose: bool,
    ) -> SimState {
        let id_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()) << 20;
        SimState {
            users: Mutex::new(users.into_iter().map(|u| (u.name.clone(), u)).collect()),
            reject_prefixes: reject_prefixes
                .into_iter()
                .map(|p| p.trim().trim_start_matches('+').to_string())
                .filter(|p| !p.is_empty())
                .collect(),
            record,
            verbose,
            counters: Counters::default(),
            latency_ms: AtomicU64::new(latency_ms),
            fault_armed: AtomicBool::new(false),
            fault: Mutex::new(None),
            log: Mutex::new(Vec::new()),
            seq: AtomicU64::new(0),
            conn_seq: AtomicU64::new(0),
            inbox: Mutex::new(VecDeque::new()),
            inbox_seq: AtomicU64::new(0),
            id_seed: id_seed % ID_SPACE,
            id_seq: AtomicU64::new(0),
            dlr: super::dlr::DlrSim::default(),
        }
    }

    /// A fresh unique message id: 8 upper-case alphanumerics.
    pub fn next_message_id(&self) -> String {
        let n = self.id_seq.fetch_add(1, Ordering::Relaxed);
        let mut v = ((u128::from(n) * u128::from(ID_STEP) + u128::from(self.id_seed))
            % u128::from(ID_SPACE)) as u64;
        let mut id = [b'A'; 8];
        for slot in id.iter_mut().rev() {
            *slot = ID_ALPHABET[(v % 36) as usize];
            v /= 36;
        }
        String::from_utf8_lossy(&id).into_owned()
    }

    /// Whether a recipient is rejected by a `--reject-prefix`.
    pub fn is_rejected(&self, recipient: &str) -> bool {
        let number = recipient.trim().trim_start_matches('+');
        self.reject_prefixes
            .iter()
            .any(|p| number.starts_with(p.as_str()))
    }

    /// Checks credentials; returns a copy of the user on success.
    pub fn authenticate(&self, username: Option<&str>, password: Option<&str>) -> Option<User> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let user = users.get(username?)?;
        (user.password == password.unwrap_or("")).then(|| user.clone())
    }

    /// Runs `f` on the named user's record.
    pub fn with_user<R>(&self, name: &str, f: impl FnOnce(&mut User) -> R) -> Option<R> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.get_mut(name).map(f)
    }

    /// Current per-request latency.
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms.load(Ordering::Relaxed))
    }

    pub fn set_latency_ms(&self, ms: u64) {
        self.latency_ms.store(ms, Ordering::Relaxed);
    }

    /// Arms `mode` for the next `count` requests (`0`: until cleared);
    /// `None` clears any armed fault.
    pub fn arm_fault(&self, mode: Option<FaultMode>, count: u64) {
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        *fault = mode.map(|mode| ArmedFault {
            mode,
            remaining: (count != 0).then_some(count),
        });
        self.fault_armed.store(fault.is_some(), Ordering::Release);
    }

    /// Takes the fault for the current request, if one is armed.
    pub fn take_fault(&self) -> Option<FaultMode> {
        if !self.fault_armed.load(Ordering::Acquire) {
            return None;
        }
        let mut slot = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        let armed = slot.as_mut()?;
        let mode = armed.mode;
        if let Some(rem) = armed.remaining.as_mut() {
            *rem -= 1;
            if *rem == 0 {
                *slot = None;
                self.fault_armed.store(false, Ordering::Release);
            }
        }
        Some(mode)
    }

    /// A fresh connection number.
    pub fn next_conn(&self) -> u64 {
        self.conn_seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A fresh request sequence number.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Appends to the request log (no-op with `--no-record`).
    pub fn record(&self, rec: RequestRecord) {
        if self.record {
            self.log.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
        }
    }

    /// The request log as a JSON array.
    pub fn requests_json(&self) -> serde_json::Value {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::Value::Array(log.iter().map(RequestRecord::to_json).collect())
    }

    /// Counters as JSON.
    pub fn stats_json(&self) -> serde_json::Value {
        let c = &self.counters;
        serde_json::json!({
            "requests": c.requests.load(Ordering::Relaxed),
            "sendmessage": c.sendmessage.load(Ordering::Relaxed),
            "messages_accepted": c.messages_accepted.load(Ordering::Relaxed),
            "messages_rejected": c.messages_rejected.load(Ordering::Relaxed),
            "faults": c.faults.load(Ordering::Relaxed),
            "inbox": self.inbox.lock().unwrap_or_else(|e| e.into_inner()).len(),
            "latency_ms": self.latency_ms.load(Ordering::Relaxed),
            "recording": self.record,
        })
    }

    /// Clears the request log and counters (users, inbox and faults stay).
    pub fn reset(&self) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let c = &self.counters;
        for a in [
            &c.requests,
            &c.sendmessage,
            &c.messages_accepted,
            &c.messages_rejected,
            &c.faults,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.seq.store(0, Ordering::Relaxed);
    }

    /// Adds `count` synthetic incoming messages to the inbox.
    pub fn add_inbox(&self, count: usize, recipient: Option<&str>, text: Option<&str>) {
        let now = chrono::Local::now();
        let sent = (now - chrono::Duration::seconds(5))
            .format("%Y-%m-%d %H:%M:%S")
            .to_string();
        let received = now.format("%Y-%m-%d %H:%M:%S").to_string();
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..count {
            let n = self.inbox_seq.fetch_add(1, Ordering::Relaxed) + 1;
            inbox.push_back(InboxMessage {
                messageid: self.next_message_id(),
                originator: format!("+3630{:07}", n % 10_000_000),
                recipient: recipient.unwrap_or("+36201112222").to_string(),
                messagetype: "SMS:TEXT".to_string(),
                messagedata: text.map_or_else(|| format!("Incoming message {n}"), str::to_string),
                senttime: sent.clone(),
                receivedtime: received.clone(),
            });
        }
    }

    /// Removes and returns up to `limit` inbox messages (all when `None`).
    pub fn take_inbox(&self, limit: Option<usize>) -> Vec<InboxMessage> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        let n = limit.unwrap_or(inbox.len()).min(inbox.len());
        inbox.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn state() -> SimState {
        SimState::new(
            vec![User::parse_spec("john:secret1:744").unwrap()],
            vec!["+3699".into(), "44".into()],
            0,
            true,
            false,
        )
    }

    #[test]
    fn user_specs() {
        let u = User::parse_spec("admin:abc123:1000:admin").unwrap();
        assert!(u.admin);
        assert_eq!(
            (u.name.as_str(), u.password.as_str(), u.balance),
            ("admin", "abc123", 1000)
        );
        assert!(!User::parse_spec("john:s:-5").unwrap().admin);
        assert!(User::parse_spec("john:s").is_err());
        assert!(User::parse_spec("john:s:x").is_err());
        assert!(User::parse_spec("john:s:1:root").is_err());
        assert!(User::parse_spec(":s:1").is_err());
    }

    #[test]
    fn message_ids_are_unique_uppercase_alnum() {
        let s = state();
        let ids: HashSet<String> = (0..10_000).map(|_| s.next_message_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in &ids {
            assert_eq!(id.len(), 8);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
        }
    }

    #[test]
    fn reject_prefixes_ignore_plus() {
        let s = state();
        assert!(s.is_rejected("+3699123"));
        assert!(s.is_rejected("3699123"));
        assert!(s.is_rejected("+44123"));
        assert!(!s.is_rejected("+3620123"));
    }

    #[test]
    fn authentication() {
        let s = state();
        assert!(s.authenticate(Some("john"), Some("secret1")).is_some());
        assert!(s.authenticate(Some("john"), Some("nope")).is_none());
        assert!(s.authenticate(Some("jane"), Some("secret1")).is_none());
        assert!(s.authenticate(None, None).is_none());
    }

    #[test]
    fn faults_count_down_and_clear() {
        let s = state();
        assert_eq!(s.take_fault(), None);
        s.arm_fault(Some(FaultMode::Http500), 2);
        assert_eq!(s.take_fault(), Some(FaultMode::Http500));
        assert_eq!(s.take_fault(), Some(FaultMode::Http500));
        assert_eq!(s.take_fault(), None);
        s.arm_fault(Some(FaultMode::Garbage), 0);
        for _ in 0..5 {
            assert_eq!(s.take_fault(), Some(FaultMode::Garbage));
        }
        s.arm_fault(None, 0);
        assert_eq!(s.take_fault(), None);
    }

    #[test]
    fn fault_mode_parsing() {
        assert_eq!(FaultMode::parse("none", None), Ok(None));
        assert_eq!(
            FaultMode::parse("HTTP503", None),
            Ok(Some(FaultMode::Http503))
        );
        assert_eq!(
            FaultMode::parse("delay", Some(250)),
            Ok(Some(FaultMode::Delay(Duration::from_millis(250))))
        );
        assert!(FaultMode::parse("delay", None).is_err());
        assert!(FaultMode::parse("explode", None).is_err());
    }

    #[test]
    fn inbox_drains() {
        let s = state();
        s.add_inbox(3, None, None);
        assert_eq!(s.take_inbox(Some(2)).len(), 2);
        let rest = s.take_inbox(None);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].messagedata, "Incoming message 3");
        assert!(s.take_inbox(None).is_empty());
    }
}
