//! Helpers shared by the broker integration tests. The general ones come from
//! `idem_conformance::broker` (the effect ledger, running a consumer) and `idem_testkit` (the
//! proxy, private servers, names, polling); what is left here is the broker tests' own.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::sync::Arc;
use std::time::Duration;

use idem::Attempt;
use idem_broker::Message;

pub use idem_conformance::broker::{Ledger, Running, numbered, start};
pub use idem_testkit::{Proxy, ServerProcess, free_port, socket_addr, unique, until, via};

/// A SQLite store in a temporary directory (kept alive by the returned guard).
pub fn sqlite_store() -> (idem_sqlite::SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = idem_sqlite::SqliteStore::open(dir.path().join("idem.db")).unwrap();
    (store, dir)
}

/// A consumer on a SQLite store whose handler takes `millis` per message, one batch of 10 at a
/// time: slow enough for a test to break things while it runs. The returned directory holds
/// the store.
pub fn start_slow<Src: idem_broker::Source>(
    source: Src,
    ledger: &Ledger,
    millis: u64,
) -> (Arc<idem_broker::Stats>, Running, tempfile::TempDir) {
    let (store, dir) = sqlite_store();
    let l = ledger.clone();
    let handler = move |m: Message, _: Attempt| {
        let l = l.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            l.apply(&m);
            Ok::<_, std::io::Error>(())
        }
    };
    let consumer = idem_broker::Consumer::new(
        source,
        idem::Executor::new(store),
        idem::Namespace::new("slow-test").unwrap(),
        handler,
    )
    .batch_size(10)
    .concurrency(1);
    let (stats, running) = start(consumer);
    (stats, running, dir)
}
