//! What the store reads from the server's configuration at connect time, and why: an eviction
//! policy other than `noeviction` can silently drop records (a duplicate then runs again), and
//! without the append-only file every record vanishes when the server restarts.

use redis::Value;
use redis::aio::ConnectionLike;

/// The server settings that decide how durable deduplication is, as `CONFIG GET` reported them
/// when the store connected. A field is `None` when the server refused to say (managed services
/// often disable `CONFIG`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerSettings {
    /// `maxmemory-policy`: anything but `noeviction` lets Redis delete keys when memory is full.
    pub maxmemory_policy: Option<String>,
    /// `maxmemory` in bytes; 0 means no limit (eviction then starts only once a limit is set).
    pub maxmemory: Option<u64>,
    /// `appendonly`: whether writes are logged to the append-only file and survive a restart.
    pub appendonly: Option<bool>,
    /// `appendfsync`: `always`, `everysec` or `no`: how often the append-only file is synced.
    pub appendfsync: Option<String>,
    /// The server's version (`redis_version` of `INFO server`).
    pub version: Option<String>,
    /// `redis_mode` of `INFO server`: `standalone`, `cluster` or `sentinel`.
    pub mode: Option<String>,
}

impl ServerSettings {
    /// Whether the eviction policy can delete idem's records: `Some(true)` for every policy but
    /// `noeviction` (idem's keys all carry a TTL, so the `volatile-*` policies evict them too),
    /// `None` when the policy could not be read.
    pub fn may_evict(&self) -> Option<bool> {
        self.maxmemory_policy.as_deref().map(|p| p != "noeviction")
    }

    /// The major version, if known.
    pub fn major_version(&self) -> Option<u32> {
        self.version.as_deref()?.split('.').next()?.parse().ok()
    }

    /// Reads the settings. Errors of `CONFIG GET` or `INFO` themselves (disabled, renamed, not
    /// permitted) leave the fields `None`.
    ///
    /// # Errors
    /// The connection's error when the server cannot be reached.
    pub(crate) async fn read(
        conn: &mut (impl ConnectionLike + Send),
    ) -> Result<Self, redis::RedisError> {
        let names = ["maxmemory-policy", "maxmemory", "appendonly", "appendfsync"];
        let mut pipe = redis::pipe();
        for name in names {
            pipe.cmd("CONFIG").arg("GET").arg(name);
        }
        pipe.cmd("INFO").arg("server");
        let mut values = conn.req_packed_commands(&pipe, 0, names.len() + 1).await?;
        let info = values.pop();
        let mut got = names
            .iter()
            .zip(values)
            .map(|(name, v)| config_value(name, v));
        let mut next = || got.next().flatten();
        Ok(Self {
            maxmemory_policy: next(),
            maxmemory: next().and_then(|v| v.parse().ok()),
            appendonly: next().map(|v| v == "yes"),
            appendfsync: next(),
            version: info.clone().and_then(|v| info_field(v, "redis_version")),
            mode: info.and_then(|v| info_field(v, "redis_mode")),
        })
    }
}

/// A `field:value` line of an `INFO` reply.
fn info_field(reply: Value, field: &str) -> Option<String> {
    let text = match reply {
        Value::BulkString(b) => String::from_utf8(b).ok()?,
        Value::VerbatimString { text, .. } => text,
        _ => return None,
    };
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// The value of one `CONFIG GET name` reply: `[name, value]` (RESP2) or `{name: value}` (RESP3).
fn config_value(name: &str, reply: Value) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
        }
        Value::Map(pairs) => pairs,
        _ => return None,
    };
    pairs
        .iter()
        .find(|(k, _)| text(k).as_deref() == Some(name))
        .and_then(|(_, v)| text(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_config_replies() {
        let reply = Value::Array(vec![bulk("maxmemory-policy"), bulk("allkeys-lru")]);
        assert_eq!(
            config_value("maxmemory-policy", reply).as_deref(),
            Some("allkeys-lru")
        );
        let refused = Value::ServerError(
            redis::make_extension_error("NOPERM".into(), None)
                .into_server_errors()
                .and_then(|e| e.first().map(|(_, e)| e.clone()))
                .unwrap_or_else(|| unreachable!()),
        );
        assert_eq!(config_value("maxmemory-policy", refused), None);
        let settings = ServerSettings {
            maxmemory_policy: Some("volatile-ttl".into()),
            ..ServerSettings::default()
        };
        assert_eq!(settings.may_evict(), Some(true));
        assert_eq!(ServerSettings::default().may_evict(), None);
        let info = bulk("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n");
        let version = info_field(info, "redis_version");
        assert_eq!(version.as_deref(), Some("7.0.15"));
        let settings = ServerSettings {
            version,
            ..ServerSettings::default()
        };
        assert_eq!(settings.major_version(), Some(7));
        let info = bulk("# Server\r\nredis_version:7.0.15\r\nredis_mode:cluster\r\n");
        assert_eq!(info_field(info, "redis_mode").as_deref(), Some("cluster"));
    }
}
