//! `--from URL` and the broker options: which adapter of `idem_broker` consumes what, checked
//! before anything connects (an option that does not apply to the URL's broker is an error, not
//! silently ignored), then connected and run.
//!
//! | `--from` | adapter | what is consumed | dead letters (declared unless `--no-declare`) |
//! |---|---|---|---|
//! | `amqp://…/VHOST` | RabbitMQ | `--queue` (a quorum queue unless `--queue-type classic`) | exchange `<queue>.dlx` → queue `<queue>.dlq` |
//! | `nats://` | NATS JetStream | stream `--stream` capturing `--subject`, durable consumer `--group` | stream `<stream>_DLQ` |
//! | `mqtt://`, `tcp://` | MQTT 5 | `--topic` in the persistent session `--client-id` | topic `idem/dead-letter/<client id>` |
//! | `redis://` | Redis Streams | stream `--stream`, consumer group `--group` | stream `<stream>:dead-letter` |

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::bail;
use idem::Namespace;
use idem_broker::StatsSnapshot;
use idem_broker::amqp::{AmqpConfig, AmqpSource, QueueType};
use idem_broker::mqtt::{MqttConfig, MqttSource};
use idem_broker::nats::{NatsConfig, NatsSource};
use idem_broker::redis_streams::{RedisStreamConfig, RedisStreamSource};

use super::{Prepared, Started, parse_duration};
use crate::store_url::redact;

/// A parsed `--from` URL. Holds the URL with its password: print the `BrokerUrl` (redacted),
/// never the string inside.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum BrokerUrl {
    /// RabbitMQ: `amqp://USER:PASS@HOST:PORT/VHOST`.
    Amqp(String),
    /// NATS JetStream: `nats://[USER:PASS@]HOST:PORT`.
    Nats(String),
    /// MQTT 5: `mqtt://[USER:PASS@]HOST:PORT` (or `tcp://`).
    Mqtt(String),
    /// Redis Streams: `redis://[USER:PASS@]HOST:PORT[/DB]`.
    Redis(String),
}

impl BrokerUrl {
    fn scheme(&self) -> &'static str {
        match self {
            BrokerUrl::Amqp(_) => "amqp",
            BrokerUrl::Nats(_) => "nats",
            BrokerUrl::Mqtt(_) => "mqtt",
            BrokerUrl::Redis(_) => "redis",
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((scheme, rest)) = s.split_once("://") else {
            bail!(
                "{} is not a broker URL: expected amqp://HOST, nats://HOST, mqtt://HOST or \
                 redis://HOST",
                redact(s)
            );
        };
        if rest.is_empty() || rest.starts_with('/') {
            bail!("broker URL {} has no host", redact(s));
        }
        let no_tls = |name: &str| {
            anyhow::anyhow!(
                "{scheme}:// ({name} over TLS) is not built into this idem: use \
                 {}:// on a trusted network, or a TLS-terminating proxy on the same host",
                scheme.trim_end_matches('s')
            )
        };
        Ok(match scheme.to_ascii_lowercase().as_str() {
            "amqp" => BrokerUrl::Amqp(s.to_owned()),
            "nats" => BrokerUrl::Nats(s.to_owned()),
            "mqtt" | "tcp" => BrokerUrl::Mqtt(s.to_owned()),
            "redis" => BrokerUrl::Redis(s.to_owned()),
            "amqps" => return Err(no_tls("AMQP")),
            "mqtts" => return Err(no_tls("MQTT")),
            "rediss" => return Err(no_tls("Redis")),
            _ => bail!(
                "unsupported broker URL scheme {scheme:?} in {}: expected amqp:// (RabbitMQ), \
                 nats:// (NATS JetStream), mqtt:// (MQTT 5) or redis:// (Redis Streams)",
                redact(s)
            ),
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (BrokerUrl::Amqp(url)
        | BrokerUrl::Nats(url)
        | BrokerUrl::Mqtt(url)
        | BrokerUrl::Redis(url)) = self;
        f.write_str(&redact(url))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

impl clap::builder::ValueParserFactory for BrokerUrl {
    type Parser = crate::store_url::RedactingParser<BrokerUrl>;

    fn value_parser() -> Self::Parser {
        crate::store_url::RedactingParser::new()
    }
}

/// The options that say what to consume on each broker.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct BrokerOptions {
    /// The queue to consume (required). Declared durable with its dead-letter exchange
    /// `<queue>.dlx` and queue `<queue>.dlq` unless --no-declare.
    #[arg(long, value_name = "NAME", help_heading = "RabbitMQ (amqp://)")]
    queue: Option<String>,
    /// The type of queue to declare: `quorum` (replicated, counts deliveries) or `classic`.
    /// Must match an existing queue's type.
    #[arg(long, value_name = "TYPE", help_heading = "RabbitMQ (amqp://)", value_parser = parse_queue_type)]
    queue_type: Option<QueueType>,
    /// Most deliveries held unacked at once (RabbitMQ's prefetch, JetStream's max_ack_pending);
    /// default 256 for RabbitMQ, 1000 for NATS.
    #[arg(long, value_name = "N", help_heading = "RabbitMQ (amqp://)", value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: Option<u16>,

    /// The stream to consume (required). NATS: created if missing, capturing --subject; Redis:
    /// the stream key.
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "NATS JetStream (nats://), Redis Streams (redis://)"
    )]
    stream: Option<String>,
    /// NATS: the subjects the stream captures, used only when the stream is created (default
    /// `<stream>.>`).
    #[arg(
        long,
        value_name = "SUBJECT",
        help_heading = "NATS JetStream (nats://), Redis Streams (redis://)"
    )]
    subject: Option<String>,
    /// The durable consumer (NATS) or consumer group (Redis) that replicas of this consumer
    /// share. Default: the namespace (NATS: with characters other than A-Z a-z 0-9 - _ as `_`).
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "NATS JetStream (nats://), Redis Streams (redis://)"
    )]
    group: Option<String>,
    /// NATS: a delivery not acked within this is redelivered (default 30s); idem reports
    /// progress while commands run, so it need not cover --timeout.
    #[arg(long, value_name = "DURATION", help_heading = "NATS JetStream (nats://), Redis Streams (redis://)", value_parser = parse_duration)]
    ack_wait: Option<Duration>,

    /// The topic filter to subscribe to at QoS 1 (required; wildcards allowed).
    #[arg(long, value_name = "FILTER", help_heading = "MQTT 5 (mqtt://)")]
    topic: Option<String>,
    /// The persistent session's client id: the broker keeps unacked messages under it while
    /// the sidecar is away. Must be stable across restarts and unique per running sidecar
    /// (default `idem-<namespace>`).
    #[arg(long, value_name = "ID", help_heading = "MQTT 5 (mqtt://)")]
    client_id: Option<String>,

    /// Declare nothing (queues, exchanges, streams, dead-letter session): use what exists.
    /// Redis consumer groups are still created when missing.
    #[arg(long)]
    no_declare: bool,
}

fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    match s {
        "quorum" => Ok(QueueType::Quorum),
        "classic" => Ok(QueueType::Classic),
        _ => Err(format!(
            "unknown queue type {s:?}: expected quorum or classic"
        )),
    }
}

/// A validated broker configuration, not connected yet.
#[derive(Debug)]
pub(crate) enum Plan {
    Amqp(String, AmqpConfig),
    Nats(String, NatsConfig),
    Mqtt(String, MqttConfig),
    Redis(String, RedisStreamConfig),
}

impl Plan {
    /// Checks that the options fit the broker of `from`, and builds its adapter's config.
    ///
    /// # Errors
    /// A missing required option, or one that belongs to another broker.
    pub(crate) fn new(
        from: &BrokerUrl,
        opts: &BrokerOptions,
        namespace: &Namespace,
    ) -> anyhow::Result<Plan> {
        let scheme = from.scheme();
        let given: [(&str, bool, &[&str]); 9] = [
            ("--queue", opts.queue.is_some(), &["amqp"]),
            ("--queue-type", opts.queue_type.is_some(), &["amqp"]),
            ("--prefetch", opts.prefetch.is_some(), &["amqp", "nats"]),
            ("--stream", opts.stream.is_some(), &["nats", "redis"]),
            ("--subject", opts.subject.is_some(), &["nats"]),
            ("--group", opts.group.is_some(), &["nats", "redis"]),
            ("--ack-wait", opts.ack_wait.is_some(), &["nats"]),
            ("--topic", opts.topic.is_some(), &["mqtt"]),
            ("--client-id", opts.client_id.is_some(), &["mqtt"]),
        ];
        for (flag, present, schemes) in given {
            if present && !schemes.contains(&scheme) {
                let fits: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
                bail!(
                    "{flag} does not apply to {scheme}:// (it is for {})",
                    fits.join(" and ")
                );
            }
        }
        if opts.no_declare && scheme == "redis" {
            tracing::info!("--no-declare: the Redis consumer group is still created if missing");
        }
        let required = |value: &Option<String>, flag: &str, what: &str| match value
            .as_deref()
            .map(str::trim)
        {
            Some(v) if !v.is_empty() => Ok(v.to_owned()),
            _ => Err(anyhow::anyhow!(
                "{scheme}:// needs {flag} ({what}), e.g. {flag} {}",
                match flag {
                    "--queue" => "orders",
                    "--stream" if scheme == "nats" => "ORDERS",
                    "--stream" => "orders",
                    _ => "'orders/#'",
                }
            )),
        };
        let group = || {
            opts.group
                .clone()
                .unwrap_or_else(|| namespace.as_str().to_owned())
        };
        Ok(match from {
            BrokerUrl::Amqp(url) => {
                let queue = required(&opts.queue, "--queue", "the queue to consume")?;
                let mut config = AmqpConfig::new(queue);
                if let Some(t) = opts.queue_type {
                    config = config.queue_type(t);
                }
                if let Some(n) = opts.prefetch {
                    config = config.prefetch(n);
                }
                config.declare = !opts.no_declare;
                Plan::Amqp(url.clone(), config)
            }
            BrokerUrl::Nats(url) => {
                let stream = required(&opts.stream, "--stream", "the JetStream stream")?;
                let subject = opts
                    .subject
                    .clone()
                    .unwrap_or_else(|| format!("{stream}.>"));
                let durable = opts.group.clone().unwrap_or_else(|| {
                    namespace
                        .as_str()
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect()
                });
                let mut config = NatsConfig::new(stream, subject, durable);
                if let Some(wait) = opts.ack_wait {
                    config = config.ack_wait(wait);
                }
                if let Some(n) = opts.prefetch {
                    config.max_ack_pending = i64::from(n);
                }
                config.declare = !opts.no_declare;
                Plan::Nats(url.clone(), config)
            }
            BrokerUrl::Mqtt(url) => {
                let topic = required(&opts.topic, "--topic", "the topic filter")?;
                let client_id = opts
                    .client_id
                    .clone()
                    .unwrap_or_else(|| format!("idem-{}", namespace.as_str()));
                let mut config = MqttConfig::new(client_id, topic);
                config.declare_dead_letter_session = !opts.no_declare;
                Plan::Mqtt(url.clone(), config)
            }
            BrokerUrl::Redis(url) => {
                let stream = required(&opts.stream, "--stream", "the stream key")?;
                Plan::Redis(url.clone(), RedisStreamConfig::new(stream, group()))
            }
        })
    }

    /// Connects and consumes until SIGTERM or ctrl-c.
    ///
    /// # Errors
    /// The broker is unreachable or refuses the configuration (nothing was consumed), or the
    /// consumer stopped on an error retrying cannot fix.
    pub(super) async fn consume(
        self,
        prepared: Prepared,
        started: Started,
    ) -> anyhow::Result<StatsSnapshot> {
        // The adapter's message already holds its driver's error text; its source chain would
        // repeat it.
        let cannot = |e: idem_broker::BrokerError| {
            anyhow::anyhow!("cannot consume from {}: {e}", started.from)
        };
        match self {
            Plan::Amqp(url, config) => {
                let what = format!("queue {:?}", config.queue);
                let source = AmqpSource::connect(&url, config).await.map_err(cannot)?;
                prepared.run(source, &what, &started).await
            }
            Plan::Nats(url, config) => {
                let what = format!(
                    "stream {:?} with durable consumer {:?}",
                    config.stream, config.consumer
                );
                let source = NatsSource::connect(&url, config).await.map_err(cannot)?;
                prepared.run(source, &what, &started).await
            }
            Plan::Mqtt(url, config) => {
                let what = format!("topic {:?} in session {:?}", config.topic, config.client_id);
                let source = MqttSource::connect(&url, config).await.map_err(cannot)?;
                prepared.run(source, &what, &started).await
            }
            Plan::Redis(url, config) => {
                let what = format!("stream {:?} as group {:?}", config.stream, config.group);
                let source = RedisStreamSource::connect(&url, config)
                    .await
                    .map_err(cannot)?;
                prepared.run(source, &what, &started).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace::new("billing.v2").unwrap_or_else(|e| panic!("{e}"))
    }

    fn plan(from: &str, opts: BrokerOptions) -> anyhow::Result<Plan> {
        Plan::new(&from.parse()?, &opts, &ns())
    }

    #[test]
    fn parses_broker_urls_and_redacts_them() {
        let url: BrokerUrl = "amqp://guest:secret@127.0.0.1:5672/%2f"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(
            format!("{url:?}"),
            "BrokerUrl(amqp://guest:***@127.0.0.1:5672/%2f)"
        );
        for (s, scheme) in [
            ("nats://127.0.0.1:4222", "nats"),
            ("mqtt://127.0.0.1:1883", "mqtt"),
            ("tcp://127.0.0.1:1883", "mqtt"),
            ("redis://127.0.0.1:6379/3", "redis"),
        ] {
            let url: BrokerUrl = s.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(url.scheme(), scheme);
        }
        let err = |s: &str| match s.parse::<BrokerUrl>() {
            Ok(u) => panic!("{u} parsed"),
            Err(e) => e.to_string(),
        };
        let e = err("kafka://u:secret@h:9092");
        assert!(e.contains("\"kafka\"") && !e.contains("secret"), "{e}");
        let e = err("amqps://u:secret@h");
        assert!(e.contains("TLS") && !e.contains("secret"), "{e}");
        assert!(err("127.0.0.1:5672").contains("not a broker URL"));
        assert!(err("amqp://").contains("no host"));
    }

    #[test]
    fn options_must_fit_the_broker() {
        let e = plan("amqp://h", BrokerOptions::default())
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("needs --queue"), "{e}");
        let opts = BrokerOptions {
            queue: Some("q".into()),
            topic: Some("t".into()),
            ..BrokerOptions::default()
        };
        let e = plan("amqp://h", opts).map(|_| ()).unwrap_err();
        assert!(
            e.to_string().contains("--topic does not apply to amqp://"),
            "{e}"
        );
        let opts = BrokerOptions {
            stream: Some("s".into()),
            client_id: Some("c".into()),
            ..BrokerOptions::default()
        };
        let e = plan("redis://h", opts).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("--client-id does not apply"), "{e}");
        let e = plan("nats://h", BrokerOptions::default())
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("needs --stream"), "{e}");
    }

    #[test]
    fn defaults_follow_the_namespace() {
        let opts = BrokerOptions {
            stream: Some("ORDERS".into()),
            ..BrokerOptions::default()
        };
        match plan("nats://h", opts) {
            Ok(Plan::Nats(_, c)) => {
                assert_eq!(c.consumer, "billing_v2");
                assert_eq!(c.subjects, vec!["ORDERS.>".to_owned()]);
            }
            other => panic!("{other:?}"),
        }
        let opts = BrokerOptions {
            topic: Some("orders/#".into()),
            ..BrokerOptions::default()
        };
        match plan("mqtt://h", opts) {
            Ok(Plan::Mqtt(_, c)) => assert_eq!(c.client_id, "idem-billing.v2"),
            other => panic!("{other:?}"),
        }
        let opts = BrokerOptions {
            stream: Some("orders".into()),
            ..BrokerOptions::default()
        };
        match plan("redis://h", opts) {
            Ok(Plan::Redis(_, c)) => assert_eq!(c.group, "billing.v2"),
            other => panic!("{other:?}"),
        }
    }
}
