//! The operator commands (`inspect`, `get`, `evict`, `purge`, `migrate`) and `bench`'s output
//! through the real binary, on stores prepared with the stores' own API: their happy paths,
//! their JSON for scripts, and a clear error for every way an operator can get the input wrong.
//!
//! The views that each store answers with its own queries (`--namespace`, `--failed`,
//! `purge --dry-run`) run on SQLite and on every server (PostgreSQL in a schema of the test's
//! own, MySQL in a table of its own, Redis under a prefix of its own: `--schema`, `--table`,
//! `--prefix`). A missing server skips its test, and fails it when `CI` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use idem::{Claim, ClaimRequest, Completion, Fingerprint, Store};
use idem_sqlite::SqliteStore;
use serde_json::{Value, json};

struct Db {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Db {
    fn url(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
}

/// Writes, on any store:
/// - `orders:done` completed, `orders:old` completed with a retention that has ended
///   (purgeable), `billing:paid` completed;
/// - `orders:live` in progress under a live lease, `orders:stuck` in progress with a lease
///   that has ended (listed first, although claimed later);
/// - `orders:bad` failed ("exit status 3: card declined"), then `billing:card` failed
///   ("HTTP 500 from the endpoint"): the most recent failure.
async fn populate<S: Store>(store: &S) {
    let fp = Fingerprint::of(b"payload");
    let claim = |key: &str, lease: Duration| {
        ClaimRequest::new(idem::Key::parse(key).unwrap(), fp)
            .lease(lease)
            .owner("worker-7:4242".into())
    };
    let acquire = async |req: &ClaimRequest| match store.claim(req).await.unwrap() {
        Claim::Acquired(lease) => lease,
        other => panic!("fresh key {} not acquired: {other:?}", req.key),
    };
    for (key, retention) in [
        ("orders:done", None),
        ("orders:old", Some(Duration::from_millis(1))),
        ("billing:paid", None),
    ] {
        let req = claim(key, Duration::from_secs(30));
        let lease = acquire(&req).await;
        let mut c = Completion::new(req.key.clone(), lease.token, Bytes::from("receipt #1"));
        if let Some(r) = retention {
            c = c.retention(r);
        }
        assert!(store.complete(&c).await.unwrap().is_applied());
    }
    for (key, reason) in [
        ("orders:bad", "exit status 3: card declined"),
        ("billing:card", "HTTP 500 from the endpoint"),
    ] {
        let req = claim(key, Duration::from_secs(30));
        let lease = acquire(&req).await;
        let failed = store
            .fail(&req.key, lease.token, reason, Duration::from_secs(3600))
            .await
            .unwrap();
        assert!(failed.is_applied());
        // Failures a few milliseconds apart: the order of the listing is the order here.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    acquire(&claim("orders:live", Duration::from_secs(600))).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    acquire(&claim("orders:stuck", Duration::from_millis(1))).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// A SQLite database holding [`populate`]'s records.
async fn fixture() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ops.db");
    sqlite_at(&path).await;
    Db { _dir: dir, path }
}

async fn sqlite_at(path: &Path) {
    let store = SqliteStore::open(path).unwrap();
    populate(&store).await;
}

fn idem(args: &[&str]) -> Output {
    idem_with(args, None, &[])
}

/// Runs `idem args` in `dir` (default: the test's own), with `env` set and `IDEM_STORE`
/// removed unless `env` sets it.
fn idem_with(args: &[&str], dir: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
    cmd.args(args).stdin(Stdio::null()).env_remove("IDEM_STORE");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run idem")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `idem args` must succeed and print one JSON object.
fn json_of(args: &[&str]) -> Value {
    let out = idem(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stdout(&out)))
}

fn keys_listed(v: &Value) -> Vec<String> {
    v["listed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_owned())
        .collect()
}

fn args_with<'a>(base: &[&'a str], store: &'a [&'a str]) -> Vec<&'a str> {
    base.iter().chain(store).copied().collect()
}

/// Every view that stores answer with their own queries, on the store that `store` (the
/// `--store` option and any `--schema`, `--table`, `--prefix`) points at, holding only
/// [`populate`]'s records. Purges `orders:old` at the end.
fn check_views(store: &[&str]) {
    let run = |args: &[&str]| json_of(&args_with(args, store));

    // Everything: every state named, numbers for times.
    let v = run(&["inspect", "--json"]);
    assert_eq!(
        v["counts"],
        json!({"in_progress": 2, "completed": 3, "released": 0, "failed": 2}),
        "{v}"
    );
    assert_eq!(v["total"], 7);
    assert_eq!(v["namespace"], Value::Null);
    assert_eq!(v["list"], "in_progress");
    assert_eq!(
        (v["stuck"].clone(), v["stuck_at_least"].clone()),
        (json!(1), json!(false))
    );
    assert_eq!(
        keys_listed(&v),
        ["orders:stuck", "orders:live"],
        "stuck first"
    );
    let now = v["now_ms"].as_i64().expect("now_ms is a number");
    let (stuck, live) = (&v["listed"][0], &v["listed"][1]);
    assert_eq!(stuck["stuck"], true);
    assert!(stuck["lease_left_ms"].as_i64().unwrap() < 0, "{stuck}");
    assert_eq!(live["stuck"], false);
    let left = live["lease_left_ms"].as_i64().unwrap();
    assert!((500_000..=600_000).contains(&left), "{live}");
    assert_eq!(
        live["lease_until_ms"].as_i64().unwrap(),
        now + left,
        "{live}"
    );
    let created = live["created_at_ms"].as_i64().unwrap();
    assert!(created <= now && created > now - 600_000, "{live}");
    assert_eq!(live["age_ms"].as_i64().unwrap(), now - created, "{live}");
    assert!(live["since_update_ms"].is_u64(), "{live}");
    assert!(live["expires_at_ms"].as_i64().unwrap() > now, "{live}");
    assert_eq!(live["owner"], "worker-7:4242");
    assert_eq!(live["namespace"], "orders");
    assert_eq!(live["id"], "live");

    // One namespace.
    let v = run(&["inspect", "--json", "--namespace", "orders"]);
    assert_eq!(
        v["counts"],
        json!({"in_progress": 2, "completed": 2, "released": 0, "failed": 1}),
        "{v}"
    );
    assert_eq!(
        (v["total"].clone(), v["namespace"].clone()),
        (json!(5), json!("orders"))
    );
    assert_eq!(keys_listed(&v), ["orders:stuck", "orders:live"]);
    let v = run(&["inspect", "--json", "--namespace", "orders", "--limit", "1"]);
    assert_eq!(keys_listed(&v), ["orders:stuck"]);
    assert_eq!(
        v["stuck_at_least"], true,
        "only stuck ones listed, more in progress"
    );
    let v = run(&["inspect", "--json", "--namespace", "billing"]);
    assert_eq!(
        v["counts"],
        json!({"in_progress": 0, "completed": 1, "released": 0, "failed": 1}),
        "{v}"
    );
    assert_eq!(keys_listed(&v), Vec::<String>::new());
    assert_eq!(v["stuck"], 0);
    let v = run(&["inspect", "--json", "--namespace", "nobody"]);
    assert_eq!(v["total"], 0);

    // Failed keys with their reasons, most recent first.
    let v = run(&["inspect", "--json", "--failed"]);
    assert_eq!(v["list"], "failed");
    assert_eq!(keys_listed(&v), ["billing:card", "orders:bad"], "{v}");
    assert_eq!(v["listed"][0]["reason"], "HTTP 500 from the endpoint");
    assert_eq!(v["listed"][1]["reason"], "exit status 3: card declined");
    assert_eq!(v["listed"][1]["result"], Value::Null);
    assert_eq!(v["listed"][1]["attempts"], 1);
    assert!(v.get("stuck").is_none(), "{v}");
    let v = run(&["inspect", "--json", "--failed", "--namespace", "orders"]);
    assert_eq!(keys_listed(&v), ["orders:bad"]);
    let v = run(&["inspect", "--json", "--failed", "--limit", "1"]);
    assert_eq!(keys_listed(&v), ["billing:card"]);

    let out = idem(&args_with(&["inspect", "--failed"], store));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("failed: 2"), "{text}");
    for needle in ["orders:bad", "card declined", "billing:card", "HTTP 500"] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert!(
        text.find("billing:card").unwrap() < text.find("orders:bad").unwrap(),
        "most recent first: {text}"
    );
    assert_durations_read_one_way(&text);
    let out = idem(&args_with(&["inspect", "--namespace", "orders"], store));
    let text = stdout(&out);
    assert!(text.contains("namespace orders"), "{text}");
    assert!(!text.contains("billing:"), "{text}");
    assert_durations_read_one_way(&text);

    // One record.
    let v = run(&["get", "orders:bad", "--json"]);
    assert_eq!(v["state"], "failed");
    assert_eq!(v["reason"], "exit status 3: card declined");
    assert_eq!(v["lease_left_ms"], Value::Null);
    assert!(v["updated_at_ms"].is_i64(), "{v}");

    // Purge: counted first, then deleted.
    assert_eq!(
        run(&["purge", "--dry-run", "--json"]),
        json!({"would_purge": 1})
    );
    run(&["get", "orders:old", "--json"]);
    assert_eq!(run(&["purge", "--json"]), json!({"purged": 1}));
    assert_eq!(
        run(&["purge", "--dry-run", "--json"]),
        json!({"would_purge": 0})
    );
    assert!(
        !idem(&args_with(&["get", "orders:old"], store))
            .status
            .success()
    );
}

/// Durations in text output read as `850ms`, `12s`, `4m5s`: digits and units, no spaces or
/// decimals. Checks those after "ends in", "ended" and "(in", and before "ago".
fn assert_durations_read_one_way(text: &str) {
    let mut seen = 0;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            let next = words.get(i + 1).copied();
            let d = match (*w, next) {
                ("ends", Some("in")) if i + 2 < words.len() => words[i + 2],
                ("ended" | "(in", Some(d)) => d.trim_end_matches(')'),
                ("ago" | "ago)" | "ago:", _) if i > 0 => words[i - 1].trim_start_matches('('),
                _ => continue,
            };
            seen += 1;
            assert!(is_duration(d), "{d:?} in {line:?}");
        }
    }
    assert!(seen > 0, "no duration in {text}");
}

fn is_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "d", "h", "m", "s"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn durations_are_recognised() {
    for good in ["850ms", "12s", "4m5s", "3h20m", "7d"] {
        assert!(is_duration(good), "{good}");
    }
    for bad in ["12.3s", "4m 05s", "", "s", "12", "5 min"] {
        assert!(!is_duration(bad), "{bad}");
    }
}

#[tokio::test]
async fn views_on_sqlite() {
    let db = fixture().await;
    check_views(&["--store", &db.url()]);
}

#[tokio::test]
async fn views_on_postgres() {
    let Some(url) = idem_conformance::server::url(idem_conformance::server::POSTGRES) else {
        return;
    };
    let schema = format!("idem_ops_{}", run_id());
    let out = idem(&["migrate", "--store", &url, "--schema", &schema]);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = idem_postgres::PostgresStore::builder(url.as_str())
        .schema(schema.as_str())
        .connect()
        .await
        .unwrap();
    populate(&store).await;
    let checked = std::panic::catch_unwind(|| {
        check_views(&["--store", &url, "--schema", &schema]);
        // Without --schema, the default table, which is not this one.
        let out = idem(&[
            "inspect",
            "--store",
            &url,
            "--schema",
            "idem_no_such_schema",
        ]);
        assert!(!out.status.success());
    });
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn views_on_mysql() {
    use mysql_async::prelude::Queryable;
    let Some(url) = idem_conformance::server::url(idem_conformance::server::MYSQL) else {
        return;
    };
    let table = format!("idem_ops_{}", run_id());
    let out = idem(&["migrate", "--store", &url, "--table", &table]);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = idem_mysql::MysqlStore::builder(url.as_str())
        .table(table.as_str())
        .build()
        .unwrap();
    populate(&store).await;
    let _ = store.disconnect().await;
    let checked = std::panic::catch_unwind(|| {
        check_views(&["--store", &url, "--table", &table]);
        // A table that idem did not create: the same advice as `consume`, run migrate.
        let out = idem(&["inspect", "--store", &url, "--table", "idem_no_such_table"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("migrate"), "{}", stderr(&out));
    });
    let pool = mysql_async::Pool::new(url.as_str());
    let mut conn = pool.get_conn().await.unwrap();
    conn.query_drop(format!("DROP TABLE `{table}`"))
        .await
        .unwrap();
    conn.exec_drop("DELETE FROM idem_schema WHERE table_name = ?", (&table,))
        .await
        .unwrap();
    drop(conn);
    pool.disconnect().await.unwrap();
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn views_on_redis() {
    let Some(url) = idem_conformance::server::url(idem_conformance::server::REDIS) else {
        return;
    };
    let prefix = format!("idem-ops-{}:", run_id());
    let store = idem_redis::RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .connect()
        .await
        .unwrap();
    populate(&store).await;
    let checked = std::panic::catch_unwind(|| check_views(&["--store", &url, "--prefix", &prefix]));
    let mut conn = store.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn inspect_counts_states_and_lists_stuck_claims() {
    let db = fixture().await;
    let out = idem(&["inspect", "--store", &db.url()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("completed") && text.contains("in_progress") && text.contains("released"),
        "{text}"
    );
    assert!(
        text.contains("orders:stuck") && text.contains("STUCK: ended"),
        "{text}"
    );
    assert!(
        text.contains("orders:live") && text.contains("ends in 9m"),
        "{text}"
    );
    assert!(text.contains("worker-7:4242"), "{text}");
    assert_durations_read_one_way(&text);
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
    assert_durations_read_one_way(&text);

    let v = json_of(&["get", "--store", &db.url(), "orders:done", "--json"]);
    assert_eq!(v["state"], "completed");
    assert_eq!(v["result"], "receipt #1");
    assert_eq!(v["reason"], Value::Null);
    assert_eq!(v["expired"], false);
    assert!(v["created_at_ms"].is_i64() && v["age_ms"].is_u64(), "{v}");

    let out = idem(&["get", "--store", &db.url(), "orders:bad"]);
    let text = stdout(&out);
    assert!(
        text.contains("reason") && text.contains("card declined"),
        "{text}"
    );

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
        .env_remove("IDEM_STORE")
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
    let out = idem(&["purge", "--store", &db.url(), "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("would purge 1 expired record") && stdout(&out).contains("dry run"),
        "{}",
        stdout(&out)
    );
    assert!(
        idem(&["get", "--store", &db.url(), "orders:old"])
            .status
            .success(),
        "a dry run deletes nothing"
    );
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
        &["inspect", "--store", "redis://:secret@localhost:1"],
        "redis://:***@localhost:1",
    );
    assert_fails_with(
        &["inspect", "--store", "kafka://localhost"],
        "unsupported store URL scheme",
    );
    let out = idem(&["inspect", "--store", "redis://:secret@localhost:1"]);
    assert!(!stderr(&out).contains("secret"), "credentials printed");
    assert_fails_with(&["inspect", "--store", "memory"], "memory store");
    assert_fails_with(
        &["inspect", "--store", &url, "--namespace", "a:b"],
        "--namespace",
    );
}

/// `--store`, then `IDEM_STORE`, then `sqlite:idem.db`, as `idem consume` finds its store;
/// without any, a missing default database says how to give one.
#[tokio::test]
async fn operator_commands_find_the_store_as_consume_does() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = Some(dir.path());
    for args in [
        &["inspect"][..],
        &["get", "orders:done"],
        &["purge"],
        &["evict", "--yes", "orders:done"],
    ] {
        let out = idem_with(args, cwd, &[]);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("no SQLite database at idem.db")
                && err.contains("--store")
                && err.contains("IDEM_STORE"),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.path().join("idem.db").exists(), "nothing created");
    let out = idem_with(&["migrate"], cwd, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("sqlite:idem.db: nothing to migrate"),
        "{}",
        stdout(&out)
    );

    // The default database, where consume would have created it.
    sqlite_at(&dir.path().join("idem.db")).await;
    let out = idem_with(&["inspect", "--json"], cwd, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (v["store"].clone(), v["total"].clone()),
        (json!("sqlite:idem.db"), json!(7))
    );

    // IDEM_STORE wins over the default, --store over IDEM_STORE, for every command.
    let db = fixture().await;
    let env = [("IDEM_STORE", &*db.url())];
    let out = idem_with(&["get", "orders:old", "--json"], cwd, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = idem_with(&["purge", "--json"], cwd, &env);
    assert_eq!(stdout(&out).trim(), r#"{"purged":1}"#, "{}", stderr(&out));
    let out = idem_with(
        &["inspect", "--json", "--store", "sqlite:idem.db"],
        cwd,
        &env,
    );
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["store"], "sqlite:idem.db");
    let out = idem_with(&["migrate"], cwd, &[("IDEM_STORE", "memory")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("memory: nothing to migrate"),
        "{}",
        stdout(&out)
    );
}

/// `--schema`, `--table` and `--prefix` belong to some stores; given to another, they are
/// refused before anything connects, by every command that takes a store.
#[test]
fn location_options_are_refused_where_they_do_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite:{}", dir.path().join("x.db").display());
    // Port 1: nothing listens, so an error about the option proves nothing was tried.
    let pg = "postgres://u:secret@127.0.0.1:1/db";
    let my = "mysql://u:secret@127.0.0.1:1/db";
    let cases: [(&[&str], &str); 6] = [
        (
            &["--store", &sqlite, "--table", "t"],
            "--table is for postgres:// and mysql://",
        ),
        (
            &["--store", "redis://127.0.0.1:1", "--table", "t"],
            "--table is for",
        ),
        (
            &["--store", my, "--schema", "s"],
            "--schema is for postgres://",
        ),
        (
            &["--store", pg, "--prefix", "p:"],
            "--prefix is for redis://",
        ),
        (
            &["--store", &sqlite, "--prefix", "p:"],
            "--prefix is for redis://",
        ),
        (&["--store", "memory", "--schema", "s"], "--schema is for"),
    ];
    for (store, needle) in cases {
        for command in [
            &["inspect"][..],
            &["get", "a:b"],
            &["evict", "--yes", "a:b"],
            &["purge"],
            &["migrate"],
        ] {
            let args = args_with(command, store);
            let out = idem(&args);
            assert!(!out.status.success(), "{args:?}");
            let err = stderr(&out);
            // The memory store is refused by the operator commands first, for what it is.
            if store[1] == "memory" && command[0] != "migrate" {
                assert!(err.contains("memory store"), "{args:?}: {err}");
                continue;
            }
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!err.contains("secret"), "{args:?}: {err}");
        }
    }
    assert!(!dir.path().join("x.db").exists());
    assert_fails_with(
        &[
            "bench",
            "--store",
            "memory",
            "--prefix",
            "p:",
            "--messages",
            "10",
        ],
        "--prefix is for redis://",
    );
}

/// `idem migrate` creates idem's table on request (stores never do it when they connect), and
/// is safe to run again.
#[tokio::test]
async fn migrate_creates_the_schema_on_postgres_and_mysql() {
    let run = run_id();
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
        conn.exec_drop("DELETE FROM idem_schema WHERE table_name = ?", (&table,))
            .await
            .unwrap();
        drop(conn);
        pool.disconnect().await.unwrap();
        assert_eq!(n, Some(1));
    }
}

/// Stores without a schema: `migrate` succeeds with one line that says why there is nothing
/// to do, so one deployment script runs on every store. Nothing is created or contacted.
#[test]
fn migrate_is_a_no_op_on_stores_without_a_schema() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let sqlite = format!("sqlite:{}", db.display());
    for (store, why) in [
        ("memory", "keeps no schema"),
        // Nothing listens on port 1: a no-op must not need the server.
        ("redis://:secret@127.0.0.1:1/3", "Redis keeps no schema"),
        (
            &sqlite,
            "creates or upgrades its table when it opens the file",
        ),
    ] {
        let out = idem(&["migrate", "--store", store]);
        assert!(out.status.success(), "{store}: {}", stderr(&out));
        let text = stdout(&out);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("nothing to migrate") && text.contains(why),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
    }
    assert!(!db.exists(), "migrate created {}", db.display());
    let out = idem(&[
        "migrate",
        "--store",
        "redis://127.0.0.1:1",
        "--prefix",
        "app:",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `idem bench` says what its columns mean under the table, and, when stderr is not a
/// terminal (here: a pipe, as in CI), prints a progress line now and then.
#[test]
fn bench_explains_its_table_and_reports_progress_in_logs() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("bench.db").display());
    let base = [
        "bench",
        "--store",
        &store,
        "--profile",
        "sequential",
        "--messages",
        "2000",
        "--heartbeat",
        "20ms",
    ];
    let out = idem(&base);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("dup msg/s = ") && text.contains("duplicates answered from the store"),
        "{text}"
    );
    let err = stderr(&out);
    let beat = err
        .lines()
        .find(|l| l.starts_with("idem bench: ") && l.contains("messages measured so far"))
        .unwrap_or_else(|| panic!("no heartbeat: {err}"));
    assert!(
        beat.contains(&format!("{store} store sequential: running for")),
        "{beat}"
    );
    assert!(beat.contains("passes of 2000 each"), "{beat}");

    let out = idem(&[&base[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!text.contains("dup msg/s"), "{text}");
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        assert!(row["dup_msgs_per_s"].is_number(), "{row}");
    }

    assert_fails_with(
        &["bench", "--store", "memory", "--heartbeat", "soon"],
        "invalid duration",
    );
}

fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}_{nanos:x}", std::process::id())
}
