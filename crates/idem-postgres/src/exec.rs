//! The few ways idem talks to a PostgreSQL session, behind one trait ([`Exec`]) so that the
//! transitions and the transactional mode are written once for every driver: a pooled
//! deadpool connection (store mode, statements prepared once per connection), a caller's
//! deadpool or tokio-postgres transaction, and (feature `sqlx`) a caller's sqlx connection.

use std::future::Future;

use idem::StoreError;
use tokio_postgres::types::{ToSql, Type};

use crate::error::pg_error;

/// One key's answer to the claim statement, as the statement returns it.
#[derive(Debug)]
pub(crate) struct ClaimRow {
    pub(crate) kind: i16,
    pub(crate) prev_state: Option<i16>,
    pub(crate) prev_expired: Option<bool>,
    pub(crate) state: Option<i16>,
    pub(crate) fingerprint: Option<Vec<u8>>,
    pub(crate) attempts: Option<i32>,
    pub(crate) lease_until: Option<i64>,
    pub(crate) result: Option<Vec<u8>>,
    pub(crate) now: i64,
}

/// The claim statement's parameters: one array per column, one element per key.
#[derive(Debug, Default)]
pub(crate) struct ClaimArgs<'a> {
    pub(crate) namespaces: Vec<&'a str>,
    pub(crate) ids: Vec<&'a str>,
    pub(crate) fingerprints: Vec<Vec<u8>>,
    pub(crate) tokens: Vec<i64>,
    pub(crate) owners: Vec<&'a str>,
    pub(crate) lease_ms: Vec<i64>,
    pub(crate) retention_ms: Vec<i64>,
    pub(crate) max_attempts: Vec<i64>,
}

/// The batch completion statement's parameters.
#[derive(Debug, Default)]
pub(crate) struct CompleteArgs {
    pub(crate) namespaces: Vec<String>,
    pub(crate) ids: Vec<String>,
    pub(crate) tokens: Vec<i64>,
    pub(crate) results: Vec<Vec<u8>>,
    pub(crate) retention_ms: Vec<i64>,
}

/// A fenced single-key write's parameters: `$4` bytes (complete, fail; ignored otherwise) and
/// `$5` milliseconds (retention, or the lease for extend).
#[derive(Debug)]
pub(crate) struct FencedArgs<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) id: &'a str,
    pub(crate) token: i64,
    pub(crate) bytes: &'a [u8],
    pub(crate) ms: i64,
}

pub(crate) const CLAIM_TYPES: [Type; 8] = [
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
];
pub(crate) const COMPLETE_TYPES: [Type; 5] = [
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::BYTEA_ARRAY,
    Type::INT8_ARRAY,
];
pub(crate) const FENCED_TYPES: [Type; 5] =
    [Type::TEXT, Type::TEXT, Type::INT8, Type::BYTEA, Type::INT8];

/// A session idem can run its statements on.
pub(crate) trait Exec: Send {
    /// Runs the claim statement.
    fn claim_rows(
        &mut self,
        sql: &str,
        args: &ClaimArgs<'_>,
    ) -> impl Future<Output = Result<Vec<ClaimRow>, StoreError>> + Send;

    /// Runs `insert_completed`: the id, token and clock of every key inserted.
    fn inserted_rows(
        &mut self,
        sql: &str,
        args: &ClaimArgs<'_>,
    ) -> impl Future<Output = Result<Vec<(String, i64, i64)>, StoreError>> + Send;

    /// Runs a write statement that answers one `kind` per key.
    fn complete_rows(
        &mut self,
        sql: &str,
        args: &CompleteArgs,
    ) -> impl Future<Output = Result<Vec<i16>, StoreError>> + Send;

    /// Runs a fenced single-key write.
    fn fenced(
        &mut self,
        sql: &str,
        args: &FencedArgs<'_>,
    ) -> impl Future<Output = Result<i16, StoreError>> + Send;

    /// Runs statements without parameters (savepoints).
    fn simple(&mut self, sql: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// How a tokio-postgres session runs a parameterised statement: prepared and cached where the
/// session has a statement cache (deadpool), or typed in one round trip where it does not.
pub(crate) trait Query: Sync {
    fn rows(
        &self,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send;

    fn batch(&self, sql: &str) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send;
}

macro_rules! cached_query {
    ($t:ty) => {
        impl Query for $t {
            async fn rows(
                &self,
                sql: &str,
                types: &[Type],
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
                let stmt = self.prepare_typed_cached(sql, types).await?;
                self.query(&stmt, params).await
            }

            async fn batch(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
                self.batch_execute(sql).await
            }
        }
    };
}

/// A borrowed session: what the caller's-own-transaction functions hand to the shared code.
impl<Q: Query + ?Sized> Query for &Q {
    fn rows(
        &self,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send {
        (**self).rows(sql, types, params)
    }

    fn batch(&self, sql: &str) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send {
        (**self).batch(sql)
    }
}

cached_query!(deadpool_postgres::Client);
cached_query!(deadpool_postgres::Transaction<'_>);

impl Query for tokio_postgres::Transaction<'_> {
    async fn rows(
        &self,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
            .iter()
            .zip(types)
            .map(|(p, t)| (*p, t.clone()))
            .collect();
        self.query_typed(sql, &typed).await
    }

    async fn batch(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.batch_execute(sql).await
    }
}

fn claim_params<'a>(a: &'a ClaimArgs<'_>) -> [&'a (dyn ToSql + Sync); 8] {
    [
        &a.namespaces,
        &a.ids,
        &a.fingerprints,
        &a.tokens,
        &a.owners,
        &a.lease_ms,
        &a.retention_ms,
        &a.max_attempts,
    ]
}

/// A [`ClaimRow`] from a row `$row` of the claim statement, `$get(row, i)` reading column `i`,
/// whatever the driver.
macro_rules! claim_row {
    ($get:ident, $row:expr) => {{
        let row = $row;
        Ok::<_, StoreError>(ClaimRow {
            kind: $get(row, 1)?,
            prev_state: $get(row, 2)?,
            prev_expired: $get(row, 3)?,
            state: $get(row, 4)?,
            fingerprint: $get(row, 5)?,
            attempts: $get(row, 6)?,
            lease_until: $get(row, 7)?,
            result: $get(row, 8)?,
            now: $get(row, 9)?,
        })
    }};
}
#[cfg_attr(not(feature = "sqlx"), allow(unused_imports))]
pub(crate) use claim_row;

/// Any [`Query`] session, borrowed, as an [`Exec`].
pub(crate) struct Tp<'a, Q: ?Sized>(pub(crate) &'a Q);

fn get<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r tokio_postgres::Row,
    i: usize,
) -> Result<T, StoreError> {
    row.try_get(i).map_err(|e| pg_error("decode a row", e))
}

impl<Q: Query + ?Sized> Exec for Tp<'_, Q> {
    async fn claim_rows(
        &mut self,
        sql: &str,
        a: &ClaimArgs<'_>,
    ) -> Result<Vec<ClaimRow>, StoreError> {
        let rows = self
            .0
            .rows(sql, &CLAIM_TYPES, &claim_params(a))
            .await
            .map_err(|e| pg_error("claim", e))?;
        rows.iter().map(|r| claim_row!(get, r)).collect()
    }

    async fn inserted_rows(
        &mut self,
        sql: &str,
        a: &ClaimArgs<'_>,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let rows = self
            .0
            .rows(sql, &CLAIM_TYPES, &claim_params(a))
            .await
            .map_err(|e| pg_error("claim", e))?;
        rows.iter()
            .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
            .collect()
    }

    async fn complete_rows(&mut self, sql: &str, a: &CompleteArgs) -> Result<Vec<i16>, StoreError> {
        let rows = self
            .0
            .rows(
                sql,
                &COMPLETE_TYPES,
                &[
                    &a.namespaces,
                    &a.ids,
                    &a.tokens,
                    &a.results,
                    &a.retention_ms,
                ],
            )
            .await
            .map_err(|e| pg_error("complete", e))?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    async fn fenced(&mut self, sql: &str, a: &FencedArgs<'_>) -> Result<i16, StoreError> {
        let rows = self
            .0
            .rows(
                sql,
                &FENCED_TYPES,
                &[&a.namespace, &a.id, &a.token, &a.bytes, &a.ms],
            )
            .await
            .map_err(|e| pg_error("write", e))?;
        match rows.first() {
            Some(r) => get(r, 0),
            None => Err(StoreError::new(
                idem::StoreErrorKind::Backend,
                "postgres write: the statement returned no row",
            )),
        }
    }

    async fn simple(&mut self, sql: &str) -> Result<(), StoreError> {
        self.0
            .batch(sql)
            .await
            .map_err(|e| pg_error("savepoint", e))
    }
}
