//! The report (`idem_verify::report`): re-exported for `verify --broker`.

pub(crate) use idem_verify::report::{
    BrokerFaults, BrokerInfo, Measured, ModeName, OutboxFaults, Report, RequiredFaults, RunReport,
    WindowEvents, check,
};
