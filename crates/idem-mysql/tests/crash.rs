//! Crash consistency of transactional mode: a real process killed with SIGKILL.
//!
//! The bug this guards against: a transactional mode that lets the handler's writes survive
//! without the record, or the record without the writes, so that the effect is applied twice
//! or never. The test re-runs this test binary as a child process (`IDEM_CRASH_CHILD`); the
//! child runs a handler that writes the ledger, says so, and hangs before its transaction
//! commits. The parent kills it with SIGKILL (no destructor, no rollback, no commit runs: the
//! server sees the connection drop), then checks that neither the effect nor the record
//! exists, and that the redelivery applies the effect exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idem::{Config, Fingerprint, Namespace, Outcome, State, Store, Transactional};
use mysql_async::prelude::Queryable;

const CHILD_ENV: &str = "IDEM_CRASH_CHILD";
const LEDGER_ENV: &str = "IDEM_CRASH_LEDGER";
const NS_ENV: &str = "IDEM_CRASH_NS";
const TABLE: &str = "idem_crash_tests";

fn spawn_child(ledger: &str, ns: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "transactional")
        .env(LEDGER_ENV, ledger)
        .env(NS_ENV, ns)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

/// Entry point of the child process; a no-op in a normal test run.
#[test]
fn child_entry_point() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let ledger = std::env::var(LEDGER_ENV).expect("ledger table");
    let ns = Namespace::new(std::env::var(NS_ENV).expect("namespace")).expect("namespace");
    let url = common::url().expect("the parent saw the server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = common::store(&url, TABLE).await;
        let key = ns.key("transfer-1").expect("key");
        let _ = store
            .run_transactional(
                &key,
                Fingerprint::of(b"10"),
                &Config::default(),
                move |tx| {
                    Box::pin(async move {
                        tx.query_drop(format!(
                            "INSERT INTO {ledger} (transfer, amount) VALUES ('transfer-1', 10)"
                        ))
                        .await?;
                        {
                            let mut out = std::io::stdout().lock();
                            writeln!(out, "effect written").expect("stdout");
                            out.flush().expect("flush");
                        }
                        tokio::time::sleep(Duration::from_secs(120)).await;
                        Ok::<_, mysql_async::Error>(())
                    })
                },
            )
            .await;
        panic!("the child should have been killed before the commit");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_crash_before_commit_leaves_neither_effect_nor_record() {
    let Some(url) = common::url() else {
        return;
    };
    let store = common::store(&url, TABLE).await;
    let ledger = common::Ledger::create(&url).await;
    let ns = common::namespace();

    let mut child = spawn_child(&ledger.table, ns.as_str());
    let out = child.stdout.take().expect("child stdout");
    let said = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("effect written"));
    assert!(said, "the child never wrote its effect");
    // `Child::kill` sends SIGKILL on Unix.
    child.kill().expect("SIGKILL child");
    let status = child.wait().expect("reap child");
    assert!(
        !status.success(),
        "the child must have died from the signal"
    );

    assert_eq!(
        ledger.rows("transfer-1").await,
        0,
        "the handler's uncommitted write survived the crash"
    );
    let key = ns.key("transfer-1").expect("key");
    assert!(
        store.get(&key).await.expect("get").is_none(),
        "a record survived without its transaction"
    );

    // The redelivery applies the effect, once (it may wait for the server to notice the dead
    // connection and roll its transaction back); later duplicates replay.
    for delivery in 0..3 {
        let sql = ledger.insert("transfer-1");
        let outcome: Outcome<(), mysql_async::Error> = store
            .run_transactional(&key, Fingerprint::of(b"10"), &Config::default(), |tx| {
                Box::pin(async move { tx.query_drop(sql).await })
            })
            .await
            .expect("redelivery");
        match (delivery, outcome) {
            (0, Outcome::Executed(())) | (1.., Outcome::Replayed(())) => {}
            (n, other) => panic!("delivery {n}: unexpected outcome {other:?}"),
        }
    }
    assert_eq!(
        ledger.rows("transfer-1").await,
        1,
        "the effect must be applied exactly once"
    );
    let rec = store.get(&key).await.expect("get").expect("record");
    assert_eq!((rec.state, rec.attempts), (State::Completed, 1));
    ledger.drop_table().await;
}
