//! Store outage and recovery, on a PRIVATE PostgreSQL server (never the shared one, which other
//! tests use): initdb into a temporary directory, run it on a free port, kill it on drop.
//!
//! The failures these reproduce: the server crashes (`pg_ctl stop -m immediate`, which kills
//! every backend without a checkpoint) in the middle of a consumer's work, and stays down for a
//! while. While it is down, every operation must fail with a transient typed error and no
//! handler may run or be reported as a success (fail closed); when it comes back on the same
//! port, the SAME store object must work again by itself (broken pooled connections are
//! replaced), and a completion confirmed before the crash must still be there. And the server
//! hangs (every one of its processes SIGSTOPped, like a frozen VM or a partition that drops
//! packets): operations must end with a `Timeout` within the store's operation timeout instead
//! of hanging the consumer, and work again once the server resumes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem::{
    Claim, ClaimRequest, Completion, Config, Executor, Fingerprint, Namespace, Outcome, Store,
};
use idem_postgres::PostgresStore;
use idem_testkit::{free_port, missing};

/// The server binaries: `IDEM_PG_BINDIR`, or the newest `/usr/lib/postgresql/<version>/bin`
/// (Debian's layout; `.ci/run` installs whatever version the distribution has).
fn bin_dir() -> Option<std::path::PathBuf> {
    if let Ok(dir) = std::env::var("IDEM_PG_BINDIR") {
        return Some(dir.into());
    }
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A PostgreSQL server of this test's own, stopped (immediately) on drop.
struct PrivatePg {
    dir: tempfile::TempDir,
    port: u16,
    bin: std::path::PathBuf,
}

impl PrivatePg {
    /// `None` (skip, loudly; a failure in CI) when the server binaries are not installed.
    fn start() -> Option<Self> {
        let Some(bin) = bin_dir() else {
            return missing(
                "no PostgreSQL server binaries (initdb) under /usr/lib/postgresql/*/bin or \
                 IDEM_PG_BINDIR",
            );
        };
        let dir = tempfile::tempdir().expect("temp dir");
        // PostgreSQL refuses to run as root: give the directory to the postgres user.
        if is_root() {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir.path()));
        }
        let port = free_port();
        let pg = Self { dir, port, bin };
        run(pg
            .as_postgres(&pg.bin.join("initdb"))
            .arg("-D")
            .arg(pg.data())
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]));
        pg.up();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn as_postgres(&self, program: &Path) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        run(self
            .as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "60", "start"]));
    }

    /// Kills the server the way a crash would: no checkpoint, every connection cut.
    fn crash(&self) {
        run(self
            .as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]));
    }
}

impl PrivatePg {
    /// The server's processes: the postmaster (first line of `postmaster.pid`) and its children.
    fn pids(&self) -> Vec<String> {
        let pid_file =
            std::fs::read_to_string(self.data().join("postmaster.pid")).expect("postmaster.pid");
        let postmaster = pid_file
            .lines()
            .next()
            .expect("postmaster pid")
            .trim()
            .to_owned();
        let children = Command::new("ps")
            .args(["-o", "pid=", "--ppid", &postmaster])
            .output()
            .expect("ps");
        let mut pids = vec![postmaster];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .split_whitespace()
                .map(str::to_owned),
        );
        pids
    }

    /// Sends `signal` (`STOP` or `CONT`) to this server's processes, by pid.
    fn signal(&self, signal: &str) {
        idem_testkit::signal(signal, self.pids());
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        // A test that failed while the server was stopped must not leave it frozen.
        if self.data().join("postmaster.pid").exists() {
            let _ = Command::new("kill").arg("-CONT").args(self.pids()).output();
        }
        let _ = self
            .as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_gives_transient_errors_and_the_store_recovers_by_itself() {
    let Some(pg) = PrivatePg::start() else {
        return;
    };
    let builder = PostgresStore::builder(pg.url())
        .pool_size(4)
        .connect_timeout(Duration::from_secs(1))
        .op_timeout(Duration::from_secs(3));
    builder.migrate().await.expect("migrate");
    let store = builder.connect().await.expect("connect");
    let config = Config::default().lease(Duration::from_secs(2));
    let exec = Executor::with_config(store.clone(), config);
    let ns = Namespace::new("restart").unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let handler = |ran: Arc<AtomicUsize>| {
        move |_| async move {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(())
        }
    };

    // Before the crash: one message completed, one claimed with its completion still to come.
    let before = exec
        .run(ns.key("before").unwrap(), b"p", handler(ran.clone()))
        .await
        .expect("run before the crash");
    assert!(before.is_executed());
    let pending = ClaimRequest::new(ns.key("pending").unwrap(), Fingerprint::of(b"p"))
        .lease(Duration::from_secs(600));
    assert!(matches!(
        store.claim(&pending).await.unwrap(),
        Claim::Acquired(_)
    ));

    pg.crash();

    // While down: typed transient errors, never a success, no handler run.
    for round in 0..3 {
        let err = store
            .claim(&ClaimRequest::new(
                ns.key("down").unwrap(),
                Fingerprint::of(b"p"),
            ))
            .await
            .expect_err("a claim cannot succeed while the server is down");
        assert!(
            err.is_transient(),
            "round {round}: {err:?} must be transient"
        );
        let done = Completion::new(
            pending.key.clone(),
            pending.token,
            Bytes::from_static(b"ok"),
        );
        let err = store
            .complete(&done)
            .await
            .expect_err("a completion cannot succeed while the server is down");
        assert!(
            err.is_transient(),
            "round {round}: {err:?} must be transient"
        );
        let err = exec
            .run(ns.key("down").unwrap(), b"p", handler(ran.clone()))
            .await
            .expect_err("the executor must fail closed");
        assert!(err.is_transient(), "{err:?}");
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "no handler may run without a claim"
    );

    pg.up();

    // The same store object works again by itself: the pool replaces the dead connections.
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        match exec
            .run(ns.key("down").unwrap(), b"p", handler(ran.clone()))
            .await
        {
            Ok(outcome) => break outcome,
            Err(e) => {
                assert!(e.is_transient(), "{e:?}");
                assert!(Instant::now() < deadline, "the store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(outcome.is_executed(), "{outcome:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    // What was confirmed before the crash is still there; the claim can still be completed.
    let again: Outcome<(), std::convert::Infallible> = exec
        .run(ns.key("before").unwrap(), b"p", handler(ran.clone()))
        .await
        .unwrap();
    assert!(again.is_replayed(), "{again:?}");
    let done = Completion::new(
        pending.key.clone(),
        pending.token,
        Bytes::from_static(b"ok"),
    );
    assert!(store.complete(&done).await.unwrap().is_applied());
    assert_eq!(ran.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_gives_timeouts_not_a_hang_and_the_store_recovers() {
    let Some(pg) = PrivatePg::start() else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let builder = PostgresStore::builder(pg.url())
        .pool_size(4)
        .connect_timeout(Duration::from_secs(1))
        .op_timeout(timeout);
    builder.migrate().await.expect("migrate");
    let store = builder.connect().await.expect("connect");
    let ns = Namespace::new("hung").unwrap();
    let first = ClaimRequest::new(ns.key("first").unwrap(), Fingerprint::of(b"p"));
    assert!(matches!(
        store.claim(&first).await.unwrap(),
        Claim::Acquired(_)
    ));

    pg.signal("STOP");
    for round in 0..2 {
        let req = ClaimRequest::new(ns.key("during").unwrap(), Fingerprint::of(b"p"));
        let started = Instant::now();
        let err = store
            .claim(&req)
            .await
            .expect_err("a claim cannot succeed while the server is frozen");
        assert!(err.is_transient(), "round {round}: {err:?}");
        assert!(
            started.elapsed() < timeout * 3,
            "round {round}: the claim hung for {:?}",
            started.elapsed()
        );
    }
    pg.signal("CONT");

    let deadline = Instant::now() + Duration::from_secs(30);
    let req = ClaimRequest::new(ns.key("after").unwrap(), Fingerprint::of(b"p"));
    loop {
        match store.claim(&req).await {
            Ok(claim) => {
                assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
                break;
            }
            Err(e) => {
                assert!(e.is_transient(), "{e:?}");
                assert!(Instant::now() < deadline, "the store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let done = Completion::new(first.key.clone(), first.token, Bytes::from_static(b"ok"));
    assert!(store.complete(&done).await.unwrap().is_applied());
}
