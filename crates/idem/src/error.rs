//! Errors. Duplicates, in-progress claims, mismatches and lost leases are *outcomes*
//! ([`Claim`](crate::Claim), [`WriteOutcome`](crate::WriteOutcome)), not errors: an error means
//! the store could not answer, and the caller must fail closed (no handler, no ack).

use std::borrow::Cow;
use std::fmt;

use crate::key::KeyError;

/// A boxed error from a store's driver, kept as the `source` of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a store, for callers to `match` on without seeing driver internals.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store cannot be reached or dropped the connection. Transient: back off and retry.
    Unavailable,
    /// The store did not answer in time. Transient: the write may or may not have happened, so
    /// the caller must not assume either (a fenced retry is safe).
    Timeout,
    /// The store is busy or in conflict (e.g. a serialization failure). Transient.
    Busy,
    /// A record read from the store cannot be decoded. Never treated as absent.
    Corrupt,
    /// The result given to `complete` is over the store's limit.
    ResultTooLarge,
    /// The store's schema is missing or older than this version of idem.
    Schema,
    /// The store's configuration or URL is wrong.
    Config,
    /// Anything else the store reported. Not retried automatically.
    Backend,
}

impl StoreErrorKind {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::Timeout | Self::Busy)
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "store unavailable",
            Self::Timeout => "store timeout",
            Self::Busy => "store busy",
            Self::Corrupt => "corrupt record",
            Self::ResultTooLarge => "result too large",
            Self::Schema => "schema problem",
            Self::Config => "store configuration",
            Self::Backend => "store error",
        }
    }
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from a [`Store`](crate::Store): a [`kind`](StoreError::kind), a message for humans,
/// and the driver's error as `source`.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: Cow<'static, str>,
    #[source]
    source: Option<BoxError>,
}

impl StoreError {
    /// An error of `kind` with a message.
    pub fn new(kind: StoreErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying driver error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The store is unreachable.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StoreErrorKind::Unavailable, message)
    }

    /// A record could not be decoded.
    pub fn corrupt(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StoreErrorKind::Corrupt, message)
    }

    /// A result of `size` bytes is over `limit`.
    pub fn result_too_large(size: usize, limit: usize) -> Self {
        Self::new(
            StoreErrorKind::ResultTooLarge,
            format!("result is {size} bytes, the store's limit is {limit} bytes"),
        )
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The human-readable message (without the source).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

/// A stored result could not be encoded or decoded (see [`Stored`](crate::Stored)).
#[derive(Debug, thiserror::Error)]
#[error("result codec: {message}")]
pub struct CodecError {
    message: Cow<'static, str>,
    #[source]
    source: Option<BoxError>,
}

impl CodecError {
    /// A codec error with a message and an optional source.
    pub fn new(message: impl Into<Cow<'static, str>>, source: Option<BoxError>) -> Self {
        Self {
            message: message.into(),
            source,
        }
    }
}

/// The umbrella error of idem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key or namespace was invalid.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The store failed; nothing may be acked (fail closed).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A result could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl Error {
    /// Whether retrying later may succeed (a transient store error).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Store(e) if e.is_transient())
    }
}
