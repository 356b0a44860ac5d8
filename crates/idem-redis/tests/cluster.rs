//! The store on a Redis Cluster: the conformance suite (in both batching modes, and with
//! `WAIT` for a replica), batches across slots and masters, the operator views and purges
//! over every master, scripts reloaded on every master, seed lists.
//!
//! The cluster is the shared one `.ci/run` starts (`.ci/brokers/redis_cluster.sh`): 3 masters
//! with a replica each. Its address is `IDEM_REDIS_CLUSTER_URL`, default
//! `redis://127.0.0.1:7000`, possibly a comma-separated seed list
//! (`redis://127.0.0.1:7000,127.0.0.1:7001`). With `CI` set, an unreachable cluster fails the
//! tests; otherwise they are skipped loudly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use idem::{
    Claim, ClaimRequest, Completion, Fingerprint, Inspect, Key, State, Store, WriteOutcome,
};
use idem_conformance::{RealTimeHarness, server};
use idem_redis::{Batching, RedisStore, redis};

/// Far above a loopback round trip, even on a busy two-core machine.
const UNIT: Duration = Duration::from_millis(300);

/// The cluster's URL, if its first seed accepts connections (see the module docs).
fn cluster_url() -> Option<String> {
    let url = std::env::var("IDEM_REDIS_CLUSTER_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:7000".to_owned());
    // The first seed: `scheme://[user@]host:port` up to the first comma.
    let first = url.split(',').next().unwrap_or(&url);
    let addr = server::host_port(first).and_then(|(host, port)| {
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .ok()?
            .next()
    });
    let reachable = match addr {
        Some(addr) => std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map(drop)
            .map_err(|e| e.to_string()),
        None => Err("cannot parse or resolve the first seed".to_owned()),
    };
    match reachable {
        Ok(()) => Some(url),
        Err(why) => idem_testkit::missing(format!(
            "Redis Cluster IDEM_REDIS_CLUSTER_URL={} is unreachable ({why})",
            server::redact(&url)
        )),
    }
}

async fn store_with(
    f: impl FnOnce(idem_redis::RedisStoreBuilder) -> idem_redis::RedisStoreBuilder,
) -> Option<RedisStore> {
    let url = cluster_url()?;
    let builder = RedisStore::builder(url)
        .prefix(format!("idem-cluster:{:016x}:", fastrand::u64(..)))
        // Longer than any check, short enough that the records leave the shared cluster soon.
        .expiry_grace(Duration::from_secs(60));
    let store = f(builder)
        .connect()
        .await
        .expect("connect to Redis Cluster");
    assert!(store.is_cluster(), "{store:?} must be a cluster store");
    Some(store)
}

async fn harness(batching: Batching, wait: bool) -> Option<RealTimeHarness<RedisStore>> {
    let store = store_with(|b| {
        let b = b.batching(batching);
        if wait {
            b.wait_for_replicas(1, Duration::from_secs(1))
        } else {
            b
        }
    })
    .await?;
    Some(RealTimeHarness::new(store, UNIT).property_cases(12))
}

async fn script() -> Option<RealTimeHarness<RedisStore>> {
    harness(Batching::Script, false).await
}

async fn pipeline() -> Option<RealTimeHarness<RedisStore>> {
    harness(Batching::Pipeline, false).await
}

async fn script_wait() -> Option<RealTimeHarness<RedisStore>> {
    harness(Batching::Script, true).await
}

mod batch_script {
    idem_conformance::conformance_tests!(super::script);
}

mod batch_pipeline {
    idem_conformance::conformance_tests!(super::pipeline);
}

mod wait_for_a_replica {
    idem_conformance::conformance_tests!(super::script_wait);
}

fn req(k: &Key) -> ClaimRequest {
    ClaimRequest::new(k.clone(), Fingerprint::of(b"p"))
        .lease(Duration::from_secs(60))
        .retention(Duration::from_secs(60))
}

/// The port of the master serving each key's slot, as the cluster reports it.
async fn masters_of(store: &RedisStore, keys: &[Key]) -> HashSet<i64> {
    let mut conn = store.connection();
    let slots: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(ranges) = slots else {
        panic!("CLUSTER SLOTS: {slots:?}")
    };
    let ranges: Vec<(u16, u16, i64)> = ranges
        .into_iter()
        .map(|r| {
            let redis::Value::Array(f) = r else {
                panic!("{r:?}")
            };
            let (redis::Value::Int(a), redis::Value::Int(b), redis::Value::Array(m)) =
                (&f[0], &f[1], &f[2])
            else {
                panic!("{f:?}")
            };
            let redis::Value::Int(port) = m[1] else {
                panic!("{m:?}")
            };
            (u16::try_from(*a).unwrap(), u16::try_from(*b).unwrap(), port)
        })
        .collect();
    let mut ports = HashSet::new();
    for k in keys {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(store.record_key(k))
            .query_async(&mut conn)
            .await
            .unwrap();
        let port = ranges
            .iter()
            .find(|(a, b, _)| *a <= slot && slot <= *b)
            .map(|r| r.2)
            .unwrap();
        ports.insert(port);
    }
    ports
}

/// What the client must do on a cluster: a batch spans many slots on every master (a script
/// call spanning slots would be refused with CROSSSLOT), larger than one script call, with
/// repeats of the same keys later in the batch; it must behave exactly like the single forms
/// in order, in both batching modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_span_slots_and_masters_in_order() {
    for batching in [Batching::Script, Batching::Pipeline] {
        let Some(s) = store_with(|b| b.batching(batching)).await else {
            return;
        };
        let ns = idem_conformance::unique_namespace();
        let reqs: Vec<ClaimRequest> = (0..600)
            .map(|i| req(&ns.key(format!("k{}", i % 300)).unwrap()))
            .collect();
        let keys: Vec<Key> = reqs[..300].iter().map(|r| r.key.clone()).collect();
        assert_eq!(
            masters_of(&s, &keys).await.len(),
            3,
            "300 keys land on all 3 masters"
        );
        let claims = s.claim_many(&reqs).await.unwrap();
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
        for k in &keys {
            assert!(s.evict(k).await.unwrap());
        }
    }
}

/// The operator views, `scan_keys` and purges walk every master: records spread over the 3
/// masters are all counted, listed and purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_views_and_purges_cover_every_master() {
    let Some(s) = store_with(|b| b.expiry_grace(Duration::from_secs(60))).await else {
        return;
    };
    let ns = idem_conformance::unique_namespace();
    let held: Vec<Key> = (0..30)
        .map(|i| ns.key(format!("held-{i}")).unwrap())
        .collect();
    let gone: Vec<Key> = (0..30)
        .map(|i| ns.key(format!("gone-{i}")).unwrap())
        .collect();
    assert_eq!(masters_of(&s, &held).await.len(), 3);
    assert_eq!(masters_of(&s, &gone).await.len(), 3);
    s.claim_many(&held.iter().map(req).collect::<Vec<_>>())
        .await
        .unwrap();
    for k in &gone {
        let r = req(k);
        s.claim(&r).await.unwrap();
        let w = s
            .release(k, r.token, Duration::from_millis(1))
            .await
            .unwrap();
        assert!(w.is_applied());
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        s.count_by_state().await.unwrap(),
        [(State::InProgress, 30), (State::Released, 30)]
    );
    let listed: HashSet<Key> = s
        .in_progress(100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(listed, held.iter().cloned().collect());
    let pattern = format!("{}*", s.prefix());
    let scanned: HashSet<Vec<u8>> = s.scan_keys(&pattern).await.unwrap().into_iter().collect();
    assert_eq!(scanned.len(), 60, "scan_keys sees every master");
    assert_eq!(s.purge_expired(1000).await.unwrap(), 30);
    assert_eq!(s.count_by_state().await.unwrap(), [(State::InProgress, 30)]);
    for k in &held {
        assert!(s.evict(k).await.unwrap());
    }
}

/// Every master forgets the scripts (`SCRIPT FLUSH` everywhere, as after a failover to replicas
/// that never loaded them): every operation, single and batched, loads them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_on_every_master() {
    let Some(s) = store_with(|b| b).await else {
        return;
    };
    let mut conn = s.connection();
    let flush = async |conn: &mut idem_redis::RedisConnection| {
        // The cluster client sends SCRIPT FLUSH to every node.
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(conn)
            .await
            .unwrap();
    };
    let ns = idem_conformance::unique_namespace();
    let reqs: Vec<ClaimRequest> = (0..30)
        .map(|i| req(&ns.key(format!("k{i}")).unwrap()))
        .collect();
    flush(&mut conn).await;
    let claims = s.claim_many(&reqs).await.unwrap();
    assert!(claims.iter().all(|c| matches!(c, Claim::Acquired(_))));
    flush(&mut conn).await;
    let done: Vec<Completion> = reqs
        .iter()
        .map(|r| Completion::new(r.key.clone(), r.token, Bytes::from_static(b"r")))
        .collect();
    let w = s.complete_many(&done).await.unwrap();
    assert!(w.iter().all(|w| *w == WriteOutcome::Applied));
    flush(&mut conn).await;
    let t = idem::Token::random();
    assert_eq!(
        s.extend(&reqs[0].key, t, Duration::from_secs(1))
            .await
            .unwrap(),
        WriteOutcome::LeaseLost
    );
    flush(&mut conn).await;
    assert_eq!(s.purge_expired(10).await.unwrap(), 0);
    for r in &reqs {
        s.evict(&r.key).await.unwrap();
    }
}

/// A comma-separated seed list connects (the first seed may be down: the next answers), and
/// the caller's own keyed commands on the store's connection route by slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_lists_connect_and_route() {
    let Some(url) = cluster_url() else {
        return;
    };
    let (scheme, rest) = url.split_once("://").unwrap();
    // A dead first seed (port 1 refuses), then the real ones.
    let seeds = format!("{scheme}://127.0.0.1:1,{rest}");
    let s = RedisStore::builder(seeds)
        .prefix(format!("idem-cluster:{:016x}:", fastrand::u64(..)))
        .connect()
        .await
        .expect("the second seed answers");
    assert!(s.is_cluster());
    let ns = idem_conformance::unique_namespace();
    let mut conn = s.connection();
    let mut written = HashMap::new();
    for i in 0..20 {
        let k = s.record_key(&ns.key(format!("raw{i}")).unwrap());
        let () = redis::cmd("SET")
            .arg(&k)
            .arg(i)
            .arg("EX")
            .arg(60)
            .query_async(&mut conn)
            .await
            .unwrap();
        written.insert(k, i);
    }
    for (k, i) in &written {
        let v: i64 = redis::cmd("GET")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(v, *i);
    }
    let keys: Vec<&String> = written.keys().collect();
    let n: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 20, "DEL across slots is split by the cluster client");
}
