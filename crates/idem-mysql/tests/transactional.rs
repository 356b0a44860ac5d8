//! Transactional mode against the shared server: the transactional conformance suite, and what
//! is MySQL's own (the caller's transaction, its connection flags, the optimistic savepoint and
//! its careful rerun, lock order across batches, panics).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Ledger, namespace, url};
use idem::{
    Config, Fingerprint, Namespace, Outcome, State, Store, StoreErrorKind, Transactional, TxFuture,
};
use idem_conformance::TxHarness;
use idem_mysql::MysqlStore;
use mysql_async::Transaction;
use mysql_async::prelude::Queryable;

const TABLE: &str = "idem_tx_tests";

async fn setup() -> Option<(MysqlStore, Ledger)> {
    let url = url()?;
    Some((common::store(&url, TABLE).await, Ledger::create(&url).await))
}

/// The effects of the conformance checks: one row per committed effect, shared by the checks
/// (an effect id is its key, so each check's rows are its namespace's) and cleaned per check.
const EFFECTS: &str = "idem_tx_conformance_effects";

/// A conformance check's store: a records table of its own, and its namespace.
struct MysqlTx {
    store: MysqlStore,
    ns: Namespace,
    _cleanup: Cleanup,
}

/// Drops the check's records table and deletes its effects, when the check ends.
struct Cleanup {
    url: String,
    table: String,
    ns: Namespace,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::on_server(
            &self.url,
            vec![
                // No gap locks: other checks keep inserting effects meanwhile.
                "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_owned(),
                format!("DELETE FROM {EFFECTS} WHERE id LIKE '{}:%'", self.ns),
                format!("DROP TABLE IF EXISTS `{}`", self.table),
            ],
        );
    }
}

impl TxHarness for MysqlTx {
    type Store = MysqlStore;

    fn store(&self) -> MysqlStore {
        self.store.clone()
    }

    fn write_effect<'a>(tx: &'a mut Transaction<'static>, id: String) -> TxFuture<'a, (), String> {
        Box::pin(async move {
            tx.exec_drop(format!("INSERT INTO {EFFECTS} (id) VALUES (?)"), (id,))
                .await
                .map_err(|e| e.to_string())
        })
    }

    async fn effects(&self, id: &str) -> u64 {
        let mut conn = self.store.pool().get_conn().await.unwrap();
        let n: Option<u64> = conn
            .exec_first(
                format!("SELECT COUNT(*) FROM {EFFECTS} WHERE id = ?"),
                (id,),
            )
            .await
            .unwrap();
        n.unwrap()
    }

    fn namespace(&self) -> Namespace {
        // Each check takes one namespace: this one, whose effects the cleanup deletes.
        self.ns.clone()
    }
}

async fn tx_harness() -> Option<MysqlTx> {
    let url = url()?;
    let table = common::unique("idem_tx_conformance");
    let store = common::store(&url, &table).await;
    store
        .pool()
        .get_conn()
        .await
        .unwrap()
        .query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {EFFECTS} (id VARBINARY(255) NOT NULL, KEY (id)) \
             ENGINE = InnoDB"
        ))
        .await
        .unwrap();
    let ns = idem_conformance::unique_namespace();
    let cleanup = Cleanup {
        url,
        table,
        ns: ns.clone(),
    };
    Some(MysqlTx {
        store,
        ns,
        _cleanup: cleanup,
    })
}

idem_conformance::transactional_tests!(tx_harness);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_rollback_leaves_neither_effect_nor_record() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let key = namespace().key("t1").unwrap();
    let mut tx = store
        .pool()
        .start_transaction(mysql_async::TxOpts::default())
        .await
        .unwrap();
    let sql = ledger.insert("t1");
    let outcome: Outcome<(), mysql_async::Error> = store
        .run_in_transaction(
            &mut tx,
            &key,
            Fingerprint::of(b"p"),
            &Config::default(),
            |tx| Box::pin(async move { tx.query_drop(sql).await }),
        )
        .await
        .unwrap();
    assert!(outcome.is_executed());
    tx.rollback().await.unwrap();
    assert_eq!(ledger.rows("t1").await, 0);
    assert!(store.get(&key).await.unwrap().is_none());

    // The same key in the caller's committed transaction, next to the caller's own write.
    let mut tx = store
        .pool()
        .start_transaction(mysql_async::TxOpts::default())
        .await
        .unwrap();
    let sql = ledger.insert("t1");
    let outcome: Outcome<(), mysql_async::Error> = store
        .run_in_transaction(
            &mut tx,
            &key,
            Fingerprint::of(b"p"),
            &Config::default(),
            |tx| Box::pin(async move { tx.query_drop(sql).await }),
        )
        .await
        .unwrap();
    assert!(outcome.is_executed());
    tx.query_drop(ledger.insert("caller")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (ledger.rows("t1").await, ledger.rows("caller").await),
        (1, 1)
    );
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        State::Completed
    );
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_rolled_back_and_the_store_keeps_working() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let key = namespace().key("p").unwrap();
    let sql = ledger.insert("p");
    let result = store
        .run_transactional(
            &key,
            Fingerprint::of(b"p"),
            &Config::default(),
            |tx| -> TxFuture<'_, (), mysql_async::Error> {
                Box::pin(async move {
                    tx.query_drop(sql).await?;
                    panic!("handler bug");
                })
            },
        )
        .await;
    let err = result.expect_err("a panicking handler must not report success");
    assert!(err.to_string().contains("panicked"), "{err}");
    assert_eq!(ledger.rows("p").await, 0);
    assert!(store.get(&key).await.unwrap().is_none());
    let sql = ledger.insert("p");
    let ok: Outcome<(), mysql_async::Error> = store
        .run_transactional(&key, Fingerprint::of(b"p"), &Config::default(), |tx| {
            Box::pin(async move { tx.query_drop(sql).await })
        })
        .await
        .unwrap();
    assert!(ok.is_executed());
    assert_eq!(ledger.rows("p").await, 1);
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_equals_single_runs_in_order() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let ns = namespace();
    let fp = Fingerprint::of(b"p");
    // "a" twice: it runs once and replays; "bad" fails and is rolled back alone; "mix" was
    // completed before with another payload.
    let seed: Outcome<(), mysql_async::Error> = store
        .run_transactional(
            &ns.key("mix").unwrap(),
            Fingerprint::of(b"other"),
            &Config::default(),
            |_| Box::pin(async { Ok(()) }),
        )
        .await
        .unwrap();
    assert!(seed.is_executed());
    let ids = ["a", "bad", "a", "b", "mix"];
    let items: Vec<_> = ids.iter().map(|id| (ns.key(*id).unwrap(), fp)).collect();
    let ran = Arc::new(AtomicUsize::new(0));
    let ran2 = ran.clone();
    let sqls: Vec<String> = ids.iter().map(|id| ledger.insert(id)).collect();
    let outcomes: Vec<Outcome<u32, String>> = store
        .run_batch_transactional(&items, &Config::default(), move |tx, i| {
            ran2.fetch_add(1, Ordering::SeqCst);
            let sql = sqls[i].clone();
            Box::pin(async move {
                tx.query_drop(sql).await.map_err(|e| e.to_string())?;
                if ids[i] == "bad" {
                    return Err("bad item".to_owned());
                }
                Ok(u32::try_from(i).unwrap())
            })
        })
        .await
        .unwrap();
    let kinds: Vec<_> = outcomes.iter().map(Outcome::kind).collect();
    assert_eq!(
        kinds,
        ["executed", "released", "replayed", "executed", "mismatch"]
    );
    assert!(matches!(outcomes[2], Outcome::Replayed(0)));
    // "a" and "bad" ran under one savepoint; "bad" failed, which rolled back "a" too, so the
    // batch ran again with a savepoint per handler: a, then b ("bad" is not run again: its
    // release stands).
    assert_eq!(ran.load(Ordering::SeqCst), 4);
    assert_eq!(
        (
            ledger.rows("a").await,
            ledger.rows("bad").await,
            ledger.rows("b").await
        ),
        (1, 0, 1)
    );
    let bad = store.get(&ns.key("bad").unwrap()).await.unwrap().unwrap();
    assert_eq!((bad.state, bad.attempts), (State::Released, 1));

    // A failure before any other handler wrote is undone alone, without running anything twice.
    let ids2 = ["bad2", "c"];
    let items: Vec<_> = ids2.iter().map(|id| (ns.key(*id).unwrap(), fp)).collect();
    let ran2 = ran.clone();
    let sqls: Vec<String> = ids2.iter().map(|id| ledger.insert(id)).collect();
    let outcomes: Vec<Outcome<(), String>> = store
        .run_batch_transactional(&items, &Config::default(), move |tx, i| {
            ran2.fetch_add(1, Ordering::SeqCst);
            let sql = sqls[i].clone();
            Box::pin(async move {
                tx.query_drop(sql).await.map_err(|e| e.to_string())?;
                if i == 0 {
                    return Err("bad item".to_owned());
                }
                Ok(())
            })
        })
        .await
        .unwrap();
    let kinds: Vec<_> = outcomes.iter().map(Outcome::kind).collect();
    assert_eq!(kinds, ["released", "executed"]);
    assert_eq!(ran.load(Ordering::SeqCst), 6);
    assert_eq!((ledger.rows("bad2").await, ledger.rows("c").await), (0, 1));
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_a_schema_error_that_says_how_to_create_it() {
    let Some(url) = url() else {
        return;
    };
    let store = MysqlStore::builder(url)
        .table(common::unique("missing"))
        .build()
        .unwrap();
    let key = namespace().key("x").unwrap();
    let err = store
        .claim(&idem::ClaimRequest::new(key, Fingerprint::of(b"p")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    assert!(err.to_string().contains("migrate()"), "{err}");
    let err = store.check_schema().await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    assert!(err.to_string().contains("migrate()"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_in_any_order_apply_each_effect_once() {
    // Batches that share keys, each listing them in another order: if their row locks were
    // taken in list order, two of them would deadlock (one would fail with Busy).
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let ns = namespace();
    let ids: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    let fp = Fingerprint::of(b"p");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut order = ids.clone();
        fastrand::Rng::with_seed(t).shuffle(&mut order);
        let items: Vec<_> = order.iter().map(|id| (ns.key(id).unwrap(), fp)).collect();
        let sqls: Vec<String> = order.iter().map(|id| ledger.insert(id)).collect();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let outcomes: Vec<Outcome<(), mysql_async::Error>> = store
                .run_batch_transactional(&items, &Config::default(), move |tx, i| {
                    let sql = sqls[i].clone();
                    Box::pin(async move { tx.query_drop(sql).await })
                })
                .await
                .expect("no deadlock, no error");
            outcomes.iter().filter(|o| o.is_executed()).count()
        }));
    }
    let mut executed = 0;
    for t in tasks {
        executed += t.await.unwrap();
    }
    assert_eq!(
        executed,
        ids.len(),
        "each key executes once across all batches"
    );
    for id in &ids {
        assert_eq!(ledger.rows(id).await, 1, "effect of {id}");
    }
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_connection_flags_do_not_change_outcomes() {
    // Whether the claim inserted the row is told by its token, not by "rows affected", whose
    // meaning depends on CLIENT_FOUND_ROWS: a caller's connection may have it either way.
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let opts = mysql_async::Opts::from_url(&url().unwrap()).unwrap();
    for found_rows in [false, true] {
        let pool = mysql_async::Pool::new(
            mysql_async::OptsBuilder::from_opts(opts.clone()).client_found_rows(found_rows),
        );
        let key = namespace().key("flags").unwrap();
        let config = Config::default().max_attempts(3);
        let mut kinds = Vec::new();
        for fails in [true, false, false] {
            let mut tx = pool
                .start_transaction(mysql_async::TxOpts::default())
                .await
                .unwrap();
            let sql = ledger.insert(&format!("flags-{found_rows}"));
            let outcome: Outcome<(), String> = store
                .run_in_transaction(&mut tx, &key, Fingerprint::of(b"p"), &config, |tx| {
                    Box::pin(async move {
                        tx.query_drop(sql).await.map_err(|e| e.to_string())?;
                        if fails {
                            Err("transient".to_owned())
                        } else {
                            Ok(())
                        }
                    })
                })
                .await
                .unwrap();
            tx.commit().await.unwrap();
            kinds.push(outcome.kind());
        }
        assert_eq!(
            kinds,
            ["released", "executed", "replayed"],
            "found_rows={found_rows}"
        );
        assert_eq!(ledger.rows(&format!("flags-{found_rows}")).await, 1);
        let rec = store.get(&key).await.unwrap().unwrap();
        assert_eq!((rec.state, rec.attempts), (State::Completed, 2));
        pool.disconnect().await.unwrap();
    }
    ledger.drop_table().await;
}
