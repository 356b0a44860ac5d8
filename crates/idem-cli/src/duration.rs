//! Durations as the `idem` commands write them: units run together from the largest, with no
//! spaces and no decimals: `250ms`, `30s`, `1m30s`, `3h20m`, `7d`. A whole number of one unit
//! is exactly what the duration options accept (`--lease 30s`, `--heartbeat 10s`).
//!
//! [`exact`] writes every unit down to the millisecond (settings, timeouts); [`approx`] keeps
//! the two largest units, and drops milliseconds from a second on (ages, elapsed times).

use std::time::Duration;

const UNITS: [(&str, u128); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// `d` to the millisecond: `250ms`, `30s`, `1m30s`, `1s500ms`, `7d`; `0s` for less than a
/// millisecond. For settings and limits in messages.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn exact(d: Duration) -> String {
    write(d.as_millis(), UNITS.len())
}

/// `d` in its two largest units, rounded down, without milliseconds from a second on:
/// `850ms`, `12s`, `4m5s`, `3h20m`, `6d23h`.
pub(crate) fn approx(d: Duration) -> String {
    let ms = d.as_millis();
    let ms = if ms >= 1_000 { ms - ms % 1_000 } else { ms };
    write(ms, 2)
}

/// `ms` written with at most `parts` units, from the largest one that is not zero.
fn write(mut ms: u128, parts: usize) -> String {
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut written = 0;
    for (unit, size) in UNITS {
        let n = ms / size;
        if n > 0 {
            out.push_str(&n.to_string());
            out.push_str(unit);
            ms -= n * size;
        }
        if !out.is_empty() {
            // Units are counted from the first one written, zero or not: `3h0m` is written
            // `3h`, never `3h5s`.
            written += 1;
            if written == parts {
                break;
            }
        }
    }
    out
}

/// Milliseconds of `d`, saturating, for JSON fields named `..._ms`.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_durations() {
        let ms = Duration::from_millis;
        assert_eq!(exact(ms(250)), "250ms");
        assert_eq!(exact(ms(30_000)), "30s");
        assert_eq!(exact(ms(90_000)), "1m30s");
        assert_eq!(exact(ms(1_500)), "1s500ms");
        assert_eq!(exact(ms(3_600_000)), "1h");
        assert_eq!(exact(ms(7 * 86_400_000)), "7d");
        assert_eq!(exact(ms(86_400_000 + 1)), "1d1ms");
        assert_eq!(exact(Duration::ZERO), "0s");
        assert_eq!(exact(Duration::from_micros(999)), "0s");
    }

    #[test]
    fn approximate_durations() {
        let ms = Duration::from_millis;
        assert_eq!(approx(ms(850)), "850ms");
        assert_eq!(approx(ms(12_345)), "12s");
        assert_eq!(approx(ms(245_000)), "4m5s");
        assert_eq!(approx(ms(90_999)), "1m30s");
        assert_eq!(approx(ms((3 * 3600 + 20 * 60 + 15) * 1000)), "3h20m");
        assert_eq!(approx(ms((3 * 3600 + 15) * 1000)), "3h");
        assert_eq!(approx(ms(7 * 86_400_000)), "7d");
        assert_eq!(approx(ms((6 * 86_400 + 23 * 3600 + 59) * 1000)), "6d23h");
        assert!(approx(Duration::MAX).starts_with(&format!("{}d", u64::MAX / 86_400)));
    }
}
