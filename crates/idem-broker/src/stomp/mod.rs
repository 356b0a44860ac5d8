//! STOMP 1.2: [`StompSource`] consumes a queue with `client-individual` acks,
//! [`StompProducer`] publishes persistent messages with receipts, [`admin::StompAdmin`] counts
//! the backlog, reads and republishes dead letters and drains queues. Tested on ActiveMQ
//! Classic 5.17 (Debian's `activemq`); written for any STOMP 1.2 broker that keeps the unacked
//! messages of a queue subscription (ActiveMQ Artemis, RabbitMQ's STOMP plugin), see
//! `docs/adapters/stomp.md`. Frames are parsed by `iridium-stomp`'s parser; the connection
//! (CONNECT, heart-beats, receipts, subscriptions) is this module's own, so that every delivery
//! is tied to the connection it came on (`iridium-stomp`'s `Connection` reconnects behind its
//! user's back, and an ACK of a delivery from the lost connection would then be reported sent
//! and silently refused by the broker).
//!
//! URL: `stomp://[USER:PASS@]HOST[:PORT][/VHOST]` (port 61613 by default; the path, percent
//! decoded, is the `host` header of `CONNECT`, `/` by default: RabbitMQ's virtual host, ignored
//! by ActiveMQ). No TLS.
//!
//! ## At-least-once settings
//!
//! - **`ack:client-individual`** subscriptions: the broker keeps every delivery until idem
//!   ACKs that very message (by its `ack` header, as STOMP 1.2 requires; ActiveMQ ignores an
//!   ACK naming the `message-id`), and hands out at most [`StompConfig::prefetch`] unacked
//!   messages (`activemq.prefetchSize`, and `prefetch-count` for RabbitMQ).
//! - **Persistent sends**: the producer and the dead letters set `persistent:true` (ActiveMQ's
//!   STOMP default is non-persistent: such messages die with the broker and are never
//!   dead-lettered) and ask for a **receipt**, the broker's confirmation that it took the
//!   message.
//! - **The message id** travels in the [`MESSAGE_ID_HEADER`] header (`idem-message-id`), set
//!   once by the producer and kept on every retry; the broker's own `message-id` differs per
//!   copy.
//! - **Delayed redelivery is idem's own**: a delivery to retry later (an in-progress duplicate,
//!   a released handler, a store error) is **held by the source, unacked**, and handed to the
//!   runtime again after the delay, with its delivery count up by one. No NACK is ever sent: on
//!   ActiveMQ without the redelivery plugin a NACK dead-letters the message at once (and with
//!   it, redelivery is at least 1 s later and counts against `maximumRedeliveries`), so an
//!   in-progress duplicate would land in the dead-letter queue. If the process dies while it
//!   holds a delivery, the broker redelivers it (it was never acked).
//! - **Delivery counts**: STOMP has none, only `redelivered:true`. The source counts: a held
//!   delivery comes back with its count plus one; a broker redelivery counts the redeliveries
//!   this source saw of the message (by message id, else payload; the last 8,192 to 16,384),
//!   from 2.
//! - **Dead letters** are idem's: a persistent SEND to [`StompConfig::dead_letter_destination`]
//!   (default `/queue/DLQ.<queue>`, the name ActiveMQ's `individualDeadLetterStrategy` with
//!   `queuePrefix="DLQ."` gives its own dead letters) with the `idem-dead-letter-reason` and
//!   `idem-dead-letter-origin` headers, the message id and the message's own headers; the
//!   original is acked only after the broker's receipt.
//! - **Heart-beats** (default 10 s both ways) detect a dead connection (silent for twice the
//!   negotiated interval). A lost connection stays lost: acks of its deliveries fail at once
//!   (the runtime counts a settle error, and the broker redelivers them with
//!   `redelivered:true`, to be replayed from the store), held copies of its deliveries are
//!   dropped, and the next `receive` **connects and subscribes again** (the runtime backs off
//!   between failed attempts).
//! - **Acks are not confirmed** one by one (as with RabbitMQ): an ACK written just before the
//!   connection died may be lost, and the message then comes back and replays. `close` sends
//!   DISCONNECT with a receipt, so the acks before it are known processed.
//!
//! Producers: [`StompProducer`] sets the message id header once (from
//! [`Outgoing`](crate::Outgoing)), publishes persistent with a receipt, and retries with the
//! same id. STOMP brokers have no publish dedup, so a retry after a lost receipt is a duplicate
//! the consumer's store replays.

pub mod admin;
mod client;
mod producer;
mod source;

use std::time::Duration;

use self::client::{Client, Login};

pub use self::producer::StompProducer;
pub use self::source::{StompAcker, StompDelivery, StompSource};

use crate::error::{BrokerError, BrokerErrorKind, redact};

/// The header that carries the producer's message id (set once, reused on retries).
pub const MESSAGE_ID_HEADER: &str = "idem-message-id";

/// The default STOMP port.
pub const DEFAULT_PORT: u16 = 61613;

/// What [`StompSource`] consumes and where its dead letters go.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StompConfig {
    /// The queue's name (`orders`), as given to [`StompConfig::new`].
    pub queue: String,
    /// The STOMP destination consumed (default `/queue/<queue>`; a name starting with `/` is
    /// used as it is).
    pub destination: String,
    /// Where dead letters go (default `/queue/DLQ.<queue>`).
    pub dead_letter_destination: String,
    /// Most unacked deliveries the broker hands out (default 256), held ones included:
    /// `activemq.prefetchSize` (ActiveMQ) and `prefetch-count` (RabbitMQ).
    pub prefetch: u32,
    /// The heart-beat both ways (default 10 s): a connection silent for twice this is dropped
    /// and made again. Zero disables heartbeats.
    pub heartbeat: Duration,
    /// How long connecting may take before it fails (default 10 s).
    pub connect_timeout: Duration,
    /// How long a send waits for the broker's receipt (default 10 s).
    pub receipt_timeout: Duration,
    /// The most messages [`admin::StompAdmin`]'s backlog counts by browsing the queue (default
    /// 400, ActiveMQ's `maxBrowsePageSize`): a browse that reaches it reports an unknown
    /// backlog. Raise both together.
    pub browse_limit: u64,
}

impl StompConfig {
    /// Consume `queue` (`orders` is `/queue/orders`), with dead letters to
    /// `/queue/DLQ.<queue>`.
    pub fn new(queue: impl Into<String>) -> Self {
        let queue = queue.into();
        let (destination, name) = match queue.strip_prefix('/') {
            Some(_) => (
                queue.clone(),
                queue.rsplit('/').next().unwrap_or(&queue).to_owned(),
            ),
            None => (format!("/queue/{queue}"), queue.clone()),
        };
        Self {
            dead_letter_destination: format!("/queue/DLQ.{name}"),
            destination,
            queue,
            prefetch: 256,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            receipt_timeout: Duration::from_secs(10),
            browse_limit: 400,
        }
    }

    /// Sets the prefetch.
    #[must_use]
    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets the dead-letter destination (a queue name, or a destination starting with `/`).
    #[must_use]
    pub fn dead_letter_destination(mut self, destination: impl Into<String>) -> Self {
        self.dead_letter_destination = destination_of(&destination.into());
        self
    }

    /// Sets the heart-beat interval.
    #[must_use]
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Sets the most messages a backlog browse counts.
    #[must_use]
    pub fn browse_limit(mut self, limit: u64) -> Self {
        self.browse_limit = limit.max(1);
        self
    }
}

/// `orders` → `/queue/orders`; a destination starting with `/` stays as it is.
pub(crate) fn destination_of(name: &str) -> String {
    if name.starts_with('/') {
        name.to_owned()
    } else {
        format!("/queue/{name}")
    }
}

/// Where and as whom to connect, from a `stomp://` URL.
#[derive(Clone)]
pub(crate) struct Endpoint {
    addr: String,
    login: String,
    passcode: String,
    host: String,
    /// The URL with its password hidden, for messages.
    shown: String,
}

impl Endpoint {
    pub(crate) fn parse(url: &str) -> Result<Self, BrokerError> {
        let shown = redact(url);
        let bad = |why: &str| {
            BrokerError::new(
                BrokerErrorKind::Config,
                format!("{why}: {shown} (expected stomp://[USER:PASS@]HOST[:PORT][/VHOST])"),
            )
        };
        let parsed = url::Url::parse(url).map_err(|_| bad("not a STOMP URL"))?;
        if !parsed.scheme().eq_ignore_ascii_case("stomp") {
            return Err(bad(&format!(
                "unsupported scheme {:?} (TLS is not supported)",
                parsed.scheme()
            )));
        }
        let host = parsed.host_str().filter(|h| !h.is_empty());
        let host = host.ok_or_else(|| bad("no host"))?;
        let port = parsed.port().unwrap_or(DEFAULT_PORT);
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let vhost = match parsed.path() {
            "" | "/" => "/".to_owned(),
            p => decode(p.trim_start_matches('/')),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            addr,
            login: decode(parsed.username()),
            passcode: parsed.password().map(decode).unwrap_or_default(),
            host: vhost,
            shown,
        })
    }

    /// The URL with its password hidden.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// Connects (STOMP 1.2), failing after `timeout`. A connection that is lost stays lost:
    /// the caller connects again.
    pub(crate) async fn connect(
        &self,
        heartbeat: Duration,
        timeout: Duration,
    ) -> Result<Client, BrokerError> {
        Client::connect(
            &Login {
                addr: &self.addr,
                login: &self.login,
                passcode: &self.passcode,
                host: &self.host,
                shown: &self.shown,
            },
            heartbeat,
            timeout,
        )
        .await
    }
}

/// `e` with `what` in front of its message.
pub(crate) fn context(what: &str, e: BrokerError) -> BrokerError {
    BrokerError::new(e.kind(), format!("{what}: {}", e.message()))
}

/// Headers a copy of a message must not carry over: the frame's own (the broker sets them per
/// delivery or per send), and idem's dead-letter headers (set again, or dropped on republish).
pub(crate) fn is_frame_header(name: &str) -> bool {
    const FRAME: [&str; 15] = [
        "destination",
        "message-id",
        "subscription",
        "ack",
        "content-length",
        "redelivered",
        "receipt",
        "transaction",
        "persistent",
        "timestamp",
        "expires",
        "original-destination",
        "dlqDeliveryFailureCause",
        MESSAGE_ID_HEADER,
        "receipt-id",
    ];
    FRAME.iter().any(|h| name.eq_ignore_ascii_case(h)) || crate::admin::is_dead_letter_header(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let e = Endpoint::parse("stomp://admin:s%40cret@broker:61614/prod%2Fa")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.addr, "broker:61614");
        assert_eq!((e.login.as_str(), e.passcode.as_str()), ("admin", "s@cret"));
        assert_eq!(e.host, "prod/a");
        assert!(!e.shown().contains("cret"), "{}", e.shown());
        let e = Endpoint::parse("stomp://127.0.0.1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((e.addr.as_str(), e.host.as_str()), ("127.0.0.1:61613", "/"));
        for bad in ["stomp+ssl://u:secret@h", "amqp://h", "stomp://", "h:61613"] {
            let Err(e) = Endpoint::parse(bad) else {
                panic!("{bad} parsed")
            };
            assert_eq!(e.kind(), BrokerErrorKind::Config);
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn names_follow_the_queue() {
        let c = StompConfig::new("orders");
        assert_eq!(c.destination, "/queue/orders");
        assert_eq!(c.dead_letter_destination, "/queue/DLQ.orders");
        let c = StompConfig::new("/amq/queue/orders").dead_letter_destination("orders.dlq");
        assert_eq!(c.destination, "/amq/queue/orders");
        assert_eq!(c.dead_letter_destination, "/queue/orders.dlq");
        assert!(is_frame_header("Message-Id") && is_frame_header("idem-dead-letter-reason"));
        assert!(!is_frame_header("tenant") && !is_frame_header("content-type"));
    }
}
