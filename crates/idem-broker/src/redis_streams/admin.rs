//! [`RedisStreamAdmin`]: the backlog of a consumer group, its dead letters in
//! `<stream>:dead-letter`, and its clean-up. See [`Admin`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;

use super::source::manager;
use super::{ORIGINAL_ID_FIELD, PAYLOAD_FIELD, RedisStreamConfig, redis_error};
use crate::admin::{Admin, DeadLetter, Locator, check_reader, is_dead_letter_header, next_reader};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::{Message, header};

/// Operations on the stream and consumer group of a [`RedisStreamConfig`] and its dead-letter
/// stream.
///
/// The backlog is what the group has not acked: its pending entries plus the entries past its
/// last delivered id. Dead letters are read with `XRANGE`, oldest first; a republished one is
/// appended to the stream it came from (`XADD` with its `message-id`, payload and fields) and
/// removed from the dead-letter stream (`XDEL`) in one `MULTI`/`EXEC`: both or neither.
pub struct RedisStreamAdmin {
    config: Arc<RedisStreamConfig>,
    commands: ConnectionManager,
    /// The last dead-letter entry id read.
    cursor: Mutex<Option<String>>,
    reader: u64,
}

impl std::fmt::Debug for RedisStreamAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamAdmin")
            .field("stream", &self.config.stream)
            .field("group", &self.config.group)
            .finish_non_exhaustive()
    }
}

impl RedisStreamAdmin {
    /// Connects. Creates nothing.
    ///
    /// # Errors
    /// Redis is unreachable or the URL is wrong.
    pub async fn connect(url: &str, config: RedisStreamConfig) -> Result<Self, BrokerError> {
        Ok(Self {
            commands: manager(url, Duration::from_secs(5)).await?,
            config: Arc::new(config),
            cursor: Mutex::new(None),
            reader: next_reader(),
        })
    }

    fn dead_letter(&self, id: String, fields: Vec<(String, Bytes)>) -> DeadLetter {
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        let mut payload = Bytes::new();
        let mut message_id = None;
        let mut reason = None;
        let mut origin = None;
        let mut headers = Vec::new();
        for (field, value) in fields {
            if field == PAYLOAD_FIELD {
                payload = value;
            } else if field == header::DEAD_LETTER_REASON {
                reason = Some(text(&value));
            } else if field == header::DEAD_LETTER_ORIGIN {
                origin = Some(text(&value));
            } else if field != ORIGINAL_ID_FIELD && !is_dead_letter_header(&field) {
                if field == header::MESSAGE_ID {
                    message_id = Some(text(&value));
                }
                headers.push((field, value));
            }
        }
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        let origin = origin.unwrap_or_else(|| self.config.stream.clone());
        let mut message = Message::new(origin, payload);
        if let Some(id) = message_id {
            message = message.with_message_id(id);
        }
        for (name, value) in headers {
            message = message.with_header(name, value);
        }
        DeadLetter::new(message, reason, Locator::Entry(id), self.reader)
    }
}

/// The bytes of a field value.
fn bytes_of(value: redis::Value) -> Option<Bytes> {
    Some(match value {
        redis::Value::BulkString(b) => Bytes::from(b),
        redis::Value::SimpleString(s) => Bytes::from(s),
        redis::Value::Int(n) => Bytes::from(n.to_string()),
        _ => return None,
    })
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

impl Admin for RedisStreamAdmin {
    async fn backlog(&self) -> Result<Option<u64>, BrokerError> {
        let c = &self.config;
        let mut conn = self.commands.clone();
        // XPENDING's summary: [count, first id, last id, consumers].
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(&c.stream)
            .arg(&c.group)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("XPENDING", e))?;
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
            .arg(&c.stream)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("XINFO GROUPS", e))?;
        let last = field_of_group(&groups, &c.group, "last-delivered-id").ok_or_else(|| {
            BrokerError::new(
                BrokerErrorKind::Config,
                format!(
                    "the consumer group {:?} of stream {:?} is missing",
                    c.group, c.stream
                ),
            )
        })?;
        let undelivered: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg(&c.stream)
            .arg(format!("({last}"))
            .arg("+")
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("XRANGE", e))?;
        Ok(Some(pending + undelivered.len() as u64))
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let from = match self.cursor.lock().as_deref() {
            Some(last) => format!("({last}"),
            None => "-".to_owned(),
        };
        let entries: Vec<(String, Vec<(String, redis::Value)>)> = redis::cmd("XRANGE")
            .arg(&self.config.dead_letter_stream)
            .arg(from)
            .arg("+")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|e| redis_error("reading the dead-letter stream", e))?;
        if let Some((last, _)) = entries.last() {
            *self.cursor.lock() = Some(last.clone());
        }
        Ok(entries
            .into_iter()
            .map(|(id, fields)| {
                let fields = fields
                    .into_iter()
                    .filter_map(|(f, v)| Some((f, bytes_of(v)?)))
                    .collect();
                self.dead_letter(id, fields)
            })
            .collect())
    }

    async fn republish(&self, dead_letter: DeadLetter) -> Result<(), BrokerError> {
        check_reader(&dead_letter, self.reader)?;
        let Locator::Entry(entry) = &dead_letter.locator else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not a Redis Streams dead letter",
            ));
        };
        let message = dead_letter.message();
        let mut xadd = redis::cmd("XADD");
        xadd.arg(message.origin()).arg("*");
        if let Some(id) = message.message_id() {
            xadd.arg(header::MESSAGE_ID).arg(id);
        }
        xadd.arg(PAYLOAD_FIELD).arg(&message.payload()[..]);
        for (name, value) in message.headers() {
            if name != header::MESSAGE_ID {
                xadd.arg(name).arg(value);
            }
        }
        let (_, deleted): (String, i64) = redis::pipe()
            .atomic()
            .add_command(xadd)
            .cmd("XDEL")
            .arg(&self.config.dead_letter_stream)
            .arg(entry)
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|e| redis_error("republishing a dead letter", e))?;
        if deleted == 0 {
            tracing::warn!(
                entry = %entry,
                stream = %self.config.dead_letter_stream,
                "the republished dead letter was already gone from the dead-letter stream"
            );
        }
        Ok(())
    }

    async fn cleanup(&self) -> Result<(), BrokerError> {
        let _: i64 = redis::cmd("DEL")
            .arg(&self.config.stream)
            .arg(&self.config.dead_letter_stream)
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|e| redis_error("deleting the streams", e))?;
        Ok(())
    }
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
