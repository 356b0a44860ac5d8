//! Failover, counted: a private Redis Cluster (3 masters, 1 replica each, node timeout 1 s)
//! under a steady stream of claims and completions from concurrent workers; one master is
//! SIGKILLed mid-run and its replica takes over. Afterwards every claim and completion the
//! store acknowledged is looked up: a completion that vanished means the next duplicate runs
//! the handler again; a claim that vanished lets a redelivery run beside the first attempt.
//!
//! Once without and once with [`wait_for_replicas`](idem_redis::RedisStoreBuilder::wait_for_replicas)
//! (`WAIT 1`). Replication is asynchronous, so without `WAIT` losses are possible (and are
//! only reported: on loopback the replica is usually microseconds behind, so a run often loses
//! nothing); with `WAIT 1` a write is acknowledged only once the one replica, the one promoted,
//! holds it, so nothing acknowledged may be lost here (the test fails otherwise). `WAIT` does
//! not give that guarantee in general (several replicas and the wrong one promoted, or a
//! partition that leaves a master taking writes): see docs/redis-cluster.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod private_cluster;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem::{Claim, ClaimRequest, Completion, Fingerprint, Key, State, Store, WriteOutcome};
use idem_redis::RedisStore;
use private_cluster::PrivateCluster;

/// Concurrent workers, each claiming and completing one new key at a time.
const WORKERS: usize = 16;

/// What one run saw and what survived.
#[derive(Debug, Default)]
struct Counts {
    claims_acknowledged: usize,
    completions_acknowledged: usize,
    /// Acknowledged completions on the killed master's slots.
    completions_on_victim: usize,
    errors: usize,
    unacknowledged_writes: u64,
    /// Acknowledged completions whose record is gone or no longer completed afterwards.
    completions_lost: usize,
    /// Acknowledged claims (never completed) whose record is gone afterwards.
    claims_lost: usize,
    failover: Duration,
    ops_per_sec_before_kill: f64,
}

impl Counts {
    fn line(&self) -> String {
        format!(
            "claims acknowledged {}, completions acknowledged {} ({} on the killed master), \
             errors {}, unacknowledged writes {}, failover {:?}, {:.0} claim+complete/s before \
             the kill; LOST: {} completions, {} claims",
            self.claims_acknowledged,
            self.completions_acknowledged,
            self.completions_on_victim,
            self.errors,
            self.unacknowledged_writes,
            self.failover,
            self.ops_per_sec_before_kill,
            self.completions_lost,
            self.claims_lost
        )
    }
}

#[derive(Default)]
struct Seen {
    /// Claimed, and the completion was not acknowledged.
    claimed: Vec<Key>,
    /// Completed, with the key's slot on the victim or not.
    completed: Vec<(Key, bool)>,
    errors: usize,
    /// When each acknowledged completion came back, for the rate before the kill.
    done_at: Vec<Instant>,
}

fn req(k: &Key) -> ClaimRequest {
    ClaimRequest::new(k.clone(), Fingerprint::of(b"p"))
        .lease(Duration::from_secs(120))
        .retention(Duration::from_secs(300))
}

/// How the master dies.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// SIGKILL while its replica keeps up (on loopback, microseconds behind).
    Kill,
    /// SIGKILL while its replica lags 500 ms behind, as a slow replica or a broken link would:
    /// the replica is frozen (SIGSTOP) and the master drops its replication link (`CLIENT KILL
    /// TYPE replica`), 500 ms before the kill; the replica resumes right after it. Every write
    /// the master took in those 500 ms never reached the replica that takes over. (Freezing
    /// alone is not enough on loopback: what the master sent waits in the kernel's socket
    /// buffers and reaches the replica after the kill.)
    KillWhileReplicaLags,
}

async fn run(wait: bool, scenario: Scenario) -> Option<Counts> {
    let mut cluster = PrivateCluster::start(1000)?;
    let mut builder = RedisStore::builder(cluster.seeds_url())
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_millis(500))
        .expiry_grace(Duration::from_secs(60));
    if wait {
        // Shorter than the 500 ms the replica lags in `KillWhileReplicaLags`.
        builder = builder.wait_for_replicas(1, Duration::from_millis(200));
    }
    let store = builder
        .connect()
        .await
        .expect("connect to the private cluster");
    assert!(store.is_cluster());
    let victim = cluster.master_of(0);
    let replica = cluster.replica_of(&victim.id);
    let ns = idem_conformance::unique_namespace();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    // Which keys lie on the victim: its slot ranges, and the server's hash of each key.
    let ranges = Arc::new(victim.slots.clone());
    for w in 0..WORKERS {
        let (store, ns, stop, ranges) = (
            store.clone(),
            ns.clone(),
            Arc::clone(&stop),
            Arc::clone(&ranges),
        );
        workers.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let k = ns.key(format!("w{w}-{i}")).unwrap();
                let r = req(&k);
                match store.claim(&r).await {
                    Ok(Claim::Acquired(_)) => {}
                    Ok(other) => panic!("a new key {k} was {other:?}"),
                    Err(_) => {
                        seen.errors += 1;
                        // Back off a little, as a consumer would, while the cluster fails over.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
                let done = Completion::new(k.clone(), r.token, Bytes::from_static(b"done"));
                match store.complete(&done).await {
                    Ok(WriteOutcome::Applied) => {
                        let slot = key_slot(&store.record_key(&k));
                        let on_victim = ranges.iter().any(|&(a, b)| a <= slot && slot <= b);
                        seen.completed.push((k, on_victim));
                        seen.done_at.push(Instant::now());
                    }
                    Ok(other) => panic!("completing the claim of {k}: {other:?}"),
                    Err(_) => {
                        seen.errors += 1;
                        seen.claimed.push(k);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            seen
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Scenario::KillWhileReplicaLags = scenario {
        cluster.signal(replica.port, "STOP");
        let mut admin = PrivateCluster::client(victim.port).expect("connect to the master");
        let dropped: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query(&mut admin)
            .unwrap();
        assert_eq!(dropped, 1, "the master had one replica link");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let killed_at = Instant::now();
    cluster.kill(victim.port);
    if let Scenario::KillWhileReplicaLags = scenario {
        cluster.signal(replica.port, "CONT");
    }
    let failover = tokio::task::spawn_blocking({
        let slot = victim.slots[0].0;
        let port = victim.port;
        move || {
            let took = cluster.wait_failover(slot, port, Duration::from_secs(60));
            (cluster, took)
        }
    });
    let (cluster, took) = failover.await.unwrap();
    assert_eq!(
        cluster.master_of(victim.slots[0].0).port,
        replica.port,
        "the victim's replica took over"
    );
    // Load on the new master for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Seen::default();
    for w in workers {
        let s = w.await.unwrap();
        all.claimed.extend(s.claimed);
        all.completed.extend(s.completed);
        all.errors += s.errors;
        all.done_at.extend(s.done_at);
    }
    let before_kill = all.done_at.iter().filter(|t| **t < killed_at).count();
    let mut counts = Counts {
        claims_acknowledged: all.claimed.len() + all.completed.len(),
        completions_acknowledged: all.completed.len(),
        completions_on_victim: all.completed.iter().filter(|(_, v)| *v).count(),
        errors: all.errors,
        unacknowledged_writes: store.unacknowledged_writes(),
        failover: took,
        ops_per_sec_before_kill: before_kill as f64
            / killed_at.duration_since(started).as_secs_f64(),
        ..Counts::default()
    };
    // What survived, read on the cluster as it is now, by a store without WAIT: the promoted
    // master has no replica left, so a WAIT there would time out on every write (and, blocking
    // its connection, one after another).
    let store = RedisStore::builder(cluster.seeds_url())
        .connect()
        .await
        .expect("connect after the failover");
    let keys: Vec<&Key> = all.completed.iter().map(|(k, _)| k).collect();
    for chunk in keys.chunks(500) {
        let replays = store
            .claim_many(&chunk.iter().map(|k| req(k)).collect::<Vec<_>>())
            .await
            .expect("read back after the failover");
        for (k, c) in chunk.iter().zip(replays) {
            match c {
                Claim::Completed { .. } => {}
                other => {
                    counts.completions_lost += 1;
                    if counts.completions_lost <= 3 {
                        eprintln!("lost completion of {k}: the duplicate got {other:?}");
                    }
                }
            }
        }
    }
    for k in &all.claimed {
        match store.get(k).await.expect("read back after the failover") {
            Some(r) if matches!(r.state, State::InProgress | State::Completed) => {}
            other => {
                counts.claims_lost += 1;
                if counts.claims_lost <= 3 {
                    eprintln!("lost claim of {k}: {other:?}");
                }
            }
        }
    }
    // After the failover the store works: a new key is claimed and completed.
    let k = ns.key("after").unwrap();
    let r = req(&k);
    assert!(matches!(store.claim(&r).await.unwrap(), Claim::Acquired(_)));
    let done = Completion::new(k, r.token, Bytes::new());
    assert!(store.complete(&done).await.unwrap().is_applied());
    drop(cluster);
    Some(counts)
}

/// The slot of a key, as Redis Cluster computes it (CRC16 of the hash tag, mod 16384).
fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    crc16_xmodem(tagged) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Failure reproduced: a master is SIGKILLed under load and its replica promoted, first with
/// the replica keeping up, then with the replica lagging by 500 ms. Counts what was lost
/// without and with `WAIT 1`: with it, nothing acknowledged may be lost; without it, the
/// lagging replica must cost acknowledged completions (else the counting is broken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_what_wait_did_not_cover() {
    let mut results = Vec::new();
    for scenario in [Scenario::Kill, Scenario::KillWhileReplicaLags] {
        for wait in [false, true] {
            let Some(c) = run(wait, scenario).await else {
                return;
            };
            let name = format!("{scenario:?}, {}", if wait { "WAIT 1" } else { "no WAIT" });
            eprintln!("{name}: {}", c.line());
            results.push((name, scenario, wait, c));
        }
    }
    for (name, scenario, wait, c) in &results {
        assert!(
            c.completions_on_victim > 50,
            "{name}: the killed master took part in the run: {c:?}"
        );
        assert!(
            c.errors > 0,
            "{name}: the outage must be seen by the workers: {c:?}"
        );
        if *wait {
            assert_eq!(
                (c.completions_lost, c.claims_lost),
                (0, 0),
                "{name}: with WAIT 1 and one replica per master, a write acknowledged by the \
                 replica that was promoted cannot be lost: {c:?}"
            );
        }
        if let Scenario::KillWhileReplicaLags = scenario {
            if *wait {
                assert!(
                    c.unacknowledged_writes > 0,
                    "{name}: writes the frozen replica did not take must be refused: {c:?}"
                );
            } else {
                assert!(
                    c.completions_lost > 0,
                    "{name}: completions acknowledged while the replica lagged are lost: {c:?}"
                );
            }
        }
    }
}

/// Durability option on a cluster whose master lost its replica (SIGKILL; the cluster stays
/// ok): with `WAIT 1`, claims of keys on that master return a transient error saying no replica
/// acknowledged, counted by the store; keys on the other masters are claimed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_without_its_replica_cannot_confirm_with_wait() {
    let Some(mut cluster) = PrivateCluster::start(1000) else {
        return;
    };
    let master = cluster.master_of(0);
    let replica = cluster.replica_of(&master.id);
    cluster.kill(replica.port);
    cluster.wait_ok(Duration::from_secs(30));
    let store = RedisStore::builder(cluster.url())
        .wait_for_replicas(1, Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let ns = idem_conformance::unique_namespace();
    let (mut refused, mut claimed) = (0, 0);
    for i in 0..30 {
        let k = ns.key(format!("k{i}")).unwrap();
        let slot = key_slot(&store.record_key(&k));
        let alone = master.slots.iter().any(|&(a, b)| a <= slot && slot <= b);
        match store.claim(&req(&k)).await {
            Err(e) if alone => {
                assert_eq!(e.kind(), idem::StoreErrorKind::Unavailable, "{e}");
                assert!(e.to_string().contains("0 of 1 replica"), "{e}");
                refused += 1;
            }
            Ok(Claim::Acquired(_)) if !alone => claimed += 1,
            other => panic!("key {k} (on the master without replica: {alone}): {other:?}"),
        }
    }
    assert!(
        refused > 0 && claimed > 0,
        "{refused} refused, {claimed} claimed"
    );
    assert_eq!(store.unacknowledged_writes(), refused);
}

/// Failure reproduced: resharding moves a slot to another master while the store's map of
/// which master serves which slot (used to group a batch's keys into one pipeline per master)
/// still has the old owner. The batch sent on the stale map either succeeds or fails with a
/// transient error; the next one, on the map read again, is right, and the records moved with
/// their slot are replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_recover_when_a_slot_moves() {
    let Some(cluster) = PrivateCluster::start(5000) else {
        return;
    };
    let store = RedisStore::builder(cluster.url()).connect().await.unwrap();
    let from = cluster.master_of(0);
    let to = cluster.master_of(16383);
    assert_ne!(from.port, to.port);
    let ns = idem_conformance::unique_namespace();
    // A key in slot 0 (the one that moves), and two more keys on its master.
    let on = |i: u32| ns.key(format!("k{i}")).unwrap();
    let slot_of = |k: &Key| key_slot(&store.record_key(k));
    let moving = (0..)
        .map(on)
        .find(|k| slot_of(k) == 0)
        .expect("a key in slot 0");
    let mut staying = (0..)
        .map(on)
        .filter(|k| {
            let s = slot_of(k);
            s != 0 && from.slots.iter().any(|&(a, b)| a <= s && s <= b)
        })
        .take(2);
    let (kept, new) = (staying.next().unwrap(), staying.next().unwrap());
    let before: Vec<ClaimRequest> = [&moving, &kept].into_iter().map(req).collect();
    assert!(
        store
            .claim_many(&before)
            .await
            .unwrap()
            .iter()
            .all(|c| matches!(c, Claim::Acquired(_)))
    );
    let done: Vec<Completion> = before
        .iter()
        .map(|r| Completion::new(r.key.clone(), r.token, Bytes::from_static(b"before")))
        .collect();
    store.complete_many(&done).await.unwrap();

    // Move slot 0 with its keys, as `redis-cli --cluster reshard` does.
    let mut src = PrivateCluster::client(from.port).unwrap();
    let mut dst = PrivateCluster::client(to.port).unwrap();
    let setslot = |c: &mut redis::Connection, args: &[&str]| {
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(0)
            .arg(args)
            .query(c)
            .unwrap();
    };
    setslot(&mut dst, &["IMPORTING", &from.id]);
    setslot(&mut src, &["MIGRATING", &to.id]);
    let keys: Vec<String> = redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(0)
        .arg(1000)
        .query(&mut src)
        .unwrap();
    assert!(keys.contains(&store.record_key(&moving)), "{keys:?}");
    let () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(to.port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(&keys)
        .query(&mut src)
        .unwrap();
    // The new owner first, then the old; the other masters learn it by gossip.
    setslot(&mut dst, &["NODE", &to.id]);
    setslot(&mut src, &["NODE", &to.id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.master_of(0).port != to.port {
        assert!(Instant::now() < deadline, "slot 0 never moved");
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.wait_ok(Duration::from_secs(30));
    assert_eq!(cluster.master_of(0).port, to.port);

    // The store still groups slot 0 with its old master's keys.
    let after: Vec<ClaimRequest> = [&moving, &kept, &new].into_iter().map(req).collect();
    match store.claim_many(&after).await {
        Ok(claims) => check_after(&claims),
        Err(e) => {
            assert!(e.is_transient(), "{e}");
            eprintln!("the batch on the stale map failed: {e}");
            check_after(&store.claim_many(&after).await.unwrap());
        }
    }
    // And the next batch is right at once.
    check_after(&store.claim_many(&after).await.unwrap());
}

/// Claims of `[moved completed key, kept completed key, new key]` after a slot moved.
fn check_after(claims: &[Claim]) {
    let before = Claim::Completed {
        result: Bytes::from_static(b"before"),
    };
    assert_eq!(claims[0], before, "the record moved with its slot");
    assert_eq!(claims[1], before);
    assert!(
        matches!(claims[2], Claim::Acquired(_) | Claim::InProgress { .. }),
        "{:?}",
        claims[2]
    );
}

#[test]
fn slots_match_redis() {
    // Known values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
    assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    assert_eq!(key_slot("foo"), 12182);
    assert_eq!(
        key_slot("{user1000}.following"),
        key_slot("{user1000}.followers")
    );
}
