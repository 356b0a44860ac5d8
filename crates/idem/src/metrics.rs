//! Metric names. Everything goes through the [`metrics`] facade, labelled with the executor's
//! name, so any recorder (Prometheus, StatsD, ...) picks them up. Install the recorder before
//! building executors: handles are registered once, at build time.

use std::time::Duration;

use metrics::{Counter, Histogram};

/// Handlers that ran and whose completion is durable.
pub const EXECUTED: &str = "idem_executed_total";
/// Duplicates answered with a stored result.
pub const REPLAYED: &str = "idem_replayed_total";
/// Claims that met another consumer's live lease.
pub const IN_PROGRESS: &str = "idem_in_progress_total";
/// Claims that took over an expired lease (store mode's window: the old owner may have run).
pub const TAKEOVERS: &str = "idem_takeovers_total";
/// Claims that found a record past retention and processed the key again.
pub const REPROCESSED: &str = "idem_reprocessed_total";
/// Claims whose payload fingerprint differed from the stored one.
pub const MISMATCHES: &str = "idem_mismatches_total";
/// Writes refused because the lease was lost.
pub const LEASE_LOST: &str = "idem_lease_lost_total";
/// Claims released after a handler error (to be retried).
pub const RELEASED: &str = "idem_released_total";
/// Deliveries answered "exhausted": the key failed for good now or earlier (every redelivery
/// of a failed key counts again), so the message is dead-lettered.
pub const EXHAUSTED: &str = "idem_exhausted_total";
/// Store operations that returned an error, by `op`.
pub const STORE_ERRORS: &str = "idem_store_errors_total";
/// Store operation latency in seconds, by `op`.
pub const STORE_LATENCY: &str = "idem_store_op_seconds";

/// The store operations timed in [`STORE_LATENCY`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Claim,
    Complete,
    Release,
    Extend,
    Fail,
}

impl Op {
    const ALL: [Op; 5] = [Op::Claim, Op::Complete, Op::Release, Op::Extend, Op::Fail];
    fn as_str(self) -> &'static str {
        match self {
            Op::Claim => "claim",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::Extend => "extend",
            Op::Fail => "fail",
        }
    }
}

/// Registered handles of one executor.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub(crate) executed: Counter,
    pub(crate) replayed: Counter,
    pub(crate) in_progress: Counter,
    pub(crate) takeovers: Counter,
    pub(crate) reprocessed: Counter,
    pub(crate) mismatches: Counter,
    pub(crate) lease_lost: Counter,
    pub(crate) released: Counter,
    pub(crate) exhausted: Counter,
    latency: [Histogram; 5],
    errors: [Counter; 5],
    /// Whether a recorder takes the latency histograms: without one, the executor does not
    /// read the clock around store operations (two reads per operation, for nothing).
    pub(crate) timed: bool,
}

/// A value whose conversion notes that it happened: a histogram converts what it is given only
/// when a recorder stands behind it.
struct Probe<'a>(&'a std::cell::Cell<bool>);

impl metrics::IntoF64 for Probe<'_> {
    fn into_f64(self) -> f64 {
        self.0.set(true);
        0.0
    }
}

/// Whether `h` goes to a recorder: a histogram built while no recorder was installed does
/// nothing, and timing what it would record is wasted work (a clock read costs as much as a
/// few hash lookups). Records no value (`record_many` with a count of zero).
pub fn records(h: &Histogram) -> bool {
    let seen = std::cell::Cell::new(false);
    h.record_many(Probe(&seen), 0);
    seen.get()
}

impl Metrics {
    pub(crate) fn new(executor: &str) -> Self {
        let name = executor.to_owned();
        let c = |metric: &'static str| metrics::counter!(metric, "executor" => name.clone());
        let latency = Op::ALL.map(|op| {
            metrics::histogram!(STORE_LATENCY, "executor" => name.clone(), "op" => op.as_str())
        });
        Self {
            timed: latency.iter().any(records),
            executed: c(EXECUTED),
            replayed: c(REPLAYED),
            in_progress: c(IN_PROGRESS),
            takeovers: c(TAKEOVERS),
            reprocessed: c(REPROCESSED),
            mismatches: c(MISMATCHES),
            lease_lost: c(LEASE_LOST),
            released: c(RELEASED),
            exhausted: c(EXHAUSTED),
            latency,
            errors: Op::ALL.map(|op| {
                metrics::counter!(STORE_ERRORS, "executor" => name.clone(), "op" => op.as_str())
            }),
        }
    }

    pub(crate) fn store_op(&self, op: Op, elapsed: Duration, ok: bool) {
        self.latency[op as usize].record(elapsed.as_secs_f64());
        if !ok {
            self.errors[op as usize].increment(1);
        }
    }
}

/// Counts one outcome under `executor` (a [`Config`](crate::Config)'s name) with the counters
/// the [`Executor`](crate::Executor) keeps, for code that runs the state machine without an
/// executor: the SQL stores' transactional modes call it for every outcome they return.
/// `reprocessed` says whether the claim found a record past its retention.
///
/// A handle is looked up per call (one or two per outcome), which is negligible next to the
/// transaction the outcome comes from.
pub fn record_outcome<T, E>(executor: &str, outcome: &crate::Outcome<T, E>, reprocessed: bool) {
    use crate::Outcome as O;
    let name = match outcome {
        O::Executed(_) => EXECUTED,
        O::Replayed(_) => REPLAYED,
        O::InProgress { .. } => IN_PROGRESS,
        O::Released { .. } => RELEASED,
        O::Exhausted { .. } => EXHAUSTED,
        O::Mismatch { .. } => MISMATCHES,
        O::LeaseLost { .. } => LEASE_LOST,
    };
    metrics::counter!(name, "executor" => executor.to_owned()).increment(1);
    if reprocessed {
        metrics::counter!(REPROCESSED, "executor" => executor.to_owned()).increment(1);
    }
}
