//! The conformance suite against `PostgresStore` on the shared PostgreSQL server, on the
//! server's clock (`RealTimeHarness`). Every check works in its own namespace of one table in
//! the `idem_conformance` schema, so the checks run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idem_conformance::{RealTimeHarness, server};
use idem_postgres::PostgresStore;

async fn harness() -> Option<RealTimeHarness<PostgresStore>> {
    let url = server::url(server::POSTGRES)?;
    let builder = PostgresStore::builder(url)
        .schema("idem_conformance")
        .pool_size(8);
    builder.migrate().await.expect("migrate");
    let store = builder.connect().await.expect("connect");
    // Claims take about a millisecond on loopback; a generous unit keeps a loaded machine
    // (other test binaries, the parallel checks) from turning a live lease into an expired one.
    Some(RealTimeHarness::new(store, Duration::from_millis(400)).property_cases(8))
}

idem_conformance::conformance_tests!(harness);
