//! What a store keeps per key ([`Record`]), its [`State`], fencing [`Token`]s and the
//! store-clock [`Timestamp`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::key::{Fingerprint, Key};

/// A point in time on the store's clock: milliseconds since the Unix epoch.
///
/// Leases and retention are measured on one clock, the store's own (Redis `TIME`, SQL `now()`,
/// the host clock for embedded stores), so consumers with skewed clocks agree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp from milliseconds since the Unix epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// `self + d`, saturating.
    #[must_use]
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(duration_millis(d)))
    }

    /// How long from `earlier` to `self`; zero when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

/// A duration in whole milliseconds, saturating at `i64::MAX`, rounding sub-millisecond
/// durations up so that a non-zero lease never becomes an already-expired one.
pub fn duration_millis(d: Duration) -> i64 {
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_euclid(1000);
        let ms = self.0.rem_euclid(1000);
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60
        )
    }
}

// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A source of store time. Embedded stores read it; networked stores use the server's clock.
///
/// Tests use [`ManualClock`] to move time without sleeping.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The host's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(duration_millis_floor)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

fn duration_millis_floor(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A clock that moves only when told to: for tests of leases and retention.
///
/// Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use idem::{Clock, ManualClock};
/// let clock = ManualClock::new();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(30));
/// assert_eq!(clock.now().since(t0), Duration::from_secs(30));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock starting at 2025-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self(Arc::new(AtomicI64::new(1_735_689_600_000)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(duration_millis(d), Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// A fencing token: unique per successful claim.
///
/// Every later write for that claim (complete, release, extend, fail) presents it; a write with
/// a stale token changes nothing and returns [`WriteOutcome::LeaseLost`](crate::WriteOutcome).
/// Tokens are random 64-bit values drawn by the claimer, so that stores without a server-side
/// random source (Redis scripts) issue them the same way; zero is never used.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(u64);

impl Token {
    /// A new random token.
    pub fn random() -> Self {
        loop {
            let v = fastrand::u64(..);
            if v != 0 {
                return Self(v);
            }
        }
    }

    /// A token read back from a store.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw value, for stores.
    pub const fn as_raw(self) -> u64 {
        self.0
    }

    /// The raw value as `i64` (same bits), for SQL `BIGINT` columns.
    pub const fn as_i64(self) -> i64 {
        self.0 as i64
    }

    /// A token from an SQL `BIGINT` (same bits).
    pub const fn from_i64(raw: i64) -> Self {
        Self(raw as u64)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({self})")
    }
}

/// The state of a record (docs/design.md, section 3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum State {
    /// Claimed; a handler is (or was, if the lease expired) running.
    InProgress,
    /// The handler succeeded; the result is stored and replayed to duplicates.
    Completed,
    /// The handler failed and released the claim; the next delivery retries.
    Released,
    /// Attempts are exhausted; claims return [`Claim::Exhausted`](crate::Claim) until retention
    /// ends.
    Failed,
}

impl State {
    /// The stable name used in stores and on the CLI.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::InProgress => "in_progress",
            State::Completed => "completed",
            State::Released => "released",
            State::Failed => "failed",
        }
    }

    /// The stable small-integer code used by SQL stores.
    pub const fn code(self) -> i64 {
        match self {
            State::InProgress => 1,
            State::Completed => 2,
            State::Released => 3,
            State::Failed => 4,
        }
    }

    /// The state for a code written by [`State::code`]; `None` for an unknown code (a corrupt
    /// record).
    pub const fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => State::InProgress,
            2 => State::Completed,
            3 => State::Released,
            4 => State::Failed,
            _ => return None,
        })
    }

    /// The state for a name written by [`State::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "in_progress" => State::InProgress,
            "completed" => State::Completed,
            "released" => State::Released,
            "failed" => State::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who holds a claim: a label for operators (`idem inspect`), e.g. `host:pid`.
pub type Owner = Arc<str>;

/// Everything a store keeps for one key.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Record {
    /// The key.
    pub key: Key,
    /// The state.
    pub state: State,
    /// Fingerprint of the payload that first claimed the key.
    pub fingerprint: Fingerprint,
    /// The token of the current claim (in progress), or of the claim that completed or failed
    /// the record; `None` once released.
    pub token: Option<Token>,
    /// Who holds or last held the claim.
    pub owner: Option<Owner>,
    /// While in progress: when the lease ends (store clock).
    pub lease_until: Option<Timestamp>,
    /// How many claims acquired this key (first run, retries and takeovers).
    pub attempts: u32,
    /// Completed: the stored result. Failed: the failure reason.
    pub result: Option<Bytes>,
    /// When the record was first written.
    pub created_at: Timestamp,
    /// When the record last changed.
    pub updated_at: Timestamp,
    /// When the record stops counting (retention, or lease + retention while in progress);
    /// afterwards it is as good as absent and may be purged.
    pub expires_at: Timestamp,
}

impl Record {
    /// Assembles a record, for stores decoding their rows.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: Key,
        state: State,
        fingerprint: Fingerprint,
        token: Option<Token>,
        owner: Option<Owner>,
        lease_until: Option<Timestamp>,
        attempts: u32,
        result: Option<Bytes>,
        created_at: Timestamp,
        updated_at: Timestamp,
        expires_at: Timestamp,
    ) -> Self {
        Self {
            key,
            state,
            fingerprint,
            token,
            owner,
            lease_until,
            attempts,
            result,
            created_at,
            updated_at,
            expires_at,
        }
    }

    /// Whether retention has ended at `now`: the record no longer counts.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }

    /// Whether the record is in progress with a lease that has ended at `now` (a stuck claim
    /// that the next delivery will take over).
    pub fn is_lease_expired(&self, now: Timestamp) -> bool {
        self.state == State::InProgress && self.lease_until.is_none_or(|l| now >= l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_formats_as_rfc3339() {
        assert_eq!(
            Timestamp::from_millis(0).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_millis(1_735_689_600_123).to_string(),
            "2025-01-01T00:00:00.123Z"
        );
        assert_eq!(
            Timestamp::from_millis(951_782_400_000).to_string(),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn sub_millisecond_durations_round_up() {
        assert_eq!(duration_millis(Duration::from_micros(1)), 1);
        assert_eq!(duration_millis(Duration::from_millis(5)), 5);
        assert_eq!(duration_millis(Duration::MAX), i64::MAX);
    }

    #[test]
    fn state_codes_round_trip() {
        for s in [
            State::InProgress,
            State::Completed,
            State::Released,
            State::Failed,
        ] {
            assert_eq!(State::from_code(s.code()), Some(s));
            assert_eq!(State::from_name(s.as_str()), Some(s));
        }
        assert_eq!(State::from_code(9), None);
    }
}
