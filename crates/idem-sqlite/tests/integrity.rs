//! What the SQLite store does with records it cannot trust, with batches that fail halfway, and
//! whether group commit really groups.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use idem::{
    Acquisition, Claim, ClaimRequest, Completion, Fingerprint, Key, Namespace, Store,
    StoreErrorKind,
};
use idem_sqlite::SqliteStore;

fn key(id: &str) -> Key {
    Namespace::new("integrity").unwrap().key(id).unwrap()
}

fn request(id: &str) -> ClaimRequest {
    ClaimRequest::new(key(id), Fingerprint::of(id.as_bytes()))
}

/// Runs `sql` on the database file with a connection of its own (as a tool or a bug would).
fn tamper(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(sql).unwrap();
}

fn open(db: &Path) -> SqliteStore {
    SqliteStore::open(db).unwrap()
}

#[tokio::test]
async fn corrupt_records_are_errors_never_absent_or_empty() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idem.db");
    let store = open(&db);
    for id in ["typed", "no-result", "no-reason", "bad-state"] {
        let Claim::Acquired(lease) = store.claim(&request(id)).await.unwrap() else {
            panic!("{id}: not acquired");
        };
        let done = Completion::new(key(id), lease.token, b"ok".to_vec().into());
        assert!(store.complete(&done).await.unwrap().is_applied());
    }
    tamper(
        &db,
        "UPDATE idem_records SET state = 'two' WHERE id = 'typed';
         UPDATE idem_records SET result = NULL WHERE id = 'no-result';
         UPDATE idem_records SET state = 4, result = NULL WHERE id = 'no-reason';
         UPDATE idem_records SET state = 9 WHERE id = 'bad-state';",
    );
    for id in ["typed", "no-result", "no-reason", "bad-state"] {
        let err = store.claim(&request(id)).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{id}: {err}");
        assert!(
            err.to_string().contains(id),
            "{id}: the error names the key: {err}"
        );
        let err = store.get(&key(id)).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{id}: get: {err}");
    }
}

#[tokio::test]
async fn a_batch_that_fails_halfway_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idem.db");
    let store = open(&db);
    let Claim::Acquired(lease) = store.claim(&request("bad")).await.unwrap() else {
        panic!("not acquired");
    };
    tamper(&db, "UPDATE idem_records SET state = 9 WHERE id = 'bad'");

    // The good key comes first: without a rollback its claim would stay, holding the key for a
    // lease nobody knows the token of.
    let err = store
        .claim_many(&[request("good"), request("bad"), request("after")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
    for id in ["good", "after"] {
        assert!(
            store.get(&key(id)).await.unwrap().is_none(),
            "{id}: a failed batch left a claim behind"
        );
        match store.claim(&request(id)).await.unwrap() {
            Claim::Acquired(l) => assert_eq!(l.acquisition, Acquisition::New, "{id}"),
            other => panic!("{id}: {other:?}"),
        }
    }

    // The same for completions: the first of the batch is not applied alone.
    let Claim::Acquired(first) = store.claim(&request("first")).await.unwrap() else {
        panic!("not acquired");
    };
    let err = store
        .complete_many(&[
            Completion::new(key("first"), first.token, b"1".to_vec().into()),
            Completion::new(key("bad"), lease.token, b"2".to_vec().into()),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
    let rec = store.get(&key("first")).await.unwrap().unwrap();
    assert_eq!(
        rec.state,
        idem::State::InProgress,
        "a failed batch completed an item"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idem.db");
    let store = open(&db);
    // Every operation is correct under concurrency.
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    let id = format!("{t}-{i}");
                    let Claim::Acquired(lease) = store.claim(&request(&id)).await.unwrap() else {
                        panic!("{id}: not acquired");
                    };
                    let done = Completion::new(key(&id), lease.token, b"ok".to_vec().into());
                    assert!(store.complete(&done).await.unwrap().is_applied());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let before = store.stats();
    assert_eq!(before.operations, 64 * 50 * 2, "{before:?}");

    // Grouping, without depending on the machine's timing: another connection holds the write
    // lock while 64 claims arrive, so none can run inline and they all queue for the writer;
    // once the lock is released, the queue must go out in a few shared commits, not 64.
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let claims: Vec<_> = (0..64)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = format!("queued-{t}");
                let claim = store.claim(&request(&id)).await.unwrap();
                assert!(matches!(claim, Claim::Acquired(_)), "{id}: {claim:?}");
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    other.execute_batch("COMMIT").unwrap();
    for claim in claims {
        claim.await.unwrap();
    }
    let after = store.stats();
    assert_eq!(after.operations - before.operations, 64, "{after:?}");
    // One commit per operation would mean group commit is broken: each fsync (with FULL) or
    // WAL append would then be paid per message.
    let commits = after.commits - before.commits;
    eprintln!("64 queued operations: {commits} commits");
    assert!(
        commits <= 8,
        "64 queued operations took {commits} commits: {before:?} -> {after:?}"
    );
}
