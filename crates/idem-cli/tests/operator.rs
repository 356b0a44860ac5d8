//! The operator commands (`inspect`, `get`, `evict`, `purge`) through the real binary, on a
//! SQLite database prepared with the store's own API: their happy paths, and a clear error for
//! every way an operator can get the input wrong.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use idem::{ClaimRequest, Completion, Fingerprint, Namespace, Store};
use idem_sqlite::SqliteStore;
use serde_json::Value;

struct Db {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Db {
    fn url(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
}

/// A database with: `orders:done` completed, `orders:stuck` in progress with a lease that has
/// ended, `orders:live` in progress under a live lease, and `orders:old` completed with a
/// retention that has ended (purgeable).
async fn fixture() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ops.db");
    let store = SqliteStore::open(&path).unwrap();
    let ns = Namespace::new("orders").unwrap();
    let fp = Fingerprint::of(b"payload");
    let claim = |id: &str, lease: Duration| {
        ClaimRequest::new(ns.key(id).unwrap(), fp)
            .lease(lease)
            .owner("worker-7:4242".into())
    };
    for (id, retention) in [("done", None), ("old", Some(Duration::from_millis(1)))] {
        let req = claim(id, Duration::from_secs(30));
        let idem::Claim::Acquired(lease) = store.claim(&req).await.unwrap() else {
            panic!("fresh key not acquired")
        };
        let mut c = Completion::new(req.key.clone(), lease.token, Bytes::from("receipt #1"));
        if let Some(r) = retention {
            c = c.retention(r);
        }
        assert!(store.complete(&c).await.unwrap().is_applied());
    }
    // "live" is the older claim, yet "stuck" (lease ended) is listed first.
    store
        .claim(&claim("live", Duration::from_secs(600)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    store
        .claim(&claim("stuck", Duration::from_millis(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(store);
    Db { _dir: dir, path }
}

fn idem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .stdin(Stdio::null())
        .env_remove("IDEM_STORE")
        .output()
        .expect("run idem")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn inspect_counts_states_and_lists_stuck_claims() {
    let db = fixture().await;
    let out = idem(&["inspect", "--store", &db.url()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("completed") && text.contains("in_progress"),
        "{text}"
    );
    assert!(
        text.contains("orders:stuck") && text.contains("STUCK"),
        "{text}"
    );
    assert!(
        text.contains("orders:live") && text.contains("ends in"),
        "{text}"
    );
    assert!(text.contains("worker-7:4242"), "{text}");

    let out = idem(&["inspect", "--store", &db.url(), "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["total"], 4);
    assert_eq!(v["in_progress"], 2);
    assert_eq!(v["stuck"], 1);
    assert_eq!(v["stuck_at_least"], false);
    let counts: Vec<(String, u64)> = serde_json::from_value(v["counts"].clone()).unwrap();
    assert!(counts.contains(&("completed".to_owned(), 2)), "{counts:?}");
    // Stuck claims first.
    assert_eq!(v["listed"][0]["key"], "orders:stuck");
    assert_eq!(v["listed"][0]["attempts"], 1);

    // Only the stuck one listed: there may be more stuck ones beyond the limit.
    let out = idem(&["inspect", "--store", &db.url(), "--json", "--limit", "1"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (v["stuck"].clone(), v["stuck_at_least"].clone()),
        (1.into(), true.into())
    );
}

#[tokio::test]
async fn get_shows_a_record_and_refuses_unknown_or_invalid_keys() {
    let db = fixture().await;
    let out = idem(&["get", "--store", &db.url(), "orders:done"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("completed") && text.contains("receipt #1"),
        "{text}"
    );

    let out = idem(&["get", "--store", &db.url(), "orders:done", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["state"], "completed");
    assert_eq!(v["result"], "receipt #1");

    let out = idem(&["get", "--store", &db.url(), "orders:nope"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no record for key orders:nope"),
        "{}",
        stderr(&out)
    );

    let out = idem(&["get", "--store", &db.url(), "no-separator"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid key \"no-separator\""),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn evict_needs_confirmation_and_then_forces_reprocessing() {
    let db = fixture().await;
    // stdin is not a terminal and there is no --yes: refuse, change nothing.
    let out = idem(&["evict", "--store", &db.url(), "orders:done"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert!(
        idem(&["get", "--store", &db.url(), "orders:done"])
            .status
            .success()
    );

    let out = idem(&["evict", "--store", &db.url(), "orders:done", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("evicted orders:done"),
        "{}",
        stdout(&out)
    );
    assert!(
        !idem(&["get", "--store", &db.url(), "orders:done"])
            .status
            .success()
    );

    let out = idem(&["evict", "--store", &db.url(), "orders:done", "--yes"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no record for key"),
        "{}",
        stderr(&out)
    );
}

/// Runs `idem args` on a pseudo-terminal (through `script`) answering `answer`; `None` when
/// `script` is not installed.
fn idem_on_terminal(args: &str, answer: &str) -> Option<Output> {
    let cmd = format!("{} {args}", env!("CARGO_BIN_EXE_idem"));
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(answer.as_bytes())
        .unwrap();
    Some(child.wait_with_output().unwrap())
}

#[tokio::test]
async fn evict_asks_on_a_terminal() {
    let db = fixture().await;
    let args = format!("evict --store {} orders:live", db.url());
    let Some(out) = idem_on_terminal(&args, "n\n") else {
        eprintln!("SKIPPED: `script` is not installed, cannot test the terminal prompt");
        return;
    };
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("Evict it?") && text.contains("holds its lease"),
        "{text}"
    );
    assert!(text.contains("not evicted"), "{text}");
    assert!(
        idem(&["get", "--store", &db.url(), "orders:live"])
            .status
            .success()
    );

    let out = idem_on_terminal(&args, "y\n").unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        !idem(&["get", "--store", &db.url(), "orders:live"])
            .status
            .success()
    );
}

#[tokio::test]
async fn purge_deletes_only_expired_records() {
    let db = fixture().await;
    let out = idem(&["purge", "--store", &db.url(), "--batch", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("purged 1 expired record"),
        "{}",
        stdout(&out)
    );
    assert!(
        !idem(&["get", "--store", &db.url(), "orders:old"])
            .status
            .success()
    );
    assert!(
        idem(&["get", "--store", &db.url(), "orders:done"])
            .status
            .success()
    );
    let out = idem(&["purge", "--store", &db.url()]);
    assert!(stdout(&out).contains("purged 0"), "{}", stdout(&out));
}

fn assert_fails_with(args: &[&str], needle: &str) {
    let out = idem(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
}

#[test]
fn bad_stores_get_clear_errors_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let url = format!("sqlite:{}", missing.display());
    assert_fails_with(&["inspect", "--store", &url], "no SQLite database at");
    assert!(
        !Path::new(&missing).exists(),
        "inspect must not create a database"
    );

    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INTEGER)")
        .unwrap();
    let url = format!("sqlite:{}", other.display());
    assert_fails_with(&["inspect", "--store", &url], "without idem records");

    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "not a database, just text long enough to have a header",
    )
    .unwrap();
    let url = format!("sqlite:{}", text.display());
    assert_fails_with(&["get", "--store", &url, "a:b"], "as a SQLite database");

    let url = format!("sqlite:{}", dir.path().display());
    assert_fails_with(&["purge", "--store", &url], "is a directory");

    assert_fails_with(
        &["inspect", "--store", "redis://:secret@localhost"],
        "redis://:***@localhost",
    );
    assert_fails_with(
        &["inspect", "--store", "kafka://localhost"],
        "unsupported store URL scheme",
    );
    let out = idem(&["inspect", "--store", "redis://:secret@localhost"]);
    assert!(!stderr(&out).contains("secret"), "credentials printed");
    assert_fails_with(&["inspect", "--store", "memory"], "memory store");
    assert_fails_with(&["inspect"], "--store");
}

/// `idem migrate` creates idem's table on request (stores never do it when they connect), and
/// is safe to run again.
#[tokio::test]
async fn migrate_creates_the_schema_on_postgres_and_mysql() {
    let run = format!("{:x}_{:x}", std::process::id(), fastrand_u32());
    if let Some(url) = idem_conformance::server::url(idem_conformance::server::POSTGRES) {
        let schema = format!("idem_migrate_{run}");
        for _ in 0..2 {
            let out = idem(&["migrate", "--store", &url, "--schema", &schema]);
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(stdout(&out).contains("schema version"), "{}", stdout(&out));
        }
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 \
                 AND table_name = 'idem_records'",
                &[&schema],
            )
            .await
            .unwrap()
            .get(0);
        client
            .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    if let Some(url) = idem_conformance::server::url(idem_conformance::server::MYSQL) {
        use mysql_async::prelude::Queryable;
        let table = format!("idem_migrate_{run}");
        for _ in 0..2 {
            let out = idem(&["migrate", "--store", &url, "--table", &table]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        let pool = mysql_async::Pool::new(url.as_str());
        let mut conn = pool.get_conn().await.unwrap();
        let n: Option<i64> = conn
            .exec_first(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = DATABASE() \
                 AND table_name = ?",
                (&table,),
            )
            .await
            .unwrap();
        conn.query_drop(format!("DROP TABLE `{table}`"))
            .await
            .unwrap();
        drop(conn);
        pool.disconnect().await.unwrap();
        assert_eq!(n, Some(1));
    }
    let out = idem(&["migrate", "--store", "memory"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no schema to migrate"),
        "{}",
        stderr(&out)
    );
}

fn fastrand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}
