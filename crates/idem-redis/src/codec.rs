//! What travels between this crate and Redis: record keys (`<prefix>{<namespace>:<id>}`), the
//! scripts' replies, and records read back with `GET` (one binary string per record). Anything that does not decode is
//! [`Corrupt`](idem::StoreErrorKind::Corrupt), never "absent".

use std::time::Duration;

use bytes::Bytes;
use idem::{
    Acquisition, Claim, ClaimRequest, Fingerprint, Key, Lease, Owner, Record, State, StoreError,
    Timestamp, Token, WriteOutcome,
};
use redis::Value;

use crate::error::{from_server, unexpected};

/// The Redis key of a record. The hash tag `{…}` puts every script's single key in the slot of
/// `namespace:id`, so the scripts run unchanged on Redis Cluster.
pub(crate) fn record_key(prefix: &str, key: &Key) -> String {
    let (ns, id) = (key.namespace().as_str(), key.id());
    let mut out = String::with_capacity(prefix.len() + ns.len() + id.len() + 3);
    out.push_str(prefix);
    out.push('{');
    out.push_str(ns);
    out.push(':');
    out.push_str(id);
    out.push('}');
    out
}

/// The idem key of a Redis key written by [`record_key`], if it is one.
pub(crate) fn parse_record_key(prefix: &str, raw: &[u8]) -> Option<Key> {
    let text = std::str::from_utf8(raw).ok()?;
    let inner = text
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix('}')?;
    Key::parse(inner).ok()
}

/// A `SCAN MATCH` pattern for every key under `prefix`, with glob characters escaped.
pub(crate) fn scan_pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push_str("{*");
    out
}

/// Numbers for the scripts, packed big-endian (they read them with `struct.unpack`), followed
/// by an optional token (8 bytes, compared as a string by the scripts).
pub(crate) fn packed(numbers: &[i64], tail: Option<Token>) -> Vec<u8> {
    let mut out = Vec::with_capacity(numbers.len() * 8 + 8);
    for n in numbers {
        out.extend_from_slice(&n.to_be_bytes());
    }
    if let Some(token) = tail {
        out.extend_from_slice(&token.as_raw().to_be_bytes());
    }
    out
}

/// A token as the scripts compare it: 8 big-endian bytes.
pub(crate) fn token_bytes(token: Token) -> [u8; 8] {
    token.as_raw().to_be_bytes()
}

/// The tail of a new record (see `lua/prelude.lua`): fingerprint, token, owner. The claim
/// script appends it to the record's head as it is.
pub(crate) fn record_tail(fp: Fingerprint, token: Token, owner: &str) -> Vec<u8> {
    let owner = owner_arg(owner);
    let mut out = Vec::with_capacity(26 + owner.len());
    out.extend_from_slice(&fp.to_bytes());
    out.extend_from_slice(&token.as_raw().to_be_bytes());
    // `owner_arg` keeps it far below 64 KiB.
    out.extend_from_slice(&(owner.len() as u16).to_be_bytes());
    out.extend_from_slice(owner.as_bytes());
    out
}

/// Longest owner label kept in a record, in bytes: it is a label for operators, and the record
/// layout gives it a 16-bit length.
pub(crate) const MAX_OWNER_BYTES: usize = 1024;

/// The owner label, cut to [`MAX_OWNER_BYTES`] on a character boundary.
fn owner_arg(owner: &str) -> &str {
    if owner.len() <= MAX_OWNER_BYTES {
        return owner;
    }
    let mut end = MAX_OWNER_BYTES;
    while !owner.is_char_boundary(end) {
        end -= 1;
    }
    &owner[..end]
}

fn server_error(op: &str, value: Value) -> Result<Value, StoreError> {
    match value {
        Value::ServerError(e) => Err(from_server(op, e)),
        other => Ok(other),
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Decodes the claim script's reply (see `lua/claim.lua`).
pub(crate) fn claim_reply(req: &ClaimRequest, value: Value) -> Result<Claim, StoreError> {
    const OP: &str = "claim";
    let items = match server_error(OP, value)? {
        // The two common answers come without an array: a new key, a duplicate.
        Value::Int(until) => {
            return Ok(Claim::Acquired(Lease::new(
                req.token,
                1,
                Timestamp::from_millis(until),
                Acquisition::New,
            )));
        }
        Value::BulkString(result) => {
            return Ok(Claim::Completed {
                result: Bytes::from(result),
            });
        }
        Value::Array(items) => items,
        other => return Err(unexpected(OP, format!("{other:?}"))),
    };
    let bad = || unexpected(OP, format!("{items:?}"));
    let code = match items.first() {
        Some(Value::BulkString(c)) if c.len() == 1 => c[0],
        _ => return Err(bad()),
    };
    let n = |i: usize| items.get(i).and_then(int).ok_or_else(bad);
    let acquired = |acquisition| -> Result<Claim, StoreError> {
        let attempt = u32::try_from(n(1)?).map_err(|_| bad())?;
        let until = Timestamp::from_millis(n(2)?);
        Ok(Claim::Acquired(Lease::new(
            req.token,
            attempt,
            until,
            acquisition,
        )))
    };
    match code {
        b'P' => acquired(Acquisition::Reprocess),
        b'R' => acquired(Acquisition::Retry),
        b'T' => acquired(Acquisition::Takeover),
        b'I' => Ok(Claim::InProgress {
            retry_after: millis(n(1)?).max(Duration::from_millis(1)),
        }),
        b'M' => {
            let stored = items.get(1).and_then(|v| match v {
                Value::BulkString(b) => Fingerprint::from_slice(b),
                _ => None,
            });
            let stored = stored.ok_or_else(|| {
                StoreError::corrupt(format!(
                    "claim of {}: the stored fingerprint is not 16 bytes",
                    req.key
                ))
            })?;
            Ok(Claim::Mismatch { stored })
        }
        b'X' => {
            let attempts = u32::try_from(n(1)?).map_err(|_| bad())?;
            let reason = items.into_iter().nth(2).and_then(bytes).unwrap_or_default();
            Ok(Claim::Exhausted {
                attempts,
                reason: String::from_utf8_lossy(&reason).into_owned(),
            })
        }
        _ => Err(bad()),
    }
}

/// Decodes the reply of a fenced write script: 1 applied, 0 lease lost.
pub(crate) fn write_reply(op: &str, value: Value) -> Result<WriteOutcome, StoreError> {
    match server_error(op, value)? {
        Value::Int(1) => Ok(WriteOutcome::Applied),
        Value::Int(0) => Ok(WriteOutcome::LeaseLost),
        other => Err(unexpected(op, format!("{other:?}"))),
    }
}

/// Decodes a reply that counts something (`DEL`, the purge script).
pub(crate) fn count_reply(op: &str, value: Value) -> Result<i64, StoreError> {
    let value = server_error(op, value)?;
    int(&value).ok_or_else(|| unexpected(op, format!("{value:?}")))
}

/// Decodes `TIME` into milliseconds.
pub(crate) fn time_reply(value: Value) -> Result<Timestamp, StoreError> {
    const OP: &str = "time";
    let value = server_error(OP, value)?;
    match &value {
        Value::Array(parts) if parts.len() == 2 => {
            let secs = int(&parts[0]);
            let micros = int(&parts[1]);
            if let (Some(s), Some(us)) = (secs, micros) {
                return Ok(Timestamp::from_millis(s * 1000 + us / 1000));
            }
            Err(unexpected(OP, format!("{value:?}")))
        }
        _ => Err(unexpected(OP, format!("{value:?}"))),
    }
}

/// Where the fields of a record are (see `lua/prelude.lua`).
mod layout {
    pub(super) const VERSION: usize = 0;
    pub(super) const STATE: usize = 1;
    pub(super) const LEASE_END: usize = 2;
    pub(super) const ATTEMPTS: usize = 10;
    pub(super) const CREATED: usize = 14;
    pub(super) const UPDATED: usize = 22;
    pub(super) const EXPIRES: usize = 30;
    /// Where the tail starts: what the claimer sends.
    pub(super) const FINGERPRINT: usize = 38;
    pub(super) const TOKEN: usize = 54;
    pub(super) const OWNER_LEN: usize = 62;
    /// Where the owner starts: everything before has a fixed size.
    pub(super) const OWNER: usize = 64;
}

/// The one format version this crate reads and the scripts write.
const FORMAT_VERSION: u8 = 1;

/// How many bytes of a record `GETRANGE 0 <n-1>` must read for [`head_state`] and
/// [`head_expires`]: the fields that change, before the tail.
pub(crate) const HEAD_BYTES: usize = layout::FINGERPRINT;

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut raw = [0; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(raw)
}

/// The state in the head of a record (its first [`HEAD_BYTES`] bytes), if it is one.
pub(crate) fn head_state(head: &[u8]) -> Option<State> {
    if head.len() < HEAD_BYTES || head[layout::VERSION] != FORMAT_VERSION {
        return None;
    }
    State::from_code(i64::from(head[layout::STATE]))
}

/// When the record whose head this is stops counting, if it is one.
pub(crate) fn head_expires(head: &[u8]) -> Option<Timestamp> {
    head_state(head)?;
    Some(Timestamp::from_millis(be_i64(head, layout::EXPIRES)))
}

/// Decodes a record read with `GET`: `None` for an absent key.
pub(crate) fn record_reply(key: &Key, value: Value) -> Result<Option<Record>, StoreError> {
    const OP: &str = "get";
    match server_error(OP, value)? {
        Value::Nil => Ok(None),
        Value::BulkString(blob) => decode_record(key, blob).map(Some),
        other => Err(unexpected(OP, format!("{other:?}"))),
    }
}

fn decode_record(key: &Key, blob: Vec<u8>) -> Result<Record, StoreError> {
    use layout::*;
    let corrupt = |what: &str| StoreError::corrupt(format!("record {key} in Redis: {what}"));
    if blob.len() < OWNER {
        return Err(corrupt("shorter than a record"));
    }
    if blob[VERSION] != FORMAT_VERSION {
        return Err(corrupt(&format!(
            "format version {} (this idem reads {FORMAT_VERSION})",
            blob[VERSION]
        )));
    }
    let state = State::from_code(i64::from(blob[STATE])).ok_or_else(|| corrupt("unknown state"))?;
    let fingerprint = Fingerprint::from_slice(&blob[FINGERPRINT..TOKEN])
        .ok_or_else(|| corrupt("bad fingerprint"))?;
    let token = Some(Token::from_raw(be_i64(&blob, TOKEN) as u64)).filter(|t| t.as_raw() != 0);
    let lease_until = Some(be_i64(&blob, LEASE_END))
        .filter(|&l| l != 0)
        .map(Timestamp::from_millis);
    let mut attempts = [0; 4];
    attempts.copy_from_slice(&blob[ATTEMPTS..ATTEMPTS + 4]);
    let owner_len = usize::from(u16::from_be_bytes([blob[OWNER_LEN], blob[OWNER_LEN + 1]]));
    let owner_end = OWNER + owner_len;
    let owner = blob
        .get(OWNER..owner_end)
        .ok_or_else(|| corrupt("owner runs past the end"))?;
    let owner: Option<Owner> = match std::str::from_utf8(owner) {
        Ok("") => None,
        Ok(o) => Some(o.into()),
        Err(_) => return Err(corrupt("owner is not UTF-8")),
    };
    let time = |at| Timestamp::from_millis(be_i64(&blob, at));
    let (created, updated, expires) = (time(CREATED), time(UPDATED), time(EXPIRES));
    // Only completed (result) and failed (reason) records carry bytes after the owner.
    let result = matches!(state, State::Completed | State::Failed)
        .then(|| Bytes::from(blob).slice(owner_end..));
    Ok(Record::new(
        key.clone(),
        state,
        fingerprint,
        token,
        owner,
        lease_until,
        u32::from_be_bytes(attempts),
        result,
        created,
        updated,
        expires,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use idem::Namespace;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn keys_round_trip_with_a_hash_tag() {
        let k = Namespace::new("orders").unwrap().key("a:b}{c").unwrap();
        let raw = record_key("idem:", &k);
        assert_eq!(raw, "idem:{orders:a:b}{c}");
        assert_eq!(parse_record_key("idem:", raw.as_bytes()), Some(k));
        assert_eq!(parse_record_key("other:", raw.as_bytes()), None);
        assert_eq!(parse_record_key("idem:", b"idem:plain"), None);
        assert_eq!(scan_pattern("a*b[1]:"), "a\\*b\\[1\\]:{*");
    }

    /// A record as `lua/prelude.lua` lays it out.
    fn blob(state: u8, token: u64, owner: &str, rest: &[u8]) -> Vec<u8> {
        let mut b = vec![FORMAT_VERSION, state];
        b.extend(0i64.to_be_bytes());
        b.extend(3u32.to_be_bytes());
        for t in [1i64, 2, 3] {
            b.extend(t.to_be_bytes());
        }
        b.extend(record_tail(
            Fingerprint::of(b"x"),
            Token::from_raw(token),
            owner,
        ));
        b.extend(rest);
        b
    }

    #[test]
    fn decodes_records_and_rejects_corrupt_ones() {
        let k = Namespace::new("n").unwrap().key("i").unwrap();
        let get = |b: Vec<u8>| record_reply(&k, Value::BulkString(b));
        let rec = get(blob(2, 255, "host:1", b"done")).unwrap().unwrap();
        assert_eq!(rec.state, State::Completed);
        assert_eq!(rec.fingerprint, Fingerprint::of(b"x"));
        assert_eq!(rec.token, Some(Token::from_raw(255)));
        assert_eq!(rec.owner.as_deref(), Some("host:1"));
        assert_eq!(rec.lease_until, None);
        assert_eq!(rec.attempts, 3);
        assert_eq!(rec.result.as_deref(), Some(&b"done"[..]));
        assert_eq!(
            (rec.created_at, rec.updated_at, rec.expires_at),
            (
                Timestamp::from_millis(1),
                Timestamp::from_millis(2),
                Timestamp::from_millis(3)
            )
        );
        let released = get(blob(3, 0, "", b"")).unwrap().unwrap();
        assert_eq!(
            (released.token, released.owner, released.result),
            (None, None, None)
        );
        assert_eq!(head_state(&blob(1, 7, "o", b"")), Some(State::InProgress));
        assert_eq!(
            head_expires(&blob(1, 7, "o", b"")),
            Some(Timestamp::from_millis(3))
        );
        assert_eq!(record_reply(&k, Value::Nil).unwrap(), None);
        for bad in [
            blob(9, 1, "o", b""),
            blob(1, 1, "o", b"")[..10].to_vec(),
            {
                let mut b = blob(1, 1, "o", b"");
                b[0] = 2;
                b
            },
            {
                let mut b = blob(1, 1, "o", b"");
                b.truncate(b.len() - 1);
                b
            },
        ] {
            let err = get(bad).unwrap_err();
            assert_eq!(err.kind(), idem::StoreErrorKind::Corrupt, "{err}");
        }
        assert_eq!(head_state(b"\x01\x02"), None);
    }

    #[test]
    fn owners_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_OWNER_BYTES);
        let cut = owner_arg(&long);
        assert!(cut.len() <= MAX_OWNER_BYTES && cut.len() >= MAX_OWNER_BYTES - 1);
        assert_eq!(owner_arg("host:1"), "host:1");
    }

    #[test]
    fn decodes_claim_replies() {
        let k = Namespace::new("n").unwrap().key("i").unwrap();
        let req = ClaimRequest::new(k, Fingerprint::of(b"x"));
        let reply = |items: Vec<Value>| claim_reply(&req, Value::Array(items)).unwrap();
        assert!(matches!(
            claim_reply(&req, Value::Int(42)).unwrap(),
            Claim::Acquired(l) if l.attempt == 1 && l.acquisition == Acquisition::New
                && l.until == Timestamp::from_millis(42)
        ));
        assert!(matches!(
            reply(vec![bulk("T"), Value::Int(2), Value::Int(99)]),
            Claim::Acquired(l) if l.attempt == 2 && l.acquisition == Acquisition::Takeover
                && l.until == Timestamp::from_millis(99) && l.token == req.token
        ));
        assert_eq!(
            reply(vec![bulk("I"), Value::Int(0)]),
            Claim::InProgress {
                retry_after: Duration::from_millis(1)
            }
        );
        assert_eq!(
            claim_reply(&req, bulk("")).unwrap(),
            Claim::Completed {
                result: Bytes::new()
            }
        );
        assert_eq!(
            reply(vec![bulk("X"), Value::Int(2), bulk("why")]),
            Claim::Exhausted {
                attempts: 2,
                reason: "why".into()
            }
        );
        assert_eq!(
            reply(vec![
                bulk("M"),
                Value::BulkString(Fingerprint::of(b"y").to_bytes().to_vec())
            ]),
            Claim::Mismatch {
                stored: Fingerprint::of(b"y")
            }
        );
        let err = claim_reply(&req, Value::Array(vec![bulk("M"), bulk("zz")])).unwrap_err();
        assert_eq!(err.kind(), idem::StoreErrorKind::Corrupt);
        let err = claim_reply(&req, Value::Okay).unwrap_err();
        assert_eq!(err.kind(), idem::StoreErrorKind::Corrupt);
    }
}
