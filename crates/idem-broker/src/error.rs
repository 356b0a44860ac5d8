//! [`BrokerError`]: what a [`Source`](crate::Source), an [`Acker`](crate::Acker), a producer or
//! an [`Admin`](crate::Admin) reports when the broker could not do what was asked. Driver errors
//! are kept as the `source`. It is [`idem::KindError`] with a [`BrokerErrorKind`]: the same
//! shape as [`idem::StoreError`].

use std::fmt;

/// What went wrong with the broker, for callers to `match` on without seeing driver internals.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum BrokerErrorKind {
    /// The connection is down or was lost. Transient: the source reconnects with backoff.
    Connection,
    /// The broker did not answer in time. Transient; the operation may or may not have happened.
    Timeout,
    /// The broker refused a publish (a negative confirm, an unroutable mandatory message).
    Rejected,
    /// The broker answered something this adapter does not understand.
    Protocol,
    /// The URL or the settings are wrong (bad URL, unknown queue, missing permission).
    Config,
}

impl BrokerErrorKind {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Connection | Self::Timeout | Self::Rejected)
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "broker connection",
            Self::Timeout => "broker timeout",
            Self::Rejected => "broker rejected",
            Self::Protocol => "broker protocol",
            Self::Config => "broker configuration",
        }
    }
}

impl fmt::Display for BrokerErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl idem::ErrorKind for BrokerErrorKind {
    fn is_transient(self) -> bool {
        BrokerErrorKind::is_transient(self)
    }
}

/// An error from a broker: a [`kind`](idem::KindError::kind), a message for humans (never a
/// credential), and the driver's error as `source`. See [`idem::KindError`].
pub type BrokerError = idem::KindError<BrokerErrorKind>;

/// A URL with its password replaced by `***`, for logs and error messages.
#[cfg_attr(
    not(any(
        feature = "amqp",
        feature = "nats",
        feature = "mqtt",
        feature = "redis-streams"
    )),
    allow(dead_code)
)]
pub(crate) fn redact(url: &str) -> String {
    idem::redact_url(url)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("amqp://guest:secret@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(
            super::redact("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert!(!super::redact("guest:secret@host").contains("secret"));
    }
}
