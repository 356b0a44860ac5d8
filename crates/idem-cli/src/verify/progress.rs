//! A one-line progress bar on stderr, drawn only when stderr is a terminal (so `--json`, pipes
//! and CI logs stay clean).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::consumer::Stats;

const WIDTH: usize = 30;

/// A running progress bar; [`finish`](Progress::finish) replaces it with a summary line.
pub(crate) struct Progress {
    task: Option<(JoinHandle<()>, watch::Sender<bool>)>,
    mode: &'static str,
    total: u64,
}

impl Progress {
    /// Starts redrawing every 100 ms, if stderr is a terminal.
    pub(crate) fn start(mode: &'static str, total: u64, stats: Arc<Stats>) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                task: None,
                mode,
                total,
            };
        }
        let (stop, mut stopped) = watch::channel(false);
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => draw(mode, total, &stats, started),
                    _ = stopped.changed() => return,
                }
            }
        });
        Self {
            task: Some((task, stop)),
            mode,
            total,
        }
    }

    /// Stops redrawing and leaves one line saying how long the mode took.
    pub(crate) async fn finish(mut self, elapsed: Duration) {
        if let Some((task, stop)) = self.task.take() {
            let _ = stop.send(true);
            let _ = task.await;
            eprint!(
                "\r\x1b[2K{:<13} {} messages in {:.1} s\n",
                self.mode,
                self.total,
                elapsed.as_secs_f64()
            );
        }
    }
}

fn draw(mode: &str, total: u64, stats: &Stats, started: Instant) {
    let done = stats.acked().min(total);
    let filled = (done as usize * WIDTH)
        .checked_div(total as usize)
        .unwrap_or(WIDTH);
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
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
