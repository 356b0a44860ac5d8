//! Errors. Duplicates, in-progress claims, mismatches and lost leases are *outcomes*
//! ([`Claim`](crate::Claim), [`WriteOutcome`](crate::WriteOutcome)), not errors: an error means
//! the store could not answer, and the caller must fail closed (no handler, no ack).
//!
//! Stores and brokers report errors of one shape, [`KindError<K>`]: a kind to `match` on (what
//! went wrong, [`StoreErrorKind`] for stores, `idem_broker::BrokerErrorKind` for brokers), a
//! message for humans, and the driver's error as `source`. The kind decides whether retrying may
//! help ([`ErrorKind::is_transient`]). [`StoreError`] is `KindError<StoreErrorKind>`.

use std::borrow::Cow;
use std::fmt;

use crate::key::KeyError;

/// A boxed error from a store's driver, kept as the `source` of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The kind of a [`KindError`]: a small `Copy` enum whose variants say what went wrong, and
/// whether retrying later may succeed.
///
/// ```
/// use idem::{ErrorKind, KindError};
///
/// #[derive(Clone, Copy, PartialEq, Eq, Debug)]
/// enum QueueErrorKind { Full, Closed }
///
/// impl std::fmt::Display for QueueErrorKind {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str(match self { Self::Full => "queue full", Self::Closed => "queue closed" })
///     }
/// }
///
/// impl ErrorKind for QueueErrorKind {
///     fn is_transient(self) -> bool { self == Self::Full }
/// }
///
/// let e = KindError::new(QueueErrorKind::Full, "1024 entries");
/// assert!(e.is_transient());
/// assert_eq!(e.to_string(), "queue full: 1024 entries");
/// ```
pub trait ErrorKind: Copy + Eq + fmt::Debug + fmt::Display + Send + Sync + 'static {
    /// Whether retrying the same operation later may succeed.
    fn is_transient(self) -> bool;
}

/// An error of kind `K`: a [`kind`](KindError::kind) for callers to `match` on without seeing
/// driver internals, a message for humans (never a credential), and the driver's error as
/// `source`. Displayed as `<kind>: <message>`.
///
/// Stores return [`StoreError`] (`KindError<StoreErrorKind>`), brokers `idem_broker::BrokerError`
/// (`KindError<BrokerErrorKind>`). The umbrella [`Error`] enum keeps its name; this is the
/// shape both of its I/O sides share.
pub struct KindError<K> {
    kind: K,
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl<K: ErrorKind> KindError<K> {
    /// An error of `kind` with a message.
    pub fn new(kind: K, message: impl Into<Cow<'static, str>>) -> Self {
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

    /// What went wrong.
    pub fn kind(&self) -> K {
        self.kind
    }

    /// The human-readable message (without the source).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying later may succeed: decided by the kind.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

impl<K: fmt::Display> fmt::Display for KindError<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl<K: fmt::Debug> fmt::Debug for KindError<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KindError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl<K: fmt::Debug + fmt::Display> std::error::Error for KindError<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

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

impl ErrorKind for StoreErrorKind {
    fn is_transient(self) -> bool {
        StoreErrorKind::is_transient(self)
    }
}

/// An error from a [`Store`](crate::Store): a [`kind`](KindError::kind), a message for humans,
/// and the driver's error as `source`. See [`KindError`].
pub type StoreError = KindError<StoreErrorKind>;

impl KindError<StoreErrorKind> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shape_for_every_kind() {
        let io = std::io::Error::other("connection reset");
        let e = StoreError::new(StoreErrorKind::Unavailable, "reading the record").with_source(io);
        assert_eq!(e.to_string(), "store unavailable: reading the record");
        assert_eq!(e.kind(), StoreErrorKind::Unavailable);
        assert_eq!(e.message(), "reading the record");
        assert!(e.is_transient());
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("connection reset"));
        assert!(!StoreError::corrupt("bad bytes").is_transient());
        assert!(Error::from(StoreError::unavailable("down")).is_transient());
        // A KindError is itself a source for another.
        let outer = StoreError::new(StoreErrorKind::Backend, "wrapped").with_source(e);
        assert!(std::error::Error::source(&outer).is_some());
    }
}
