//! `idem verify --broker … --outbox`: the transfers enter the broker through the transactional
//! outbox instead of `verify`'s producer.
//!
//! The producer commits each transfer's message (its id fixed once, `t-NNNNNN`) in one SQLite
//! transaction with a business row; a planned share of those transactions is rolled back
//! first (their message must never be published) and committed again. Relay **processes**
//! (`idem relay`, the binary users run) publish the rows through `verify`'s proxy, so they see
//! the same connection cuts and broker restarts as the consumers; `verify` SIGKILLs them at
//! random, which is how a message is published twice: a relay killed after the broker's
//! confirmation and before its mark leaves the row to another relay once the lease runs out,
//! and it goes out again with the same id. The consumers' idem must absorb those copies.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use idem_outbox::{DbUrl, NewMessage, OutboxDb, Table};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::Produced;
use crate::verify::workload::Workload;

/// Relay processes per mode.
pub(crate) const RELAYS: usize = 2;
/// The share of producer transactions rolled back before being committed again.
const ROLLBACK_RATE: f64 = 0.05;
/// How long a relay's claim lasts: a killed relay's rows go out again after it.
const LEASE: &str = "2s";
/// A relay that fails this many times in a row on its own (not killed) stops the run.
const MAX_FAILURES: u32 = 15;

/// What the producer did, readable while it runs.
#[derive(Debug, Default)]
pub(crate) struct FeedCounters {
    pub(crate) committed: AtomicU64,
    pub(crate) rolled_back: AtomicU64,
}

/// One mode's outbox: a SQLite file of its own with the outbox table and a business table.
pub(crate) struct Feed {
    path: PathBuf,
    table: Table,
    destination: String,
    pub(crate) counters: Arc<FeedCounters>,
}

impl Feed {
    /// Creates the mode's outbox database in `dir`.
    pub(crate) fn create(dir: &Path, mode: &str, destination: String) -> anyhow::Result<Self> {
        let path = dir.join(format!("outbox-{mode}.db"));
        let table = Table::new(idem_outbox::DEFAULT_TABLE)?;
        let conn = rusqlite::Connection::open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS transfers (id INTEGER PRIMARY KEY)",
        )?;
        idem_outbox::sqlite::migrate(&conn, &table)?;
        Ok(Self {
            path,
            table,
            destination,
            counters: Arc::new(FeedCounters::default()),
        })
    }

    fn url(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    /// Commits every transfer's message, one transaction each (a planned share rolled back
    /// once first), then waits until the relays have published and marked every row, or
    /// `deadline`.
    pub(crate) fn produce(
        &self,
        workload: Arc<Workload>,
        seed: u64,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Produced> + Send + 'static {
        let (path, table, destination, counters, url) = (
            self.path.clone(),
            self.table.clone(),
            self.destination.clone(),
            Arc::clone(&self.counters),
            self.url(),
        );
        async move {
            let mut produced = Produced::default();
            let enqueue = tokio::task::spawn_blocking(move || {
                enqueue_all(&path, &table, &destination, &workload, seed, &counters)
            });
            match enqueue.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    produced.errors.push(format!("outbox producer: {e:#}"));
                    return produced;
                }
                Err(e) => {
                    produced.errors.push(format!("outbox producer task: {e}"));
                    return produced;
                }
            }
            // Done when the relays have marked every row sent.
            loop {
                match pending(&url).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        produced.errors.push(format!("reading the outbox: {e:#}"));
                        break;
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            produced
        }
    }

    /// Rows sent, and rows left pending or dead.
    pub(crate) async fn counts(&self) -> anyhow::Result<(u64, u64)> {
        let s = stats(&self.url()).await?;
        Ok((s.sent, s.pending + s.dead))
    }
}

/// What the outbox at `url` holds.
async fn stats(url: &str) -> anyhow::Result<idem_outbox::OutboxStats> {
    let table = Table::new(idem_outbox::DEFAULT_TABLE)?;
    let db = OutboxDb::connect(&DbUrl::parse(url)?, table).await?;
    let stats = db.stats().await;
    db.close().await;
    Ok(stats?)
}

/// Rows not yet sent; an error once a row went dead (the relays retry a broker outage for a
/// thousand attempts: a dead row means something is broken).
async fn pending(url: &str) -> anyhow::Result<u64> {
    let s = stats(url).await?;
    if s.dead > 0 {
        bail!("{} outbox rows went dead", s.dead);
    }
    Ok(s.pending)
}

fn enqueue_all(
    path: &Path,
    table: &Table,
    destination: &str,
    workload: &Workload,
    seed: u64,
    counters: &FeedCounters,
) -> anyhow::Result<()> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 0..workload.transfers.len() as u32 {
        let t = workload.transfers[i as usize];
        // The debited account orders the messages: one account's transfers are published
        // one at a time, in the order they were committed.
        let message = NewMessage::new(destination, workload.payload(i).into_bytes())
            .with_id(Workload::message_id(i))
            .with_key(format!("account-{}", t.from));
        let rollback = rng.f64() < ROLLBACK_RATE;
        for commit in [!rollback, true] {
            let tx = conn.transaction()?;
            tx.execute("INSERT INTO transfers (id) VALUES (?1)", [i])?;
            idem_outbox::sqlite::enqueue(&tx, table, &message)?;
            if commit {
                tx.commit()?;
                counters.committed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            tx.rollback()?;
            counters.rolled_back.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

struct Slot {
    child: Option<Child>,
    restart_at: Option<Instant>,
    failures: u32,
    spawned: u32,
}

/// The relay processes of one mode, restarted when they die, as a supervisor would.
pub(crate) struct Relays {
    exe: PathBuf,
    db: String,
    to: String,
    dir: PathBuf,
    prefix: String,
    slots: Vec<Slot>,
    rng: fastrand::Rng,
    /// Processes `verify` SIGKILLed.
    pub(crate) kills: u64,
    pub(crate) errors: Vec<String>,
}

impl Relays {
    /// Starts `n` relays of `feed` publishing to `to` (through the proxy).
    pub(crate) fn start(
        feed: &Feed,
        to: &str,
        dir: &Path,
        mode: &str,
        n: usize,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let mut relays = Self {
            exe: std::env::current_exe().context("finding the idem executable")?,
            db: feed.url(),
            to: to.to_owned(),
            dir: dir.to_owned(),
            prefix: format!("relay-{mode}"),
            slots: (0..n)
                .map(|_| Slot {
                    child: None,
                    restart_at: None,
                    failures: 0,
                    spawned: 0,
                })
                .collect(),
            rng: fastrand::Rng::with_seed(seed),
            kills: 0,
            errors: Vec::new(),
        };
        for slot in 0..n {
            relays.spawn(slot)?;
        }
        Ok(relays)
    }

    fn err_path(&self, slot: usize, n: u32) -> PathBuf {
        self.dir.join(format!("{}-{slot}-{n:03}.err", self.prefix))
    }

    fn spawn(&mut self, slot: usize) -> anyhow::Result<()> {
        let n = self.slots[slot].spawned + 1;
        let err = self.err_path(slot, n);
        let stderr =
            std::fs::File::create(&err).with_context(|| format!("creating {}", err.display()))?;
        // The URLs go in the environment (`idem relay` reads them there): a password never
        // shows in the process list.
        let child = Command::new(&self.exe)
            .env("IDEM_OUTBOX_DB", &self.db)
            .env("IDEM_TO", &self.to)
            .args([
                "relay",
                "--batch",
                "16",
                "--lease",
                LEASE,
                "--publish-timeout",
                "1s",
                "--poll-interval",
                "50ms",
                "--max-attempts",
                "1000",
                "--retry-delay",
                "50ms",
                "--max-retry-delay",
                "1s",
                "--retention",
                "off",
                "--stats-interval",
                "0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting a relay process")?;
        let s = &mut self.slots[slot];
        s.child = Some(child);
        s.restart_at = None;
        s.spawned = n;
        Ok(())
    }

    /// Reaps dead relays and starts the ones due again; fails when one keeps failing on its
    /// own.
    pub(crate) fn poll(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            let exited = match self.slots[slot].child.as_mut() {
                Some(c) => c.try_wait().context("waiting for a relay process")?,
                None => None,
            };
            if let Some(status) = exited {
                self.slots[slot].child = None;
                if status.signal() == Some(9) {
                    self.slots[slot].failures = 0;
                    let pause = Duration::from_millis(self.rng.u64(50..=300));
                    self.slots[slot].restart_at = Some(now + pause);
                    continue;
                }
                let spawned = self.slots[slot].spawned;
                let tail = super::fleet::tail(&self.err_path(slot, spawned));
                let s = &mut self.slots[slot];
                s.failures += 1;
                let what = format!("relay process (slot {slot}) exited with {status}: {tail}");
                if s.failures >= MAX_FAILURES {
                    bail!("{what} (failed {MAX_FAILURES} times in a row; giving up)");
                }
                // `idem relay` exits with status 69 when it cannot reach its broker or its
                // outbox at start (as `idem consume` does), for its supervisor to start it
                // again: expected while the broker restarts or the proxy cuts connections.
                // A handshake that the proxy cut half-way may read as another failure to
                // connect ("cannot connect to", status 1). Anything else is an error of the run.
                let unreachable = status.code() == Some(i32::from(crate::exit::UNAVAILABLE))
                    || tail.contains("cannot connect to");
                if !unreachable && self.errors.len() < 10 {
                    self.errors.push(what);
                }
                s.restart_at = Some(now + Duration::from_millis(100 * u64::from(s.failures)));
            }
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot].restart_at.is_some_and(|at| at <= now) {
                self.spawn(slot)?;
            }
        }
        Ok(())
    }

    /// SIGKILLs one running relay chosen at random; returns whether there was one.
    pub(crate) fn kill_random(&mut self) -> bool {
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].child.is_some())
            .collect();
        if live.is_empty() {
            return false;
        }
        let slot = live[self.rng.usize(..live.len())];
        let Some(child) = self.slots[slot].child.as_mut() else {
            return false;
        };
        if child.start_kill().is_err() {
            return false;
        }
        self.kills += 1;
        true
    }

    /// Stops every relay with SIGTERM (a relay finishes its batch and exits), waiting up to
    /// `grace`, then SIGKILLs the rest.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        for s in &mut self.slots {
            s.restart_at = None;
            if let Some(pid) = s
                .child
                .as_ref()
                .and_then(Child::id)
                .and_then(|id| rustix::process::Pid::from_raw(id as i32))
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + grace;
        for s in &mut self.slots {
            if let Some(mut child) = s.child.take() {
                if tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
    }
}
