//! The conformance suite against the shared Redis (`IDEM_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), on the server's clock, once per [`Batching`] mode. Every check
//! gets its own key prefix, so the checks run in parallel and a purge in one never touches
//! another's records.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idem_conformance::{RealTimeHarness, server};
use idem_redis::{Batching, RedisStore};

/// Far above a loopback round trip, even on a busy two-core machine.
const UNIT: Duration = Duration::from_millis(300);

async fn harness(batching: Batching) -> Option<RealTimeHarness<RedisStore>> {
    let url = server::url(server::REDIS)?;
    let store = RedisStore::builder(url)
        .prefix(format!("idem-conformance:{:016x}:", fastrand::u64(..)))
        .batching(batching)
        // Longer than any check, short enough that the records leave the shared server soon.
        .expiry_grace(Duration::from_secs(60))
        .connect()
        .await
        .expect("connect to Redis");
    Some(RealTimeHarness::new(store, UNIT).property_cases(12))
}

async fn script() -> Option<RealTimeHarness<RedisStore>> {
    harness(Batching::Script).await
}

async fn pipeline() -> Option<RealTimeHarness<RedisStore>> {
    harness(Batching::Pipeline).await
}

mod batch_script {
    idem_conformance::conformance_tests!(super::script);
}

mod batch_pipeline {
    idem_conformance::conformance_tests!(super::pipeline);
}
