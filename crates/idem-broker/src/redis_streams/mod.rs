//! Redis Streams with `redis`: [`RedisStreamSource`] reads a stream through a consumer group,
//! [`RedisStreamProducer`] appends with `XADD`.
//!
//! ## At-least-once settings
//!
//! - **Consumer groups, `XREADGROUP` without `NOACK`**: every entry read stays in the group's
//!   pending entries list (PEL) until `XACK`.
//! - **`XACK` after completion**, one command for a whole batch.
//! - **`XAUTOCLAIM`** every `claim_interval` (default 1 s) takes over entries pending longer than
//!   `claim_idle` (default 30 s): those of consumers that died, and those this consumer asked to
//!   see again. Their delivery counts (raised by each claim) come from `XPENDING`.
//! - **Delayed retry**: Redis has no nack. `XCLAIM … IDLE (claim_idle - delay) JUSTID` sets the
//!   entry's idle time so that it becomes claimable after `delay`; a delay longer than
//!   `claim_idle` is cut to it.
//! - **Progress**: while handlers run, `XCLAIM … JUSTID` to this consumer resets the entries'
//!   idle time every third of `claim_idle`, so no other consumer claims them meanwhile.
//! - **Dead letters**: `XADD` to a dead-letter stream (default `<stream>:dead-letter`, fields
//!   `payload`, `message-id`, `idem-dead-letter-reason`, `idem-dead-letter-origin`,
//!   `original-id`) and `XACK` of the original in one `MULTI`/`EXEC`: both or neither.
//! - **Reconnects** are the connection manager's; entries read on a lost connection stay pending
//!   and are claimed again after `claim_idle`.
//!
//! Entries carry the payload in the field `payload` and the producer's id in `message-id`; other
//! fields become headers. Never key on the entry id: a producer retry of `XADD` creates a new
//! one. Redis has no publish dedup, so [`RedisStreamProducer`] retries with the same
//! `message-id` and the consumer's store recognises the copy.

mod producer;
mod source;

use std::time::Duration;

pub use self::producer::RedisStreamProducer;
pub use self::source::{RedisStreamAcker, RedisStreamDelivery, RedisStreamSource};

use crate::error::{BrokerError, BrokerErrorKind};

/// The field holding the payload.
pub const PAYLOAD_FIELD: &str = "payload";
/// The field holding the original entry id in a dead letter.
pub const ORIGINAL_ID_FIELD: &str = "original-id";

/// What [`RedisStreamSource`] reads.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisStreamConfig {
    /// The stream key.
    pub stream: String,
    /// The consumer group (created at the start of the stream if missing).
    pub group: String,
    /// This consumer's name in the group (default `<hostname>-<pid>`).
    pub consumer: String,
    /// Entries pending longer than this are claimed by others (default 30 s).
    pub claim_idle: Duration,
    /// How often to look for such entries (default 1 s).
    pub claim_interval: Duration,
    /// How long one `XREADGROUP` blocks (default 1 s).
    pub block: Duration,
    /// The dead-letter stream (default `<stream>:dead-letter`).
    pub dead_letter_stream: String,
}

impl RedisStreamConfig {
    /// Read `stream` as `group`.
    pub fn new(stream: impl Into<String>, group: impl Into<String>) -> Self {
        let stream = stream.into();
        let host = hostname_or_localhost();
        Self {
            dead_letter_stream: format!("{stream}:dead-letter"),
            stream,
            group: group.into(),
            consumer: format!("{host}-{}", std::process::id()),
            claim_idle: Duration::from_secs(30),
            claim_interval: Duration::from_secs(1),
            block: Duration::from_secs(1),
        }
    }

    /// Sets this consumer's name.
    #[must_use]
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// Sets the idle time after which pending entries are claimed.
    #[must_use]
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }
}

fn hostname_or_localhost() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Maps a redis error to a broker error kind.
fn redis_error(what: &str, e: redis::RedisError) -> BrokerError {
    let kind = if e.is_timeout() {
        BrokerErrorKind::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        BrokerErrorKind::Connection
    } else if e.code() == Some("NOGROUP") || e.code() == Some("WRONGTYPE") {
        BrokerErrorKind::Config
    } else {
        BrokerErrorKind::Protocol
    };
    BrokerError::new(kind, format!("{what}: {e}")).with_source(e)
}
