//! # idem-redis: the Redis store
//!
//! [`RedisStore`] keeps idem records in Redis. Every transition of the state machine (claim,
//! complete, release, extend, fail) is one Lua script (`lua/*.lua`, sent with `EVALSHA` and
//! loaded again on `NOSCRIPT`) that the server runs atomically, on its own clock (`TIME`), so
//! consumers with skewed clocks agree on leases. A duplicate costs one round trip: the claim
//! script answers with the stored result. [`claim_many`](idem::Store::claim_many) and
//! [`complete_many`](idem::Store::complete_many) take one round trip per batch (see
//! [`Batching`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem::{Executor, Namespace};
//! use idem_redis::RedisStore;
//!
//! let store = RedisStore::connect("redis://127.0.0.1:6379/0").await?;
//! let exec = Executor::new(store);
//! let key = Namespace::new("emails")?.key("msg-1")?;
//! let outcome = exec
//!     .run(key, b"payload", |_attempt| async { Ok::<_, std::io::Error>(()) })
//!     .await?;
//! println!("{}", outcome.kind());
//! # Ok(()) }
//! ```
//!
//! ## Layout in Redis
//!
//! One string per key, named `<prefix>{<namespace>:<id>}` (prefix `idem:` by default). The
//! braces are a hash tag: a single-key script touches one hash slot, as Redis Cluster requires.
//! The client itself connects to one standalone server (or a primary behind Sentinel or a
//! proxy); a Redis Cluster node is refused at connect with a clear error, since a cluster
//! client (routing each key to its slot's node, [`Batching::Pipeline`]) is not built yet.
//! The value is a compact binary record (version, state, lease end, attempts, times,
//! fingerprint, token, owner, then the result), laid out in `lua/prelude.lua`: one string lets a
//! claim of a new key be a single `SET … NX GET` inside its script and every other write a
//! single `SET`, which is what a script costs the server. [`Store::get`] (and
//! `idem` operator commands) decode it; `redis-cli` shows bytes. Owner labels are cut to 1 KiB,
//! and an empty owner reads back as none.
//!
//! Retention is Redis's own key expiry: every write sets the key's time to live to the record's
//! expiry plus an [expiry grace](RedisStoreBuilder::expiry_grace) (1 hour by default). A record
//! past its expiry no longer counts (a claim reprocesses it, exactly as on every other store);
//! during the grace it is still there, so a message redelivered just after its retention is
//! reported and counted as a reprocess rather than as new.
//! [`purge_expired`](idem::Store::purge_expired) is never needed: it only deletes records in
//! their grace early, and it scans the prefix to find them.
//!
//! Requires Redis 7.0 or later (`SET` with both `NX` and `GET`); the store checks the version
//! when it connects. Tested with Redis 7.0.
//!
//! ## Durability: what Redis promises, and what that means for deduplication
//!
//! A reply from this store means the server applied the script in memory. What survives after
//! that depends on the server's configuration, and a lost record means the message can run
//! again (a claim lost mid-handler lets a redelivery run concurrently; a completion lost makes
//! the duplicate run the handler a second time):
//!
//! - **Restarts.** Without the append-only file (`appendonly no`, RDB snapshots only, or no
//!   persistence at all) every record written since the last snapshot vanishes when Redis
//!   restarts or crashes. With `appendonly yes` and `appendfsync everysec` (Redis's default
//!   when AOF is on), a crash of the machine loses up to about one second of records; a crash of
//!   the Redis process alone loses nothing that was replied to. `appendfsync always` fsyncs
//!   before replying and loses nothing, at a large cost in throughput.
//! - **Replication and failover.** Replication is asynchronous: a record acknowledged by the
//!   primary may not have reached the replica that a failover (Sentinel, Cluster) promotes.
//!   Records written in the last moments before a failover can be lost. `WAIT` narrows this but
//!   does not close it, and this store does not use it.
//! - **Eviction.** With a `maxmemory` limit and any `maxmemory-policy` but `noeviction`, Redis
//!   deletes keys when memory is full. Every idem key has a TTL, so the `volatile-*` policies
//!   evict them as readily as the `allkeys-*` ones. An evicted completed record turns the next
//!   duplicate into a new message. The store reads the policy when it connects and logs a
//!   warning if it can evict ([`RedisStore::server_settings`] exposes what it found). Under
//!   `noeviction`, a full Redis refuses writes instead: the store returns a transient
//!   [`Busy`](idem::StoreErrorKind::Busy) error and the executor fails closed.
//!
//! Recommended for deduplication: a dedicated Redis (or database) with `maxmemory-policy
//! noeviction`, `appendonly yes`, `appendfsync everysec` (or `always` where a second of
//! duplicates after a power loss is not acceptable), memory sized for the records of one
//! retention window (about 200 bytes plus the result per message), and a retention longer than
//! the broker's redelivery horizon.
//!
//! ## Failures
//!
//! Every operation has a deadline ([`RedisStoreBuilder::timeout`], 5 s by default), reconnection
//! included: it never hangs. A dropped connection or a server that is down gives
//! [`Unavailable`](idem::StoreErrorKind::Unavailable), a missing answer
//! [`Timeout`](idem::StoreErrorKind::Timeout) (the write may or may not have happened; a fenced
//! retry is safe), a server loading its data after a restart
//! [`Busy`](idem::StoreErrorKind::Busy): all transient, so the executor fails closed and the
//! broker redelivers. The connection ([`redis::aio::ConnectionManager`]) reconnects by itself
//! when the server is back, and scripts that the restarted server forgot are loaded again on
//! `NOSCRIPT`. A key under the prefix that does not hold a decodable record is
//! [`Corrupt`](idem::StoreErrorKind::Corrupt), never treated as absent.

mod codec;
mod error;
mod script;
mod settings;

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use idem::{
    Claim, ClaimRequest, Completion, DEFAULT_MAX_RESULT_BYTES, Inspect, Key, Record, State, Store,
    StoreError, StoreErrorKind, Timestamp, Token, WriteOutcome, check_result_size,
};
pub use redis;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisError, Value};

use crate::codec::{HEAD_BYTES, packed, record_key, record_tail, token_bytes};
use crate::error::{elapsed, from_redis};
use crate::script::{SCRIPTS, eval, eval_pipeline, evalsha};
pub use crate::settings::ServerSettings;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem:";
/// The default deadline of one operation, reconnection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default deadline of one connection attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default time Redis keeps a record after it stopped counting.
pub const DEFAULT_EXPIRY_GRACE: Duration = Duration::from_secs(3600);

/// Leases, retentions and the grace are capped at 10^13 ms (317 years) so that every time the
/// scripts compute stays exact in Lua's doubles.
const MAX_DURATION_MS: i64 = 10_000_000_000_000;

/// Keys scanned per `SCAN` call by the operator views and purges.
const SCAN_COUNT: usize = 1000;

/// Most keys one script call of a [`Batching::Script`] batch handles: a script blocks the
/// server while it runs, so larger batches go as several calls (still one round trip).
const MAX_KEYS_PER_SCRIPT: usize = 256;

/// How [`claim_many`](idem::Store::claim_many) and [`complete_many`](idem::Store::complete_many)
/// reach the server. Both take one round trip per batch and behave exactly like the single
/// forms applied in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum Batching {
    /// One script call for the whole batch (up to 256 keys per call), the default. A script
    /// call has a fixed cost on the server larger than a `SET` (measured with callgrind on
    /// Redis 7.0: a claim of a new key costs about 48,000 instructions as its own call and
    /// about 17,000 inside a batch call; see `BENCHMARKS.md`), and a batch pays it once. The
    /// batch is atomic, and its keys lie in many hash slots, which Redis Cluster refuses.
    #[default]
    Script,
    /// One single-key script call per item, pipelined: every call touches one hash slot, as
    /// Redis Cluster requires, at about twice the server time per message.
    Pipeline,
}

/// How [`RedisStore::batch`] builds the script calls of a batch of `T`s.
struct BatchCall<'a, T, G> {
    key: &'a (dyn Fn(&T) -> &Key + Sync),
    /// Consecutive items with equal groups share one call (and its shared arguments).
    group: &'a (dyn Fn(&T) -> G + Sync),
    shared_args: &'a (dyn Fn(&T, &mut Cmd) + Sync),
    item_args: &'a (dyn Fn(&T, &mut Cmd) + Sync),
}

fn ms(d: Duration) -> i64 {
    idem::duration_millis(d).min(MAX_DURATION_MS)
}

/// Builds a [`RedisStore`]: `RedisStore::builder(url)…connect().await`.
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    max_result_bytes: usize,
    timeout: Duration,
    connect_timeout: Duration,
    expiry_grace: Duration,
    batching: Batching,
    #[cfg(feature = "tls")]
    tls_root: Option<Vec<u8>>,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &redact(&self.url))
            .field("prefix", &self.prefix)
            .field("max_result_bytes", &self.max_result_bytes)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("expiry_grace", &self.expiry_grace)
            .field("batching", &self.batching)
            .finish()
    }
}

impl RedisStoreBuilder {
    /// The prefix of every record key (default `idem:`). It must not contain `{` or `}`, which
    /// would move the hash tag.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Largest result `complete` accepts (default 64 KiB).
    #[must_use]
    pub fn max_result_bytes(mut self, limit: usize) -> Self {
        self.max_result_bytes = limit;
        self
    }

    /// Deadline of one operation, waiting for a reconnection included (default 5 s). Past it,
    /// the operation returns [`Timeout`](idem::StoreErrorKind::Timeout).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Deadline of one connection attempt (default 2 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long Redis keeps a record after its retention ended (default 1 hour). During the
    /// grace a claim reports [`Reprocess`](idem::Acquisition::Reprocess) (counted by the
    /// executor) instead of [`New`](idem::Acquisition::New), and the record still shows in
    /// [`get`](idem::Store::get). Zero lets Redis delete records as soon as they stop counting
    /// (up to a millisecond before: Redis counts a time to live from the script's start), which
    /// saves the memory of one grace period of records.
    #[must_use]
    pub fn expiry_grace(mut self, grace: Duration) -> Self {
        self.expiry_grace = grace;
        self
    }

    /// For `rediss://` URLs: trust the certificate authority in `pem` (a private CA) instead of
    /// the system's root certificates.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls_root_certificate(mut self, pem: Vec<u8>) -> Self {
        self.tls_root = Some(pem);
        self
    }

    /// How batches reach the server (default [`Batching::Script`]).
    #[must_use]
    pub fn batching(mut self, batching: Batching) -> Self {
        self.batching = batching;
        self
    }

    /// Connects, checks the server's eviction policy and persistence settings (a warning is
    /// logged if the policy can evict records), and returns the store.
    ///
    /// # Errors
    /// [`Config`](idem::StoreErrorKind::Config) for an invalid URL or prefix, a `rediss://` URL
    /// without the `tls` feature, or refused credentials;
    /// [`Unavailable`](idem::StoreErrorKind::Unavailable) or
    /// [`Timeout`](idem::StoreErrorKind::Timeout) when the server cannot be reached.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let shown = redact(&self.url);
        if self.prefix.contains(['{', '}']) {
            return Err(StoreError::new(
                StoreErrorKind::Config,
                format!(
                    "key prefix {:?} contains a brace, which would move the hash tag",
                    self.prefix
                ),
            ));
        }
        if self.url.starts_with("rediss://") && !cfg!(feature = "tls") {
            return Err(StoreError::new(
                StoreErrorKind::Config,
                format!("{shown} asks for TLS, and this build of idem-redis has no `tls` feature"),
            ));
        }
        let client = self.client().map_err(|e| {
            StoreError::new(
                StoreErrorKind::Config,
                format!("invalid Redis URL {shown}: {}", e.detail().unwrap_or("")),
            )
            .with_source(e)
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.timeout))
            // Reconnection attempts while a command waits: few and short, so that a command's
            // own deadline (not the retry schedule) decides when the caller hears of an outage.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let op = format!("connect to {shown}");
        let deadline = self.connect_timeout * 3 + self.timeout;
        let connecting = ConnectionManager::new_with_config(client, config);
        let mut conn = match within(&op, deadline, connecting).await {
            Err(e) if e.kind() == StoreErrorKind::Timeout => {
                // Nothing was written: say what usually hangs a connection instead.
                return Err(StoreError::new(
                    StoreErrorKind::Timeout,
                    format!(
                        "{op}: no answer within {deadline:?} (a server that hangs, or a rediss:// \
                         URL for a server without TLS)"
                    ),
                ));
            }
            other => other?,
        };
        let settings = within(&op, self.timeout, ServerSettings::read(&mut conn)).await?;
        if let (Some(major), Some(version)) = (settings.major_version(), &settings.version) {
            if major < 7 {
                return Err(StoreError::new(
                    StoreErrorKind::Config,
                    format!(
                        "{shown} runs Redis {version}; idem needs Redis 7.0 or later (SET with NX \
                         and GET)"
                    ),
                ));
            }
        }
        if settings.mode.as_deref() == Some("cluster") {
            // Every script touches one hash slot per key (`{namespace:id}`), so the records are
            // ready for a cluster; the client is not: it holds one connection to one node, and
            // a batch script spans many slots.
            return Err(StoreError::new(
                StoreErrorKind::Config,
                format!(
                    "{shown} is a Redis Cluster node; this version of idem-redis connects to one \
                     standalone server (or a primary behind Sentinel or a proxy), not to a cluster"
                ),
            ));
        }
        log_settings(&shown, &settings);
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix: self.prefix,
                max_result_bytes: self.max_result_bytes,
                timeout: self.timeout,
                grace_ms: ms(self.expiry_grace),
                batching: self.batching,
                settings,
                shown_url: shown,
            }),
        })
    }
}

impl RedisStoreBuilder {
    fn client(&self) -> redis::RedisResult<redis::Client> {
        #[cfg(feature = "tls")]
        if let Some(root) = &self.tls_root {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root.clone()),
            };
            return redis::Client::build_with_tls(self.url.as_str(), certs);
        }
        redis::Client::open(self.url.as_str())
    }
}

fn log_settings(url: &str, s: &ServerSettings) {
    match (&s.maxmemory_policy, s.may_evict()) {
        (Some(policy), Some(true)) => tracing::warn!(
            redis = url,
            maxmemory_policy = %policy,
            maxmemory = s.maxmemory.unwrap_or(0),
            "Redis may evict idem records when memory is full (every idem key has a TTL, so \
             volatile-* policies evict them too); an evicted record lets a duplicate run again. \
             Set maxmemory-policy noeviction."
        ),
        (None, _) => tracing::info!(
            redis = url,
            "cannot read Redis's maxmemory-policy (CONFIG GET refused); make sure it is \
             noeviction, or records may be evicted"
        ),
        _ => {}
    }
    if s.appendonly == Some(false) {
        tracing::info!(
            redis = url,
            "Redis runs without the append-only file: idem records vanish when it restarts"
        );
    }
}

/// Runs `fut` with a deadline, mapping both failures to [`StoreError`]s.
async fn within<T>(
    op: &str,
    deadline: Duration,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(from_redis(op, e)),
        Err(_) => Err(elapsed(op, deadline)),
    }
}

/// The Redis [`Store`]. Clones share one multiplexed connection.
///
/// See the [crate docs](crate) for the layout in Redis, durability and failures.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    prefix: String,
    max_result_bytes: usize,
    timeout: Duration,
    grace_ms: i64,
    batching: Batching,
    settings: ServerSettings,
    shown_url: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.shown_url)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects with the default settings; see [`RedisStoreBuilder::connect`].
    ///
    /// `url` is `redis://[user[:password]@]host[:port][/db]`.
    ///
    /// # Errors
    /// As [`RedisStoreBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// A builder for a store at `url`.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            expiry_grace: DEFAULT_EXPIRY_GRACE,
            batching: Batching::default(),
            #[cfg(feature = "tls")]
            tls_root: None,
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis key that holds `key`'s record.
    pub fn record_key(&self, key: &Key) -> String {
        record_key(&self.inner.prefix, key)
    }

    /// The server settings read when the store connected (eviction policy, persistence).
    pub fn server_settings(&self) -> &ServerSettings {
        &self.inner.settings
    }

    /// Reads the server settings again (they may have changed since the store connected).
    ///
    /// # Errors
    /// A transient [`StoreError`] when the server cannot be reached.
    pub async fn read_server_settings(&self) -> Result<ServerSettings, StoreError> {
        let mut conn = self.inner.conn.clone();
        within(
            "read settings",
            self.inner.timeout,
            ServerSettings::read(&mut conn),
        )
        .await
    }

    /// The store's connection, shared with it: for the caller's own commands on the same
    /// multiplexed connection (the benchmark's baseline uses it).
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    async fn run<T>(
        &self,
        op: &str,
        f: impl AsyncFnOnce(&mut ConnectionManager) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.inner.conn.clone();
        within(op, self.inner.timeout, f(&mut conn)).await
    }

    fn key(&self, key: &Key) -> String {
        record_key(&self.inner.prefix, key)
    }

    /// The time to live of a record that stops counting `ms` from now: Redis keeps it for the
    /// grace beyond. At least 1 ms, which Redis requires (such a record is already expired).
    fn ttl(&self, ms: i64) -> i64 {
        (ms + self.inner.grace_ms).max(1)
    }

    /// A claim's arguments shared by every claim of one script call: lease, retention, grace
    /// and attempt limit (packed), and the time to live of an acquired record.
    fn claim_shared_args(&self, req: &ClaimRequest, cmd: &mut Cmd) {
        let (lease, retention) = (ms(req.lease), ms(req.retention));
        let mut numbers = packed(&[lease, retention, self.inner.grace_ms], None);
        let max = req.max_attempts.map_or(0, NonZeroU32::get);
        numbers.extend_from_slice(&max.to_be_bytes());
        cmd.arg(numbers).arg(self.ttl(lease + retention));
    }

    /// A completion's arguments shared by every completion of one script call: retention and
    /// the time to live of a completed record.
    fn complete_shared_args(&self, c: &Completion, cmd: &mut Cmd) {
        let retention = ms(c.retention);
        cmd.arg(&retention.to_be_bytes()[..])
            .arg(self.ttl(retention));
    }

    /// Runs `script` over `items` in one round trip and returns one reply per item, in order.
    ///
    /// Items go in script calls of consecutive items with equal `group` (the parameters they
    /// share), up to [`MAX_KEYS_PER_SCRIPT`] with [`Batching::Script`] and one each with
    /// [`Batching::Pipeline`]. A call is `EVALSHA <script> <n> <keys…> <shared args of its
    /// first item> <each item's args…>`.
    async fn batch<T, G: PartialEq>(
        &self,
        op: &str,
        script: &redis::Script,
        items: &[T],
        call: BatchCall<'_, T, G>,
    ) -> Result<Vec<Value>, StoreError> {
        let per_call = match self.inner.batching {
            Batching::Script => MAX_KEYS_PER_SCRIPT,
            Batching::Pipeline => 1,
        };
        let mut chunks: Vec<&[T]> = Vec::new();
        let mut start = 0;
        for i in 1..=items.len() {
            let full = i - start == per_call;
            if i == items.len() || full || (call.group)(&items[i]) != (call.group)(&items[start]) {
                chunks.push(&items[start..i]);
                start = i;
            }
        }
        let mut cmds: Vec<Cmd> = chunks
            .iter()
            .map(|chunk| {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(script.get_hash()).arg(chunk.len());
                for item in *chunk {
                    cmd.arg(self.key((call.key)(item)));
                }
                (call.shared_args)(&chunk[0], &mut cmd);
                for item in *chunk {
                    (call.item_args)(item, &mut cmd);
                }
                cmd
            })
            .collect();
        let values = match cmds.pop() {
            Some(cmd) if cmds.is_empty() => {
                vec![self.run(op, async |c| eval(c, script, &cmd).await).await?]
            }
            last => {
                let mut pipe = redis::pipe();
                for cmd in cmds.into_iter().chain(last) {
                    pipe.add_command(cmd);
                }
                self.run(op, async |c| eval_pipeline(c, script, &pipe).await)
                    .await?
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (chunk, value) in chunks.iter().zip(values) {
            // A call for one key answers for it; a call for several answers with an array.
            match value {
                _ if chunk.len() == 1 => out.push(value),
                Value::Array(replies) if replies.len() == chunk.len() => out.extend(replies),
                Value::ServerError(e) => return Err(error::from_server(op, e)),
                other => {
                    return Err(error::unexpected(
                        op,
                        format!("{other:?} for {} keys", chunk.len()),
                    ));
                }
            }
        }
        Ok(out)
    }

    async fn write(
        &self,
        op: &str,
        script: &redis::Script,
        cmd: Cmd,
    ) -> Result<WriteOutcome, StoreError> {
        let value = self.run(op, async |c| eval(c, script, &cmd).await).await?;
        codec::write_reply(op, value)
    }

    /// One page of `SCAN` over the prefix.
    async fn scan_page(&self, op: &str, cursor: u64) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(codec::scan_pattern(&self.inner.prefix))
            .arg("COUNT")
            .arg(SCAN_COUNT);
        self.run(op, async |c| cmd.query_async(c).await).await
    }

    /// Every key under the prefix, each once (`SCAN` may return a key twice). Costs one pass
    /// over the whole database (not only the prefix) and memory for the keys.
    async fn scan_all(&self, op: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut cursor = 0;
        loop {
            let (next, keys) = self.scan_page(op, cursor).await?;
            seen.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(seen.into_iter().collect())
    }

    /// The head of each record (its fixed-size fields, not the owner or result), in one round
    /// trip: empty for keys that vanished since the scan.
    async fn heads(&self, op: &str, keys: &[Vec<u8>]) -> Result<Vec<Value>, StoreError> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GETRANGE").arg(k).arg(0).arg(HEAD_BYTES - 1);
        }
        self.run(op, async |c| {
            c.send_packed_commands(&pipe, 0, keys.len()).await
        })
        .await
    }
}

impl Store for RedisStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.claim_many(std::slice::from_ref(req))
            .await?
            .pop()
            .ok_or_else(|| error::unexpected("claim", "no reply"))
    }

    async fn claim_many(&self, reqs: &[ClaimRequest]) -> Result<Vec<Claim>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let call = BatchCall {
            key: &|r: &ClaimRequest| &r.key,
            group: &|r: &ClaimRequest| (r.lease, r.retention, r.max_attempts),
            shared_args: &|r, cmd| self.claim_shared_args(r, cmd),
            item_args: &|r, cmd| {
                cmd.arg(record_tail(r.fingerprint, r.token, &r.owner));
            },
        };
        let replies = self.batch("claim", &SCRIPTS.claim, reqs, call).await?;
        reqs.iter()
            .zip(replies)
            .map(|(r, v)| codec::claim_reply(r, v))
            .collect()
    }

    async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
        self.complete_many(std::slice::from_ref(c))
            .await?
            .pop()
            .ok_or_else(|| error::unexpected("complete", "no reply"))
    }

    async fn complete_many(&self, cs: &[Completion]) -> Result<Vec<WriteOutcome>, StoreError> {
        for c in cs {
            check_result_size(&c.result, self.inner.max_result_bytes)?;
        }
        if cs.is_empty() {
            return Ok(Vec::new());
        }
        let call = BatchCall {
            key: &|c: &Completion| &c.key,
            group: &|c: &Completion| c.retention,
            shared_args: &|c, cmd| self.complete_shared_args(c, cmd),
            item_args: &|c, cmd| {
                cmd.arg(&token_bytes(c.token)[..]).arg(&c.result[..]);
            },
        };
        let replies = self.batch("complete", &SCRIPTS.complete, cs, call).await?;
        replies
            .into_iter()
            .map(|v| codec::write_reply("complete", v))
            .collect()
    }

    async fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        let retention = ms(retention);
        let mut cmd = evalsha(&SCRIPTS.release, &self.key(key));
        cmd.arg(packed(&[retention], Some(token)))
            .arg(self.ttl(retention));
        self.write("release", &SCRIPTS.release, cmd).await
    }

    async fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        let mut cmd = evalsha(&SCRIPTS.extend, &self.key(key));
        cmd.arg(packed(&[ms(lease), self.inner.grace_ms], Some(token)));
        self.write("extend", &SCRIPTS.extend, cmd).await
    }

    async fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        let retention = ms(retention);
        let mut cmd = evalsha(&SCRIPTS.fail, &self.key(key));
        cmd.arg(packed(&[retention], Some(token)))
            .arg(reason)
            .arg(self.ttl(retention));
        self.write("fail", &SCRIPTS.fail, cmd).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.key(key));
        let value = self
            .run("get", async |c| c.send_packed_command(&cmd).await)
            .await?;
        codec::record_reply(key, value)
    }

    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(key));
        let value = self
            .run("evict", async |c| c.send_packed_command(&cmd).await)
            .await?;
        Ok(codec::count_reply("evict", value)? > 0)
    }

    /// Redis deletes every record by itself, [expiry grace](RedisStoreBuilder::expiry_grace)
    /// after it stopped counting, so this is never needed. It deletes records in their grace
    /// early (at most `limit`), which costs a `SCAN` over the whole database from the start on
    /// every call, plus one `GET` per key under the prefix.
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        const OP: &str = "purge_expired";
        if limit == 0 {
            return Ok(0);
        }
        let now = self.now().await?;
        let mut deleted = 0;
        let mut cursor = 0;
        loop {
            let (next, keys) = self.scan_page(OP, cursor).await?;
            let heads = self.heads(OP, &keys).await?;
            let mut candidates = Vec::new();
            for (k, head) in keys.into_iter().zip(heads) {
                let Some(head) = self.head(OP, &k, head)? else {
                    continue;
                };
                // Records whose expiry passed by the time the purge started; the script checks
                // again on the server's clock, atomically.
                if codec::head_expires(&head).is_some_and(|e| e <= now) {
                    candidates.push(k);
                }
            }
            candidates.truncate(limit - deleted);
            if !candidates.is_empty() {
                let mut pipe = redis::pipe();
                for k in &candidates {
                    let key = String::from_utf8_lossy(k);
                    pipe.add_command(evalsha(&SCRIPTS.purge, &key));
                }
                let values = self
                    .run(OP, async |c| eval_pipeline(c, &SCRIPTS.purge, &pipe).await)
                    .await?;
                for v in values {
                    deleted += usize::from(codec::count_reply(OP, v)? == 1);
                }
            }
            if next == 0 || deleted >= limit {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    fn max_result_bytes(&self) -> usize {
        self.inner.max_result_bytes
    }
}

/// The operator views `SCAN` the database for keys under the prefix: each call costs one pass
/// over the whole database (Redis has no index by prefix), so use a dedicated database or
/// server for idem when these views matter.
impl Inspect for RedisStore {
    async fn now(&self) -> Result<Timestamp, StoreError> {
        let cmd = redis::cmd("TIME");
        let value = self
            .run("time", async |c| c.send_packed_command(&cmd).await)
            .await?;
        codec::time_reply(value)
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        const OP: &str = "count_by_state";
        let keys = self.scan_all(OP).await?;
        let mut counts: Vec<(State, u64)> = Vec::new();
        for chunk in keys.chunks(SCAN_COUNT) {
            for (k, head) in chunk.iter().zip(self.heads(OP, chunk).await?) {
                let Some(state) = self.head(OP, k, head)?.and_then(|h| codec::head_state(&h))
                else {
                    continue;
                };
                match counts.iter_mut().find(|(s, _)| *s == state) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((state, 1)),
                }
            }
        }
        counts.sort_by_key(|(s, _)| s.code());
        Ok(counts)
    }

    async fn in_progress(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        const OP: &str = "in_progress";
        let keys = self.scan_all(OP).await?;
        let mut held = Vec::new();
        for chunk in keys.chunks(SCAN_COUNT) {
            for (k, head) in chunk.iter().zip(self.heads(OP, chunk).await?) {
                let head = self.head(OP, k, head)?;
                if head.and_then(|h| codec::head_state(&h)) == Some(State::InProgress) {
                    held.push(k.clone());
                }
            }
        }
        let mut out = Vec::with_capacity(held.len());
        for chunk in held.chunks(SCAN_COUNT) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("GET").arg(k);
            }
            let values = self
                .run(OP, async |c| {
                    c.send_packed_commands(&pipe, 0, chunk.len()).await
                })
                .await?;
            for (raw, v) in chunk.iter().zip(values) {
                let key = self.parse_key(raw)?;
                // Gone or no longer in progress since the scan: skip it.
                let rec = codec::record_reply(&key, v)?;
                out.extend(rec.filter(|r| r.state == State::InProgress));
            }
        }
        out.sort_by_key(|r| (r.lease_until, r.updated_at));
        out.truncate(limit);
        Ok(out)
    }
}

impl RedisStore {
    fn parse_key(&self, raw: &[u8]) -> Result<Key, StoreError> {
        codec::parse_record_key(&self.inner.prefix, raw).ok_or_else(|| {
            StoreError::corrupt(format!(
                "Redis key {:?} is under the prefix but is not an idem record key",
                String::from_utf8_lossy(raw)
            ))
        })
    }

    /// The head of a scanned key from its `GETRANGE` reply, checked to be a record's; `None`
    /// if the key vanished since the scan (`GETRANGE` of a missing key is empty).
    fn head(&self, op: &str, raw: &[u8], v: Value) -> Result<Option<Vec<u8>>, StoreError> {
        let head = match v {
            Value::ServerError(e) => return Err(error::from_server(op, e)),
            Value::BulkString(b) if b.is_empty() => return Ok(None),
            Value::BulkString(b) => b,
            Value::Nil => return Ok(None),
            other => return Err(error::unexpected(op, format!("{other:?}"))),
        };
        if codec::head_state(&head).is_none() {
            return Err(StoreError::corrupt(format!(
                "Redis key {:?} under the prefix does not hold an idem record",
                String::from_utf8_lossy(raw)
            )));
        }
        Ok(Some(head))
    }
}

/// `url` with its credentials replaced by `***`, for messages and logs (see [`idem::redact_url`]).
pub fn redact(url: &str) -> String {
    idem::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://u:pw@h/1"), "rediss://u:***@h/1");
        assert_eq!(redact("redis://pw@h"), "redis://***@h");
        assert_eq!(redact("redis://h:6379/2"), "redis://h:6379/2");
    }

    #[test]
    fn durations_are_capped() {
        assert_eq!(ms(Duration::MAX), MAX_DURATION_MS);
        assert_eq!(ms(Duration::from_millis(1500)), 1500);
    }
}
