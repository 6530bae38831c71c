//! The outbox's own rules, over the SQLite file and memory, with a tiny
//! receiver on a real socket.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::clock::SystemClock;
use std::path::PathBuf;

fn item(target: &str, key: &str) -> NewItem {
    NewItem {
        kind: "dlr_relay",
        target: target.to_string(),
        method: "GET".into(),
        headers: vec![],
        body: vec![],
        dedupe_key: key.to_string(),
    }
}

fn config(path: Option<PathBuf>) -> OutboxConfig {
    OutboxConfig {
        path,
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(80),
        give_up_after: Duration::from_secs(60),
        request_timeout: Duration::from_millis(500),
        ..OutboxConfig::default()
    }
}

/// A receiver answering `status` (changeable) and counting calls.
struct Receiver {
    addr: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
}

async fn receiver(status: u16) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let code = Arc::new(AtomicU16::new(status));
    let (c, s) = (calls.clone(), code.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (c, s) = (c.clone(), s.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                c.fetch_add(1, Ordering::SeqCst);
                let code = s.load(Ordering::SeqCst);
                let _ = sock
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
    Receiver {
        addr,
        calls,
        status: code,
    }
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached");
}

fn open(cfg: &OutboxConfig) -> Arc<Outbox> {
    Arc::new(Outbox::open(cfg, Arc::new(SystemClock::new()), Arc::new(Metrics::new())).unwrap())
}

#[tokio::test]
async fn a_dedupe_key_is_enqueued_once_and_state_commits_with_it() {
    let o = open(&config(None));
    let out = o
        .commit(vec![
            Change::Enqueue(item("http://127.0.0.1:1/x", "k1")),
            Change::Put("ns".into(), "a".into(), b"1".to_vec()),
            Change::Enqueue(item("http://127.0.0.1:1/x", "k1")),
        ])
        .await
        .unwrap();
    assert!(matches!(out[0], Some(Enqueued::New(_))));
    assert_eq!(out[1], None);
    assert!(matches!(
        out[2],
        Some(Enqueued::Duplicate(_, ItemState::Pending))
    ));
    assert!(matches!(
        o.enqueue(item("http://127.0.0.1:1/x", "k1")).await.unwrap(),
        Enqueued::Duplicate(_, ItemState::Pending)
    ));
    assert_eq!(
        o.state_rows("ns").await.unwrap(),
        vec![("a".to_string(), b"1".to_vec())]
    );
    assert!(matches!(
        o.enqueue(item("http://x/", "")).await,
        Err(OutboxError::Invalid(_))
    ));
}

#[tokio::test]
async fn a_full_outbox_refuses_new_items_and_writes_nothing() {
    let o = open(&OutboxConfig {
        max_pending: 1,
        ..config(None)
    });
    o.enqueue(item("http://127.0.0.1:1/", "a")).await.unwrap();
    let r = o
        .commit(vec![
            Change::Put("ns".into(), "x".into(), vec![]),
            Change::Enqueue(item("http://127.0.0.1:1/", "b")),
        ])
        .await;
    assert_eq!(r, Err(OutboxError::Full));
    assert!(o.state_rows("ns").await.unwrap().is_empty());
    // A duplicate of a held key is still answered.
    assert!(matches!(
        o.enqueue(item("http://127.0.0.1:1/", "a")).await,
        Ok(Enqueued::Duplicate(..))
    ));
}

#[tokio::test]
async fn the_relay_retries_until_a_2xx_then_never_again_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let rx = receiver(503).await;
    let target = format!("http://{}/report?x=1", rx.addr);
    {
        let o = open(&config(Some(path.clone())));
        o.enqueue(item(&target, "once")).await.unwrap();
        // Reopened before any relay: the item is durable.
    }
    let o = open(&config(Some(path.clone())));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn(o.clone().relay(stop));
    let calls = rx.calls.clone();
    wait_for(|| calls.load(Ordering::SeqCst) >= 3).await;
    rx.status.store(200, Ordering::SeqCst);
    let o2 = o.clone();
    wait_for(move || futures_done(&o2)).await;
    let after = rx.calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rx.calls.load(Ordering::SeqCst),
        after,
        "sent again after a 2xx"
    );
    assert!(matches!(
        o.enqueue(item(&target, "once")).await.unwrap(),
        Enqueued::Duplicate(_, ItemState::Done)
    ));
    stop_tx.send(true).unwrap();
    relay.await.unwrap();
    drop(o);
    // Reopened: still done, never relayed again.
    let o = open(&config(Some(path)));
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(o.clone().relay(stop));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.calls.load(Ordering::SeqCst), after);
}

/// Whether the one item is done (polled from a sync closure).
fn futures_done(o: &Arc<Outbox>) -> bool {
    let o = o.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { !o.list(ItemState::Done, 10).await.unwrap().is_empty() })
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn an_item_is_given_up_after_its_time_and_listed() {
    let rx = receiver(500).await;
    let o = open(&OutboxConfig {
        give_up_after: Duration::from_millis(150),
        ..config(None)
    });
    o.enqueue(item(&format!("http://{}/", rx.addr), "g"))
        .await
        .unwrap();
    // A URL the outbox cannot call: every attempt fails until given up.
    o.enqueue(item("ftp://example.com/", "tls")).await.unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(o.clone().relay(stop));
    let o2 = o.clone();
    wait_for(move || {
        let o = o2.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async { o.list(ItemState::GaveUp, 10).await.unwrap().len() == 2 })
        })
        .join()
        .unwrap()
    })
    .await;
    let gave_up = o.list(ItemState::GaveUp, 10).await.unwrap();
    assert!(gave_up
        .iter()
        .any(|i| i.last_error.as_deref() == Some("answered HTTP 500")));
    assert!(gave_up
        .iter()
        .any(|i| i.last_error.as_deref()
            == Some("not an http:// or https:// URL the outbox can call")));
    o.refresh().await;
    let text = o.metrics.render();
    assert!(
        text.contains("tollgate_outbox_given_up{kind=\"dlr_relay\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tollgate_outbox_attempts_total{kind=\"dlr_relay\",result=\"gave_up\"} 2")
    );
}

#[test]
fn backoff_grows_and_stays_under_its_ceiling() {
    let o = Outbox::open(
        &config(None),
        Arc::new(SystemClock::new()),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    for attempts in 1..20 {
        let d = o.backoff(attempts).as_millis() as u64;
        assert!((1..=80).contains(&d), "{attempts}: {d}");
    }
}
