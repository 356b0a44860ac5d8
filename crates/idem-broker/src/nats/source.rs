//! [`NatsSource`]: a durable pull consumer read as a stream; [`NatsAcker`]: AckSync acks, delayed
//! `Nak`s, `+WPI` progress, confirmed dead letters.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::message::{AckKind, Acker as JsAcker};
use async_nats::jetstream::{self, stream};
use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt};

use super::{NatsConfig, nats_boxed, nats_error};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::{Message, header};
use crate::source::{Acker, Incoming, Source};

/// Consumes a JetStream stream through a durable pull consumer. See the [module docs](super).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::nats::{NatsConfig, NatsSource};
/// let source = NatsSource::connect("nats://127.0.0.1:4222", NatsConfig::new("ORDERS", "orders.>", "billing")).await?;
/// # let _ = source; Ok(()) }
/// ```
pub struct NatsSource {
    config: Arc<NatsConfig>,
    js: jetstream::Context,
    consumer: PullConsumer,
    messages: Option<pull::Stream>,
    origin: Arc<str>,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("stream", &self.config.stream)
            .field("consumer", &self.config.consumer)
            .finish_non_exhaustive()
    }
}

/// One JetStream delivery: its ack handle, reply subject, stream sequence and subject.
pub struct NatsDelivery {
    acker: JsAcker,
    reply: Option<async_nats::Subject>,
    sequence: u64,
    subject: async_nats::Subject,
}

impl std::fmt::Debug for NatsDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDelivery")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// Settles [`NatsSource`] deliveries.
#[derive(Clone)]
pub struct NatsAcker {
    config: Arc<NatsConfig>,
    js: jetstream::Context,
    client: async_nats::Client,
}

impl std::fmt::Debug for NatsAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAcker")
            .field("dead_letter_subject", &self.config.dead_letter_subject)
            .finish_non_exhaustive()
    }
}

/// Connects to NATS; the client reconnects by itself after that.
pub(super) async fn client(url: &str) -> Result<async_nats::Client, BrokerError> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| nats_error(&format!("connecting to {}", redact(url)), e))
}

impl NatsSource {
    /// Connects, declares the stream, the dead-letter stream and the durable consumer (unless
    /// `config.declare` is false), and prepares to pull.
    ///
    /// # Errors
    /// A [`BrokerError`] when the server is unreachable, JetStream is off, or the stream or
    /// consumer cannot be created.
    pub async fn connect(url: &str, config: NatsConfig) -> Result<Self, BrokerError> {
        let js = jetstream::new(client(url).await?);
        if config.declare {
            js.get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: config.subjects.clone(),
                duplicate_window: config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| config_error("declaring the stream", e))?;
            js.get_or_create_stream(stream::Config {
                name: config.dead_letter_stream.clone(),
                subjects: vec![config.dead_letter_subject.clone()],
                ..Default::default()
            })
            .await
            .map_err(|e| config_error("declaring the dead-letter stream", e))?;
        }
        let stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| config_error("finding the stream", e))?;
        let consumer_config = pull::Config {
            durable_name: Some(config.consumer.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_ack_pending: config.max_ack_pending,
            ..Default::default()
        };
        let consumer: PullConsumer = if config.declare {
            stream
                .get_or_create_consumer(&config.consumer, consumer_config)
                .await
                .map_err(|e| config_error("declaring the consumer", e))?
        } else {
            stream.get_consumer(&config.consumer).await.map_err(|e| {
                BrokerError::new(
                    BrokerErrorKind::Config,
                    format!("finding the consumer: {e}"),
                )
                .with_source(e)
            })?
        };
        tracing::info!(stream = %config.stream, consumer = %config.consumer, url = %redact(url), "consuming");
        Ok(Self {
            origin: config.stream.as_str().into(),
            config: Arc::new(config),
            js,
            consumer,
            messages: None,
        })
    }

    fn convert(&self, m: jetstream::Message) -> Incoming<NatsDelivery> {
        let (delivered, sequence) = m
            .info()
            .map(|i| {
                (
                    u32::try_from(i.delivered).unwrap_or(u32::MAX),
                    i.stream_sequence,
                )
            })
            .unwrap_or((1, 0));
        let reply = m.reply.clone();
        let subject = m.subject.clone();
        let (msg, acker) = m.split();
        let mut message = Message::new(Arc::clone(&self.origin), msg.payload);
        if let Some(headers) = &msg.headers {
            if let Some(id) = headers.get("Nats-Msg-Id") {
                message = message.with_message_id(id.as_str());
            }
            for (name, values) in headers.iter() {
                for v in values {
                    message = message.with_header(name.to_string(), v.as_str().to_owned());
                }
            }
        }
        Incoming::new(
            message.with_delivery_count(delivered),
            NatsDelivery {
                acker,
                reply,
                sequence,
                subject,
            },
        )
    }
}

/// Setup failures: a wrong stream or consumer setting is not fixed by retrying.
fn config_error<E>(what: &str, e: E) -> BrokerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let mut err = nats_error(what, e);
    if err.kind() == crate::BrokerErrorKind::Connection {
        err = BrokerError::new(BrokerErrorKind::Config, err.message().to_owned()).with_source(err);
    }
    err
}

impl Source for NatsSource {
    type Delivery = NatsDelivery;
    type Acker = NatsAcker;

    fn acker(&self) -> NatsAcker {
        NatsAcker {
            config: Arc::clone(&self.config),
            js: self.js.clone(),
            client: self.js.client(),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<NatsDelivery>>, BrokerError> {
        if self.messages.is_none() {
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(self.config.pull_batch.max(1))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .map_err(|e| nats_error("starting to pull", e))?;
            self.messages = Some(stream);
        }
        let Some(messages) = self.messages.as_mut() else {
            return Err(BrokerError::new(
                BrokerErrorKind::Connection,
                "no pull stream",
            ));
        };
        let first = match messages.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                self.messages = None;
                return Err(nats_error("pulling", e));
            }
            None => {
                self.messages = None;
                return Err(BrokerError::new(
                    BrokerErrorKind::Connection,
                    "the pull stream ended",
                ));
            }
        };
        let mut raw = vec![first];
        while raw.len() < max {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => raw.push(m),
                _ => break,
            }
        }
        Ok(raw.into_iter().map(|m| self.convert(m)).collect())
    }

    async fn close(self) {
        // Unacked deliveries are redelivered after the ack wait; flush sends the Naks and acks
        // already queued on the connection.
        let _ = self.js.client().flush().await;
    }
}

impl NatsAcker {
    /// AckSync as a request on the client's shared reply inbox: the server confirms the ack
    /// like for `double_ack`, which subscribes a new inbox for every ack (two extra protocol
    /// operations per message, on the client and on the server).
    async fn ack_sync(&self, d: &NatsDelivery) -> Result<(), BrokerError> {
        let reply = d.reply.clone().ok_or_else(|| {
            BrokerError::new(crate::BrokerErrorKind::Protocol, "no reply subject to ack")
        })?;
        self.client
            .request(reply, bytes::Bytes::from_static(b"+ACK"))
            .await
            .map(drop)
            .map_err(|e| nats_error("acking", e))
    }
}

impl Acker for NatsAcker {
    type Delivery = NatsDelivery;

    async fn ack(&self, deliveries: Vec<NatsDelivery>) -> Result<(), BrokerError> {
        // AckSync: each ack waits for the server's confirmation; all in flight at once.
        let results = join_all(deliveries.iter().map(|d| self.ack_sync(d))).await;
        results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }

    async fn nack(&self, delivery: NatsDelivery, delay: Duration) -> Result<(), BrokerError> {
        let delay = (!delay.is_zero()).then_some(delay);
        delivery
            .acker
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(|e| nats_boxed("nacking", e))
    }

    async fn dead_letter(
        &self,
        delivery: NatsDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut publish = Publish::build()
            .payload(message.payload().clone())
            .header(header::DEAD_LETTER_REASON, reason)
            .header(header::DEAD_LETTER_ORIGIN, message.origin())
            .header(header::DEAD_LETTER_SUBJECT, delivery.subject.as_str());
        for (name, value) in message.headers() {
            if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                continue;
            }
            if let Ok(v) = std::str::from_utf8(value) {
                publish = publish.header(name, v);
            }
        }
        if let Some(id) = message.message_id() {
            publish = publish.header(header::MESSAGE_ID, id);
        }
        // A retried dead-letter publish of the same delivery is dropped by the DLQ stream.
        let publish =
            publish.message_id(format!("dlq:{}:{}", self.config.stream, delivery.sequence));
        let published = async {
            self.js
                .send_publish(self.config.dead_letter_subject.clone(), publish)
                .await
                .map_err(|e| nats_error("publishing a dead letter", e))?
                .await
                .map_err(|e| nats_error("confirming a dead letter", e))
        }
        .await;
        if let Err(e) = published {
            // Not acked; redelivered a little later to be dead-lettered again.
            let _ = self.nack(delivery, Duration::from_secs(1)).await;
            return Err(e);
        }
        self.ack_sync(&delivery).await
    }

    async fn progress(&self, deliveries: &[&NatsDelivery]) -> Result<(), BrokerError> {
        let results = join_all(
            deliveries
                .iter()
                .map(|d| d.acker.ack_with(AckKind::Progress)),
        )
        .await;
        match results.into_iter().find_map(Result::err) {
            Some(e) => Err(nats_boxed("reporting progress", e)),
            None => Ok(()),
        }
    }

    fn progress_interval(&self) -> Option<Duration> {
        Some(self.config.ack_wait / 3)
    }
}
