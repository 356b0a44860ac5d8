//! An in-process broker with manual acks: [`MemoryBroker`] and its [`MemorySource`]. It keeps a
//! log of every settlement, so tests of the runtime (and of handlers) can check what was acked,
//! nacked with which delay, and dead-lettered with which reason, without a server.
//!
//! It behaves like a broker with manual acks: an unsettled delivery stays "unacked"; a nack
//! requeues it after its delay with the delivery count raised; closing the source requeues
//! everything unacked, as a broker does when a consumer's connection closes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::Message;
use crate::source::{Acker, Incoming, Source};

/// A queue in memory, with a log of what happened to each delivery.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::{Message, memory::MemoryBroker};
/// let broker = MemoryBroker::new("orders");
/// broker.publish(Message::new("orders", &b"hi"[..]).with_message_id("m-1"));
/// assert_eq!(broker.ready(), 1);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    notify: Notify,
    fail_dead_letters: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    origin: String,
    ready: VecDeque<Message>,
    unacked: HashMap<u64, Message>,
    next_tag: u64,
    log: Vec<Event>,
}

/// What happened to one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Acked.
    Acked {
        /// The message id.
        message_id: Option<String>,
        /// The payload.
        payload: Bytes,
    },
    /// Nacked, to be redelivered after `delay`.
    Nacked {
        /// The message id.
        message_id: Option<String>,
        /// The requested delay.
        delay: Duration,
    },
    /// Published to the dead-letter destination, then acked.
    DeadLettered {
        /// The message id.
        message_id: Option<String>,
        /// The payload.
        payload: Bytes,
        /// Why.
        reason: String,
    },
    /// A settlement for a delivery that was not unacked (settled twice, or after a close):
    /// a real broker would reject it.
    Unknown {
        /// The delivery tag.
        tag: u64,
    },
}

impl MemoryBroker {
    /// An empty queue named `origin`.
    pub fn new(origin: &str) -> Self {
        let broker = Self::default();
        broker.inner.state.lock().origin = origin.to_owned();
        broker
    }

    /// Enqueues a message.
    pub fn publish(&self, message: Message) {
        self.inner.state.lock().ready.push_back(message);
        self.inner.notify.notify_one();
    }

    /// A consumer of this queue.
    pub fn source(&self) -> MemorySource {
        MemorySource {
            broker: self.clone(),
        }
    }

    /// Messages waiting for delivery.
    pub fn ready(&self) -> usize {
        self.inner.state.lock().ready.len()
    }

    /// Deliveries neither acked nor nacked.
    pub fn unacked(&self) -> usize {
        self.inner.state.lock().unacked.len()
    }

    /// Everything settled so far, in order.
    pub fn log(&self) -> Vec<Event> {
        self.inner.state.lock().log.clone()
    }

    /// Makes dead-letter publishes fail (unconfirmed) while `fail` is true.
    pub fn fail_dead_letters(&self, fail: bool) {
        self.inner.fail_dead_letters.store(fail, Ordering::SeqCst);
    }

    /// Requeues every unacked delivery, as a broker does when the consumer's connection closes.
    pub fn requeue_unacked(&self) {
        let mut st = self.inner.state.lock();
        let mut back: Vec<(u64, Message)> = st.unacked.drain().collect();
        back.sort_by_key(|(tag, _)| *tag);
        for (_, m) in back.into_iter().rev() {
            let count = m.delivery_count() + 1;
            st.ready.push_front(m.with_delivery_count(count));
        }
        drop(st);
        self.inner.notify.notify_one();
    }

    fn settle(&self, tag: u64) -> Option<Message> {
        let mut st = self.inner.state.lock();
        let m = st.unacked.remove(&tag);
        if m.is_none() {
            st.log.push(Event::Unknown { tag });
        }
        m
    }
}

/// A consumer of a [`MemoryBroker`].
#[derive(Debug)]
pub struct MemorySource {
    broker: MemoryBroker,
}

/// The acker of a [`MemorySource`].
#[derive(Clone, Debug)]
pub struct MemoryAcker {
    broker: MemoryBroker,
}

/// A delivery tag of the memory broker.
#[derive(Debug)]
pub struct MemoryDelivery(u64);

impl Source for MemorySource {
    type Delivery = MemoryDelivery;
    type Acker = MemoryAcker;

    fn acker(&self) -> MemoryAcker {
        MemoryAcker {
            broker: self.broker.clone(),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<MemoryDelivery>>, BrokerError> {
        loop {
            let notified = self.broker.inner.notify.notified();
            {
                let mut st = self.broker.inner.state.lock();
                if !st.ready.is_empty() {
                    let n = max.min(st.ready.len());
                    let mut out = Vec::with_capacity(n);
                    for _ in 0..n {
                        let Some(m) = st.ready.pop_front() else { break };
                        st.next_tag += 1;
                        let tag = st.next_tag;
                        st.unacked.insert(tag, m.clone());
                        out.push(Incoming::new(m, MemoryDelivery(tag)));
                    }
                    if !st.ready.is_empty() {
                        // Wake another waiting receiver, if any.
                        self.broker.inner.notify.notify_one();
                    }
                    return Ok(out);
                }
            }
            notified.await;
        }
    }

    async fn close(self) {
        self.broker.requeue_unacked();
    }
}

fn id_of(m: &Message) -> Option<String> {
    m.message_id().map(str::to_owned)
}

impl Acker for MemoryAcker {
    type Delivery = MemoryDelivery;

    async fn ack(&self, deliveries: Vec<MemoryDelivery>) -> Result<(), BrokerError> {
        for MemoryDelivery(tag) in deliveries {
            if let Some(m) = self.broker.settle(tag) {
                self.broker.inner.state.lock().log.push(Event::Acked {
                    message_id: id_of(&m),
                    payload: m.payload().clone(),
                });
            }
        }
        Ok(())
    }

    async fn nack(&self, delivery: MemoryDelivery, delay: Duration) -> Result<(), BrokerError> {
        let Some(m) = self.broker.settle(delivery.0) else {
            return Ok(());
        };
        self.broker.inner.state.lock().log.push(Event::Nacked {
            message_id: id_of(&m),
            delay,
        });
        let broker = self.broker.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let count = m.delivery_count() + 1;
            broker.publish(m.with_delivery_count(count));
        });
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: MemoryDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        if self.broker.inner.fail_dead_letters.load(Ordering::SeqCst) {
            return Err(BrokerError::new(
                BrokerErrorKind::Rejected,
                "dead-letter publish not confirmed (MemoryBroker::fail_dead_letters)",
            ));
        }
        if self.broker.settle(delivery.0).is_some() {
            self.broker
                .inner
                .state
                .lock()
                .log
                .push(Event::DeadLettered {
                    message_id: id_of(message),
                    payload: message.payload().clone(),
                    reason: reason.to_owned(),
                });
        }
        Ok(())
    }
}
