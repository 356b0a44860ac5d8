//! [`Stored`]: how a handler's result becomes the bytes a record keeps, and back when a
//! duplicate replays it.

use bytes::Bytes;

use crate::error::CodecError;

/// A handler result that can be stored with the record and replayed to duplicates.
///
/// Implemented for `()` (nothing to replay), [`Bytes`], `Vec<u8>`, `String`, the integer types
/// (as decimal text), and, with the `json` feature, [`Json<T>`] for any serde type.
pub trait Stored: Sized {
    /// The bytes to store.
    ///
    /// # Errors
    /// A [`CodecError`] when the value cannot be encoded.
    fn encode(&self) -> Result<Bytes, CodecError>;

    /// The value back from stored bytes.
    ///
    /// # Errors
    /// A [`CodecError`] when the bytes are not a valid encoding (a record written by a handler
    /// with another result type, for instance).
    fn decode(bytes: Bytes) -> Result<Self, CodecError>;
}

impl Stored for () {
    fn encode(&self) -> Result<Bytes, CodecError> {
        Ok(Bytes::new())
    }
    fn decode(_: Bytes) -> Result<Self, CodecError> {
        Ok(())
    }
}

impl Stored for Bytes {
    fn encode(&self) -> Result<Bytes, CodecError> {
        Ok(self.clone())
    }
    fn decode(bytes: Bytes) -> Result<Self, CodecError> {
        Ok(bytes)
    }
}

impl Stored for Vec<u8> {
    fn encode(&self) -> Result<Bytes, CodecError> {
        Ok(Bytes::copy_from_slice(self))
    }
    fn decode(bytes: Bytes) -> Result<Self, CodecError> {
        Ok(bytes.to_vec())
    }
}

impl Stored for String {
    fn encode(&self) -> Result<Bytes, CodecError> {
        Ok(Bytes::copy_from_slice(self.as_bytes()))
    }
    fn decode(bytes: Bytes) -> Result<Self, CodecError> {
        String::from_utf8(bytes.to_vec())
            .map_err(|e| CodecError::new("stored result is not UTF-8", Some(Box::new(e))))
    }
}

macro_rules! stored_integer {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            fn encode(&self) -> Result<Bytes, CodecError> {
                Ok(Bytes::from(self.to_string()))
            }
            fn decode(bytes: Bytes) -> Result<Self, CodecError> {
                std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| CodecError::new(
                        concat!("stored result is not a decimal ", stringify!($t)),
                        None,
                    ))
            }
        }
    )*};
}

stored_integer!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

/// A result stored as JSON.
///
/// ```
/// use idem::{Json, Stored};
/// let stored = Json(vec![1, 2, 3]).encode()?;
/// assert_eq!(&stored[..], b"[1,2,3]");
/// assert_eq!(Json::<Vec<i32>>::decode(stored)?.0, vec![1, 2, 3]);
/// # Ok::<(), idem::CodecError>(())
/// ```
#[cfg(feature = "json")]
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Json<T>(pub T);

#[cfg(feature = "json")]
impl<T: serde::Serialize + serde::de::DeserializeOwned> Stored for Json<T> {
    fn encode(&self) -> Result<Bytes, CodecError> {
        serde_json::to_vec(&self.0)
            .map(Bytes::from)
            .map_err(|e| CodecError::new("cannot encode result as JSON", Some(Box::new(e))))
    }
    fn decode(bytes: Bytes) -> Result<Self, CodecError> {
        serde_json::from_slice(&bytes).map(Json).map_err(|e| {
            CodecError::new("stored result is not the expected JSON", Some(Box::new(e)))
        })
    }
}
