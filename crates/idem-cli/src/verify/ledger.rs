//! The ledgers `verify` applies transfers to, and the snapshot its checks read.
//!
//! Every ledger counts each *application* of each transfer (it does not deduplicate anything
//! itself), so duplicates and losses are measured: a transfer applied twice shows a count of 2.
//!
//! - [`MemoryLedger`]: in the verify process, outside any store, so it survives the simulated
//!   consumer crashes (naive and store modes).
//! - [`TransactionalLedger`]: tables in the same database as idem's records, written in the same
//!   transaction as the record (transactional mode). [`SqliteLedger`] implements it; SQL stores
//!   that gain a transactional mode implement it too.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

use anyhow::Context;
use idem::{Config, Disposition, Key, Outcome};
use idem_sqlite::SqliteStore;
use rusqlite::{Connection, params};

use super::workload::{INITIAL_BALANCE, Transfer, Workload};

/// What a ledger holds at the end of a run.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) balances: Vec<i64>,
    /// How many times each transfer was applied.
    pub(crate) applied: Vec<u32>,
}

/// A deliberate bug in the handler, to prove the checker catches it (`--sabotage`).
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Sabotage {
    /// Every 50th message's effect is applied twice by the handler that runs it.
    DoubleApply,
    /// Every 50th message is acked without its effect.
    SkipEffect,
}

impl Sabotage {
    /// How many times the handler applies message `i`'s effect.
    pub(crate) fn applications(sabotage: Option<Sabotage>, i: u32) -> u32 {
        match sabotage {
            Some(Sabotage::DoubleApply) if i % 50 == 0 => 2,
            Some(Sabotage::SkipEffect) if i % 50 == 0 => 0,
            _ => 1,
        }
    }
}

/// A ledger in process memory: balances and application counts as atomics, so applying a
/// transfer never waits and no lock is held across an `.await`.
#[derive(Debug)]
pub(crate) struct MemoryLedger {
    balances: Vec<AtomicI64>,
    applied: Vec<AtomicU32>,
}

impl MemoryLedger {
    pub(crate) fn new(workload: &Workload) -> Self {
        Self {
            balances: (0..workload.accounts)
                .map(|_| AtomicI64::new(INITIAL_BALANCE))
                .collect(),
            applied: (0..workload.transfers.len())
                .map(|_| AtomicU32::new(0))
                .collect(),
        }
    }

    /// Applies transfer `i` once more.
    pub(crate) fn apply(&self, i: u32, t: Transfer) {
        self.balances[t.from as usize].fetch_sub(t.amount, Ordering::Relaxed);
        self.balances[t.to as usize].fetch_add(t.amount, Ordering::Relaxed);
        self.applied[i as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            balances: self
                .balances
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            applied: self
                .applied
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// What became of one delivery through the executor or a transactional call: all a consumer
/// needs to ack, nack or dead-letter it, whatever the handler's types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settled {
    /// [`Outcome::kind`].
    pub(crate) kind: &'static str,
    pub(crate) disposition: Disposition,
}

impl Settled {
    pub(crate) fn of<T, E: fmt::Display>(outcome: &Outcome<T, E>) -> Self {
        Self {
            kind: outcome.kind(),
            disposition: outcome.disposition(),
        }
    }

    pub(crate) fn is_executed(&self) -> bool {
        self.kind == "executed"
    }
}

/// Where a transactional handler dies inside its transaction (a simulated crash: the store
/// rolls the transaction back, as a killed process's would be).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum DieInTransaction {
    BeforeWrites,
    AfterWrites,
}

/// The panic payload of a simulated crash; `verify`'s panic hook keeps it quiet.
#[derive(Debug)]
pub(crate) struct SimulatedCrash;

/// How a transactional handler dies when [`TransferJob::die`] says so: by default a
/// [`SimulatedCrash`] panic (the store rolls the transaction back); in a consumer process of
/// `verify --broker`, a hook that kills the whole process with SIGKILL in the middle of the
/// transaction, which SQLite must then recover from.
#[derive(Clone, Default)]
pub(crate) struct CrashHook(Option<Arc<dyn Fn() + Send + Sync>>);

impl CrashHook {
    /// A hook that runs `die` (which should not return).
    pub(crate) fn new(die: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(die)))
    }

    fn crash(&self) -> ! {
        if let Some(die) = &self.0 {
            die();
        }
        std::panic::panic_any(SimulatedCrash)
    }
}

impl fmt::Debug for CrashHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "CrashHook(custom)"
        } else {
            "CrashHook(panic)"
        })
    }
}

/// One transfer for [`TransactionalLedger::apply_once`].
#[derive(Clone, Debug)]
pub(crate) struct TransferJob {
    pub(crate) key: Key,
    pub(crate) payload: String,
    pub(crate) index: u32,
    pub(crate) transfer: Transfer,
    /// How many times the handler applies the effect (1, or a sabotage's 0 or 2).
    pub(crate) applications: u32,
    pub(crate) die: Option<DieInTransaction>,
    /// Set when the handler died as told by `die`.
    pub(crate) died: Arc<AtomicBool>,
    /// How it dies.
    pub(crate) crash: CrashHook,
}

/// A ledger whose writes commit in the same transaction as idem's record: transactional mode.
///
/// A store that offers a transactional mode (SQLite now; PostgreSQL and MySQL next) implements
/// this over its own transactional API, and `verify` runs the same checks on it.
pub(crate) trait TransactionalLedger: Send + Sync + 'static {
    /// A fresh ledger for a run: every account at [`INITIAL_BALANCE`].
    ///
    /// # Errors
    /// When the database cannot be written.
    fn create(&self, workload: &Workload) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Applies the transfer under its key through the store's transactional mode: the ledger
    /// writes and the record commit together, or neither does.
    ///
    /// # Errors
    /// As the store's transactional call (fail closed: the caller does not ack).
    fn apply_once(
        &self,
        job: TransferJob,
    ) -> impl Future<Output = Result<Settled, idem::Error>> + Send;

    /// Reads the balances and application counts.
    ///
    /// # Errors
    /// When the database cannot be read.
    fn snapshot(
        &self,
        workload: &Workload,
    ) -> impl Future<Output = anyhow::Result<Snapshot>> + Send;
}

/// The transactional ledger on a [`SqliteStore`]: two tables in the store's own database, keyed
/// by a run id so that runs sharing a file do not mix.
pub(crate) struct SqliteLedger {
    store: SqliteStore,
    path: PathBuf,
    run: Arc<str>,
    config: Config,
}

impl fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteLedger")
            .field("path", &self.path)
            .field("run", &self.run)
            .finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idem_verify_accounts (
    run TEXT NOT NULL, account INTEGER NOT NULL, balance INTEGER NOT NULL,
    PRIMARY KEY (run, account)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idem_verify_effects (
    run TEXT NOT NULL, transfer INTEGER NOT NULL, applied INTEGER NOT NULL,
    PRIMARY KEY (run, transfer)) WITHOUT ROWID;
";

impl SqliteLedger {
    /// A ledger in the database of `store` (which must be a file: the ledger is created and
    /// read back through a second connection).
    pub(crate) fn new(store: SqliteStore, run: &str, config: Config) -> anyhow::Result<Self> {
        let path = store
            .path()
            .context("the transactional ledger needs a SQLite file, not an in-memory database")?
            .to_owned();
        Ok(Self {
            store,
            path,
            run: run.into(),
            config,
        })
    }

    fn connect(path: &Path) -> anyhow::Result<Connection> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening {} for the ledger", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(conn)
    }
}

/// The handler of transactional mode: the transfer's writes, on the store's connection, inside
/// the transaction that also writes the record.
fn apply_in_transaction(conn: &Connection, run: &str, job: &TransferJob) -> rusqlite::Result<()> {
    if job.die == Some(DieInTransaction::BeforeWrites) {
        job.died.store(true, Ordering::Relaxed);
        job.crash.crash();
    }
    let t = job.transfer;
    for _ in 0..job.applications {
        let mut update = conn.prepare_cached(
            "UPDATE idem_verify_accounts SET balance = balance + ?3 WHERE run = ?1 AND account = ?2",
        )?;
        update.execute(params![run, t.from, -t.amount])?;
        update.execute(params![run, t.to, t.amount])?;
        conn.prepare_cached(
            "INSERT INTO idem_verify_effects (run, transfer, applied) VALUES (?1, ?2, 1) \
             ON CONFLICT (run, transfer) DO UPDATE SET applied = applied + 1",
        )?
        .execute(params![run, job.index])?;
    }
    if job.die == Some(DieInTransaction::AfterWrites) {
        job.died.store(true, Ordering::Relaxed);
        job.crash.crash();
    }
    Ok(())
}

impl TransactionalLedger for SqliteLedger {
    async fn create(&self, workload: &Workload) -> anyhow::Result<()> {
        let (path, run, accounts) = (self.path.clone(), Arc::clone(&self.run), workload.accounts);
        tokio::task::spawn_blocking(move || {
            let mut conn = Self::connect(&path)?;
            conn.execute_batch(SCHEMA)?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM idem_verify_accounts WHERE run = ?1",
                params![&*run],
            )?;
            tx.execute(
                "DELETE FROM idem_verify_effects WHERE run = ?1",
                params![&*run],
            )?;
            {
                let mut insert = tx.prepare(
                    "INSERT INTO idem_verify_accounts (run, account, balance) VALUES (?1, ?2, ?3)",
                )?;
                for a in 0..accounts {
                    insert.execute(params![&*run, a, INITIAL_BALANCE])?;
                }
            }
            tx.commit()?;
            anyhow::Ok(())
        })
        .await?
        .context("creating the transactional ledger")
    }

    async fn apply_once(&self, job: TransferJob) -> Result<Settled, idem::Error> {
        let run = Arc::clone(&self.run);
        let (key, payload) = (job.key.clone(), job.payload.clone());
        let outcome = self
            .store
            .run_transactional(key, payload, self.config.clone(), move |conn| {
                apply_in_transaction(conn, &run, &job)
            })
            .await?;
        Ok(Settled::of(&outcome))
    }

    async fn snapshot(&self, workload: &Workload) -> anyhow::Result<Snapshot> {
        let (path, run) = (self.path.clone(), Arc::clone(&self.run));
        let (accounts, transfers) = (workload.accounts as usize, workload.transfers.len());
        tokio::task::spawn_blocking(move || {
            let conn = Self::connect(&path)?;
            let mut balances = vec![0i64; accounts];
            let mut stmt =
                conn.prepare("SELECT account, balance FROM idem_verify_accounts WHERE run = ?1")?;
            let mut rows = stmt.query(params![&*run])?;
            let mut seen = 0;
            while let Some(row) = rows.next()? {
                let account: u32 = row.get(0)?;
                *balances
                    .get_mut(account as usize)
                    .context("ledger row for an unknown account")? = row.get(1)?;
                seen += 1;
            }
            anyhow::ensure!(
                seen == accounts,
                "ledger has {seen} accounts, expected {accounts}"
            );
            let mut applied = vec![0u32; transfers];
            let mut stmt =
                conn.prepare("SELECT transfer, applied FROM idem_verify_effects WHERE run = ?1")?;
            let mut rows = stmt.query(params![&*run])?;
            while let Some(row) = rows.next()? {
                let transfer: u32 = row.get(0)?;
                *applied
                    .get_mut(transfer as usize)
                    .context("ledger row for an unknown transfer")? = row.get(1)?;
            }
            Ok(Snapshot { balances, applied })
        })
        .await?
        .context("reading the transactional ledger")
    }
}
