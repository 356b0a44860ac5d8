//! Crash consistency of transactional mode: a real process killed with SIGKILL.
//!
//! The bug this guards against: a transactional mode that lets the handler's writes survive
//! without the record (the redelivery applies the effect a second time), or the record without
//! the writes (the redelivery replays an effect that never happened). The test re-runs this test
//! binary as a child process (`IDEM_PG_CRASH_CHILD`) that claims a key in its own transaction,
//! makes the handler's write, says so, and hangs before the commit; the parent SIGKILLs it, so
//! the server sees the connection drop mid-transaction. Then neither the write nor the record
//! may exist, and the redelivery must apply the effect exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use idem::{Config, Fingerprint, Namespace, Outcome, State, Store};
use tokio_postgres::NoTls;

use common::Db;

const CHILD_ENV: &str = "IDEM_PG_CRASH_CHILD";
const SCHEMA_ENV: &str = "IDEM_PG_CRASH_SCHEMA";

fn key() -> idem::Key {
    Namespace::new("crash").unwrap().key("transfer-1").unwrap()
}

async fn deliver(
    tx: &tokio_postgres::Transaction<'_>,
    db: &Db,
    hang: bool,
) -> Result<Outcome<(), tokio_postgres::Error>, idem::Error> {
    let ledger = db.ledger();
    idem_postgres::run_in_transaction(
        tx,
        db.store.table(),
        &key(),
        Fingerprint::of(b"10"),
        &Config::default(),
        1024,
        move |tx| {
            Box::pin(async move {
                tx.execute(
                    &format!("INSERT INTO {ledger} VALUES ('transfer-1', 10)"),
                    &[],
                )
                .await?;
                if hang {
                    {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "effect written").expect("stdout");
                        out.flush().expect("flush");
                    }
                    tokio::time::sleep(Duration::from_secs(120)).await;
                }
                Ok(())
            })
        },
    )
    .await
}

/// Entry point of the child process; a no-op in a normal test run.
#[test]
fn child_entry_point() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let schema = std::env::var(SCHEMA_ENV).expect("schema");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let url = idem_conformance::server::url(idem_conformance::server::POSTGRES).expect("url");
        let db = Db::in_schema(url.clone(), schema).await;
        let (mut client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
        tokio::spawn(conn);
        let tx = client.transaction().await.expect("begin");
        let out = deliver(&tx, &db, true).await;
        eprintln!("child: delivery returned {out:?}");
        panic!("the child should have been killed before the commit");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_the_handlers_writes_and_the_commit_leaves_neither() {
    let Some(db) = Db::new("idem_crash").await else {
        return;
    };
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env(SCHEMA_ENV, &db.schema)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let saw = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("effect written"))
    })
    .await
    .unwrap();
    assert!(saw, "the child never reached its handler");
    // `Child::kill` is SIGKILL on Unix: no destructor, no rollback message, no commit.
    child.kill().expect("SIGKILL child");
    let status = child.wait().expect("reap child");
    assert!(
        !status.success(),
        "the child must have died from the signal"
    );

    assert_eq!(
        db.ledger_rows().await,
        0,
        "the uncommitted write survived the crash"
    );
    assert!(
        db.store.get(&key()).await.unwrap().is_none(),
        "a record survived without its transaction"
    );

    // The redelivery applies the effect once (its claim waits, if need be, for the server to
    // finish rolling back the dead session); later duplicates replay.
    let (mut client, conn) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    tokio::spawn(conn);
    for delivery in 0..3 {
        let tx = client.transaction().await.unwrap();
        let outcome = deliver(&tx, &db, false).await.expect("redelivery");
        tx.commit().await.unwrap();
        match (delivery, outcome) {
            (0, Outcome::Executed(())) | (1.., Outcome::Replayed(())) => {}
            (n, other) => panic!("delivery {n}: unexpected outcome {other:?}"),
        }
    }
    assert_eq!(
        db.ledger_rows().await,
        1,
        "the effect must be applied exactly once"
    );
    let rec = db.store.get(&key()).await.unwrap().expect("record");
    assert_eq!((rec.state, rec.attempts), (State::Completed, 1));
}
