//! The conformance suite against the shared MariaDB / MySQL server (`IDEM_MYSQL_URL`), on the
//! server's clock. Every check works in a table of its own, dropped when it ends, so the checks
//! run in parallel without seeing each other's records (purges included).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use idem_conformance::RealTimeHarness;
use idem_mysql::MysqlStore;

async fn harness() -> Option<RealTimeHarness<MysqlStore>> {
    let url = common::url()?;
    let table = common::unique("idem_conformance");
    let store = common::store(&url, &table).await;
    // Generous: the machine is shared and a unit must dwarf a round trip.
    Some(
        RealTimeHarness::new(store, Duration::from_millis(300))
            .cleanup(common::DropTable { url, table }),
    )
}

idem_conformance::conformance_tests!(harness);
