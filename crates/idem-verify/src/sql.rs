//! The transactional ledgers of the SQL server stores: [`PostgresLedger`] (feature `postgres`)
//! and [`MysqlLedger`] (feature `mysql`). Each keeps two tables (postings, effects) in a place
//! of the run's own (a PostgreSQL schema, or MySQL tables with the run's prefix) that the
//! caller created and drops.
//!
//! The ledger is a **journal**: each application of a transfer inserts its two postings (the
//! debit and the credit) and counts itself in `effects`; a balance is the initial balance plus
//! the sum of the account's postings. Nothing is updated in place, so concurrent transactions
//! never wait for each other's row locks. (A ledger of balance rows updated in place deadlocks
//! under batches: two batch transactions that move money between the same accounts in
//! opposite orders wait for each other, and PostgreSQL breaks the cycle only after its
//! `deadlock_timeout`, one second, with an error; MySQL at once, with an error. Those waits
//! and retries measured the test's ledger, not idem.)

#[cfg(feature = "postgres")]
pub use self::postgres::PostgresLedger;

#[cfg(feature = "mysql")]
pub use self::mysql::MysqlLedger;

/// The scratch schema (PostgreSQL) or table prefix (MySQL) of a run.
pub fn scratch_name(run_id: &str) -> String {
    format!("idem_verify_{run_id}")
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::fmt;
    use std::sync::Arc;

    use anyhow::Context;
    use idem::{Config, TxFuture};
    use idem_postgres::{PostgresStore, TxClient};

    use super::scratch_name;
    use crate::ledger::{DieInTransaction, Snapshot, TransactionalLedger, TransferJob};
    use crate::workload::{INITIAL_BALANCE, Workload};

    /// The transactional ledger on PostgreSQL: two tables in the run's scratch schema
    /// (`idem_verify_<run>`, where the run's records are), written through the transaction of
    /// [`idem::Transactional`], one statement per application.
    pub struct PostgresLedger {
        store: PostgresStore,
        schema: String,
        apply: Arc<str>,
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
        /// The ledger of run `run_id` on `store`, with transactional mode's `config`.
        pub fn new(store: PostgresStore, run_id: &str, config: Config) -> Self {
            let schema = scratch_name(run_id);
            Self {
                apply: format!(
                    "WITH posted AS (INSERT INTO \"{schema}\".postings VALUES \
                     ($1, $2, $3), ($1, $4, $5)) \
                     INSERT INTO \"{schema}\".effects VALUES ($1, 1) \
                     ON CONFLICT (transfer) DO UPDATE SET applied = effects.applied + 1"
                )
                .into(),
                store,
                schema,
                config,
            }
        }
    }

    impl TransactionalLedger for PostgresLedger {
        type Store = PostgresStore;

        fn store(&self) -> &PostgresStore {
            &self.store
        }

        fn config(&self) -> &Config {
            &self.config
        }

        async fn create(&self, _workload: &Workload) -> anyhow::Result<()> {
            let s = &self.schema;
            let client = self.store.pool().get().await?;
            client
                .batch_execute(&format!(
                    "CREATE TABLE \"{s}\".postings \
                         (transfer int8 NOT NULL, account int8 NOT NULL, amount int8 NOT NULL);
                     CREATE TABLE \"{s}\".effects (transfer int8 PRIMARY KEY, applied int8 NOT NULL);"
                ))
                .await
                .context("creating the transactional ledger")?;
            Ok(())
        }

        fn apply<'a>(
            &'a self,
            tx: &'a mut TxClient,
            job: &'a TransferJob,
        ) -> TxFuture<'a, (), String> {
            Box::pin(async move {
                job.die_if(DieInTransaction::BeforeWrites);
                let t = job.transfer;
                let (from, to) = (i64::from(t.from), i64::from(t.to));
                let index = i64::from(job.index);
                for _ in 0..job.applications {
                    tx.execute(&*self.apply, &[&index, &from, &-t.amount, &to, &t.amount])
                        .await
                        .map_err(|e| e.to_string())?;
                }
                job.die_if(DieInTransaction::AfterWrites);
                Ok(())
            })
        }

        async fn snapshot(&self, workload: &Workload) -> anyhow::Result<Snapshot> {
            let s = &self.schema;
            let client = self.store.pool().get().await?;
            let mut balances = vec![INITIAL_BALANCE; workload.accounts as usize];
            let rows = client
                .query(
                    &format!(
                        "SELECT account, SUM(amount)::int8 FROM \"{s}\".postings GROUP BY account"
                    ),
                    &[],
                )
                .await?;
            for row in rows {
                let account: i64 = row.try_get(0)?;
                let moved: i64 = row.try_get(1)?;
                *usize::try_from(account)
                    .ok()
                    .and_then(|a| balances.get_mut(a))
                    .context("ledger posting for an unknown account")? += moved;
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
}

#[cfg(feature = "mysql")]
mod mysql {
    use std::fmt;
    use std::sync::Arc;

    use anyhow::Context;
    use idem::{Config, TxFuture};
    use idem_mysql::MysqlStore;
    use mysql_async::Transaction;
    use mysql_async::prelude::Queryable;

    use super::scratch_name;
    use crate::ledger::{DieInTransaction, Snapshot, TransactionalLedger, TransferJob};
    use crate::workload::{INITIAL_BALANCE, Workload};

    /// The transactional ledger on MySQL / MariaDB: two scratch tables next to the run's
    /// records table (`idem_verify_<run>_postings` and `_effects`), written through the
    /// transaction of [`idem::Transactional`], two statements per application.
    pub struct MysqlLedger {
        store: MysqlStore,
        postings: Arc<str>,
        effects: Arc<str>,
        post: Arc<str>,
        effect: Arc<str>,
        config: Config,
    }

    impl fmt::Debug for MysqlLedger {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("MysqlLedger")
                .field("postings", &self.postings)
                .finish_non_exhaustive()
        }
    }

    impl MysqlLedger {
        /// The ledger of run `run_id` on `store`, with transactional mode's `config`.
        pub fn new(store: MysqlStore, run_id: &str, config: Config) -> Self {
            let base = scratch_name(run_id);
            let (postings, effects) = (format!("{base}_postings"), format!("{base}_effects"));
            Self {
                post: format!(
                    "INSERT INTO `{postings}` (transfer, account, amount) VALUES (?, ?, ?), (?, ?, ?)"
                )
                .into(),
                effect: format!(
                    "INSERT INTO `{effects}` VALUES (?, 1) \
                     ON DUPLICATE KEY UPDATE applied = applied + 1"
                )
                .into(),
                store,
                postings: postings.into(),
                effects: effects.into(),
                config,
            }
        }
    }

    impl TransactionalLedger for MysqlLedger {
        type Store = MysqlStore;

        fn store(&self) -> &MysqlStore {
            &self.store
        }

        fn config(&self) -> &Config {
            &self.config
        }

        async fn create(&self, _workload: &Workload) -> anyhow::Result<()> {
            let (p, e) = (&self.postings, &self.effects);
            let mut conn = self.store.pool().get_conn().await?;
            conn.query_drop(format!(
                "CREATE TABLE `{p}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, transfer INT NOT NULL, \
                 account INT NOT NULL, amount BIGINT NOT NULL) ENGINE=InnoDB"
            ))
            .await
            .context("creating the transactional ledger")?;
            conn.query_drop(format!(
                "CREATE TABLE `{e}` (transfer INT PRIMARY KEY, applied INT NOT NULL) \
                 ENGINE=InnoDB"
            ))
            .await
            .context("creating the transactional ledger")?;
            Ok(())
        }

        fn apply<'a>(
            &'a self,
            tx: &'a mut Transaction<'static>,
            job: &'a TransferJob,
        ) -> TxFuture<'a, (), String> {
            Box::pin(async move {
                job.die_if(DieInTransaction::BeforeWrites);
                let t = job.transfer;
                let err = |e: mysql_async::Error| e.to_string();
                for _ in 0..job.applications {
                    tx.exec_drop(
                        &*self.post,
                        (job.index, t.from, -t.amount, job.index, t.to, t.amount),
                    )
                    .await
                    .map_err(err)?;
                    tx.exec_drop(&*self.effect, (job.index,))
                        .await
                        .map_err(err)?;
                }
                job.die_if(DieInTransaction::AfterWrites);
                Ok(())
            })
        }

        async fn snapshot(&self, workload: &Workload) -> anyhow::Result<Snapshot> {
            let mut conn = self.store.pool().get_conn().await?;
            let mut balances = vec![INITIAL_BALANCE; workload.accounts as usize];
            let rows: Vec<(u32, i64)> = conn
                .query(format!(
                    "SELECT account, CAST(SUM(amount) AS SIGNED) FROM `{}` GROUP BY account",
                    self.postings
                ))
                .await?;
            for (account, moved) in rows {
                *balances
                    .get_mut(account as usize)
                    .context("ledger posting for an unknown account")? += moved;
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
}
