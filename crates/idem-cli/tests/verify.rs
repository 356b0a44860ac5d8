//! `idem verify` through the real binary.
//!
//! Each fault test turns on one fault alone and asserts both its counter and its
//! characteristic consequence, so a fault that is silently not injected fails its test (the
//! counter is 0, or the consequence is missing). The checker tests feed verify a deliberately
//! broken handler (`--sabotage`) and no faults at all, and expect it to fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use serde_json::Value;

/// Small runs: the debug binary, three modes, shared cores.
const MESSAGES: &str = "2000";

fn idem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .output()
        .expect("run idem")
}

/// Runs `idem verify --json` with `args`; returns the exit success and the parsed report.
fn verify(args: &[&str]) -> (bool, Value) {
    let mut all = vec!["verify", "--json", "--messages", MESSAGES];
    all.extend_from_slice(args);
    let out = idem(&all);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json printed no JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        out.status.success(),
        report["ok"].as_bool().unwrap(),
        "the exit code must follow ok: {report}"
    );
    (out.status.success(), report)
}

/// Only `fault` on, at `rate`, with a fixed seed so that which deliveries it hits does not
/// change between runs (timing still does).
fn only(fault: &str, rate: &str, extra: &[&str]) -> (bool, Value) {
    let flag = format!("--{fault}-rate");
    let mut args = vec!["--no-faults", "--seed", "1", &flag, rate];
    args.extend_from_slice(extra);
    verify(&args)
}

fn run<'a>(report: &'a Value, mode: &str) -> &'a Value {
    report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} run in {report}"))
}

fn check_ok(report: &Value, mode: &str) -> bool {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["mode"] == mode)
        .unwrap()["ok"]
        .as_bool()
        .unwrap()
}

fn n(run: &Value, path: &[&str]) -> u64 {
    let mut v = run;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

fn assert_exactly_once(report: &Value) {
    let tx = run(report, "transactional");
    assert_eq!(n(tx, &["duplicate_effects"]), 0, "{tx}");
    assert_eq!(n(tx, &["lost"]), 0, "{tx}");
    assert_eq!(tx["balances_exact"], true, "{tx}");
    let store = run(report, "store");
    assert_eq!(n(store, &["lost"]), 0, "{store}");
    assert!(
        n(store, &["duplicate_effects"]) <= n(store, &["window_events"]),
        "{store}"
    );
    assert_eq!(n(store, &["duplicates_outside_windows"]), 0, "{store}");
    assert!(check_ok(report, "store") && check_ok(report, "transactional"));
}

#[test]
fn json_has_the_issues_fields_and_default_faults_pass() {
    let (ok, report) = verify(&[]);
    assert!(ok, "{report}");
    assert!(report["seed"].is_u64());
    assert_eq!(report["messages"], 2000);
    let runs = report["runs"].as_array().unwrap();
    let modes: Vec<_> = runs.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["naive", "store", "transactional"]);
    for r in runs {
        for field in [
            "deliveries",
            "duplicate_deliveries",
            "effects",
            "duplicate_effects",
            "lost",
            "window_events",
        ] {
            assert!(r[field].is_u64(), "{field} in {r}");
        }
        assert!(r["msgs_per_s"].as_f64().unwrap() > 0.0);
        assert!(
            n(r, &["deliveries"]) > 2000,
            "faults cause redeliveries: {r}"
        );
    }
    assert!(n(run(&report, "naive"), &["duplicate_effects"]) > 0);
    assert_exactly_once(&report);
}

#[test]
fn table_output_and_exit_code() {
    let out = idem(&["verify", "--messages", "1000", "--dup-publish-rate", "0.05"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    for needle in [
        "mode",
        "deliveries",
        "dup effects",
        "window",
        "msgs/s",
        "naive",
        "store",
        "transactional",
        "faults injected:",
        "verdict: OK",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
}

// Fault: the producer retries a publish (a lost confirm), so the broker holds the message
// twice. Without dedup each copy is applied; idem replays or holds off the second.
#[test]
fn dup_publish_duplicates_deliveries_and_idem_absorbs_them() {
    let (ok, report) = only("dup-publish", "0.05", &[]);
    assert!(ok, "{report}");
    let naive = run(&report, "naive");
    let published = n(naive, &["faults", "dup_publish"]);
    assert!(published > 40, "{naive}");
    // Nothing else redelivers in naive mode: every extra copy is one duplicate delivery and
    // one duplicate effect.
    assert_eq!(n(naive, &["duplicate_deliveries"]), published, "{naive}");
    assert_eq!(n(naive, &["duplicate_effects"]), published, "{naive}");
    let store = run(&report, "store");
    assert_eq!(n(store, &["faults", "dup_publish"]), published);
    assert_eq!(n(store, &["duplicate_effects"]), 0, "{store}");
    assert!(
        n(store, &["outcomes", "replayed"]) + n(store, &["outcomes", "in_progress"]) >= published,
        "{store}"
    );
    assert_exactly_once(&report);
}

// Fault: the ack is lost on the way to the broker, which redelivers after the visibility
// timeout a message whose effect already happened.
#[test]
fn lost_acks_redeliver_and_idem_replays() {
    let (ok, report) = only("lost-ack", "0.05", &[]);
    assert!(ok, "{report}");
    let naive = run(&report, "naive");
    let lost = n(naive, &["faults", "lost_ack"]);
    assert!(lost > 40, "{naive}");
    assert_eq!(n(naive, &["duplicate_effects"]), lost, "{naive}");
    for mode in ["store", "transactional"] {
        let r = run(&report, mode);
        let lost = n(r, &["faults", "lost_ack"]);
        assert!(lost > 40, "{r}");
        // Every redelivery after a lost ack is answered from the record.
        assert_eq!(n(r, &["outcomes", "replayed"]), lost, "{r}");
        assert_eq!(n(r, &["duplicate_effects"]), 0, "{r}");
    }
    assert_exactly_once(&report);
}

// Fault: the consumer crashes before the effect. In store mode it dies holding the claim, so
// the redelivery must wait for the lease to end and take over (not a duplicate: no effect ran).
#[test]
fn crash_before_the_effect_leads_to_takeovers_not_duplicates() {
    let (_, report) = only("crash-before", "0.01", &[]);
    for mode in ["naive", "store", "transactional"] {
        let r = run(&report, mode);
        let crashes = n(r, &["faults", "crash_before"]);
        assert!(crashes > 5, "{r}");
        assert_eq!(n(r, &["consumer_restarts"]), crashes, "{r}");
    }
    let store = run(&report, "store");
    assert!(n(store, &["takeovers"]) > 0, "{store}");
    assert_exactly_once(&report);
}

// Fault: the consumer crashes after the effect and before `complete`: store mode's window.
// Store mode repeats exactly those effects; transactional mode rolls the effect back with the
// transaction, so nothing is repeated.
#[test]
fn crash_after_the_effect_is_the_store_mode_window() {
    let (ok, report) = only("crash-after-effect", "0.01", &[]);
    assert!(ok, "{report}");
    let naive = run(&report, "naive");
    assert!(n(naive, &["duplicate_effects"]) > 0, "{naive}");
    let store = run(&report, "store");
    assert!(n(store, &["faults", "crash_after_effect"]) > 5, "{store}");
    assert!(n(store, &["window", "crashes"]) > 0, "{store}");
    assert!(n(store, &["duplicate_effects"]) > 0, "{store}");
    let tx = run(&report, "transactional");
    assert!(n(tx, &["faults", "crash_after_effect"]) > 5, "{tx}");
    assert_eq!(n(tx, &["effects"]), 2000, "{tx}");
    assert_eq!(n(tx, &["window_events"]), 0, "{tx}");
    assert_exactly_once(&report);
}

// Fault: the consumer crashes after `complete` and before the ack: the redelivery must be
// answered from the record.
#[test]
fn crash_after_complete_is_replayed() {
    let (ok, report) = only("crash-after-complete", "0.01", &[]);
    assert!(ok, "{report}");
    let naive = run(&report, "naive");
    assert!(n(naive, &["duplicate_effects"]) > 0, "{naive}");
    for mode in ["store", "transactional"] {
        let r = run(&report, mode);
        let crashes = n(r, &["faults", "crash_after_complete"]);
        assert!(crashes > 5, "{r}");
        // Each crash really took its consumer down (and nothing else did).
        assert_eq!(n(r, &["consumer_restarts"]), crashes, "{r}");
        assert!(n(r, &["outcomes", "replayed"]) > 0, "{r}");
    }
    assert_exactly_once(&report);
}

// Fault: a handler slower than the visibility timeout: the broker delivers the message to a
// second consumer while the first still runs. The heartbeat keeps the first one's lease, so
// the second is told "in progress" instead of running the effect again.
#[test]
fn slow_handlers_are_held_off_by_the_heartbeat() {
    let (ok, report) = only("slow", "0.02", &[]);
    assert!(ok, "{report}");
    let naive = run(&report, "naive");
    assert!(n(naive, &["faults", "slow"]) > 10, "{naive}");
    assert!(n(naive, &["duplicate_effects"]) > 0, "{naive}");
    let store = run(&report, "store");
    assert!(n(store, &["faults", "slow"]) > 10, "{store}");
    assert!(n(store, &["outcomes", "in_progress"]) > 0, "{store}");
    // Slow handlers outlive their lease (twice over by default): only the heartbeat kept each
    // claim, so no lease was lost, no one took over and nothing was applied twice.
    for zero in [
        &["outcomes", "lease_lost"][..],
        &["takeovers"],
        &["window_events"],
        &["duplicate_effects"],
    ] {
        assert_eq!(n(store, zero), 0, "{zero:?}: {store}");
    }
    assert_exactly_once(&report);
}

// Fault: a consumer freezes past its lease with no heartbeat (a GC or VM stall); another
// consumer takes over; the frozen one wakes and tries to complete, and must be refused.
#[test]
fn pauses_end_in_takeovers_and_the_late_completion_is_refused() {
    // Frozen long enough for the other consumers to take over even on a slow, busy machine.
    let (ok, report) = only("pause", "0.005", &["--pause-ms", "4000"]);
    assert!(ok, "{report}");
    let naive = run(&report, "naive");
    assert!(n(naive, &["duplicate_effects"]) > 0, "{naive}");
    let store = run(&report, "store");
    assert!(n(store, &["faults", "pause"]) > 0, "{store}");
    assert!(n(store, &["takeovers"]) > 0, "{store}");
    assert!(n(store, &["outcomes", "lease_lost"]) > 0, "{store}");
    assert!(n(store, &["window", "pause_takeovers"]) > 0, "{store}");
    let tx = run(&report, "transactional");
    assert!(n(tx, &["faults", "pause"]) > 0, "{tx}");
    assert!(n(tx, &["outcomes", "replayed"]) > 0, "{tx}");
    assert_exactly_once(&report);
}

// Fault: transient store errors, before the operation or after it (the write happened, the
// caller hears an error). The executor fails closed; the consumer nacks; nothing is lost or
// repeated. Naive mode has no store, so it sees no fault and verify as a whole fails.
#[test]
fn store_errors_fail_closed_without_loss_or_duplicates() {
    let (ok, report) = only("store-error", "0.05", &[]);
    assert!(
        !ok,
        "naive mode saw no fault, so verify must say so: {report}"
    );
    assert!(!check_ok(&report, "naive"));
    for mode in ["store", "transactional"] {
        let r = run(&report, mode);
        assert!(n(r, &["faults", "store_error"]) > 40, "{r}");
        assert!(n(r, &["outcomes", "store_error"]) > 0, "{r}");
        assert!(
            n(r, &["duplicate_deliveries"]) > 0,
            "failing closed means redelivery: {r}"
        );
    }
    assert_exactly_once(&report);
}

// The checker itself: a handler that applies some effects twice must make verify fail.
#[test]
fn a_double_applying_handler_fails_verify() {
    let (ok, report) = verify(&[
        "--no-faults",
        "--dup-publish-rate",
        "0.05",
        "--sabotage",
        "double-apply",
    ]);
    assert!(!ok, "{report}");
    assert!(check_ok(&report, "naive"), "{report}");
    for mode in ["store", "transactional"] {
        assert!(!check_ok(&report, mode), "{report}");
        assert!(n(run(&report, mode), &["duplicate_effects"]) >= 40);
    }
}

// The checker itself: a handler that acks without applying some effects must make verify fail.
#[test]
fn a_handler_that_skips_effects_fails_verify() {
    let (ok, report) = verify(&[
        "--no-faults",
        "--dup-publish-rate",
        "0.05",
        "--sabotage",
        "skip-effect",
    ]);
    assert!(!ok, "{report}");
    for mode in ["store", "transactional"] {
        assert!(!check_ok(&report, mode), "{report}");
        assert_eq!(n(run(&report, mode), &["lost"]), 40);
    }
}

// The checker itself: with no fault, the naive consumer applies no duplicate, which means the
// fault injection did not work: verify must fail and say so.
#[test]
fn no_faults_means_verify_fails_and_says_why() {
    let out = idem(&["verify", "--messages", "500", "--no-faults"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("fault injection did not work") && stdout.contains("verdict: FAILED"),
        "{stdout}"
    );
}

#[test]
fn the_seed_reproduces_the_workload_and_the_faults() {
    let args = |seed: &'static str| {
        [
            "--no-faults",
            "--dup-publish-rate",
            "0.1",
            "--lost-ack-rate",
            "0.05",
            "--seed",
            seed,
        ]
    };
    let (_, a) = verify(&args("7"));
    let (_, b) = verify(&args("7"));
    let (_, c) = verify(&args("8"));
    let counts = |r: &Value| {
        let naive = run(r, "naive");
        (
            n(naive, &["faults", "dup_publish"]),
            n(naive, &["faults", "lost_ack"]),
            n(naive, &["duplicate_effects"]),
        )
    };
    assert_eq!(a["seed"], 7);
    assert_eq!(counts(&a), counts(&b));
    assert_ne!(counts(&a), counts(&c));
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let out = idem(&["verify", "--lost-ack-rate", "1.5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a rate between 0 and 1"));
    let out = idem(&["verify", "--store", "ftp://x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported store URL scheme"));
    let out = idem(&["verify", "--store", "memory", "--failover"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--failover needs a Redis Cluster store"),
        "{stderr}"
    );
    let out = idem(&["verify", "--failover-lag-ms", "100"]);
    assert!(!out.status.success());
    let out = idem(&["verify", "--outbox"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--outbox needs --broker"));
    // Refused before any broker is started.
    let out = idem(&[
        "verify",
        "--broker",
        "nats",
        "--outbox",
        "--dup-publish-rate",
        "0.1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--dup-publish-rate has no effect with --outbox"),
        "{stderr}"
    );
}

/// `verify --store` on the SQL servers: store and transactional modes both run (in scratch
/// tables of the run's own, dropped at the end) and keep their guarantees.
fn verify_on_server(server: (&str, &str)) {
    let Some(url) = idem_conformance::server::url(server) else {
        return;
    };
    let (ok, report) = verify(&["--store", &url, "--seed", "3"]);
    assert!(ok, "{report}");
    let modes: Vec<_> = report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["naive", "store", "transactional"], "{report}");
    assert_exactly_once(&report);
}

#[test]
fn postgres_runs_store_and_transactional_modes() {
    verify_on_server(idem_conformance::server::POSTGRES);
}

#[test]
fn mysql_runs_store_and_transactional_modes() {
    verify_on_server(idem_conformance::server::MYSQL);
}

/// `verify --store` on a store without a transactional mode: store mode runs (through the same
/// runtime) and keeps its promise; transactional mode is skipped, and says so.
fn verify_store_mode_only(url: &str) {
    let (ok, report) = verify(&["--store", url, "--seed", "5"]);
    assert!(ok, "{report}");
    let modes: Vec<_> = report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["naive", "store"], "{report}");
    let skipped = report["skipped"].as_array().unwrap();
    assert!(
        skipped.len() == 1
            && skipped[0]
                .as_str()
                .unwrap()
                .contains("no transactional mode"),
        "{report}"
    );
    let store = run(&report, "store");
    assert_eq!(n(store, &["lost"]), 0, "{store}");
    assert_eq!(n(store, &["duplicates_outside_windows"]), 0, "{store}");
    assert!(check_ok(&report, "store"));
}

#[test]
fn memory_runs_store_mode_only() {
    verify_store_mode_only("memory");
}

#[test]
fn redis_runs_store_mode_only() {
    if let Some(url) = idem_conformance::server::url(idem_conformance::server::REDIS) {
        verify_store_mode_only(&url);
    }
}

/// `verify --failover` on the Redis Cluster of `.ci/run` (`IDEM_REDIS_CLUSTER_URL`): while
/// store mode runs, a master's replica is cut off and then takes over. Without `WAIT` the
/// report counts the completed records the old master took with it (and verify fails, saying
/// so); with `wait_replicas=1` in the URL those writes failed instead of being acknowledged,
/// nothing is lost and verify passes. One test: both runs fail over the same cluster, in turn.
#[test]
fn a_cluster_failover_is_counted_and_waiting_for_a_replica_loses_nothing() {
    let Some(url) =
        idem_conformance::server::url(("IDEM_REDIS_CLUSTER_URL", "redis://127.0.0.1:7000"))
    else {
        return;
    };
    let fail_over = |url: &str| {
        let (ok, report) = verify(&[
            "--store",
            url,
            "--failover",
            "--failover-lag-ms",
            "300",
            "--seed",
            "7",
        ]);
        let f = report["store_failover"].clone();
        assert!(f["error"].is_null(), "{report}");
        assert_ne!(f["master"], f["promoted"], "{report}");
        // The old master came back as a replica: the cluster is whole for the next run.
        assert!(f["resynced_ms"].is_u64(), "{report}");
        (ok, report, n(&f, &["records_lost"]))
    };
    let (ok, report, lost) = fail_over(&url);
    // The cut lasted until transfers went through: writes reached the old master alone. (With
    // `WAIT`, below, those writes fail instead, and few transfers go through during the cut.)
    assert!(
        n(&report["store_failover"], &["acked_while_cut"]) >= 30,
        "{report}"
    );
    assert!(
        lost > 0,
        "transfers were acked while the replica was cut off, and none was lost: {report}"
    );
    assert!(!ok, "{report}");
    let waited = format!("{url}?wait_replicas=1&wait_timeout_ms=200");
    let (ok, report, lost) = fail_over(&waited);
    assert_eq!(lost, 0, "{report}");
    assert!(ok, "{report}");
    let store = run(&report, "store");
    assert_eq!(n(store, &["duplicates_outside_windows"]), 0, "{store}");
}
