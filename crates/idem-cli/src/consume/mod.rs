//! `idem consume`: a sidecar that gives consumers written in any language exactly-once effects.
//!
//! It consumes a queue, subject, topic or stream through the idem consumer runtime
//! ([`idem_broker::Consumer`]) and, once per key, either runs a command ([`exec`]) with the
//! payload on stdin or POSTs the payload to an HTTP endpoint ([`http`]), passing the key as
//! `IDEMPOTENCY_KEY` / `Idempotency-Key`. Exit 0 / a 2xx answer is a success: its stdout / body is
//! stored as the result and the message is acked once that record is durable. Anything else is a
//! failed attempt: the claim is released, the message redelivered with backoff, and after
//! `--max-attempts` dead-lettered with the reason. The runtime rules are the library's (docs/design.md
//! section 6): nothing is acked before its record is durable, in-progress duplicates are
//! nacked with a delay, poison messages are acked only once their dead-letter publish is
//! confirmed, SIGTERM / ctrl-c stops gracefully.
//!
//! Each command runs under a watchdog ([`guard`]) that kills its whole process group when the
//! sidecar dies, SIGKILL included. The sidecar claims no more keys than `--concurrency`
//! commands can run ([`batching`]), logs a `stats` line every `--stats-interval`, and retries
//! failed attempts after `--retry-delay`, doubling up to `--max-retry-delay`. Start-up
//! failures are one line naming the problem ([`errors`]).
//!
//! [`broker`] turns `--from` and the broker options into a connected source.

mod broker;
mod errors;
mod exec;
mod guard;
mod http;
mod redrive;

pub(crate) use self::errors::open_store;
pub(crate) use self::guard::{Args as GuardArgs, run as run_guard};
pub(crate) use self::redrive::{Args as RedriveArgs, run as run_redrive};

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use idem::{AnyStore, Attempt, Backoff, Config, Executor, Namespace};
use idem_broker::{
    Consumer, FingerprintFrom, Handler, KeyFrom, Message, Settings, Source, Stats, StatsSnapshot,
};
use idem_sqlite::Synchronous;
use tokio::sync::Semaphore;

use self::broker::BrokerOptions;
use crate::store_url::{OpenOptions, StoreUrl};

/// `idem consume` options. Broker-specific options are grouped under their broker in `--help`.
#[derive(clap::Args, Debug)]
#[command(
    group(clap::ArgGroup::new("action").required(true).args(["exec", "http"])),
    after_help = "Examples:\n  \
      idem consume --from amqp://guest:guest@127.0.0.1:5672/%2f --queue orders \\\n      \
      --namespace billing --exec 'python3 charge.py'\n  \
      idem consume --from nats://127.0.0.1:4222 --stream ORDERS --subject 'orders.>' \\\n      \
      --namespace billing --key json:/order_id --http http://127.0.0.1:8080/charge\n\n\
      Logs go to stderr; RUST_LOG sets the filter (default: \
      warn,idem=info,idem_broker=info,lapin=off)."
)]
pub(crate) struct Args {
    /// The broker to consume from: `amqp://USER:PASS@HOST:PORT/VHOST` (RabbitMQ, with
    /// --queue), `nats://HOST:PORT` (NATS JetStream, with --stream), `mqtt://HOST:PORT` (MQTT 5,
    /// with --topic) or `redis://HOST:PORT/DB` (Redis Streams, with --stream). Passwords in the
    /// URL are never printed.
    #[arg(long, env = "IDEM_FROM", hide_env_values = true, value_name = "URL", value_parser = crate::url_arg::UrlParser::<idem_broker::BrokerUrl>::new())]
    from: idem_broker::BrokerUrl,
    /// Where the records live: `sqlite:PATH` (embedded, the default), `redis://HOST/DB`,
    /// `postgres://USER@HOST/DB` (run `idem migrate` first), `mysql://USER@HOST/DB`, or `memory`
    /// (forgotten when the sidecar stops: duplicates after a restart run again). Every replica
    /// of one consumer must share the store.
    #[arg(
        long,
        env = "IDEM_STORE",
        hide_env_values = true,
        value_name = "URL",
        default_value = "sqlite:idem.db"
    )]
    store: StoreUrl,
    /// The consumer's name (A-Z a-z 0-9 - _ . /): the first part of every key, so two consumers
    /// of one message each process it once, and replicas of one consumer share their records.
    #[arg(
        long,
        env = "IDEM_NAMESPACE",
        hide_env_values = true,
        value_name = "NAME",
        value_parser = parse_namespace
    )]
    namespace: Namespace,
    /// Where each message's key comes from: `message-id` (the id the producer set at the
    /// origin: AMQP message_id, Nats-Msg-Id, the MQTT 5 / Redis Streams `message-id`
    /// property), `header:NAME` (a header, property or stream field), `json:/POINTER` (a string
    /// or number in a JSON payload, RFC 6901) or `hash` (a BLAKE3 hash of the payload, for
    /// producers that set no id). A message without a usable key is dead-lettered.
    #[arg(long, value_name = "SOURCE", default_value = "message-id")]
    key: KeyFrom,
    /// What tells a duplicate from a different message under the same key: `payload` (the
    /// whole payload) or `json:/POINTER` (one JSON value, for payloads with volatile fields such
    /// as a send timestamp). A different fingerprint under a known key is dead-lettered as a
    /// mismatch.
    #[arg(long, value_name = "WHAT", default_value = "payload", value_parser = parse_fingerprint)]
    fingerprint: FingerprintFrom,

    /// Run this command once per key. It is split into words like a shell would (quotes and
    /// backslashes work) but no shell runs it, unless --shell is given. It gets the payload on
    /// stdin and IDEMPOTENCY_KEY, IDEM_MESSAGE_ID, IDEM_ATTEMPT, IDEM_ACQUISITION,
    /// IDEM_DELIVERY_COUNT, IDEM_ORIGIN and IDEM_HEADER_<NAME> in its environment; its stderr
    /// goes to the sidecar's stderr. Exit status 0 is a success (its stdout is stored as the
    /// result); anything else is a failed attempt.
    #[arg(
        long,
        value_name = "COMMAND",
        help_heading = "Handler (--exec or --http)"
    )]
    exec: Option<String>,
    /// Run --exec with `sh -c COMMAND`, for pipes, redirections and `$VARIABLES`.
    #[arg(long, requires = "exec", help_heading = "Handler (--exec or --http)")]
    shell: bool,
    /// POST each message once per key to this URL (plain http://, meant for a local
    /// endpoint), with the headers Idempotency-Key, Content-Type, Idem-Message-Id, Idem-Attempt,
    /// Idem-Acquisition, Idem-Delivery-Count, Idem-Origin and Idem-Header-<NAME>. A 2xx answer is
    /// a success (its body is stored as the result); 5xx, 4xx, 3xx (redirects are not followed),
    /// a refused connection or a timeout is a failed attempt, retried with backoff and
    /// dead-lettered after --max-attempts.
    #[arg(long, value_name = "URL", help_heading = "Handler (--exec or --http)")]
    http: Option<String>,
    /// Content-Type of the POST when the message has none of its own (RabbitMQ's `content_type`
    /// property, or a `content-type` header).
    #[arg(
        long,
        value_name = "TYPE",
        default_value = "application/octet-stream",
        requires = "http",
        help_heading = "Handler (--exec or --http)"
    )]
    content_type: String,
    /// What is stored as each key's result: `output` (the command's stdout or the response
    /// body, at most the store's result limit, 64 KiB by default: a larger one fails the key
    /// rather than truncate it) or `none` (nothing; the command's stdout then goes to the
    /// sidecar's stdout).
    #[arg(long, value_enum, default_value_t = ResultMode::Output, help_heading = "Handler (--exec or --http)")]
    result: ResultMode,
    /// Longest a command or request may take; a command past it is killed (SIGKILL to its
    /// process group) and the attempt fails. Durations: `500ms`, `30s`, `5m`, `1h`.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        value_parser = parse_duration,
        help_heading = "Handler (--exec or --http)"
    )]
    timeout: Duration,

    /// Commands or requests running at once. Also the most keys the sidecar holds claims on:
    /// a claim is taken only when its command can start at once, so that if the sidecar dies,
    /// only the keys whose commands were running wait for their lease to end.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Most deliveries claimed in one store round trip (and acked together where the broker
    /// can). Capped so that the batches in flight never claim more keys than --concurrency
    /// commands can run: at most half of --concurrency (so that one batch can be claimed while
    /// another runs), and --concurrency / batch batches in flight.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Attempts before a failing message is dead-lettered; 0 means no limit.
    #[arg(long, value_name = "N", default_value_t = 5)]
    max_attempts: u32,
    /// How long after a failed attempt the message is tried again; the delay doubles with
    /// each attempt (with a jitter of 25%) up to --max-retry-delay. With the defaults, a message
    /// meets its 5th attempt about 15 s after its first: an endpoint that starts after the
    /// sidecar has time to come up.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    retry_delay: Duration,
    /// The longest delay between two attempts of a failing message.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    max_retry_delay: Duration,
    /// How long a claim is honoured: while a command runs the lease is extended every third of
    /// it; if the sidecar dies, redeliveries of its messages wait at most this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_lease)]
    lease: Duration,
    /// How long a processed key is remembered. Must exceed the broker's redelivery horizon
    /// (ack wait x redeliveries, replays): after it, a copy is processed again.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    retention: Duration,
    /// On SIGTERM or ctrl-c, how long in-flight commands and requests may take to finish; past
    /// it they are killed and their messages go back to the broker.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    /// SQLite store durability: `normal` (commits survive a crash of the sidecar) or `full`
    /// (fsynced: they survive power loss).
    #[arg(long, value_name = "LEVEL", default_value = "normal", value_parser = parse_synchronous)]
    sqlite_sync: Synchronous,
    /// How often a `stats` line (at info level) says what the sidecar did so far: received,
    /// executed, replayed, acked, retried, dead-lettered, store and settle errors, and the
    /// rates since the previous line. `0` turns it off.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_interval)]
    stats_interval: Duration,
    /// Serve Prometheus metrics on `ADDR` (`/metrics`), with `/healthz` (the process is up) and
    /// `/readyz` (consuming; 503 before it connects and once it stops), e.g. `127.0.0.1:9464`.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Log lines as `text` or `json` (one object per line). `RUST_LOG` chooses what is logged
    /// (default `warn,idem=info,idem_broker=info,lapin=off`).
    #[arg(long, value_enum, default_value_t = crate::observe::LogFormat::Text)]
    log_format: crate::observe::LogFormat,

    #[command(flatten)]
    broker: BrokerOptions,
}

/// What is stored as each key's result.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub(crate) enum ResultMode {
    /// The command's stdout or the response body.
    Output,
    /// Nothing.
    None,
}

fn parse_namespace(s: &str) -> Result<Namespace, idem::KeyError> {
    Namespace::new(s)
}

fn parse_fingerprint(s: &str) -> Result<FingerprintFrom, String> {
    match s.split_once(':') {
        None if s == "payload" => Ok(FingerprintFrom::Payload),
        Some(("json", ptr)) if ptr.is_empty() || ptr.starts_with('/') => {
            Ok(FingerprintFrom::Json(ptr.to_owned()))
        }
        _ => Err(format!(
            "unknown fingerprint {s:?}: expected payload or json:/POINTER"
        )),
    }
}

fn parse_synchronous(s: &str) -> Result<Synchronous, String> {
    s.parse()
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `7d`, combinations as `1m30s` (as idem writes them), or a
/// bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 1m30s, 2h or 7d");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total_ms: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (digits, after) = rest.split_at(split);
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let ms: u64 = match unit.trim() {
            "ms" => 1,
            "" if next.is_empty() && rest.len() == t.len() => 1_000,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        total_ms = n
            .checked_mul(ms)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(bad)?;
        rest = next;
    }
    if total_ms == 0 {
        // A zero lease makes every claim expired at once (two consumers both run the effect),
        // a zero retention forgets every key, a zero timeout fails every attempt.
        return Err(format!("invalid duration {s:?}: must be more than 0"));
    }
    Ok(Duration::from_millis(total_ms))
}

/// Parses `--stats-interval`: a duration, or `0` (zero: off).
fn parse_interval(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// Parses `--lease`: at least a second, so that the heartbeat (every third of it) and a store
/// round trip fit in it.
fn parse_lease(s: &str) -> Result<Duration, String> {
    let lease = parse_duration(s)?;
    if lease < Duration::from_secs(1) {
        return Err(format!(
            "lease {s:?} is too short: at least 1s, or claims expire while their command runs"
        ));
    }
    Ok(lease)
}

/// A failed attempt, as the runtime records it (and as the dead-letter reason says, once
/// attempts run out).
#[derive(Debug)]
pub(crate) struct Failure(String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What runs per key.
enum Action {
    Exec(exec::Exec),
    Http(http::Http),
}

/// The [`Handler`]: runs the action under a concurrency limit. Handlers of a batch run
/// concurrently in the runtime, and [`batching`] already keeps the claims in flight within
/// `--concurrency`; the limit is the backstop that keeps it from ever becoming a process per
/// delivery.
struct Sidecar {
    action: Action,
    slots: Semaphore,
    /// The store's result limit.
    limit: usize,
}

impl Handler for Sidecar {
    type Output = Bytes;
    type Error = Failure;

    async fn call(&self, message: Message, attempt: Attempt) -> Result<Bytes, Failure> {
        // The semaphore is never closed; an error here would be a bug, reported as a failure.
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Failure("the sidecar is shutting down".to_owned()))?;
        let result = match &self.action {
            Action::Exec(e) => e.run(&message, &attempt, self.limit).await,
            Action::Http(h) => h.post(&message, &attempt, self.limit).await,
        };
        if let Err(e) = &result {
            // The runtime decides what follows (retry later, or dead-letter once attempts run
            // out); this says which key failed and why, next to the command's own stderr.
            tracing::warn!(key = %attempt.key(), attempt = attempt.number(), "{e}");
        }
        result
    }
}

/// Everything but the source, ready to consume.
struct Prepared {
    exec: Executor<AnyStore>,
    namespace: Namespace,
    key: KeyFrom,
    fingerprint: FingerprintFrom,
    handler: Sidecar,
    settings: Settings,
    /// Between two stats lines; zero for none.
    stats_interval: Duration,
    /// What `/readyz` answers, with `--metrics-addr`.
    health: Option<Arc<crate::observe::Health>>,
}

/// Runs `idem consume` until SIGTERM or ctrl-c.
///
/// # Errors
/// One line naming the problem: the messages of idem's errors already hold their drivers'
/// texts, which their source chains would repeat.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    crate::observe::init_logging(args.log_format, LOG_FILTER);
    start(args)
        .await
        .map_err(|e| crate::exit::one_line_error(&e, errors::one_line(&e)))
}

async fn start(args: Args) -> anyhow::Result<ExitCode> {
    // Every check that needs no network comes first, so that a typo fails at once.
    let plan = broker::Plan::new(&args.from, &args.broker, &args.namespace)?;
    if args.max_retry_delay < args.retry_delay {
        bail!(
            "--max-retry-delay ({}) is shorter than --retry-delay ({})",
            crate::duration::exact(args.max_retry_delay),
            crate::duration::exact(args.retry_delay)
        );
    }
    let action = match (&args.exec, &args.http) {
        (Some(command), None) => Action::Exec(exec::Exec::new(
            command,
            args.shell,
            args.timeout,
            args.result,
        )?),
        (None, Some(url)) => Action::Http(http::Http::new(
            url,
            &args.content_type,
            args.timeout,
            args.result,
        )?),
        // clap's group makes this unreachable; kept total.
        _ => bail!("give exactly one of --exec COMMAND or --http URL"),
    };
    if args.store == StoreUrl::Memory {
        tracing::warn!(
            "the memory store forgets every record when the sidecar stops: copies delivered \
             after a restart run again; use sqlite:PATH or a networked store in production"
        );
    }
    // Before the executor and the consumer: their metric handles are registered when built.
    let endpoint = match args.metrics_addr {
        Some(addr) => Some(crate::observe::serve(addr).await?),
        None => None,
    };
    let opened = errors::open_store(
        &args.store,
        OpenOptions {
            synchronous: args.sqlite_sync,
            ..OpenOptions::default()
        },
    )
    .await?;
    let store = with_store!(opened, s => AnyStore::new(s));
    let config = Config::default()
        .lease(args.lease)
        .retention(args.retention)
        .max_attempts(args.max_attempts)
        .retry_backoff(Backoff::new(args.retry_delay, args.max_retry_delay))
        .name(args.namespace.as_str());
    let mut settings = Settings::default();
    let (batch_size, batches) = batching(args.batch, args.concurrency);
    if batch_size < args.batch as usize {
        tracing::debug!(
            batch = batch_size,
            batches,
            "--batch capped so that no more keys are claimed than --concurrency commands can run"
        );
    }
    settings.batch_size = batch_size;
    settings.concurrency = batches;
    settings.shutdown_grace = args.grace;
    let limit = idem::Store::max_result_bytes(&store);
    let prepared = Prepared {
        exec: Executor::with_config(store, config),
        namespace: args.namespace.clone(),
        key: args.key.clone(),
        fingerprint: args.fingerprint.clone(),
        handler: Sidecar {
            action,
            slots: Semaphore::new(args.concurrency as usize),
            limit,
        },
        settings,
        stats_interval: args.stats_interval,
        health: endpoint.as_ref().map(|e| Arc::clone(&e.health)),
    };
    let started = Started {
        from: args.from.to_string(),
        store: args.store.to_string(),
    };
    let stats = plan.consume(prepared, started).await?;
    eprintln!(
        "idem consume: stopped: received={} executed={} replayed={} acked={} retried={} \
         dead_lettered={} store_errors={} settle_errors={}",
        stats.received,
        stats.executed,
        stats.replayed,
        stats.acked,
        stats.retried,
        stats.dead_lettered,
        stats.store_errors,
        stats.settle_errors,
    );
    Ok(ExitCode::SUCCESS)
}

/// The runtime's batch size and batches in flight for `--batch` and `--concurrency`, such that
/// the batches in flight never hold more claims than `--concurrency` commands can run at once:
/// the runtime claims a whole batch before its handlers start, and a claim whose command waits
/// for a free slot would, if the sidecar died, keep its key from every consumer for a whole
/// lease although its command never ran. A batch is at most half the concurrency, so that one
/// batch can be claimed and settled while another runs.
fn batching(batch: u32, concurrency: u32) -> (usize, usize) {
    let concurrency = concurrency.max(1) as usize;
    let size = (batch.max(1) as usize).min((concurrency / 2).max(1));
    (size, concurrency / size)
}

/// What the "consuming" line names (already redacted).
struct Started {
    from: String,
    store: String,
}

impl Prepared {
    /// Runs the consumer on a connected source until SIGTERM or ctrl-c.
    async fn run<Src: Source>(
        self,
        source: Src,
        what: &str,
        started: &Started,
    ) -> anyhow::Result<StatsSnapshot> {
        let namespace = self.namespace.to_string();
        let consumer = Consumer::new(source, self.exec, self.namespace, self.handler)
            .key(self.key)
            .fingerprint(self.fingerprint)
            .settings(self.settings);
        // The line scripts and tests wait for: the broker topology exists and deliveries flow.
        eprintln!(
            "idem consume: consuming {what} from {} as namespace {namespace:?} (store {}); \
             SIGTERM or ctrl-c stops",
            started.from, started.store,
        );
        let reporter = (!self.stats_interval.is_zero())
            .then(|| tokio::spawn(report_stats(consumer.stats(), self.stats_interval)));
        let health = self.health;
        if let Some(h) = &health {
            h.set_ready(true);
        }
        let stopping = async {
            idem_broker::shutdown_signal().await;
            // Draining: no new work for this instance.
            if let Some(h) = &health {
                h.set_ready(false);
            }
        };
        // The error's message already holds its driver's text; its source chain would repeat it.
        let result = consumer
            .run(stopping)
            .await
            .map_err(|e| anyhow::anyhow!("the consumer stopped on an error: {}", e.message()));
        if let Some(reporter) = reporter {
            reporter.abort();
        }
        result
    }
}

/// Logs a `stats` line (info) every `every`: the counters so far, and the rates since the
/// previous line.
async fn report_stats(stats: Arc<Stats>, every: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = stats.snapshot();
    let mut last_at = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let now = stats.snapshot();
        let now_at = tokio::time::Instant::now();
        let secs = now_at.duration_since(last_at).as_secs_f64().max(1e-3);
        #[allow(clippy::cast_precision_loss)] // counters far below 2^52
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        tracing::info!(
            "stats: received={} executed={} replayed={} acked={} retried={} dead_lettered={} \
             store_errors={} settle_errors={} received_per_s={:.1} executed_per_s={:.1}",
            now.received,
            now.executed,
            now.replayed,
            now.acked,
            now.retried,
            now.dead_lettered,
            now.store_errors,
            now.settle_errors,
            rate(now.received, last.received),
            rate(now.executed, last.executed),
        );
        last = now;
        last_at = now_at;
    }
}

/// What is logged unless `RUST_LOG` says otherwise: idem's own events at info, the rest at
/// warn, the RabbitMQ driver (lapin) not at all. lapin logs every error it also returns (three
/// ERROR lines for a wrong password before idem's own message), every connection loss the
/// adapter reports and retries itself, and every returned (unroutable) message whole, payload
/// included; `RUST_LOG=warn,lapin=warn` brings it back.
const LOG_FILTER: &str = "warn,idem=info,idem_broker=info,lapin=off";

/// `bytes` as trimmed text (lossy UTF-8), cut to at most `max` bytes on a character boundary,
/// for reasons and logs.
pub(crate) fn excerpt(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h0m5s"), Ok(Duration::from_secs(7205)));
        assert_eq!(parse_duration("1s250ms"), Ok(Duration::from_millis(1250)));
        for zero in ["0", "0s", "0ms", "0d"] {
            assert!(parse_duration(zero).is_err(), "{zero}");
        }
        assert!(parse_lease("500ms").is_err());
        assert_eq!(parse_lease("2s"), Ok(Duration::from_secs(2)));
        for bad in [
            "",
            "s",
            "1.5s",
            "-1s",
            "3 weeks",
            "99999999999999999999d",
            "1m30",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn claims_in_flight_never_exceed_the_concurrency() {
        for concurrency in 1..=64 {
            for batch in 1..=64 {
                let (size, batches) = batching(batch, concurrency);
                assert!(size >= 1 && batches >= 1, "{batch} {concurrency}");
                assert!(size <= batch as usize, "{batch} {concurrency}");
                assert!(
                    size * batches <= concurrency as usize,
                    "{batch} {concurrency}"
                );
                if concurrency >= 2 {
                    assert!(
                        batches >= 2,
                        "{batch} {concurrency}: one claims while one runs"
                    );
                }
            }
        }
        assert_eq!(batching(16, 8), (4, 2));
        assert_eq!(batching(1, 8), (1, 8));
        assert_eq!(batching(3, 8), (3, 2));
        assert_eq!(batching(16, 1), (1, 1));
    }

    #[test]
    fn parses_stats_intervals() {
        assert_eq!(parse_interval("0"), Ok(Duration::ZERO));
        assert_eq!(parse_interval("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_interval("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn parses_fingerprints() {
        assert_eq!(parse_fingerprint("payload"), Ok(FingerprintFrom::Payload));
        assert_eq!(
            parse_fingerprint("json:/body"),
            Ok(FingerprintFrom::Json("/body".into()))
        );
        assert!(parse_fingerprint("json:body").is_err());
        assert!(parse_fingerprint("hash").is_err());
    }

    #[test]
    fn excerpts_cut_on_char_boundaries() {
        assert_eq!(excerpt(b"  short \n", 10), "short");
        assert_eq!(excerpt("ééé".as_bytes(), 3), "é…");
    }
}
