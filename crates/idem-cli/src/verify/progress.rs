//! Progress on stderr, the harness's [`Observer`]: a one-line bar redrawn every 100 ms when
//! stderr is a terminal; otherwise (CI logs, pipes) a plain heartbeat line every 10 s, so that
//! a long run is never silent for minutes. `--json` output goes to stdout and is unaffected.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_verify::{ModeName, Observer, Stats};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WIDTH: usize = 30;
/// Between two heartbeat lines when stderr is not a terminal.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// The mode running: its redraw task, how to stop it, and its message count.
struct Running {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    total: u64,
}

/// The progress of the mode running, if any.
#[derive(Default)]
pub(crate) struct Progress {
    running: Mutex<Option<Running>>,
}

impl Observer for Progress {
    /// Starts redrawing (a terminal) or the heartbeat (anything else).
    fn mode_started(&self, mode: ModeName, total: u64, stats: &Arc<Stats>) {
        let terminal = std::io::stderr().is_terminal();
        let (stop, mut stopped) = watch::channel(false);
        let started = Instant::now();
        let stats = Arc::clone(stats);
        let every = if terminal {
            Duration::from_millis(100)
        } else {
            HEARTBEAT
        };
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if terminal {
                            draw(mode.as_str(), total, &stats, started);
                        } else {
                            heartbeat(mode.as_str(), total, &stats, started);
                        }
                    }
                    _ = stopped.changed() => return,
                }
            }
        });
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Running { task, stop, total });
    }

    /// Stops the progress and leaves one line saying how long the mode took.
    fn mode_finished(
        &self,
        mode: ModeName,
        elapsed: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Box::pin(async move {
            if let Some(Running { task, stop, total }) = running {
                let _ = stop.send(true);
                let _ = task.await;
                let clear = if std::io::stderr().is_terminal() {
                    "\r\x1b[2K"
                } else {
                    ""
                };
                eprintln!(
                    "{clear}{:<13} {total} messages in {:.1} s",
                    mode.as_str(),
                    elapsed.as_secs_f64()
                );
            }
        })
    }
}

fn rate(done: u64, started: Instant) -> f64 {
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let done = done as f64;
    done / started.elapsed().as_secs_f64().max(1e-3)
}

fn draw(mode: &str, total: u64, stats: &Stats, started: Instant) {
    let done = stats.acked().min(total);
    let filled = (done as usize * WIDTH)
        .checked_div(total as usize)
        .unwrap_or(WIDTH);
    let rate = rate(done, started);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r\x1b[2K{mode:<13} [{}{}] {done}/{total}  {} deliveries  {rate:.0} msg/s",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        stats.total_deliveries(),
    );
    let _ = err.flush();
}

fn heartbeat(mode: &str, total: u64, stats: &Stats, started: Instant) {
    let done = stats.acked().min(total);
    eprintln!(
        "idem verify: {mode}: {done}/{total} messages acked, {} deliveries, {:.0} msg/s, {:.0} s",
        stats.total_deliveries(),
        rate(done, started),
        started.elapsed().as_secs_f64()
    );
}
