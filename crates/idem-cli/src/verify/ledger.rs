//! The ledgers (`idem_verify::ledger`): re-exported for `verify --broker`.

pub(crate) use idem_verify::ledger::{
    CrashHook, DieInTransaction, Snapshot, SqliteLedger, TransactionalLedger, TransferJob,
    apply_in_transaction,
};
