//! RocketMQ (and SOFAMQ, which speaks the RocketMQ remoting protocol) with
//! `rocketmq-client-rust` 1.0: [`RocketMqSource`] consumes a topic as a push consumer in a
//! consumer group, [`RocketMqProducer`] publishes with the message id set once.
//!
//! The URL names the **name server**: `rocketmq://HOST:9876` (several:
//! `rocketmq://h1:9876,h2:9876`). Brokers are found through it.
//!
//! ## At-least-once settings
//!
//! - A **push consumer in a consumer group** (clustering mode). RocketMQ has no per-message ack:
//!   a queue's consume offset moves past a message once it is consumed, and the client persists
//!   offsets to the broker every few seconds (so a crash may redeliver what was consumed last:
//!   the store replays it).
//! - The client's listener is synchronous and runs on the client's blocking pool. It hands each
//!   message to [`Source::receive`](crate::Source::receive) through a channel and waits, on that
//!   pool thread, until every message of its call is settled; it then returns `ConsumeSuccess`
//!   and the offset moves on.
//! - **Ack** settles the delivery at once (no broker round trip: the offset is committed with the
//!   listener's return and persisted by the client).
//! - **Nack with delay**: the adapter sends the message back to the broker itself
//!   (`ConsumerSendMsgBack`), which stores it in the group's retry topic `%RETRY%<group>` after a
//!   delay *level*, then settles it like an ack. RocketMQ has no arbitrary delays: the adapter
//!   picks the smallest level of [`RocketMqConfig::delay_levels`] (which must mirror the broker's
//!   `messageDelayLevel`) at least as long as the delay asked for, or the longest level. A nack
//!   asking for 700 ms comes back after the first level (1 s by default); one asking for an hour
//!   on a broker whose longest level is 2 h waits 2 h. The delivery count is the broker's
//!   `reconsume_times + 1`.
//! - **Dead letters**: idem's own dead letters are published (and confirmed) to the dead-letter
//!   topic [`RocketMqConfig::dead_letter_topic`] (default `<group>_IDEM_DLQ`) with the
//!   `idem-dead-letter-reason` and `idem-dead-letter-origin` properties and the message id in
//!   `message-id`, then the delivery is settled. The broker moves a message to its own
//!   `%DLQ%<group>` after [`RocketMqConfig::max_reconsume_times`] send-backs (default 1000, so
//!   that in-progress duplicates waiting out a lease never get there); [`admin::RocketMqAdmin`]
//!   reads both.
//! - **Identity**: the message id is the `message-id` property (set by [`RocketMqProducer`];
//!   an empty id is marked by `message-id-empty`, as RocketMQ drops empty property values),
//!   else the `KEYS` property, else the client's `UNIQ_KEY`. Never the broker's `msg_id()`,
//!   which changes on every redelivery through the retry topic.
//! - **Close** stops the consumer before the unsettled deliveries are released, so the client
//!   persists offsets that stop before them: they are consumed again by the next consumer of the
//!   group. A delivery dropped without being settled stays with its consumer until it closes.
//!
//! ## Traps of `rocketmq-client-rust` 1.0, and what the adapter does about them
//!
//! - The client owns its own Tokio runtime (`RuntimeOwner` + `ClientRuntime`): every source,
//!   producer and admin builds one of its own (its connections die with it, as with a process)
//!   and uses a no-op telemetry guard, so **no global tracing subscriber** is installed.
//! - The listener runs on the runtime's blocking pool, whose default width on a small machine
//!   (4 threads on 2 cores) is below the consumer's default `consume_thread_min` (20): the extra
//!   calls overflow the pool and the client sends their messages back without running them. The
//!   adapter sizes the pool from [`RocketMqConfig::consume_threads`] (default 64) and sets both
//!   consume thread counts to it.
//! - The pool's task timeout (30 s by default) counts a longer listener call as failed and the
//!   messages are redelivered while still being handled: the adapter raises it to
//!   [`RocketMqConfig::max_handling`] (default 15 min), and the consumer's `consume_timeout`
//!   with it. Past it, idem's lease still keeps the redelivery from running the handler twice.
//! - The listener cannot choose a redelivery delay (its context is passed by `&`): hence the
//!   adapter's own send-back above.
//! - The client's `shutdown()` does not wait for running listener calls: the adapter releases
//!   them itself, after the shutdown.
//! - Topics the consumer subscribes to before they exist are only found on the client's next
//!   route poll (30 s by default): the source creates its topic (through its producer, before
//!   the consumer starts) when [`RocketMqConfig::declare`] is on (the default), and polls
//!   routes every 10 s (the client's least).

pub mod admin;
mod producer;
mod source;

use std::sync::Arc;
use std::time::Duration;

use rocketmq_client_rust::{ClientConfig, ClientRuntime, ClientRuntimeConfig};
use rocketmq_observability::TelemetryRuntimeGuard;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};

pub use self::producer::RocketMqProducer;
pub use self::source::{RocketMqAcker, RocketMqDelivery, RocketMqSource};

use crate::error::{BrokerError, BrokerErrorKind, redact};

/// The property carrying the producer's message id (the same name as on MQTT and Redis).
pub const MESSAGE_ID_PROPERTY: &str = crate::header::MESSAGE_ID;

/// The property marking an empty message id (RocketMQ drops properties whose value is empty).
pub const EMPTY_ID_PROPERTY: &str = "message-id-empty";

/// The delay levels of an Apache RocketMQ broker's default `messageDelayLevel`
/// (`1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h`).
pub const DEFAULT_DELAY_LEVELS: [u64; 18] = [
    1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200,
];

/// What [`RocketMqSource`] consumes, and how.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RocketMqConfig {
    /// The topic.
    pub topic: String,
    /// The consumer group (letters, digits, `-`, `_`, `%`, `|`).
    pub group: String,
    /// The subscription expression (default `*`: every tag).
    pub tags: String,
    /// Listener calls running at once: the consumer's thread counts and the width of the
    /// client's blocking pool (default 64). With [`batch`](RocketMqConfig::batch) 1, the most
    /// deliveries handed out and not settled yet.
    pub consume_threads: u32,
    /// Messages handed to one listener call, all from one queue (default 1). A call's messages
    /// are committed together, when the last of them is settled: with more than one, an acked
    /// message whose call still holds an unsettled one is redelivered after a close (and
    /// replayed by the store).
    pub batch: u32,
    /// How long a listener call may wait for its messages to be settled before the client
    /// counts it as failed and redelivers them (default 15 min; rounded up to minutes).
    pub max_handling: Duration,
    /// Send-backs after which the broker moves a message to `%DLQ%<group>` (default 1000).
    pub max_reconsume_times: i32,
    /// The broker's `messageDelayLevel`, in order (default [`DEFAULT_DELAY_LEVELS`]).
    pub delay_levels: Vec<Duration>,
    /// Where idem's dead letters go (default `<group>_IDEM_DLQ`).
    pub dead_letter_topic: String,
    /// Create the topic (and the dead-letter topic) when it is missing (default true).
    pub declare: bool,
    /// Queues of a topic created by [`declare`](RocketMqConfig::declare) (default 4).
    pub queues: u32,
    /// How often the client reads topic routes from the name server (default 10 s, the
    /// client's least; at most 10 min).
    pub route_poll: Duration,
}

impl RocketMqConfig {
    /// Consume `topic` in the consumer group `group`.
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        let group = group.into();
        Self {
            topic: topic.into(),
            dead_letter_topic: format!("{group}_IDEM_DLQ"),
            group,
            tags: "*".to_owned(),
            consume_threads: 64,
            batch: 1,
            max_handling: Duration::from_secs(15 * 60),
            max_reconsume_times: 1000,
            delay_levels: DEFAULT_DELAY_LEVELS
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            declare: true,
            queues: 4,
            route_poll: Duration::from_secs(10),
        }
    }

    /// Sets the broker's delay levels (its `messageDelayLevel`, in order).
    #[must_use]
    pub fn delay_levels(mut self, levels: impl IntoIterator<Item = Duration>) -> Self {
        self.delay_levels = levels.into_iter().collect();
        self
    }

    /// Sets the dead-letter topic.
    #[must_use]
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = topic.into();
        self
    }

    /// Sets how many listener calls run at once.
    #[must_use]
    pub fn consume_threads(mut self, threads: u32) -> Self {
        self.consume_threads = threads.max(1);
        self
    }

    /// Sets how long a listener call may wait for its messages to be settled.
    #[must_use]
    pub fn max_handling(mut self, max: Duration) -> Self {
        self.max_handling = max;
        self
    }

    /// The delay level (1-based) for a redelivery after `delay`: the smallest level at least as
    /// long, else the longest.
    pub fn delay_level(&self, delay: Duration) -> i32 {
        let n = self.delay_levels.len().max(1);
        let index = self
            .delay_levels
            .iter()
            .position(|level| *level >= delay)
            .unwrap_or(n - 1);
        i32::try_from(index + 1).unwrap_or(i32::MAX)
    }

    /// The retry topic of the group.
    pub fn retry_topic(&self) -> String {
        format!("%RETRY%{}", self.group)
    }

    /// The broker's dead-letter topic of the group.
    pub fn broker_dead_letter_topic(&self) -> String {
        format!("%DLQ%{}", self.group)
    }
}

/// The name server address list (`h1:9876;h2:9876`) of a `rocketmq://` URL.
pub(crate) fn name_servers(url: &str) -> Result<String, BrokerError> {
    let bad = |why: &str| {
        BrokerError::new(
            BrokerErrorKind::Config,
            format!(
                "{} is not a RocketMQ URL ({why}): expected rocketmq://HOST:9876",
                redact(url)
            ),
        )
    };
    let rest = url
        .strip_prefix("rocketmq://")
        .or_else(|| url.strip_prefix("ROCKETMQ://"))
        .ok_or_else(|| bad("wrong scheme"))?;
    let hosts = rest.split(['/', '?']).next().unwrap_or_default();
    let hosts = hosts.rsplit_once('@').map_or(hosts, |(_, h)| h);
    if hosts.is_empty() {
        return Err(bad("no host"));
    }
    let mut out = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(bad("an empty host"));
        }
        let has_port = host
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && !h.ends_with('[') && p.parse::<u16>().is_ok());
        out.push(if has_port {
            host.to_owned()
        } else {
            format!("{host}:9876")
        });
    }
    Ok(out.join(";"))
}

/// The client's own runtime: a `RuntimeOwner` (its Tokio runtime, sized for the consumer's
/// listener calls), the `ClientRuntime` derived from it and a no-op telemetry guard.
pub(crate) struct Domain {
    owner: parking_lot::Mutex<Option<RuntimeOwner>>,
    pub(crate) client: Arc<ClientRuntime>,
    pub(crate) handle: tokio::runtime::Handle,
    _telemetry: TelemetryRuntimeGuard,
}

impl Domain {
    /// A runtime whose blocking pool runs `listeners` listener calls at once (plus the client's
    /// own blocking work), with `task_timeout` per call.
    pub(crate) fn new(
        name: &str,
        listeners: usize,
        task_timeout: Duration,
    ) -> Result<Arc<Self>, BrokerError> {
        let failed = |what: &str, e: String| {
            BrokerError::new(
                BrokerErrorKind::Config,
                format!("starting the RocketMQ client runtime ({what}): {e}"),
            )
        };
        // The runtime accepts 3 to 512 blocking threads.
        let blocking = (listeners + 8).clamp(3, 512);
        let mut config = RuntimeConfig::for_parallelism(format!("idem-rocketmq-{name}"), 2)
            .with_max_blocking_threads(blocking)
            .map_err(|e| failed("blocking threads", e.to_string()))?;
        for lane in [
            &mut config.blocking_lane_policies.metadata_io,
            &mut config.blocking_lane_policies.storage_io,
        ] {
            lane.max_concurrency = blocking;
            lane.max_queue_depth = blocking * 16;
            lane.task_timeout = task_timeout.max(Duration::from_secs(30));
        }
        let owner = RuntimeOwner::plan(config)
            .map_err(|e| failed("configuration", e.to_string()))?
            .build()
            .map_err(|e| failed("runtime", e.to_string()))?;
        let telemetry = TelemetryRuntimeGuard::noop();
        let client = ClientRuntime::try_new(
            owner.root_context().component("idem-rocketmq"),
            ClientRuntimeConfig {
                shutdown_timeout: Duration::from_secs(5),
                ..ClientRuntimeConfig::default()
            },
            telemetry.handle(),
        )
        .map_err(|e| failed("client", e.to_string()))?;
        // The owner's handle, read on a thread of its own (block_on is not allowed inside the
        // caller's runtime).
        let handle = std::thread::scope(|s| {
            s.spawn(|| owner.block_on(async { tokio::runtime::Handle::current() }))
                .join()
        })
        .map_err(|_| failed("runtime handle", "the runtime thread panicked".to_owned()))?;
        Ok(Arc::new(Self {
            owner: parking_lot::Mutex::new(Some(owner)),
            client,
            handle,
            _telemetry: telemetry,
        }))
    }

    /// Runs `fut` on the client's runtime (the client's connections live there). It is spawned
    /// at once, so the caller's future holds only the join handle: the client's futures are
    /// deep types, and holding them would push callers past the compiler's layout depth.
    pub(crate) fn run<F>(
        &self,
        fut: F,
    ) -> impl std::future::Future<Output = Result<F::Output, BrokerError>> + Send + 'static
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let joined = self.handle.spawn(fut);
        async move {
            joined.await.map_err(|e| {
                BrokerError::new(
                    BrokerErrorKind::Connection,
                    format!("the RocketMQ client runtime is gone: {e}"),
                )
            })
        }
    }

    /// Stops the runtime at once: its tasks and connections end as if the process died.
    pub(crate) fn kill(&self) {
        if let Some(owner) = self.owner.lock().take() {
            let _ = owner.shutdown_background();
        }
    }

    /// A client configuration for `url`'s name servers.
    pub(crate) fn client_config(
        url: &str,
        instance: &str,
        route_poll: Duration,
    ) -> Result<ClientConfig, BrokerError> {
        let mut config = ClientConfig::default();
        config.set_namesrv_addr(name_servers(url)?.into());
        config.set_instance_name(format!("{instance}-{}", crate::new_message_id()).into());
        // The client accepts 10 s to 10 min.
        config.set_poll_name_server_interval(
            u32::try_from(route_poll.as_millis())
                .unwrap_or(u32::MAX)
                .clamp(10_000, 600_000),
        );
        Ok(config)
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A message to `topic` with `payload`.
pub(crate) fn new_message(
    topic: &str,
    payload: bytes::Bytes,
) -> Result<rocketmq_model::common::message::message_single::Message, BrokerError> {
    rocketmq_model::common::message::message_single::Message::builder()
        .topic(topic)
        .body(payload)
        .build()
        .map_err(|e| {
            BrokerError::new(
                BrokerErrorKind::Config,
                format!("a message to topic {topic:?}: {e}"),
            )
        })
}

/// Maps a client error: timeouts are timeouts, the rest a connection problem unless it names a
/// setting.
pub(crate) fn client_error(what: &str, e: impl std::fmt::Display) -> BrokerError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let kind = if lower.contains("timeout") || lower.contains("timed out") {
        BrokerErrorKind::Timeout
    } else if lower.contains("illegal")
        || lower.contains("invalid")
        || lower.contains("not allowed")
        || lower.contains("no permission")
    {
        BrokerErrorKind::Config
    } else {
        BrokerErrorKind::Connection
    };
    let line = text.lines().next().unwrap_or_default().to_owned();
    BrokerError::new(kind, format!("{what}: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_server_urls() {
        assert_eq!(
            name_servers("rocketmq://127.0.0.1:9876").ok(),
            Some("127.0.0.1:9876".to_owned())
        );
        assert_eq!(
            name_servers("rocketmq://a,b:9877/").ok(),
            Some("a:9876;b:9877".to_owned())
        );
        let e = name_servers("rocketmq://").map(drop).err();
        assert!(e.is_some_and(|e| e.to_string().contains("no host")));
        let e = name_servers("amqp://u:secret@h").map(drop).err();
        assert!(e.is_some_and(|e| !e.to_string().contains("secret")));
    }

    #[test]
    fn delays_round_up_to_a_level() {
        let c = RocketMqConfig::new("t", "g");
        assert_eq!(c.delay_level(Duration::ZERO), 1);
        assert_eq!(c.delay_level(Duration::from_millis(700)), 1);
        assert_eq!(c.delay_level(Duration::from_secs(2)), 2);
        assert_eq!(c.delay_level(Duration::from_secs(60)), 5);
        assert_eq!(c.delay_level(Duration::from_secs(86_400)), 18);
        let c = c.delay_levels([Duration::from_secs(1); 3]);
        assert_eq!(c.delay_level(Duration::from_secs(10)), 3);
        assert_eq!(c.dead_letter_topic, "g_IDEM_DLQ");
        assert_eq!(c.retry_topic(), "%RETRY%g");
    }
}
