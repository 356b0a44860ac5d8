//! SQL text for the store: the table name, values as literals, the server clock, and the
//! record columns.
//!
//! Statements are sent as text so that several of them travel in one round trip (a
//! multi-statement query, each statement answering with its own result). Every value is a
//! literal that cannot be misread: bytes as hex (`X'…'`, exact, no charset or escaping
//! involved), integers as decimal, and the table name is checked to be a plain identifier.

use std::fmt::Write as _;
use std::time::Duration;

use idem::{Key, Record, StoreError, StoreErrorKind, Timestamp, Token, duration_millis};

/// The server's clock in milliseconds since the Unix epoch.
///
/// `UTC_TIMESTAMP(3)` does not depend on the session's time zone, unlike `NOW(3)` whose
/// conversion back to epoch time is ambiguous around daylight-saving changes. Like `NOW()`, it
/// is fixed for the duration of one statement.
pub(crate) const NOW_MS: &str =
    "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(3)) DIV 1000)";

/// The user variable that carries one `now` across the statements of one round trip.
pub(crate) const NOW_VAR: &str = "@idem_now";

/// The record columns, in the order of [`values`] and of the decoder.
pub(crate) const COLUMNS: &str = "namespace, id, state, fingerprint, token, owner, lease_until, \
                                  attempts, result, created_at, updated_at, expires_at";

/// Durations are clamped to this (about 1,000 years) before they reach SQL, so that
/// `now + lease + retention` can never overflow a `BIGINT`.
const MAX_DURATION: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);

/// Longest owner label kept (the column is `VARBINARY(255)`).
const MAX_OWNER: usize = 255;

/// A duration as the milliseconds written to SQL: rounded up like [`duration_millis`], clamped
/// to [`MAX_DURATION`].
pub(crate) fn millis(d: Duration) -> i64 {
    duration_millis(d.min(MAX_DURATION))
}

/// A duration clamped like [`millis`], for the transition functions, so that the values they
/// compute equal the ones SQL computes.
pub(crate) fn clamp(d: Duration) -> Duration {
    d.min(MAX_DURATION)
}

/// A validated, quoted table name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Table {
    name: String,
    quoted: String,
}

impl Table {
    /// Checks that `name` is a plain identifier: 1 to 64 of `A-Z a-z 0-9 _`.
    pub(crate) fn new(name: &str) -> Result<Self, StoreError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(StoreError::new(
                StoreErrorKind::Config,
                format!("table name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 _"),
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            quoted: format!("`{name}`"),
        })
    }

    /// The bare name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted for SQL.
    pub(crate) fn q(&self) -> &str {
        &self.quoted
    }
}

/// Appends `bytes` as a hex literal.
pub(crate) fn hex(out: &mut String, bytes: &[u8]) {
    /// The two digits of every byte.
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut pairs = [[0u8; 2]; 256];
        let mut b = 0;
        while b < 256 {
            pairs[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
            b += 1;
        }
        pairs
    };
    out.reserve(bytes.len() * 2 + 3);
    out.push_str("X'");
    // Digits go through a buffer on the stack, a chunk at a time: pushing them one `char` at a
    // time cost about 20 instructions per byte of payload (a batch's records are mostly this).
    let mut buf = [0u8; 256];
    for chunk in bytes.chunks(buf.len() / 2) {
        for (pair, &b) in buf.chunks_exact_mut(2).zip(chunk) {
            pair.copy_from_slice(&PAIRS[usize::from(b)]);
        }
        // Always ASCII.
        if let Ok(digits) = std::str::from_utf8(&buf[..chunk.len() * 2]) {
            out.push_str(digits);
        }
    }
    out.push('\'');
}

fn opt_i64(out: &mut String, v: Option<i64>) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str("NULL"),
    }
}

fn opt_bytes(out: &mut String, v: Option<&[u8]>) {
    match v {
        Some(b) => hex(out, b),
        None => out.push_str("NULL"),
    }
}

/// The owner label as stored: at most 255 bytes, cut at a character boundary.
fn owner_bytes(owner: &str) -> &[u8] {
    let mut end = owner.len().min(MAX_OWNER);
    while !owner.is_char_boundary(end) {
        end -= 1;
    }
    &owner.as_bytes()[..end]
}

/// Appends `namespace = X'…' AND id = X'…'`.
pub(crate) fn key_eq(out: &mut String, key: &Key) {
    out.push_str("namespace = ");
    hex(out, key.namespace().as_str().as_bytes());
    out.push_str(" AND id = ");
    hex(out, key.id().as_bytes());
}

/// Appends a predicate matching any of `keys` (an `OR` of primary-key equalities, which the
/// range optimizer turns into one index lookup per key).
pub(crate) fn keys_in<'a>(out: &mut String, keys: impl IntoIterator<Item = &'a Key>) {
    out.push('(');
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push_str(" OR ");
        }
        out.push('(');
        key_eq(out, key);
        out.push(')');
    }
    out.push(')');
}

/// Appends a record as a `VALUES` tuple in [`COLUMNS`] order.
pub(crate) fn values(out: &mut String, rec: &Record) {
    out.push('(');
    hex(out, rec.key.namespace().as_str().as_bytes());
    out.push_str(", ");
    hex(out, rec.key.id().as_bytes());
    let _ = write!(out, ", {}, ", rec.state.code());
    hex(out, &rec.fingerprint.to_bytes());
    out.push_str(", ");
    opt_i64(out, rec.token.map(Token::as_i64));
    out.push_str(", ");
    opt_bytes(out, rec.owner.as_deref().map(owner_bytes));
    out.push_str(", ");
    opt_i64(out, rec.lease_until.map(Timestamp::as_millis));
    let _ = write!(out, ", {}, ", rec.attempts);
    opt_bytes(out, rec.result.as_deref());
    let _ = write!(
        out,
        ", {}, {}, {})",
        rec.created_at.as_millis(),
        rec.updated_at.as_millis(),
        rec.expires_at.as_millis()
    );
}

/// `items` in key order (stable: the same key keeps its order). Multi-row writes lock their
/// rows in the order of their values; writing every batch in primary-key order means two
/// batches that share keys lock them in the same order and cannot deadlock on them.
pub(crate) fn key_order<T>(items: &[T], key: impl Fn(&T) -> &Key) -> Vec<&T> {
    let mut sorted: Vec<&T> = items.iter().collect();
    sorted.sort_by(|a, b| key(a).cmp(key(b)));
    sorted
}

/// Statements are cut at about this size: a server accepts at most `max_allowed_packet` bytes
/// (16 MiB by default on MariaDB) per query, and bytes travel as hex.
pub(crate) const SCRIPT_BUDGET: usize = 4 << 20;

/// `INSERT … ON DUPLICATE KEY UPDATE` statements writing `recs` whole, each at most about
/// [`SCRIPT_BUDGET`] bytes (one record may exceed it alone).
///
/// `VALUES(col)` is deprecated in MySQL 8.0.20 in favour of a row alias that MariaDB does not
/// accept; it works on both.
pub(crate) fn upserts<'r>(table: &Table, recs: impl Iterator<Item = &'r Record>) -> Vec<String> {
    const TAIL: &str = " ON DUPLICATE KEY UPDATE state = VALUES(state), \
                        fingerprint = VALUES(fingerprint), token = VALUES(token), \
                        owner = VALUES(owner), lease_until = VALUES(lease_until), \
                        attempts = VALUES(attempts), result = VALUES(result), \
                        created_at = VALUES(created_at), updated_at = VALUES(updated_at), \
                        expires_at = VALUES(expires_at)";
    let recs: Vec<&Record> = recs.collect();
    let mut out = Vec::new();
    let mut sql = String::new();
    for rec in key_order(&recs, |r| &r.key) {
        if sql.len() >= SCRIPT_BUDGET {
            sql.push_str(TAIL);
            out.push(std::mem::take(&mut sql));
        }
        if sql.is_empty() {
            let _ = write!(sql, "INSERT INTO {} ({COLUMNS}) VALUES ", table.q());
        } else {
            sql.push_str(", ");
        }
        values(&mut sql, rec);
    }
    if !sql.is_empty() {
        sql.push_str(TAIL);
        out.push(sql);
    }
    out
}

/// Appends a fresh in-progress record for a claim as a `VALUES` tuple whose times are computed
/// from [`NOW_VAR`] on the server (the same arithmetic as `idem::transition::new_record`).
pub(crate) fn new_claim_values(out: &mut String, req: &idem::ClaimRequest) {
    let lease = millis(req.lease);
    let retention = millis(req.retention);
    out.push('(');
    hex(out, req.key.namespace().as_str().as_bytes());
    out.push_str(", ");
    hex(out, req.key.id().as_bytes());
    out.push_str(", 1, ");
    hex(out, &req.fingerprint.to_bytes());
    let _ = write!(out, ", {}, ", req.token.as_i64());
    hex(out, owner_bytes(&req.owner));
    let _ = write!(
        out,
        ", {NOW_VAR} + {lease}, 1, NULL, {NOW_VAR}, {NOW_VAR}, {NOW_VAR} + {lease} + {retention})"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_literals_are_exact() {
        let mut s = String::new();
        hex(&mut s, b"\x00a'\\\xff");
        assert_eq!(s, "X'0061275cff'");
        s.clear();
        hex(&mut s, b"");
        assert_eq!(s, "X''");
        // Longer than one chunk of the buffer.
        let long: Vec<u8> = (0..=255).collect();
        s.clear();
        hex(&mut s, &long);
        let expected: String = long.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, format!("X'{expected}'"));
    }

    #[test]
    fn table_names_are_plain_identifiers() {
        assert_eq!(Table::new("idem_records").unwrap().q(), "`idem_records`");
        for bad in ["", "a`b", "a b", "a;DROP", &"x".repeat(65)] {
            let err = Table::new(bad).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Config, "{bad:?}");
        }
    }

    #[test]
    fn owners_are_cut_at_a_character_boundary() {
        let long = "é".repeat(200);
        let cut = owner_bytes(&long);
        assert_eq!(cut.len(), 254);
        assert!(std::str::from_utf8(cut).is_ok());
    }

    #[test]
    fn durations_are_clamped() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), duration_millis(MAX_DURATION));
        assert!(millis(Duration::MAX) * 2 + 4_000_000_000_000 < i64::MAX);
    }
}
