//! The consumer processes of one mode: `verify` starts one per slot, SIGKILLs them at random,
//! notices the ones that killed themselves at a planned crash point, and starts every dead one
//! again (a new process: a new incarnation, a new log) after a short pause, as a supervisor
//! (systemd, Kubernetes) would.

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;

use super::log::Tally;

/// A slot that fails this many times in a row (exits with an error, not killed) stops the run.
const MAX_FAILURES: u32 = 15;

struct Running {
    child: Child,
    /// Closing it asks the consumer to stop gracefully.
    stdin: Option<ChildStdin>,
    incarnation: u32,
    killed_by_us: bool,
}

struct Slot {
    running: Option<Running>,
    restart_at: Option<Instant>,
    failures: u32,
}

/// The consumer processes of one mode.
/// The environment variable that gives a consumer process its store.
pub(crate) const STORE_ENV: &str = "IDEM_VERIFY_STORE";

pub(crate) struct Fleet {
    exe: PathBuf,
    spec: PathBuf,
    /// The consumers' store, passed in their environment (`IDEM_VERIFY_STORE`), never written
    /// to disk: a store URL may hold a password.
    store: String,
    dir: PathBuf,
    prefix: String,
    slots: Vec<Slot>,
    next_incarnation: u32,
    rng: fastrand::Rng,
    /// Processes started, the first of each slot included.
    pub(crate) spawned: u64,
    /// Processes `verify` SIGKILLed.
    pub(crate) random_kills: u64,
    /// Processes that SIGKILLed themselves at a planned crash point.
    pub(crate) self_kills: u64,
    /// Processes that died of SIGKILL, by incarnation.
    pub(crate) killed: HashSet<u32>,
    /// When a process last started, died or was killed.
    pub(crate) last_event: Instant,
    pub(crate) errors: Vec<String>,
}

impl Fleet {
    /// Starts `slots` consumer processes of the spec at `spec`, logging into `dir` under
    /// `prefix`.
    pub(crate) fn start(
        spec: &Path,
        store: &str,
        dir: &Path,
        prefix: &str,
        slots: usize,
        seed: u64,
        tally: &mut Tally,
    ) -> anyhow::Result<Self> {
        let mut fleet = Self {
            exe: std::env::current_exe().context("finding the idem executable")?,
            spec: spec.to_owned(),
            store: store.to_owned(),
            dir: dir.to_owned(),
            prefix: prefix.to_owned(),
            slots: (0..slots)
                .map(|_| Slot {
                    running: None,
                    restart_at: None,
                    failures: 0,
                })
                .collect(),
            next_incarnation: 1,
            rng: fastrand::Rng::with_seed(seed),
            spawned: 0,
            random_kills: 0,
            self_kills: 0,
            killed: HashSet::new(),
            last_event: Instant::now(),
            errors: Vec::new(),
        };
        for slot in 0..slots {
            fleet.spawn(slot, tally)?;
        }
        Ok(fleet)
    }

    fn paths(&self, incarnation: u32) -> (PathBuf, PathBuf) {
        let stem = format!("{}-{incarnation:04}", self.prefix);
        (
            self.dir.join(format!("{stem}.log")),
            self.dir.join(format!("{stem}.err")),
        )
    }

    fn spawn(&mut self, slot: usize, tally: &mut Tally) -> anyhow::Result<()> {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let (log, err) = self.paths(incarnation);
        let stderr =
            std::fs::File::create(&err).with_context(|| format!("creating {}", err.display()))?;
        tally.watch(incarnation, log.clone());
        let mut child = Command::new(&self.exe)
            .env(STORE_ENV, &self.store)
            .arg("__verify-consumer")
            .arg("--spec")
            .arg(&self.spec)
            .arg("--slot")
            .arg(slot.to_string())
            .arg("--incarnation")
            .arg(incarnation.to_string())
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting a consumer process")?;
        let stdin = child.stdin.take();
        self.slots[slot].running = Some(Running {
            child,
            stdin,
            incarnation,
            killed_by_us: false,
        });
        self.slots[slot].restart_at = None;
        self.spawned += 1;
        self.last_event = Instant::now();
        Ok(())
    }

    /// Reaps dead processes and starts the ones due again. Fails when a slot keeps failing
    /// on its own (it cannot connect, its store is broken...): the run cannot go on.
    pub(crate) fn poll(&mut self, tally: &mut Tally) -> anyhow::Result<()> {
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            let exited = match self.slots[slot].running.as_mut() {
                Some(r) => match r.child.try_wait() {
                    Ok(Some(status)) => Some(status),
                    Ok(None) => None,
                    Err(e) => bail!("waiting for a consumer process: {e}"),
                },
                None => None,
            };
            if let Some(status) = exited
                && let Some(r) = self.slots[slot].running.take()
            {
                self.last_event = now;
                let (_, err) = self.paths(r.incarnation);
                let s = &mut self.slots[slot];
                if status.signal() == Some(9) {
                    // Killed: by us, or by itself at a planned crash point.
                    if !r.killed_by_us {
                        self.self_kills += 1;
                    }
                    self.killed.insert(r.incarnation);
                    s.failures = 0;
                    s.restart_at = Some(now + Duration::from_millis(self.rng.u64(50..=300)));
                } else {
                    s.failures += 1;
                    let tail = tail(&err);
                    let what = format!(
                        "consumer process {} (slot {slot}) exited with {status}: {tail}",
                        r.incarnation
                    );
                    if s.failures >= MAX_FAILURES {
                        bail!("{what} (failed {MAX_FAILURES} times in a row; giving up)");
                    }
                    if self.errors.len() < 10 {
                        self.errors.push(what);
                    }
                    let backoff = 100 * u64::from(s.failures.min(20));
                    s.restart_at = Some(now + Duration::from_millis(backoff));
                }
            }
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot]
                .restart_at
                .is_some_and(|at| at <= Instant::now())
            {
                self.spawn(slot, tally)?;
            }
        }
        Ok(())
    }

    /// SIGKILLs one running consumer process chosen at random; returns whether there was one.
    pub(crate) fn kill_random(&mut self) -> bool {
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|&s| {
                self.slots[s]
                    .running
                    .as_ref()
                    .is_some_and(|r| !r.killed_by_us)
            })
            .collect();
        if live.is_empty() {
            return false;
        }
        let slot = live[self.rng.usize(..live.len())];
        let Some(r) = self.slots[slot].running.as_mut() else {
            return false;
        };
        if r.child.start_kill().is_err() {
            return false;
        }
        r.killed_by_us = true;
        self.random_kills += 1;
        self.last_event = Instant::now();
        true
    }

    /// Whether every slot runs a process that is connected and consuming.
    pub(crate) fn all_ready(&self, tally: &Tally) -> bool {
        self.slots.iter().all(|s| {
            s.running
                .as_ref()
                .is_some_and(|r| !r.killed_by_us && tally.is_ready(r.incarnation))
        })
    }

    /// Starts a fresh process in every slot that has none (after [`stop`](Fleet::stop)).
    pub(crate) fn restart_all(&mut self, tally: &mut Tally) -> anyhow::Result<()> {
        for slot in 0..self.slots.len() {
            if self.slots[slot].running.is_none() {
                self.spawn(slot, tally)?;
            }
        }
        Ok(())
    }

    /// Asks every process to stop (closes its standard input), waits up to `grace` for them to
    /// settle what they hold and exit, then SIGKILLs the rest.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        for s in &mut self.slots {
            s.restart_at = None;
            if let Some(r) = s.running.as_mut() {
                r.stdin.take();
            }
        }
        let deadline = Instant::now() + grace;
        for s in &mut self.slots {
            if let Some(mut r) = s.running.take() {
                match tokio::time::timeout_at(deadline, r.child.wait()).await {
                    // It reached a planned crash point while settling what it held.
                    Ok(Ok(status)) if status.signal() == Some(9) => {
                        self.self_kills += 1;
                        self.killed.insert(r.incarnation);
                    }
                    Ok(Ok(_)) => {}
                    _ => {
                        let _ = r.child.kill().await;
                        self.killed.insert(r.incarnation);
                    }
                }
            }
        }
    }
}

/// The last lines of a consumer's stderr.
pub(super) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "(no output)".to_owned()
    } else {
        tail
    }
}
