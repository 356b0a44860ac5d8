//! Transactional mode inside a sqlx transaction (feature `sqlx`), against the shared server.

#![cfg(feature = "sqlx")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use idem::{Config, Fingerprint, Namespace, Outcome, State, Store, StoreErrorKind};
use sqlx_core::connection::Connection;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::PgConnection;

use common::Db;

fn key(id: &str) -> idem::Key {
    Namespace::new("sqlx").unwrap().key(id).unwrap()
}

/// One delivery in its own sqlx transaction: inserts a ledger row, or fails after inserting it.
async fn deliver(db: &Db, id: &str, fail: bool) -> Outcome<(), String> {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let insert = format!("INSERT INTO {} VALUES ('{id}', 1)", db.ledger());
    let outcome = idem_postgres::sqlx::run_in_transaction(
        &mut tx,
        db.store.table(),
        &key(id),
        Fingerprint::of(b"p"),
        &Config::default().max_attempts(3),
        1024,
        move |conn| {
            Box::pin(async move {
                sqlx_core::query::query(AssertSqlSafe(insert))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                // Hold the transaction so that concurrent duplicates overlap it.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                if fail {
                    return Err("declined".to_owned());
                }
                Ok(())
            })
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effect_and_record_commit_together_in_a_sqlx_transaction() {
    let Some(db) = Db::new("idem_sqlx_commit").await else {
        return;
    };
    assert!(deliver(&db, "a", false).await.is_executed());
    assert!(deliver(&db, "a", false).await.is_replayed());
    let failed = deliver(&db, "b", true).await;
    assert!(
        matches!(failed, Outcome::Released { attempt: 1, .. }),
        "{failed:?}"
    );
    assert_eq!(
        db.ledger_rows().await,
        1,
        "the failed handler's write is undone"
    );
    let b = db.store.get(&key("b")).await.unwrap().unwrap();
    assert_eq!((b.state, b.attempts), (State::Released, 1));
    assert!(deliver(&db, "b", false).await.is_executed());
    assert_eq!(db.ledger_rows().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sqlx_deliveries_apply_the_effect_once() {
    let Some(db) = Db::new("idem_sqlx_race").await else {
        return;
    };
    let db = Arc::new(db);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            deliver(&db, "t", false).await.kind()
        }));
    }
    let mut kinds = Vec::new();
    for t in tasks {
        kinds.push(t.await.unwrap());
    }
    assert_eq!(
        kinds.iter().filter(|k| **k == "executed").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "replayed").count(),
        5,
        "{kinds:?}"
    );
    assert_eq!(db.ledger_rows().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlx_rollback_leaves_neither_and_autocommit_is_refused() {
    let Some(db) = Db::new("idem_sqlx_rollback").await else {
        return;
    };
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let insert = format!("INSERT INTO {} VALUES ('r', 1)", db.ledger());
    {
        let mut tx = conn.begin().await.unwrap();
        let outcome = idem_postgres::sqlx::run_in_transaction(
            &mut tx,
            db.store.table(),
            &key("r"),
            Fingerprint::of(b"p"),
            &Config::default(),
            1024,
            move |conn| {
                Box::pin(async move {
                    sqlx_core::query::query(AssertSqlSafe(insert))
                        .execute(&mut *conn)
                        .await
                        .map(drop)
                })
            },
        )
        .await
        .unwrap();
        assert!(outcome.is_executed());
        tx.rollback().await.unwrap();
    }
    assert_eq!(db.ledger_rows().await, 0);
    assert!(db.store.get(&key("r")).await.unwrap().is_none());

    let err = idem_postgres::sqlx::run_in_transaction(
        &mut conn,
        db.store.table(),
        &key("r"),
        Fingerprint::of(b"p"),
        &Config::default(),
        1024,
        |_| Box::pin(async { Ok::<_, String>(()) }),
    )
    .await
    .expect_err("no transaction");
    match err {
        idem::Error::Store(e) => assert_eq!(e.kind(), StoreErrorKind::Config),
        other => panic!("{other:?}"),
    }
}
