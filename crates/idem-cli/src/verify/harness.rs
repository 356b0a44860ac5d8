//! The delivery side of `verify`: the [`Broker`] trait consumers use, and [`HarnessQueue`], the
//! in-process test harness behind it when no real broker is given.
//!
//! `HarnessQueue` is **not** a broker for production: it lives only inside `verify`, to deliver
//! at least once with the behaviours real brokers have: competing consumers, a visibility
//! timeout (an unacked delivery comes back after it, as in SQS, JetStream's ack wait or a
//! RabbitMQ consumer that lost its channel), acks, nacks with a delay, and redelivery. A real
//! broker replaces it by implementing [`Broker`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// An at-least-once source of transfer messages, as a consumer sees it.
pub(crate) trait Broker: Send + Sync + 'static {
    /// What the consumer hands back to ack or nack one delivery.
    type Receipt: Send + Sync + 'static;

    /// Publishes message `message` (an index into the workload), visible after `delay`.
    fn publish(&self, message: u32, delay: Duration);

    /// No more publishes follow: once everything published is acked, [`receive`] returns
    /// `None`.
    ///
    /// [`receive`]: Broker::receive
    fn close_publishing(&self);

    /// Up to `max` deliveries, waiting for at least one; `None` once drained. Cancel-safe:
    /// dropping the future loses no delivery.
    fn receive(
        &self,
        max: usize,
    ) -> impl Future<Output = Option<Vec<Delivery<Self::Receipt>>>> + Send;

    /// The message is processed: never deliver it again. Returns whether the broker took the
    /// ack: `false` when this delivery had already timed out and the message was (or will be)
    /// delivered again. A broker that cannot tell answers `true`.
    fn ack(&self, receipt: &Self::Receipt) -> bool;

    /// The message is not processed: deliver it again after `delay`.
    fn nack(&self, receipt: &Self::Receipt, delay: Duration);
}

/// One delivery of a message.
#[derive(Debug)]
pub(crate) struct Delivery<R> {
    /// Which message (an index into the workload).
    pub(crate) message: u32,
    /// Hand back to ack or nack.
    pub(crate) receipt: R,
}

/// A receipt of [`HarnessQueue`]: the entry and its generation when delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Receipt {
    entry: u32,
    generation: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Waiting for a delay (a publish or nack delay) to pass.
    Waiting,
    Ready,
    /// Delivered and not acked; comes back when its visibility timeout passes.
    InFlight,
    Acked,
}

/// One published copy of a message. Every state change bumps `generation`, which invalidates
/// the timers and receipts of the previous state.
#[derive(Debug)]
struct Entry {
    message: u32,
    generation: u32,
    state: State,
}

#[derive(Debug, Default)]
struct Inner {
    entries: Vec<Entry>,
    ready: VecDeque<(u32, u32)>,
    /// `(when, entry, generation)`: delays and visibility timeouts.
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    unacked: usize,
    closed: bool,
}

impl Inner {
    /// Moves entries whose timer is due to the ready queue: delayed publishes and nacks, and
    /// deliveries whose visibility timeout passed (redeliveries).
    fn promote(&mut self, now: Instant) {
        while let Some(Reverse((at, entry, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let e = &mut self.entries[entry as usize];
            if e.generation == generation && matches!(e.state, State::Waiting | State::InFlight) {
                e.generation += 1;
                e.state = State::Ready;
                self.ready.push_back((entry, e.generation));
            }
        }
    }

    /// Takes up to `max` ready entries, in flight until `until`. The flag says whether `until`
    /// is now the earliest timer, which consumers waiting for an earlier-computed deadline must
    /// learn about.
    fn take(&mut self, max: usize, until: Instant) -> (Vec<Delivery<Receipt>>, bool) {
        let earliest = self
            .timers
            .peek()
            .is_none_or(|Reverse((at, _, _))| until < *at);
        let mut out = Vec::new();
        while out.len() < max {
            let Some((entry, generation)) = self.ready.pop_front() else {
                break;
            };
            let e = &mut self.entries[entry as usize];
            if e.generation != generation || e.state != State::Ready {
                continue;
            }
            e.generation += 1;
            e.state = State::InFlight;
            self.timers.push(Reverse((until, entry, e.generation)));
            out.push(Delivery {
                message: e.message,
                receipt: Receipt {
                    entry,
                    generation: e.generation,
                },
            });
        }
        let earliest = earliest && !out.is_empty();
        (out, earliest)
    }

    /// The entry of a receipt that is still valid: in flight under this delivery, even if its
    /// visibility timeout has passed without anyone receiving it again yet.
    fn current(&mut self, r: &Receipt) -> Option<&mut Entry> {
        self.entries
            .get_mut(r.entry as usize)
            .filter(|e| e.generation == r.generation && e.state == State::InFlight)
    }

    fn schedule(&mut self, entry: u32, delay: Duration, now: Instant) {
        let e = &mut self.entries[entry as usize];
        e.generation += 1;
        if delay.is_zero() {
            e.state = State::Ready;
            self.ready.push_back((entry, e.generation));
        } else {
            e.state = State::Waiting;
            self.timers
                .push(Reverse((now + delay, entry, e.generation)));
        }
    }
}

/// The in-process at-least-once queue of `verify` (a test harness; see the module docs).
#[derive(Debug)]
pub(crate) struct HarnessQueue {
    inner: Mutex<Inner>,
    /// Woken on every change a waiting consumer may care about.
    changed: Notify,
    visibility_timeout: Duration,
}

impl HarnessQueue {
    /// A queue whose unacked deliveries come back after `visibility_timeout`.
    pub(crate) fn new(visibility_timeout: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            visibility_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every change is one step).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies published and not acked yet.
    pub(crate) fn unacked(&self) -> usize {
        self.lock().unacked
    }
}

impl Broker for HarnessQueue {
    type Receipt = Receipt;

    fn publish(&self, message: u32, delay: Duration) {
        let mut q = self.lock();
        let entry = q.entries.len() as u32;
        q.entries.push(Entry {
            message,
            generation: 0,
            state: State::Waiting,
        });
        q.unacked += 1;
        q.schedule(entry, delay, Instant::now());
        drop(q);
        self.changed.notify_waiters();
    }

    fn close_publishing(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }

    async fn receive(&self, max: usize) -> Option<Vec<Delivery<Receipt>>> {
        loop {
            // Registered before looking, so a change made after the look still wakes us.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let next = {
                let mut q = self.lock();
                let now = Instant::now();
                q.promote(now);
                let (out, earliest) = q.take(max.max(1), now + self.visibility_timeout);
                if !out.is_empty() {
                    drop(q);
                    if earliest {
                        self.changed.notify_waiters();
                    }
                    return Some(out);
                }
                if q.closed && q.unacked == 0 {
                    return None;
                }
                q.timers.peek().map(|Reverse((at, _, _))| *at)
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

    fn ack(&self, receipt: &Receipt) -> bool {
        let mut q = self.lock();
        let Some(e) = q.current(receipt) else {
            return false;
        };
        e.generation += 1;
        e.state = State::Acked;
        q.unacked -= 1;
        let drained = q.closed && q.unacked == 0;
        drop(q);
        if drained {
            self.changed.notify_waiters();
        }
        true
    }

    fn nack(&self, receipt: &Receipt, delay: Duration) {
        let mut q = self.lock();
        if q.current(receipt).is_none() {
            return;
        }
        q.schedule(receipt.entry, delay, Instant::now());
        drop(q);
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn acked_messages_are_not_redelivered_and_the_queue_drains() {
        let q = HarnessQueue::new(VT);
        q.publish(1, Duration::ZERO);
        q.publish(2, Duration::ZERO);
        q.close_publishing();
        let got = q.receive(10).await.unwrap();
        assert_eq!(got.iter().map(|d| d.message).collect::<Vec<_>>(), [1, 2]);
        for d in &got {
            assert!(q.ack(&d.receipt));
        }
        assert_eq!(q.receive(10).await.map(|v| v.len()), None);
    }

    #[tokio::test]
    async fn unacked_deliveries_come_back_after_the_visibility_timeout() {
        let q = HarnessQueue::new(VT);
        q.publish(7, Duration::ZERO);
        q.close_publishing();
        let first = q.receive(1).await.unwrap().remove(0);
        let start = Instant::now();
        let second = q.receive(1).await.unwrap().remove(0);
        assert!(start.elapsed() >= VT / 2);
        assert_eq!(second.message, 7);
        // The first delivery's receipt is stale now: its ack is refused and changes nothing.
        assert!(!q.ack(&first.receipt));
        assert_eq!(q.unacked(), 1);
        assert!(q.ack(&second.receipt));
        assert_eq!(q.unacked(), 0);
    }

    #[tokio::test]
    async fn nack_redelivers_after_the_delay() {
        let q = HarnessQueue::new(Duration::from_secs(60));
        q.publish(3, Duration::ZERO);
        let d = q.receive(1).await.unwrap().remove(0);
        let start = Instant::now();
        q.nack(&d.receipt, Duration::from_millis(30));
        let again = q.receive(1).await.unwrap().remove(0);
        assert!(start.elapsed() >= Duration::from_millis(25));
        assert_eq!(again.message, 3);
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_on_publish() {
        let q = std::sync::Arc::new(HarnessQueue::new(VT));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.receive(1).await.map(|v| v[0].message) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.publish(9, Duration::ZERO);
        assert_eq!(waiter.await.unwrap(), Some(9));
    }
}
