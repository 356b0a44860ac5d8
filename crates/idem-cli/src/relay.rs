//! `idem relay` and `idem outbox`: the transactional outbox's relay as a process, and the
//! operator commands over an outbox table (docs/outbox.md).
//!
//! The relay publishes the rows an application enqueued in its own transactions
//! ([`idem_outbox`]) to a broker, with each row's message id, and marks them sent; several
//! relays may share a table. `idem outbox` shows what the table holds (pending rows and the age
//! of the oldest, dead rows with their last error) and requeues dead rows once the cause is
//! fixed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use idem::Backoff;
use idem_broker::{AnyProducer, BrokerUrl};
use idem_outbox::{DbUrl, DeadPolicy, OutboxDb, Relay, RelayConfig, Requeue, Table};

use crate::consume::parse_duration;
use crate::url_arg::UrlParser;

/// `idem relay` options.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  \
      idem relay --from postgres://app@127.0.0.1/app --to amqp://guest:guest@127.0.0.1:5672/%2f\n\n\
      Each row's destination is where it goes: a queue (through the default exchange) on \
      amqp://, a subject on nats://, a topic on kafka://, mqtt:// and rocketmq://, a stream on \
      redis://, a queue on stomp://. Logs go to stderr; RUST_LOG sets the filter.")]
pub(crate) struct RelayArgs {
    /// The database holding the outbox: `sqlite:PATH`, `postgres://USER@HOST/DB` or
    /// `mysql://USER@HOST/DB`. Passwords are never printed.
    #[arg(long, env = "IDEM_OUTBOX_DB", hide_env_values = true, value_name = "DB_URL", value_parser = UrlParser::<DbUrl>::new())]
    from: DbUrl,
    /// The broker to publish to (as `idem consume --from`).
    #[arg(long, env = "IDEM_TO", hide_env_values = true, value_name = "BROKER_URL", value_parser = UrlParser::<BrokerUrl>::new())]
    to: BrokerUrl,
    #[command(flatten)]
    table: TableArg,
    /// Rows claimed per statement; a batch is published concurrently.
    #[arg(long, value_name = "N", default_value_t = 128)]
    batch: usize,
    /// How long a claim lasts: a relay that dies holds its rows this long, then another relay
    /// publishes them again with the same message ids.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// The longest wait for the broker's confirmation of one publish (a timeout is a failed
    /// attempt). Keep it well under --lease.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    publish_timeout: Duration,
    /// How often an idle relay looks for rows without being woken (PostgreSQL relays are also
    /// woken by each commit, with LISTEN/NOTIFY).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Publish attempts before a row goes dead (a lost broker connection does not count).
    #[arg(long, value_name = "N", default_value_t = 10)]
    max_attempts: u32,
    /// Delay before a failed row's next attempt, doubling up to --max-retry-delay.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    retry_delay: Duration,
    /// The longest delay between attempts.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    max_retry_delay: Duration,
    /// A dead row stops the later messages of its ordering key until it is requeued (by
    /// default they go ahead and the dead row stays visible at its position).
    #[arg(long)]
    stop_key_on_dead: bool,
    /// Sent rows older than this are deleted, in bounded batches; `off` keeps them.
    #[arg(long, value_name = "DURATION|off", default_value = "7d", value_parser = parse_retention)]
    retention: Retention,
    /// Create the table when it is missing (by default a missing table is an error: run
    /// `idem outbox migrate` as a deploy step).
    #[arg(long)]
    migrate: bool,
    /// How often a `stats` line (at info level) says what the relay did so far; `0` turns it
    /// off.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_interval)]
    stats_interval: Duration,
}

/// `--table`, shared by the relay and the operator commands.
#[derive(clap::Args, Debug)]
struct TableArg {
    /// The outbox table (`name` or `schema.name`).
    #[arg(long, value_name = "NAME", default_value = idem_outbox::DEFAULT_TABLE)]
    table: String,
}

impl TableArg {
    fn table(&self) -> anyhow::Result<Table> {
        Table::new(&self.table).with_context(|| format!("invalid --table {:?}", self.table))
    }
}

/// `--retention`: a duration, or `off`.
#[derive(Clone, Copy, Debug)]
struct Retention(Option<Duration>);

fn parse_retention(s: &str) -> Result<Retention, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(Retention(None));
    }
    parse_duration(s).map(|d| Retention(Some(d)))
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

pub(crate) async fn run_relay(args: RelayArgs) -> anyhow::Result<ExitCode> {
    crate::observe::init_logging(
        crate::observe::LogFormat::Text,
        "warn,idem=info,idem_outbox=info,lapin=off",
    );
    let mut config = RelayConfig::new(args.from.clone(), args.to.clone());
    config.table = args.table.table()?;
    config.batch_size = args.batch;
    config.lease = args.lease;
    config.publish_timeout = args.publish_timeout;
    config.poll_interval = args.poll_interval;
    config.max_attempts = args.max_attempts;
    config.backoff = Backoff::new(args.retry_delay, args.max_retry_delay);
    config.dead_policy = if args.stop_key_on_dead {
        DeadPolicy::StopKey
    } else {
        DeadPolicy::SkipDead
    };
    config.retention = args.retention.0;
    config.migrate = args.migrate;
    // Before connecting: a bad setting is reported without touching the database or broker.
    config.check().map_err(|e| {
        anyhow::anyhow!(
            "{} (--batch, --max-attempts, --publish-timeout, --lease)",
            e.message()
        )
    })?;

    let db = OutboxDb::connect(&config.db, config.table.clone())
        .await
        .map_err(|e| {
            let e =
                anyhow::Error::new(e).context(format!("cannot open the outbox at {}", args.from));
            // A SQLite file is no server to wait for: a path that cannot be opened is a
            // mistake (exit status 1, not 69).
            if config.db.kind() == idem_outbox::DbKind::Sqlite {
                anyhow::Error::msg(format!("{e:#}"))
            } else {
                e
            }
        })?;
    let producer = AnyProducer::connect(&config.broker)
        .await
        .with_context(|| format!("cannot connect to {}", args.to))?;
    let relay = Relay::new(db.clone(), producer, config);
    let handle = relay.stats();
    tracing::info!(from = %args.from, to = %args.to, table = %args.table.table, "relaying");
    let reporter = (!args.stats_interval.is_zero()).then(|| {
        let (handle, every) = (handle.clone(), args.stats_interval);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = handle.snapshot();
                tracing::info!(
                    "stats: claimed={} published={} duplicates={} marked={} fenced={} \
                     failed={} dead={} purged={}",
                    s.claimed,
                    s.published,
                    s.duplicates,
                    s.marked,
                    s.fenced,
                    s.failed,
                    s.dead,
                    s.purged
                );
            }
        })
    });
    let result = relay.run(idem_broker::shutdown_signal()).await;
    if let Some(r) = reporter {
        r.abort();
    }
    db.close().await;
    let s = result?;
    eprintln!(
        "idem relay: stopped: claimed={} published={} duplicates={} marked={} fenced={} \
         failed={} dead={} purged={}",
        s.claimed, s.published, s.duplicates, s.marked, s.fenced, s.failed, s.dead, s.purged
    );
    Ok(ExitCode::SUCCESS)
}

/// `idem outbox` options.
#[derive(clap::Args, Debug)]
pub(crate) struct OutboxArgs {
    #[command(subcommand)]
    command: OutboxCommand,
}

#[derive(clap::Subcommand, Debug)]
enum OutboxCommand {
    /// Rows by state: pending (and how many of them wait for a retry), dead, sent, and the age
    /// of the oldest pending row (the relay's lag).
    Stats(OutboxTarget),
    /// Dead rows (attempts exhausted), oldest first, with their last error.
    Dead {
        #[command(flatten)]
        target: OutboxTarget,
        /// At most this many rows.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
    },
    /// Sends dead rows back to pending, with their attempts reset; the relay publishes them
    /// with their original message ids.
    Requeue {
        #[command(flatten)]
        target: OutboxTarget,
        /// Every dead row.
        #[arg(long, conflicts_with_all = ["id", "message_id"], required_unless_present_any = ["id", "message_id"])]
        all: bool,
        /// The dead row with this row id.
        #[arg(long, value_name = "ROW_ID", conflicts_with = "message_id")]
        id: Option<i64>,
        /// The dead row with this message id.
        #[arg(long, value_name = "ID")]
        message_id: Option<String>,
    },
    /// Creates the outbox table (and its indexes, and the PostgreSQL notification trigger), or
    /// does nothing if it exists. Run it at deploy time.
    Migrate(OutboxTarget),
}

#[derive(clap::Args, Debug)]
struct OutboxTarget {
    /// The database holding the outbox: `sqlite:PATH`, `postgres://...` or `mysql://...`.
    #[arg(long, env = "IDEM_OUTBOX_DB", hide_env_values = true, value_name = "DB_URL", value_parser = UrlParser::<DbUrl>::new())]
    from: DbUrl,
    #[command(flatten)]
    table: TableArg,
    /// One JSON object on stdout (durations and timestamps in milliseconds).
    #[arg(long)]
    json: bool,
}

impl OutboxTarget {
    async fn open(&self) -> anyhow::Result<OutboxDb> {
        OutboxDb::connect(&self.from, self.table.table()?)
            .await
            .with_context(|| format!("cannot open the outbox at {}", self.from))
    }
}

pub(crate) async fn run_outbox(args: OutboxArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        OutboxCommand::Stats(t) => {
            let db = t.open().await?;
            let s = db.stats().await?;
            db.close().await;
            if t.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                let oldest = s.oldest_pending_age_ms.map_or_else(
                    || "-".to_owned(),
                    |ms| crate::duration::approx(Duration::from_millis(ms)),
                );
                println!(
                    "pending {} (retrying {}), dead {}, sent {}, oldest pending {}",
                    s.pending, s.retrying, s.dead, s.sent, oldest
                );
            }
        }
        OutboxCommand::Dead { target, limit } => {
            let db = target.open().await?;
            let rows = db.dead(limit).await?;
            db.close().await;
            if target.json {
                println!("{}", serde_json::json!({ "dead": rows }));
            } else if rows.is_empty() {
                println!("no dead rows");
            } else {
                for r in &rows {
                    println!(
                        "row {} message {} to {}{} after {} attempts: {}",
                        r.id,
                        r.message_id,
                        r.destination,
                        r.key
                            .as_deref()
                            .map(|k| format!(" (key {k})"))
                            .unwrap_or_default(),
                        r.attempts,
                        r.last_error.as_deref().unwrap_or("no error recorded")
                    );
                }
            }
        }
        OutboxCommand::Requeue {
            target,
            all,
            id,
            message_id,
        } => {
            let which = match (all, id, message_id) {
                (true, _, _) => Requeue::AllDead,
                (_, Some(id), _) => Requeue::Id(id),
                (_, _, Some(m)) => Requeue::MessageId(m),
                // clap requires one of them.
                _ => bail!("give --all, --id ROW_ID or --message-id ID"),
            };
            let db = target.open().await?;
            let n = db.requeue(&which).await?;
            db.close().await;
            if target.json {
                println!("{}", serde_json::json!({ "requeued": n }));
            } else {
                println!("requeued {n} dead row(s)");
            }
        }
        OutboxCommand::Migrate(t) => {
            let db = t.open().await?;
            db.migrate().await?;
            db.close().await;
            if t.json {
                println!("{}", serde_json::json!({ "migrated": true }));
            } else {
                println!("the outbox table {} is ready", t.table.table);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
