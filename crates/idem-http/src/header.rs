//! The `Idempotency-Key` request header: its parsing, as the IETF draft
//! (`draft-ietf-httpapi-idempotency-key-header`) defines it, plus the bare form many clients send.

use http::HeaderMap;
use http::header::HeaderName;

/// The `Idempotency-Key` header name.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The header that marks a replayed response (`Idempotent-Replayed: true`, as Stripe sends it).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Why an `Idempotency-Key` header was refused. Every variant becomes a 400 answer whose detail
/// is this error's text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyHeaderError {
    /// The header is absent on a route that requires it.
    #[error("this request requires an Idempotency-Key header")]
    Missing,
    /// The header appears more than once.
    #[error("the Idempotency-Key header appears more than once")]
    Repeated,
    /// The value is empty (`""` or nothing).
    #[error("the Idempotency-Key header is empty")]
    Empty,
    /// The key is longer than the configured limit.
    #[error("the idempotency key is {len} characters, the limit is {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is neither a structured-field string nor a bare key of visible ASCII.
    #[error(
        "the Idempotency-Key header is not a structured-field string (\"...\") nor a bare key \
         of visible ASCII characters: {0}"
    )]
    Malformed(&'static str),
}

/// The idempotency key of a request, if it carries one.
///
/// Accepted forms:
/// - the draft's structured-field string, `Idempotency-Key: "8e03978e-40d5"`, with `\"` and
///   `\\` escapes and optional parameters after it (`"abc";p=1`, parameters ignored);
/// - the bare form, `Idempotency-Key: 8e03978e-40d5`: visible ASCII without spaces, not
///   starting with a quote.
///
/// The key must hold 1 to `max_len` characters (Stripe's limit, 255, is the layer's default).
///
/// # Errors
/// A [`KeyHeaderError`] saying what is wrong; `Ok(None)` when the header is absent.
pub fn parse_key(headers: &HeaderMap, max_len: usize) -> Result<Option<String>, KeyHeaderError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyHeaderError::Repeated);
    }
    let key = parse_value(value.as_bytes())?;
    if key.is_empty() {
        return Err(KeyHeaderError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyHeaderError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    Ok(Some(key))
}

/// One header value, in either form.
fn parse_value(raw: &[u8]) -> Result<String, KeyHeaderError> {
    let raw = trim(raw);
    match raw.first() {
        None => Err(KeyHeaderError::Empty),
        Some(b'"') => parse_sf_string(raw),
        Some(_) => {
            if let Some(bad) = raw.iter().find(|b| !(0x21..=0x7e).contains(*b)) {
                return Err(KeyHeaderError::Malformed(
                    if *bad == b' ' || *bad == b'\t' {
                        "a bare key holds a space"
                    } else {
                        "a bare key holds a character outside visible ASCII"
                    },
                ));
            }
            // Visible ASCII only: always valid UTF-8.
            Ok(String::from_utf8_lossy(raw).into_owned())
        }
    }
}

/// An RFC 8941 sf-string (`"` chars `"`), with the only escapes it allows, then nothing or
/// parameters.
fn parse_sf_string(raw: &[u8]) -> Result<String, KeyHeaderError> {
    let mut out = String::new();
    let mut i = 1;
    loop {
        let Some(&b) = raw.get(i) else {
            return Err(KeyHeaderError::Malformed("the string has no closing quote"));
        };
        i += 1;
        match b {
            b'\\' => match raw.get(i) {
                Some(&e @ (b'"' | b'\\')) => {
                    out.push(e as char);
                    i += 1;
                }
                _ => {
                    return Err(KeyHeaderError::Malformed(
                        "a backslash escapes something other than \" or \\",
                    ));
                }
            },
            b'"' => break,
            0x20..=0x7e => out.push(b as char),
            _ => {
                return Err(KeyHeaderError::Malformed(
                    "the string holds a character outside printable ASCII",
                ));
            }
        }
    }
    let rest = trim(&raw[i..]);
    if !rest.is_empty() && rest[0] != b';' {
        return Err(KeyHeaderError::Malformed(
            "something other than parameters follows the string",
        ));
    }
    Ok(out)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(v: &[u8]) -> Result<Option<String>, KeyHeaderError> {
        let mut h = HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(v).unwrap());
        parse_key(&h, 16)
    }

    #[test]
    fn structured_and_bare_forms() {
        assert_eq!(parse(b"\"abc-1\"").unwrap().unwrap(), "abc-1");
        assert_eq!(parse(b"  \"a b\"  ").unwrap().unwrap(), "a b");
        assert_eq!(parse(b"\"a\\\"b\\\\\"").unwrap().unwrap(), "a\"b\\");
        assert_eq!(parse(b"\"k\";v=1").unwrap().unwrap(), "k");
        assert_eq!(parse(b"abc-1").unwrap().unwrap(), "abc-1");
        assert_eq!(parse(b"123456789").unwrap().unwrap(), "123456789");
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"\"\""), Err(KeyHeaderError::Empty));
        assert_eq!(parse(b"   "), Err(KeyHeaderError::Empty));
        assert!(matches!(parse(b"\"abc"), Err(KeyHeaderError::Malformed(_))));
        assert!(matches!(
            parse(b"\"a\\n\""),
            Err(KeyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"\"a\" x"),
            Err(KeyHeaderError::Malformed(_))
        ));
        assert!(matches!(parse(b"a b"), Err(KeyHeaderError::Malformed(_))));
        assert!(matches!(
            parse("\"é\"".as_bytes()),
            Err(KeyHeaderError::Malformed(_))
        ));
        assert_eq!(
            parse(b"0123456789abcdefg"),
            Err(KeyHeaderError::TooLong { len: 17, max: 16 })
        );
        let mut h = HeaderMap::new();
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
        assert_eq!(parse_key(&h, 16), Err(KeyHeaderError::Repeated));
        assert_eq!(parse_key(&HeaderMap::new(), 16), Ok(None));
    }
}
