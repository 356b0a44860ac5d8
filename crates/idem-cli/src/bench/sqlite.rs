//! The SQLite baseline: plain SQL through rusqlite on a second database with idem's schema and
//! the same settings.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use idem::Fingerprint;
use idem_sqlite::Synchronous;

use super::{PAYLOAD, Profile};

/// Writes the same rows as the profile: claim = `INSERT ... ON CONFLICT DO NOTHING`,
/// complete = `UPDATE`, one statement per commit (sequential) or `batch` rows per transaction.
pub(super) fn baseline(
    path: &Path,
    ids: &[String],
    profile: Profile,
    batch: usize,
    sync: Synchronous,
) -> anyhow::Result<Duration> {
    let conn = rusqlite::Connection::open(path)?;
    let sync = match sync {
        Synchronous::Full => "FULL",
        _ => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync};"
    ))?;
    idem_sqlite::create_schema(&conn)?;
    let fp = Fingerprint::of(PAYLOAD).to_bytes();
    let claim = "INSERT INTO idem_records (namespace, id, state, fingerprint, token, owner, \
                 lease_until, attempts, result, created_at, updated_at, expires_at) \
                 VALUES ('bench', ?1, 1, ?2, ?3, 'baseline', ?4, 1, NULL, ?4, ?4, ?4) \
                 ON CONFLICT (namespace, id) DO NOTHING";
    let complete = "UPDATE idem_records SET state = 2, lease_until = NULL, result = x'', \
                    updated_at = ?3, expires_at = ?3 \
                    WHERE namespace = 'bench' AND id = ?1 AND token = ?2";
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    let chunk = match profile {
        Profile::Sequential => 1,
        Profile::Concurrent => batch,
    };
    let start = Instant::now();
    for (n, group) in ids.chunks(chunk).enumerate() {
        let token = n as i64 + 1;
        let tx = (chunk > 1)
            .then(|| conn.execute_batch("BEGIN IMMEDIATE"))
            .transpose()?;
        {
            let mut stmt = conn.prepare_cached(claim)?;
            for id in group {
                let t = now();
                if stmt.execute(rusqlite::params![id, &fp[..], token, t])? != 1 {
                    bail!("baseline claim of {id} did not insert");
                }
            }
        }
        if tx.is_some() {
            conn.execute_batch("COMMIT; BEGIN IMMEDIATE")?;
        }
        {
            let mut stmt = conn.prepare_cached(complete)?;
            for id in group {
                if stmt.execute(rusqlite::params![id, token, now()])? != 1 {
                    bail!("baseline complete of {id} did not update");
                }
            }
        }
        if tx.is_some() {
            conn.execute_batch("COMMIT")?;
        }
        super::advance(group.len());
    }
    Ok(start.elapsed())
}
