//! What the layer stores with a completed key: the response to replay (status, allowed headers,
//! body), or a tombstone when the response could not be kept.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use idem::{CodecError, Stored};

/// Why a completed key holds no response to replay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum TombstoneReason {
    /// The response body was over the capture limit.
    TooLarge,
    /// The response was streamed through without being recorded.
    Streamed,
}

impl TombstoneReason {
    /// The short name sent in the `Idempotency-Tombstone` header and the problem's `code`.
    pub fn as_str(self) -> &'static str {
        match self {
            TombstoneReason::TooLarge => "too-large",
            TombstoneReason::Streamed => "streamed",
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            TombstoneReason::TooLarge => 1,
            TombstoneReason::Streamed => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(TombstoneReason::TooLarge),
            2 => Some(TombstoneReason::Streamed),
            _ => None,
        }
    }
}

/// A recorded result, as the executor stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// A response to replay.
    Response {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
    /// The handler ran, but its response was not kept.
    Tombstone {
        reason: TombstoneReason,
        status: StatusCode,
    },
}

/// Format: `IH` magic, version 1, kind (0 response, 1 tombstone), status (u16 BE); a response
/// then has its header count (u16), each header as name length (u16), name, value length (u16),
/// value, and the body to the end; a tombstone has its reason byte.
const MAGIC: &[u8; 3] = b"IH\x01";

impl Recorded {
    /// The encoded size of a response's head (everything but the body).
    pub(crate) fn head_len(headers: &[(HeaderName, HeaderValue)]) -> usize {
        MAGIC.len()
            + 1
            + 2
            + 2
            + headers
                .iter()
                .map(|(n, v)| 4 + n.as_str().len() + v.len())
                .sum::<usize>()
    }

    /// The bytes of body this record holds (0 for a tombstone).
    pub(crate) fn body_len(&self) -> usize {
        match self {
            Recorded::Response { body, .. } => body.len(),
            Recorded::Tombstone { .. } => 0,
        }
    }
}

impl Stored for Recorded {
    fn encode(&self) -> Result<Bytes, CodecError> {
        match self {
            Recorded::Response {
                status,
                headers,
                body,
            } => {
                let mut out = BytesMut::with_capacity(Self::head_len(headers) + body.len());
                out.put_slice(MAGIC);
                out.put_u8(0);
                out.put_u16(status.as_u16());
                let count = u16::try_from(headers.len())
                    .map_err(|_| CodecError::new("too many headers to store", None))?;
                out.put_u16(count);
                for (name, value) in headers {
                    for part in [name.as_str().as_bytes(), value.as_bytes()] {
                        let len = u16::try_from(part.len())
                            .map_err(|_| CodecError::new("a header is too long to store", None))?;
                        out.put_u16(len);
                        out.put_slice(part);
                    }
                }
                out.put_slice(body);
                Ok(out.freeze())
            }
            Recorded::Tombstone { reason, status } => {
                let mut out = BytesMut::with_capacity(MAGIC.len() + 4);
                out.put_slice(MAGIC);
                out.put_u8(1);
                out.put_u16(status.as_u16());
                out.put_u8(reason.to_byte());
                Ok(out.freeze())
            }
        }
    }

    fn decode(bytes: Bytes) -> Result<Self, CodecError> {
        let bad = |what: &'static str| CodecError::new(what, None);
        let mut r = Reader { bytes, at: 0 };
        if r.take(MAGIC.len())? != MAGIC[..] {
            return Err(bad(
                "the stored result is not an HTTP response recorded by idem-http (another \
                 consumer's record under the same namespace?)",
            ));
        }
        let kind = r.u8()?;
        let status =
            StatusCode::from_u16(r.u16()?).map_err(|_| bad("stored status code is invalid"))?;
        match kind {
            0 => {
                let count = r.u16()?;
                let mut headers = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    let n = usize::from(r.u16()?);
                    let name = HeaderName::from_bytes(&r.take(n)?)
                        .map_err(|_| bad("stored header name is invalid"))?;
                    let n = usize::from(r.u16()?);
                    let value = HeaderValue::from_maybe_shared(r.take(n)?)
                        .map_err(|_| bad("stored header value is invalid"))?;
                    headers.push((name, value));
                }
                let body = r.bytes.slice(r.at..);
                Ok(Recorded::Response {
                    status,
                    headers,
                    body,
                })
            }
            1 => Ok(Recorded::Tombstone {
                reason: TombstoneReason::from_byte(r.u8()?)
                    .ok_or_else(|| bad("stored tombstone reason is unknown"))?,
                status,
            }),
            _ => Err(bad("stored record kind is unknown")),
        }
    }
}

struct Reader {
    bytes: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, CodecError> {
        if self.bytes.len() < self.at + n {
            return Err(CodecError::new("stored response is truncated", None));
        }
        let out = self.bytes.slice(self.at..self.at + n);
        self.at += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let r = Recorded::Response {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    http::header::LOCATION,
                    HeaderValue::from_static("/orders/7"),
                ),
            ],
            body: Bytes::from_static(b"{\"id\":7}"),
        };
        let enc = r.encode().unwrap();
        let Recorded::Response { headers, .. } = &r else {
            unreachable!()
        };
        assert_eq!(enc.len(), Recorded::head_len(headers) + 8);
        assert_eq!(Recorded::decode(enc).unwrap(), r);
        let t = Recorded::Tombstone {
            reason: TombstoneReason::Streamed,
            status: StatusCode::OK,
        };
        assert_eq!(Recorded::decode(t.encode().unwrap()).unwrap(), t);
        assert!(Recorded::decode(Bytes::from_static(b"hello")).is_err());
        assert!(Recorded::decode(Bytes::from_static(b"IH\x01\x00\x00")).is_err());
    }
}
