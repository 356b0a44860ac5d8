//! Metric names of the HTTP layer, through the [`metrics`] facade, labelled `layer` with the
//! layer's name (default `http`). The executor underneath also reports the core's series
//! (`idem_executed_total`, `idem_store_op_seconds`, ...) labelled `executor` with the same name.

use metrics::Counter;

/// Requests the layer answered, by `outcome`: `executed`, `replayed`, `in_progress`,
/// `mismatch`, `released` (a 5xx, a panic or a service error: the claim was released),
/// `tombstone` (a replay of a response that was not kept), `missing_key`, `invalid_key`,
/// `no_principal`, `body_too_large`, `store_error`, `lease_lost`, `passthrough`.
pub const REQUESTS: &str = "idem_http_requests_total";
/// Responses replayed from the store.
pub const REPLAYS: &str = "idem_http_replays_total";
/// Requests answered 409 because the same key was in flight (after any configured wait).
pub const CONFLICTS: &str = "idem_http_conflicts_total";
/// Requests whose key was known with another fingerprint.
pub const MISMATCHES: &str = "idem_http_mismatches_total";
/// Executions that took over an expired lease: a previous attempt may have run.
pub const TAKEOVERS: &str = "idem_http_takeovers_total";
/// Bytes of responses recorded (head and body, as stored).
pub const STORED_BYTES: &str = "idem_http_stored_bytes_total";
/// Responses recorded as tombstones (too large, or streamed).
pub const TOMBSTONES: &str = "idem_http_tombstones_total";

const OUTCOMES: [&str; 13] = [
    "executed",
    "replayed",
    "in_progress",
    "mismatch",
    "released",
    "tombstone",
    "missing_key",
    "invalid_key",
    "no_principal",
    "body_too_large",
    "store_error",
    "lease_lost",
    "passthrough",
];

/// One request outcome, an index into the registered counters.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Answer {
    Executed,
    Replayed,
    InProgress,
    Mismatch,
    Released,
    Tombstone,
    MissingKey,
    InvalidKey,
    NoPrincipal,
    BodyTooLarge,
    StoreError,
    LeaseLost,
    Passthrough,
}

/// Registered handles of one layer.
#[derive(Clone, Debug)]
pub(crate) struct HttpMetrics {
    requests: Vec<Counter>,
    pub(crate) replays: Counter,
    pub(crate) conflicts: Counter,
    pub(crate) mismatches: Counter,
    pub(crate) takeovers: Counter,
    pub(crate) stored_bytes: Counter,
    pub(crate) tombstones: Counter,
}

impl HttpMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let layer = name.to_owned();
        let counter = |n: &'static str| metrics::counter!(n, "layer" => layer.clone());
        Self {
            requests: OUTCOMES
                .iter()
                .map(|o| metrics::counter!(REQUESTS, "layer" => layer.clone(), "outcome" => *o))
                .collect(),
            replays: counter(REPLAYS),
            conflicts: counter(CONFLICTS),
            mismatches: counter(MISMATCHES),
            takeovers: counter(TAKEOVERS),
            stored_bytes: counter(STORED_BYTES),
            tombstones: counter(TOMBSTONES),
        }
    }

    pub(crate) fn answer(&self, a: Answer) {
        if let Some(c) = self.requests.get(a as usize) {
            c.increment(1);
        }
    }
}
