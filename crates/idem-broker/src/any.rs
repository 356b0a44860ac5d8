//! [`AnySource`], [`AnyAcker`], [`AnyDelivery`]: any [`Source`] behind one type, chosen at run
//! time (type-erased like [`idem::AnyStore`]); [`AnyProducer`]: any adapter's producer.

// Without any adapter the enums below have no variant: what would use the arguments is gone.
#![cfg_attr(
    not(any(
        feature = "amqp",
        feature = "nats",
        feature = "mqtt",
        feature = "redis-streams",
        feature = "kafka",
        feature = "stomp",
        feature = "rocketmq"
    )),
    allow(unused_variables, unreachable_code, dead_code)
)]

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::Message;
use crate::producer::Outgoing;
use crate::source::{Acker, Incoming, Source};
use crate::url::{BrokerKind, BrokerUrl};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A delivery of an [`AnySource`]: the adapter's own delivery, boxed. Only the acker of the
/// source that received it can settle it.
pub struct AnyDelivery(Box<dyn Any + Send + Sync>);

impl fmt::Debug for AnyDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AnyDelivery")
    }
}

fn foreign() -> BrokerError {
    BrokerError::new(
        BrokerErrorKind::Protocol,
        "a delivery of another source cannot be settled here",
    )
}

impl AnyDelivery {
    fn into_inner<D: Send + Sync + 'static>(self) -> Result<D, BrokerError> {
        self.0.downcast::<D>().map(|d| *d).map_err(|_| foreign())
    }

    fn inner<D: Send + Sync + 'static>(&self) -> Result<&D, BrokerError> {
        self.0.downcast_ref::<D>().ok_or_else(foreign)
    }
}

/// The object-safe mirror of [`Source`].
trait DynSource: Send + 'static {
    fn acker(&self) -> AnyAcker;
    fn receive(
        &mut self,
        max: usize,
    ) -> BoxFuture<'_, Result<Vec<Incoming<AnyDelivery>>, BrokerError>>;
    fn close(self: Box<Self>) -> BoxFuture<'static, ()>;
}

impl<S: Source> DynSource for S {
    fn acker(&self) -> AnyAcker {
        AnyAcker(Arc::new(Source::acker(self)))
    }

    fn receive(
        &mut self,
        max: usize,
    ) -> BoxFuture<'_, Result<Vec<Incoming<AnyDelivery>>, BrokerError>> {
        Box::pin(async move {
            let batch = Source::receive(self, max).await?;
            Ok(batch
                .into_iter()
                .map(|i| Incoming::new(i.message, AnyDelivery(Box::new(i.delivery))))
                .collect())
        })
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(Source::close(*self))
    }
}

/// Any [`Source`] behind one type, chosen at run time: what
/// [`SourceConfig::connect`](crate::SourceConfig::connect) returns, and what a tool hands to [`Consumer`](crate::Consumer)
/// whatever the broker. Costs a boxed future per call and a box per delivery; code that knows
/// its broker at compile time should use the adapter directly.
///
/// ```
/// use idem_broker::AnySource;
/// use idem_broker::memory::MemoryBroker;
/// let source = AnySource::new(MemoryBroker::new("orders").source());
/// # let _ = source;
/// ```
pub struct AnySource {
    inner: Box<dyn DynSource>,
    name: &'static str,
}

impl AnySource {
    /// Erases the type of `source`.
    pub fn new<S: Source>(source: S) -> Self {
        Self {
            inner: Box::new(source),
            name: std::any::type_name::<S>()
                .rsplit("::")
                .next()
                .unwrap_or("source"),
        }
    }

    /// The type name of the source inside, for logs.
    pub fn type_name(&self) -> &str {
        self.name
    }
}

impl fmt::Debug for AnySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AnySource").field(&self.name).finish()
    }
}

impl Source for AnySource {
    type Delivery = AnyDelivery;
    type Acker = AnyAcker;

    fn acker(&self) -> AnyAcker {
        self.inner.acker()
    }

    fn receive(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Incoming<AnyDelivery>>, BrokerError>> + Send {
        self.inner.receive(max)
    }

    fn close(self) -> impl Future<Output = ()> + Send {
        self.inner.close()
    }
}

/// The object-safe mirror of [`Acker`].
trait DynAcker: Send + Sync + 'static {
    fn ack(&self, deliveries: Vec<AnyDelivery>) -> BoxFuture<'_, Result<(), BrokerError>>;
    fn nack(
        &self,
        delivery: AnyDelivery,
        delay: Duration,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;
    fn dead_letter<'a>(
        &'a self,
        delivery: AnyDelivery,
        message: &'a Message,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    fn progress<'a>(
        &'a self,
        deliveries: &'a [&'a AnyDelivery],
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    fn progress_interval(&self) -> Option<Duration>;
}

impl<A: Acker> DynAcker for A {
    fn ack(&self, deliveries: Vec<AnyDelivery>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let deliveries = deliveries
                .into_iter()
                .map(AnyDelivery::into_inner::<A::Delivery>)
                .collect::<Result<Vec<_>, _>>()?;
            Acker::ack(self, deliveries).await
        })
    }

    fn nack(
        &self,
        delivery: AnyDelivery,
        delay: Duration,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { Acker::nack(self, delivery.into_inner()?, delay).await })
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: AnyDelivery,
        message: &'a Message,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(
            async move { Acker::dead_letter(self, delivery.into_inner()?, message, reason).await },
        )
    }

    fn progress<'a>(
        &'a self,
        deliveries: &'a [&'a AnyDelivery],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let deliveries = deliveries
                .iter()
                .map(|d| d.inner::<A::Delivery>())
                .collect::<Result<Vec<_>, _>>()?;
            Acker::progress(self, &deliveries).await
        })
    }

    fn progress_interval(&self) -> Option<Duration> {
        Acker::progress_interval(self)
    }
}

/// Settles the deliveries of an [`AnySource`]. Clones share the adapter's acker.
#[derive(Clone)]
pub struct AnyAcker(Arc<dyn DynAcker>);

impl fmt::Debug for AnyAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AnyAcker")
    }
}

impl Acker for AnyAcker {
    type Delivery = AnyDelivery;

    fn ack(
        &self,
        deliveries: Vec<AnyDelivery>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        self.0.ack(deliveries)
    }

    fn nack(
        &self,
        delivery: AnyDelivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        self.0.nack(delivery, delay)
    }

    // `async fn`: the boxed future borrows `self`, `message` and `reason` for one lifetime,
    // which the future returned must not tie together.
    async fn dead_letter(
        &self,
        delivery: AnyDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        self.0.dead_letter(delivery, message, reason).await
    }

    async fn progress(&self, deliveries: &[&AnyDelivery]) -> Result<(), BrokerError> {
        self.0.progress(deliveries).await
    }

    fn progress_interval(&self) -> Option<Duration> {
        self.0.progress_interval()
    }
}

/// What the broker answered to a publish of an [`AnyProducer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// The broker recognised the message id and did not store the message again (NATS
    /// JetStream within its duplicate window; the other brokers have no publish dedup).
    pub duplicate: bool,
}

/// Any adapter's producer, chosen by a [`BrokerUrl`]: publishes an [`Outgoing`] to a
/// destination, the queue (RabbitMQ, through the default exchange; ActiveMQ), subject (NATS),
/// topic (MQTT, Kafka, RocketMQ) or stream key (Redis), and waits for the broker's
/// confirmation.
pub struct AnyProducer {
    inner: Producer,
}

enum Producer {
    #[cfg(feature = "amqp")]
    Amqp(crate::amqp::AmqpProducer),
    #[cfg(feature = "nats")]
    Nats(crate::nats::NatsProducer),
    #[cfg(feature = "mqtt")]
    Mqtt(crate::mqtt::MqttProducer),
    #[cfg(feature = "redis-streams")]
    Redis(crate::redis_streams::RedisStreamProducer),
    #[cfg(feature = "kafka")]
    Kafka(crate::kafka::KafkaProducer),
    #[cfg(feature = "stomp")]
    Stomp(crate::stomp::StompProducer),
    #[cfg(feature = "rocketmq")]
    RocketMq(crate::rocketmq::RocketMqProducer),
}

impl fmt::Debug for AnyProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AnyProducer").field(&self.kind()).finish()
    }
}

impl AnyProducer {
    /// Connects the producer of `url`'s broker.
    ///
    /// # Errors
    /// The broker is unreachable or refuses the credentials, or its adapter is not built.
    pub async fn connect(url: &BrokerUrl) -> Result<Self, BrokerError> {
        let to = url.expose();
        let inner = match url.kind() {
            #[cfg(feature = "amqp")]
            BrokerKind::Amqp => Producer::Amqp(crate::amqp::AmqpProducer::connect(to).await?),
            #[cfg(feature = "nats")]
            BrokerKind::Nats => Producer::Nats(crate::nats::NatsProducer::connect(to).await?),
            #[cfg(feature = "mqtt")]
            BrokerKind::Mqtt => Producer::Mqtt(crate::mqtt::MqttProducer::connect(to).await?),
            #[cfg(feature = "redis-streams")]
            BrokerKind::Redis => {
                Producer::Redis(crate::redis_streams::RedisStreamProducer::connect(to).await?)
            }
            #[cfg(feature = "kafka")]
            BrokerKind::Kafka => Producer::Kafka(crate::kafka::KafkaProducer::connect(to).await?),
            #[cfg(feature = "stomp")]
            BrokerKind::Stomp => Producer::Stomp(crate::stomp::StompProducer::connect(to).await?),
            #[cfg(feature = "rocketmq")]
            BrokerKind::RocketMq => {
                Producer::RocketMq(crate::rocketmq::RocketMqProducer::connect(to).await?)
            }
            #[allow(unreachable_patterns)]
            kind => {
                let _ = to;
                return Err(kind.not_built());
            }
        };
        Ok(Self { inner })
    }

    /// The broker this producer publishes to.
    pub fn kind(&self) -> BrokerKind {
        match self.inner {
            #[cfg(feature = "amqp")]
            Producer::Amqp(_) => BrokerKind::Amqp,
            #[cfg(feature = "nats")]
            Producer::Nats(_) => BrokerKind::Nats,
            #[cfg(feature = "mqtt")]
            Producer::Mqtt(_) => BrokerKind::Mqtt,
            #[cfg(feature = "redis-streams")]
            Producer::Redis(_) => BrokerKind::Redis,
            #[cfg(feature = "kafka")]
            Producer::Kafka(_) => BrokerKind::Kafka,
            #[cfg(feature = "stomp")]
            Producer::Stomp(_) => BrokerKind::Stomp,
            #[cfg(feature = "rocketmq")]
            Producer::RocketMq(_) => BrokerKind::RocketMq,
        }
    }

    /// Publishes `message` to `destination` and waits for the confirmation; retries (same
    /// message id) with the adapter's retry policy.
    ///
    /// # Errors
    /// A [`BrokerError`] when every attempt failed.
    pub async fn publish(
        &self,
        destination: &str,
        message: &Outgoing,
    ) -> Result<Receipt, BrokerError> {
        self.send(destination, message, true).await
    }

    /// One publish attempt, confirmed by the broker, without retries: a caller that counts its
    /// retries retries with the same message (same id), as a producer after a lost confirm does.
    ///
    /// # Errors
    /// A [`BrokerError`] when the attempt failed or was not confirmed.
    pub async fn publish_once(
        &self,
        destination: &str,
        message: &Outgoing,
    ) -> Result<Receipt, BrokerError> {
        self.send(destination, message, false).await
    }

    /// [`publish`](AnyProducer::publish) (`retry`) or [`publish_once`](AnyProducer::publish_once).
    async fn send(
        &self,
        destination: &str,
        message: &Outgoing,
        retry: bool,
    ) -> Result<Receipt, BrokerError> {
        let stored = Receipt { duplicate: false };
        match self.inner {
            #[cfg(feature = "amqp")]
            Producer::Amqp(ref p) => if retry {
                p.publish("", destination, message).await
            } else {
                p.publish_once("", destination, message).await
            }
            .map(|()| stored),
            #[cfg(feature = "nats")]
            Producer::Nats(ref p) => if retry {
                p.publish(destination, message).await
            } else {
                p.publish_once(destination, message).await
            }
            .map(|p| Receipt {
                duplicate: p.duplicate,
            }),
            #[cfg(feature = "mqtt")]
            Producer::Mqtt(ref p) => if retry {
                p.publish(destination, message).await
            } else {
                p.publish_once(destination, message).await
            }
            .map(|()| stored),
            #[cfg(feature = "redis-streams")]
            Producer::Redis(ref p) => if retry {
                p.publish(destination, message).await
            } else {
                p.publish_once(destination, message).await
            }
            .map(|_| stored),
            #[cfg(feature = "kafka")]
            Producer::Kafka(ref p) => if retry {
                p.publish(destination, message).await
            } else {
                p.publish_once(destination, message).await
            }
            .map(|_| stored),
            #[cfg(feature = "stomp")]
            Producer::Stomp(ref p) => if retry {
                p.publish(destination, message).await
            } else {
                p.publish_once(destination, message).await
            }
            .map(|()| stored),
            #[cfg(feature = "rocketmq")]
            Producer::RocketMq(ref p) => if retry {
                p.publish(destination, message).await
            } else {
                p.publish_once(destination, message).await
            }
            .map(|()| stored),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{AnyDelivery, AnySource};
    use crate::error::BrokerErrorKind;
    use crate::memory::MemoryBroker;
    use crate::message::Message;
    use crate::source::{Acker, Source};

    #[tokio::test]
    async fn settles_through_the_erased_acker() {
        let broker = MemoryBroker::new("q");
        broker.publish(Message::new("q", &b"a"[..]).with_message_id("m-1"));
        broker.publish(Message::new("q", &b"b"[..]).with_message_id("m-2"));
        let mut source = AnySource::new(broker.source());
        assert_eq!(source.type_name(), "MemorySource");
        let acker = source.acker();
        let mut batch = source.receive(10).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(batch.len(), 2);
        let second = batch.pop().unwrap_or_else(|| panic!("two"));
        acker
            .ack(batch.into_iter().map(|i| i.delivery).collect())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        acker
            .dead_letter(second.delivery, &second.message, "bad")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(broker.unacked(), 0);
        assert!(matches!(
            &broker.log()[..],
            [
                crate::memory::Event::Acked { .. },
                crate::memory::Event::DeadLettered { .. }
            ]
        ));
        // A delivery of another source is refused, not mis-settled.
        let e = acker
            .ack(vec![AnyDelivery(Box::new(42u32))])
            .await
            .err()
            .unwrap_or_else(|| panic!("a foreign delivery was acked"));
        assert_eq!(e.kind(), BrokerErrorKind::Protocol);
        source.close().await;
    }
}
