//! Batches larger than one script call (256 keys): split into several calls in one round trip,
//! they must still behave exactly like the single forms in order, in both batching modes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use idem::{Claim, ClaimRequest, Completion, Fingerprint, Store, WriteOutcome};
use idem_conformance::server;
use idem_redis::{Batching, RedisStore};

async fn store(batching: Batching) -> Option<RedisStore> {
    let url = server::url(server::REDIS)?;
    Some(
        RedisStore::builder(url)
            .prefix(format!("idem-batches:{:016x}:", fastrand::u64(..)))
            .expiry_grace(Duration::from_secs(60))
            .batching(batching)
            .connect()
            .await
            .expect("connect to Redis"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_equal_single_forms_in_order() {
    for batching in [Batching::Script, Batching::Pipeline] {
        let Some(s) = store(batching).await else {
            return;
        };
        let ns = idem_conformance::unique_namespace();
        // 300 keys, then the same 300 again: the repeats fall into other script calls.
        let reqs: Vec<ClaimRequest> = (0..600)
            .map(|i| {
                ClaimRequest::new(
                    ns.key(format!("k{}", i % 300)).unwrap(),
                    Fingerprint::of(b"p"),
                )
                .lease(Duration::from_secs(60))
                .retention(Duration::from_secs(60))
            })
            .collect();
        let claims = s.claim_many(&reqs).await.unwrap();
        assert_eq!(claims.len(), 600);
        for (i, c) in claims.iter().enumerate() {
            if i < 300 {
                assert!(
                    matches!(c, Claim::Acquired(l) if l.token == reqs[i].token),
                    "{batching:?} claim {i}: {c:?}"
                );
            } else {
                assert!(
                    matches!(c, Claim::InProgress { .. }),
                    "{batching:?} repeat {i}: {c:?}"
                );
            }
        }
        let completions: Vec<Completion> = reqs
            .iter()
            .map(|r| Completion::new(r.key.clone(), r.token, Bytes::from(r.key.id().to_owned())))
            .collect();
        let written = s.complete_many(&completions).await.unwrap();
        assert!(written[..300].iter().all(|w| *w == WriteOutcome::Applied));
        assert!(
            written[300..].iter().all(|w| *w == WriteOutcome::LeaseLost),
            "{batching:?}: the repeats never held the claim"
        );
        let replays = s.claim_many(&reqs[..300]).await.unwrap();
        for (r, c) in reqs.iter().zip(&replays) {
            assert_eq!(
                *c,
                Claim::Completed {
                    result: Bytes::from(r.key.id().to_owned())
                }
            );
        }
        for r in &reqs[..300] {
            s.evict(&r.key).await.unwrap();
        }
    }
}
