//! The conformance suite against the shared MariaDB / MySQL server (`IDEM_MYSQL_URL`), on the
//! server's clock. Every check works in its own namespace, so they run in parallel in one
//! table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idem_conformance::{RealTimeHarness, server};
use idem_mysql::MysqlStore;

async fn harness() -> Option<RealTimeHarness<MysqlStore>> {
    let url = server::url(server::MYSQL)?;
    let store = MysqlStore::builder(url)
        .table("idem_conformance")
        .build()
        .expect("store");
    store.migrate().await.expect("migrate");
    // Generous: the machine is shared and a unit must dwarf a round trip.
    Some(RealTimeHarness::new(store, Duration::from_millis(300)))
}

idem_conformance::conformance_tests!(harness);
