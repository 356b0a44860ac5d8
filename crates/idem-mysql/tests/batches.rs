//! Batches that mix the store's paths: keys inserted by the optimistic round trip, keys whose
//! claim must change an existing record (the locked path), duplicates answered from the rows
//! read, and repeats of each within one batch. The outcome must equal single claims in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use idem::{Claim, ClaimRequest, Completion, Fingerprint, Key, Namespace, Store};
use idem_mysql::MysqlStore;

fn shape(c: &Claim) -> String {
    match c {
        Claim::Acquired(l) => format!("acquired {} {:?}", l.attempt, l.acquisition),
        Claim::InProgress { .. } => "in progress".to_owned(),
        Claim::Completed { result } => format!("completed {result:?}"),
        Claim::Mismatch { .. } => "mismatch".to_owned(),
        Claim::Exhausted { attempts, .. } => format!("exhausted {attempts}"),
        other => format!("{other:?}"),
    }
}

/// Released "r", completed "c", in progress "p", in namespace `ns`.
async fn prepare(store: &MysqlStore, ns: &Namespace) {
    let fp = Fingerprint::of(b"p");
    for id in ["r", "c", "p"] {
        let req = ClaimRequest::new(ns.key(id).unwrap(), fp);
        assert!(matches!(
            store.claim(&req).await.unwrap(),
            Claim::Acquired(_)
        ));
        let key = req.key.clone();
        match id {
            "r" => assert!(
                store
                    .release(&key, req.token, idem::DEFAULT_RETENTION)
                    .await
                    .unwrap()
                    .is_applied()
            ),
            "c" => assert!(
                store
                    .complete(&Completion::new(
                        key,
                        req.token,
                        Bytes::from_static(b"done")
                    ))
                    .await
                    .unwrap()
                    .is_applied()
            ),
            _ => {}
        }
    }
}

fn requests(ns: &Namespace) -> Vec<ClaimRequest> {
    let fp = Fingerprint::of(b"p");
    let key = |id: &str| -> Key { ns.key(id).unwrap() };
    ["new", "r", "c", "new", "r", "p", "c", "other-new"]
        .iter()
        .map(|id| ClaimRequest::new(key(id), fp))
        .chain(std::iter::once(ClaimRequest::new(
            key("c"),
            Fingerprint::of(b"another payload"),
        )))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batches_equal_single_claims_in_order() {
    let Some(url) = common::url() else {
        return;
    };
    let store = common::store(&url, "idem_batch_tests").await;
    let (single_ns, batch_ns) = (common::namespace(), common::namespace());
    prepare(&store, &single_ns).await;
    prepare(&store, &batch_ns).await;

    let mut single = Vec::new();
    for req in requests(&single_ns) {
        single.push(shape(&store.claim(&req).await.unwrap()));
    }
    let batch: Vec<String> = store
        .claim_many(&requests(&batch_ns))
        .await
        .unwrap()
        .iter()
        .map(shape)
        .collect();
    assert_eq!(single, batch);
    assert_eq!(
        batch,
        [
            "acquired 1 New",
            "acquired 2 Retry",
            "completed b\"done\"",
            "in progress",
            "in progress",
            "in progress",
            "completed b\"done\"",
            "acquired 1 New",
            "mismatch",
        ]
    );
}
