//! The conformance suite against `PostgresStore` on the shared PostgreSQL server, on the
//! server's clock (`RealTimeHarness`). Every check works in a schema of its own, dropped when it
//! ends, so the checks run in parallel without seeing each other's records (purges included).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use idem_conformance::RealTimeHarness;
use idem_postgres::PostgresStore;

async fn harness() -> Option<RealTimeHarness<PostgresStore>> {
    let db = common::Db::new("idem_conformance").await?;
    // Claims take about a millisecond on loopback; a generous unit keeps a loaded machine
    // (other test binaries, the parallel checks) from turning a live lease into an expired one.
    Some(
        RealTimeHarness::new(db.store.clone(), Duration::from_millis(400))
            .property_cases(8)
            .cleanup(db),
    )
}

idem_conformance::conformance_tests!(harness);
