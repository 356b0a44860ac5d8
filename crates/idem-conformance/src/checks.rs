//! One check per rule of the contract (section 3 and 7). Each panics with the rule it found
//! broken.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idem::{
    Acquisition, Claim, ClaimRequest, Completion, Fingerprint, Key, KeyError, Lease, MAX_ID_LEN,
    MAX_NAMESPACE_LEN, Namespace, State, Store, StoreErrorKind, Token, WriteOutcome,
};

use crate::Harness;

const FP_A: &[u8] = b"payload A";
const FP_B: &[u8] = b"payload B";

fn key(ns: &Namespace, id: &str) -> Key {
    ns.key(id)
        .unwrap_or_else(|e| panic!("test key {id:?} rejected: {e}"))
}

/// A claim request with lease `lease_units` and retention `retention_units` of the harness unit.
fn req<H: Harness>(
    h: &H,
    key: &Key,
    payload: &[u8],
    lease_units: u32,
    retention_units: u32,
) -> ClaimRequest {
    ClaimRequest::new(key.clone(), Fingerprint::of(payload))
        .lease(h.unit() * lease_units)
        .retention(h.unit() * retention_units)
}

fn completion<H: Harness>(h: &H, key: &Key, token: Token, result: &str) -> Completion {
    Completion::new(
        key.clone(),
        token,
        Bytes::copy_from_slice(result.as_bytes()),
    )
    .retention(h.unit() * 100)
}

async fn claim<S: Store>(store: &S, req: &ClaimRequest) -> Claim {
    store
        .claim(req)
        .await
        .unwrap_or_else(|e| panic!("claim of {} failed: {e}", req.key))
}

async fn acquire<S: Store>(store: &S, req: &ClaimRequest) -> Lease {
    match claim(store, req).await {
        Claim::Acquired(lease) => lease,
        other => panic!("claim of {} should be Acquired, got {other:?}", req.key),
    }
}

async fn complete<H: Harness>(h: &H, key: &Key, token: Token, result: &str) -> WriteOutcome {
    h.store()
        .complete(&completion(h, key, token, result))
        .await
        .unwrap_or_else(|e| panic!("complete of {key} failed: {e}"))
}

async fn get<S: Store>(store: &S, key: &Key) -> Option<idem::Record> {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get of {key} failed: {e}"))
}

async fn record<S: Store>(store: &S, key: &Key) -> idem::Record {
    get(store, key)
        .await
        .unwrap_or_else(|| panic!("record of {key} should exist"))
}

/// absent -> claim -> in progress (new token, lease, attempts 1), `Acquired`.
pub async fn claim_absent_acquires<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let r = req(h, &k, FP_A, 3, 100);
    let lease = acquire(&s, &r).await;
    assert_eq!(
        lease.token, r.token,
        "the lease must carry the claimer's token"
    );
    assert_eq!(lease.attempt, 1, "first claim is attempt 1");
    assert_eq!(lease.acquisition, Acquisition::New);
    let rec = record(&s, &k).await;
    assert_eq!(rec.key, k);
    assert_eq!(rec.state, State::InProgress);
    assert_eq!(rec.fingerprint, Fingerprint::of(FP_A));
    assert_eq!(rec.token, Some(r.token));
    assert_eq!(rec.owner.as_deref(), Some(&*r.owner));
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.lease_until, Some(lease.until));
    assert!(rec.result.is_none(), "an in-progress record has no result");
}

/// in progress, lease live -> claim -> unchanged, `InProgress { retry_after }`.
pub async fn claim_live_lease_is_in_progress<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let first = req(h, &k, FP_A, 3, 100);
    acquire(&s, &first).await;
    let second = req(h, &k, FP_A, 3, 100);
    match claim(&s, &second).await {
        Claim::InProgress { retry_after } => {
            assert!(retry_after > Duration::ZERO, "retry_after must be positive");
            assert!(
                retry_after <= h.unit() * 3,
                "retry_after {retry_after:?} must not exceed the remaining lease"
            );
        }
        other => panic!("a live lease must give InProgress, got {other:?}"),
    }
    let rec = record(&s, &k).await;
    assert_eq!(
        rec.token,
        Some(first.token),
        "an in-progress claim must not change the owner"
    );
    assert_eq!(
        rec.attempts, 1,
        "an in-progress claim must not count an attempt"
    );
}

/// in progress, lease expired -> claim -> in progress with a NEW token, attempts + 1: a takeover.
pub async fn expired_lease_is_taken_over<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let old = req(h, &k, FP_A, 1, 100);
    acquire(&s, &old).await;
    h.advance(h.unit() * 2).await;
    let new = req(h, &k, FP_A, 3, 100);
    let lease = acquire(&s, &new).await;
    assert_eq!(lease.acquisition, Acquisition::Takeover);
    assert_eq!(lease.attempt, 2, "a takeover counts an attempt");
    assert_ne!(lease.token, old.token);
    assert_eq!(record(&s, &k).await.token, Some(new.token));
}

/// completed within retention -> claim -> unchanged, `Completed(stored result)`.
pub async fn completed_is_replayed<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let r = req(h, &k, FP_A, 3, 100);
    acquire(&s, &r).await;
    assert_eq!(
        complete(h, &k, r.token, "result-1").await,
        WriteOutcome::Applied
    );
    for _ in 0..2 {
        match claim(&s, &req(h, &k, FP_A, 3, 100)).await {
            Claim::Completed { result } => assert_eq!(&result[..], b"result-1"),
            other => panic!("a completed key must replay its result, got {other:?}"),
        }
    }
    let rec = record(&s, &k).await;
    assert_eq!(rec.state, State::Completed);
    assert_eq!(rec.result.as_deref(), Some(&b"result-1"[..]));
    assert_eq!(rec.attempts, 1, "replays must not count attempts");
    assert!(
        rec.lease_until.is_none(),
        "a completed record holds no lease"
    );
}

/// any record with another fingerprint -> claim -> unchanged, `Mismatch`.
pub async fn mismatch_is_reported_in_every_state<H: Harness>(h: &H) {
    let s = h.store();
    let ns = h.namespace();
    let expect_mismatch = |c: Claim, state: &str| match c {
        Claim::Mismatch { stored } => assert_eq!(stored, Fingerprint::of(FP_A)),
        other => panic!("another fingerprint on a {state} record must be Mismatch, got {other:?}"),
    };

    let k = key(&ns, "in-progress");
    let r = req(h, &k, FP_A, 3, 100);
    acquire(&s, &r).await;
    expect_mismatch(claim(&s, &req(h, &k, FP_B, 3, 100)).await, "in-progress");
    assert_eq!(record(&s, &k).await.token, Some(r.token));

    let k = key(&ns, "completed");
    let r = req(h, &k, FP_A, 3, 100);
    acquire(&s, &r).await;
    assert!(complete(h, &k, r.token, "ok").await.is_applied());
    expect_mismatch(claim(&s, &req(h, &k, FP_B, 3, 100)).await, "completed");

    let k = key(&ns, "released");
    let r = req(h, &k, FP_A, 3, 100);
    acquire(&s, &r).await;
    let w = s
        .release(&k, r.token, h.unit() * 100)
        .await
        .expect("release");
    assert!(w.is_applied());
    expect_mismatch(claim(&s, &req(h, &k, FP_B, 3, 100)).await, "released");
    assert_eq!(record(&s, &k).await.state, State::Released);
}

/// any, token does NOT match -> complete / release / extend / fail -> unchanged, `LeaseLost`;
/// the stale owner's late complete does not overwrite the new result (acceptance scenario 3).
pub async fn stale_token_writes_are_refused<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let old = req(h, &k, FP_A, 1, 100);
    acquire(&s, &old).await;
    h.advance(h.unit() * 2).await;
    let new = req(h, &k, FP_A, 3, 100);
    acquire(&s, &new).await;

    // While the new owner runs, every write of the old owner is refused.
    let u = h.unit();
    assert_eq!(
        complete(h, &k, old.token, "old").await,
        WriteOutcome::LeaseLost
    );
    assert_eq!(
        s.release(&k, old.token, u).await.expect("release"),
        WriteOutcome::LeaseLost
    );
    assert_eq!(
        s.extend(&k, old.token, u * 5).await.expect("extend"),
        WriteOutcome::LeaseLost
    );
    assert_eq!(
        s.fail(&k, old.token, "old", u).await.expect("fail"),
        WriteOutcome::LeaseLost
    );
    let rec = record(&s, &k).await;
    assert_eq!(rec.state, State::InProgress);
    assert_eq!(
        rec.token,
        Some(new.token),
        "stale writes must not change the owner"
    );

    assert_eq!(
        complete(h, &k, new.token, "new").await,
        WriteOutcome::Applied
    );
    // After completion too, and with a token never issued.
    assert_eq!(
        complete(h, &k, old.token, "old").await,
        WriteOutcome::LeaseLost
    );
    assert_eq!(
        complete(h, &k, Token::random(), "x").await,
        WriteOutcome::LeaseLost
    );
    assert_eq!(
        s.release(&k, new.token, u).await.expect("release"),
        WriteOutcome::LeaseLost
    );
    assert_eq!(
        s.extend(&k, new.token, u).await.expect("extend"),
        WriteOutcome::LeaseLost
    );
    let rec = record(&s, &k).await;
    assert_eq!(rec.state, State::Completed);
    assert_eq!(
        rec.result.as_deref(),
        Some(&b"new"[..]),
        "the new result must stay intact"
    );

    // A write for a key that was never claimed.
    let absent = key(&h.namespace(), "absent");
    assert_eq!(
        complete(h, &absent, Token::random(), "x").await,
        WriteOutcome::LeaseLost
    );
    assert!(
        get(&s, &absent).await.is_none(),
        "a refused write must not create a record"
    );
}

/// in progress, token matches -> release -> released (no owner, attempts kept); re-claims count.
pub async fn release_then_reclaim_counts_attempts<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let mut r = req(h, &k, FP_A, 3, 100);
    for attempt in 1..=3 {
        let lease = acquire(&s, &r).await;
        assert_eq!(lease.attempt, attempt);
        let expected = if attempt == 1 {
            Acquisition::New
        } else {
            Acquisition::Retry
        };
        assert_eq!(lease.acquisition, expected);
        let w = s
            .release(&k, r.token, h.unit() * 100)
            .await
            .expect("release");
        assert_eq!(w, WriteOutcome::Applied);
        let rec = record(&s, &k).await;
        assert_eq!(rec.state, State::Released);
        assert_eq!(rec.attempts, attempt, "release keeps the attempt count");
        assert_eq!(rec.token, None, "a released record has no owner token");
        assert!(rec.lease_until.is_none());
        // The released token cannot complete any more.
        assert_eq!(
            complete(h, &k, r.token, "late").await,
            WriteOutcome::LeaseLost
        );
        r = req(h, &k, FP_A, 3, 100);
    }
}

/// in progress, token matches -> extend -> later deadline; the heartbeat keeps a claim alive.
pub async fn extend_keeps_the_lease_alive<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let u = h.unit();
    let owner = req(h, &k, FP_A, 2, 100);
    let lease = acquire(&s, &owner).await;
    h.advance(u).await;
    assert_eq!(
        s.extend(&k, owner.token, u * 2).await.expect("extend"),
        WriteOutcome::Applied
    );
    let rec = record(&s, &k).await;
    assert!(
        rec.lease_until.is_some_and(|l| l > lease.until),
        "extend must move the deadline later"
    );
    // Past the original deadline, within the extended one.
    h.advance(u * 3 / 2).await;
    assert!(
        matches!(
            claim(&s, &req(h, &k, FP_A, 2, 100)).await,
            Claim::InProgress { .. }
        ),
        "an extended lease must still be live after its original deadline"
    );
    h.advance(u).await;
    let taker = req(h, &k, FP_A, 2, 100);
    assert_eq!(acquire(&s, &taker).await.acquisition, Acquisition::Takeover);
    assert_eq!(
        complete(h, &k, owner.token, "late").await,
        WriteOutcome::LeaseLost
    );
}

/// in progress, token matches -> fail -> failed (kept); claims return `Exhausted`.
pub async fn fail_makes_claims_exhausted<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let r = req(h, &k, FP_A, 3, 100);
    acquire(&s, &r).await;
    let w = s
        .fail(&k, r.token, "poison: bad amount", h.unit() * 100)
        .await
        .expect("fail");
    assert_eq!(w, WriteOutcome::Applied);
    let rec = record(&s, &k).await;
    assert_eq!(rec.state, State::Failed);
    assert_eq!(
        rec.result.as_deref(),
        Some(&b"poison: bad amount"[..]),
        "fail keeps its reason"
    );
    for _ in 0..2 {
        match claim(&s, &req(h, &k, FP_A, 3, 100)).await {
            Claim::Exhausted { attempts, reason } => {
                assert_eq!(attempts, 1);
                assert_eq!(
                    reason, "poison: bad amount",
                    "Exhausted must carry the stored reason"
                );
            }
            other => panic!("a failed key must give Exhausted, got {other:?}"),
        }
    }
    let again = s.fail(&k, r.token, "again", h.unit()).await.expect("fail");
    assert_eq!(
        again,
        WriteOutcome::Applied,
        "a repeated fail by the same token is applied"
    );
    assert_eq!(
        complete(h, &k, r.token, "late").await,
        WriteOutcome::LeaseLost
    );
}

/// A claim that would start attempt `max + 1` (after releases or takeovers) fails the record and
/// returns `Exhausted`.
pub async fn max_attempts_exhaust_on_claim<H: Harness>(h: &H) {
    let s = h.store();
    let ns = h.namespace();
    let max = std::num::NonZeroU32::new(2);

    let k = key(&ns, "released");
    for attempt in 1..=2 {
        let r = req(h, &k, FP_A, 3, 100).max_attempts(max);
        assert_eq!(acquire(&s, &r).await.attempt, attempt);
        assert!(
            s.release(&k, r.token, h.unit() * 100)
                .await
                .expect("release")
                .is_applied()
        );
    }
    match claim(&s, &req(h, &k, FP_A, 3, 100).max_attempts(max)).await {
        Claim::Exhausted { attempts, .. } => assert_eq!(attempts, 2),
        other => panic!("attempt 3 of at most 2 must be Exhausted, got {other:?}"),
    }
    assert_eq!(record(&s, &k).await.state, State::Failed);

    // A consumer that dies every time (lease expiry) is exhausted too.
    let k = key(&ns, "crashing");
    let one = std::num::NonZeroU32::new(1);
    acquire(&s, &req(h, &k, FP_A, 1, 100).max_attempts(one)).await;
    h.advance(h.unit() * 2).await;
    match claim(&s, &req(h, &k, FP_A, 1, 100).max_attempts(one)).await {
        Claim::Exhausted { attempts, .. } => assert_eq!(attempts, 1),
        other => panic!("a takeover past max attempts must be Exhausted, got {other:?}"),
    }
    assert_eq!(record(&s, &k).await.state, State::Failed);
}

/// any -> evict -> absent; the key is then processed as new.
pub async fn evict_forgets_the_key<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let r = req(h, &k, FP_A, 3, 100);
    acquire(&s, &r).await;
    assert!(complete(h, &k, r.token, "done").await.is_applied());
    assert!(
        s.evict(&k).await.expect("evict"),
        "evict of an existing record returns true"
    );
    assert!(get(&s, &k).await.is_none());
    assert!(
        !s.evict(&k).await.expect("evict"),
        "evict of an absent key returns false"
    );

    let again = req(h, &k, FP_B, 3, 100);
    let lease = acquire(&s, &again).await;
    assert_eq!((lease.attempt, lease.acquisition), (1, Acquisition::New));
    // Evicting an in-progress record fences out its owner.
    assert!(s.evict(&k).await.expect("evict"));
    assert_eq!(
        complete(h, &k, again.token, "late").await,
        WriteOutcome::LeaseLost
    );
    assert!(
        get(&s, &k).await.is_none(),
        "a refused complete must not recreate the record"
    );
}

/// completed past retention -> claim -> acquired again (`Reprocess`), as documented.
pub async fn retention_expiry_reprocesses<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let u = h.unit();
    let r = req(h, &k, FP_A, 3, 100);
    acquire(&s, &r).await;
    let c = Completion::new(k.clone(), r.token, Bytes::from_static(b"v1")).retention(u * 2);
    assert!(s.complete(&c).await.expect("complete").is_applied());
    h.advance(u).await;
    assert!(
        matches!(
            claim(&s, &req(h, &k, FP_A, 3, 100)).await,
            Claim::Completed { .. }
        ),
        "within retention the key is a duplicate"
    );
    h.advance(u * 2).await;
    // Past retention even another payload is a new message: the old record no longer counts.
    let lease = acquire(&s, &req(h, &k, FP_B, 3, 100)).await;
    assert_eq!(lease.acquisition, Acquisition::Reprocess);
    assert_eq!(lease.attempt, 1, "reprocessing starts the attempts afresh");
    assert_eq!(record(&s, &k).await.fingerprint, Fingerprint::of(FP_B));
}

/// Purge deletes expired records in bounded batches and keeps live ones.
pub async fn purge_removes_only_expired<H: Harness>(h: &H) {
    let s = h.store();
    let ns = h.namespace();
    let u = h.unit();
    let mut short = Vec::new();
    for i in 0..5 {
        let k = key(&ns, &format!("short-{i}"));
        let r = req(h, &k, FP_A, 3, 100);
        acquire(&s, &r).await;
        let c = Completion::new(k.clone(), r.token, Bytes::new()).retention(u);
        assert!(s.complete(&c).await.expect("complete").is_applied());
        short.push(k);
    }
    let long = key(&ns, "long");
    let r = req(h, &long, FP_A, 3, 100);
    acquire(&s, &r).await;
    assert!(complete(h, &long, r.token, "keep").await.is_applied());
    let live = key(&ns, "in-progress");
    acquire(&s, &req(h, &live, FP_A, 100, 100)).await;

    h.advance(u * 2).await;
    let mut rounds = 0;
    loop {
        let n = s.purge_expired(2).await.expect("purge");
        assert!(
            n <= 2,
            "purge must respect its limit, deleted {n} with limit 2"
        );
        rounds += 1;
        if n == 0 {
            break;
        }
        assert!(rounds < 10_000, "purge does not terminate");
    }
    for k in &short {
        assert!(
            get(&s, k).await.is_none(),
            "expired record {k} must be purged"
        );
    }
    assert_eq!(
        record(&s, &long).await.state,
        State::Completed,
        "live records stay"
    );
    assert_eq!(
        record(&s, &live).await.state,
        State::InProgress,
        "live claims stay"
    );
}

/// 32 concurrent claimers of one key: exactly one `Acquired` (acceptance scenario 2).
pub async fn concurrent_claimers_have_one_winner<H: Harness>(h: &H) {
    const CLAIMERS: usize = 32;
    let k = key(&h.namespace(), "contended");
    let barrier = Arc::new(tokio::sync::Barrier::new(CLAIMERS));
    let mut tasks = Vec::new();
    for _ in 0..CLAIMERS {
        let s = h.store();
        let r = req(h, &k, FP_A, 10, 100);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let claim = s.claim(&r).await;
            (r.token, claim)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (token, claim) = t.await.expect("claimer task panicked");
        match claim.expect("claim failed") {
            Claim::Acquired(_) => winners.push(token),
            Claim::InProgress { .. } => {}
            other => panic!("a concurrent claimer got {other:?}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one of {CLAIMERS} claimers must win, got {}",
        winners.len()
    );
    assert_eq!(record(&h.store(), &k).await.token, Some(winners[0]));
}

/// `claim_many` / `complete_many` behave exactly like their single forms applied in order.
pub async fn batch_forms_equal_single_forms<H: Harness>(h: &H) {
    let s = h.store();
    let (ns_single, ns_batch) = (h.namespace(), h.namespace());
    let ids = ["a", "b", "a", "c"];
    let build = |ns: &Namespace| -> Vec<ClaimRequest> {
        ids.iter()
            .map(|id| {
                req(
                    h,
                    &key(ns, id),
                    if *id == "c" { FP_B } else { FP_A },
                    3,
                    100,
                )
            })
            .collect()
    };
    // Pre-existing state: "c" completed with another payload, so it is a Mismatch.
    for ns in [&ns_single, &ns_batch] {
        let k = key(ns, "c");
        let r = req(h, &k, FP_A, 3, 100);
        acquire(&s, &r).await;
        assert!(complete(h, &k, r.token, "c").await.is_applied());
    }
    let single_reqs = build(&ns_single);
    let mut single = Vec::new();
    for r in &single_reqs {
        single.push(claim(&s, r).await);
    }
    let batch_reqs = build(&ns_batch);
    let batch = s.claim_many(&batch_reqs).await.expect("claim_many");
    let shape = |c: &Claim| match c {
        Claim::Acquired(l) => format!("acquired attempt {} {:?}", l.attempt, l.acquisition),
        Claim::InProgress { .. } => "in progress".to_owned(),
        other => format!("{other:?}"),
    };
    assert_eq!(
        single.iter().map(shape).collect::<Vec<_>>(),
        batch.iter().map(shape).collect::<Vec<_>>(),
        "claim_many must equal claims in order"
    );
    assert_eq!(batch.len(), 4);
    assert!(
        matches!(batch[2], Claim::InProgress { .. }),
        "a key repeated in a batch is in progress"
    );

    // Complete a, b, plus a stale token for a.
    let complete_reqs = |reqs: &[ClaimRequest]| {
        vec![
            completion(h, &reqs[0].key, reqs[0].token, "ra"),
            completion(h, &reqs[1].key, reqs[1].token, "rb"),
            completion(h, &reqs[2].key, reqs[2].token, "stale"),
        ]
    };
    let mut single_w = Vec::new();
    for c in complete_reqs(&single_reqs) {
        single_w.push(s.complete(&c).await.expect("complete"));
    }
    let batch_w = s
        .complete_many(&complete_reqs(&batch_reqs))
        .await
        .expect("complete_many");
    assert_eq!(
        single_w, batch_w,
        "complete_many must equal completes in order"
    );
    assert_eq!(
        batch_w,
        [
            WriteOutcome::Applied,
            WriteOutcome::Applied,
            WriteOutcome::LeaseLost
        ]
    );
    let replays = s
        .claim_many(&build(&ns_batch)[..2])
        .await
        .expect("claim_many");
    assert_eq!(
        replays,
        [
            Claim::Completed {
                result: Bytes::from_static(b"ra")
            },
            Claim::Completed {
                result: Bytes::from_static(b"rb")
            },
        ]
    );
    assert!(
        s.claim_many(&[])
            .await
            .expect("empty claim_many")
            .is_empty()
    );
    assert!(
        s.complete_many(&[])
            .await
            .expect("empty complete_many")
            .is_empty()
    );
}

/// A result over the limit is a clear `ResultTooLarge` error at `complete`, and nothing is
/// written (never a truncated record).
pub async fn oversized_results_are_rejected<H: Harness>(h: &H) {
    let s = h.store();
    let ns = h.namespace();
    let limit = s.max_result_bytes();
    let k = key(&ns, "big");
    let r = req(h, &k, FP_A, 10, 100);
    acquire(&s, &r).await;
    let too_big = Completion::new(k.clone(), r.token, Bytes::from(vec![7u8; limit + 1]));
    let err = s
        .complete(&too_big)
        .await
        .expect_err("an oversized result must be rejected");
    assert_eq!(
        err.kind(),
        StoreErrorKind::ResultTooLarge,
        "wrong error kind: {err}"
    );
    assert!(
        err.to_string().contains(&(limit + 1).to_string()),
        "the error must name the size: {err}"
    );
    let rec = record(&s, &k).await;
    assert_eq!(
        rec.state,
        State::InProgress,
        "a rejected result must leave the claim as it was"
    );

    // A batch with one oversized result writes nothing.
    let k2 = key(&ns, "small");
    let r2 = req(h, &k2, FP_A, 10, 100);
    acquire(&s, &r2).await;
    let batch = [completion(h, &k2, r2.token, "fine"), too_big.clone()];
    let err = s
        .complete_many(&batch)
        .await
        .expect_err("batch with an oversized result");
    assert_eq!(err.kind(), StoreErrorKind::ResultTooLarge);
    assert_eq!(
        record(&s, &k2).await.state,
        State::InProgress,
        "the batch must write nothing"
    );

    // Exactly at the limit is fine.
    let at_limit = Completion::new(k.clone(), r.token, Bytes::from(vec![7u8; limit]));
    assert!(
        s.complete(&at_limit)
            .await
            .expect("complete at the limit")
            .is_applied()
    );
    assert_eq!(record(&s, &k).await.result.map(|r| r.len()), Some(limit));
}

/// Keys at the size limits and with unusual characters are stored exactly; invalid keys never
/// reach a store (they cannot be built).
pub async fn keys_at_the_limits_round_trip<H: Harness>(h: &H) {
    let s = h.store();
    let ns = h.namespace();
    let long_ns = Namespace::new(format!(
        "{}{}",
        ns,
        "x".repeat(MAX_NAMESPACE_LEN - ns.as_str().len())
    ))
    .expect("64-byte namespace");
    let ids = [
        "x".repeat(MAX_ID_LEN),
        "ключ-💳-キー".to_owned(),
        "a:b|c\\d{e}f'g\"h%i_j*k?l[m]n".to_owned(),
        " leading and trailing spaces ".to_owned(),
    ];
    for id in &ids {
        for ns in [&ns, &long_ns] {
            let k = key(ns, id);
            let r = req(h, &k, FP_A, 3, 100);
            acquire(&s, &r).await;
            assert!(complete(h, &k, r.token, id).await.is_applied());
            let rec = record(&s, &k).await;
            assert_eq!(rec.key, k, "the key must round-trip exactly");
            assert_eq!(rec.result.as_deref(), Some(id.as_bytes()));
        }
    }
    // Near-identical keys stay distinct.
    let a = key(&ns, "k");
    let b = key(&ns, "K");
    acquire(&s, &req(h, &a, FP_A, 3, 100)).await;
    acquire(&s, &req(h, &b, FP_A, 3, 100)).await;

    assert!(matches!(ns.key(""), Err(KeyError::EmptyId)));
    assert!(matches!(
        ns.key("x".repeat(MAX_ID_LEN + 1)),
        Err(KeyError::IdTooLong { .. })
    ));
    assert!(matches!(
        ns.key("a\nb"),
        Err(KeyError::ControlCharacter { .. })
    ));
    assert!(matches!(
        Key::from_bytes(&ns, b"\xff"),
        Err(KeyError::NotUtf8 { .. })
    ));
}

/// The same id in two namespaces is two keys.
pub async fn namespaces_are_isolated<H: Harness>(h: &H) {
    let s = h.store();
    let (n1, n2) = (h.namespace(), h.namespace());
    let r1 = req(h, &key(&n1, "shared-id"), FP_A, 3, 100);
    let r2 = req(h, &key(&n2, "shared-id"), FP_B, 3, 100);
    acquire(&s, &r1).await;
    acquire(&s, &r2).await;
    assert!(complete(h, &r1.key, r1.token, "one").await.is_applied());
    assert_eq!(record(&s, &r2.key).await.state, State::InProgress);
}

/// Completing twice with the token that completed the record is applied and keeps the first
/// result: a retried write after a lost response is safe.
pub async fn complete_is_idempotent_for_its_token<H: Harness>(h: &H) {
    let s = h.store();
    let k = key(&h.namespace(), "m1");
    let r = req(h, &k, FP_A, 3, 100);
    acquire(&s, &r).await;
    assert_eq!(
        complete(h, &k, r.token, "first").await,
        WriteOutcome::Applied
    );
    assert_eq!(
        complete(h, &k, r.token, "second").await,
        WriteOutcome::Applied
    );
    assert_eq!(record(&s, &k).await.result.as_deref(), Some(&b"first"[..]));
    let empty = key(&h.namespace(), "empty");
    let r = req(h, &empty, FP_A, 3, 100);
    acquire(&s, &r).await;
    assert!(complete(h, &empty, r.token, "").await.is_applied());
    match claim(&s, &req(h, &empty, FP_A, 3, 100)).await {
        Claim::Completed { result } => assert!(result.is_empty()),
        other => panic!("an empty result must replay as empty, got {other:?}"),
    }
}
