//! Delivery reports, as the gateway sends them: after accepting a message
//! whose `sendmessage` carried a `reporturl`, the simulator calls that URL
//! with the keywords filled in (`$messageid`, `$recipient`,
//! `$originator`, `$messagedata`, `$deliverystatus`,
//! `$deliveryreportdate`, and `$part` when parts are reported), each value
//! percent-encoded.
//!
//! Rules (`POST /sim/dlr?prefix=P&outcome=O&delay_ms=N&duplicates=K&parts=N`,
//! first matching recipient prefix wins, `prefix=` matches all; `POST
//! /sim/dlr?reset=1` clears them) choose the outcome per recipient:
//! `delivered`, `failed` (status `undelivered`), `expired`, `rejected`,
//! or `never` (no report); a comma list (`delivered,failed`) gives part
//! p the p-th outcome. `POST /sim/dlr/mode?reverse=1&early=1`:
//! reports of one send go out in reverse order (out of order), and/or
//! before the send's answer is written (`early`). A callback that does not
//! answer 2xx is retried (up to 5 times, 100 ms apart), as a gateway
//! retries. `POST /sim/dlr/hold?on=1` holds every report due from then
//! on (after its delay) until `POST /sim/dlr/hold?on=0`, so a test can
//! look at a send's state before any of its reports, however slow the
//! machine. `GET /sim/dlr` lists the calls made and their statuses.
//!
//! Without a rule, every accepted message is reported `delivered` at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::state::SimState;

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlrRule {
    pub prefix: String,
    /// `delivered`, `failed`, `expired`, `rejected`, `never`, or a raw
    /// status value (`status:VALUE`).
    pub outcome: String,
    pub delay_ms: u64,
    pub duplicates: u32,
    /// Report each of this many parts separately (0: one report).
    pub parts: u32,
}

/// A callback made.
#[derive(Debug, Clone)]
pub struct DlrCall {
    pub url: String,
    pub status: u16,
}

#[derive(Debug)]
pub struct DlrSim {
    rules: Mutex<Vec<DlrRule>>,
    pub reverse: AtomicBool,
    pub early: AtomicBool,
    /// `true`: reports wait (see the module docs).
    held: tokio::sync::watch::Sender<bool>,
    calls: Mutex<Vec<DlrCall>>,
}

impl Default for DlrSim {
    fn default() -> DlrSim {
        DlrSim {
            rules: Mutex::default(),
            reverse: AtomicBool::default(),
            early: AtomicBool::default(),
            held: tokio::sync::watch::Sender::new(false),
            calls: Mutex::default(),
        }
    }
}

/// A message the gateway accepted, as its report needs it.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub message_id: String,
    pub recipient: String,
    pub originator: String,
    pub messagedata: String,
}

impl DlrSim {
    pub fn add_rule(&self, rule: DlrRule) {
        self.rules.lock().push(rule);
    }

    /// Holds (`true`) or releases the reports due.
    pub fn hold(&self, on: bool) {
        self.held.send_replace(on);
    }

    pub fn reset(&self) {
        self.hold(false);
        self.rules.lock().clear();
        self.calls.lock().clear();
        self.reverse.store(false, Ordering::Relaxed);
        self.early.store(false, Ordering::Relaxed);
    }

    fn rule_for(&self, recipient: &str) -> DlrRule {
        let number = recipient.trim().trim_start_matches('+');
        self.rules
            .lock()
            .iter()
            .find(|r| number.starts_with(r.prefix.trim_start_matches('+')))
            .cloned()
            .unwrap_or(DlrRule {
                prefix: String::new(),
                outcome: "delivered".into(),
                delay_ms: 0,
                duplicates: 0,
                parts: 0,
            })
    }

    pub fn calls_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.calls
                .lock()
                .iter()
                .map(|c| serde_json::json!({"url": c.url, "status": c.status}))
                .collect(),
        )
    }
}

fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Fills `$keywords` of `template` (whole words; unknown ones kept).
pub fn fill(template: &str, values: &[(&str, String)]) -> String {
    let bytes = template.as_bytes();
    let mut out = String::with_capacity(template.len() + 64);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let mut j = i + 1;
            while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                j += 1;
            }
            let word = &template[i..j];
            if let Some((_, v)) = values.iter().find(|(k, _)| *k == word) {
                out.push_str(&encode(v));
            } else {
                out.push_str(word);
            }
            i = j.max(i + 1);
        } else {
            let next = template[i..].find('$').map_or(bytes.len(), |k| i + k);
            out.push_str(&template[i..next]);
            i = next;
        }
    }
    out
}

fn status_of(outcome: &str) -> Option<String> {
    match outcome {
        "never" => None,
        "delivered" => Some("delivered".into()),
        "failed" => Some("undelivered".into()),
        "expired" => Some("expired".into()),
        "rejected" => Some("rejected".into()),
        raw => Some(raw.strip_prefix("status:").unwrap_or(raw).to_string()),
    }
}

/// The URLs to call for one send, in the order they go out.
pub fn plan(sim: &DlrSim, template: &str, accepted: &[Accepted]) -> Vec<(u64, String)> {
    let mut calls = Vec::new();
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
    for a in accepted {
        let rule = sim.rule_for(&a.recipient);
        // `outcome=delivered,failed`: part p takes the p-th (cycling).
        let outcomes: Vec<&str> = rule.outcome.split(',').map(str::trim).collect();
        let parts: Vec<Option<u32>> = if rule.parts == 0 {
            vec![None]
        } else {
            (1..=rule.parts).map(Some).collect()
        };
        for part in parts {
            let pick = part.map_or(0, |p| (p as usize - 1) % outcomes.len());
            let Some(status) = status_of(outcomes[pick]) else {
                continue;
            };
            let mut values = vec![
                ("$messageid", a.message_id.clone()),
                ("$recipient", a.recipient.clone()),
                ("$originator", a.originator.clone()),
                ("$messagedata", a.messagedata.clone()),
                ("$deliverystatus", status.clone()),
                ("$deliveryreportdate", date.clone()),
            ];
            if let Some(p) = part {
                values.push(("$part", p.to_string()));
            }
            let url = fill(template, &values);
            for _ in 0..=rule.duplicates {
                calls.push((rule.delay_ms, url.clone()));
            }
        }
    }
    if sim.reverse.load(Ordering::Relaxed) {
        calls.reverse();
    }
    calls
}

/// Calls every planned URL (each after its delay, retried on non-2xx).
pub async fn deliver(state: Arc<SimState>, calls: Vec<(u64, String)>) {
    for (delay_ms, url) in calls {
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        // The sender lives as long as the state; a closed channel releases.
        let _ = state.dlr.held.subscribe().wait_for(|held| !held).await;
        let mut status = 0;
        for attempt in 0..5 {
            status = get(&url).await.unwrap_or(0);
            if (200..300).contains(&status) {
                break;
            }
            if attempt < 4 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        state.dlr.calls.lock().push(DlrCall { url, status });
    }
}

/// One `GET` over a fresh connection; the status code.
async fn get(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(2).any(|w| w == b"\r\n") {
                break;
            }
        }
        let line = String::from_utf8_lossy(&buf);
        line.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_filled_and_encoded() {
        assert_eq!(
            fill(
                "http://c/r?id=$messageid&to=$recipient&s=$deliverystatus&x=$unknown",
                &[
                    ("$messageid", "A B".into()),
                    ("$recipient", "+3620".into()),
                    ("$deliverystatus", "delivered".into())
                ]
            ),
            "http://c/r?id=A%20B&to=%2B3620&s=delivered&x=$unknown"
        );
    }

    #[test]
    fn rules_pick_outcomes_parts_and_duplicates() {
        let sim = DlrSim::default();
        sim.add_rule(DlrRule {
            prefix: "3699".into(),
            outcome: "never".into(),
            delay_ms: 0,
            duplicates: 0,
            parts: 0,
        });
        sim.add_rule(DlrRule {
            prefix: "3630".into(),
            outcome: "failed".into(),
            delay_ms: 0,
            duplicates: 1,
            parts: 2,
        });
        let a = |r: &str| Accepted {
            message_id: "M".into(),
            recipient: r.into(),
            originator: String::new(),
            messagedata: "hi".into(),
        };
        let calls = plan(
            &sim,
            "http://t/?s=$deliverystatus&p=$part",
            &[a("+3699000"), a("+3630000"), a("+3620000")],
        );
        let urls: Vec<&str> = calls.iter().map(|(_, u)| u.as_str()).collect();
        assert_eq!(
            urls,
            vec![
                "http://t/?s=undelivered&p=1",
                "http://t/?s=undelivered&p=1",
                "http://t/?s=undelivered&p=2",
                "http://t/?s=undelivered&p=2",
                "http://t/?s=delivered&p=$part",
            ]
        );
    }
}
