//! [`BrokerError`]: what a [`Source`](crate::Source), an [`Acker`](crate::Acker) or a producer
//! reports when the broker could not do what was asked. Driver errors are kept as the `source`.

use std::borrow::Cow;
use std::fmt;

use idem::BoxError;

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

/// An error from a broker: a [`kind`](BrokerError::kind), a message for humans (never a
/// credential), and the driver's error as `source`.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct BrokerError {
    kind: BrokerErrorKind,
    message: Cow<'static, str>,
    #[source]
    source: Option<BoxError>,
}

impl BrokerError {
    /// An error of `kind` with a message.
    pub fn new(kind: BrokerErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the driver's error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// A lost or refused connection.
    pub fn connection(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(BrokerErrorKind::Connection, message)
    }

    /// Bad settings.
    pub fn config(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(BrokerErrorKind::Config, message)
    }

    /// What went wrong.
    pub fn kind(&self) -> BrokerErrorKind {
        self.kind
    }

    /// The message (without the source).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

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
