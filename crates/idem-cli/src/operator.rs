//! Operator commands on a store: `inspect` (records by state, in-progress claims and stuck
//! ones), `get KEY`, `evict KEY` (force reprocessing, confirmed) and `purge` (expired records).
//!
//! They work on any store through the `Store` and `Inspect` traits; the URL picks the store.
//! They never create a database: a missing file or one without idem's tables is an error.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use idem::{Inspect, Key, Record, State, Store, Timestamp};
use serde::Serialize;

use crate::store_url::{OpenOptions, Opened, StoreUrl};

/// The store every operator command works on.
#[derive(clap::Args, Debug)]
pub(crate) struct StoreArg {
    /// The store: `sqlite:PATH`, `redis://HOST`, `postgres://USER@HOST/DB` or
    /// `mysql://USER@HOST/DB`. Help never shows the variable's value (it may hold a password).
    #[arg(long, env = "IDEM_STORE", hide_env_values = true, value_name = "URL")]
    store: StoreUrl,
}

impl StoreArg {
    async fn open(&self) -> anyhow::Result<Opened> {
        if self.store == StoreUrl::Memory {
            bail!(
                "the memory store lives inside one process, so there is nothing to operate on; \
                 use a persistent store such as sqlite:PATH"
            );
        }
        self.store
            .open(OpenOptions {
                must_exist: true,
                ..OpenOptions::default()
            })
            .await
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct InspectArgs {
    #[command(flatten)]
    store: StoreArg,
    /// How many in-progress records to list, stuck ones first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The key, as `namespace:id`.
    key: String,
    /// Print the record as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct EvictArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The key, as `namespace:id`.
    key: String,
    /// Evict without asking (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct PurgeArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Records deleted per store call (each call holds the store briefly).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

fn parse_key(text: &str) -> anyhow::Result<Key> {
    Key::parse(text).with_context(|| format!("invalid key {text:?} (expected namespace:id)"))
}

/// `idem inspect`.
pub(crate) async fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let opened = args.store.open().await?;
    let url = args.store.store.to_string();
    let view = with_store!(opened, s => InspectView::load(&s, url, args.limit).await?);
    if args.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print!("{}", view.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// What `inspect` shows.
#[derive(Debug, Serialize)]
struct InspectView {
    store: String,
    now: String,
    counts: Vec<(&'static str, u64)>,
    total: u64,
    in_progress: u64,
    /// In-progress records, at most `--limit`, the stuck ones first, then by lease end.
    listed: Vec<RecordView>,
    /// In-progress records whose lease ended: no consumer holds them, and the next delivery
    /// takes over. Stores list stuck claims first, so this is exact unless every listed
    /// record is stuck and more are in progress than listed: then it is a lower bound.
    stuck: usize,
    /// Whether `stuck` is only a lower bound (raise `--limit` to count them all).
    stuck_at_least: bool,
}

impl InspectView {
    async fn load<S: Inspect>(store: &S, url: String, limit: usize) -> anyhow::Result<Self> {
        let now = store.now().await?;
        let counts = store.count_by_state().await?;
        let listed = store.in_progress(limit).await?;
        let count = |state: State| {
            counts
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n)
        };
        let all = [
            State::InProgress,
            State::Completed,
            State::Released,
            State::Failed,
        ];
        Ok(Self {
            store: url,
            now: now.to_string(),
            counts: all.iter().map(|&s| (s.as_str(), count(s))).collect(),
            total: counts.iter().map(|(_, n)| n).sum(),
            in_progress: count(State::InProgress),
            stuck: listed.iter().filter(|r| r.is_lease_expired(now)).count(),
            stuck_at_least: listed.iter().all(|r| r.is_lease_expired(now))
                && (listed.len() as u64) < count(State::InProgress),
            listed: listed.iter().map(|r| RecordView::new(r, now)).collect(),
        })
    }

    fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "store {} at {}\n\nrecords by state:",
            self.store, self.now
        );
        for (state, n) in &self.counts {
            let _ = writeln!(out, "  {state:<12} {n:>10}");
        }
        let _ = writeln!(out, "  {:<12} {:>10}", "total", self.total);
        if self.in_progress == 0 {
            let _ = writeln!(out, "\nno record in progress");
            return out;
        }
        let stuck = if self.stuck_at_least {
            format!("at least {} (raise --limit to count them all)", self.stuck)
        } else {
            self.stuck.to_string()
        };
        let _ = writeln!(
            out,
            "\nin progress: {}, stuck: {stuck} (lease ended: no consumer holds it, the next \
             delivery takes over); {} listed below, stuck first",
            self.in_progress,
            self.listed.len(),
        );
        let w = self
            .listed
            .iter()
            .map(|r| r.key.len())
            .max()
            .unwrap_or(3)
            .max(3);
        let _ = writeln!(
            out,
            "  {:<w$}  {:<24} {:>8} {:>10} {:>10}  lease",
            "key", "owner", "attempts", "age", "last beat"
        );
        for r in &self.listed {
            let _ = writeln!(
                out,
                "  {:<w$}  {:<24} {:>8} {:>10} {:>10}  {}",
                r.key,
                r.owner.as_deref().unwrap_or("-"),
                r.attempts,
                r.age,
                r.since_update,
                r.lease
            );
        }
        out
    }
}

/// A record as operators read it.
#[derive(Debug, Serialize)]
struct RecordView {
    key: String,
    state: &'static str,
    fingerprint: String,
    token: Option<String>,
    owner: Option<String>,
    attempts: u32,
    /// Since the record was first written.
    age: String,
    /// Since its last change (claim, heartbeat, completion).
    since_update: String,
    /// The lease, for in-progress records: when it ends or how long ago it ended.
    lease: String,
    lease_until: Option<String>,
    created_at: String,
    updated_at: String,
    expires_at: String,
    /// Whether retention has ended: the record counts as absent until it is purged.
    expired: bool,
    /// The stored result (completed) or failure reason (failed), as text when it is UTF-8.
    result: Option<String>,
    result_bytes: usize,
}

impl RecordView {
    fn new(r: &Record, now: Timestamp) -> Self {
        let lease = match (r.state, r.lease_until) {
            (State::InProgress, Some(until)) if now < until => {
                format!("ends in {}", human(until.since(now)))
            }
            (State::InProgress, Some(until)) => {
                format!("STUCK: ended {} ago", human(now.since(until)))
            }
            (State::InProgress, None) => "STUCK: no lease".to_owned(),
            _ => "-".to_owned(),
        };
        let result = r.result.as_ref().map(|b| match std::str::from_utf8(b) {
            Ok(text) => text.to_owned(),
            Err(_) => format!(
                "0x{}",
                b.iter()
                    .take(64)
                    .map(|x| format!("{x:02x}"))
                    .collect::<String>()
            ),
        });
        Self {
            key: r.key.to_string(),
            state: r.state.as_str(),
            fingerprint: r.fingerprint.to_string(),
            token: r.token.map(|t| t.to_string()),
            owner: r.owner.as_deref().map(str::to_owned),
            attempts: r.attempts,
            age: human(now.since(r.created_at)),
            since_update: human(now.since(r.updated_at)),
            lease,
            lease_until: r.lease_until.map(|t| t.to_string()),
            created_at: r.created_at.to_string(),
            updated_at: r.updated_at.to_string(),
            expires_at: r.expires_at.to_string(),
            expired: r.is_expired(now),
            result,
            result_bytes: r.result.as_ref().map_or(0, |b| b.len()),
        }
    }

    fn to_text(&self) -> String {
        let mut lines = vec![
            ("key", self.key.clone()),
            ("state", self.state.to_owned()),
            ("attempts", self.attempts.to_string()),
            (
                "owner",
                self.owner.clone().unwrap_or_else(|| "-".to_owned()),
            ),
            (
                "token",
                self.token.clone().unwrap_or_else(|| "-".to_owned()),
            ),
            ("fingerprint", self.fingerprint.clone()),
            ("lease", self.lease.clone()),
            ("created", format!("{} ({} ago)", self.created_at, self.age)),
            (
                "updated",
                format!("{} ({} ago)", self.updated_at, self.since_update),
            ),
            (
                "expires",
                if self.expired {
                    format!(
                        "{} (retention ended: counts as absent until purged)",
                        self.expires_at
                    )
                } else {
                    self.expires_at.clone()
                },
            ),
        ];
        let what = if self.state == State::Failed.as_str() {
            "reason"
        } else {
            "result"
        };
        lines.push((
            what,
            match &self.result {
                None => "-".to_owned(),
                Some(_) if self.result_bytes == 0 => "(empty)".to_owned(),
                Some(text) => format!("{text:?} ({} bytes)", self.result_bytes),
            },
        ));
        lines
            .into_iter()
            .map(|(k, v)| format!("{k:<12} {v}\n"))
            .collect()
    }
}

/// A duration for people: `850ms`, `12.3s`, `4m 05s`, `3h 20m`, `6d 23h`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// `idem get KEY`.
pub(crate) async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let key = parse_key(&args.key)?;
    let opened = args.store.open().await?;
    let found = with_store!(opened, s => load(&s, &key).await?);
    let Some((record, now)) = found else {
        bail!("no record for key {key} in {}", args.store.store);
    };
    let view = RecordView::new(&record, now);
    if args.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print!("{}", view.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

async fn load<S: Inspect>(store: &S, key: &Key) -> anyhow::Result<Option<(Record, Timestamp)>> {
    let now = store.now().await?;
    Ok(store.get(key).await?.map(|r| (r, now)))
}

/// `idem evict KEY`.
pub(crate) async fn evict(args: EvictArgs) -> anyhow::Result<ExitCode> {
    let key = parse_key(&args.key)?;
    let opened = args.store.open().await?;
    let found = with_store!(&opened, s => load(s, &key).await?);
    let Some((record, now)) = found else {
        bail!("no record for key {key} in {}", args.store.store);
    };
    let view = RecordView::new(&record, now);
    let mut warning = String::from("the next delivery of this message runs its handler again");
    if record.state == State::InProgress && !record.is_lease_expired(now) {
        warning.push_str(
            "; a consumer holds its lease right now: its completion will be refused (lease lost) \
             and a redelivery may run concurrently",
        );
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to evict {key} without confirmation: stdin is not a terminal; pass \
                 --yes to evict anyway"
            );
        }
        let mut err = std::io::stderr().lock();
        write!(
            err,
            "{key}: {} after {} attempt(s).\nEvict it? {warning}. [y/N] ",
            view.state, view.attempts
        )?;
        err.flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            eprintln!("not evicted");
            return Ok(ExitCode::FAILURE);
        }
    }
    let existed = with_store!(opened, s => s.evict(&key).await?);
    if !existed {
        bail!("no record for key {key} any more (it was removed meanwhile)");
    }
    println!("evicted {key} (was {}): {warning}", view.state);
    Ok(ExitCode::SUCCESS)
}

/// `idem purge`.
pub(crate) async fn purge(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let opened = args.store.open().await?;
    let purged = with_store!(opened, s => purge_all(&s, args.batch).await?);
    println!(
        "purged {purged} expired record(s) from {}",
        args.store.store
    );
    Ok(ExitCode::SUCCESS)
}

async fn purge_all<S: Inspect>(store: &S, batch: usize) -> anyhow::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = store.purge_expired(batch).await?;
        total += n as u64;
        if n < batch {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m 05s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 20 * 60)), "3h 20m");
        assert_eq!(human(Duration::from_secs(7 * 86_400)), "7d 00h");
    }

    #[test]
    fn keys_parse_with_clear_errors() {
        assert_eq!(parse_key("ledger:t-1").unwrap().id(), "t-1");
        let err = format!("{:#}", parse_key("no-separator").unwrap_err());
        assert!(err.contains("invalid key \"no-separator\""), "{err}");
    }
}
