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
//!   and are claimed again after `claim_idle`. Replies that clear by themselves (`LOADING` while
//!   a restarted Redis loads its dataset, `BUSY`, `MASTERDOWN`, `READONLY`, `TRYAGAIN`,
//!   `CLUSTERDOWN`, `OOM`) are connection errors: the runtime backs off and retries.
//! - **A vanished stream** (`NOGROUP` after the stream was deleted, expired or flushed): the
//!   group is created again and consuming goes on with what the stream receives from then on.
//!   A group destroyed over a **kept** stream stops the consumer with a `Config` error instead:
//!   re-creating it at the start would read every entry again, and entries older than the
//!   store's retention would run their effects twice; the operator recreates the group at the
//!   right id.
//!
//! Entries carry the payload in the field `payload` and the producer's id in `message-id`; other
//! fields become headers. Never key on the entry id: a producer retry of `XADD` creates a new
//! one. Redis has no publish dedup, so [`RedisStreamProducer`] retries with the same
//! `message-id` and the consumer's store recognises the copy.

pub mod admin;
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
///
/// Transient server replies are connection-type errors, which the runtime backs off on and
/// retries: a restarted Redis answers `LOADING` while it loads its dataset, a failover
/// `MASTERDOWN`, `READONLY` or `TRYAGAIN`, a long script `BUSY`, a full memory under
/// `noeviction` `OOM`. Only what retrying cannot fix (a key that is not a stream, refused
/// credentials or permissions) is a configuration error, which stops a consumer.
fn redis_error(what: &str, e: redis::RedisError) -> BrokerError {
    let kind = classify(&e);
    BrokerError::new(kind, format!("{what}: {e}")).with_source(e)
}

fn classify(e: &redis::RedisError) -> BrokerErrorKind {
    use redis::{ErrorKind, RetryMethod};
    if e.is_timeout() {
        return BrokerErrorKind::Timeout;
    }
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        return BrokerErrorKind::Connection;
    }
    if matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) || matches!(
        e.code(),
        Some("NOGROUP" | "WRONGTYPE" | "NOPERM" | "NOAUTH" | "WRONGPASS")
    ) {
        return BrokerErrorKind::Config;
    }
    // Codes the driver does not know (replies it keeps as "extension" errors) and that clear by
    // themselves.
    if matches!(
        e.code(),
        Some(
            "LOADING"
                | "BUSY"
                | "MASTERDOWN"
                | "READONLY"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "OOM"
                | "UNBLOCKED"
        )
    ) {
        return BrokerErrorKind::Connection;
    }
    match e.retry_method() {
        RetryMethod::NoRetry => BrokerErrorKind::Protocol,
        // Wait and retry, reconnect, redirects: all say "later, this may work".
        _ => BrokerErrorKind::Connection,
    }
}

/// Whether `e` says the consumer group (or its stream) does not exist: the stream was
/// deleted, expired or flushed, or the group destroyed. A blocked `XREADGROUP` hears of it as
/// `UNBLOCKED` (Redis 7), later commands as `NOGROUP`.
fn is_no_group(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("NOGROUP" | "UNBLOCKED"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> redis::RedisError {
        // Parsed as the server would send it, so the driver classifies the code itself.
        let mut parser = redis::Parser::new();
        match parser.parse_value(format!("-{text}\r\n").as_bytes()) {
            Ok(redis::Value::ServerError(e)) => e.into(),
            other => panic!("not a server error: {other:?}"),
        }
    }

    #[test]
    fn transient_server_replies_are_connection_errors() {
        for text in [
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script",
            "MASTERDOWN Link with MASTER is down",
            "READONLY You can't write against a read only replica.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "UNBLOCKED the stream key no longer exists",
        ] {
            let e = redis_error("reading the stream", reply(text));
            assert_eq!(e.kind(), BrokerErrorKind::Connection, "{text}: {e}");
            assert!(e.is_transient(), "{text}");
        }
    }

    #[test]
    fn what_retrying_cannot_fix_is_not_transient() {
        for text in [
            "NOGROUP No such key 's' or consumer group 'g'",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOPERM this user has no permissions to run the 'xreadgroup' command",
        ] {
            let e = redis_error("reading the stream", reply(text));
            assert_eq!(e.kind(), BrokerErrorKind::Config, "{text}: {e}");
        }
        let e = redis_error("reading the stream", reply("ERR syntax error"));
        assert_eq!(e.kind(), BrokerErrorKind::Protocol, "{e}");
        assert!(is_no_group(&reply("NOGROUP No such key")));
        assert!(is_no_group(&reply(
            "UNBLOCKED the stream key no longer exists"
        )));
    }
}
