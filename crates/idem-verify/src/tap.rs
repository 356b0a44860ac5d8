//! The consumers' side of the memory broker: [`TapSource`] numbers every delivery of every
//! transfer, decides its faults from the plan and gives it a [`Cell`]; [`TapAcker`] settles
//! through the broker with the planned faults (a lost ack, a crash between `complete` and the
//! ack). Both go through the consumer's freeze gate.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem_broker::memory::{MemoryAcker, MemoryDelivery, MemorySource};
use idem_broker::{Acker, BrokerError, Incoming, Message, Source};
use parking_lot::Mutex;

use crate::faults::{CrashPoint, Fault, FaultPlan, Faults};
use crate::incarnation::Incarnation;
use crate::stats::{Cell, Stats, Window};

/// The header that carries a delivery's number in the harness, for handlers and processors to
/// find its [`Cell`].
const SEQ_HEADER: &str = "x-idem-verify-seq";

/// The transfer a message carries, from its id (`t-000042`).
pub(crate) fn transfer_of(message: &Message, messages: u32) -> Option<u32> {
    let n: u32 = message.message_id()?.strip_prefix("t-")?.parse().ok()?;
    (n < messages).then_some(n)
}

/// What every consumer of one mode's run shares: the plan, the counters, and the cells of the
/// deliveries in hand.
#[derive(Debug)]
pub(crate) struct Tap {
    plan: FaultPlan,
    stats: Arc<Stats>,
    messages: u32,
    cells: Mutex<HashMap<u64, Arc<Cell>>>,
    next: AtomicU64,
}

impl Tap {
    pub(crate) fn new(plan: FaultPlan, stats: Arc<Stats>, messages: u32) -> Self {
        Self {
            plan,
            stats,
            messages,
            cells: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// The cell of a delivery in hand, from its message.
    pub(crate) fn cell(&self, message: &Message) -> Option<Arc<Cell>> {
        let seq: u64 = std::str::from_utf8(message.header(SEQ_HEADER)?)
            .ok()?
            .parse()
            .ok()?;
        self.cells.lock().get(&seq).cloned()
    }
}

/// A memory broker source, numbering deliveries and deciding their faults.
pub(crate) struct TapSource {
    inner: MemorySource,
    inc: Arc<Incarnation>,
    tap: Arc<Tap>,
}

impl TapSource {
    pub(crate) fn new(inner: MemorySource, inc: Arc<Incarnation>, tap: Arc<Tap>) -> Self {
        Self { inner, inc, tap }
    }
}

/// A delivery in a consumer's hands. Dropped unsettled (its consumer crashed) with an effect
/// pending, it is a crash suspect.
#[derive(Debug)]
pub(crate) struct TapDelivery {
    inner: Option<MemoryDelivery>,
    pub(crate) cell: Arc<Cell>,
    seq: u64,
    tap: Arc<Tap>,
}

impl TapDelivery {
    fn take(&mut self) -> Option<MemoryDelivery> {
        self.inner.take()
    }
}

impl Drop for TapDelivery {
    fn drop(&mut self) {
        self.tap.cells.lock().remove(&self.seq);
        self.cell.window(Window::Crash);
    }
}

/// Settles through the memory broker with the planned faults.
#[derive(Clone, Debug)]
pub(crate) struct TapAcker {
    inner: MemoryAcker,
    inc: Arc<Incarnation>,
}

impl Source for TapSource {
    type Delivery = TapDelivery;
    type Acker = TapAcker;

    fn acker(&self) -> TapAcker {
        TapAcker {
            inner: self.inner.acker(),
            inc: Arc::clone(&self.inc),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<TapDelivery>>, BrokerError> {
        let batch = self.inc.gate(self.inner.receive(max)).await?;
        // Numbered now, on receipt: a delivery received just before a freeze is held through it
        // even if nothing ran for it yet.
        let freezes = self.inc.freeze.count();
        let tap = &self.tap;
        Ok(batch
            .into_iter()
            .map(|Incoming { message, delivery }| {
                let (index, faults) = match transfer_of(&message, tap.messages) {
                    Some(i) => {
                        let number = tap.stats.delivered(i);
                        (i, tap.plan.for_delivery(i, number))
                    }
                    None => {
                        tap.stats.error(format!(
                            "a message that is not a transfer of the workload: {:?}",
                            message.message_id()
                        ));
                        (u32::MAX, Faults::default())
                    }
                };
                let cell = Arc::new(Cell::new(index, faults, freezes, Arc::clone(&tap.stats)));
                let seq = tap.next.fetch_add(1, Ordering::Relaxed);
                tap.cells.lock().insert(seq, Arc::clone(&cell));
                Incoming::new(
                    message.with_header(SEQ_HEADER, seq.to_string()),
                    TapDelivery {
                        inner: Some(delivery),
                        cell,
                        seq,
                        tap: Arc::clone(tap),
                    },
                )
            })
            .collect())
    }

    async fn close(self) {
        self.inner.close().await;
    }
}

impl TapAcker {
    /// Acks one delivery, unless its ack is planned to be lost; returns whether the broker took
    /// it (a lost ack counts as taken: the consumer cannot tell).
    pub(crate) fn ack_one(&self, d: &mut TapDelivery) -> bool {
        let stats = &self.inc.stats;
        let Some(inner) = d.take() else {
            return false;
        };
        if d.cell.faults.lost_ack {
            stats.faults.hit(Fault::LostAck);
            self.inner.lose_ack(inner);
            true
        } else {
            stats.ack_sent(d.cell.message);
            self.inner.try_ack(inner)
        }
    }

    /// Crashes the consumer if one of `deliveries` is planned to crash after `complete` (or
    /// the commit) and its handler did run.
    pub(crate) async fn crash_after_complete(&self, deliveries: &[TapDelivery]) {
        for d in deliveries {
            if d.cell.faults.crash == Some(CrashPoint::AfterComplete)
                && d.cell.ran.load(Ordering::Relaxed)
            {
                match self.inc.crash(Fault::CrashAfterComplete).await {}
            }
        }
    }

    fn window_of(&self, cell: &Cell) -> Window {
        if self.inc.frozen_since(cell.freezes_before) {
            Window::PauseTakeover
        } else {
            Window::Other
        }
    }
}

impl Acker for TapAcker {
    type Delivery = TapDelivery;

    async fn ack(&self, deliveries: Vec<TapDelivery>) -> Result<(), BrokerError> {
        self.inc
            .gate(async {
                self.crash_after_complete(&deliveries).await;
                for mut d in deliveries {
                    // Acked: executed with its completion durable, or replayed.
                    d.cell.recorded();
                    self.ack_one(&mut d);
                }
                Ok(())
            })
            .await
    }

    async fn nack(&self, mut delivery: TapDelivery, delay: Duration) -> Result<(), BrokerError> {
        self.inc
            .gate(async {
                delivery.cell.window(self.window_of(&delivery.cell));
                match delivery.take() {
                    Some(inner) => self.inner.nack(inner, delay).await,
                    None => Ok(()),
                }
            })
            .await
    }

    async fn dead_letter(
        &self,
        mut delivery: TapDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        // The harness sets no attempt limit, so nothing should get here; if something does, it
        // is counted, and its missing effect shows up as lost.
        let stats = &self.inc.stats;
        stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        stats.error(format!(
            "message {:?} dead-lettered: {reason}",
            message.message_id()
        ));
        self.inc
            .gate(async {
                delivery.cell.window(self.window_of(&delivery.cell));
                match delivery.take() {
                    Some(inner) => self.inner.dead_letter(inner, message, reason).await,
                    None => Ok(()),
                }
            })
            .await
    }
}
