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
//!
//! ## Redis Cluster
//!
//! When the URL names a Redis Cluster node (or a comma-separated list of them:
//! `redis://127.0.0.1:7000,127.0.0.1:7001`), the store detects it at connect and uses the
//! redis crate's cluster client: every key goes to its slot's master, `MOVED` and `ASK` are
//! followed and the slot map refreshed by the client, and scripts are loaded again (`SCRIPT
//! LOAD` on every master) when a node answers `NOSCRIPT`, as after a failover. A batch goes as
//! one pipeline per master, all masters at once (see [`Batching`]); the operator views and
//! [`purge_expired`](idem::Store::purge_expired) scan every master. Each master runs the
//! scripts on its own clock: keep the nodes' clocks in sync. `docs/redis-cluster.md` has the
//! set-up, the costs measured against one server, and what a failover loses.
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
//!   does not close it: [`RedisStoreBuilder::wait_for_replicas`] sends it after every claim and
//!   completion (off by default).
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
//! broker redelivers. The connection ([`redis::aio::ConnectionManager`], or the cluster
//! client) reconnects by itself when the server is back, and scripts that the restarted server forgot are loaded again on
//! `NOSCRIPT`. A key under the prefix that does not hold a decodable record is
//! [`Corrupt`](idem::StoreErrorKind::Corrupt), never treated as absent.

pub mod cluster;
mod codec;
mod conn;
mod error;
mod script;
mod settings;

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem::{
    Claim, ClaimRequest, Completion, DEFAULT_MAX_RESULT_BYTES, Inspect, Key, Record, State, Store,
    StoreError, StoreErrorKind, Timestamp, Token, WriteOutcome, check_result_size,
};
pub use redis;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{Route, SlotAddr};
use redis::{Cmd, RedisError, Value};

use crate::codec::{HEAD_BYTES, packed, record_key, record_tail, token_bytes};
pub use crate::conn::RedisConnection;
use crate::conn::{OnNode, SlotMap};
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
/// reach the server. Both take one round trip per batch (one per master on a Redis Cluster, all
/// sent at once) and behave exactly like the single forms applied in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum Batching {
    /// One script call for the whole batch (up to 256 keys per call), the default. A script
    /// call has a fixed cost on the server larger than a `SET` (measured with callgrind on
    /// Redis 7.0: a claim of a new key costs about 48,000 instructions as its own call and
    /// about 17,000 inside a batch call; see `BENCHMARKS.md`), and a batch pays it once. On a
    /// standalone server the batch is atomic. On a Redis Cluster a script may only touch one
    /// hash slot, so a batch goes as one pipeline per master (all masters at once) of one
    /// script call per slot; each key is its own slot (`{namespace:id}`), so in practice that
    /// is one call per key, as with [`Pipeline`](Self::Pipeline).
    #[default]
    Script,
    /// One single-key script call per item, pipelined: every call touches one hash slot, at
    /// about twice the server time per message on a standalone server.
    Pipeline,
}

/// `WAIT <replicas> <timeout>` after claims and completions: see
/// [`RedisStoreBuilder::wait_for_replicas`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WaitFor {
    replicas: u32,
    timeout: Duration,
}

impl WaitFor {
    fn cmd(self) -> Cmd {
        let mut cmd = redis::cmd("WAIT");
        // WAIT 0 would block for ever: at least a millisecond.
        cmd.arg(self.replicas).arg(ms(self.timeout).max(1));
        cmd
    }
}

/// One script call of a batch: the items it answers for (indexes into the batch), and the
/// command.
type Call<'a> = (&'a [usize], Cmd);

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
    wait: Option<WaitFor>,
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
            .field("wait", &self.wait)
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

    /// Durability against failover (off by default): after every claim and completion (single
    /// or batched), send `WAIT <replicas> <timeout>` on the same connection, so that the reply
    /// comes only once `replicas` replicas of the master hold the write. Replication is
    /// asynchronous: without it, a record acknowledged by a master that dies before its replica
    /// received it is lost when the replica takes over (a lost completion lets the duplicate
    /// run again). With it, a write that a replica acknowledged survives the failover that
    /// promotes that replica; `WAIT` does not make Redis strongly consistent (a master cut off
    /// from its replicas by a partition, or a promoted replica other than the one that
    /// acknowledged, can still lose it), and it does not roll back a write that no replica
    /// acknowledged in time.
    ///
    /// When fewer than `replicas` replicas acknowledge within `timeout`, the operation returns
    /// an [`Unavailable`](idem::StoreErrorKind::Unavailable) error saying so (transient: the
    /// executor fails closed and the broker redelivers; the write itself stays on the master),
    /// logs a warning and counts it in [`RedisStore::unacknowledged_writes`]. So a master
    /// without a live replica refuses to confirm claims: size `replicas` to what the
    /// deployment keeps running. `replicas` 0 turns the option off. The cost is a round trip to
    /// the replica on every claim and completion round trip (measured in
    /// `docs/redis-cluster.md`). `timeout` must be shorter than the
    /// [operation deadline](Self::timeout); zero counts as 1 ms (`WAIT` with 0 would block for
    /// ever). Works on a standalone primary with replicas too.
    #[must_use]
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = (replicas > 0).then_some(WaitFor { replicas, timeout });
        self
    }

    /// Connects, checks the server's eviction policy and persistence settings (a warning is
    /// logged if the policy can evict records), and returns the store.
    ///
    /// The URL is `redis://[user[:password]@]host[:port][/db]` (`rediss://` for TLS). When the
    /// server is a Redis Cluster node (`redis_mode:cluster`), the store becomes a cluster
    /// client: it learns the other nodes from it and routes every key to its slot's master.
    /// A cluster URL may list several seed nodes, comma-separated, sharing the credentials:
    /// `redis://:password@10.0.0.1:7000,10.0.0.2:7000`; the first that answers is asked, and the
    /// cluster client starts from all of them. A list of several servers that are not cluster
    /// nodes is refused. On a cluster, the settings checked (eviction, persistence, version)
    /// are those of the first seed that answered.
    ///
    /// # Errors
    /// [`Config`](idem::StoreErrorKind::Config) for an invalid URL or prefix, a `rediss://` URL
    /// without the `tls` feature, refused credentials, several servers that are not a cluster,
    /// or a [`wait_for_replicas`](Self::wait_for_replicas) timeout not shorter than the
    /// operation deadline; [`Unavailable`](idem::StoreErrorKind::Unavailable) or
    /// [`Timeout`](idem::StoreErrorKind::Timeout) when no server can be reached, or the cluster
    /// is not ready (`cluster_state` other than `ok`: slots unassigned, a master down).
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
        #[cfg(feature = "tls")]
        if self.url.starts_with("rediss://") {
            // redis builds its rustls configuration with the process's default provider, which
            // rustls cannot pick when another crate of the program enables a second one
            // (aws-lc-rs, through reqwest): it panics. Install ring unless the program already
            // chose a provider itself.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        if let Some(wait) = self.wait {
            if wait.timeout >= self.timeout {
                return Err(StoreError::new(
                    StoreErrorKind::Config,
                    format!(
                        "the replica wait ({:?}) must be shorter than the operation deadline \
                         ({:?})",
                        wait.timeout, self.timeout
                    ),
                ));
            }
        }
        let seeds = seed_urls(&self.url);
        let mut clients = Vec::with_capacity(seeds.len());
        for seed in &seeds {
            clients.push(self.client(seed).map_err(|e| {
                StoreError::new(
                    StoreErrorKind::Config,
                    format!(
                        "invalid Redis URL {}: {}",
                        redact(seed),
                        e.detail().unwrap_or("")
                    ),
                )
                .with_source(e)
            })?);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.timeout))
            // Reconnection attempts while a command waits: few and short, so that a command's
            // own deadline (not the retry schedule) decides when the caller hears of an outage.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        // The first seed that answers.
        let mut conn = None;
        let mut failure = None;
        for (seed, client) in seeds.iter().zip(clients) {
            let op = format!("connect to {}", redact(seed));
            let deadline = self.connect_timeout * 3 + self.timeout;
            let connecting = ConnectionManager::new_with_config(client, config.clone());
            match within(&op, deadline, connecting).await {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(e) if e.kind() == StoreErrorKind::Timeout => {
                    // Nothing was written: say what usually hangs a connection instead.
                    failure = Some(StoreError::new(
                        StoreErrorKind::Timeout,
                        format!(
                            "{op}: no answer within {deadline:?} (a server that hangs, or a \
                             rediss:// URL for a server without TLS)"
                        ),
                    ));
                }
                Err(e) if e.is_transient() => failure = Some(e),
                Err(e) => return Err(e),
            }
        }
        let op = format!("connect to {shown}");
        let Some(mut conn) = conn else {
            return Err(failure.unwrap_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Config,
                    format!("{op}: no server in the URL"),
                )
            }));
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
        let conn = if settings.mode.as_deref() == Some("cluster") {
            let state = within(&op, self.timeout, cluster_state(&mut conn)).await?;
            if state != "ok" {
                return Err(StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!(
                        "{shown} is a Redis Cluster node, and the cluster is not ready \
                         (cluster_state:{state}: slots not all assigned, or a master down)"
                    ),
                ));
            }
            drop(conn);
            RedisConnection::Cluster(self.cluster(&op, &seeds).await?)
        } else if seeds.len() > 1 {
            return Err(StoreError::new(
                StoreErrorKind::Config,
                format!(
                    "{shown} lists several servers, which only a Redis Cluster takes, and the \
                     one that answered is a {} server",
                    settings.mode.as_deref().unwrap_or("standalone")
                ),
            ));
        } else {
            RedisConnection::Standalone(conn)
        };
        log_settings(&shown, &settings);
        let cluster = conn.is_cluster();
        let repair = cluster.then(|| Repair {
            builder: self.clone(),
            seeds,
            running: std::sync::atomic::AtomicBool::new(false),
            last: std::sync::Mutex::new(None),
        });
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn: std::sync::RwLock::new(conn),
                cluster,
                repair,
                prefix: self.prefix,
                max_result_bytes: self.max_result_bytes,
                timeout: self.timeout,
                grace_ms: ms(self.expiry_grace),
                batching: self.batching,
                wait: self.wait,
                unacknowledged: AtomicU64::new(0),
                slot_map: std::sync::RwLock::new(None),
                refreshing: std::sync::atomic::AtomicBool::new(false),
                settings,
                shown_url: shown,
            }),
        };
        if store.is_cluster() {
            store.refresh_slots(&op).await?;
        }
        Ok(store)
    }
}

impl RedisStoreBuilder {
    fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        #[cfg(feature = "tls")]
        if let Some(root) = &self.tls_root {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root.clone()),
            };
            return redis::Client::build_with_tls(url, certs);
        }
        redis::Client::open(url)
    }

    /// The cluster client, started from every seed.
    async fn cluster(
        &self,
        op: &str,
        seeds: &[String],
    ) -> Result<redis::cluster_async::ClusterConnection, StoreError> {
        let builder = redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.timeout);
        #[cfg(feature = "tls")]
        let builder = match &self.tls_root {
            Some(root) => builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root.clone()),
            }),
            None => builder,
        };
        let client = builder.build().map_err(|e| {
            StoreError::new(
                StoreErrorKind::Config,
                format!("{op}: invalid cluster settings: {e}"),
            )
            .with_source(e)
        })?;
        let deadline = self.connect_timeout * 3 + self.timeout;
        within(op, deadline, client.get_async_connection()).await
    }
}

/// The seed URLs of `url`: one per host of a comma-separated host list
/// (`redis://[user:pass@]h1:p1,h2:p2[/db]`), each with the same scheme, credentials and path.
fn seed_urls(url: &str) -> Vec<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return vec![url.to_owned()];
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{userinfo}{h}{tail}"))
        .collect()
}

/// `cluster_state` of `CLUSTER INFO`: `ok`, or `fail` while slots are unassigned or a master
/// is down.
async fn cluster_state(conn: &mut ConnectionManager) -> Result<String, RedisError> {
    let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("cluster_state:"))
        .unwrap_or("unknown")
        .trim()
        .to_owned())
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

/// Whether an error says a key's slot is served by another node than the one asked.
fn slots_moved(kind: redis::ErrorKind) -> bool {
    use redis::ServerErrorKind as K;
    matches!(
        kind,
        redis::ErrorKind::Server(K::Moved | K::Ask | K::CrossSlot)
    )
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

/// How a cluster store connects again (see [`RedisStore::repair`]).
struct Repair {
    builder: RedisStoreBuilder,
    seeds: Vec<String>,
    running: std::sync::atomic::AtomicBool,
    /// When the last repair ended: one per operation deadline at most, so that a burst of
    /// timeouts (a slow server, `WAIT`s queued on one connection) reconnects once.
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

/// The Redis [`Store`]. Clones share one multiplexed connection (one per node on a cluster).
///
/// See the [crate docs](crate) for the layout in Redis, durability and failures.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced on a cluster when it stops answering (see [`RedisStore::repair`]).
    conn: std::sync::RwLock<RedisConnection>,
    cluster: bool,
    /// On a cluster: how to connect again, and whether a repair is under way.
    repair: Option<Repair>,
    prefix: String,
    max_result_bytes: usize,
    timeout: Duration,
    grace_ms: i64,
    batching: Batching,
    wait: Option<WaitFor>,
    unacknowledged: AtomicU64,
    /// On a cluster, which master serves each slot (to group a batch's keys by master).
    slot_map: std::sync::RwLock<Option<Arc<SlotMap>>>,
    /// A background read of the slot map is under way.
    refreshing: std::sync::atomic::AtomicBool,
    settings: ServerSettings,
    shown_url: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.shown_url)
            .field("prefix", &self.inner.prefix)
            .field("cluster", &self.inner.cluster)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects with the default settings; see [`RedisStoreBuilder::connect`].
    ///
    /// `url` is `redis://[user[:password]@]host[:port][/db]`, or a Redis Cluster node (or a
    /// comma-separated list of them): see [`RedisStoreBuilder::connect`].
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
            wait: None,
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

    /// Reads the server settings again (they may have changed since the store connected). On a
    /// cluster, those of the master of slot 0.
    ///
    /// # Errors
    /// A transient [`StoreError`] when the server cannot be reached.
    pub async fn read_server_settings(&self) -> Result<ServerSettings, StoreError> {
        let mut conn = OnNode {
            conn: self.conn(),
            node: self.inner.cluster.then(|| Route::new(0, SlotAddr::Master)),
        };
        within(
            "read settings",
            self.inner.timeout,
            ServerSettings::read(&mut conn),
        )
        .await
    }

    /// The store's connection, shared with it: for the caller's own commands on the same
    /// multiplexed connection (the benchmark's baseline uses it). On a cluster, see
    /// [`RedisConnection`] for what a command may span.
    pub fn connection(&self) -> RedisConnection {
        self.conn()
    }

    /// Whether the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    fn conn(&self) -> RedisConnection {
        self.inner
            .conn
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After an operation on a cluster timed out: connects to the cluster again from the seeds,
    /// in the background (one repair at a time), and replaces the connection. The cluster
    /// client repairs its own connections after MOVED replies and dropped links, but it was
    /// seen never to come back from a failover in which the old master dropped clients blocked
    /// in `WAIT` (every later command timed out); a fresh client reads the topology anew.
    /// Operations in flight finish, or time out, on the old connection.
    fn repair(&self) {
        let Some(repair) = &self.inner.repair else {
            return;
        };
        if repair.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let recent = repair
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < self.inner.timeout);
        if recent {
            repair.running.store(false, Ordering::Release);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            repair.running.store(false, Ordering::Release);
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            let Some(repair) = &store.inner.repair else {
                return;
            };
            let op = format!("reconnect to {}", store.inner.shown_url);
            match repair.builder.cluster(&op, &repair.seeds).await {
                Ok(conn) => {
                    *store
                        .inner
                        .conn
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        RedisConnection::Cluster(conn);
                    tracing::warn!(
                        redis = %store.inner.shown_url,
                        "an operation timed out: connected to the cluster again"
                    );
                }
                Err(e) => tracing::warn!(
                    redis = %store.inner.shown_url,
                    error = %e,
                    "an operation timed out, and connecting to the cluster again failed"
                ),
            }
            *repair
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now());
            repair.running.store(false, Ordering::Release);
        });
    }

    /// How many claim or completion round trips fewer replicas acknowledged than
    /// [`wait_for_replicas`](RedisStoreBuilder::wait_for_replicas) asks for, since the store
    /// connected (shared by its clones). Each one returned an error; its writes stayed on the
    /// master, unreplicated when it answered.
    pub fn unacknowledged_writes(&self) -> u64 {
        self.inner.unacknowledged.load(Ordering::Relaxed)
    }

    /// Every key matching the `SCAN MATCH` glob `pattern`, each once, on a standalone server or
    /// on every master of a cluster (a `SCAN` through [`connection`](Self::connection) reaches
    /// one node only). Costs a pass over every key of every master, and memory for the keys.
    ///
    /// # Errors
    /// A transient [`StoreError`] when a server cannot be reached.
    pub async fn scan_keys(&self, pattern: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = Vec::new();
        for (_, node_keys) in self.scan_all("scan", pattern).await? {
            keys.extend(node_keys);
        }
        Ok(keys)
    }

    async fn run<T>(
        &self,
        op: &str,
        f: impl AsyncFnOnce(&mut RedisConnection) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let result = within(op, self.inner.timeout, f(&mut conn)).await;
        if matches!(&result, Err(e) if e.kind() == StoreErrorKind::Timeout) {
            self.repair();
        }
        result
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
    /// first item> <each item's args…>`. On a cluster the items are first split by master (as
    /// the slot map last read says; in order within a master), and a call holds keys of one
    /// slot only: each master's calls go as one pipeline, all masters at once. Calls of
    /// different slots touch different keys, so their order does not matter. With
    /// [`RedisStoreBuilder::wait_for_replicas`], every pipeline ends with a `WAIT`.
    async fn batch<T, G: PartialEq>(
        &self,
        op: &str,
        script: &redis::Script,
        items: &[T],
        call: BatchCall<'_, T, G>,
    ) -> Result<Vec<Value>, StoreError> {
        let map = self.slot_map();
        if let ([item], None, None) = (items, &map, self.inner.wait) {
            return self.single(op, script, item, &call).await.map(|v| vec![v]);
        }
        let per_call = match self.inner.batching {
            Batching::Script => MAX_KEYS_PER_SCRIPT,
            Batching::Pipeline => 1,
        };
        let keys: Vec<String> = items.iter().map(|i| self.key((call.key)(i))).collect();
        // On a cluster: each key's slot, and the items of each pipeline, one per master (in
        // order within it), with a route to that master (through the slot of its first item,
        // so that it follows a failover). One pipeline for all otherwise.
        let slots: Vec<u16> = match map {
            Some(_) => keys.iter().map(|k| conn::slot(k.as_bytes())).collect(),
            None => vec![0; keys.len()],
        };
        let groups: Vec<(Option<Route>, Vec<usize>)> = match &map {
            Some(map) => {
                let mut at = std::collections::HashMap::new();
                let mut groups: Vec<(Option<Route>, Vec<usize>)> = Vec::new();
                for (i, &slot) in slots.iter().enumerate() {
                    // A slot no master serves (as last read) is a group of its own.
                    let node = map
                        .master_of(slot)
                        .map_or(u32::from(slot) + 65_536, u32::from);
                    let g = *at.entry(node).or_insert_with(|| {
                        groups.push((Some(Route::new(slot, SlotAddr::Master)), Vec::new()));
                        groups.len() - 1
                    });
                    groups[g].1.push(i);
                }
                groups
            }
            None => vec![(None, (0..items.len()).collect())],
        };
        // The calls of each pipeline: the items each answers for (consecutive items of one
        // slot, equal groups), and the command.
        let pipelines: Vec<(Option<Route>, Vec<Call<'_>>)> = groups
            .iter()
            .map(|(node, group)| {
                let mut calls = Vec::new();
                let mut start = 0;
                for i in 1..=group.len() {
                    let (first, this) = (group[start], group.get(i).copied());
                    let split = this.is_none_or(|this| {
                        i - start == per_call
                            || slots[this] != slots[first]
                            || (call.group)(&items[this]) != (call.group)(&items[first])
                    });
                    if split {
                        let chunk = &group[start..i];
                        let mut cmd = redis::cmd("EVALSHA");
                        cmd.arg(script.get_hash()).arg(chunk.len());
                        for &j in chunk {
                            cmd.arg(&keys[j]);
                        }
                        (call.shared_args)(&items[first], &mut cmd);
                        for &j in chunk {
                            (call.item_args)(&items[j], &mut cmd);
                        }
                        calls.push((chunk, cmd));
                        start = i;
                    }
                }
                (*node, calls)
            })
            .collect();
        let wait = self.inner.wait.map(WaitFor::cmd);
        let sends = pipelines.iter().map(|(node, calls)| {
            let mut conn = self.on(*node);
            let wait = wait.as_ref();
            async move {
                match calls.as_slice() {
                    [(_, cmd)] if wait.is_none() => {
                        Ok((vec![eval(&mut conn, script, cmd).await?], None))
                    }
                    _ => {
                        let mut pipe = redis::pipe();
                        for (_, cmd) in calls {
                            pipe.add_command(cmd.clone());
                        }
                        eval_pipeline(&mut conn, script, &pipe, wait).await
                    }
                }
            }
        });
        let joined = async {
            futures_util::future::join_all(sends)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, RedisError>>()
        };
        let replies = match tokio::time::timeout(self.inner.timeout, joined).await {
            Ok(replies) => replies,
            Err(_) => {
                self.repair();
                Err(RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            }
        };
        let moved = match &replies {
            Err(e) => slots_moved(e.kind()),
            Ok(replies) => replies.iter().any(|(values, _)| {
                values.iter().any(|v| match v {
                    Value::ServerError(e) => slots_moved(RedisError::from(e.clone()).kind()),
                    _ => false,
                })
            }),
        };
        if map.is_some() && moved {
            // The keys were grouped by a stale map (slots moved by resharding): read it again
            // for the next batch (the node that answered is up). Best effort: this batch fails.
            let _ = self.refresh_slots(op).await;
        } else if map.is_some() && replies.is_err() {
            // Perhaps a failover, perhaps a stale map: read it again in the background, once
            // at a time, without delaying this error.
            if !self.inner.refreshing.swap(true, Ordering::AcqRel) {
                let store = self.clone();
                tokio::spawn(async move {
                    let _ = store.refresh_slots("refresh the slot map").await;
                    store.inner.refreshing.store(false, Ordering::Release);
                });
            }
        }
        if moved {
            // Some pipelines went to a node that no longer serves all of their keys. The batch
            // fails (transient); some of its writes may have been applied.
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                format!(
                    "{op}: hash slots moved between cluster nodes during the batch; some of its \
                     writes may have been applied"
                ),
            ));
        }
        let replies = match replies {
            Err(e) if e.is_timeout() => return Err(elapsed(op, self.inner.timeout)),
            other => other.map_err(|e| from_redis(op, e))?,
        };
        let mut out: Vec<Option<Value>> = vec![None; items.len()];
        for ((_, calls), (values, waited)) in pipelines.iter().zip(replies) {
            if let (Some(w), Some(waited)) = (self.inner.wait, waited) {
                self.check_wait(op, w, waited)?;
            }
            for ((chunk, _), value) in calls.iter().zip(values) {
                // A call for one key answers for it; a call for several answers with an array.
                match value {
                    _ if chunk.len() == 1 => out[chunk[0]] = Some(value),
                    Value::Array(replies) if replies.len() == chunk.len() => {
                        for (&j, v) in chunk.iter().zip(replies) {
                            out[j] = Some(v);
                        }
                    }
                    Value::ServerError(e) => return Err(error::from_server(op, e)),
                    other => {
                        return Err(error::unexpected(
                            op,
                            format!("{other:?} for {} keys", chunk.len()),
                        ));
                    }
                }
            }
        }
        out.into_iter()
            .map(|v| v.ok_or_else(|| error::unexpected(op, "a reply is missing")))
            .collect()
    }

    /// [`batch`](Self::batch) of one item on a single server without `WAIT` (a consumer that
    /// takes one message at a time): the same script call and the same errors, without the
    /// grouping by node, slot and parameters, whose vectors and joined futures cost a third of
    /// the client's instructions for such a call.
    async fn single<T, G>(
        &self,
        op: &str,
        script: &redis::Script,
        item: &T,
        call: &BatchCall<'_, T, G>,
    ) -> Result<Value, StoreError> {
        let key = self.key((call.key)(item));
        // EVALSHA, the script's hash, the key count, the key, and up to four arguments.
        let mut cmd = Cmd::with_capacity(8, 160 + key.len());
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(1).arg(&key);
        (call.shared_args)(item, &mut cmd);
        (call.item_args)(item, &mut cmd);
        let mut conn = self.on(None);
        let value =
            match tokio::time::timeout(self.inner.timeout, eval(&mut conn, script, &cmd)).await {
                Ok(Ok(value)) => value,
                Ok(Err(e)) if e.is_timeout() => return Err(elapsed(op, self.inner.timeout)),
                Ok(Err(e)) => return Err(from_redis(op, e)),
                Err(_) => return Err(elapsed(op, self.inner.timeout)),
            };
        if let Value::ServerError(e) = &value
            && slots_moved(RedisError::from(e.clone()).kind())
        {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                format!(
                    "{op}: hash slots moved between cluster nodes during the batch; some of its \
                     writes may have been applied"
                ),
            ));
        }
        Ok(value)
    }

    /// The reply of a `WAIT`: an error (counted) when fewer replicas acknowledged than asked.
    fn check_wait(&self, op: &str, w: WaitFor, waited: Value) -> Result<(), StoreError> {
        let acknowledged = match waited {
            Value::Int(n) => n,
            Value::ServerError(e) => return Err(error::from_server(op, e)),
            other => return Err(error::unexpected(op, format!("WAIT answered {other:?}"))),
        };
        if acknowledged >= i64::from(w.replicas) {
            return Ok(());
        }
        let count = self.inner.unacknowledged.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            redis = %self.inner.shown_url,
            acknowledged,
            wanted = w.replicas,
            unacknowledged_writes = count,
            "{op}: a master applied the write, but too few replicas acknowledged it in time; a \
             failover now could lose it"
        );
        Err(StoreError::new(
            StoreErrorKind::Unavailable,
            format!(
                "{op}: applied on the master, but {acknowledged} of {} replica(s) acknowledged it \
                 within {:?}; a failover now could lose it",
                w.replicas, w.timeout
            ),
        ))
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

    /// Reads which master serves each slot again (`CLUSTER SLOTS`), and keeps it.
    async fn refresh_slots(&self, op: &str) -> Result<Arc<SlotMap>, StoreError> {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let value = self
            .run(op, async |c| c.req_packed_command(&cmd).await)
            .await?;
        let map = match value {
            Value::ServerError(e) => return Err(error::from_server(op, e)),
            v => SlotMap::parse(v)
                .ok_or_else(|| error::unexpected(op, "CLUSTER SLOTS of another shape"))?,
        };
        let map = Arc::new(map);
        *self
            .inner
            .slot_map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&map));
        Ok(map)
    }

    /// The slot map as last read, on a cluster.
    fn slot_map(&self) -> Option<Arc<SlotMap>> {
        self.inner
            .slot_map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The nodes the scans walk: the server itself, or on a cluster one route per master (to
    /// the master of one of its slots), from `CLUSTER SLOTS` read again.
    async fn nodes(&self, op: &str) -> Result<Vec<Option<Route>>, StoreError> {
        if !self.inner.cluster {
            return Ok(vec![None]);
        }
        let map = self.refresh_slots(op).await?;
        Ok(map
            .masters
            .iter()
            .map(|&slot| Some(Route::new(slot, SlotAddr::Master)))
            .collect())
    }

    /// A connection whose commands go to `node` (see [`nodes`](Self::nodes)).
    fn on(&self, node: Option<Route>) -> OnNode {
        OnNode {
            conn: self.conn(),
            node,
        }
    }

    /// One page of `SCAN` of `node` for keys matching `pattern`.
    async fn scan_page(
        &self,
        op: &str,
        node: Option<Route>,
        pattern: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let mut conn = self.on(node);
        within(op, self.inner.timeout, cmd.query_async(&mut conn)).await
    }

    /// Every key matching `pattern`, each once (`SCAN` may return a key twice), by node: one
    /// pass over the whole database of every node (not only the prefix), and memory for the
    /// keys. On a cluster, a failover or a slot migration during the pass can hide or repeat
    /// keys, as `SCAN` does on one server when its keys move.
    async fn scan_all(
        &self,
        op: &str,
        pattern: &str,
    ) -> Result<Vec<(Option<Route>, Vec<Vec<u8>>)>, StoreError> {
        let mut out = Vec::new();
        for node in self.nodes(op).await? {
            let mut seen = std::collections::HashSet::new();
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_page(op, node, pattern, cursor).await?;
                seen.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            out.push((node, seen.into_iter().collect()));
        }
        Ok(out)
    }

    /// Every record key under the prefix, by node.
    async fn scan_records(
        &self,
        op: &str,
    ) -> Result<Vec<(Option<Route>, Vec<Vec<u8>>)>, StoreError> {
        self.scan_all(op, &codec::scan_pattern(&self.inner.prefix))
            .await
    }

    /// `pipe` (of `n` commands) on `node`, in one round trip.
    async fn pipeline_on(
        &self,
        op: &str,
        node: Option<Route>,
        pipe: &redis::Pipeline,
        n: usize,
    ) -> Result<Vec<Value>, StoreError> {
        let mut conn = self.on(node);
        within(op, self.inner.timeout, conn.req_packed_commands(pipe, 0, n)).await
    }

    /// The head of each record of `node` (its fixed-size fields, not the owner or result), in
    /// one round trip: empty for keys that vanished since the scan.
    async fn heads(
        &self,
        op: &str,
        node: Option<Route>,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Value>, StoreError> {
        // A SCAN page can be empty while the cursor goes on; Redis refuses an empty pipeline.
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GETRANGE").arg(k).arg(0).arg(HEAD_BYTES - 1);
        }
        self.pipeline_on(op, node, &pipe, keys.len()).await
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
            .run("get", async |c| c.req_packed_command(&cmd).await)
            .await?;
        codec::record_reply(key, value)
    }

    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(key));
        let value = self
            .run("evict", async |c| c.req_packed_command(&cmd).await)
            .await?;
        Ok(codec::count_reply("evict", value)? > 0)
    }

    /// Redis deletes every record by itself, [expiry grace](RedisStoreBuilder::expiry_grace)
    /// after it stopped counting, so this is never needed. It deletes records in their grace
    /// early (at most `limit`), which costs a `SCAN` over the whole database (of every master
    /// on a cluster) from the start on every call, plus one `GETRANGE` per key under the
    /// prefix.
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        const OP: &str = "purge_expired";
        if limit == 0 {
            return Ok(0);
        }
        let now = self.now().await?;
        let pattern = codec::scan_pattern(&self.inner.prefix);
        let mut deleted = 0;
        for node in self.nodes(OP).await? {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_page(OP, node, &pattern, cursor).await?;
                let heads = self.heads(OP, node, &keys).await?;
                let mut candidates = Vec::new();
                for (k, head) in keys.into_iter().zip(heads) {
                    let Some(head) = self.head(OP, &k, head)? else {
                        continue;
                    };
                    // Records whose expiry passed by the time the purge started; the script
                    // checks again on the server's clock, atomically.
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
                    let mut conn = self.on(node);
                    let (values, _) = within(
                        OP,
                        self.inner.timeout,
                        eval_pipeline(&mut conn, &SCRIPTS.purge, &pipe, None),
                    )
                    .await?;
                    for v in values {
                        deleted += usize::from(codec::count_reply(OP, v)? == 1);
                    }
                }
                if deleted >= limit {
                    return Ok(deleted);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted)
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
            .run("time", async |c| c.req_packed_command(&cmd).await)
            .await?;
        codec::time_reply(value)
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        const OP: &str = "count_by_state";
        let mut counts: Vec<(State, u64)> = Vec::new();
        for (node, keys) in self.scan_records(OP).await? {
            for chunk in keys.chunks(SCAN_COUNT) {
                for (k, head) in chunk.iter().zip(self.heads(OP, node, chunk).await?) {
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
        }
        counts.sort_by_key(|(s, _)| s.code());
        Ok(counts)
    }

    async fn in_progress(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        const OP: &str = "in_progress";
        let mut out = Vec::new();
        for (node, keys) in self.scan_records(OP).await? {
            let mut held = Vec::new();
            for chunk in keys.chunks(SCAN_COUNT) {
                for (k, head) in chunk.iter().zip(self.heads(OP, node, chunk).await?) {
                    let head = self.head(OP, k, head)?;
                    if head.and_then(|h| codec::head_state(&h)) == Some(State::InProgress) {
                        held.push(k.clone());
                    }
                }
            }
            for chunk in held.chunks(SCAN_COUNT) {
                let mut pipe = redis::pipe();
                for k in chunk {
                    pipe.cmd("GET").arg(k);
                }
                let values = self.pipeline_on(OP, node, &pipe, chunk.len()).await?;
                for (raw, v) in chunk.iter().zip(values) {
                    let key = self.parse_key(raw)?;
                    // Gone or no longer in progress since the scan: skip it.
                    let rec = codec::record_reply(&key, v)?;
                    out.extend(rec.filter(|r| r.state == State::InProgress));
                }
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
