//! The relay: claims rows with a lease, publishes them with their message id, marks them sent
//! fenced by the claim's token. See the crate docs for the guarantees.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use idem::Backoff;
use idem_broker::{AnyProducer, BrokerErrorKind, BrokerUrl, Outgoing};
use serde::{Deserialize, Serialize};

use crate::db::{DbUrl, OutboxDb};
use crate::error::{OutboxError, OutboxErrorKind};
use crate::message::parse_headers;
use crate::rows::{Claimed, Failed};
use crate::table::Table;

/// The header carrying a message's ordering key, when it has one.
pub const ORDERING_KEY_HEADER: &str = "idem-ordering-key";

/// What a dead row does to the later messages of its ordering key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadPolicy {
    /// Later messages of the key go ahead; the dead row stays visible (at its position) until
    /// requeued. The default: one unsendable message never stalls anything else.
    #[default]
    SkipDead,
    /// The key stops at its dead row: its later messages wait until the row is requeued (and
    /// sent) or deleted. Other keys are not affected.
    StopKey,
}

/// Wakes relays in this process right after a commit, instead of at their next poll.
/// Clones share one signal; every relay given a clone (or the original) wakes.
///
/// ```
/// let notifier = idem_outbox::Notifier::new();
/// // after committing a transaction that enqueued messages:
/// notifier.notify();
/// ```
#[derive(Clone, Debug)]
pub struct Notifier(Arc<tokio::sync::watch::Sender<u64>>);

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    /// A new signal.
    pub fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(0).0))
    }

    /// Wakes every relay that uses this notifier.
    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// The relay's settings, without a command-line parser: start from [`RelayConfig::new`] and
/// change the public fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The database holding the outbox.
    pub db: DbUrl,
    /// The broker to publish to.
    pub broker: BrokerUrl,
    /// The outbox table (default `idem_outbox`).
    pub table: Table,
    /// Rows claimed per statement (default 128). Each row of a batch is published
    /// concurrently (rows of a batch have distinct ordering keys, or none).
    pub batch_size: usize,
    /// How long a claim lasts (default 30 s). A relay that dies (or stalls) past it loses its
    /// rows to another relay, which publishes them again with the same message id.
    pub lease: Duration,
    /// The longest wait for a broker's confirmation (default 10 s); a timeout counts as a
    /// failed attempt. Keep it well under the lease.
    pub publish_timeout: Duration,
    /// How often an idle relay looks for rows without being woken (default 1 s). PostgreSQL
    /// relays are woken on commit (LISTEN/NOTIFY) and in-process ones by a [`Notifier`]: the
    /// poll is the fallback.
    pub poll_interval: Duration,
    /// Publish attempts before a row goes dead (default 10). A lost broker connection does not
    /// count as an attempt (the relay pauses instead); a refusal, a timeout or an unroutable
    /// destination does.
    pub max_attempts: u32,
    /// Delay before a failed row's next attempt (default 1 s doubling to 5 min, ±25%).
    pub backoff: Backoff,
    /// What a dead row does to its key (default [`DeadPolicy::SkipDead`]).
    pub dead_policy: DeadPolicy,
    /// Sent rows older than this are deleted (default 7 days); `None` keeps them.
    pub retention: Option<Duration>,
    /// How often retention runs (default 60 s).
    pub purge_interval: Duration,
    /// Rows deleted per retention statement (default 1000); a round runs at most 100 of them.
    pub purge_batch: usize,
    /// PostgreSQL: LISTEN for the table's commit notifications (default true).
    pub listen: bool,
    /// An in-process wake-up signal, if enqueueing code shares one.
    pub notifier: Option<Notifier>,
    /// Create the table if missing before starting (default false: migrations are a deploy
    /// step; the relay fails with a schema error on a missing table).
    pub migrate: bool,
}

impl RelayConfig {
    /// The defaults documented on each field.
    pub fn new(db: DbUrl, broker: BrokerUrl) -> Self {
        Self {
            db,
            broker,
            table: Table::default(),
            batch_size: 128,
            lease: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            dead_policy: DeadPolicy::SkipDead,
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            purge_interval: Duration::from_secs(60),
            purge_batch: 1000,
            listen: true,
            notifier: None,
            migrate: false,
        }
    }

    /// Checks the settings that would make the relay misbehave rather than fail: no rows per
    /// claim, no attempt at all, or a publish that may still wait for its confirmation when
    /// its lease ends (another relay would publish the row meanwhile). [`Relay::run`] calls it.
    ///
    /// # Errors
    /// [`OutboxErrorKind::Config`] naming the setting.
    pub fn check(&self) -> Result<(), OutboxError> {
        let bad = |m: String| Err(crate::error::err(OutboxErrorKind::Config, m));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".to_owned());
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1".to_owned());
        }
        if self.publish_timeout >= self.lease {
            return bad(format!(
                "publish_timeout ({:?}) must be shorter than the lease ({:?}): a publish still \
                 waiting when the lease ends is published again by another relay",
                self.publish_timeout, self.lease
            ));
        }
        Ok(())
    }
}

/// What a relay did, for logs, tests and `--json` output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows claimed (a row claimed again after a failure counts again).
    pub claimed: u64,
    /// Publishes the broker confirmed.
    pub published: u64,
    /// Confirmed publishes the broker recognised as duplicates of an earlier one (NATS
    /// JetStream's `Nats-Msg-Id` window): a re-publish after a crash or a lost lease.
    pub duplicates: u64,
    /// Rows marked sent.
    pub marked: u64,
    /// Rows whose mark found the lease lost (another relay had claimed them): published here
    /// and (or) there, with the same message id.
    pub fenced: u64,
    /// Publish attempts that failed.
    pub failed: u64,
    /// Rows that went dead.
    pub dead: u64,
    /// Sent rows deleted by retention.
    pub purged: u64,
}

#[derive(Default)]
struct Counters {
    claimed: AtomicU64,
    published: AtomicU64,
    duplicates: AtomicU64,
    marked: AtomicU64,
    fenced: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    purged: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RelayStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayStats {
            claimed: g(&self.claimed),
            published: g(&self.published),
            duplicates: g(&self.duplicates),
            marked: g(&self.marked),
            fenced: g(&self.fenced),
            failed: g(&self.failed),
            dead: g(&self.dead),
            purged: g(&self.purged),
        }
    }
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// A live view of a running relay's [`RelayStats`].
#[derive(Clone)]
pub struct StatsHandle(Arc<Counters>);

impl std::fmt::Debug for StatsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl StatsHandle {
    /// The counts so far.
    pub fn snapshot(&self) -> RelayStats {
        self.0.snapshot()
    }
}

/// What a relay reports to an observer ([`Relay::observe`]), as it happens.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayEvent {
    /// The broker confirmed a row's publish; the row is not marked sent yet.
    Published {
        /// The row id.
        id: i64,
        /// The message id.
        message_id: String,
    },
    /// A publish failed; the row waits for its next attempt (or went dead).
    Failed {
        /// The row id.
        id: i64,
        /// The message id.
        message_id: String,
        /// Why.
        error: String,
        /// Whether the row went dead.
        dead: bool,
    },
    /// Rows were marked sent (`fenced` of them had lost their lease).
    Marked {
        /// Rows marked.
        marked: u64,
        /// Rows whose lease had been lost.
        fenced: u64,
    },
}

type Observer = Arc<dyn Fn(&RelayEvent) + Send + Sync>;

/// A relay over a connected [`OutboxDb`] and [`AnyProducer`]; [`run`] builds one from a
/// [`RelayConfig`]. Several relays (in one process or many) may share a table.
pub struct Relay {
    db: OutboxDb,
    producer: Arc<AnyProducer>,
    config: RelayConfig,
    counters: Arc<Counters>,
    observer: Option<Observer>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("db", &self.db)
            .field("producer", &self.producer)
            .finish_non_exhaustive()
    }
}

/// Connects the database and the broker of `config` and runs a relay until `shutdown`
/// completes; returns what it did. On shutdown the batch in flight is published and marked
/// (each publish is bounded by the publish timeout) before it returns.
///
/// # Errors
/// A bad configuration, a broker that cannot be reached at start, a missing table. Errors
/// while running (a database restart, a broker outage) are logged and retried with backoff.
pub async fn run(
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RelayStats, OutboxError> {
    let db = OutboxDb::connect(&config.db, config.table.clone()).await?;
    let producer = AnyProducer::connect(&config.broker).await.map_err(|e| {
        OutboxError::new(OutboxErrorKind::Broker, format!("relay producer: {e}")).with_source(e)
    })?;
    let stats = Relay::new(db.clone(), producer, config).run(shutdown).await;
    db.close().await;
    stats
}

struct Outcome {
    claimed: Claimed,
    result: Result<bool, idem_broker::BrokerError>,
}

impl Relay {
    /// A relay publishing `db`'s rows through `producer`, with `config`'s settings (its `db`
    /// and `broker` URLs are not used).
    pub fn new(db: OutboxDb, producer: AnyProducer, config: RelayConfig) -> Self {
        Self {
            db,
            producer: Arc::new(producer),
            config,
            counters: Arc::default(),
            observer: None,
        }
    }

    /// Calls `observer` for every [`RelayEvent`], on the relay's task: keep it short.
    #[must_use]
    pub fn observe(mut self, observer: impl Fn(&RelayEvent) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// A live view of the counters.
    pub fn stats(&self) -> StatsHandle {
        StatsHandle(Arc::clone(&self.counters))
    }

    fn emit(&self, event: RelayEvent) {
        if let Some(o) = &self.observer {
            o(&event);
        }
    }

    /// Runs until `shutdown` completes; see [`run`].
    ///
    /// # Errors
    /// A missing table or a bad configuration (a schema error at the first claim).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RelayStats, OutboxError> {
        self.config.check()?;
        if self.config.migrate {
            self.db.migrate().await?;
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        let listener = match (self.config.listen, self.db.listener()) {
            (true, Some(pg)) => Some(tokio::spawn(pg.listen(Arc::clone(&wake)))),
            _ => None,
        };
        let mut local = self.config.notifier.as_ref().map(Notifier::subscribe);
        let mut shutdown = std::pin::pin!(shutdown.fuse());
        let mut last_purge: Option<Instant> = None;
        let mut failures = 0u32;
        let mut first = true;
        let result = loop {
            if (&mut shutdown).now_or_never().is_some() {
                break Ok(());
            }
            if let Some(keep) = self.config.retention {
                if last_purge.is_none_or(|t| t.elapsed() >= self.config.purge_interval) {
                    last_purge = Some(Instant::now());
                    match self.db.purge_sent(keep, self.config.purge_batch, 100).await {
                        Ok(n) => add(&self.counters.purged, n),
                        Err(e) => tracing::warn!(error = %e, "outbox retention failed"),
                    }
                }
            }
            let stop_key = self.config.dead_policy == DeadPolicy::StopKey;
            let claimed = match self
                .db
                .claim(self.config.batch_size, self.config.lease, stop_key)
                .await
            {
                Ok(c) => c,
                Err(e) if first && e.kind() == OutboxErrorKind::Schema => break Err(e),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "claiming outbox rows failed; retrying");
                    self.pause(failures, &mut shutdown).await;
                    continue;
                }
            };
            first = false;
            if claimed.is_empty() {
                failures = 0;
                tokio::select! {
                    () = wake.notified() => {}
                    _ = async { match local.as_mut() { Some(rx) => rx.changed().await, None => std::future::pending().await } } => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    () = &mut shutdown => break Ok(()),
                }
                continue;
            }
            add(&self.counters.claimed, claimed.len() as u64);
            let broker_down = self.publish_batch(claimed).await;
            if broker_down {
                failures += 1;
                self.pause(failures, &mut shutdown).await;
            } else {
                failures = 0;
            }
        };
        if let Some(l) = listener {
            l.abort();
        }
        result.map(|()| self.counters.snapshot())
    }

    async fn pause(&self, failures: u32, shutdown: &mut (impl Future<Output = ()> + Unpin)) {
        let delay =
            Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).delay(failures);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown => {}
        }
    }

    /// Publishes a claimed batch and writes the outcomes back. Returns whether the broker
    /// connection was down (the relay should pause).
    async fn publish_batch(&self, claimed: Vec<Claimed>) -> bool {
        let timeout = self.config.publish_timeout;
        let producer = &self.producer;
        let n = claimed.len();
        let outcomes: Vec<Outcome> = futures_util::stream::iter(claimed)
            .map(|c| async move {
                let mut msg = Outgoing::with_id(c.message_id.as_str(), c.payload.clone());
                for (name, value) in parse_headers(c.headers.as_deref()) {
                    msg = msg.with_header(name, value);
                }
                if let Some(k) = &c.key {
                    msg = msg
                        .with_header(ORDERING_KEY_HEADER, k.as_str())
                        .with_key(k.as_str());
                }
                let result = match tokio::time::timeout(
                    timeout,
                    producer.publish_once(&c.destination, &msg),
                )
                .await
                {
                    Ok(Ok(receipt)) => Ok(receipt.duplicate),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(idem_broker::BrokerError::new(
                        BrokerErrorKind::Timeout,
                        format!("no confirmation within {timeout:?}"),
                    )),
                };
                Outcome { claimed: c, result }
            })
            .buffer_unordered(n.max(1))
            .collect()
            .await;
        let mut sent = Vec::with_capacity(outcomes.len());
        let mut broker_down = false;
        for o in outcomes {
            match o.result {
                Ok(duplicate) => {
                    add(&self.counters.published, 1);
                    if duplicate {
                        add(&self.counters.duplicates, 1);
                    }
                    self.emit(RelayEvent::Published {
                        id: o.claimed.id,
                        message_id: o.claimed.message_id.clone(),
                    });
                    sent.push((o.claimed.id, o.claimed.token));
                }
                Err(e) => {
                    add(&self.counters.failed, 1);
                    let down = e.kind() == BrokerErrorKind::Connection;
                    broker_down |= down;
                    let attempts = o.claimed.attempts.max(0) as u32 + u32::from(!down);
                    let dead = !down && attempts >= self.config.max_attempts.max(1);
                    let delay = if down {
                        Duration::from_millis(500)
                    } else {
                        self.config.backoff.delay(attempts.max(1))
                    };
                    let error = e.to_string();
                    tracing::warn!(message_id = %o.claimed.message_id, destination = %o.claimed.destination, attempts, dead, error = %error, "outbox publish failed");
                    let failed = Failed {
                        id: o.claimed.id,
                        token: o.claimed.token,
                        counts: !down,
                        dead,
                        delay_ms: i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2),
                        error: error.clone(),
                    };
                    match self.db.mark_failed(&failed).await {
                        Ok(1) if dead => add(&self.counters.dead, 1),
                        Ok(1) => {}
                        Ok(_) => add(&self.counters.fenced, 1),
                        Err(e) => {
                            tracing::warn!(error = %e, "recording a failed publish failed; the lease will expire")
                        }
                    }
                    self.emit(RelayEvent::Failed {
                        id: o.claimed.id,
                        message_id: o.claimed.message_id,
                        error,
                        dead,
                    });
                }
            }
        }
        if !sent.is_empty() {
            let mut tries = 0u32;
            loop {
                match self.db.mark_sent(&sent).await {
                    Ok(marked) => {
                        let fenced = sent.len() as u64 - marked.min(sent.len() as u64);
                        add(&self.counters.marked, marked);
                        add(&self.counters.fenced, fenced);
                        self.emit(RelayEvent::Marked { marked, fenced });
                        break;
                    }
                    Err(e) if tries < 5 && e.is_transient() => {
                        tries += 1;
                        tracing::warn!(error = %e, "marking outbox rows sent failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100) * tries).await;
                    }
                    Err(e) => {
                        // The rows stay leased; when the lease runs out they are published
                        // again with the same message ids, which consumers de-duplicate.
                        tracing::warn!(error = %e, "marking outbox rows sent failed; they will be re-published after their lease");
                        break;
                    }
                }
            }
        }
        broker_down
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_would_misbehave_are_refused() {
        let config = || {
            RelayConfig::new(
                DbUrl::parse("sqlite:outbox.db").unwrap(),
                BrokerUrl::parse("amqp://127.0.0.1").unwrap(),
            )
        };
        assert!(config().check().is_ok());
        let mut c = config();
        c.lease = c.publish_timeout;
        let e = c.check().unwrap_err();
        assert_eq!(e.kind(), OutboxErrorKind::Config);
        assert!(e.to_string().contains("shorter than the lease"), "{e}");
        let mut c = config();
        c.batch_size = 0;
        assert!(c.check().unwrap_err().to_string().contains("batch_size"));
        let mut c = config();
        c.max_attempts = 0;
        assert!(c.check().unwrap_err().to_string().contains("max_attempts"));
    }
}
