//! Crash consistency of the SQLite store: real processes killed with SIGKILL.
//!
//! The bugs these tests guard against: a store that reports a completion before it is on disk
//! (a duplicate runs the handler again after a crash), and a transactional mode that lets the
//! handler's writes survive without the record, or the record without the writes (an effect
//! applied twice, or never). Each test re-runs this test binary as a child process
//! (`IDEM_CRASH_CHILD`), lets it work, kills it with SIGKILL at a chosen point, reopens the file
//! and checks what survived.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idem::{
    ClaimRequest, Completion, Config, Fingerprint, Namespace, Outcome, State, Store, Transactional,
};
use idem_sqlite::SqliteStore;

const CHILD_ENV: &str = "IDEM_CRASH_CHILD";
const DB_ENV: &str = "IDEM_CRASH_DB";

fn ns() -> Namespace {
    Namespace::new("crash").expect("namespace")
}

/// Starts this test binary as a child running `mode` on `db`.
fn spawn_child(mode: &str, db: &Path) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .env(DB_ENV, db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

/// Reads what follows `prefix` in the child's stdout lines until `until` says stop. The marker
/// may follow other text: libtest prints `test child_entry_point ... ` without a newline.
fn read_lines(
    child: &mut Child,
    prefix: &str,
    mut until: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let out = child.stdout.take().expect("child stdout");
    let mut lines = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.expect("read child stdout");
        if let Some(at) = line.find(prefix) {
            lines.push(line[at + prefix.len()..].to_owned());
            if until(&lines) {
                break;
            }
        }
    }
    lines
}

fn sigkill(child: &mut Child) {
    use std::os::unix::process::ExitStatusExt;
    // A child that already exited (a panic, a failed open) would make the test vacuous.
    assert!(
        child.try_wait().expect("poll child").is_none(),
        "the child exited before it was killed"
    );
    // `Child::kill` sends SIGKILL on Unix: no destructor, no flush, no commit runs.
    child.kill().expect("SIGKILL child");
    let status = child.wait().expect("reap child");
    assert_eq!(
        status.signal(),
        Some(9),
        "the child must have died from SIGKILL, not {status}"
    );
}

/// Entry point of the child processes; a no-op in a normal test run.
#[test]
fn child_entry_point() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let db = std::env::var(DB_ENV).expect("db path");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        match mode.as_str() {
            "completions" => child_completions(&db).await,
            "transactional" => child_transactional(&db).await,
            other => panic!("unknown child mode {other}"),
        }
    });
}

/// Claims and completes keys from 8 concurrent tasks (so batches are grouped), printing each
/// key once its completion is confirmed. Runs until killed.
async fn child_completions(db: &str) {
    let store = SqliteStore::open(db).expect("open");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let key = ns()
                    .key(format!("p{}-t{t}-m{i}", std::process::id()))
                    .expect("key");
                let req = ClaimRequest::new(key.clone(), Fingerprint::of(b"x"));
                store.claim(&req).await.expect("claim");
                let c = Completion::new(key.clone(), req.token, bytes::Bytes::from_static(b"ok"));
                assert!(store.complete(&c).await.expect("complete").is_applied());
                let mut out = std::io::stdout().lock();
                writeln!(out, "done {key}").expect("stdout");
                out.flush().expect("flush");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

/// Runs a transactional handler that writes the ledger, says so, and then hangs inside the
/// transaction until killed: the process dies between the handler's writes and the commit.
async fn child_transactional(db: &str) {
    let store = SqliteStore::open(db).expect("open");
    let key = ns().key("transfer-1").expect("key");
    let _ = store
        .run_transactional(&key, Fingerprint::of(b"10"), &Config::default(), |conn| {
            Box::pin(async move {
                conn.execute(
                    "INSERT INTO ledger (transfer, amount) VALUES ('transfer-1', 10)",
                    [],
                )?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "effect written").expect("stdout");
                out.flush().expect("flush");
                std::thread::sleep(Duration::from_secs(120));
                Ok::<_, rusqlite::Error>(())
            })
        })
        .await;
    panic!("the child should have been killed before the commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_loses_a_confirmed_completion() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("idem.db");
    for round in 0..3 {
        let mut child = spawn_child("completions", &db);
        let want = 300 + round * 200;
        let confirmed = read_lines(&mut child, "done ", |lines| lines.len() >= want);
        sigkill(&mut child);
        assert!(
            confirmed.len() >= want,
            "the child confirmed too few completions"
        );

        let store = SqliteStore::open(&db).expect("reopen after SIGKILL");
        for key in &confirmed {
            let key = idem::Key::parse(key).expect("key");
            let rec = store.get(&key).await.expect("get").unwrap_or_else(|| {
                panic!("round {round}: confirmed completion of {key} vanished after SIGKILL")
            });
            assert_eq!(
                rec.state,
                State::Completed,
                "round {round}: {key} not completed"
            );
            assert_eq!(rec.result.as_deref(), Some(&b"ok"[..]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_crash_before_commit_leaves_neither_effect_nor_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("app.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch("CREATE TABLE ledger (transfer TEXT NOT NULL, amount INTEGER NOT NULL)")
            .expect("create ledger");
    }
    let mut child = spawn_child("transactional", &db);
    let seen = read_lines(&mut child, "effect written", |_| true);
    assert_eq!(seen.len(), 1, "the child never wrote its effect");
    sigkill(&mut child);

    let ledger_rows = |db: &Path| -> i64 {
        let conn = rusqlite::Connection::open(db).expect("open");
        conn.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))
            .expect("count")
    };
    assert_eq!(
        ledger_rows(&db),
        0,
        "the handler's uncommitted write survived the crash"
    );
    let store = SqliteStore::open(&db).expect("reopen");
    let key = ns().key("transfer-1").expect("key");
    assert!(
        store.get(&key).await.expect("get").is_none(),
        "a record survived without its transaction"
    );

    // The redelivery applies the effect, once; later duplicates replay.
    for delivery in 0..3 {
        let outcome = store
            .run_transactional(&key, Fingerprint::of(b"10"), &Config::default(), |conn| {
                Box::pin(async move {
                    conn.execute(
                        "INSERT INTO ledger (transfer, amount) VALUES ('transfer-1', 10)",
                        [],
                    )
                    .map(|_| ())
                })
            })
            .await
            .expect("redelivery");
        match (delivery, outcome) {
            (0, Outcome::Executed(())) | (1.., Outcome::Replayed(())) => {}
            (n, other) => panic!("delivery {n}: unexpected outcome {other:?}"),
        }
    }
    assert_eq!(
        ledger_rows(&db),
        1,
        "the effect must be applied exactly once"
    );
    let rec = store.get(&key).await.expect("get").expect("record");
    assert_eq!((rec.state, rec.attempts), (State::Completed, 1));
}
