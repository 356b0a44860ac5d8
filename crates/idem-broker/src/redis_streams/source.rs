//! [`RedisStreamSource`]: `XREADGROUP` plus periodic `XAUTOCLAIM`; [`RedisStreamAcker`]: `XACK`
//! per batch, idle-time nacks, `XCLAIM` progress, atomic dead letters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use tokio::time::Instant;

use super::{ORIGINAL_ID_FIELD, PAYLOAD_FIELD, RedisStreamConfig, is_no_group, redis_error};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::{Message, header};
use crate::source::{Acker, Incoming, Source};

/// Reads a Redis stream through a consumer group. See the [module docs](super).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::redis_streams::{RedisStreamConfig, RedisStreamSource};
/// let source = RedisStreamSource::connect("redis://127.0.0.1:6379", RedisStreamConfig::new("orders", "billing")).await?;
/// # let _ = source; Ok(()) }
/// ```
pub struct RedisStreamSource {
    config: Arc<RedisStreamConfig>,
    // Blocking reads get their own connection: a blocked XREADGROUP holds up every command
    // queued behind it on a multiplexed connection.
    reader: ConnectionManager,
    commands: ConnectionManager,
    origin: Arc<str>,
    next_claim: Instant,
    claim_cursor: String,
}

impl std::fmt::Debug for RedisStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamSource")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One stream entry read by this consumer.
#[derive(Debug)]
pub struct RedisStreamDelivery {
    id: String,
}

/// Settles [`RedisStreamSource`] deliveries.
#[derive(Clone)]
pub struct RedisStreamAcker {
    config: Arc<RedisStreamConfig>,
    commands: ConnectionManager,
}

impl std::fmt::Debug for RedisStreamAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamAcker")
            .field("stream", &self.config.stream)
            .finish_non_exhaustive()
    }
}

/// A connection manager that reconnects by itself.
pub(super) async fn manager(
    url: &str,
    response_timeout: Duration,
) -> Result<ConnectionManager, BrokerError> {
    let client = redis::Client::open(url).map_err(|e| {
        BrokerError::new(
            BrokerErrorKind::Config,
            format!("bad Redis URL {}: {e}", redact(url)),
        )
    })?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| redis_error(&format!("connecting to {}", redact(url)), e))
}

impl RedisStreamSource {
    /// Connects and creates the consumer group (at the start of the stream, creating the
    /// stream) if it does not exist.
    ///
    /// # Errors
    /// A [`BrokerError`] when Redis is unreachable or the key is not a stream.
    pub async fn connect(url: &str, config: RedisStreamConfig) -> Result<Self, BrokerError> {
        let reader = manager(url, config.block + Duration::from_secs(5)).await?;
        let mut commands = manager(url, Duration::from_secs(5)).await?;
        create_group(&mut commands, &config).await?;
        tracing::info!(stream = %config.stream, group = %config.group, consumer = %config.consumer, url = %redact(url), "consuming");
        Ok(Self {
            origin: config.stream.as_str().into(),
            config: Arc::new(config),
            reader,
            commands,
            next_claim: Instant::now(),
            claim_cursor: "0-0".to_owned(),
        })
    }

    fn convert(&self, entry: StreamId, count: u32) -> Incoming<RedisStreamDelivery> {
        let StreamId { id, map, .. } = entry;
        let mut payload = Bytes::new();
        let mut message_id = None;
        let mut headers = Vec::new();
        for (field, value) in map {
            let bytes = match value {
                redis::Value::BulkString(b) => Bytes::from(b),
                redis::Value::SimpleString(s) => Bytes::from(s),
                redis::Value::Int(n) => Bytes::from(n.to_string()),
                _ => continue,
            };
            if field == PAYLOAD_FIELD {
                payload = bytes;
            } else {
                if field == header::MESSAGE_ID {
                    message_id = String::from_utf8(bytes.to_vec()).ok();
                }
                headers.push((field, bytes));
            }
        }
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        let mut message = Message::new(Arc::clone(&self.origin), payload);
        if let Some(id) = message_id {
            message = message.with_message_id(id);
        }
        for (name, value) in headers {
            message = message.with_header(name, value);
        }
        Incoming::new(
            message.with_delivery_count(count),
            RedisStreamDelivery { id },
        )
    }

    /// Re-creates the consumer group after Redis said it is gone (`NOGROUP`), when the stream
    /// is gone too (deleted, expired or flushed): consuming resumes from the start of what it
    /// holds from now on. A group destroyed over a kept stream is an error instead: creating it
    /// again would read every entry again, and those older than the store's retention would
    /// run their effects a second time.
    async fn recreate_group(&mut self, cause: redis::RedisError) -> Result<(), BrokerError> {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&self.config.stream)
            .query_async(&mut self.commands)
            .await
            .map_err(|e| redis_error("checking the stream after NOGROUP", e))?;
        if exists {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                format!(
                    "the consumer group {:?} of stream {:?} was destroyed while the stream was kept \
                 ({cause}); re-creating it would read every entry again, so this consumer \
                 stops: create the group at the right id (XGROUP CREATE … <id>) and start it \
                 again",
                    self.config.group, self.config.stream
                ),
            ));
        }
        tracing::warn!(
            stream = %self.config.stream,
            group = %self.config.group,
            error = %cause,
            "the consumer group is gone; creating it again"
        );
        self.claim_cursor = "0-0".to_owned();
        create_group(&mut self.commands, &self.config).await
    }

    /// Takes over entries idle longer than `claim_idle`, with their delivery counts.
    async fn claim(
        &mut self,
        max: usize,
    ) -> Result<Vec<Incoming<RedisStreamDelivery>>, AutoClaimError> {
        let c = &self.config;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&c.stream)
            .arg(&c.group)
            .arg(&c.consumer)
            .arg(millis(c.claim_idle))
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.commands)
            .await
            .map_err(|e| {
                if is_no_group(&e) {
                    AutoClaimError::Gone(e)
                } else {
                    AutoClaimError::Failed(redis_error("claiming idle entries", e))
                }
            })?;
        self.claim_cursor = reply.next_stream_id;
        if reply.claimed.is_empty() {
            return Ok(Vec::new());
        }
        let counts = self
            .delivery_counts(&reply.claimed)
            .await
            .unwrap_or_default();
        Ok(reply
            .claimed
            .into_iter()
            .map(|e| {
                let count = counts.get(&e.id).copied().unwrap_or(2);
                self.convert(e, count)
            })
            .collect())
    }

    /// The delivery counts of exactly `entries`: one `XPENDING <id> <id> 1` per entry, in one
    /// pipeline. (One range query from the first id to the last would also return other entries
    /// pending for this consumer in between, and with `COUNT` = the number claimed, miss some of
    /// the claimed ones.)
    async fn delivery_counts(
        &mut self,
        entries: &[StreamId],
    ) -> Result<HashMap<String, u32>, BrokerError> {
        if entries.is_empty() {
            return Ok(HashMap::new());
        }
        let c = &self.config;
        let mut pipe = redis::pipe();
        for e in entries {
            pipe.cmd("XPENDING")
                .arg(&c.stream)
                .arg(&c.group)
                .arg(&e.id)
                .arg(&e.id)
                .arg(1)
                .arg(&c.consumer);
        }
        let replies: Vec<StreamPendingCountReply> = pipe
            .query_async(&mut self.commands)
            .await
            .map_err(|e| redis_error("reading delivery counts", e))?;
        Ok(replies
            .into_iter()
            .flat_map(|r| r.ids)
            .map(|p| (p.id, u32::try_from(p.times_delivered).unwrap_or(u32::MAX)))
            .collect())
    }
}

/// Creates the consumer group at the start of the stream (creating the stream) unless it
/// exists.
async fn create_group(
    commands: &mut ConnectionManager,
    config: &RedisStreamConfig,
) -> Result<(), BrokerError> {
    let created: Result<(), _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&config.stream)
        .arg(&config.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(commands)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(redis_error("creating the consumer group", e)),
    }
}

/// Why `XAUTOCLAIM` failed.
enum AutoClaimError {
    /// The group is gone (`NOGROUP`).
    Gone(redis::RedisError),
    /// Anything else.
    Failed(BrokerError),
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Source for RedisStreamSource {
    type Delivery = RedisStreamDelivery;
    type Acker = RedisStreamAcker;

    fn acker(&self) -> RedisStreamAcker {
        RedisStreamAcker {
            config: Arc::clone(&self.config),
            commands: self.commands.clone(),
        }
    }

    async fn receive(
        &mut self,
        max: usize,
    ) -> Result<Vec<Incoming<RedisStreamDelivery>>, BrokerError> {
        let max = max.max(1);
        if Instant::now() >= self.next_claim {
            let claimed = match self.claim(max).await {
                Ok(claimed) => claimed,
                Err(AutoClaimError::Gone(e)) => {
                    self.recreate_group(e).await?;
                    return Ok(Vec::new());
                }
                Err(AutoClaimError::Failed(e)) => return Err(e),
            };
            // Keep claiming while there is a backlog of idle entries; otherwise wait a while.
            if claimed.len() < max {
                self.next_claim = Instant::now() + self.config.claim_interval;
            }
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        let c = &self.config;
        let block = self
            .next_claim
            .saturating_duration_since(Instant::now())
            .min(c.block)
            .max(Duration::from_millis(1));
        let read: Result<Option<StreamReadReply>, _> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&c.group)
            .arg(&c.consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(millis(block))
            .arg("STREAMS")
            .arg(&c.stream)
            .arg(">")
            .query_async(&mut self.reader)
            .await;
        let reply = match read {
            Ok(reply) => reply,
            Err(e) if is_no_group(&e) => {
                self.recreate_group(e).await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(redis_error("reading the stream", e)),
        };
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|e| self.convert(e, 1))
            .collect())
    }

    async fn close(self) {
        // Pending entries stay in the group's PEL; another consumer claims them after
        // `claim_idle`.
    }
}

impl RedisStreamAcker {
    /// `XCLAIM` to this consumer with the given idle time, without raising delivery counts.
    async fn set_idle(&self, ids: &[&str], idle: Duration) -> Result<(), BrokerError> {
        let c = &self.config;
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&c.stream).arg(&c.group).arg(&c.consumer).arg(0);
        for id in ids {
            cmd.arg(*id);
        }
        cmd.arg("IDLE").arg(millis(idle)).arg("JUSTID");
        let _: redis::Value = cmd
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|e| redis_error("resetting idle time", e))?;
        Ok(())
    }
}

impl Acker for RedisStreamAcker {
    type Delivery = RedisStreamDelivery;

    async fn ack(&self, deliveries: Vec<RedisStreamDelivery>) -> Result<(), BrokerError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.config.stream).arg(&self.config.group);
        for d in &deliveries {
            cmd.arg(&d.id);
        }
        let _: i64 = cmd
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|e| redis_error("acking", e))?;
        Ok(())
    }

    async fn nack(
        &self,
        delivery: RedisStreamDelivery,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        // Claimable again once its idle time reaches claim_idle, i.e. after `delay`.
        let idle = self.config.claim_idle.saturating_sub(delay);
        self.set_idle(&[delivery.id.as_str()], idle).await
    }

    async fn dead_letter(
        &self,
        delivery: RedisStreamDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let c = &self.config;
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&c.dead_letter_stream)
            .arg("*")
            .arg(PAYLOAD_FIELD)
            .arg(&message.payload()[..])
            .arg(header::DEAD_LETTER_REASON)
            .arg(reason)
            .arg(header::DEAD_LETTER_ORIGIN)
            .arg(message.origin())
            .arg(ORIGINAL_ID_FIELD)
            .arg(&delivery.id);
        for (name, value) in message.headers() {
            xadd.arg(name).arg(value);
        }
        // Both or neither: the dead letter is never lost, and never written without the ack.
        let _: redis::Value = redis::pipe()
            .atomic()
            .add_command(xadd)
            .cmd("XACK")
            .arg(&c.stream)
            .arg(&c.group)
            .arg(&delivery.id)
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|e| redis_error("dead-lettering", e))?;
        Ok(())
    }

    async fn progress(&self, deliveries: &[&RedisStreamDelivery]) -> Result<(), BrokerError> {
        let ids: Vec<&str> = deliveries.iter().map(|d| d.id.as_str()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.set_idle(&ids, Duration::ZERO).await
    }

    fn progress_interval(&self) -> Option<Duration> {
        Some(self.config.claim_idle / 3)
    }
}
