//! Test servers: where they are, and what happens when one is missing.
//!
//! Tests against a real server read its URL from an environment variable, with the loopback
//! default of the development machine. When the server cannot be reached:
//! - with `CI` set (any value but `0`/`false`), the test **fails**: a skipped test must never
//!   look like a pass in CI;
//! - otherwise it prints a loud `SKIPPED` line and returns `None`, so a laptop without the
//!   server can still run the rest of the suite.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Redis: `IDEM_REDIS_URL`.
pub const REDIS: (&str, &str) = ("IDEM_REDIS_URL", "redis://127.0.0.1:6379");
/// PostgreSQL: `IDEM_POSTGRES_URL`.
pub const POSTGRES: (&str, &str) = (
    "IDEM_POSTGRES_URL",
    "postgres://postgres@127.0.0.1:5432/test",
);
/// MySQL / MariaDB: `IDEM_MYSQL_URL`.
pub const MYSQL: (&str, &str) = ("IDEM_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
/// RabbitMQ: `IDEM_AMQP_URL`.
pub const AMQP: (&str, &str) = ("IDEM_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
/// NATS with JetStream: `IDEM_NATS_URL`.
pub const NATS: (&str, &str) = ("IDEM_NATS_URL", "nats://127.0.0.1:4222");
/// MQTT (Mosquitto): `IDEM_MQTT_URL`.
pub const MQTT: (&str, &str) = ("IDEM_MQTT_URL", "mqtt://127.0.0.1:1883");

/// Whether this run is CI, where a missing server is a failure.
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The URL of a test server (`(env var, default)`, e.g. [`REDIS`]) if it accepts TCP
/// connections; see the module docs for what happens when it does not.
///
/// # Panics
/// When the server is unreachable and [`is_ci`].
pub fn url((var, default): (&str, &str)) -> Option<String> {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    match reachable(&url) {
        Ok(()) => Some(url),
        Err(why) if is_ci() => panic!(
            "test server {var}={} is unreachable ({why}); CI is set, so this is a failure, not a skip",
            redact(&url)
        ),
        Err(why) => {
            eprintln!(
                "SKIPPED: test server {var}={} is unreachable ({why}); set CI=1 to make this a failure",
                redact(&url)
            );
            None
        }
    }
}

/// `host:port` of a URL such as `scheme://user:pass@host:port/path`.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (hostport, default_port(url.split_once("://")?.0)?),
    };
    Some((host.trim_matches(['[', ']']).to_owned(), port))
}

fn default_port(scheme: &str) -> Option<u16> {
    Some(match scheme {
        "redis" | "rediss" => 6379,
        "postgres" | "postgresql" => 5432,
        "mysql" => 3306,
        "amqp" | "amqps" => 5672,
        "nats" => 4222,
        "mqtt" | "tcp" => 1883,
        _ => return None,
    })
}

fn reachable(url: &str) -> Result<(), String> {
    let (host, port) = host_port(url).ok_or_else(|| "cannot parse host and port".to_owned())?;
    let addrs = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// The URL with any password replaced by `***` (see [`idem::redact_url`]).
pub fn redact(url: &str) -> String {
    idem::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_and_ports() {
        assert_eq!(
            host_port("redis://127.0.0.1:6379"),
            Some(("127.0.0.1".into(), 6379))
        );
        assert_eq!(
            host_port("postgres://postgres@127.0.0.1/test"),
            Some(("127.0.0.1".into(), 5432))
        );
        assert_eq!(
            host_port("amqp://guest:guest@localhost:5672/%2f"),
            Some(("localhost".into(), 5672))
        );
        assert_eq!(
            redact("amqp://guest:guest@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(
            redact("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
    }
}
