//! The relay: credit requests that reach the old process while it hands
//! over are decided by the successor, over the unix socket
//! `<upgrade.sock>.relay` (`frame.rs` is the wire format).
//!
//! Why a socket of its own and not the successor's HTTP port: the
//! successor's listening sockets are the *same* sockets as the old
//! process's (pingora hands the descriptors over), so a connection to the
//! port could land on the old process itself. The relay socket is bound
//! afresh by each successor at its start (the path unlinked first), so a
//! connection to the path reaches the newest process; the old process
//! closes its own relay listener when it starts handing over, and a
//! process that is handing over answers a relayed request "misdirected"
//! without touching it, so a request can never loop.
//!
//! # Failure modes
//! - No successor listening yet (or the socket refuses): the request waits
//!   and the connect is retried every [`RETRY`] until the client's wait
//!   (`upgrade.wait_max_ms`) is spent, then `store_unavailable` in the
//!   door's shape: nothing was decided anywhere.
//! - The connection breaks before the whole frame was written: retried
//!   (the successor never decides a partial frame).
//! - The connection breaks after the frame was written and before the
//!   answer: the successor may have decided it (a send may have gone out),
//!   so it is *not* retried; the client gets `store_unavailable`, and the
//!   ledger holds whatever the successor did (a send's reservation, in
//!   doubt if the successor died).
//! - A malformed or oversized frame: the connection is closed, nothing
//!   decided.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::frame::{self, Answer, FrameError, RelayedRequest};
use super::{serve_relayed, Readiness, Slot};
use crate::service::{self, Reply, Request};

/// Pause between two connection attempts to the successor.
pub const RETRY: Duration = Duration::from_millis(5);
/// Longest the successor waits for a whole request frame.
const READ_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest frame either side accepts: the largest request body a door
/// takes, plus room for the head and the answer's fields.
pub fn max_frame(config: &crate::config::Config) -> usize {
    config
        .ozeki
        .body_limit_bytes
        .max(config.boxis.body_limit_bytes)
        .max(config.soap.body_limit_bytes)
        .saturating_mul(2)
        .saturating_add(1 << 20)
}

/// The old process: has the successor decide `req`; the client waits at
/// most until `deadline` for a process that serves (see the module docs).
pub async fn relay(slot: &Arc<Slot>, req: Request<'_>, deadline: tokio::time::Instant) -> Reply {
    let app = slot.current();
    let path = slot.upgrade().relay_sock();
    let max = max_frame(&app.config);
    // The successor's own answer may include a gateway round trip.
    let answer_timeout = app.config.upstream.read_timeout
        + app.config.upstream.connect_timeout
        + Duration::from_secs(5);
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(
                relay = %path.display(),
                "no successor answered within upgrade.wait_max_ms; a credit request is refused"
            );
            return service::unavailable(&app, req).await;
        }
        let relayed = match RelayedRequest::capture(&req, deadline - now) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "a credit request cannot be relayed");
                return service::unavailable(&app, req).await;
            }
        };
        match exchange(&path, &relayed.encode(), max, answer_timeout).await {
            Ok(Answer::Answered(reply)) => return reply,
            Ok(Answer::Misdirected) => tokio::time::sleep(RETRY).await,
            Err(Attempt::NotSent(e)) => {
                tracing::trace!(error = %e, relay = %path.display(), "the successor is not reachable yet");
                tokio::time::sleep(RETRY).await;
            }
            Err(Attempt::Lost(e)) => {
                tracing::error!(
                    error = %e,
                    request_id = %req.request_id,
                    "the successor took a relayed credit request and gave no answer; it is not retried (it may have been decided)"
                );
                return service::unavailable(&app, req).await;
            }
        }
    }
}

/// Why one relay attempt gave no answer.
#[derive(Debug)]
enum Attempt {
    /// The frame did not reach the successor whole: safe to try again.
    NotSent(std::io::Error),
    /// The frame was delivered; the answer was lost.
    Lost(String),
}

async fn exchange(
    path: &Path,
    request: &[u8],
    max: usize,
    answer_timeout: Duration,
) -> Result<Answer, Attempt> {
    let mut stream = UnixStream::connect(path).await.map_err(Attempt::NotSent)?;
    stream.write_all(request).await.map_err(Attempt::NotSent)?;
    let read = async {
        let mut prefix = [0u8; 8];
        stream
            .read_exact(&mut prefix)
            .await
            .map_err(|e| e.to_string())?;
        let len = frame::frame_len(&prefix, frame::ANSWER_MAGIC, max).map_err(|e| e.to_string())?;
        let mut body = vec![0u8; len];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        frame::decode_answer(&body).map_err(|e| e.to_string())
    };
    match tokio::time::timeout(answer_timeout, read).await {
        Ok(Ok(answer)) => Ok(answer),
        // A successor that read the frame always answers (a process that
        // is handing over answers "misdirected"); a close without one is
        // a successor that died or a frame it refused: not retried.
        Ok(Err(e)) => Err(Attempt::Lost(e)),
        Err(_) => Err(Attempt::Lost(format!(
            "no answer within {} ms",
            answer_timeout.as_millis()
        ))),
    }
}

/// Binds the relay socket of a successor, replacing whatever file is at
/// `path` (an older process's socket: that process stops listening on it
/// when it hands over, and its path now leads here). Mode 0600.
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The successor: serves relayed requests until this process starts
/// handing over itself (then the listener is closed; its path belongs to
/// the next successor).
pub async fn serve(listener: std::os::unix::net::UnixListener, slot: Arc<Slot>) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the relay socket cannot be served");
            return;
        }
    };
    let mut state = slot.watch();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let slot = slot.clone();
                    tokio::spawn(async move { connection(stream, slot).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay accept failed");
                    tokio::time::sleep(RETRY).await;
                }
            },
            changed = state.wait_for(|s| *s == Readiness::HandingOver) => {
                let _ = changed;
                tracing::debug!("handing over: the relay socket stops listening");
                return;
            }
        }
    }
}

async fn connection(mut stream: UnixStream, slot: Arc<Slot>) {
    let max = max_frame(&slot.current().config);
    let read = async {
        let mut prefix = [0u8; 8];
        stream
            .read_exact(&mut prefix)
            .await
            .map_err(|_| FrameError::Truncated)?;
        let len = frame::frame_len(&prefix, frame::REQUEST_MAGIC, max)?;
        let mut body = vec![0u8; len];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|_| FrameError::Truncated)?;
        RelayedRequest::decode(&body)
    };
    let relayed = match tokio::time::timeout(READ_FRAME_TIMEOUT, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "a malformed relay frame was dropped");
            return;
        }
        Err(_) => {
            tracing::warn!("a relay frame did not arrive in time");
            return;
        }
    };
    let head = match relayed.head() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "a malformed relay frame was dropped");
            return;
        }
    };
    let req = Request {
        door: relayed.door,
        head: &head,
        body: relayed.body.clone(),
        client_ip: relayed.client_ip,
        request_id: relayed.request_id.clone(),
        limited: None,
        params: None,
    };
    let answer = match serve_relayed(&slot, req, relayed.wait).await {
        Some(reply) => Answer::Answered(reply),
        None => Answer::Misdirected,
    };
    if let Err(e) = stream.write_all(&frame::encode_answer(&answer)).await {
        tracing::warn!(error = %e, "the answer to a relayed request could not be written");
    }
}
