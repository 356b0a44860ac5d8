//! What `verify` itself does on the broker, through the adapters where they have the call and
//! through the brokers' own clients where they do not: declare a mode's topology before
//! anything is published, publish (one attempt at a time, so that every retry is counted), read
//! the backlog, and clean up afterwards on a server that is not its own.

use std::time::Duration;

use anyhow::{Context, anyhow};
use idem_broker::amqp::{AmqpProducer, AmqpSource};
use idem_broker::mqtt::{MqttProducer, MqttSource};
use idem_broker::nats::{NatsProducer, NatsSource};
use idem_broker::redis_streams::{RedisStreamProducer, RedisStreamSource};
use idem_broker::{BrokerError, Outgoing, Source};

use super::spec::{BrokerKind, Names, Settings};
use crate::store_url::redact;

/// Creates the queue (stream, group, sessions) of a mode, so that nothing published before the
/// consumers start is dropped: each adapter's source declares what it consumes on connect.
pub(crate) async fn declare(
    kind: BrokerKind,
    url: &str,
    names: &Names,
    settings: &Settings,
    slots: usize,
) -> Result<(), BrokerError> {
    match kind {
        BrokerKind::Nats => {
            NatsSource::connect(url, names.nats(settings))
                .await?
                .close()
                .await
        }
        BrokerKind::Amqp => {
            AmqpSource::connect(url, names.amqp(settings))
                .await?
                .close()
                .await
        }
        BrokerKind::Redis => {
            RedisStreamSource::connect(url, names.redis(settings, 0))
                .await?
                .close()
                .await;
        }
        BrokerKind::Mqtt => {
            // MQTT keeps messages only for subscribed sessions: every slot's persistent
            // session must exist before the first publish.
            for slot in 0..slots {
                MqttSource::connect(url, names.mqtt(slot))
                    .await?
                    .close()
                    .await;
            }
        }
    }
    Ok(())
}

/// A producer of one mode's transfers.
pub(crate) enum Producer {
    Nats(NatsProducer, String),
    Amqp(AmqpProducer, String),
    Mqtt(MqttProducer, String),
    Redis(RedisStreamProducer, String),
}

/// What the broker answered to a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Published {
    /// The broker recognised the message id and did not store it again (NATS).
    pub(crate) dropped_as_duplicate: bool,
}

/// How long one publish attempt may wait for its confirmation.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

impl Producer {
    pub(crate) async fn connect(
        kind: BrokerKind,
        url: &str,
        names: &Names,
    ) -> Result<Self, BrokerError> {
        let to = names.destination(kind);
        Ok(match kind {
            BrokerKind::Nats => Producer::Nats(NatsProducer::connect(url).await?, to),
            BrokerKind::Amqp => Producer::Amqp(AmqpProducer::connect(url).await?, to),
            BrokerKind::Mqtt => Producer::Mqtt(MqttProducer::connect(url).await?, to),
            BrokerKind::Redis => Producer::Redis(RedisStreamProducer::connect(url).await?, to),
        })
    }

    /// One publish attempt, confirmed by the broker. The caller retries with the same message
    /// (same id), as a producer after a lost confirm does.
    pub(crate) async fn publish_once(&self, msg: &Outgoing) -> Result<Published, BrokerError> {
        let attempt = async {
            match self {
                Producer::Nats(p, subject) => {
                    let published = p.publish_once(subject, msg).await?;
                    Ok(Published {
                        dropped_as_duplicate: published.duplicate,
                    })
                }
                Producer::Amqp(p, queue) => {
                    p.publish_once("", queue, msg).await?;
                    Ok(Published {
                        dropped_as_duplicate: false,
                    })
                }
                Producer::Mqtt(p, topic) => {
                    p.publish_once(topic, msg).await?;
                    Ok(Published {
                        dropped_as_duplicate: false,
                    })
                }
                Producer::Redis(p, stream) => {
                    p.publish_once(stream, msg).await?;
                    Ok(Published {
                        dropped_as_duplicate: false,
                    })
                }
            }
        };
        tokio::time::timeout(PUBLISH_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::new(
                    idem_broker::BrokerErrorKind::Timeout,
                    "no publish confirmation in time",
                ))
            })
    }
}

/// Copies the broker still holds for a mode: published and not acked (NATS: pending and
/// unacked; Redis: pending and never delivered; RabbitMQ: ready, which includes the unacked
/// ones once no consumer holds them). `None` where the broker cannot tell (MQTT keeps what it
/// owes each session to itself; see [`leftover_mqtt`]).
pub(crate) async fn backlog(
    kind: BrokerKind,
    url: &str,
    names: &Names,
) -> anyhow::Result<Option<u64>> {
    let names = names.clone();
    let probe = async move {
        match kind {
            BrokerKind::Nats => backlog_nats(url, &names).await.map(Some),
            BrokerKind::Redis => backlog_redis(url, &names).await.map(Some),
            BrokerKind::Amqp => backlog_amqp(url, &names).await.map(Some),
            BrokerKind::Mqtt => Ok(None),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), probe)
        .await
        .map_err(|_| anyhow!("the broker did not answer how much it holds within 15 s"))?
}

async fn backlog_nats(url: &str, names: &Names) -> anyhow::Result<u64> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(&names.base)
        .await
        .context("finding the stream")?;
    let info = stream
        .consumer_info("verify")
        .await
        .context("reading the consumer's info")?;
    Ok(info.num_pending + info.num_ack_pending as u64)
}

async fn redis_conn(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)
        .with_context(|| format!("bad Redis URL {}", redact(url)))?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to {}", redact(url)))
}

async fn backlog_redis(url: &str, names: &Names) -> anyhow::Result<u64> {
    let mut conn = redis_conn(url).await?;
    let stream = names.destination(BrokerKind::Redis);
    // XPENDING's summary: [count, first id, last id, consumers].
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("verify")
        .query_async(&mut conn)
        .await
        .context("XPENDING")?;
    let pending = match summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        },
        _ => 0,
    };
    // Entries past the group's last delivered id were never delivered at all.
    let groups: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .context("XINFO GROUPS")?;
    let last = field_of_group(&groups, "verify", "last-delivered-id")
        .ok_or_else(|| anyhow!("the consumer group of {stream} is missing"))?;
    let undelivered: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg(format!("({last}"))
        .arg("+")
        .query_async(&mut conn)
        .await
        .context("XRANGE")?;
    Ok(pending + undelivered.len() as u64)
}

/// A field of one group in an `XINFO GROUPS` reply (RESP2 flat arrays or RESP3 maps).
fn field_of_group(reply: &redis::Value, group: &str, field: &str) -> Option<String> {
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let redis::Value::Array(groups) = reply else {
        return None;
    };
    for g in groups {
        let pairs: Vec<(&redis::Value, &redis::Value)> = match g {
            redis::Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|c| Some((c.first()?, c.get(1)?)))
                .collect(),
            redis::Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
            _ => continue,
        };
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| text(k).as_deref() == Some(name))
                .and_then(|(_, v)| text(v))
        };
        if get("name").as_deref() == Some(group) {
            return get(field);
        }
    }
    None
}

async fn backlog_amqp(url: &str, names: &Names) -> anyhow::Result<u64> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    let channel = conn.create_channel().await.context("opening a channel")?;
    let queue = channel
        .queue_declare(
            names.base.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .context("reading the queue")?;
    let _ = conn.close(200, "".into()).await;
    Ok(u64::from(queue.message_count()))
}

/// MQTT: how many messages the broker still owes the slots' sessions. Connects as each slot
/// (its persistent session), counts what the broker sends within `wait` without acking it, and
/// leaves: the messages stay with the session.
pub(crate) async fn leftover_mqtt(
    url: &str,
    names: &Names,
    slots: usize,
    wait: Duration,
) -> anyhow::Result<u64> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let parsed = url::Url::parse(url).with_context(|| format!("bad URL {}", redact(url)))?;
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = parsed.port().unwrap_or(1883);
    let mut total = 0;
    for slot in 0..slots {
        let mut opts = MqttOptions::new(names.mqtt_client_id(slot), host.clone(), port);
        opts.set_clean_start(false);
        opts.set_manual_acks(true);
        opts.set_session_expiry_interval(Some(3600));
        if !parsed.username().is_empty() {
            opts.set_credentials(parsed.username(), parsed.password().unwrap_or(""));
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        let mut n = 0u64;
        let mut connected = false;
        let counting = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                    Ok(Event::Incoming(Packet::Publish(_))) => n += 1,
                    Ok(_) => {}
                    Err(e) => return Err::<(), _>(anyhow!("MQTT session {slot}: {e}")),
                }
            }
        };
        // Counting ends when `wait` is over (the normal way) or the connection fails.
        if let Ok(Err(e)) = tokio::time::timeout(wait, counting).await {
            return Err(e);
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while events.poll().await.is_ok() {}
        })
        .await;
        if !connected {
            return Err(anyhow!("MQTT session {slot}: no CONNACK"));
        }
        total += n;
    }
    Ok(total)
}

/// Removes a mode's queue (streams, keys, sessions) from a server that is not `verify`'s own.
/// Best effort: a failure is reported, never fatal.
pub(crate) async fn cleanup(
    kind: BrokerKind,
    url: &str,
    names: &Names,
    slots: usize,
) -> anyhow::Result<()> {
    match kind {
        BrokerKind::Nats => {
            let client = async_nats::connect(url).await?;
            let js = async_nats::jetstream::new(client);
            let config = names.nats(&Settings {
                lease_ms: 1,
                redelivery_ms: 1,
                prefetch: 1,
                crash_before_rate: 0.0,
                crash_after_effect_rate: 0.0,
                crash_after_complete_rate: 0.0,
            });
            js.delete_stream(&config.stream).await?;
            js.delete_stream(&config.dead_letter_stream).await?;
        }
        BrokerKind::Redis => {
            let mut conn = redis_conn(url).await?;
            let stream = names.destination(BrokerKind::Redis);
            let _: i64 = redis::cmd("DEL")
                .arg(&stream)
                .arg(format!("{stream}:dead-letter"))
                .query_async(&mut conn)
                .await?;
        }
        BrokerKind::Amqp => {
            let conn =
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            for queue in [names.base.clone(), format!("{}.dlq", names.base)] {
                channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await?;
            }
            channel
                .exchange_delete(
                    format!("{}.dlx", names.base).as_str().into(),
                    Default::default(),
                )
                .await?;
            let _ = conn.close(200, "".into()).await;
        }
        BrokerKind::Mqtt => {
            use rumqttc::v5::mqttbytes::v5::Packet;
            use rumqttc::v5::{AsyncClient, Event, MqttOptions};
            let parsed = url::Url::parse(url)?;
            let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
            let port = parsed.port().unwrap_or(1883);
            for slot in 0..slots {
                let config = names.mqtt(slot);
                for id in [config.client_id.clone(), config.dead_letter_client_id()] {
                    // A clean start with no expiry discards the session.
                    let mut opts = MqttOptions::new(id, host.clone(), port);
                    opts.set_clean_start(true);
                    opts.set_session_expiry_interval(Some(0));
                    if !parsed.username().is_empty() {
                        opts.set_credentials(parsed.username(), parsed.password().unwrap_or(""));
                    }
                    let (client, mut events) = AsyncClient::new(opts, 8);
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Ok(ev) = events.poll().await {
                            if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                                break;
                            }
                        }
                    })
                    .await;
                    let _ = client.disconnect().await;
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while events.poll().await.is_ok() {}
                    })
                    .await;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_group_field_in_both_protocols() {
        let s = |t: &str| redis::Value::BulkString(t.as_bytes().to_vec());
        let resp2 = redis::Value::Array(vec![redis::Value::Array(vec![
            s("name"),
            s("verify"),
            s("last-delivered-id"),
            s("5-0"),
        ])]);
        assert_eq!(
            field_of_group(&resp2, "verify", "last-delivered-id").as_deref(),
            Some("5-0")
        );
        let resp3 = redis::Value::Array(vec![redis::Value::Map(vec![
            (s("name"), s("other")),
            (s("last-delivered-id"), s("1-0")),
        ])]);
        assert_eq!(field_of_group(&resp3, "verify", "last-delivered-id"), None);
    }
}
