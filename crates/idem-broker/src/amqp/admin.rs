//! [`AmqpAdmin`]: the backlog of a RabbitMQ queue, its dead letters in `<queue>.dlq`, and its
//! clean-up. See [`Admin`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use super::source::{as_bytes, confirm_channel};
use super::{AmqpConfig, CONTENT_TYPE_HEADER, amqp_error, connect_error, short};
use crate::admin::{Admin, DeadLetter, Locator, check_reader, is_dead_letter_header, next_reader};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::{Message, header};

/// Operations on the queue of an [`AmqpConfig`] and its dead-letter queue and exchange.
///
/// Dead letters are read with `basic.get` (manual ack) from the dead-letter queue and stay
/// unacked on this admin's channel until [`republish`](Admin::republish)ed (then acked) or until
/// the admin is closed (then RabbitMQ requeues them). A republished dead letter goes to the
/// queue through the default exchange, persistent, with its `message_id`, content type and
/// headers, mandatory and confirmed.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_broker::BrokerError> {
/// use idem_broker::Admin;
/// use idem_broker::amqp::{AmqpConfig, admin::AmqpAdmin};
/// let admin = AmqpAdmin::connect("amqp://guest:guest@127.0.0.1:5672/%2f", AmqpConfig::new("orders")).await?;
/// for dead in admin.dead_letters(10).await? {
///     println!("{:?}: {:?}", dead.message().message_id(), dead.reason());
///     admin.republish(dead).await?; // back to "orders", same message id
/// }
/// admin.close().await;
/// # Ok(()) }
/// ```
pub struct AmqpAdmin {
    config: Arc<AmqpConfig>,
    url: String,
    connection: Connection,
    /// Confirm mode: dead letters are read, republished and acked on it.
    channel: Channel,
    reader: u64,
}

impl std::fmt::Debug for AmqpAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpAdmin")
            .field("url", &redact(&self.url))
            .field("queue", &self.config.queue)
            .finish_non_exhaustive()
    }
}

/// How long a publish waits for its confirmation.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

impl AmqpAdmin {
    /// Connects. Declares nothing.
    ///
    /// # Errors
    /// The broker is unreachable or refuses the credentials.
    pub async fn connect(url: &str, config: AmqpConfig) -> Result<Self, BrokerError> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| connect_error(url, e))?;
        let channel = confirm_channel(&connection).await?;
        Ok(Self {
            config: Arc::new(config),
            url: url.to_owned(),
            connection,
            channel,
            reader: next_reader(),
        })
    }

    /// A dead letter from a `basic.get` delivery.
    fn dead_letter(&self, d: lapin::message::Delivery) -> DeadLetter {
        let props = &d.properties;
        let mut origin = None;
        let mut reason = None;
        let mut broker_reason = None;
        let mut headers = Vec::new();
        if let Some(table) = props.headers() {
            for (name, value) in table {
                let name = name.as_str();
                let text = || as_bytes(value).map(|b| String::from_utf8_lossy(&b).into_owned());
                if name.eq_ignore_ascii_case(header::DEAD_LETTER_REASON) {
                    reason = text();
                } else if name.eq_ignore_ascii_case(header::DEAD_LETTER_ORIGIN) {
                    origin = text();
                } else if name == "x-first-death-reason" {
                    broker_reason = text();
                } else if name == "x-death" && broker_reason.is_none() {
                    broker_reason = first_death_reason(value);
                }
                // The content type travels as the property too (read below).
                let content_type = name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER)
                    && props.content_type().is_some();
                if is_dead_letter_header(name) || is_broker_header(name) || content_type {
                    continue;
                }
                if let Some(v) = as_bytes(value) {
                    headers.push((name.to_owned(), v));
                }
            }
        }
        let origin = origin.unwrap_or_else(|| self.config.queue.clone());
        let mut message = Message::new(origin, Bytes::from(d.data));
        if let Some(id) = props.message_id() {
            message = message.with_message_id(id.as_str());
        }
        if let Some(content_type) = props.content_type() {
            message = message.with_header(
                CONTENT_TYPE_HEADER,
                Bytes::copy_from_slice(content_type.as_str().as_bytes()),
            );
        }
        for (name, value) in headers {
            message = message.with_header(name, value);
        }
        let reason = reason.or_else(|| broker_reason.map(|r| format!("rabbitmq: {r}")));
        DeadLetter::new(message, reason, Locator::Tag(d.delivery_tag), self.reader)
    }

    async fn publish(&self, queue: &str, message: &Message) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        for (name, value) in message.headers() {
            if name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
                continue;
            }
            if let Ok(name) = lapin::types::ShortString::try_new(name) {
                headers.insert(name, AMQPValue::LongString(LongString::from(value)));
            }
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = message.message_id() {
            props = props.with_message_id(short(id)?);
        }
        if let Some(content_type) = message
            .header(CONTENT_TYPE_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| short(v).ok())
        {
            props = props.with_content_type(content_type);
        }
        let confirm = async {
            self.channel
                .basic_publish(
                    short("")?,
                    short(queue)?,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    message.payload(),
                    props,
                )
                .await
                .map_err(|e| amqp_error("republishing a dead letter", e))?
                .await
                .map_err(|e| amqp_error("confirming a republished dead letter", e))
        };
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::new(
                    BrokerErrorKind::Timeout,
                    "no confirmation of the republished dead letter in time",
                ))
            })?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::new(
                BrokerErrorKind::Config,
                format!("unroutable: no queue {queue:?} to republish the dead letter to"),
            )),
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(BrokerError::new(
                BrokerErrorKind::Rejected,
                "the broker nacked the republished dead letter",
            )),
        }
    }

    /// A channel for one operation that may fail at the protocol level (which closes it).
    async fn scratch_channel(&self) -> Result<Channel, BrokerError> {
        self.connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("opening a channel", e))
    }
}

/// Headers RabbitMQ itself writes when it dead-letters or counts deliveries: not the message's.
fn is_broker_header(name: &str) -> bool {
    name == "x-death"
        || name == "x-delivery-count"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// The `reason` of the first entry of an `x-death` header.
fn first_death_reason(value: &AMQPValue) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = value else {
        return None;
    };
    deaths.as_slice().iter().find_map(|death| match death {
        AMQPValue::FieldTable(t) => t.inner().iter().find_map(|(k, v)| {
            (k.as_str() == "reason")
                .then(|| as_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned()))
                .flatten()
        }),
        _ => None,
    })
}

impl Admin for AmqpAdmin {
    async fn backlog(&self) -> Result<Option<u64>, BrokerError> {
        let channel = self.scratch_channel().await?;
        let queue = channel
            .queue_declare(
                short(&self.config.queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error(&format!("reading queue {:?}", self.config.queue), e))?;
        let _ = channel.close(200, "".into()).await;
        Ok(Some(u64::from(queue.message_count())))
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let queue = short(&self.config.dead_letter_queue)?;
        let mut out = Vec::new();
        while out.len() < max {
            let got = self
                .channel
                .basic_get(queue.clone(), BasicGetOptions { no_ack: false })
                .await
                .map_err(|e| {
                    amqp_error(
                        &format!(
                            "reading dead-letter queue {:?}",
                            self.config.dead_letter_queue
                        ),
                        e,
                    )
                })?;
            let Some(got) = got else { break };
            out.push(self.dead_letter(got.delivery));
        }
        Ok(out)
    }

    async fn republish(&self, dead_letter: DeadLetter) -> Result<(), BrokerError> {
        check_reader(&dead_letter, self.reader)?;
        let Locator::Tag(tag) = dead_letter.locator else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not a RabbitMQ dead letter",
            ));
        };
        let message = dead_letter.message();
        self.publish(message.origin(), message).await?;
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: false })
            .await
            .map_err(|e| amqp_error("removing the republished dead letter", e))
    }

    async fn cleanup(&self) -> Result<(), BrokerError> {
        // Deleting what does not exist is not an error in RabbitMQ.
        let channel = self.scratch_channel().await?;
        for queue in [&self.config.queue, &self.config.dead_letter_queue] {
            channel
                .queue_delete(short(queue)?, QueueDeleteOptions::default())
                .await
                .map_err(|e| amqp_error(&format!("deleting queue {queue:?}"), e))?;
        }
        channel
            .exchange_delete(
                short(&self.config.dead_letter_exchange)?,
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
            .map_err(|e| {
                amqp_error(
                    &format!("deleting exchange {:?}", self.config.dead_letter_exchange),
                    e,
                )
            })?;
        let _ = channel.close(200, "".into()).await;
        Ok(())
    }

    async fn close(self) {
        // Dead letters read and not republished are requeued by the broker.
        let _ = self.connection.close(200, "idem admin done".into()).await;
    }
}
