//! Operator commands on a store: `inspect` (records by state, in-progress claims and stuck
//! ones, or failed keys with their reasons), `get KEY`, `evict KEY` (force reprocessing,
//! confirmed) and `purge` (expired records).
//!
//! They work on any store through the `Store` and `Inspect` traits and [`records::Records`];
//! the URL picks the store, found as every command finds it ([`StoreArgs`]). They never create
//! a database: a missing file or one without idem's tables is an error.
//!
//! `--json` output is for scripts: durations are numbers of milliseconds and timestamps
//! milliseconds since the Unix epoch, in fields named `..._ms`. Text output writes durations as
//! [`crate::duration`] does (`850ms`, `12s`, `4m5s`).

mod records;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use idem::{Inspect, Key, Namespace, Record, State, Store, Timestamp};
use serde::Serialize;

use self::records::Records;
use crate::duration;
use crate::store_url::{OpenOptions, Opened, StoreArgs, StoreUrl};

/// Opens the store of an operator command: never creates a database, and checks that idem's
/// table is there.
async fn open(args: &StoreArgs) -> anyhow::Result<Opened> {
    if args.store == StoreUrl::Memory {
        bail!(
            "the memory store lives inside one process, so there is nothing to operate on; \
             use a persistent store such as sqlite:PATH"
        );
    }
    if let StoreUrl::Sqlite(path) = &args.store
        && args.is_default()
        && !path.exists()
    {
        bail!(
            "no SQLite database at {} (the default store): give the store with --store URL or \
             in IDEM_STORE",
            path.display()
        );
    }
    let opened = args
        .store
        .open_in(
            &args.location,
            OpenOptions {
                must_exist: true,
                ..OpenOptions::default()
            },
        )
        .await?;
    if let Opened::Mysql(store) = &opened {
        store
            .check_schema()
            .await
            .with_context(|| format!("opening {}", args.store))?;
    }
    Ok(opened)
}

fn parse_namespace(s: &str) -> Result<Namespace, idem::KeyError> {
    Namespace::new(s)
}

#[derive(clap::Args, Debug)]
pub(crate) struct InspectArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only the records of this namespace (counts and listing).
    #[arg(long, value_name = "NAME", value_parser = parse_namespace)]
    namespace: Option<Namespace>,
    /// List failed records (attempts ran out) with their reasons, most recent first, instead
    /// of the records in progress.
    #[arg(long)]
    failed: bool,
    /// How many records to list: in progress ones stuck first, or failed ones with --failed.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
    /// Print one JSON object instead of text (durations in milliseconds, timestamps in
    /// milliseconds since the Unix epoch).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The key, as `namespace:id`.
    key: String,
    /// Print the record as JSON (durations in milliseconds, timestamps in milliseconds since
    /// the Unix epoch).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct EvictArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The key, as `namespace:id`.
    key: String,
    /// Evict without asking (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct PurgeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Records deleted per store call (each call holds the store briefly).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    batch: usize,
    /// Count the records past retention, which a purge would delete; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print `{"purged": N}` (or `{"would_purge": N}` with --dry-run) instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_key(text: &str) -> anyhow::Result<Key> {
    Key::parse(text).with_context(|| format!("invalid key {text:?} (expected namespace:id)"))
}

/// `idem inspect`.
pub(crate) async fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let opened = open(&args.store).await?;
    let view = with_store!(opened, s => InspectView::load(&s, &args).await?);
    if args.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print!("{}", view.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// The states every count shows, in this order (0 when none).
const STATES: [State; 4] = [
    State::InProgress,
    State::Completed,
    State::Released,
    State::Failed,
];

/// Records by state: a JSON object with every state, in [`STATES`] order.
#[derive(Debug)]
struct Counts(Vec<(&'static str, u64)>);

impl Counts {
    fn new(found: &[(State, u64)]) -> Self {
        let mut counts: Vec<(&'static str, u64)> = STATES.iter().map(|s| (s.as_str(), 0)).collect();
        for (state, n) in found {
            match counts.iter_mut().find(|(name, _)| *name == state.as_str()) {
                Some((_, total)) => *total += n,
                None => counts.push((state.as_str(), *n)),
            }
        }
        Self(counts)
    }

    fn get(&self, state: State) -> u64 {
        self.0
            .iter()
            .find(|(name, _)| *name == state.as_str())
            .map_or(0, |(_, n)| *n)
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }
}

impl Serialize for Counts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (state, n) in &self.0 {
            map.serialize_entry(state, n)?;
        }
        map.end()
    }
}

/// What `inspect` shows.
#[derive(Debug, Serialize)]
struct InspectView {
    store: String,
    /// The namespace the counts and the listing are limited to.
    namespace: Option<String>,
    /// The store's clock.
    now_ms: i64,
    #[serde(skip)]
    now: Timestamp,
    counts: Counts,
    total: u64,
    /// What `listed` holds: `in_progress` or `failed` records.
    list: &'static str,
    /// In-progress records (`--failed`: failed ones), at most `--limit`: stuck ones first, then
    /// by lease end (failed: most recent first).
    listed: Vec<RecordView>,
    /// In-progress records whose lease ended: no consumer holds them, and the next delivery
    /// takes over. Stores list stuck claims first, so this is exact unless every listed
    /// record is stuck and more are in progress than listed: then it is a lower bound. Not
    /// with `--failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    stuck: Option<usize>,
    /// Whether `stuck` is only a lower bound (raise `--limit` to count them all).
    #[serde(skip_serializing_if = "Option::is_none")]
    stuck_at_least: Option<bool>,
}

impl InspectView {
    async fn load<S: Records>(store: &S, args: &InspectArgs) -> anyhow::Result<Self> {
        let ns = args.namespace.as_ref();
        let now = store.now().await?;
        let counts = Counts::new(&match ns {
            Some(ns) => store.count_in(ns).await?,
            None => store.count_by_state().await?,
        });
        let list = if args.failed {
            State::Failed
        } else {
            State::InProgress
        };
        let listed = match (list, ns) {
            (State::InProgress, None) => store.in_progress(args.limit).await?,
            (state, ns) => store.list(state, ns, args.limit).await?,
        };
        let (stuck, stuck_at_least) = if list == State::InProgress {
            let stuck = listed.iter().filter(|r| r.is_lease_expired(now)).count();
            let at_least =
                stuck == listed.len() && (listed.len() as u64) < counts.get(State::InProgress);
            (Some(stuck), Some(at_least))
        } else {
            (None, None)
        };
        Ok(Self {
            store: args.store.store.to_string(),
            namespace: ns.map(ToString::to_string),
            now_ms: now.as_millis(),
            now,
            total: counts.total(),
            counts,
            list: list.as_str(),
            listed: listed.iter().map(|r| RecordView::new(r, now)).collect(),
            stuck,
            stuck_at_least,
        })
    }

    fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = write!(out, "store {} at {}", self.store, self.now);
        if let Some(ns) = &self.namespace {
            let _ = write!(out, ", namespace {ns}");
        }
        let _ = writeln!(out, "\n\nrecords by state:");
        for (state, n) in &self.counts.0 {
            let _ = writeln!(out, "  {state:<12} {n:>10}");
        }
        let _ = writeln!(out, "  {:<12} {:>10}", "total", self.total);
        match self.stuck {
            Some(stuck) => self.in_progress_text(&mut out, stuck),
            None => self.failed_text(&mut out),
        }
        out
    }

    fn in_progress_text(&self, out: &mut String, stuck: usize) {
        use std::fmt::Write as _;
        let in_progress = self.counts.get(State::InProgress);
        if in_progress == 0 {
            let _ = writeln!(out, "\nno record in progress");
            return;
        }
        let stuck = if self.stuck_at_least == Some(true) {
            format!("at least {stuck} (raise --limit to count them all)")
        } else {
            stuck.to_string()
        };
        let _ = writeln!(
            out,
            "\nin progress: {in_progress}, stuck: {stuck} (lease ended: no consumer holds it, \
             the next delivery takes over); {} listed below, stuck first",
            self.listed.len(),
        );
        let w = key_width(&self.listed);
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
                r.age(),
                r.since_update(),
                r.lease_text()
            );
        }
    }

    fn failed_text(&self, out: &mut String) {
        use std::fmt::Write as _;
        let failed = self.counts.get(State::Failed);
        if failed == 0 {
            let _ = writeln!(out, "\nno failed record");
            return;
        }
        let _ = writeln!(
            out,
            "\nfailed: {failed} (attempts ran out: deliveries are dead-lettered until retention \
             ends or the key is evicted); {} listed below, most recent first",
            self.listed.len(),
        );
        let w = key_width(&self.listed);
        let _ = writeln!(
            out,
            "  {:<w$}  {:>8} {:>10}  reason",
            "key", "attempts", "failed"
        );
        for r in &self.listed {
            let _ = writeln!(
                out,
                "  {:<w$}  {:>8} {:>10}  {}",
                r.key,
                r.attempts,
                format!("{} ago", r.since_update()),
                excerpt(r.reason.as_deref().unwrap_or("-"), REASON_CHARS),
            );
        }
    }
}

/// The most characters of a reason a listing line shows (`get KEY` shows it whole).
const REASON_CHARS: usize = 160;

/// `text` on one line, cut to `max` characters.
fn excerpt(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line,
    }
}

fn key_width(records: &[RecordView]) -> usize {
    records
        .iter()
        .map(|r| r.key.len())
        .max()
        .unwrap_or(3)
        .max(3)
}

/// A record as operators read it. JSON: durations in milliseconds, timestamps in milliseconds
/// since the Unix epoch, all in fields named `..._ms`.
#[derive(Debug, Serialize)]
struct RecordView {
    key: String,
    namespace: String,
    id: String,
    state: &'static str,
    fingerprint: String,
    token: Option<String>,
    owner: Option<String>,
    attempts: u32,
    created_at_ms: i64,
    updated_at_ms: i64,
    expires_at_ms: i64,
    /// In progress: when the lease ends.
    lease_until_ms: Option<i64>,
    /// Since the record was first written.
    age_ms: u64,
    /// Since its last change (claim, heartbeat, completion, failure).
    since_update_ms: u64,
    /// In progress: how long the lease still runs; negative once it has ended (stuck).
    lease_left_ms: Option<i64>,
    /// In progress with its lease ended: no consumer holds it, the next delivery takes over.
    stuck: bool,
    /// Whether retention has ended: the record counts as absent until it is purged.
    expired: bool,
    /// Completed: the stored result, as text when it is UTF-8, else `0x` and hex.
    result: Option<String>,
    /// Failed: why (the last attempt's error).
    reason: Option<String>,
    /// Bytes of the stored result or reason.
    result_bytes: usize,
    #[serde(skip)]
    now: Timestamp,
    #[serde(skip)]
    record: Record,
}

impl RecordView {
    fn new(r: &Record, now: Timestamp) -> Self {
        let stored = r.result.as_ref().map(|b| match std::str::from_utf8(b) {
            Ok(text) => text.to_owned(),
            Err(_) => format!(
                "0x{}",
                b.iter()
                    .take(64)
                    .map(|x| format!("{x:02x}"))
                    .collect::<String>()
            ),
        });
        let (result, reason) = if r.state == State::Failed {
            (None, stored)
        } else {
            (stored, None)
        };
        let lease_left_ms = match (r.state, r.lease_until) {
            (State::InProgress, Some(until)) => {
                Some(until.as_millis().saturating_sub(now.as_millis()))
            }
            _ => None,
        };
        Self {
            key: r.key.to_string(),
            namespace: r.key.namespace().to_string(),
            id: r.key.id().to_owned(),
            state: r.state.as_str(),
            fingerprint: r.fingerprint.to_string(),
            token: r.token.map(|t| t.to_string()),
            owner: r.owner.as_deref().map(str::to_owned),
            attempts: r.attempts,
            created_at_ms: r.created_at.as_millis(),
            updated_at_ms: r.updated_at.as_millis(),
            expires_at_ms: r.expires_at.as_millis(),
            lease_until_ms: r.lease_until.map(Timestamp::as_millis),
            age_ms: duration::millis(now.since(r.created_at)),
            since_update_ms: duration::millis(now.since(r.updated_at)),
            lease_left_ms,
            stuck: r.is_lease_expired(now),
            expired: r.is_expired(now),
            result,
            reason,
            result_bytes: r.result.as_ref().map_or(0, |b| b.len()),
            now,
            record: r.clone(),
        }
    }

    fn age(&self) -> String {
        duration::approx(self.now.since(self.record.created_at))
    }

    fn since_update(&self) -> String {
        duration::approx(self.now.since(self.record.updated_at))
    }

    /// The lease of an in-progress record: when it ends or how long ago it ended.
    fn lease_text(&self) -> String {
        match (self.record.state, self.record.lease_until) {
            (State::InProgress, Some(until)) if self.now < until => {
                format!("ends in {}", duration::approx(until.since(self.now)))
            }
            (State::InProgress, Some(until)) => {
                format!(
                    "STUCK: ended {} ago",
                    duration::approx(self.now.since(until))
                )
            }
            (State::InProgress, None) => "STUCK: no lease".to_owned(),
            _ => "-".to_owned(),
        }
    }

    fn to_text(&self) -> String {
        let r = &self.record;
        let expires = if self.expired {
            format!(
                "{} (retention ended {} ago: counts as absent until purged)",
                r.expires_at,
                duration::approx(self.now.since(r.expires_at))
            )
        } else {
            format!(
                "{} (in {})",
                r.expires_at,
                duration::approx(r.expires_at.since(self.now))
            )
        };
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
            ("lease", self.lease_text()),
            ("created", format!("{} ({} ago)", r.created_at, self.age())),
            (
                "updated",
                format!("{} ({} ago)", r.updated_at, self.since_update()),
            ),
            ("expires", expires),
        ];
        let (what, stored) = match &self.reason {
            Some(reason) => ("reason", Some(reason)),
            None => ("result", self.result.as_ref()),
        };
        lines.push((
            what,
            match stored {
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

/// `idem get KEY`.
pub(crate) async fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let key = parse_key(&args.key)?;
    let opened = open(&args.store).await?;
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
    let opened = open(&args.store).await?;
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
    let opened = open(&args.store).await?;
    let store = &args.store.store;
    if args.dry_run {
        let n = with_store!(opened, s => count_expired(&s).await?);
        if args.json {
            println!("{}", serde_json::json!({ "would_purge": n }));
        } else {
            println!("would purge {n} expired record(s) from {store} (dry run: nothing deleted)");
        }
    } else {
        let n = with_store!(opened, s => purge_all(&s, args.batch).await?);
        if args.json {
            println!("{}", serde_json::json!({ "purged": n }));
        } else {
            println!("purged {n} expired record(s) from {store}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn count_expired<S: Records>(store: &S) -> anyhow::Result<u64> {
    let now = store.now().await?;
    store.count_expired(now).await
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
    fn keys_parse_with_clear_errors() {
        assert_eq!(parse_key("ledger:t-1").unwrap().id(), "t-1");
        let err = format!("{:#}", parse_key("no-separator").unwrap_err());
        assert!(err.contains("invalid key \"no-separator\""), "{err}");
    }

    #[test]
    fn counts_name_every_state() {
        let counts = Counts::new(&[(State::Failed, 2), (State::Completed, 5)]);
        assert_eq!(
            serde_json::to_string(&counts).unwrap(),
            r#"{"in_progress":0,"completed":5,"released":0,"failed":2}"#
        );
        assert_eq!(counts.total(), 7);
    }

    #[test]
    fn reasons_are_cut_to_one_line() {
        assert_eq!(
            excerpt("exit status 1:\n  boom", 100),
            "exit status 1: boom"
        );
        assert_eq!(excerpt("ééééé", 3), "ééé…");
    }
}
