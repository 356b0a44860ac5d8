//! Fault tests on private `redis-server`s (a free port, a temporary directory, killed on drop):
//! the server killed and restarted, frozen, flushed of its scripts, configured to evict; plus
//! corrupt records on the shared server. Each test says which failure it reproduces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod private_server;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem::{
    Acquisition, Claim, ClaimRequest, Completion, Executor, Fingerprint, Inspect, Key, Namespace,
    State, Store, StoreError, StoreErrorKind, Token, WriteOutcome,
};
use idem_conformance::server;
use idem_redis::{Batching, RedisStore};
use private_server::PrivateRedis;

/// Longer than any operation may take: an operation that has not returned by then hangs.
const HANG: Duration = Duration::from_secs(30);

fn ns() -> Namespace {
    idem_conformance::unique_namespace()
}

fn key(ns: &Namespace, id: &str) -> Key {
    ns.key(id).unwrap()
}

fn req(k: &Key) -> ClaimRequest {
    ClaimRequest::new(k.clone(), Fingerprint::of(b"payload")).lease(Duration::from_secs(30))
}

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {HANG:?}: it hangs"))
}

/// An error a consumer must treat as "back off and retry": never a success, never a hang.
fn assert_transient<T: std::fmt::Debug>(what: &str, r: Result<T, StoreError>) {
    match r {
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    StoreErrorKind::Unavailable | StoreErrorKind::Timeout
                ),
                "{what} while Redis is down must be Unavailable or Timeout, got {:?}: {e}",
                e.kind()
            );
            assert!(e.is_transient(), "{what}: {e} must be transient");
        }
        Ok(v) => panic!("{what} while Redis is down must fail, got Ok({v:?})"),
    }
}

async fn private_store(server: &PrivateRedis, batching: Batching) -> RedisStore {
    RedisStore::builder(server.url())
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_millis(500))
        .batching(batching)
        .connect()
        .await
        .expect("connect to the private server")
}

/// Failure reproduced: Redis dies (SIGKILL) in the middle of a stream of messages and comes
/// back on the same port. While it is down every operation must fail with a transient error
/// within its deadline (no success that did not happen, no hang), the executor must not run a
/// handler, and afterwards the same `RedisStore` must work again without being rebuilt,
/// reloading its scripts into the new server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_fails_closed_and_recovers() {
    let Some(mut server) = PrivateRedis::start(&[]) else {
        return;
    };
    for batching in [Batching::Script, Batching::Pipeline] {
        let store = private_store(&server, batching).await;
        let exec = Executor::new(store.clone());
        let ns = ns();
        let before = key(&ns, "before");
        let r = req(&before);
        assert!(matches!(store.claim(&r).await.unwrap(), Claim::Acquired(_)));
        let done = Completion::new(before.clone(), r.token, Bytes::from_static(b"ok"));
        assert_eq!(store.complete(&done).await.unwrap(), WriteOutcome::Applied);

        server.kill();

        let during = key(&ns, "during");
        let r2 = req(&during);
        let started = Instant::now();
        assert_transient("claim", bounded("claim", store.claim(&r2)).await);
        assert_transient(
            "claim_many",
            bounded("claim_many", store.claim_many(&[r2.clone(), req(&before)])).await,
        );
        assert_transient("complete", bounded("complete", store.complete(&done)).await);
        assert_transient(
            "complete_many",
            bounded(
                "complete_many",
                store.complete_many(&[done.clone(), done.clone()]),
            )
            .await,
        );
        let t = Token::random();
        let retention = Duration::from_secs(60);
        assert_transient(
            "release",
            bounded("release", store.release(&during, t, retention)).await,
        );
        assert_transient(
            "extend",
            bounded("extend", store.extend(&during, t, retention)).await,
        );
        assert_transient(
            "fail",
            bounded("fail", store.fail(&during, t, "x", retention)).await,
        );
        assert_transient("get", bounded("get", store.get(&during)).await);
        assert_transient("evict", bounded("evict", store.evict(&during)).await);
        assert_transient("now", bounded("now", store.now()).await);
        // The executor fails closed: an error, and the handler never runs without a claim.
        let ran = AtomicUsize::new(0);
        let outcome = bounded(
            "executor run",
            exec.run(during.clone(), b"payload", |_| async {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            }),
        )
        .await;
        match outcome {
            Err(idem::Error::Store(e)) => assert!(e.is_transient(), "{e}"),
            other => panic!("the executor must fail closed while Redis is down, got {other:?}"),
        }
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "a handler ran without a claim"
        );
        eprintln!(
            "{batching:?}: 12 operations failed over in {:?}",
            started.elapsed()
        );

        server.restart();

        // The same store reconnects by itself; the new server has no scripts loaded.
        let deadline = Instant::now() + HANG;
        let claim = loop {
            match store.claim(&r2).await {
                Ok(c) => break c,
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the store did not recover after the restart: {e}"),
            }
        };
        assert!(
            matches!(claim, Claim::Acquired(l) if l.acquisition == Acquisition::New),
            "{claim:?}"
        );
        // Without the append-only file the restart lost every record (see the crate docs):
        // the completed message is new again.
        assert!(
            matches!(store.claim(&req(&before)).await.unwrap(), Claim::Acquired(l) if l.acquisition == Acquisition::New),
            "a server without AOF forgets records on restart"
        );
        let outcome = exec
            .run(key(&ns, "after"), b"payload", |_| async {
                Ok::<_, std::io::Error>(())
            })
            .await
            .expect("the executor works again");
        assert_eq!(outcome.kind(), "executed");
    }
}

/// Failure reproduced: Redis with `appendonly yes` / `appendfsync always` is killed (SIGKILL)
/// right after a completion was acknowledged. The recommended configuration must keep the
/// record: the duplicate after the restart is replayed, not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_a_crash_with_aof_always() {
    let Some(mut server) = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"])
    else {
        return;
    };
    let store = private_store(&server, Batching::Script).await;
    assert_eq!(store.server_settings().appendonly, Some(true));
    let ns = ns();
    let k = key(&ns, "kept");
    let r = req(&k);
    assert!(matches!(store.claim(&r).await.unwrap(), Claim::Acquired(_)));
    let done = Completion::new(k.clone(), r.token, Bytes::from_static(b"result"));
    assert!(store.complete(&done).await.unwrap().is_applied());
    server.kill();
    server.restart();
    let deadline = Instant::now() + HANG;
    let claim = loop {
        match store.claim(&req(&k)).await {
            Ok(c) => break c,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    };
    assert_eq!(
        claim,
        Claim::Completed {
            result: Bytes::from_static(b"result")
        },
        "an acknowledged completion must survive a crash with appendfsync always (dir {:?})",
        server.dir()
    );
}

/// Failure reproduced: Redis stops answering without closing the connection (a frozen process,
/// SIGSTOP; the same as a network partition or a long fork). Operations must return `Timeout`
/// after the configured deadline instead of hanging, and work again once the server resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_times_out_then_recovers() {
    let Some(server) = PrivateRedis::start(&[]) else {
        return;
    };
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let ns = ns();
    assert!(matches!(
        store.claim(&req(&key(&ns, "a"))).await.unwrap(),
        Claim::Acquired(_)
    ));
    server.signal("STOP");
    let started = Instant::now();
    let err = bounded("claim", store.claim(&req(&key(&ns, "b"))))
        .await
        .expect_err("a frozen server cannot acquire a claim");
    assert_eq!(err.kind(), StoreErrorKind::Timeout, "{err}");
    assert!(
        err.to_string().contains("may or may not"),
        "a timeout must say the write may have happened: {err}"
    );
    eprintln!("timed out after {:?}", started.elapsed());
    server.signal("CONT");
    let deadline = Instant::now() + HANG;
    loop {
        match store.claim(&req(&key(&ns, "c"))).await {
            Ok(c) => {
                assert!(matches!(c, Claim::Acquired(_)), "{c:?}");
                break;
            }
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery after SIGCONT: {e}"),
        }
    }
}

/// Failure reproduced: the server forgets the scripts (`SCRIPT FLUSH`, as after a restart or a
/// failover to a replica that never loaded them). Every operation, single or batched in either
/// mode, must load the script again and give the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_after_script_flush() {
    let Some(server) = PrivateRedis::start(&[]) else {
        return;
    };
    let mut admin = server.client();
    let flush = |admin: &mut redis::Connection| {
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(admin).unwrap();
    };
    for batching in [Batching::Script, Batching::Pipeline] {
        let store = private_store(&server, batching).await;
        let ns = ns();
        let (a, b, c) = (key(&ns, "a"), key(&ns, "b"), key(&ns, "c"));
        flush(&mut admin);
        let ra = req(&a);
        assert!(matches!(
            store.claim(&ra).await.unwrap(),
            Claim::Acquired(_)
        ));
        flush(&mut admin);
        let (rb, rc) = (req(&b), req(&c));
        let claims = store
            .claim_many(&[rb.clone(), rc.clone(), req(&a)])
            .await
            .unwrap();
        assert!(matches!(claims[0], Claim::Acquired(_)));
        assert!(matches!(claims[1], Claim::Acquired(_)));
        assert!(matches!(claims[2], Claim::InProgress { .. }));
        flush(&mut admin);
        let done = |r: &ClaimRequest| Completion::new(r.key.clone(), r.token, Bytes::new());
        assert!(store.complete(&done(&ra)).await.unwrap().is_applied());
        flush(&mut admin);
        let w = store.complete_many(&[done(&rb), done(&rc)]).await.unwrap();
        assert_eq!(w, [WriteOutcome::Applied, WriteOutcome::Applied]);
        for (script_op, k) in [("release", &a), ("extend", &b), ("fail", &c)] {
            flush(&mut admin);
            let t = Token::random();
            let d = Duration::from_secs(60);
            let w = match script_op {
                "release" => store.release(k, t, d).await,
                "extend" => store.extend(k, t, d).await,
                _ => store.fail(k, t, "x", d).await,
            };
            assert_eq!(w.unwrap(), WriteOutcome::LeaseLost, "{script_op}");
        }
        flush(&mut admin);
        assert_eq!(store.purge_expired(10).await.unwrap(), 0);
    }
}

/// Commands the server counted since `CONFIG RESETSTAT`, without the test's own admin commands.
fn commandstats(admin: &mut redis::Connection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(admin).unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            (!name.starts_with("config") && name != "info").then(|| (name.to_owned(), calls))
        })
        .collect()
}

/// What this checks: a duplicate costs one command (one round trip): the claim script answers
/// with the stored result, nothing else is sent. A batch of duplicates is one command too with
/// [`Batching::Script`]. Counted by the server (`INFO commandstats` on a private server, where
/// the commands run inside the script are counted as well).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_is_one_command() {
    let Some(server) = PrivateRedis::start(&[]) else {
        return;
    };
    let mut admin = server.client();
    let store = private_store(&server, Batching::Script).await;
    let ns = ns();
    let keys: Vec<Key> = (0..10).map(|i| key(&ns, &format!("m{i}"))).collect();
    let reqs: Vec<ClaimRequest> = keys.iter().map(req).collect();
    store.claim_many(&reqs).await.unwrap();
    let done: Vec<Completion> = reqs
        .iter()
        .map(|r| Completion::new(r.key.clone(), r.token, Bytes::from_static(b"stored")))
        .collect();
    store.complete_many(&done).await.unwrap();

    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    let dup = store.claim(&req(&keys[0])).await.unwrap();
    assert_eq!(
        dup,
        Claim::Completed {
            result: Bytes::from_static(b"stored")
        }
    );
    let stats = commandstats(&mut admin);
    assert_eq!(
        stats,
        HashMap::from([
            ("evalsha".to_owned(), 1),
            ("time".to_owned(), 1),
            ("set".to_owned(), 1)
        ]),
        "a duplicate must be one EVALSHA (inside it: TIME and one SET NX GET that reads the \
         record without writing)"
    );

    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    let dups = store
        .claim_many(&keys.iter().map(req).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(dups.iter().all(|c| matches!(c, Claim::Completed { .. })));
    let stats = commandstats(&mut admin);
    assert_eq!(stats.get("evalsha"), Some(&1), "{stats:?}");
    assert_eq!(
        stats.get("time"),
        Some(&1),
        "one clock read per batch: {stats:?}"
    );
    assert_eq!(stats.get("set"), Some(&10), "{stats:?}");
    let keys_written: u64 = redis::cmd("DBSIZE").query(&mut admin).unwrap();
    assert_eq!(keys_written, 10, "duplicates must not write new keys");
}

/// A tracing writer that keeps what was logged.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn connect_logged(url: String) -> (RedisStore, String) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let store = RedisStore::connect(&url).await.expect("connect");
    (store, captured.text())
}

/// Failure guarded against: a Redis whose `maxmemory-policy` can evict keys silently drops
/// records when memory fills (`volatile-*` too: every idem key has a TTL), and the next
/// duplicate runs again. The store must say so at connect (a warning, and
/// `server_settings().may_evict()`), stay quiet under `noeviction`, and still connect where
/// `CONFIG` is disabled.
#[tokio::test]
async fn an_evicting_policy_is_reported_at_connect() {
    for (policy, evicts) in [
        ("allkeys-lru", true),
        ("volatile-ttl", true),
        ("noeviction", false),
    ] {
        let Some(server) =
            PrivateRedis::start(&["--maxmemory", "64mb", "--maxmemory-policy", policy])
        else {
            return;
        };
        let (store, log) = connect_logged(server.url()).await;
        let settings = store.server_settings();
        assert_eq!(settings.maxmemory_policy.as_deref(), Some(policy));
        assert_eq!(settings.maxmemory, Some(64 * 1024 * 1024));
        assert_eq!(settings.may_evict(), Some(evicts), "{policy}");
        assert_eq!(
            log.contains("WARN") && log.contains(policy),
            evicts,
            "{policy}: the warning must appear exactly when the policy evicts; log: {log}"
        );
    }
    // A server where CONFIG is disabled (as on managed services): the store still connects.
    let Some(server) = PrivateRedis::start(&["--rename-command", "CONFIG", ""]) else {
        return;
    };
    let (store, log) = connect_logged(server.url()).await;
    assert_eq!(store.server_settings().may_evict(), None);
    assert!(
        log.contains("cannot read"),
        "an unknown policy must be mentioned: {log}"
    );
    let ns = ns();
    assert!(matches!(
        store.claim(&req(&key(&ns, "k"))).await.unwrap(),
        Claim::Acquired(_)
    ));
}

fn shared_url() -> Option<String> {
    server::url(server::REDIS)
}

async fn shared_store() -> Option<RedisStore> {
    let url = shared_url()?;
    Some(
        RedisStore::builder(url)
            .prefix(format!("idem-faults:{:016x}:", fastrand::u64(..)))
            .expiry_grace(Duration::from_secs(60))
            .connect()
            .await
            .expect("connect to the shared Redis"),
    )
}

/// Failure guarded against: a key under the prefix that does not hold an idem record (written
/// by another program, a bug, a format from another version). Every operation must report
/// `Corrupt`, never treat it as absent and never overwrite it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_are_corrupt_not_absent() {
    let Some(store) = shared_store().await else {
        return;
    };
    let mut conn = store.connection();
    let ns = ns();
    let garbage = key(&ns, "garbage");
    let hash = key(&ns, "hash");
    let _: () = redis::cmd("SET")
        .arg(store.record_key(&garbage))
        .arg("not a record")
        .arg("EX")
        .arg(60)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(store.record_key(&hash))
        .arg("s")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("EXPIRE")
        .arg(store.record_key(&hash))
        .arg(60)
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in [&garbage, &hash] {
        let t = Token::random();
        let d = Duration::from_secs(60);
        let corrupt = |what: &str, e: StoreError| {
            assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{what} of {k}: {e}");
        };
        corrupt("claim", store.claim(&req(k)).await.unwrap_err());
        corrupt(
            "claim_many",
            store
                .claim_many(&[req(&key(&ns, "fine")), req(k)])
                .await
                .unwrap_err(),
        );
        corrupt(
            "complete",
            store
                .complete(&Completion::new(k.clone(), t, Bytes::new()))
                .await
                .unwrap_err(),
        );
        corrupt(
            "complete_many",
            store
                .complete_many(&[
                    Completion::new(key(&ns, "fine"), t, Bytes::new()),
                    Completion::new(k.clone(), t, Bytes::new()),
                ])
                .await
                .unwrap_err(),
        );
        corrupt("release", store.release(k, t, d).await.unwrap_err());
        corrupt("extend", store.extend(k, t, d).await.unwrap_err());
        corrupt("fail", store.fail(k, t, "x", d).await.unwrap_err());
        corrupt("get", store.get(k).await.unwrap_err());
    }
    let value: String = redis::cmd("GET")
        .arg(store.record_key(&garbage))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        value, "not a record",
        "a corrupt key must never be overwritten"
    );
    // The operator views scan the prefix and stop at the foreign values too.
    let e = store.count_by_state().await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e}");
    let e = store.in_progress(10).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e}");
    assert!(store.evict(&garbage).await.unwrap());
    assert!(store.evict(&hash).await.unwrap());
}

/// The operator views scan the prefix: counts by state, in-progress records oldest first, the
/// server's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_views_see_every_state() {
    let Some(store) = shared_store().await else {
        return;
    };
    let ns = ns();
    let d = Duration::from_secs(60);
    let mut held = Vec::new();
    for i in 0..3 {
        let r = req(&key(&ns, &format!("held-{i}")));
        assert!(matches!(store.claim(&r).await.unwrap(), Claim::Acquired(_)));
        held.push(r.key);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (id, end) in [
        ("done", "complete"),
        ("released", "release"),
        ("failed", "fail"),
    ] {
        let r = req(&key(&ns, id));
        store.claim(&r).await.unwrap();
        let w = match end {
            "complete" => {
                store
                    .complete(&Completion::new(r.key.clone(), r.token, Bytes::new()))
                    .await
            }
            "release" => store.release(&r.key, r.token, d).await,
            _ => store.fail(&r.key, r.token, "poison", d).await,
        };
        assert!(w.unwrap().is_applied());
    }
    let counts = store.count_by_state().await.unwrap();
    assert_eq!(
        counts,
        [
            (State::InProgress, 3),
            (State::Completed, 1),
            (State::Released, 1),
            (State::Failed, 1)
        ]
    );
    let in_progress = store.in_progress(2).await.unwrap();
    assert_eq!(
        in_progress
            .iter()
            .map(|r| r.key.clone())
            .collect::<Vec<_>>(),
        held[..2],
        "the longest-held first, at most the limit"
    );
    let now = store.now().await.unwrap();
    let local = idem::Clock::now(&idem::SystemClock);
    assert!(
        now.since(local) < Duration::from_secs(5) && local.since(now) < Duration::from_secs(5),
        "the server's clock ({now}) is the loopback host's ({local})"
    );
    for k in held {
        store.evict(&k).await.unwrap();
    }
}

/// Bad configuration is a clear `Config` error; unreachable servers are `Unavailable`; neither
/// message shows a password.
#[tokio::test]
async fn connect_errors_are_typed_and_redacted() {
    let e = RedisStore::connect("redis://:s3cret@127.0.0.1:1/0")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}");
    assert!(!format!("{e} {e:?}").contains("s3cret"), "{e:?}");
    assert!(e.to_string().contains(":***@127.0.0.1:1"), "{e}");
    let e = RedisStore::connect("redis://127.0.0.1:6379/notadb")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Config, "{e}");
    let e = RedisStore::builder("redis://127.0.0.1:6379")
        .prefix("bad{")
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Config, "{e}");
}

/// `rediss://` end to end: a private server that accepts only TLS, with a self-signed
/// certificate the store is told to trust; a full claim, completion and replay over it.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_work_end_to_end() {
    let Some((server, cert)) = PrivateRedis::start_tls() else {
        return;
    };
    assert!(server.url().starts_with("rediss://"));
    let store = RedisStore::builder(server.url())
        .tls_root_certificate(cert)
        .connect()
        .await
        .expect("connect over TLS");
    let k = key(&ns(), "tls");
    let r = req(&k);
    assert!(matches!(store.claim(&r).await.unwrap(), Claim::Acquired(_)));
    let done = Completion::new(k.clone(), r.token, Bytes::from_static(b"over tls"));
    assert!(store.complete(&done).await.unwrap().is_applied());
    assert_eq!(
        store.claim(&req(&k)).await.unwrap(),
        Claim::Completed {
            result: Bytes::from_static(b"over tls")
        }
    );
    // Without the CA the server is not trusted: a configuration error that says why.
    let untrusted = RedisStore::connect(&server.url()).await.unwrap_err();
    assert_eq!(untrusted.kind(), StoreErrorKind::Config, "{untrusted}");
    assert!(untrusted.to_string().contains("TLS"), "{untrusted}");
}

/// Without the `tls` feature a `rediss://` URL is a configuration error that says so.
#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn tls_urls_need_the_tls_feature() {
    let e = RedisStore::connect("rediss://127.0.0.1:6380")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Config, "{e}");
    assert!(e.to_string().contains("`tls` feature"), "{e}");
}

/// A Redis Cluster node whose cluster is not ready (here: one node, no slots assigned) is
/// refused at connect with a clear, transient error naming the cluster state; a list of
/// several servers that are not cluster nodes is a configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_is_not_ready_is_refused_clearly() {
    let Some(server) = PrivateRedis::start(&["--cluster-enabled", "yes"]) else {
        return;
    };
    let err = RedisStore::connect(&server.url()).await.unwrap_err();
    assert_eq!(err.kind(), idem::StoreErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("Redis Cluster"), "{err}");
    assert!(err.to_string().contains("cluster_state:fail"), "{err}");
    let Some(other) = PrivateRedis::start(&[]) else {
        return;
    };
    let Some(standalone) = PrivateRedis::start(&[]) else {
        return;
    };
    let port = |url: String| url.rsplit(':').next().unwrap().to_owned();
    let two = format!(
        "redis://127.0.0.1:{},127.0.0.1:{}",
        port(standalone.url()),
        port(other.url())
    );
    let err = RedisStore::connect(&two).await.unwrap_err();
    assert_eq!(err.kind(), idem::StoreErrorKind::Config, "{err}");
    assert!(err.to_string().contains("several servers"), "{err}");
}

/// Durability option on a standalone primary: with a replica attached, `WAIT 1` after claims
/// and completions succeeds; with none, every claim and completion returns a transient
/// `Unavailable` error saying the replica did not acknowledge, and the store counts them. The
/// write itself stays on the primary (WAIT does not roll back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_replica_errs_and_counts_without_one() {
    let Some(primary) = PrivateRedis::start(&[]) else {
        return;
    };
    let primary_port = primary.url().rsplit(':').next().unwrap().to_owned();
    let store = RedisStore::builder(primary.url())
        .wait_for_replicas(1, Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let ns = ns();
    let k = key(&ns, "alone");
    let r = req(&k);
    let err = store.claim(&r).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(err.is_transient());
    assert!(err.to_string().contains("0 of 1 replica"), "{err}");
    assert_eq!(store.unacknowledged_writes(), 1);
    let rec = store
        .get(&k)
        .await
        .unwrap()
        .expect("the claim stays on the primary");
    assert_eq!(rec.state, State::InProgress);
    let done = Completion::new(k.clone(), r.token, Bytes::from_static(b"x"));
    let err = store.complete_many(&[done]).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert_eq!(store.unacknowledged_writes(), 2);

    // A replica joins: the same store's writes are acknowledged.
    let Some(replica) = PrivateRedis::start(&["--replicaof", "127.0.0.1", &primary_port]) else {
        return;
    };
    let mut admin = replica.client();
    let deadline = Instant::now() + HANG;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut admin)
            .unwrap();
        if info.contains("master_link_status:up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never synced: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let k2 = key(&ns, "replicated");
    let r2 = req(&k2);
    assert!(matches!(
        store.claim(&r2).await.unwrap(),
        Claim::Acquired(_)
    ));
    let done = Completion::new(k2.clone(), r2.token, Bytes::from_static(b"kept"));
    assert!(store.complete(&done).await.unwrap().is_applied());
    assert_eq!(
        store.unacknowledged_writes(),
        2,
        "nothing more was unacknowledged"
    );
    let mut on_replica = replica.client();
    let copied: Option<Vec<u8>> = redis::cmd("GET")
        .arg(store.record_key(&k2))
        .query(&mut on_replica)
        .unwrap();
    assert!(
        copied.is_some(),
        "WAIT returned, so the replica holds the completion"
    );
    // A wait as long as the operation deadline is refused.
    let e = RedisStore::builder(primary.url())
        .timeout(Duration::from_secs(1))
        .wait_for_replicas(1, Duration::from_secs(1))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Config, "{e}");
}

/// Failure reproduced (CI, on a shared Redis full of other tests' keys): a `SCAN` page can hold
/// no key under the prefix while the cursor goes on, and the purge sent Redis an empty pipeline
/// ("empty command"). A purge and the operator views must walk past empty pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_walk_past_pages_without_our_keys() {
    let Some(server) = PrivateRedis::start(&[]) else {
        return;
    };
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut pipe = redis::pipe();
    for i in 0..5_000 {
        pipe.cmd("SET")
            .arg(format!("someone-else:{i}"))
            .arg("x")
            .ignore();
    }
    let () = pipe.query(&mut admin).unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("ours:")
        .connect()
        .await
        .unwrap();
    let k = key(&ns(), "old");
    let r = req(&k);
    store.claim(&r).await.unwrap();
    let gone = Duration::from_millis(1);
    assert!(store.release(&k, r.token, gone).await.unwrap().is_applied());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.count_by_state().await.unwrap(),
        [(State::Released, 1)]
    );
    assert_eq!(store.purge_expired(10).await.unwrap(), 1);
    assert_eq!(store.purge_expired(10).await.unwrap(), 0);
    assert!(store.in_progress(10).await.unwrap().is_empty());
}
