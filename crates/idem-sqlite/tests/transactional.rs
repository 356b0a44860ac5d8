//! Transactional mode: the record commits with the handler's writes, or neither does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use idem::{Config, Disposition, Fingerprint, Namespace, Outcome, State, Store, StoreErrorKind};
use idem_sqlite::SqliteStore;

fn store() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("app.db");
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch(
        "CREATE TABLE ledger (transfer TEXT NOT NULL, amount INTEGER NOT NULL);
         CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
         INSERT INTO accounts VALUES (1, 100), (2, 0);",
    )
    .expect("schema");
    (SqliteStore::open(&path).expect("store"), dir)
}

fn rows(store: &SqliteStore) -> i64 {
    let conn = rusqlite::Connection::open(store.path().expect("file")).expect("open");
    conn.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))
        .expect("count")
}

fn key(id: &str) -> idem::Key {
    Namespace::new("ledger").unwrap().key(id).unwrap()
}

fn insert(conn: &rusqlite::Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("INSERT INTO ledger VALUES (?1, 10)", [id])
        .map(drop)
}

#[tokio::test]
async fn a_failed_handler_leaves_no_writes_and_counts_the_attempt() {
    let (store, _dir) = store();
    let config = Config::default().max_attempts(2);
    let first: Outcome<(), String> = store
        .run_transactional(key("t1"), b"p", config.clone(), |conn| {
            insert(conn, "t1").map_err(|e| e.to_string())?;
            Err("declined by the bank".to_owned())
        })
        .await
        .unwrap();
    assert!(
        matches!(first, Outcome::Released { attempt: 1, .. }),
        "{first:?}"
    );
    assert_eq!(
        rows(&store),
        0,
        "the failed handler's write must be rolled back"
    );
    let rec = store.get(&key("t1")).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts), (State::Released, 1));

    let second: Outcome<(), String> = store
        .run_transactional(key("t1"), b"p", config.clone(), |conn| {
            insert(conn, "t1").map_err(|e| e.to_string())?;
            Err("declined again".to_owned())
        })
        .await
        .unwrap();
    match second.disposition() {
        Disposition::DeadLetter { reason } => {
            assert!(reason.contains("declined again"), "{reason}")
        }
        other => panic!("second failure of two must dead-letter, got {other:?}"),
    }
    assert_eq!(rows(&store), 0);
    assert_eq!(
        store.get(&key("t1")).await.unwrap().unwrap().state,
        State::Failed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_apply_the_effect_once() {
    let (store, _dir) = store();
    let mut tasks = Vec::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    for _ in 0..16 {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store
                .run_transactional(key("t"), b"p", Config::default(), |conn| {
                    conn.execute(
                        "UPDATE accounts SET balance = balance - 10 WHERE id = 1",
                        [],
                    )?;
                    conn.execute(
                        "UPDATE accounts SET balance = balance + 10 WHERE id = 2",
                        [],
                    )?;
                    insert(conn, "t")
                })
                .await
                .unwrap()
                .kind()
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
        15,
        "{kinds:?}"
    );
    assert_eq!(rows(&store), 1);
    let conn = rusqlite::Connection::open(store.path().unwrap()).unwrap();
    let b: (i64, i64) = conn
        .query_row("SELECT (SELECT balance FROM accounts WHERE id=1), (SELECT balance FROM accounts WHERE id=2)", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    assert_eq!(b, (90, 10));
}

#[tokio::test]
async fn a_panicking_handler_is_rolled_back_and_the_store_keeps_working() {
    let (store, _dir) = store();
    let result = store
        .run_transactional(
            key("p"),
            b"p",
            Config::default(),
            |conn| -> Result<(), String> {
                insert(conn, "p").unwrap();
                panic!("handler bug");
            },
        )
        .await;
    let err = result.expect_err("a panicking handler must not report success");
    assert!(err.to_string().contains("panicked"), "{err}");
    assert_eq!(rows(&store), 0);
    assert!(store.get(&key("p")).await.unwrap().is_none());
    let ok = store
        .run_transactional(key("p"), b"p", Config::default(), |conn| insert(conn, "p"))
        .await
        .unwrap();
    assert!(ok.is_executed());
    assert_eq!(rows(&store), 1);
}

#[tokio::test]
async fn mismatch_and_oversized_results_leave_no_writes() {
    let (store, _dir) = store();
    let ok = store
        .run_transactional(key("m"), b"amount=10", Config::default(), |conn| {
            insert(conn, "m")
        })
        .await
        .unwrap();
    assert!(ok.is_executed());
    let mismatch = store
        .run_transactional(key("m"), b"amount=99", Config::default(), |conn| {
            insert(conn, "m")
        })
        .await
        .unwrap();
    assert!(matches!(mismatch, Outcome::Mismatch { .. }));
    let big = store
        .run_transactional(key("big"), b"p", Config::default(), |conn| {
            insert(conn, "big")?;
            Ok::<_, rusqlite::Error>(vec![0u8; 65 * 1024])
        })
        .await
        .unwrap();
    assert!(matches!(big, Outcome::Exhausted { .. }), "{big:?}");
    assert_eq!(rows(&store), 1, "only the first effect exists");
}

#[test]
fn run_in_transaction_requires_an_open_transaction() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    idem_sqlite::create_schema(&conn).unwrap();
    let err = idem_sqlite::run_in_transaction(
        &conn,
        &key("x"),
        Fingerprint::of(b"p"),
        &Config::default(),
        1024,
        |_| Ok::<_, String>(()),
    )
    .expect_err("autocommit connection");
    match err {
        idem::Error::Store(e) => assert_eq!(e.kind(), StoreErrorKind::Config),
        other => panic!("{other:?}"),
    }
}

#[test]
fn opening_a_missing_directory_names_the_path() {
    let err = SqliteStore::open("/nonexistent/dir/idem.db").expect_err("missing dir");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable);
    assert!(
        err.to_string().contains("/nonexistent/dir/idem.db"),
        "{err}"
    );
}

/// Transactional mode keeps the executor's counters, under the config's name; a key processed
/// again after its retention counts as reprocessed (contract scenario 6).
#[test]
fn transactional_outcomes_are_counted() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let dir = tempfile::tempdir().unwrap();
    let mut conn = rusqlite::Connection::open(dir.path().join("app.db")).unwrap();
    idem_sqlite::create_schema(&conn).unwrap();
    let config = Config::default()
        .name("ledger")
        .retention(std::time::Duration::from_millis(20));
    let mut run = |payload: &[u8]| {
        let tx = conn.transaction().unwrap();
        let out = metrics::with_local_recorder(&recorder, || {
            idem_sqlite::run_in_transaction(
                &tx,
                &key("m"),
                Fingerprint::of(payload),
                &config,
                1024,
                |_| Ok::<_, String>(()),
            )
        })
        .unwrap();
        tx.commit().unwrap();
        out.kind()
    };
    assert_eq!(run(b"p"), "executed");
    assert_eq!(run(b"p"), "replayed");
    assert_eq!(run(b"other"), "mismatch");
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(run(b"p"), "executed");

    let counters: std::collections::HashMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v)| match v {
            metrics_util::debugging::DebugValue::Counter(n) => {
                let key = k.key();
                assert!(
                    key.labels()
                        .any(|l| l.key() == "executor" && l.value() == "ledger")
                );
                Some((key.name().to_owned(), n))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        counters.get("idem_executed_total"),
        Some(&2),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("idem_replayed_total"),
        Some(&1),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("idem_mismatches_total"),
        Some(&1),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("idem_reprocessed_total"),
        Some(&1),
        "{counters:?}"
    );
}
