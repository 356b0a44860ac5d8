//! The workload (`idem_verify::workload`): re-exported for `verify --broker` and
//! [`FlakyStore`](super::faults::FlakyStore).

pub(crate) use idem_verify::workload::{Workload, fnv1a, hash, unit};
