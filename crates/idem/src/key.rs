//! What identifies "the same message": [`Namespace`] + id = [`Key`], and the payload
//! [`Fingerprint`] that tells a true duplicate from a different message under the same key.

use std::fmt;
use std::sync::Arc;

/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest key id, in bytes (UTF-8).
pub const MAX_ID_LEN: usize = 512;

/// Why a namespace or key was rejected.
///
/// Every variant names the problem precisely, so a consumer can put it in the reason of a
/// dead-lettered message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The namespace is the empty string.
    #[error("empty namespace")]
    EmptyNamespace,
    /// The namespace is longer than [`MAX_NAMESPACE_LEN`].
    #[error("namespace is {len} bytes, the limit is {max}")]
    NamespaceTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The namespace holds a character outside `A-Z a-z 0-9 - _ . /`.
    #[error("namespace holds {ch:?} at byte {position}; allowed are A-Z a-z 0-9 - _ . /")]
    InvalidNamespace {
        /// The offending character.
        ch: char,
        /// Its byte offset.
        position: usize,
    },
    /// The id is the empty string (a message without an id, or an empty header).
    #[error("empty key id")]
    EmptyId,
    /// The id is longer than [`MAX_ID_LEN`].
    #[error("key id is {len} bytes, the limit is {max}")]
    IdTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The id holds a control character (NUL, newline, ...).
    #[error("key id holds control character {ch:?} at byte {position}")]
    ControlCharacter {
        /// The offending character.
        ch: char,
        /// Its byte offset.
        position: usize,
    },
    /// The id bytes are not UTF-8.
    #[error("key id is not UTF-8 (invalid byte at offset {valid_up_to})")]
    NotUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
    /// A business key was built from no parts at all.
    #[error("business key has no parts")]
    NoParts,
    /// A part of a business key is empty (a missing field, most likely).
    #[error("business key part {index} is empty")]
    EmptyPart {
        /// Zero-based index of the part.
        index: usize,
    },
    /// `Key::parse` was given text without the `namespace:id` separator.
    #[error("expected NAMESPACE:ID, found no ':' in {0:?}")]
    MissingSeparator(String),
}

/// The consumer or handler a key belongs to, so two consumers of one message each process it
/// once.
///
/// Validated once and cheap to clone (an `Arc<str>`): build it at start-up and derive keys from
/// it.
///
/// ```
/// # fn main() -> Result<(), idem::KeyError> {
/// let payments = idem::Namespace::new("payments")?;
/// let key = payments.key("msg-0192b7c4")?;
/// assert_eq!(key.to_string(), "payments:msg-0192b7c4");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Namespace {
    name: Arc<str>,
    // Computed once: keys are hashed on every store operation, and their namespace is the
    // longer, constant part.
    hash: u64,
}

impl PartialEq for Namespace {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && (Arc::ptr_eq(&self.name, &other.name) || self.name == other.name)
    }
}

impl Eq for Namespace {}

impl std::hash::Hash for Namespace {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for Namespace {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Namespace {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name.cmp(&other.name)
    }
}

impl Namespace {
    /// Validates a namespace: 1 to 64 bytes of `A-Z a-z 0-9 - _ . /`.
    ///
    /// # Errors
    /// [`KeyError::EmptyNamespace`], [`KeyError::NamespaceTooLong`] or
    /// [`KeyError::InvalidNamespace`].
    pub fn new(name: impl AsRef<str>) -> Result<Self, KeyError> {
        let name = name.as_ref();
        if name.is_empty() {
            return Err(KeyError::EmptyNamespace);
        }
        if name.len() > MAX_NAMESPACE_LEN {
            return Err(KeyError::NamespaceTooLong {
                len: name.len(),
                max: MAX_NAMESPACE_LEN,
            });
        }
        if let Some((position, ch)) = name
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
        {
            return Err(KeyError::InvalidNamespace { ch, position });
        }
        Ok(Self {
            name: name.into(),
            hash: xxhash_rust::xxh3::xxh3_64(name.as_bytes()),
        })
    }

    /// The namespace as text.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// A key from a message id set by the producer at the origin (UUIDv7, snowflake, ...).
    ///
    /// Never use a delivery tag, MQTT packet id or broker offset: those change on redelivery.
    ///
    /// # Errors
    /// [`KeyError::EmptyId`], [`KeyError::IdTooLong`] or [`KeyError::ControlCharacter`].
    pub fn key(&self, id: impl AsRef<str>) -> Result<Key, KeyError> {
        Key::new(self.clone(), id)
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.name, f)
    }
}

/// The identity of a message for deduplication: a [`Namespace`] and an id.
///
/// Three constructors match the three key sources: [`Key::from_message_id`] (the producer's
/// message id), [`Key::from_parts`] (a business key such as `order_id + operation`) and
/// [`Key::from_content`] (a hash of the payload, when the producer sets no id).
///
/// ```
/// # fn main() -> Result<(), idem::KeyError> {
/// use idem::{Key, Namespace};
/// let ns = Namespace::new("billing")?;
/// let by_id = Key::from_message_id(&ns, "0192b7c4-5e9a-7c1d-8f00-3a2b1c0d9e8f")?;
/// let by_business = Key::from_parts(&ns, ["order-42", "refund"])?;
/// let by_content = Key::from_content(&ns, br#"{"amount": 10}"#)?;
/// assert_eq!(by_business.id(), "order-42|refund");
/// assert!(by_content.id().starts_with("blake3:"));
/// # let _ = by_id; Ok(()) }
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    namespace: Namespace,
    // `Arc` so that handing the key to a handler or a batch is a reference-count bump.
    id: Arc<str>,
}

impl Key {
    /// A key from a namespace and an id.
    ///
    /// # Errors
    /// [`KeyError::EmptyId`], [`KeyError::IdTooLong`] or [`KeyError::ControlCharacter`].
    pub fn new(namespace: Namespace, id: impl AsRef<str>) -> Result<Self, KeyError> {
        let id = id.as_ref();
        validate_id(id)?;
        Ok(Self {
            namespace,
            id: id.into(),
        })
    }

    /// A key from the message id the producer set at the origin.
    ///
    /// # Errors
    /// As [`Key::new`].
    pub fn from_message_id(namespace: &Namespace, id: impl AsRef<str>) -> Result<Self, KeyError> {
        Self::new(namespace.clone(), id)
    }

    /// A key from raw id bytes (a header value, say), which must be UTF-8.
    ///
    /// # Errors
    /// [`KeyError::NotUtf8`], or as [`Key::new`].
    pub fn from_bytes(namespace: &Namespace, id: &[u8]) -> Result<Self, KeyError> {
        let id = std::str::from_utf8(id).map_err(|e| KeyError::NotUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        Self::new(namespace.clone(), id)
    }

    /// A business key composed of parts, e.g. `[order_id, "refund"]`.
    ///
    /// Parts are joined with `|`; a `|` or `\` inside a part is escaped with `\`, so two
    /// different part lists never give the same key.
    ///
    /// # Errors
    /// [`KeyError::NoParts`], [`KeyError::EmptyPart`], or as [`Key::new`].
    pub fn from_parts<I, P>(namespace: &Namespace, parts: I) -> Result<Self, KeyError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<str>,
    {
        let mut id = String::new();
        let mut count = 0;
        for (index, part) in parts.into_iter().enumerate() {
            let part = part.as_ref();
            if part.is_empty() {
                return Err(KeyError::EmptyPart { index });
            }
            if index > 0 {
                id.push('|');
            }
            for c in part.chars() {
                if matches!(c, '|' | '\\') {
                    id.push('\\');
                }
                id.push(c);
            }
            count += 1;
        }
        if count == 0 {
            return Err(KeyError::NoParts);
        }
        Self::new(namespace.clone(), id)
    }

    /// A key from the content of the payload: `blake3:` and the 64 hex digits of its BLAKE3
    /// hash.
    ///
    /// Use it only when the producer sets no id: two messages with equal bytes become one
    /// message. BLAKE3 is cryptographic, so a producer cannot forge a payload that suppresses
    /// another one.
    ///
    /// # Errors
    /// None in practice (the id is always valid); the `Result` keeps the constructors uniform.
    pub fn from_content(namespace: &Namespace, payload: &[u8]) -> Result<Self, KeyError> {
        let hash = blake3::hash(payload);
        Self::new(namespace.clone(), format!("blake3:{}", hash.to_hex()))
    }

    /// Parses the `namespace:id` form used by the CLI and by [`Key`]'s `Display`.
    ///
    /// # Errors
    /// [`KeyError::MissingSeparator`], or as [`Namespace::new`] and [`Key::new`].
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (ns, id) = text
            .split_once(':')
            .ok_or_else(|| KeyError::MissingSeparator(text.to_owned()))?;
        Self::new(Namespace::new(ns)?, id)
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The id within the namespace.
    pub fn id(&self) -> &str {
        &self.id
    }
}

fn validate_id(id: &str) -> Result<(), KeyError> {
    if id.is_empty() {
        return Err(KeyError::EmptyId);
    }
    if id.len() > MAX_ID_LEN {
        return Err(KeyError::IdTooLong {
            len: id.len(),
            max: MAX_ID_LEN,
        });
    }
    // Fast path: printable ASCII needs no char decoding.
    if id.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    if let Some((position, ch)) = id.char_indices().find(|(_, c)| c.is_control()) {
        return Err(KeyError::ControlCharacter { ch, position });
    }
    Ok(())
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.id)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// A stable 128-bit hash of the payload bytes, stored with the record.
///
/// The same key with another fingerprint is a [`Claim::Mismatch`](crate::Claim::Mismatch): a
/// bug upstream (a reused id), never silently treated as a duplicate.
///
/// The hash is **XXH3-128 with seed 0** of exactly the bytes given, stored big-endian. It is
/// fixed by this documentation: it never depends on a per-process random seed, the platform or
/// the idem version, so records written by one consumer are understood by every other one.
/// It detects accidents, not forgeries; use [`Key::from_content`] where an adversary chooses
/// payloads.
///
/// ```
/// let a = idem::Fingerprint::of(b"hello");
/// assert_eq!(a, idem::Fingerprint::of(b"hello"));
/// assert_ne!(a, idem::Fingerprint::of(b"hello!"));
/// assert_eq!(a.to_string().len(), 32);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(u128);

impl Fingerprint {
    /// The fingerprint of `payload`.
    pub fn of(payload: &[u8]) -> Self {
        Self(xxhash_rust::xxh3::xxh3_128(payload))
    }

    /// The fingerprint as 16 big-endian bytes, the form stores keep.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// A fingerprint from its 16 big-endian bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }

    /// A fingerprint from a byte slice read from a store.
    ///
    /// # Errors
    /// `None` when the slice is not 16 bytes long (a corrupt record).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self::from_bytes(bytes.try_into().ok()?))
    }

    /// The raw 128-bit value.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// A fingerprint from its raw value.
    pub fn from_u128(value: u128) -> Self {
        Self(value)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(s, 16).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace::new("orders").unwrap()
    }

    #[test]
    fn namespace_validation_names_the_problem() {
        assert_eq!(Namespace::new(""), Err(KeyError::EmptyNamespace));
        assert_eq!(
            Namespace::new("a".repeat(65)),
            Err(KeyError::NamespaceTooLong { len: 65, max: 64 })
        );
        assert_eq!(
            Namespace::new("pay:ments"),
            Err(KeyError::InvalidNamespace {
                ch: ':',
                position: 3
            })
        );
        assert!(Namespace::new("team-a/payments.v2_x").is_ok());
    }

    #[test]
    fn id_validation_names_the_problem() {
        assert_eq!(ns().key(""), Err(KeyError::EmptyId));
        assert!(ns().key("x".repeat(MAX_ID_LEN)).is_ok());
        assert_eq!(
            ns().key("x".repeat(MAX_ID_LEN + 1)),
            Err(KeyError::IdTooLong { len: 513, max: 512 })
        );
        assert_eq!(
            ns().key("ab\0c"),
            Err(KeyError::ControlCharacter {
                ch: '\0',
                position: 2
            })
        );
        assert_eq!(
            Key::from_bytes(&ns(), b"ok\xffno"),
            Err(KeyError::NotUtf8 { valid_up_to: 2 })
        );
        assert_eq!(ns().key("ключ-💳").unwrap().id(), "ключ-💳");
    }

    #[test]
    fn business_keys_are_injective() {
        let a = Key::from_parts(&ns(), ["a|b", "c"]).unwrap();
        let b = Key::from_parts(&ns(), ["a", "b|c"]).unwrap();
        let c = Key::from_parts(&ns(), ["a\\", "|c"]).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(b, c);
        assert_eq!(a.id(), "a\\|b|c");
        assert_eq!(
            Key::from_parts(&ns(), Vec::<String>::new()),
            Err(KeyError::NoParts)
        );
        assert_eq!(
            Key::from_parts(&ns(), ["x", ""]),
            Err(KeyError::EmptyPart { index: 1 })
        );
    }

    #[test]
    fn content_keys_are_stable_hashes() {
        let k = Key::from_content(&ns(), b"payload").unwrap();
        assert_eq!(k, Key::from_content(&ns(), b"payload").unwrap());
        assert_ne!(k, Key::from_content(&ns(), b"payload2").unwrap());
        assert_eq!(k.id().len(), "blake3:".len() + 64);
    }

    #[test]
    fn parse_round_trips_display() {
        let k = Key::parse("orders:a:b").unwrap();
        assert_eq!(k.namespace().as_str(), "orders");
        assert_eq!(k.id(), "a:b");
        assert_eq!(Key::parse(&k.to_string()).unwrap(), k);
        assert!(matches!(
            Key::parse("nocolon"),
            Err(KeyError::MissingSeparator(_))
        ));
    }

    /// The fingerprint is part of the on-disk format: a change of algorithm would turn every
    /// stored duplicate into a mismatch. These values pin XXH3-128 (seed 0).
    #[test]
    fn fingerprint_is_pinned() {
        assert_eq!(
            Fingerprint::of(b"").to_string(),
            "99aa06d3014798d86001c324468d497f"
        );
        let f = Fingerprint::of(b"hello");
        assert_eq!(Fingerprint::from_bytes(f.to_bytes()), f);
        assert_eq!(f.to_string().parse::<Fingerprint>().unwrap(), f);
        assert_eq!(Fingerprint::from_slice(&[1, 2, 3]), None);
    }
}
