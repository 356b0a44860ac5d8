//! Naive mode: a plain at-least-once consumer with no deduplication. It receives up to
//! `prefetch` deliveries, processes each in a task of its own (apply the effect, then ack), and
//! meets the same faults as the idem modes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use idem_broker::{Incoming, Source};
use tokio::task::JoinSet;

use crate::faults::{CrashPoint, Fault};
use crate::harness::Stalls;
use crate::incarnation::Incarnation;
use crate::ledger::Effect;
use crate::stats::{Stats, Window};
use crate::tap::{Tap, TapAcker, TapDelivery, TapSource};
use crate::workload::Workload;
use idem_broker::memory::MemoryBroker;

/// What every naive consumer of a run shares.
pub(crate) struct NaiveCtx<E> {
    pub(crate) broker: MemoryBroker,
    pub(crate) tap: Arc<Tap>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) effect: Arc<E>,
    pub(crate) workload: Arc<Workload>,
    pub(crate) stalls: Stalls,
    pub(crate) prefetch: usize,
}

/// One naive consumer, started again after every crash, until the broker is drained and every
/// delivery it held has finished (paused ones included: their late attempt to finish is part of
/// the test).
pub(crate) async fn supervise<E: Effect>(ctx: Arc<NaiveCtx<E>>) {
    loop {
        let source = ctx.broker.source();
        let inc = Arc::new(Incarnation::new(
            Arc::clone(&ctx.stats),
            source.connection(),
        ));
        let source = TapSource::new(source, Arc::clone(&inc), Arc::clone(&ctx.tap));
        let run = inc.gate(consume(&ctx, &inc, source));
        tokio::select! {
            biased;
            () = inc.crash.notify.notified() => {
                // Dropping the consumer aborts every delivery task it runs.
                ctx.stats.restarts.fetch_add(1, Ordering::Relaxed);
            }
            () = run => return,
        }
    }
}

/// Runs until the broker is drained and every delivery taken has finished.
async fn consume<E: Effect>(ctx: &Arc<NaiveCtx<E>>, inc: &Arc<Incarnation>, mut source: TapSource) {
    let acker = source.acker();
    let mut inflight = JoinSet::new();
    let mut drained = false;
    let broker = ctx.broker.clone();
    let mut drained_signal = std::pin::pin!(async move { broker.drained().await });
    loop {
        if drained && inflight.is_empty() {
            return;
        }
        let room = ctx.prefetch.saturating_sub(inflight.len());
        tokio::select! {
            biased;
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                if let Err(e) = done {
                    ctx.stats.error(format!("a delivery task failed: {e}"));
                }
            }
            () = &mut drained_signal, if !drained => drained = true,
            got = source.receive(room), if room > 0 && !drained => match got {
                Ok(batch) => {
                    for d in batch {
                        let work = process(Arc::clone(ctx), Arc::clone(inc), acker.clone(), d);
                        inflight.spawn(inc.gate(work));
                    }
                }
                // Only a crash cuts the connection, and then the supervisor drops this loop.
                Err(_) => std::future::pending::<()>().await,
            },
        }
    }
}

/// One delivery: the planned faults around the effect, then the ack.
async fn process<E: Effect>(
    ctx: Arc<NaiveCtx<E>>,
    inc: Arc<Incarnation>,
    acker: TapAcker,
    incoming: Incoming<TapDelivery>,
) {
    let mut d = incoming.delivery;
    let cell = Arc::clone(&d.cell);
    let Some(&transfer) = ctx.workload.transfers.get(cell.message as usize) else {
        return;
    };
    let f = cell.faults;
    if f.crash == Some(CrashPoint::BeforeEffect) {
        match inc.crash(Fault::CrashBefore).await {}
    }
    if f.slow {
        inc.slow(ctx.stalls.slow).await;
    }
    ctx.effect.apply(cell.message, transfer).await;
    cell.applied(None);
    ctx.stats.outcome("applied");
    if f.crash == Some(CrashPoint::AfterEffect) {
        match inc.crash(Fault::CrashAfterEffect).await {}
    }
    if f.pause {
        inc.pause(ctx.stalls.pause).await;
    }
    if f.crash == Some(CrashPoint::AfterComplete) {
        match inc.crash(Fault::CrashAfterComplete).await {}
    }
    let taken = acker.ack_one(&mut d);
    if !taken && inc.is_dead() {
        // Naive mode's only record is the ack, and this consumer died before it.
        cell.window(Window::Crash);
    } else if !taken && inc.frozen_since(cell.freezes_before) {
        // The ack came too late: the message timed out while this consumer was frozen and
        // went to another consumer.
        cell.window(Window::PauseTakeover);
    }
    cell.recorded();
    drop(d);
}
