//! Fail-closed behaviour across a server crash and restart, on a PRIVATE MariaDB instance (a
//! temporary data directory and a free port; the shared server is never touched).
//!
//! The failures this reproduces: the database dies mid-stream (SIGKILL, like a crash or an
//! OOM kill). While it is down, every operation must fail with a transient, typed error, never
//! report a success, and the executor must not run the handler without a claim. When the
//! server is back, the same store (the same pool, with its dead connections) must work again by
//! itself, and what was committed before the crash must still be there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem::{ClaimRequest, Completion, Executor, Fingerprint, Namespace, Store};
use idem_mysql::MysqlStore;
use idem_testkit::{ServerProcess, free_port, missing};
use mysql_async::prelude::Queryable;

/// A MariaDB server of our own, killed on drop.
struct PrivateServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<ServerProcess>,
}

impl PrivateServer {
    /// Initialises a data directory and starts the server; `None` when MariaDB is not
    /// installed (skipped loudly, or a failure in CI).
    async fn start() -> Option<Self> {
        let installed = Command::new("mariadb-install-db")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            return missing("mariadb-install-db is not installed");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg("--skip-test-db")
            .arg("--auth-root-authentication-method=normal")
            .args(user_arg())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run mariadb-install-db");
        assert!(status.success(), "mariadb-install-db failed");
        let port = free_port();
        let mut server = Self {
            dir,
            port,
            child: None,
        };
        server.run().await;
        server
            .admin()
            .await
            .query_drop("CREATE DATABASE IF NOT EXISTS idem")
            .await
            .expect("create database");
        Some(server)
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/idem", self.port)
    }

    async fn admin(&self) -> mysql_async::Conn {
        mysql_async::Conn::new(
            mysql_async::Opts::from_url(&format!("mysql://root@127.0.0.1:{}", self.port))
                .expect("url"),
        )
        .await
        .expect("admin connection")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `mariadbd` on the data directory and waits until it answers.
    async fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log");
        let child = ServerProcess::spawn(
            Command::new(mariadbd())
                .arg("--no-defaults")
                .arg(format!("--datadir={}", self.data().display()))
                .arg(format!("--port={}", self.port))
                .arg(format!(
                    "--socket={}",
                    self.dir.path().join("sock").display()
                ))
                .arg(format!(
                    "--pid-file={}",
                    self.dir.path().join("pid").display()
                ))
                .arg("--bind-address=127.0.0.1")
                .arg("--skip-log-bin")
                .arg("--innodb-buffer-pool-size=16M")
                .args(user_arg())
                .stdout(Stdio::null())
                .stderr(log),
            self.port,
        );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let opts = mysql_async::Opts::from_url(&format!("mysql://root@127.0.0.1:{}", self.port))
            .expect("url");
        loop {
            if let Ok(mut conn) = mysql_async::Conn::new(opts.clone()).await
                && conn.ping().await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private MariaDB did not start; see {}",
                self.dir.path().join("server.log").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the server, like a crash.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server binary: on the `PATH`, or where Debian installs it (`/usr/sbin` is not on every
/// user's `PATH`).
fn mariadbd() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/mariadbd");
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join("mariadbd").is_file())
    });
    if on_path || !sbin.is_file() {
        PathBuf::from("mariadbd")
    } else {
        sbin
    }
}

/// `mariadbd` refuses to run as root unless told to.
fn user_arg() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    });
    root.then(|| "--user=root".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_crash_fails_closed_and_the_store_recovers_by_itself() {
    let Some(mut server) = PrivateServer::start().await else {
        return;
    };
    let store = MysqlStore::builder(server.url())
        .pool_size(4)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("store");
    store.migrate().await.expect("migrate");
    let ns = Namespace::new("restart").expect("namespace");
    let fp = Fingerprint::of(b"p");

    // Before the crash: a completed key and a few live connections in the pool.
    let done = ns.key("before").expect("key");
    let req = ClaimRequest::new(done.clone(), fp);
    assert!(matches!(
        store.claim(&req).await.expect("claim"),
        idem::Claim::Acquired(_)
    ));
    let c = Completion::new(done.clone(), req.token, Bytes::from_static(b"r1"));
    assert!(store.complete(&c).await.expect("complete").is_applied());
    for got in futures_util::future::join_all((0..4).map(|_| store.get(&done))).await {
        assert!(got.expect("get").is_some());
    }

    server.kill();

    // While it is down: typed transient errors, never a success, no handler run.
    let exec = Executor::new(store.clone());
    let ran = AtomicUsize::new(0);
    for i in 0..8 {
        let key = ns.key(format!("during-{i}")).expect("key");
        let claim = store.claim(&ClaimRequest::new(key.clone(), fp)).await;
        let err = claim.expect_err("a claim cannot succeed while the server is down");
        assert!(err.is_transient(), "not transient: {err:?}");
        let err = store
            .complete(&Completion::new(key.clone(), req.token, Bytes::new()))
            .await
            .expect_err("a completion cannot succeed while the server is down");
        assert!(err.is_transient(), "not transient: {err:?}");
        let outcome = exec
            .run(key, b"p", |_| async {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            })
            .await;
        let err = outcome.expect_err("the executor must fail closed");
        assert!(err.is_transient(), "not transient: {err:?}");
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "no handler may run without a claim"
    );

    server.run().await;

    // Back: the same store works again by itself. Connections that died with the server may
    // fail once each (transiently) before the pool has replaced them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = ns.key("after").expect("key");
    let mut failures = 0;
    let lease = loop {
        match store.claim(&ClaimRequest::new(after.clone(), fp)).await {
            Ok(idem::Claim::Acquired(lease)) => break lease,
            Ok(other) => panic!("unexpected claim after the restart: {other:?}"),
            Err(e) => {
                assert!(e.is_transient(), "not transient: {e:?}");
                failures += 1;
                assert!(Instant::now() < deadline, "the store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(failures <= 8, "{failures} failures after the restart");
    let c = Completion::new(after.clone(), lease.token, Bytes::from_static(b"r2"));
    assert!(store.complete(&c).await.expect("complete").is_applied());
    // Every later operation succeeds, and what was committed before the crash is intact.
    for _ in 0..8 {
        match store.claim(&ClaimRequest::new(done.clone(), fp)).await {
            Ok(idem::Claim::Completed { result }) => assert_eq!(&result[..], b"r1"),
            other => panic!("the record committed before the crash must replay: {other:?}"),
        }
    }
    let outcome = exec
        .run(ns.key("after-exec").expect("key"), b"p", |_| async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("the executor works again");
    assert!(outcome.is_executed());
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}
