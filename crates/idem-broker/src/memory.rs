//! An in-process broker with manual acks: [`MemoryBroker`] and its [`MemorySource`]s. It keeps a
//! log of every settlement, so tests of the runtime (and of handlers) can check what was acked,
//! nacked with which delay, and dead-lettered with which reason, without a server.
//!
//! It behaves like an at-least-once broker with manual acks:
//! - **competing consumers**: every [`MemoryBroker::source`] is one consumer (one connection);
//!   each ready message goes to whichever consumer asks first;
//! - an unsettled delivery stays "unacked"; with a **visibility timeout**
//!   ([`MemoryBroker::with_visibility_timeout`]) it comes back after it, to any consumer (as in
//!   SQS, or JetStream after its ack wait), and the stale delivery's settlement is refused;
//!   without one, it stays unacked until its consumer closes (as in RabbitMQ);
//! - a nack requeues the message after its **delay**; every redelivery raises the message's
//!   [delivery count](Message::delivery_count);
//! - closing a source requeues what it held, as a broker does when a consumer's connection
//!   closes.
//!
//! **Fault hooks**, for harnesses that test consumers under faults (`idem verify` runs on it):
//! [`publish_after`](MemoryBroker::publish_after) (a producer retry whose copy arrives later),
//! [`MemoryAcker::lose_ack`] (an ack lost on its way: the delivery times out and comes back),
//! [`MemoryConnection::kill`] (a consumer process killed: its settlements never arrive and what
//! it held comes back after the visibility timeout), [`fail_dead_letters`](MemoryBroker::fail_dead_letters),
//! and [`close_publishing`](MemoryBroker::close_publishing) with
//! [`drained`](MemoryBroker::drained) to know when every message published was settled.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::Message;
use crate::source::{Acker, Incoming, Source};

/// A queue in memory, with a log of what happened to each delivery. Clones share the queue.
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
    /// Woken on every change a waiting consumer (or a [`MemoryBroker::drained`]) may care about.
    changed: Notify,
    fail_dead_letters: AtomicBool,
}

/// Where one published copy of a message is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum EntryState {
    /// Waiting for a delay (a delayed publish or nack) to pass.
    Waiting,
    Ready,
    /// Delivered through connection `conn` and not settled.
    InFlight {
        conn: u64,
    },
    /// Acked or dead-lettered.
    Done,
}

/// One published copy. Every change of state bumps `generation`, which invalidates the timers
/// and the deliveries of the state before.
#[derive(Debug)]
struct Entry {
    /// `None` once settled for good (the payload is freed).
    message: Option<Message>,
    generation: u32,
    state: EntryState,
    /// Deliveries so far (the next one's count is this plus one).
    deliveries: u32,
}

#[derive(Debug)]
struct State {
    origin: String,
    visibility_timeout: Option<Duration>,
    keep_log: bool,
    entries: Vec<Entry>,
    /// `(entry, generation)` in delivery order; stale pairs are skipped.
    ready: VecDeque<(u32, u32)>,
    /// Entries in the ready state.
    ready_count: usize,
    /// `(when, entry, generation)`: delays and visibility timeouts.
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    in_flight: usize,
    /// Published and neither acked nor dead-lettered.
    outstanding: usize,
    closed: bool,
    next_conn: u64,
    killed: HashSet<u64>,
    log: Vec<Event>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            origin: String::new(),
            visibility_timeout: None,
            keep_log: true,
            entries: Vec::new(),
            ready: VecDeque::new(),
            ready_count: 0,
            timers: BinaryHeap::new(),
            in_flight: 0,
            outstanding: 0,
            closed: false,
            next_conn: 0,
            killed: HashSet::new(),
            log: Vec::new(),
        }
    }
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
    /// A settlement for a delivery that was not unacked (settled twice, after a close, or after
    /// its visibility timeout gave the message to another delivery): a real broker would
    /// reject it.
    Unknown {
        /// The delivery tag.
        tag: u64,
    },
    /// An ack lost on its way ([`MemoryAcker::lose_ack`]): the broker never saw it.
    AckLost {
        /// The message id.
        message_id: Option<String>,
    },
}

impl State {
    fn push_log(&mut self, event: Event) {
        if self.keep_log {
            self.log.push(event);
        }
    }

    /// Moves entries whose timer is due to the ready queue: delayed publishes and nacks, and
    /// deliveries whose visibility timeout passed (redeliveries, at the back of the queue).
    fn promote(&mut self, now: Instant) {
        while let Some(Reverse((at, entry, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let e = &mut self.entries[entry as usize];
            if e.generation != generation {
                continue;
            }
            match e.state {
                EntryState::Waiting => {}
                EntryState::InFlight { .. } => self.in_flight -= 1,
                EntryState::Ready | EntryState::Done => continue,
            }
            e.generation += 1;
            e.state = EntryState::Ready;
            self.ready_count += 1;
            self.ready.push_back((entry, e.generation));
        }
    }

    /// Takes up to `max` ready entries for connection `conn`.
    fn take(&mut self, max: usize, conn: u64, now: Instant) -> Vec<Incoming<MemoryDelivery>> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((entry, generation)) = self.ready.pop_front() else {
                break;
            };
            let e = &mut self.entries[entry as usize];
            if e.generation != generation || e.state != EntryState::Ready {
                continue;
            }
            let Some(message) = &e.message else { continue };
            e.generation += 1;
            e.deliveries += 1;
            e.state = EntryState::InFlight { conn };
            let message = message.clone().with_delivery_count(e.deliveries);
            let delivery = MemoryDelivery {
                entry,
                generation: e.generation,
                conn,
            };
            self.ready_count -= 1;
            self.in_flight += 1;
            if let Some(vt) = self.visibility_timeout {
                self.timers
                    .push(Reverse((now + vt, entry, delivery.generation)));
            }
            out.push(Incoming::new(message, delivery));
        }
        out
    }

    /// The entry of a delivery that is still current: in flight under this very delivery, even
    /// if its visibility timeout has passed without anyone receiving the message again yet.
    fn current(&mut self, d: &MemoryDelivery) -> Option<&mut Entry> {
        self.entries.get_mut(d.entry as usize).filter(|e| {
            e.generation == d.generation && e.state == EntryState::InFlight { conn: d.conn }
        })
    }

    /// Schedules an entry (new, or taken back from a delivery) after `delay`.
    fn schedule(&mut self, entry: u32, delay: Duration, now: Instant) {
        let e = &mut self.entries[entry as usize];
        e.generation += 1;
        if delay.is_zero() {
            e.state = EntryState::Ready;
            self.ready_count += 1;
            self.ready.push_back((entry, e.generation));
        } else {
            e.state = EntryState::Waiting;
            self.timers
                .push(Reverse((now + delay, entry, e.generation)));
        }
    }

    /// Settles a current delivery for good (acked or dead-lettered); returns its message.
    fn finish(&mut self, d: &MemoryDelivery) -> Option<Message> {
        let e = self.current(d)?;
        e.generation += 1;
        e.state = EntryState::Done;
        let message = e.message.take();
        self.in_flight -= 1;
        self.outstanding -= 1;
        message
    }

    /// Puts back, at the front of the queue and in their order, the deliveries in flight on
    /// `conn` (every connection for `None`), as a broker does when a connection closes.
    fn requeue(&mut self, conn: Option<u64>) {
        let mut back: Vec<u32> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if let EntryState::InFlight { conn: c } = e.state
                && conn.is_none_or(|conn| conn == c)
            {
                back.push(i as u32);
            }
        }
        for &entry in back.iter().rev() {
            let e = &mut self.entries[entry as usize];
            e.generation += 1;
            e.state = EntryState::Ready;
            self.in_flight -= 1;
            self.ready_count += 1;
            self.ready.push_front((entry, e.generation));
        }
    }

    fn drained(&self) -> bool {
        self.closed && self.outstanding == 0
    }
}

fn id_of(m: &Message) -> Option<String> {
    m.message_id().map(str::to_owned)
}

impl MemoryBroker {
    /// An empty queue named `origin`, without a visibility timeout.
    pub fn new(origin: &str) -> Self {
        let broker = Self::default();
        broker.inner.state.lock().origin = origin.to_owned();
        broker
    }

    /// Gives every delivery a visibility timeout: a delivery neither acked nor nacked within
    /// `timeout` comes back to the queue (at its back) and is delivered again, to whichever
    /// consumer asks next; the first delivery can no longer be settled once another consumer
    /// received the message.
    #[must_use]
    pub fn with_visibility_timeout(self, timeout: Duration) -> Self {
        self.inner.state.lock().visibility_timeout = Some(timeout);
        self
    }

    /// Keeps the log of settlements ([`log`](MemoryBroker::log)) or not (default: kept). Long
    /// runs that do not read it save the memory.
    #[must_use]
    pub fn keep_log(self, keep: bool) -> Self {
        self.inner.state.lock().keep_log = keep;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock()
    }

    /// Enqueues a message.
    pub fn publish(&self, message: Message) {
        self.publish_after(message, Duration::ZERO);
    }

    /// Enqueues a message that becomes visible after `delay` (a producer retry whose copy
    /// arrives later, a scheduled message).
    pub fn publish_after(&self, message: Message, delay: Duration) {
        let mut st = self.lock();
        let entry = st.entries.len() as u32;
        st.entries.push(Entry {
            deliveries: message.delivery_count().saturating_sub(1),
            message: Some(message),
            generation: 0,
            state: EntryState::Waiting,
        });
        st.outstanding += 1;
        st.schedule(entry, delay, Instant::now());
        drop(st);
        self.inner.changed.notify_waiters();
    }

    /// No more messages will be published: once every message published is acked or
    /// dead-lettered, [`drained`](MemoryBroker::drained) resolves.
    pub fn close_publishing(&self) {
        self.lock().closed = true;
        self.inner.changed.notify_waiters();
    }

    /// Resolves once publishing is closed and every message published was acked or
    /// dead-lettered (a consumer's shutdown signal, say).
    pub async fn drained(&self) {
        loop {
            let changed = self.inner.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.lock().drained() {
                return;
            }
            changed.await;
        }
    }

    /// A consumer of this queue, on a connection of its own: it competes with the other
    /// sources for the messages.
    pub fn source(&self) -> MemorySource {
        let mut st = self.lock();
        st.next_conn += 1;
        MemorySource {
            conn: MemoryConnection {
                broker: self.clone(),
                id: st.next_conn,
            },
        }
    }

    /// Messages ready for delivery now.
    pub fn ready(&self) -> usize {
        let mut st = self.lock();
        st.promote(Instant::now());
        st.ready_count
    }

    /// Deliveries neither acked nor nacked (nor timed out).
    pub fn unacked(&self) -> usize {
        let mut st = self.lock();
        st.promote(Instant::now());
        st.in_flight
    }

    /// Messages published and neither acked nor dead-lettered: ready, delayed or in flight.
    pub fn outstanding(&self) -> usize {
        self.lock().outstanding
    }

    /// Everything settled so far, in order (empty when the log is not kept).
    pub fn log(&self) -> Vec<Event> {
        self.lock().log.clone()
    }

    /// Makes dead-letter publishes fail (unconfirmed) while `fail` is true.
    pub fn fail_dead_letters(&self, fail: bool) {
        self.inner.fail_dead_letters.store(fail, Ordering::SeqCst);
    }

    /// Requeues every unacked delivery, as a broker does when the consumers' connections close.
    pub fn requeue_unacked(&self) {
        self.lock().requeue(None);
        self.inner.changed.notify_waiters();
    }

    /// Settles a delivery for good through `conn`; `None` (logged as unknown) when it is not
    /// current, nothing when `conn` was killed.
    fn settle(&self, d: &MemoryDelivery) -> Option<Message> {
        let mut st = self.lock();
        if st.killed.contains(&d.conn) {
            return None;
        }
        let m = st.finish(d);
        if m.is_none() {
            st.push_log(Event::Unknown { tag: d.tag() });
        }
        let drained = st.drained();
        drop(st);
        if drained {
            self.inner.changed.notify_waiters();
        }
        m
    }
}

/// A consumer of a [`MemoryBroker`], on a connection of its own.
#[derive(Debug)]
pub struct MemorySource {
    conn: MemoryConnection,
}

impl MemorySource {
    /// This consumer's connection, to kill it from a test.
    pub fn connection(&self) -> MemoryConnection {
        self.conn.clone()
    }
}

/// The connection of a [`MemorySource`] and its [`MemoryAcker`]s.
#[derive(Clone, Debug)]
pub struct MemoryConnection {
    broker: MemoryBroker,
    id: u64,
}

impl MemoryConnection {
    /// Kills the connection, as when the consumer's process dies: its source fails with a
    /// [`Connection`](BrokerErrorKind::Connection) error, its settlements never reach the
    /// broker, and what it held comes back after the visibility timeout (at once without one,
    /// as when a connection closes).
    pub fn kill(&self) {
        let mut st = self.broker.lock();
        st.killed.insert(self.id);
        if st.visibility_timeout.is_none() {
            st.requeue(Some(self.id));
        }
        drop(st);
        self.broker.inner.changed.notify_waiters();
    }

    /// Whether [`kill`](MemoryConnection::kill) was called.
    pub fn is_killed(&self) -> bool {
        self.broker.lock().killed.contains(&self.id)
    }
}

/// The acker of a [`MemorySource`].
#[derive(Clone, Debug)]
pub struct MemoryAcker {
    conn: MemoryConnection,
}

/// A delivery of the memory broker.
#[derive(Debug)]
pub struct MemoryDelivery {
    entry: u32,
    generation: u32,
    conn: u64,
}

impl MemoryDelivery {
    fn tag(&self) -> u64 {
        (u64::from(self.entry) << 32) | u64::from(self.generation)
    }
}

impl Source for MemorySource {
    type Delivery = MemoryDelivery;
    type Acker = MemoryAcker;

    fn acker(&self) -> MemoryAcker {
        MemoryAcker {
            conn: self.conn.clone(),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<MemoryDelivery>>, BrokerError> {
        let broker = &self.conn.broker;
        loop {
            // Registered before looking, so that a change made after the look still wakes us.
            let changed = broker.inner.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let next = {
                let mut st = broker.lock();
                if st.killed.contains(&self.conn.id) {
                    return Err(BrokerError::new(
                        BrokerErrorKind::Connection,
                        "the memory broker connection was killed",
                    ));
                }
                let now = Instant::now();
                st.promote(now);
                let out = st.take(max.max(1), self.conn.id, now);
                if !out.is_empty() {
                    let more = st.ready_count > 0;
                    drop(st);
                    if more {
                        // Another waiting consumer may take the rest.
                        broker.inner.changed.notify_waiters();
                    }
                    return Ok(out);
                }
                st.timers.peek().map(|Reverse((at, _, _))| *at)
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    async fn close(self) {
        let broker = &self.conn.broker;
        broker.lock().requeue(Some(self.conn.id));
        broker.inner.changed.notify_waiters();
    }
}

impl MemoryAcker {
    /// Acks one delivery; returns whether the broker took it: `false` when the delivery was
    /// not current (settled already, or its visibility timeout gave the message to another
    /// delivery) or this connection was killed.
    pub fn try_ack(&self, delivery: MemoryDelivery) -> bool {
        let broker = &self.conn.broker;
        let Some(m) = broker.settle(&delivery) else {
            return false;
        };
        let mut st = broker.lock();
        let event = Event::Acked {
            message_id: id_of(&m),
            payload: m.payload().clone(),
        };
        st.push_log(event);
        true
    }

    /// Loses the ack of `delivery` on its way to the broker (a fault): the broker never sees
    /// it, so the delivery stays unacked and comes back after the visibility timeout (or when
    /// the connection closes).
    pub fn lose_ack(&self, delivery: MemoryDelivery) {
        let broker = &self.conn.broker;
        let mut st = broker.lock();
        let message_id = st
            .entries
            .get(delivery.entry as usize)
            .and_then(|e| e.message.as_ref())
            .and_then(id_of);
        st.push_log(Event::AckLost { message_id });
    }

    /// This acker's connection.
    pub fn connection(&self) -> MemoryConnection {
        self.conn.clone()
    }
}

impl Acker for MemoryAcker {
    type Delivery = MemoryDelivery;

    async fn ack(&self, deliveries: Vec<MemoryDelivery>) -> Result<(), BrokerError> {
        for d in deliveries {
            self.try_ack(d);
        }
        Ok(())
    }

    async fn nack(&self, delivery: MemoryDelivery, delay: Duration) -> Result<(), BrokerError> {
        let broker = &self.conn.broker;
        let mut st = broker.lock();
        if st.killed.contains(&delivery.conn) {
            return Ok(());
        }
        let Some(e) = st.current(&delivery) else {
            st.push_log(Event::Unknown {
                tag: delivery.tag(),
            });
            return Ok(());
        };
        let message_id = e.message.as_ref().and_then(id_of);
        st.in_flight -= 1;
        st.schedule(delivery.entry, delay, Instant::now());
        st.push_log(Event::Nacked { message_id, delay });
        drop(st);
        broker.inner.changed.notify_waiters();
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: MemoryDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let broker = &self.conn.broker;
        if broker.inner.fail_dead_letters.load(Ordering::SeqCst) {
            return Err(BrokerError::new(
                BrokerErrorKind::Rejected,
                "dead-letter publish not confirmed (MemoryBroker::fail_dead_letters)",
            ));
        }
        if broker.settle(&delivery).is_some() {
            broker.lock().push_log(Event::DeadLettered {
                message_id: id_of(message),
                payload: message.payload().clone(),
                reason: reason.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const VT: Duration = Duration::from_millis(50);

    fn msg(id: &str) -> Message {
        Message::new("q", id.as_bytes().to_vec()).with_message_id(id)
    }

    fn ids(batch: &[Incoming<MemoryDelivery>]) -> Vec<&str> {
        batch
            .iter()
            .filter_map(|i| i.message.message_id())
            .collect()
    }

    #[tokio::test]
    async fn acked_messages_are_not_redelivered_and_the_queue_drains() {
        let broker = MemoryBroker::new("q").with_visibility_timeout(VT);
        broker.publish(msg("a"));
        broker.publish(msg("b"));
        broker.close_publishing();
        let mut source = broker.source();
        let acker = source.acker();
        let got = source.receive(10).await.unwrap();
        assert_eq!(ids(&got), ["a", "b"]);
        for d in got {
            assert!(acker.try_ack(d.delivery));
        }
        assert_eq!(broker.outstanding(), 0);
        tokio::time::timeout(Duration::from_secs(1), broker.drained())
            .await
            .unwrap();
        tokio::time::sleep(VT * 2).await;
        assert_eq!((broker.ready(), broker.unacked()), (0, 0));
    }

    #[tokio::test]
    async fn unacked_deliveries_come_back_after_the_visibility_timeout() {
        let broker = MemoryBroker::new("q").with_visibility_timeout(VT);
        broker.publish(msg("m"));
        let (mut first, mut second) = (broker.source(), broker.source());
        let d1 = first.receive(1).await.unwrap().remove(0);
        assert_eq!(d1.message.delivery_count(), 1);
        let start = Instant::now();
        let d2 = second.receive(1).await.unwrap().remove(0);
        assert!(start.elapsed() >= VT / 2);
        assert_eq!(d2.message.message_id(), Some("m"));
        assert_eq!(d2.message.delivery_count(), 2);
        // The first delivery is stale now: its ack is refused and changes nothing.
        assert!(!first.acker().try_ack(d1.delivery));
        assert_eq!(broker.outstanding(), 1);
        assert!(second.acker().try_ack(d2.delivery));
        assert_eq!(broker.outstanding(), 0);
        assert!(matches!(broker.log()[0], Event::Unknown { .. }));
    }

    #[tokio::test]
    async fn nacks_redeliver_after_the_delay_with_the_count_raised() {
        let broker = MemoryBroker::new("q");
        broker.publish(msg("m"));
        let mut source = broker.source();
        let d = source.receive(1).await.unwrap().remove(0);
        let start = Instant::now();
        source
            .acker()
            .nack(d.delivery, Duration::from_millis(30))
            .await
            .unwrap();
        assert_eq!(broker.ready(), 0);
        let again = source.receive(1).await.unwrap().remove(0);
        assert!(start.elapsed() >= Duration::from_millis(25));
        assert_eq!(again.message.delivery_count(), 2);
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_on_a_publish_and_on_a_delayed_one() {
        let broker = MemoryBroker::new("q");
        let waiter = tokio::spawn({
            let mut source = broker.source();
            async move {
                let a = source.receive(1).await.unwrap();
                let b = source.receive(1).await.unwrap();
                (
                    a[0].message.message_id().map(str::to_owned),
                    b[0].message.message_id().map(str::to_owned),
                )
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        broker.publish(msg("now"));
        let start = Instant::now();
        broker.publish_after(msg("later"), Duration::from_millis(40));
        let (a, b) = waiter.await.unwrap();
        assert_eq!((a.as_deref(), b.as_deref()), (Some("now"), Some("later")));
        assert!(start.elapsed() >= Duration::from_millis(35));
    }

    #[tokio::test]
    async fn competing_consumers_share_the_queue() {
        let broker = MemoryBroker::new("q");
        for i in 0..10 {
            broker.publish(msg(&format!("m{i}")));
        }
        let (mut a, mut b) = (broker.source(), broker.source());
        let got_a = a.receive(4).await.unwrap();
        let got_b = b.receive(100).await.unwrap();
        assert_eq!((got_a.len(), got_b.len()), (4, 6));
        assert_eq!(broker.unacked(), 10);
        // Closing one consumer gives back only what it held, to the front of the queue.
        a.close().await;
        assert_eq!((broker.ready(), broker.unacked()), (4, 6));
        let again = b.receive(100).await.unwrap();
        assert_eq!(ids(&again), ["m0", "m1", "m2", "m3"]);
        assert!(again.iter().all(|d| d.message.delivery_count() == 2));
    }

    #[tokio::test]
    async fn a_lost_ack_never_arrives_and_the_message_comes_back() {
        let broker = MemoryBroker::new("q").with_visibility_timeout(VT);
        broker.publish(msg("m"));
        let mut source = broker.source();
        let d = source.receive(1).await.unwrap().remove(0);
        source.acker().lose_ack(d.delivery);
        assert_eq!(broker.outstanding(), 1);
        let again = source.receive(1).await.unwrap().remove(0);
        assert_eq!(again.message.delivery_count(), 2);
        assert!(matches!(&broker.log()[..], [Event::AckLost { message_id: Some(m) }] if m == "m"));
    }

    #[tokio::test]
    async fn a_killed_connection_settles_nothing_and_its_deliveries_time_out() {
        let broker = MemoryBroker::new("q").with_visibility_timeout(VT);
        broker.publish(msg("m"));
        let mut dead = broker.source();
        let acker = dead.acker();
        let d = dead.receive(1).await.unwrap().remove(0);
        dead.connection().kill();
        assert!(dead.connection().is_killed());
        assert!(!acker.try_ack(d.delivery));
        assert!(dead.receive(1).await.is_err());
        assert_eq!(broker.outstanding(), 1);
        let mut alive = broker.source();
        let again = alive.receive(1).await.unwrap().remove(0);
        assert_eq!(again.message.delivery_count(), 2);
        assert!(alive.acker().try_ack(again.delivery));
        assert!(
            broker
                .log()
                .iter()
                .all(|e| !matches!(e, Event::Unknown { .. }))
        );
    }

    #[tokio::test]
    async fn without_a_visibility_timeout_a_kill_requeues_at_once() {
        let broker = MemoryBroker::new("q");
        broker.publish(msg("m"));
        let mut dead = broker.source();
        let _held = dead.receive(1).await.unwrap();
        dead.connection().kill();
        assert_eq!((broker.ready(), broker.unacked()), (1, 0));
    }
}
