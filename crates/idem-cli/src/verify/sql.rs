//! `verify --store postgres://…` and `mysql://…`: a scratch place on the server for the run's
//! records and ledger, and the transactional ledgers of the two SQL stores.
//!
//! A verify run must not touch an application's tables, and must not need `idem migrate`
//! first: it creates its own (a PostgreSQL schema `idem_verify_<run>`, or MySQL tables
//! `idem_verify_<run>_*`) with the stores' own migrations, and drops them when it ends, whatever
//! happened.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use futures_util::FutureExt as _;
use idem::{Config, StoreError, StoreErrorKind};
use idem_mysql::MysqlStore;
use idem_postgres::PostgresStore;
use mysql_async::prelude::Queryable;

use super::ledger::{
    DieInTransaction, Settled, SimulatedCrash, Snapshot, TransactionalLedger, TransferJob,
};
use super::workload::{INITIAL_BALANCE, Workload};

/// The scratch schema (PostgreSQL) or table prefix (MySQL) of a run.
pub(crate) fn scratch_name(run_id: &str) -> String {
    format!("idem_verify_{run_id}")
}

/// Creates the scratch schema with idem's table in it, and connects to it.
pub(crate) async fn postgres_scratch(url: &str, run_id: &str) -> anyhow::Result<PostgresStore> {
    let builder = PostgresStore::builder(url).schema(scratch_name(run_id));
    builder
        .migrate()
        .await
        .context("creating verify's scratch schema")?;
    Ok(builder.connect().await?)
}

/// Drops the scratch schema and everything in it, on a connection of its own.
pub(crate) async fn drop_postgres_scratch(url: &str, run_id: &str) -> anyhow::Result<()> {
    crate::scratch::drop_postgres_schema(url, &scratch_name(run_id)).await
}

/// Creates the scratch records table, and a store on it.
pub(crate) async fn mysql_scratch(url: &str, run_id: &str) -> anyhow::Result<MysqlStore> {
    let store = MysqlStore::builder(url)
        .table(format!("{}_records", scratch_name(run_id)))
        .build()?;
    store
        .migrate()
        .await
        .context("creating verify's scratch table")?;
    Ok(store)
}

/// Drops every scratch table of the run.
pub(crate) async fn drop_mysql_scratch(store: &MysqlStore, run_id: &str) -> anyhow::Result<()> {
    let base = scratch_name(run_id);
    let tables = ["records", "accounts", "effects"].map(|t| format!("{base}_{t}"));
    crate::scratch::drop_mysql_tables(store.pool(), &tables).await
}

/// Runs a transactional call whose handler may die by [`SimulatedCrash`]: the panic unwinds out
/// of the store's call (which rolls the transaction back or closes its connection, as a killed
/// process's would be) and becomes an error; the consumer then crashes on `job.died`.
async fn surviving_crash<F>(call: F) -> Result<Settled, idem::Error>
where
    F: Future<Output = Result<Settled, idem::Error>>,
{
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(out) => out,
        Err(panic) if panic.is::<SimulatedCrash>() => Err(StoreError::new(
            StoreErrorKind::Unavailable,
            "simulated crash inside the transaction",
        )
        .into()),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn die_if(job: &TransferJob, at: DieInTransaction) {
    if job.die == Some(at) {
        job.died.store(true, Ordering::Relaxed);
        std::panic::panic_any(SimulatedCrash);
    }
}

/// The transactional ledger on PostgreSQL: two tables in the run's scratch schema, written
/// through [`PostgresStore::run_transactional`].
pub(crate) struct PostgresLedger {
    store: PostgresStore,
    schema: String,
    config: Config,
}

impl fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresLedger {
    pub(crate) fn new(store: PostgresStore, run_id: &str, config: Config) -> Self {
        Self {
            store,
            schema: scratch_name(run_id),
            config,
        }
    }
}

impl TransactionalLedger for PostgresLedger {
    async fn create(&self, workload: &Workload) -> anyhow::Result<()> {
        let s = &self.schema;
        let client = self.store.pool().get().await?;
        client
            .batch_execute(&format!(
                "CREATE TABLE \"{s}\".accounts (account int8 PRIMARY KEY, balance int8 NOT NULL);
                 CREATE TABLE \"{s}\".effects (transfer int8 PRIMARY KEY, applied int8 NOT NULL);
                 INSERT INTO \"{s}\".accounts SELECT a, {INITIAL_BALANCE}
                     FROM generate_series(0, {}) AS a;",
                i64::from(workload.accounts) - 1
            ))
            .await
            .context("creating the transactional ledger")?;
        Ok(())
    }

    async fn apply_once(&self, job: TransferJob) -> Result<Settled, idem::Error> {
        let (key, payload) = (job.key.clone(), job.payload.clone());
        let update = format!(
            "UPDATE \"{}\".accounts SET balance = balance + $2 WHERE account = $1",
            self.schema
        );
        let effect = format!(
            "INSERT INTO \"{}\".effects VALUES ($1, 1) \
             ON CONFLICT (transfer) DO UPDATE SET applied = effects.applied + 1",
            self.schema
        );
        let call = async {
            let outcome = self
                .store
                .run_transactional(&key, payload, &self.config, move |tx| {
                    Box::pin(async move {
                        die_if(&job, DieInTransaction::BeforeWrites);
                        let t = job.transfer;
                        let (from, to) = (i64::from(t.from), i64::from(t.to));
                        let index = i64::from(job.index);
                        for _ in 0..job.applications {
                            tx.execute(&update, &[&from, &-t.amount]).await?;
                            tx.execute(&update, &[&to, &t.amount]).await?;
                            tx.execute(&effect, &[&index]).await?;
                        }
                        die_if(&job, DieInTransaction::AfterWrites);
                        Ok::<_, tokio_postgres::Error>(())
                    })
                })
                .await?;
            Ok(Settled::of(&outcome))
        };
        surviving_crash(call).await
    }

    async fn snapshot(&self, workload: &Workload) -> anyhow::Result<Snapshot> {
        let s = &self.schema;
        let client = self.store.pool().get().await?;
        let mut balances = vec![0i64; workload.accounts as usize];
        let rows = client
            .query(
                &format!("SELECT account, balance FROM \"{s}\".accounts"),
                &[],
            )
            .await?;
        anyhow::ensure!(
            rows.len() == balances.len(),
            "ledger has {} accounts, expected {}",
            rows.len(),
            balances.len()
        );
        for row in rows {
            let account: i64 = row.try_get(0)?;
            *usize::try_from(account)
                .ok()
                .and_then(|a| balances.get_mut(a))
                .context("ledger row for an unknown account")? = row.try_get(1)?;
        }
        let mut applied = vec![0u32; workload.transfers.len()];
        let rows = client
            .query(
                &format!("SELECT transfer, applied FROM \"{s}\".effects"),
                &[],
            )
            .await?;
        for row in rows {
            let transfer: i64 = row.try_get(0)?;
            let n: i64 = row.try_get(1)?;
            *usize::try_from(transfer)
                .ok()
                .and_then(|t| applied.get_mut(t))
                .context("ledger row for an unknown transfer")? =
                u32::try_from(n).context("applied count out of range")?;
        }
        Ok(Snapshot { balances, applied })
    }
}

/// The transactional ledger on MySQL / MariaDB: two scratch tables next to the run's records
/// table, written through [`MysqlStore::run_transactional`].
pub(crate) struct MysqlLedger {
    store: MysqlStore,
    accounts: Arc<str>,
    effects: Arc<str>,
    config: Config,
}

impl fmt::Debug for MysqlLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlLedger")
            .field("accounts", &self.accounts)
            .finish_non_exhaustive()
    }
}

impl MysqlLedger {
    pub(crate) fn new(store: MysqlStore, run_id: &str, config: Config) -> Self {
        let base = scratch_name(run_id);
        Self {
            store,
            accounts: format!("{base}_accounts").into(),
            effects: format!("{base}_effects").into(),
            config,
        }
    }
}

impl TransactionalLedger for MysqlLedger {
    async fn create(&self, workload: &Workload) -> anyhow::Result<()> {
        let (a, e) = (&self.accounts, &self.effects);
        let mut conn = self.store.pool().get_conn().await?;
        conn.query_drop(format!(
            "CREATE TABLE `{a}` (account INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB"
        ))
        .await?;
        conn.query_drop(format!(
            "CREATE TABLE `{e}` (transfer INT PRIMARY KEY, applied INT NOT NULL) ENGINE=InnoDB"
        ))
        .await?;
        let values: Vec<String> = (0..workload.accounts)
            .map(|i| format!("({i}, {INITIAL_BALANCE})"))
            .collect();
        for chunk in values.chunks(1000) {
            conn.query_drop(format!("INSERT INTO `{a}` VALUES {}", chunk.join(",")))
                .await?;
        }
        Ok(())
    }

    async fn apply_once(&self, job: TransferJob) -> Result<Settled, idem::Error> {
        let (key, payload) = (job.key.clone(), job.payload.clone());
        let update = format!(
            "UPDATE `{}` SET balance = balance + ? WHERE account = ?",
            self.accounts
        );
        let effect = format!(
            "INSERT INTO `{}` VALUES (?, 1) ON DUPLICATE KEY UPDATE applied = applied + 1",
            self.effects
        );
        let call = async {
            let outcome = self
                .store
                .run_transactional(key, payload, self.config.clone(), move |tx| {
                    Box::pin(async move {
                        die_if(&job, DieInTransaction::BeforeWrites);
                        let t = job.transfer;
                        for _ in 0..job.applications {
                            tx.exec_drop(&update, (-t.amount, t.from)).await?;
                            tx.exec_drop(&update, (t.amount, t.to)).await?;
                            tx.exec_drop(&effect, (job.index,)).await?;
                        }
                        die_if(&job, DieInTransaction::AfterWrites);
                        Ok::<_, mysql_async::Error>(())
                    })
                })
                .await?;
            Ok(Settled::of(&outcome))
        };
        surviving_crash(call).await
    }

    async fn snapshot(&self, workload: &Workload) -> anyhow::Result<Snapshot> {
        let mut conn = self.store.pool().get_conn().await?;
        let mut balances = vec![0i64; workload.accounts as usize];
        let rows: Vec<(u32, i64)> = conn
            .query(format!("SELECT account, balance FROM `{}`", self.accounts))
            .await?;
        anyhow::ensure!(
            rows.len() == balances.len(),
            "ledger has {} accounts, expected {}",
            rows.len(),
            balances.len()
        );
        for (account, balance) in rows {
            *balances
                .get_mut(account as usize)
                .context("ledger row for an unknown account")? = balance;
        }
        let mut applied = vec![0u32; workload.transfers.len()];
        let rows: Vec<(u32, u32)> = conn
            .query(format!("SELECT transfer, applied FROM `{}`", self.effects))
            .await?;
        for (transfer, n) in rows {
            *applied
                .get_mut(transfer as usize)
                .context("ledger row for an unknown transfer")? = n;
        }
        Ok(Snapshot { balances, applied })
    }
}
