//! Where a message's key and fingerprint come from: [`KeyFrom`] (the producer's message id, a
//! header, a JSON pointer into the payload, or a content hash) and [`FingerprintFrom`] (the
//! whole payload by default). Both are small traits with closures allowed, so a consumer with
//! its own rule does not need to fork anything.

use std::fmt;
use std::str::FromStr;

use idem::{Fingerprint, Key, KeyError, Namespace};

use crate::message::Message;

/// Why no key could be taken from a message. The consumer dead-letters such messages with this
/// as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyExtractError {
    /// The message carries no message id.
    #[error(
        "the message has no message id (the producer must set one, or pick another key source)"
    )]
    NoMessageId,
    /// The header is missing.
    #[error("the message has no {0:?} header")]
    MissingHeader(String),
    /// The payload is not JSON.
    #[error("the payload is not JSON ({0})")]
    NotJson(String),
    /// The JSON pointer names nothing in the payload, or null.
    #[error("the payload has nothing at JSON pointer {0:?}")]
    MissingJsonField(String),
    /// The JSON value is an object or an array, not a scalar id.
    #[error("the value at JSON pointer {0:?} is not a string or a number")]
    NotScalar(String),
    /// The id was found but is not a valid key id.
    #[error("invalid key: {0}")]
    Invalid(#[from] KeyError),
}

/// Takes the key from a message.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key of `message` in `namespace`.
    ///
    /// # Errors
    /// A [`KeyExtractError`] naming what is missing or invalid: the message is dead-lettered.
    fn key(&self, namespace: &Namespace, message: &Message) -> Result<Key, KeyExtractError>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&Namespace, &Message) -> Result<Key, KeyExtractError> + Send + Sync + 'static,
{
    fn key(&self, namespace: &Namespace, message: &Message) -> Result<Key, KeyExtractError> {
        self(namespace, message)
    }
}

/// The usual key sources. Parses from the command-line forms `message-id`, `header:NAME`,
/// `json:/POINTER` and `hash`:
///
/// ```
/// use idem_broker::KeyFrom;
/// assert_eq!("header:Idempotency-Key".parse(), Ok(KeyFrom::Header("Idempotency-Key".into())));
/// assert_eq!("json:/order/id".parse(), Ok(KeyFrom::Json("/order/id".into())));
/// assert_eq!("hash".parse(), Ok(KeyFrom::ContentHash));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyFrom {
    /// The message id the producer set at the origin (the default, and the best choice).
    #[default]
    MessageId,
    /// A header (property, user property, stream field) holding the id.
    Header(String),
    /// A string or number in a JSON payload, by JSON pointer (RFC 6901), e.g. `/order/id`.
    Json(String),
    /// A BLAKE3 hash of the payload, for producers that set no id: identical payloads are the
    /// same message.
    ContentHash,
}

impl KeyExtractor for KeyFrom {
    fn key(&self, namespace: &Namespace, message: &Message) -> Result<Key, KeyExtractError> {
        match self {
            KeyFrom::MessageId => {
                let id = message.message_id().ok_or(KeyExtractError::NoMessageId)?;
                Ok(Key::from_message_id(namespace, id)?)
            }
            KeyFrom::Header(name) => {
                let value = message
                    .header(name)
                    .ok_or_else(|| KeyExtractError::MissingHeader(name.clone()))?;
                Ok(Key::from_bytes(namespace, value)?)
            }
            KeyFrom::Json(pointer) => {
                let value = json_at(message.payload(), pointer)?;
                match value {
                    serde_json::Value::String(s) => Ok(Key::from_message_id(namespace, s)?),
                    serde_json::Value::Number(n) => {
                        Ok(Key::from_message_id(namespace, n.to_string())?)
                    }
                    _ => Err(KeyExtractError::NotScalar(pointer.clone())),
                }
            }
            KeyFrom::ContentHash => Ok(Key::from_content(namespace, message.payload())?),
        }
    }
}

fn json_at(payload: &[u8], pointer: &str) -> Result<serde_json::Value, KeyExtractError> {
    let mut doc: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| KeyExtractError::NotJson(e.to_string()))?;
    match doc.pointer_mut(pointer).map(serde_json::Value::take) {
        None | Some(serde_json::Value::Null) => {
            Err(KeyExtractError::MissingJsonField(pointer.to_owned()))
        }
        Some(v) => Ok(v),
    }
}

/// A key source that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key source {0:?}: expected message-id, header:NAME, json:/POINTER or hash")]
pub struct ParseKeyFromError(String);

impl FromStr for KeyFrom {
    type Err = ParseKeyFromError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseKeyFromError(s.to_owned());
        match s.split_once(':') {
            None if s == "message-id" => Ok(KeyFrom::MessageId),
            None if s == "hash" => Ok(KeyFrom::ContentHash),
            Some(("header", name)) if !name.is_empty() => Ok(KeyFrom::Header(name.to_owned())),
            Some(("json", ptr)) if ptr.is_empty() || ptr.starts_with('/') => {
                Ok(KeyFrom::Json(ptr.to_owned()))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for KeyFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFrom::MessageId => f.write_str("message-id"),
            KeyFrom::Header(name) => write!(f, "header:{name}"),
            KeyFrom::Json(ptr) => write!(f, "json:{ptr}"),
            KeyFrom::ContentHash => f.write_str("hash"),
        }
    }
}

/// Computes the fingerprint that tells a true duplicate from another message under the same key.
pub trait FingerprintExtractor: Send + Sync + 'static {
    /// The fingerprint of `message`.
    ///
    /// # Errors
    /// A reason (for the dead-letter destination) when the message has no usable fingerprint.
    fn fingerprint(&self, message: &Message) -> Result<Fingerprint, String>;
}

impl<F> FingerprintExtractor for F
where
    F: Fn(&Message) -> Result<Fingerprint, String> + Send + Sync + 'static,
{
    fn fingerprint(&self, message: &Message) -> Result<Fingerprint, String> {
        self(message)
    }
}

/// The usual fingerprint choices.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FingerprintFrom {
    /// The whole payload (the default): any change under the same key is a mismatch.
    #[default]
    Payload,
    /// The JSON value at a pointer, for payloads carrying volatile fields (a send timestamp)
    /// that a producer retry may change. Objects are compared with sorted keys.
    Json(String),
}

impl FingerprintExtractor for FingerprintFrom {
    fn fingerprint(&self, message: &Message) -> Result<Fingerprint, String> {
        match self {
            FingerprintFrom::Payload => Ok(Fingerprint::of(message.payload())),
            FingerprintFrom::Json(pointer) => {
                let value = json_at(message.payload(), pointer).map_err(|e| e.to_string())?;
                // serde_json's map is a BTreeMap here, so the text is canonical.
                Ok(Fingerprint::of(value.to_string().as_bytes()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace::new("t").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn extracts_keys_from_every_source() {
        let msg = Message::new("q", &br#"{"order": {"id": 42, "tag": "x"}}"#[..])
            .with_message_id("m-1")
            .with_header("Idempotency-Key", &b"h-1"[..]);
        let id = |k: KeyFrom| k.key(&ns(), &msg).map(|k| k.id().to_owned());
        assert_eq!(id(KeyFrom::MessageId), Ok("m-1".to_owned()));
        assert_eq!(
            id(KeyFrom::Header("idempotency-key".into())),
            Ok("h-1".to_owned())
        );
        assert_eq!(id(KeyFrom::Json("/order/id".into())), Ok("42".to_owned()));
        assert_eq!(id(KeyFrom::Json("/order/tag".into())), Ok("x".to_owned()));
        assert!(id(KeyFrom::ContentHash).is_ok_and(|k| k.starts_with("blake3:")));
        assert_eq!(
            id(KeyFrom::Json("/order".into())),
            Err(KeyExtractError::NotScalar("/order".into()))
        );
        assert_eq!(
            id(KeyFrom::Json("/nope".into())),
            Err(KeyExtractError::MissingJsonField("/nope".into()))
        );
    }

    #[test]
    fn missing_and_invalid_keys_are_errors() {
        let bare = Message::new("q", &b"not json"[..]);
        assert_eq!(
            KeyFrom::MessageId.key(&ns(), &bare),
            Err(KeyExtractError::NoMessageId)
        );
        assert!(matches!(
            KeyFrom::Json("/id".into()).key(&ns(), &bare),
            Err(KeyExtractError::NotJson(_))
        ));
        let empty = Message::new("q", &b""[..]).with_message_id("");
        assert_eq!(
            KeyFrom::MessageId.key(&ns(), &empty),
            Err(KeyExtractError::Invalid(KeyError::EmptyId))
        );
    }

    #[test]
    fn parses_and_prints_key_sources() {
        for s in ["message-id", "header:X-Id", "json:/a/b", "hash"] {
            let parsed: KeyFrom = s.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(parsed.to_string(), s);
        }
        assert!("header:".parse::<KeyFrom>().is_err());
        assert!("json:a".parse::<KeyFrom>().is_err());
        assert!("uuid".parse::<KeyFrom>().is_err());
    }

    #[test]
    fn json_fingerprints_ignore_other_fields_and_key_order() {
        let a = Message::new("q", &br#"{"body": {"x": 1, "y": 2}, "sent_at": 1}"#[..]);
        let b = Message::new("q", &br#"{"sent_at": 2, "body": {"y": 2, "x": 1}}"#[..]);
        let fp = FingerprintFrom::Json("/body".into());
        assert_eq!(fp.fingerprint(&a), fp.fingerprint(&b));
        assert_ne!(
            FingerprintFrom::Payload.fingerprint(&a),
            FingerprintFrom::Payload.fingerprint(&b)
        );
    }
}
