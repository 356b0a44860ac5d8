//! What a verify run measured, what it concludes, and how it prints it: one [`RunReport`] per mode,
//! one [`Check`] per mode, a table or one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::faults::Fault;
use crate::ledger::Snapshot;
use crate::stats::{Stats, Window};
use crate::workload::Workload;

/// The three modes, in the order they run and print.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeName {
    /// No deduplication at all.
    Naive,
    /// idem's store mode: the effect outside the store.
    Store,
    /// idem's transactional mode: the effect and the record in one transaction.
    Transactional,
}

impl ModeName {
    /// The mode's name in the table and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ModeName::Naive => "naive",
            ModeName::Store => "store",
            ModeName::Transactional => "transactional",
        }
    }
}

/// Window events by cause.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct WindowEvents {
    /// A crash aborted a delivery between its effect and its record.
    pub crashes: u64,
    /// A pause ended with another consumer having taken over.
    pub pause_takeovers: u64,
    /// Other ways an applied effect went unrecorded (a lease lost without a pause, a completion
    /// that failed after its retries).
    pub other: u64,
}

/// The measurements of one mode. The first fields are the issue's; the rest explain them.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The mode.
    pub mode: ModeName,
    /// Transfers in the workload.
    pub messages: u64,
    /// Deliveries consumers received, all messages together.
    pub deliveries: u64,
    /// Deliveries beyond the first of each message.
    pub duplicate_deliveries: u64,
    /// Effect applications that stuck (counted in the ledger, per transfer).
    pub effects: u64,
    /// Applications beyond the first, summed over transfers.
    pub duplicate_effects: u64,
    /// Transfers never applied.
    pub lost: u64,
    /// Window events: effects applied and not recorded when their delivery was interrupted.
    pub window_events: u64,
    /// Duplicate effects of messages beyond their own window events, summed: store mode
    /// promises 0 (every repeat is explained by a window of the same message).
    pub duplicates_outside_windows: u64,
    /// Messages per second of wall time, faults, timeouts and tail included.
    pub msgs_per_s: f64,
    /// Wall time of the mode, in seconds.
    pub elapsed_s: f64,
    /// Published copies not acked when the run ended: 0 unless `--timeout-s` cut it short.
    pub unacked: u64,
    /// Every balance equals what the ledger's own application counts imply (no half-applied
    /// transfer).
    pub balances_match_effects: bool,
    /// Every balance equals what the unique transfers imply (exactly once).
    pub balances_exact: bool,
    /// The sum of balances is unchanged.
    pub total_conserved: bool,
    /// Window events by cause.
    pub window: WindowEvents,
    /// Claims that took over an expired lease (store mode).
    pub takeovers: u64,
    /// Consumers started again after a crash.
    pub consumer_restarts: u64,
    /// Transfers dead-lettered (none should be).
    pub dead_letters: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Deliveries by outcome (`executed`, `replayed`, `in_progress`, `lease_lost`,
    /// `store_error`..., `applied` for naive).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Failures of the harness itself (should be empty).
    pub errors: Vec<String>,
    /// The real faults of a run through a broker (`--broker`); absent in the embedded run.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerFaults>,
}

/// What a run through a real broker did to it, beyond the consumers' own fault points.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BrokerFaults {
    /// Times the broker was stopped and started again while the run went on.
    pub broker_restarts: u64,
    /// Consumer processes killed with SIGKILL: at random times by `verify`, and by themselves
    /// at their planned crash points (the `crash_*` faults).
    pub consumer_kills: u64,
    /// Of `consumer_kills`, those sent by `verify` at random times.
    pub random_kills: u64,
    /// Times every connection through `verify`'s proxy was cut (consumers and producers).
    pub connection_drops: u64,
    /// Publishes that failed (connection lost, no confirm) and were tried again with the same
    /// message id: each may have stored a duplicate.
    pub producer_retries: u64,
    /// Publishes the broker confirmed: every original, every planned copy, and every retry
    /// that the broker took.
    pub published: u64,
    /// Copies the broker itself recognised as duplicates and dropped (NATS `Nats-Msg-Id`).
    pub broker_dropped_duplicates: u64,
    /// With `--outbox`: what the producer transactions and the relay processes went through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxFaults>,
    /// Which of these faults the run had to see at least once (the others were turned off or
    /// are impossible here, e.g. a broker that is not `verify`'s own cannot be restarted).
    #[serde(skip)]
    pub required: RequiredFaults,
}

/// A run fed through the transactional outbox (`--outbox`): the producer commits each
/// transfer's message in a transaction with a business row; relay processes publish the rows.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct OutboxFaults {
    /// Relay processes per mode.
    pub relays: usize,
    /// Producer transactions committed (one transfer each).
    pub committed: u64,
    /// Producer transactions rolled back (their message must never be published) before the
    /// transfer was committed again.
    pub rolled_back: u64,
    /// Relay processes killed with SIGKILL at random times (rows claimed or published and
    /// not yet marked sent go out again, with the same message ids, after the lease).
    pub relay_kills: u64,
    /// Rows the relays published and marked sent, as the table counts them.
    pub sent: u64,
    /// Rows left pending or dead at the end (must be 0).
    pub left: u64,
}

/// Broker faults that must have happened for a run to count (see [`BrokerFaults::required`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequiredFaults {
    /// Consumer processes must have been killed.
    pub kills: bool,
    /// The broker must have been restarted.
    pub restarts: bool,
    /// Connections must have been cut.
    pub drops: bool,
}

/// What a run measured besides the ledger: deliveries, windows, faults, outcomes. The embedded
/// run takes it from its in-process counters ([`Measured::of`]); a run through a broker reads
/// it from the consumer processes' logs.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    /// Deliveries consumers received.
    pub deliveries: u64,
    /// Deliveries beyond the first of each message.
    pub duplicate_deliveries: u64,
    /// Window events by cause.
    pub window: WindowEvents,
    /// Window events per message (transfer index), for the message-by-message check.
    pub windows_by_message: BTreeMap<u32, u32>,
    /// Claims that took over an expired lease.
    pub takeovers: u64,
    /// Consumers started again after a crash.
    pub consumer_restarts: u64,
    /// Transfers dead-lettered.
    pub dead_letters: u64,
    /// Faults injected, by name.
    pub faults: BTreeMap<&'static str, u64>,
    /// Deliveries by outcome.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Failures of the harness itself.
    pub errors: Vec<String>,
    /// What a run through a real broker did to it.
    pub broker: Option<BrokerFaults>,
}

impl Measured {
    /// The counters of an embedded run.
    pub fn of(stats: &Stats) -> Self {
        let faults = stats.faults.snapshot();
        Self {
            deliveries: stats.total_deliveries(),
            duplicate_deliveries: stats.duplicate_deliveries(),
            window: WindowEvents {
                crashes: stats.windows(Window::Crash),
                pause_takeovers: stats.windows(Window::PauseTakeover),
                other: stats.windows(Window::Other),
            },
            windows_by_message: stats.windows_by_message(),
            takeovers: stats.takeovers(),
            consumer_restarts: stats.restarts(),
            dead_letters: stats.dead_letters(),
            faults: Fault::ALL
                .iter()
                .map(|&f| (f.name(), faults.get(f)))
                .collect(),
            outcomes: stats.outcomes(),
            errors: stats.errors(),
            broker: None,
        }
    }
}

impl RunReport {
    /// The report of one mode, from what was measured and what the ledger holds.
    pub fn new(
        mode: ModeName,
        workload: &Workload,
        measured: Measured,
        snapshot: &Snapshot,
        elapsed: Duration,
        unacked: u64,
    ) -> Self {
        let applied = &snapshot.applied;
        let effects = applied.iter().map(|&a| u64::from(a)).sum();
        let duplicate_effects = applied
            .iter()
            .map(|&a| u64::from(a.saturating_sub(1)))
            .sum();
        let lost = applied.iter().filter(|&&a| a == 0).count() as u64;
        let duplicates_outside_windows = (0u32..)
            .zip(applied)
            .map(|(i, &a)| {
                let windows = measured.windows_by_message.get(&i).copied().unwrap_or(0);
                u64::from(a.saturating_sub(1).saturating_sub(windows))
            })
            .sum();
        let window = measured.window;
        let messages = workload.transfers.len() as u64;
        Self {
            mode,
            messages,
            deliveries: measured.deliveries,
            duplicate_deliveries: measured.duplicate_deliveries,
            effects,
            duplicate_effects,
            lost,
            window_events: window.crashes + window.pause_takeovers + window.other,
            duplicates_outside_windows,
            msgs_per_s: (messages as f64 / elapsed.as_secs_f64().max(1e-9)).round(),
            elapsed_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            unacked,
            balances_match_effects: snapshot.balances
                == workload.balances(|i| applied.get(i).copied().unwrap_or(0)),
            balances_exact: snapshot.balances == workload.balances(|_| 1),
            total_conserved: snapshot.balances.iter().sum::<i64>() == workload.total(),
            window,
            takeovers: measured.takeovers,
            consumer_restarts: measured.consumer_restarts,
            dead_letters: measured.dead_letters,
            faults: measured.faults,
            outcomes: measured.outcomes,
            errors: measured.errors,
            broker: measured.broker,
        }
    }
}

/// The verdict on one mode.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// The mode.
    pub mode: ModeName,
    /// Whether every check of the mode held.
    pub ok: bool,
    /// What held, or what failed.
    pub detail: String,
}

/// Judges one mode: what idem promises for it (transactional: exactly once; store: nothing
/// lost and no duplicate without a window event), and for naive, that the faults did reach it.
pub fn check(run: &RunReport) -> Check {
    let mut failures = Vec::new();
    if run.unacked > 0 {
        failures.push(format!(
            "did not finish within --timeout-s ({} messages still unacked)",
            run.unacked
        ));
    }
    if !run.errors.is_empty() {
        failures.push(format!("harness errors: {}", run.errors.join("; ")));
    }
    if !run.total_conserved {
        failures.push("the total of balances changed".to_owned());
    }
    if !run.balances_match_effects {
        failures.push(
            "balances disagree with the applied transfers (a half-applied transfer)".to_owned(),
        );
    }
    if let Some(b) = &run.broker {
        let required = b.required;
        if required.kills && b.consumer_kills == 0 {
            failures.push(
                "no consumer process was killed: the kill fault did not work (raise \
                 --messages or lower --kill-interval-ms)"
                    .to_owned(),
            );
        }
        if required.restarts && b.broker_restarts == 0 {
            failures
                .push("the broker was never restarted: the restart fault did not work".to_owned());
        }
        if required.drops && b.connection_drops == 0 {
            failures.push(
                "no connection was dropped: the connection fault did not work (lower \
                 --cut-interval-ms)"
                    .to_owned(),
            );
        }
        if let Some(o) = &b.outbox {
            if required.kills && o.relay_kills == 0 {
                failures.push(
                    "no relay process was killed: the kill fault did not work (raise \
                     --messages or lower --kill-interval-ms)"
                        .to_owned(),
                );
            }
            if o.left > 0 {
                failures.push(format!(
                    "{} outbox rows were never published and marked sent",
                    o.left
                ));
            }
        }
    }
    let (dup, lost, win) = (run.duplicate_effects, run.lost, run.window_events);
    let summary = match run.mode {
        ModeName::Naive => {
            if lost > 0 {
                failures.push(format!(
                    "{lost} transfers never applied: the harness lost messages"
                ));
            }
            if dup == 0 {
                failures.push(
                    "no duplicate effect: the fault injection did not work (raise the fault \
                     rates or --messages)"
                        .to_owned(),
                );
            }
            format!("{dup} duplicate effects without idem: the faults reached the consumer")
        }
        ModeName::Store => {
            if lost > 0 {
                failures.push(format!("{lost} transfers lost"));
            }
            if dup > win {
                failures.push(format!(
                    "{dup} duplicate effects but only {win} window events: duplicates outside \
                     store mode's window"
                ));
            } else if run.duplicates_outside_windows > 0 {
                failures.push(format!(
                    "{} duplicate effects of messages that had no window event of their own",
                    run.duplicates_outside_windows
                ));
            }
            format!(
                "0 lost; {dup} duplicate effects <= {win} window events (crashes between the \
                 effect and `complete`, pauses that ended in a takeover, leases or completions \
                 lost after the effect), message by message"
            )
        }
        ModeName::Transactional => {
            if dup > 0 {
                failures.push(format!("{dup} duplicate effects"));
            }
            if lost > 0 {
                failures.push(format!("{lost} transfers lost"));
            }
            if !run.balances_exact {
                failures.push("balances differ from what the transfers imply".to_owned());
            }
            "exactly once: 0 duplicate and 0 lost effects, every balance exact".to_owned()
        }
    };
    let ok = failures.is_empty();
    Check {
        mode: run.mode,
        ok,
        detail: if ok { summary } else { failures.join("; ") },
    }
}

/// The whole run, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Every mode's checks held.
    pub ok: bool,
    /// The seed of the workload and of every fault decision.
    pub seed: u64,
    /// Transfers per mode.
    pub messages: u64,
    /// Accounts of the ledger.
    pub accounts: u32,
    /// Competing consumers (consumer processes with a broker).
    pub consumers: usize,
    /// The store (its URL, password redacted).
    pub store: String,
    /// The default store: a file in a temporary directory, gone when `verify` exits.
    #[serde(skip)]
    pub temporary_store: bool,
    /// One report per mode, in the order they ran.
    pub runs: Vec<RunReport>,
    /// One verdict per mode.
    pub checks: Vec<Check>,
    /// Modes that could not run on this store, with the reason.
    pub skipped: Vec<String>,
    /// The broker of a `--broker` run; absent in the embedded run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerInfo>,
    /// The master failed over during store mode (`--failover`), and what that lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_failover: Option<StoreFailover>,
}

/// A Redis Cluster master failed over while store mode ran (`idem verify --failover`), and what
/// it cost. Replication is asynchronous: what the old master acknowledged and its replica never
/// received is gone from the promoted replica.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreFailover {
    /// The master failed over (`host:port`).
    pub master: String,
    /// Its replica, promoted (`host:port`).
    pub promoted: String,
    /// How: the replica promoted as it was, or first cut off from its master for a while.
    pub how: String,
    /// The store's durability setting: `none`, or the `WAIT` after every write.
    pub durability: String,
    /// Transfers acked when the failover began.
    pub acked_before: u64,
    /// Transfers acked while the replica was cut off (0 without a cut).
    pub acked_while_cut: u64,
    /// From the takeover until the promoted replica saw itself master and the old one its
    /// replica, in milliseconds.
    pub took_ms: u64,
    /// From the takeover until the old master had synced as the new one's replica, in
    /// milliseconds (absent when it had not within 30 s).
    pub resynced_ms: Option<u64>,
    /// Store-mode transfers, all acked once their completion was acknowledged, whose completed
    /// record the store no longer had at the end: a copy delivered later would run again.
    pub records_lost: u64,
    /// Why the failover could not be done, if it could not.
    pub error: Option<String>,
}

impl StoreFailover {
    /// Whether the failover happened and lost no record.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.records_lost == 0
    }
}

/// Which broker a `--broker` run went through, and what could be done to it.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerInfo {
    /// `amqp`, `nats`, `mqtt` or `redis`.
    pub kind: &'static str,
    /// The broker's URL (password redacted).
    pub url: String,
    /// Whether `verify` started the broker itself (a private instance on a free port).
    pub private: bool,
    /// How the broker was restarted (`SIGKILL`, `SIGTERM`), or `null` when it could not be.
    pub restart: Option<&'static str>,
    /// What a reader should know: why no restart was possible, what the restart loses.
    pub note: String,
    /// Consumer processes per mode.
    pub consumer_processes: usize,
    /// Broker restarts, over the modes.
    pub broker_restarts: u64,
    /// Consumer processes killed, over the modes.
    pub consumer_kills: u64,
    /// Connection cuts, over the modes.
    pub connection_drops: u64,
}

impl Report {
    /// The human-readable form: the table, the faults injected, the checks, the verdict.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "idem verify: {} transfers between {} accounts, {} consumers, seed {}, store {}{}\n",
            self.messages,
            self.accounts,
            self.consumers,
            self.seed,
            self.store,
            if self.temporary_store {
                " (temporary)"
            } else {
                ""
            }
        );
        if let Some(b) = &self.broker {
            let restart = b.restart.map_or_else(
                || "no restarts".to_owned(),
                |how| format!("restarted with {how}"),
            );
            let _ = writeln!(
                out,
                "broker: {} {} ({}, {}); {} consumer processes per mode\n{}\n",
                b.kind,
                b.url,
                if b.private {
                    "private instance"
                } else {
                    "given server"
                },
                restart,
                b.consumer_processes,
                b.note
            );
        }
        let _ = writeln!(
            out,
            "{:<13} {:>9} {:>10} {:>11} {:>9} {:>11} {:>6} {:>7} {:>9}",
            "mode",
            "messages",
            "deliveries",
            "dup deliv.",
            "effects",
            "dup effects",
            "lost",
            "window",
            "msgs/s"
        );
        for r in &self.runs {
            let _ = writeln!(
                out,
                "{:<13} {:>9} {:>10} {:>11} {:>9} {:>11} {:>6} {:>7} {:>9.0}",
                r.mode.as_str(),
                r.messages,
                r.deliveries,
                r.duplicate_deliveries,
                r.effects,
                r.duplicate_effects,
                r.lost,
                r.window_events,
                r.msgs_per_s
            );
        }
        let _ = writeln!(out, "\nfaults injected:");
        // A run through a broker has no simulated lost acks, pauses...: only the faults some
        // run knows get a column.
        let faults: Vec<Fault> = Fault::ALL
            .into_iter()
            .filter(|f| self.runs.iter().any(|r| r.faults.contains_key(f.name())))
            .collect();
        let _ = write!(out, "{:<13}", "mode");
        for f in &faults {
            let _ = write!(out, " {:>w$}", f.header(), w = f.header().len().max(5));
        }
        let _ = writeln!(out);
        for r in &self.runs {
            let _ = write!(out, "{:<13}", r.mode.as_str());
            for f in &faults {
                let n = r.faults.get(f.name()).copied().unwrap_or(0);
                let _ = write!(out, " {:>w$}", n, w = f.header().len().max(5));
            }
            let _ = writeln!(out);
        }
        if self.runs.iter().any(|r| r.broker.is_some()) {
            let _ = writeln!(
                out,
                "\nbroker faults:\n{:<13} {:>14} {:>12} {:>16} {:>15} {:>16} {:>9} {:>14}",
                "mode",
                "consumer kills",
                "random kills",
                "connection drops",
                "broker restarts",
                "producer retries",
                "published",
                "broker dropped"
            );
            for r in &self.runs {
                if let Some(b) = &r.broker {
                    // Through the outbox the relays publish: see the outbox table below.
                    let producer = |n: u64| {
                        if b.outbox.is_some() {
                            "-".to_owned()
                        } else {
                            n.to_string()
                        }
                    };
                    let _ = writeln!(
                        out,
                        "{:<13} {:>14} {:>12} {:>16} {:>15} {:>16} {:>9} {:>14}",
                        r.mode.as_str(),
                        b.consumer_kills,
                        b.random_kills,
                        b.connection_drops,
                        b.broker_restarts,
                        producer(b.producer_retries),
                        producer(b.published),
                        producer(b.broker_dropped_duplicates)
                    );
                }
            }
        }
        if self
            .runs
            .iter()
            .any(|r| r.broker.as_ref().is_some_and(|b| b.outbox.is_some()))
        {
            let _ = writeln!(
                out,
                "\noutbox:\n{:<13} {:>6} {:>9} {:>11} {:>11} {:>6} {:>4}",
                "mode", "relays", "committed", "rolled back", "relay kills", "sent", "left"
            );
            for r in &self.runs {
                if let Some(o) = r.broker.as_ref().and_then(|b| b.outbox.as_ref()) {
                    let _ = writeln!(
                        out,
                        "{:<13} {:>6} {:>9} {:>11} {:>11} {:>6} {:>4}",
                        r.mode.as_str(),
                        o.relays,
                        o.committed,
                        o.rolled_back,
                        o.relay_kills,
                        o.sent,
                        o.left
                    );
                }
            }
        }
        if let Some(f) = &self.store_failover {
            let _ = writeln!(
                out,
                "\nstore failover: master {} -> replica {} ({}) after {} transfers acked; \
                 durability: {}",
                f.master, f.promoted, f.how, f.acked_before, f.durability
            );
            if f.error.is_none() {
                let resynced = f.resynced_ms.map_or_else(
                    || "the old master had not resynced within 30 s".to_owned(),
                    |ms| format!("the old master resynced as its replica in {ms} ms"),
                );
                let _ = writeln!(
                    out,
                    "  {} transfers acked while the replica was cut off; promoted in {} ms; {}",
                    f.acked_while_cut, f.took_ms, resynced
                );
            }
        }
        let _ = writeln!(out, "\nchecks:");
        for c in &self.checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            let _ = writeln!(out, "  {mark} {:<13} {}", c.mode.as_str(), c.detail);
        }
        if let Some(f) = &self.store_failover {
            let (mark, detail) = match (&f.error, f.records_lost) {
                (Some(e), _) => ("FAIL", format!("the failover could not be done: {e}")),
                (None, 0) => (
                    "ok  ",
                    "every acked transfer's completed record survived the failover".to_owned(),
                ),
                (None, n) => (
                    "FAIL",
                    format!(
                        "{n} completed records acknowledged by the old master were lost with \
                         it (asynchronous replication): a copy delivered later would run \
                         again; wait_replicas=1 in the store URL makes writes wait for a replica"
                    ),
                ),
            };
            let _ = writeln!(out, "  {mark} {:<13} {detail}", "failover");
        }
        for s in &self.skipped {
            let _ = writeln!(out, "  skip {s}");
        }
        let _ = writeln!(
            out,
            "\n{}",
            if self.ok {
                "verdict: OK (exactly once where idem promises it)"
            } else {
                "verdict: FAILED"
            }
        );
        let _ = writeln!(
            out,
            "window = window events: an effect applied and not recorded when its consumer \
             crashed, paused past its lease or lost it. Reproduce with --seed {}.",
            self.seed
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: ModeName, dup: u64, lost: u64, window: u64) -> RunReport {
        RunReport {
            mode,
            messages: 100,
            deliveries: 120,
            duplicate_deliveries: 20,
            effects: 100 - lost + dup,
            duplicate_effects: dup,
            lost,
            window_events: window,
            duplicates_outside_windows: dup.saturating_sub(window),
            msgs_per_s: 1.0,
            elapsed_s: 1.0,
            unacked: 0,
            balances_match_effects: true,
            balances_exact: dup == 0 && lost == 0,
            total_conserved: true,
            window: WindowEvents {
                crashes: window,
                pause_takeovers: 0,
                other: 0,
            },
            takeovers: 0,
            consumer_restarts: 0,
            dead_letters: 0,
            faults: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            errors: Vec::new(),
            broker: None,
        }
    }

    #[test]
    fn transactional_must_be_exactly_once() {
        assert!(check(&run(ModeName::Transactional, 0, 0, 0)).ok);
        assert!(!check(&run(ModeName::Transactional, 1, 0, 0)).ok);
        assert!(!check(&run(ModeName::Transactional, 0, 1, 0)).ok);
    }

    #[test]
    fn store_duplicates_need_window_events() {
        assert!(check(&run(ModeName::Store, 3, 0, 3)).ok);
        assert!(check(&run(ModeName::Store, 0, 0, 3)).ok);
        let c = check(&run(ModeName::Store, 4, 0, 3));
        assert!(
            !c.ok && c.detail.contains("only 3 window events"),
            "{}",
            c.detail
        );
        assert!(!check(&run(ModeName::Store, 0, 1, 0)).ok);
        // The totals agree, but one message was repeated without a window of its own.
        let mut r = run(ModeName::Store, 3, 0, 3);
        r.duplicates_outside_windows = 1;
        let c = check(&r);
        assert!(
            !c.ok && c.detail.contains("no window event of their own"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn naive_without_duplicates_means_no_faults_reached_it() {
        assert!(check(&run(ModeName::Naive, 5, 0, 0)).ok);
        let c = check(&run(ModeName::Naive, 0, 0, 0));
        assert!(!c.ok && c.detail.contains("fault injection did not work"));
    }

    #[test]
    fn a_broker_run_fails_when_a_required_fault_never_happened() {
        let with = |kills, restarts, drops, required| {
            let mut r = run(ModeName::Store, 0, 0, 0);
            r.broker = Some(BrokerFaults {
                broker_restarts: restarts,
                consumer_kills: kills,
                connection_drops: drops,
                required,
                ..BrokerFaults::default()
            });
            check(&r)
        };
        let all = RequiredFaults {
            kills: true,
            restarts: true,
            drops: true,
        };
        assert!(with(3, 1, 2, all).ok);
        let c = with(0, 1, 2, all);
        assert!(!c.ok && c.detail.contains("no consumer process was killed"));
        let c = with(3, 0, 2, all);
        assert!(
            !c.ok && c.detail.contains("never restarted"),
            "{}",
            c.detail
        );
        assert!(!with(3, 1, 0, all).ok);
        // A given server cannot be restarted: not required, not failed.
        let given = RequiredFaults {
            restarts: false,
            ..all
        };
        assert!(with(3, 0, 2, given).ok);
    }

    #[test]
    fn an_outbox_run_needs_relay_kills_and_every_row_sent() {
        let with = |relay_kills, left| {
            let mut r = run(ModeName::Transactional, 0, 0, 0);
            r.broker = Some(BrokerFaults {
                consumer_kills: 2,
                outbox: Some(OutboxFaults {
                    relays: 2,
                    committed: 100,
                    relay_kills,
                    sent: 100 - left,
                    left,
                    ..OutboxFaults::default()
                }),
                required: RequiredFaults {
                    kills: true,
                    ..RequiredFaults::default()
                },
                ..BrokerFaults::default()
            });
            check(&r)
        };
        assert!(with(1, 0).ok);
        let c = with(0, 0);
        assert!(!c.ok && c.detail.contains("no relay process was killed"));
        let c = with(1, 2);
        assert!(
            !c.ok && c.detail.contains("2 outbox rows were never published"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn broken_ledgers_and_unfinished_runs_fail() {
        let mut r = run(ModeName::Store, 0, 0, 0);
        r.total_conserved = false;
        assert!(!check(&r).ok);
        let mut r = run(ModeName::Store, 0, 0, 0);
        r.unacked = 3;
        assert!(!check(&r).ok);
        let mut r = run(ModeName::Transactional, 0, 0, 0);
        r.balances_match_effects = false;
        assert!(!check(&r).ok);
    }
}
