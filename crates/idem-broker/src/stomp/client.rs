//! One STOMP 1.2 connection, and nothing more: frames are parsed by `iridium-stomp`'s parser;
//! the connection itself (CONNECT, heart-beats, receipts, subscriptions, ERROR frames) is ours,
//! because idem must know which connection each delivery came on. `iridium-stomp`'s
//! `Connection` reconnects behind its user's back and re-subscribes: an ACK for a delivery of
//! the lost connection is then sent on the new one and silently dropped by the broker (ActiveMQ
//! answers an ERROR that answers no receipt), so an ack would be reported done when it is not,
//! and its reconnect backoff (doubling to 30 s) cannot be set. Here a connection that is lost
//! stays lost: every operation on it fails, its subscriptions end, and the source connects
//! again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use iridium_stomp::Frame;
use iridium_stomp::parser::{parse_frame_slice_bounded, unescape_header_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{BrokerError, BrokerErrorKind};

/// The largest frame accepted from the broker.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Where and as whom to connect.
pub(crate) struct Login<'a> {
    pub(crate) addr: &'a str,
    pub(crate) login: &'a str,
    pub(crate) passcode: &'a str,
    pub(crate) host: &'a str,
    /// Shown in messages (the password hidden).
    pub(crate) shown: &'a str,
}

/// One STOMP connection. Clones share it.
#[derive(Clone)]
pub(crate) struct Client(Arc<Inner>);

struct Inner {
    out: mpsc::UnboundedSender<Vec<u8>>,
    alive: AtomicBool,
    next_id: AtomicU64,
    receipts: parking_lot::Mutex<HashMap<String, oneshot::Sender<Result<(), String>>>>,
    subscriptions: parking_lot::Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>,
    shown: String,
    /// The broker's `server` header (`ActiveMQ/5.17.2`), empty when it sent none.
    server: String,
    /// Ends the reader and writer tasks.
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.0.shown)
            .field("alive", &self.is_alive())
            .finish()
    }
}

fn lost(what: &str) -> BrokerError {
    BrokerError::new(
        BrokerErrorKind::Connection,
        format!("{what}: the connection is lost"),
    )
}

/// A STOMP 1.2 frame on the wire: headers escaped (except in CONNECT), a `content-length` when
/// the body is not text.
pub(crate) fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + frame.body.len());
    out.extend_from_slice(frame.command.as_bytes());
    out.push(b'\n');
    let escape = frame.command != "CONNECT" && frame.command != "STOMP";
    let put = |out: &mut Vec<u8>, s: &str| {
        if !escape {
            out.extend_from_slice(s.as_bytes());
            return;
        }
        for b in s.bytes() {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b':' => out.extend_from_slice(b"\\c"),
                _ => out.push(b),
            }
        }
    };
    for (k, v) in &frame.headers {
        put(&mut out, k);
        out.push(b':');
        put(&mut out, v);
        out.push(b'\n');
    }
    let has_length = frame
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    if !has_length && (frame.body.contains(&0) || std::str::from_utf8(&frame.body).is_err()) {
        out.extend_from_slice(format!("content-length:{}\n", frame.body.len()).as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(&frame.body);
    out.push(0);
    out
}

/// What the reader found at the front of the buffer.
enum Read {
    Frame(Frame),
    Heartbeat,
    More,
}

fn decode(buf: &mut BytesMut) -> Result<Read, String> {
    match buf.first() {
        None => return Ok(Read::More),
        Some(b'\n') => {
            buf.advance(1);
            return Ok(Read::Heartbeat);
        }
        Some(b'\r') if buf.get(1) == Some(&b'\n') => {
            buf.advance(2);
            return Ok(Read::Heartbeat);
        }
        _ => {}
    }
    let Some((command, headers, body, used)) = parse_frame_slice_bounded(buf, MAX_FRAME)? else {
        return Ok(Read::More);
    };
    let text = |b: Vec<u8>| String::from_utf8(b).map_err(|e| format!("not UTF-8: {e}"));
    let mut frame = Frame::new(text(command)?);
    let raw = frame.command == "CONNECTED";
    for (k, v) in headers {
        let (k, v) = if raw {
            (k, v)
        } else {
            (unescape_header_value(&k)?, unescape_header_value(&v)?)
        };
        frame.headers.push((text(k)?, text(v)?));
    }
    frame.body = body.unwrap_or_default();
    buf.advance(used);
    Ok(Read::Frame(frame))
}

/// Reads until the next frame, or fails.
async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Frame, String> {
    loop {
        match decode(buf)? {
            Read::Frame(f) => return Ok(f),
            Read::Heartbeat => continue,
            Read::More => {}
        }
        if stream.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the broker closed the connection".to_owned());
        }
    }
}

/// `cx,cy` of a heart-beat header.
fn heartbeat(h: Option<&str>) -> (u64, u64) {
    let mut it = h
        .unwrap_or("0,0")
        .split(',')
        .map(|s| s.trim().parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

impl Client {
    /// Connects, sends CONNECT and waits for CONNECTED, all within `timeout`.
    pub(crate) async fn connect(
        to: &Login<'_>,
        heartbeat_every: Duration,
        timeout: Duration,
    ) -> Result<Client, BrokerError> {
        let fail = |kind, why: String| {
            BrokerError::new(kind, format!("connecting to {}: {why}", to.shown))
        };
        let ms = u64::try_from(heartbeat_every.as_millis()).unwrap_or(u64::MAX);
        let handshake = async {
            let mut stream = TcpStream::connect(to.addr)
                .await
                .map_err(|e| fail(BrokerErrorKind::Connection, e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let mut connect = Frame::new("CONNECT")
                .header("accept-version", "1.2")
                .header("host", to.host)
                .header("heart-beat", format!("{ms},{ms}"));
            if !to.login.is_empty() {
                connect = connect
                    .header("login", to.login)
                    .header("passcode", to.passcode);
            }
            stream
                .write_all(&encode(&connect))
                .await
                .map_err(|e| fail(BrokerErrorKind::Connection, e.to_string()))?;
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let reply = read_frame(&mut stream, &mut buf)
                .await
                .map_err(|e| fail(BrokerErrorKind::Connection, e))?;
            match reply.command.as_str() {
                "CONNECTED" => Ok((stream, buf, reply)),
                "ERROR" => Err(fail(
                    BrokerErrorKind::Config,
                    format!(
                        "refused: {}",
                        reply.get_header("message").unwrap_or("no reason given")
                    ),
                )),
                other => Err(fail(
                    BrokerErrorKind::Protocol,
                    format!("{other} instead of CONNECTED"),
                )),
            }
        };
        let (stream, buf, connected) =
            tokio::time::timeout(timeout, handshake)
                .await
                .map_err(|_| {
                    fail(
                        BrokerErrorKind::Timeout,
                        format!("no answer within {timeout:?}"),
                    )
                })??;
        if connected.get_header("version").is_some_and(|v| v != "1.2") {
            return Err(fail(
                BrokerErrorKind::Config,
                "the broker does not speak STOMP 1.2".to_owned(),
            ));
        }
        // Heart-beats (STOMP 1.2, 6.2): each side sends at the slower of what it offers and
        // what the other wants, and may give up on a peer silent for twice what it expects.
        let (sx, sy) = heartbeat(connected.get_header("heart-beat"));
        let send = (ms > 0 && sy > 0).then(|| Duration::from_millis(ms.max(sy)));
        let expect = (ms > 0 && sx > 0).then(|| Duration::from_millis(ms.max(sx)));
        let (out, out_rx) = mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let client = Client(Arc::new(Inner {
            out,
            alive: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            receipts: parking_lot::Mutex::default(),
            subscriptions: parking_lot::Mutex::default(),
            shown: to.shown.to_owned(),
            server: connected
                .get_header("server")
                .unwrap_or_default()
                .to_owned(),
            stop,
        }));
        let (read, write) = stream.into_split();
        // The tasks hold the connection weakly: dropping every `Client` ends them too.
        let weak = Arc::downgrade(&client.0);
        tokio::spawn(writer(write, out_rx, send, stopped.clone(), weak.clone()));
        tokio::spawn(reader(read, buf, expect, stopped, weak));
        Ok(client)
    }

    /// Whether the connection is still up.
    pub(crate) fn is_alive(&self) -> bool {
        self.0.alive.load(Ordering::SeqCst)
    }

    /// The broker's `server` header (`ActiveMQ/5.17.2`), empty when it sent none.
    pub(crate) fn server(&self) -> &str {
        &self.0.server
    }

    /// Whether `other` is this very connection.
    pub(crate) fn same(&self, other: &Client) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    fn next_id(&self) -> String {
        self.0.next_id.fetch_add(1, Ordering::Relaxed).to_string()
    }

    /// Queues `frame` for sending.
    pub(crate) fn send(&self, frame: &Frame) -> Result<(), BrokerError> {
        if !self.is_alive() || self.0.out.send(encode(frame)).is_err() {
            return Err(lost(&format!("sending {}", frame.command)));
        }
        Ok(())
    }

    /// Sends `frame` with a receipt and waits up to `timeout` for it: an ERROR answering it is
    /// [`Rejected`](BrokerErrorKind::Rejected), no answer a [`Timeout`](BrokerErrorKind::Timeout),
    /// a lost connection a [`Connection`](BrokerErrorKind::Connection) error.
    pub(crate) async fn send_confirmed(
        &self,
        frame: Frame,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let id = format!("r-{}", self.next_id());
        let (tx, rx) = oneshot::channel();
        self.0.receipts.lock().insert(id.clone(), tx);
        let command = frame.command.clone();
        let sent = self.send(&frame.header("receipt", id.clone()));
        if let Err(e) = sent {
            self.0.receipts.lock().remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(BrokerError::new(
                BrokerErrorKind::Rejected,
                format!("{command} refused: {why}"),
            )),
            Ok(Err(_)) => Err(lost(&format!("waiting for the receipt of {command}"))),
            Err(_) => {
                self.0.receipts.lock().remove(&id);
                Err(BrokerError::new(
                    BrokerErrorKind::Timeout,
                    format!("no receipt for {command} within {timeout:?}"),
                ))
            }
        }
    }

    /// Subscribes to `destination` with `headers` (ack mode, prefetch, browser) and waits for
    /// the broker's receipt. The channel ends when the connection is lost or closed.
    pub(crate) async fn subscribe(
        &self,
        destination: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<(String, mpsc::UnboundedReceiver<Frame>), BrokerError> {
        let id = format!("s-{}", self.next_id());
        let (tx, rx) = mpsc::unbounded_channel();
        self.0.subscriptions.lock().insert(id.clone(), tx);
        let mut frame = Frame::new("SUBSCRIBE")
            .header("id", id.clone())
            .header("destination", destination);
        for (k, v) in headers {
            frame = frame.header(*k, *v);
        }
        if let Err(e) = self.send_confirmed(frame, timeout).await {
            self.0.subscriptions.lock().remove(&id);
            return Err(e);
        }
        Ok((id, rx))
    }

    /// Ends a subscription (what it held unacked goes back to the queue).
    pub(crate) async fn unsubscribe(&self, id: &str, timeout: Duration) -> Result<(), BrokerError> {
        self.0.subscriptions.lock().remove(id);
        self.send_confirmed(Frame::new("UNSUBSCRIBE").header("id", id), timeout)
            .await
    }

    /// DISCONNECT with a receipt (everything sent before it has been processed when it comes),
    /// then closes the socket. Unacked deliveries go back to their queues.
    pub(crate) async fn close(&self) {
        if self.is_alive() {
            let _ = self
                .send_confirmed(Frame::new("DISCONNECT"), Duration::from_secs(5))
                .await;
        }
        self.die("closed");
    }

    /// Marks the connection lost: operations fail, subscriptions end, receipts fail, the tasks
    /// stop.
    fn die(&self, why: &str) {
        self.0.die(why);
    }
}

impl Inner {
    fn die(&self, why: &str) {
        if self.alive.swap(false, Ordering::SeqCst) {
            tracing::debug!(url = %self.shown, why, "STOMP connection ended");
        }
        self.subscriptions.lock().clear();
        self.receipts.lock().clear();
        let _ = self.stop.send(true);
    }

    fn dispatch(&self, frame: Frame) {
        match frame.command.as_str() {
            "MESSAGE" => {
                let sub = frame.get_header("subscription").map(str::to_owned);
                let target = sub.and_then(|s| self.subscriptions.lock().get(&s).cloned());
                match target {
                    Some(tx) => {
                        let _ = tx.send(frame);
                    }
                    None => tracing::debug!(url = %self.shown, "a MESSAGE for no subscription"),
                }
            }
            "RECEIPT" => {
                if let Some(id) = frame.get_header("receipt-id") {
                    if let Some(tx) = self.receipts.lock().remove(id) {
                        let _ = tx.send(Ok(()));
                    }
                }
            }
            "ERROR" => {
                let message = frame
                    .get_header("message")
                    .unwrap_or("no message")
                    .to_owned();
                let waiter = frame
                    .get_header("receipt-id")
                    .and_then(|id| self.receipts.lock().remove(id));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(Err(message));
                    }
                    None => {
                        tracing::warn!(url = %self.shown, error = %message, "the STOMP broker sent an ERROR");
                    }
                }
            }
            other => tracing::debug!(url = %self.shown, command = other, "unexpected frame"),
        }
    }
}

async fn writer(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    mut out: mpsc::UnboundedReceiver<Vec<u8>>,
    every: Option<Duration>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    client: Weak<Inner>,
) {
    let mut beat = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(64 * 1024);
    let why = loop {
        tokio::select! {
            frame = out.recv() => {
                let Some(frame) = frame else { break "closed" };
                batch.clear();
                batch.extend_from_slice(&frame);
                // Whatever else is queued goes out in the same write.
                while batch.len() < 256 * 1024 {
                    match out.try_recv() {
                        Ok(f) => batch.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                if write.write_all(&batch).await.is_err() {
                    break "write failed";
                }
                beat.reset();
            }
            _ = beat.tick(), if every.is_some() => {
                if write.write_all(b"\n").await.is_err() {
                    break "write failed";
                }
            }
            _ = stopped.changed() => break "stopped",
        }
    };
    let _ = write.shutdown().await;
    if let Some(c) = client.upgrade() {
        c.die(why);
    }
}

async fn reader(
    mut read: tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
    expect: Option<Duration>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    client: Weak<Inner>,
) {
    // A peer silent for twice its heart-beat is gone.
    let silence = expect.map(|d| d * 2);
    let why = 'outer: loop {
        loop {
            match decode(&mut buf) {
                Ok(Read::Frame(f)) => match client.upgrade() {
                    Some(c) => c.dispatch(f),
                    None => break 'outer "dropped",
                },
                Ok(Read::Heartbeat) => {}
                Ok(Read::More) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "a malformed STOMP frame");
                    break 'outer "malformed frame";
                }
            }
        }
        let deadline = silence.map(|s| Instant::now() + s);
        let read = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, read.read_buf(&mut buf))
                    .await
                    .unwrap_or(Ok(usize::MAX)),
                None => read.read_buf(&mut buf).await,
            }
        };
        tokio::select! {
            n = read => match n {
                Ok(0) => break "the broker closed the connection",
                Ok(usize::MAX) => break "no heart-beat from the broker",
                Ok(_) => {}
                Err(_) => break "read failed",
            },
            _ = stopped.changed() => break "stopped",
        }
    };
    if let Some(c) = client.upgrade() {
        c.die(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = Frame::new("SEND")
            .header("destination", "/queue/a")
            .header("reason", "a: b\\c\nd")
            .set_body(b"x\0y".to_vec());
        let mut buf = BytesMut::from(&b"\n\r\n"[..]);
        buf.extend_from_slice(&encode(&f));
        assert!(matches!(decode(&mut buf), Ok(Read::Heartbeat)));
        assert!(matches!(decode(&mut buf), Ok(Read::Heartbeat)));
        let Ok(Read::Frame(g)) = decode(&mut buf) else {
            panic!("no frame")
        };
        assert_eq!(g.get_header("reason"), Some("a: b\\c\nd"));
        assert_eq!(g.body, b"x\0y");
        assert!(buf.is_empty());
        let mut part = BytesMut::from(&encode(&f)[..10]);
        assert!(matches!(decode(&mut part), Ok(Read::More)));
        assert_eq!(heartbeat(Some("1000, 0")), (1000, 0));
    }
}
