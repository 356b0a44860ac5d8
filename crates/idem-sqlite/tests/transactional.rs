//! Transactional mode: the record commits with the handler's writes, or neither does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem::{Config, Fingerprint, Namespace, Store, StoreErrorKind, Transactional};
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

/// The transactional conformance suite on a file of its own per check.
struct Harness {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let (store, _dir) = store();
    let conn = rusqlite::Connection::open(store.path().expect("file")).expect("open");
    conn.execute_batch("CREATE TABLE effects (id TEXT NOT NULL)")
        .expect("effects table");
    Harness { store, _dir }
}

impl idem_conformance::TxHarness for Harness {
    type Store = SqliteStore;

    fn store(&self) -> SqliteStore {
        self.store.clone()
    }

    fn write_effect(conn: &mut rusqlite::Connection, id: String) -> idem::TxFuture<'_, (), String> {
        Box::pin(async move {
            conn.execute("INSERT INTO effects (id) VALUES (?1)", [id])
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }

    async fn effects(&self, id: &str) -> u64 {
        let conn = rusqlite::Connection::open(self.store.path().expect("file")).expect("open");
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM effects WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .expect("count");
        u64::try_from(n).expect("a count")
    }
}

idem_conformance::transactional_tests!(harness);

#[tokio::test]
async fn a_panicking_handler_is_rolled_back_and_the_store_keeps_working() {
    let (store, _dir) = store();
    let fp = Fingerprint::of(b"p");
    let result = store
        .run_transactional(&key("p"), fp, &Config::default(), move |conn| {
            Box::pin(async move {
                insert(conn, "p").unwrap();
                if fp == Fingerprint::of(b"p") {
                    panic!("handler bug");
                }
                Ok::<_, String>(())
            })
        })
        .await;
    let err = result.expect_err("a panicking handler must not report success");
    assert!(err.to_string().contains("panicked"), "{err}");
    assert_eq!(rows(&store), 0);
    assert!(store.get(&key("p")).await.unwrap().is_none());
    let ok = store
        .run_transactional(&key("p"), fp, &Config::default(), |conn| {
            Box::pin(async move { insert(conn, "p") })
        })
        .await
        .unwrap();
    assert!(ok.is_executed());
    assert_eq!(rows(&store), 1);
}

/// The handler runs on the writer thread, which cannot wait: a handler whose future is not
/// ready at once is refused with a clear error, and nothing of its batch is written.
#[tokio::test]
async fn a_handler_that_waits_is_refused_and_writes_nothing() {
    let (store, _dir) = store();
    let items = vec![
        (key("w1"), Fingerprint::of(b"p")),
        (key("w2"), Fingerprint::of(b"p")),
    ];
    let err = store
        .run_batch_transactional(&items, &Config::default(), |conn, i| {
            Box::pin(async move {
                insert(conn, if i == 0 { "w1" } else { "w2" }).map_err(|e| e.to_string())?;
                if i == 1 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, String>(())
            })
        })
        .await
        .expect_err("a waiting handler must fail the batch");
    match &err {
        idem::Error::Store(e) => assert_eq!(e.kind(), StoreErrorKind::Config, "{err}"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("without waiting"), "{err}");
    assert_eq!(rows(&store), 0, "nothing of the batch is written");
    assert!(store.get(&key("w1")).await.unwrap().is_none());
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
/// again after its retention counts as reprocessed (docs/design.md, section 8, scenario 6).
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
