//! The ledgers a verify run applies transfers to, and the snapshot its checks read.
//!
//! Every ledger counts each *application* of each transfer (it does not deduplicate anything
//! itself), so duplicates and losses are measured: a transfer applied twice shows a count of 2.
//!
//! - [`Effect`]: what the handler of naive and store mode does, outside the store.
//!   [`MemoryLedger`] implements it in the verify process, so that it survives the simulated
//!   consumer crashes; a project can implement it for its own effect.
//! - [`TransactionalLedger`]: tables in the same database as idem's records, written in the same
//!   transaction as the record (transactional mode). [`SqliteLedger`] and, in [`crate::sql`],
//!   `PostgresLedger` and `MysqlLedger` implement it; a project implements it for its own
//!   [`Transactional`] store.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

use idem::{Config, Key, Transactional, TxFuture};

use crate::workload::{INITIAL_BALANCE, Transfer, Workload};

/// What a ledger holds at the end of a run.
#[derive(Debug)]
pub struct Snapshot {
    /// Each account's balance.
    pub balances: Vec<i64>,
    /// How many times each transfer was applied.
    pub applied: Vec<u32>,
}

/// A deliberate bug in the handler, to prove the checker catches it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sabotage {
    /// Every 50th message's effect is applied twice by the handler that runs it.
    DoubleApply,
    /// Every 50th message is acked without its effect.
    SkipEffect,
}

impl Sabotage {
    /// How many times the handler applies message `i`'s effect.
    pub fn applications(sabotage: Option<Sabotage>, i: u32) -> u32 {
        match sabotage {
            Some(Sabotage::DoubleApply) if i % 50 == 0 => 2,
            Some(Sabotage::SkipEffect) if i % 50 == 0 => 0,
            _ => 1,
        }
    }
}

/// The effect of naive and store mode's handler: applies a transfer somewhere outside idem's
/// store, and counts it. It must count every application (never deduplicate), and survive the
/// simulated crashes of the consumers (which abort their tasks, nothing else).
pub trait Effect: Send + Sync + 'static {
    /// Applies transfer `index` once more.
    fn apply(&self, index: u32, transfer: Transfer) -> impl Future<Output = ()> + Send;

    /// Reads the balances and application counts.
    ///
    /// # Errors
    /// When the ledger cannot be read.
    fn snapshot(
        &self,
        workload: &Workload,
    ) -> impl Future<Output = anyhow::Result<Snapshot>> + Send;
}

/// A ledger in process memory: balances and application counts as atomics, so applying a
/// transfer never waits and no lock is held across an `.await`.
#[derive(Debug)]
pub struct MemoryLedger {
    balances: Vec<AtomicI64>,
    applied: Vec<AtomicU32>,
}

impl MemoryLedger {
    /// A fresh ledger for `workload`: every account at [`INITIAL_BALANCE`].
    pub fn new(workload: &Workload) -> Self {
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
    pub fn apply_now(&self, i: u32, t: Transfer) {
        self.balances[t.from as usize].fetch_sub(t.amount, Ordering::Relaxed);
        self.balances[t.to as usize].fetch_add(t.amount, Ordering::Relaxed);
        self.applied[i as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The balances and counts now.
    pub fn snapshot_now(&self) -> Snapshot {
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

impl Effect for MemoryLedger {
    async fn apply(&self, index: u32, transfer: Transfer) {
        self.apply_now(index, transfer);
    }

    async fn snapshot(&self, _workload: &Workload) -> anyhow::Result<Snapshot> {
        Ok(self.snapshot_now())
    }
}

impl<E: Effect> Effect for Arc<E> {
    fn apply(&self, index: u32, transfer: Transfer) -> impl Future<Output = ()> + Send {
        (**self).apply(index, transfer)
    }

    fn snapshot(
        &self,
        workload: &Workload,
    ) -> impl Future<Output = anyhow::Result<Snapshot>> + Send {
        (**self).snapshot(workload)
    }
}

/// Where a transactional handler dies inside its transaction (a simulated crash: the store
/// rolls the handler's writes back, as a killed process's would be).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DieInTransaction {
    /// Before the transfer's writes.
    BeforeWrites,
    /// After them, before the commit.
    AfterWrites,
}

/// The panic payload of a simulated crash; [`quiet_simulated_crashes`] keeps it quiet.
#[derive(Debug)]
pub struct SimulatedCrash;

/// Simulated crashes in transactional mode are panics inside the store's transaction (which
/// undoes the handler's writes); the default panic hook would print each one. This installs,
/// once per process, a hook that stays quiet about them and hands every other panic to the
/// hook that was there before.
pub fn quiet_simulated_crashes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<SimulatedCrash>() {
                default(info);
            }
        }));
    });
}

/// How a transactional handler dies when [`TransferJob::die`] says so: it runs its hook (the
/// in-process harness signals the consumer's crash; a consumer process of `verify --broker`
/// kills itself with SIGKILL there, in the middle of the transaction), then panics with
/// [`SimulatedCrash`], which undoes the handler's writes.
#[derive(Clone, Default)]
pub struct CrashHook(Option<Arc<dyn Fn() + Send + Sync>>);

impl CrashHook {
    /// A hook that runs `die` (which may return: a [`SimulatedCrash`] panic follows).
    pub fn new(die: impl Fn() + Send + Sync + 'static) -> Self {
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

/// One transfer for [`TransactionalLedger::apply`].
#[derive(Clone, Debug)]
pub struct TransferJob {
    /// The idem key of the transfer's message.
    pub key: Key,
    /// The message's payload.
    pub payload: String,
    /// The transfer's index in the workload.
    pub index: u32,
    /// The transfer.
    pub transfer: Transfer,
    /// How many times the handler applies the effect (1, or a sabotage's 0 or 2).
    pub applications: u32,
    /// Where the handler dies, if it does.
    pub die: Option<DieInTransaction>,
    /// Set when the handler died as told by `die`.
    pub died: Arc<AtomicBool>,
    /// How it dies.
    pub crash: CrashHook,
}

impl TransferJob {
    /// Dies here if `die` says so: sets `died`, runs the crash hook, panics.
    pub fn die_if(&self, at: DieInTransaction) {
        if self.die == Some(at) {
            self.died.store(true, Ordering::Relaxed);
            self.crash.crash();
        }
    }
}

/// A ledger whose writes commit in the same transaction as idem's record: transactional mode.
///
/// A store with a transactional mode ([`idem::Transactional`]) implements this with its own
/// SQL, and the harness runs the same checks on it. `apply` is the handler the consumer
/// runtime calls inside the transaction; it must write through `tx` only.
pub trait TransactionalLedger: Send + Sync + 'static {
    /// The store whose transactions carry the ledger's writes.
    type Store: Transactional + Clone;

    /// The store.
    fn store(&self) -> &Self::Store;

    /// The configuration of transactional mode: retention, attempt limit (verify sets none,
    /// so that injected crashes never exhaust a transfer), retry backoff, metrics name.
    fn config(&self) -> &Config;

    /// A fresh ledger for a run: every account at [`INITIAL_BALANCE`].
    ///
    /// # Errors
    /// When the database cannot be written.
    fn create(&self, workload: &Workload) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The transfer's writes on `tx`, the transaction that also writes its record:
    /// `job.applications` times, dying (with [`TransferJob::die_if`]) before and after them.
    /// The future is polled inside the transaction; on SQLite it must be ready at its first
    /// poll (synchronous SQL on the connection only).
    fn apply<'a>(
        &'a self,
        tx: &'a mut <Self::Store as Transactional>::Tx,
        job: &'a TransferJob,
    ) -> TxFuture<'a, (), String>;

    /// Reads the balances and application counts.
    ///
    /// # Errors
    /// When the database cannot be read.
    fn snapshot(
        &self,
        workload: &Workload,
    ) -> impl Future<Output = anyhow::Result<Snapshot>> + Send;
}

#[cfg(feature = "sqlite")]
pub use self::sqlite::{SqliteLedger, apply_in_transaction};

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::fmt;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use anyhow::Context;
    use idem::{Config, TxFuture};
    use idem_sqlite::SqliteStore;
    use rusqlite::{Connection, params};

    use super::{DieInTransaction, Snapshot, TransactionalLedger, TransferJob};
    use crate::workload::{INITIAL_BALANCE, Workload};

    /// The transactional ledger on a [`SqliteStore`]: two tables in the store's own database,
    /// keyed by a run id so that runs sharing a file do not mix.
    pub struct SqliteLedger {
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
        /// read back through a second connection), for run `run`, with transactional mode's
        /// `config`.
        ///
        /// # Errors
        /// When the store is an in-memory database.
        pub fn new(store: SqliteStore, run: &str, config: Config) -> anyhow::Result<Self> {
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

    /// The handler of transactional mode on SQLite: the transfer's writes, on the store's
    /// connection, inside the transaction that also writes the record.
    ///
    /// # Errors
    /// As the SQL statements.
    pub fn apply_in_transaction(
        conn: &Connection,
        run: &str,
        job: &TransferJob,
    ) -> rusqlite::Result<()> {
        job.die_if(DieInTransaction::BeforeWrites);
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
        job.die_if(DieInTransaction::AfterWrites);
        Ok(())
    }

    impl TransactionalLedger for SqliteLedger {
        type Store = SqliteStore;

        fn store(&self) -> &SqliteStore {
            &self.store
        }

        fn config(&self) -> &Config {
            &self.config
        }

        async fn create(&self, workload: &Workload) -> anyhow::Result<()> {
            let (path, run, accounts) =
                (self.path.clone(), Arc::clone(&self.run), workload.accounts);
            tokio::task::spawn_blocking(move || {
                let mut conn = Self::connect(&path)?;
                conn.execute_batch(SCHEMA)?;
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
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

        fn apply<'a>(
            &'a self,
            tx: &'a mut Connection,
            job: &'a TransferJob,
        ) -> TxFuture<'a, (), String> {
            // Inside the future: a simulated crash must panic where the runtime catches it.
            Box::pin(
                async move { apply_in_transaction(tx, &self.run, job).map_err(|e| e.to_string()) },
            )
        }

        async fn snapshot(&self, workload: &Workload) -> anyhow::Result<Snapshot> {
            let (path, run) = (self.path.clone(), Arc::clone(&self.run));
            let (accounts, transfers) = (workload.accounts as usize, workload.transfers.len());
            tokio::task::spawn_blocking(move || {
                let conn = Self::connect(&path)?;
                let mut balances = vec![0i64; accounts];
                let mut stmt = conn
                    .prepare("SELECT account, balance FROM idem_verify_accounts WHERE run = ?1")?;
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
                let mut stmt = conn
                    .prepare("SELECT transfer, applied FROM idem_verify_effects WHERE run = ?1")?;
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
}
