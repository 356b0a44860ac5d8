//! The evidence a consumer process leaves behind: one append-only log per process, one line per
//! event, each written with a single `write()` so that a line is either on disk or not when
//! the process is killed (a SIGKILL cannot interrupt a `write()` to a regular file halfway).
//!
//! In naive and store mode, the `E` line **is** the effect: the transfer is applied by
//! appending it, so the log is the ledger and survives the kill. In transactional mode the
//! ledger is in the SQLite file and the log only tells what the consumer saw and did.
//!
//! | line | meaning |
//! |---|---|
//! | `R` | the consumer is connected and consuming |
//! | `D <msg> <seq> <count>` | delivery `seq` (numbered in this process) of transfer `msg`, the broker's delivery count |
//! | `T <msg> <seq>` | the claim of `seq` took over an expired lease |
//! | `E <msg> <seq> <token>` | the effect of `msg`, applied by delivery `seq` under claim `token` (0: no claim) |
//! | `O <outcome> <msg> <seq>` | transactional mode: idem's outcome for `seq` |
//! | `A <seq>` | the broker took the ack of `seq` (after `complete` was durable) |
//! | `F <seq>` | the ack of `seq` failed (the broker redelivers it) |
//! | `N <seq>` | `seq` was nacked for a later redelivery |
//! | `L <seq>` | `seq` was dead-lettered |
//! | `K <fault> <msg> <seq>` | the process is about to SIGKILL itself at a planned crash point |
//! | `! <text>` | something the consumer could not make sense of |

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tokio::time::Instant;

use crate::verify::faults::Fault;

/// A consumer's log, opened for appending.
#[derive(Debug)]
pub(crate) struct LogWriter {
    file: File,
}

impl LogWriter {
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: OpenOptions::new().create(true).append(true).open(path)?,
        })
    }

    /// Appends `text` (whole lines) with one `write()`.
    pub(crate) fn write(&self, text: &str) -> std::io::Result<()> {
        // A short write to a regular file happens only when the disk is full; `write_all`
        // then finishes the line or fails.
        (&self.file).write_all(text.as_bytes())
    }
}

/// One parsed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Line {
    Ready,
    Delivered { msg: u32, seq: u64, count: u32 },
    Takeover,
    Effect { msg: u32, seq: u64, token: u64 },
    Outcome { kind: String, n: u64 },
    Acked { seq: u64 },
    AckFailed,
    Nacked,
    DeadLettered,
    Killing { fault: Fault },
    Error(String),
}

impl Line {
    pub(crate) fn parse(line: &str) -> Line {
        let mut words = line.split(' ');
        let tag = words.next().unwrap_or("");
        let mut num = || words.next().and_then(|w| w.parse::<u64>().ok());
        let parsed = match tag {
            "R" => Some(Line::Ready),
            "D" => (|| {
                Some(Line::Delivered {
                    msg: u32::try_from(num()?).ok()?,
                    seq: num()?,
                    count: u32::try_from(num()?).ok()?,
                })
            })(),
            "T" => Some(Line::Takeover),
            "E" => (|| {
                Some(Line::Effect {
                    msg: u32::try_from(num()?).ok()?,
                    seq: num()?,
                    token: num()?,
                })
            })(),
            "A" => num().map(|seq| Line::Acked { seq }),
            "F" => Some(Line::AckFailed),
            "N" => Some(Line::Nacked),
            "L" => Some(Line::DeadLettered),
            "!" => Some(Line::Error(line.get(2..).unwrap_or("").to_owned())),
            _ => None,
        };
        let parsed = parsed.or_else(|| {
            let rest: Vec<&str> = line.split(' ').collect();
            match rest.as_slice() {
                ["O", kind, rest @ ..] => Some(Line::Outcome {
                    kind: (*kind).to_owned(),
                    // `O kind COUNT` from the runtime's counters; `O kind MSG SEQ` is one.
                    n: match rest {
                        [count] => count.parse().unwrap_or(1),
                        _ => 1,
                    },
                }),
                ["K", fault, ..] => Fault::ALL
                    .into_iter()
                    .find(|f| f.name() == *fault)
                    .map(|fault| Line::Killing { fault }),
                _ => None,
            }
        });
        parsed.unwrap_or_else(|| Line::Error(format!("unreadable log line {line:?}")))
    }
}

/// Reads the lines appended to a log since the last call.
#[derive(Debug)]
struct LogReader {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogReader {
    fn read_new(&mut self) -> std::io::Result<Vec<Line>> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            // Not created yet: the process has not started writing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines = Vec::new();
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            lines.push(Line::parse(line.trim_end_matches('\n')));
        }
        Ok(lines)
    }
}

/// One consumer process's share of the evidence.
#[derive(Debug)]
struct Incarnation {
    reader: LogReader,
    ready: bool,
    /// Delivery number -> transfer.
    seq_msg: HashMap<u64, u32>,
    /// `(msg, seq, token)` of every effect.
    effects: Vec<(u32, u64, u64)>,
    acked: HashSet<u64>,
    /// Planned crash points it reached (it killed itself at the first).
    killing: Vec<Fault>,
}

/// An applied effect whose ack was never logged: interrupted between its effect and its record,
/// unless its completion reached the store anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Suspect {
    pub(crate) msg: u32,
    pub(crate) token: u64,
    pub(crate) incarnation: u32,
}

/// Everything read from one mode's consumer logs.
#[derive(Debug)]
pub(crate) struct Tally {
    incarnations: BTreeMap<u32, Incarnation>,
    pub(crate) deliveries: Vec<u32>,
    pub(crate) effects: Vec<u32>,
    acked: Vec<bool>,
    /// Transfers with an `A` line: progress, for scheduling faults.
    pub(crate) acked_count: usize,
    delivered_count: usize,
    pub(crate) takeovers: u64,
    pub(crate) dead_letters: u64,
    pub(crate) outcomes: BTreeMap<String, u64>,
    pub(crate) errors: Vec<String>,
    /// When a delivery, effect, ack or nack was last logged.
    pub(crate) last_activity: Instant,
}

impl Tally {
    pub(crate) fn new(messages: usize) -> Self {
        Self {
            incarnations: BTreeMap::new(),
            deliveries: vec![0; messages],
            effects: vec![0; messages],
            acked: vec![false; messages],
            acked_count: 0,
            delivered_count: 0,
            takeovers: 0,
            dead_letters: 0,
            outcomes: BTreeMap::new(),
            errors: Vec::new(),
            last_activity: Instant::now(),
        }
    }

    /// Follows the log of a new consumer process.
    pub(crate) fn watch(&mut self, incarnation: u32, path: PathBuf) {
        self.incarnations.insert(
            incarnation,
            Incarnation {
                reader: LogReader {
                    path,
                    offset: 0,
                    partial: String::new(),
                },
                ready: false,
                seq_msg: HashMap::new(),
                effects: Vec::new(),
                acked: HashSet::new(),
                killing: Vec::new(),
            },
        );
    }

    pub(crate) fn is_ready(&self, incarnation: u32) -> bool {
        self.incarnations.get(&incarnation).is_some_and(|i| i.ready)
    }

    /// Whether every transfer was delivered at least once. Whether it was acked cannot be
    /// read from the logs alone: a consumer killed between the broker taking its ack and its
    /// `A` line leaves an ack the logs never show, so the end of a run is the broker's backlog.
    pub(crate) fn all_delivered(&self) -> bool {
        self.delivered_count == self.deliveries.len()
    }

    fn error(&mut self, what: String) {
        if self.errors.len() < 10 {
            self.errors.push(what);
        }
    }

    /// Reads what every log gained since the last call.
    pub(crate) fn read(&mut self) {
        let messages = self.deliveries.len();
        let mut errors = Vec::new();
        let mut active = false;
        for (n, inc) in &mut self.incarnations {
            let lines = match inc.reader.read_new() {
                Ok(lines) => lines,
                Err(e) => {
                    errors.push(format!(
                        "reading {}: {e}",
                        inc.reader.path.to_string_lossy()
                    ));
                    continue;
                }
            };
            for line in lines {
                match line {
                    Line::Ready => inc.ready = true,
                    Line::Delivered { msg, seq, .. } if (msg as usize) < messages => {
                        active = true;
                        if self.deliveries[msg as usize] == 0 {
                            self.delivered_count += 1;
                        }
                        self.deliveries[msg as usize] += 1;
                        inc.seq_msg.insert(seq, msg);
                    }
                    Line::Effect { msg, seq, token } if (msg as usize) < messages => {
                        active = true;
                        self.effects[msg as usize] += 1;
                        inc.effects.push((msg, seq, token));
                    }
                    Line::Delivered { msg, .. } | Line::Effect { msg, .. } => {
                        errors.push(format!("consumer {n} logged unknown transfer {msg}"));
                    }
                    Line::Takeover => self.takeovers += 1,
                    Line::Outcome { kind, n } => *self.outcomes.entry(kind).or_default() += n,
                    Line::Acked { seq } => {
                        active = true;
                        *self.outcomes.entry("acked".to_owned()).or_default() += 1;
                        inc.acked.insert(seq);
                        if let Some(&msg) = inc.seq_msg.get(&seq)
                            && !std::mem::replace(&mut self.acked[msg as usize], true)
                        {
                            self.acked_count += 1;
                        }
                    }
                    Line::AckFailed => {
                        *self.outcomes.entry("ack_failed".to_owned()).or_default() += 1;
                    }
                    Line::Nacked => {
                        active = true;
                        *self.outcomes.entry("nacked".to_owned()).or_default() += 1;
                    }
                    Line::DeadLettered => {
                        self.dead_letters += 1;
                        errors.push(format!(
                            "consumer {n} dead-lettered a transfer (verify sets no attempt limit)"
                        ));
                    }
                    Line::Killing { fault } => inc.killing.push(fault),
                    Line::Error(e) => errors.push(format!("consumer {n}: {e}")),
                }
            }
        }
        for e in errors {
            self.error(e);
        }
        if active {
            self.last_activity = Instant::now();
        }
    }

    /// Planned crash points reached, by fault.
    pub(crate) fn crash_points(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for inc in self.incarnations.values() {
            if let Some(f) = inc.killing.first() {
                *out.entry(f.name()).or_default() += 1;
            }
        }
        out
    }

    /// Effects whose delivery's ack was never logged.
    pub(crate) fn suspects(&self) -> Vec<Suspect> {
        let mut out = Vec::new();
        for (&incarnation, inc) in &self.incarnations {
            for &(msg, seq, token) in &inc.effects {
                if !inc.acked.contains(&seq) {
                    out.push(Suspect {
                        msg,
                        token,
                        incarnation,
                    });
                }
            }
        }
        out
    }

    /// Deliveries and deliveries beyond the first of each transfer.
    pub(crate) fn delivery_counts(&self) -> (u64, u64) {
        let total = self.deliveries.iter().map(|&d| u64::from(d)).sum();
        let dup = self
            .deliveries
            .iter()
            .map(|&d| u64::from(d.saturating_sub(1)))
            .sum();
        (total, dup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_garbage_is_an_error() {
        assert_eq!(
            Line::parse("D 7 3 2"),
            Line::Delivered {
                msg: 7,
                seq: 3,
                count: 2
            }
        );
        assert_eq!(
            Line::parse("E 7 3 99"),
            Line::Effect {
                msg: 7,
                seq: 3,
                token: 99
            }
        );
        assert_eq!(
            Line::parse("K crash_after_effect 7 3"),
            Line::Killing {
                fault: Fault::CrashAfterEffect
            }
        );
        assert!(matches!(Line::parse("E 7 x 1"), Line::Error(_)));
        assert!(matches!(Line::parse("Z"), Line::Error(_)));
    }

    #[test]
    fn the_tally_counts_effects_acks_and_suspects_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
        let mut tally = Tally::new(3);
        tally.watch(1, a.clone());
        tally.watch(2, b.clone());
        let la = LogWriter::open(&a).unwrap();
        la.write("R\nD 0 1 1\nD 1 2 1\nE 0 1 11\nE 1 2 12\nA 1\n")
            .unwrap();
        // A torn last line is not read until it is complete.
        la.write("K crash_after_effect 1").unwrap();
        tally.read();
        assert!(tally.is_ready(1) && !tally.is_ready(2));
        assert_eq!(tally.acked_count, 1);
        la.write(" 2\n").unwrap();
        let lb = LogWriter::open(&b).unwrap();
        lb.write("R\nD 1 1 2\nE 1 1 13\nA 1\nD 2 2 1\nE 2 2 14\nA 2\n")
            .unwrap();
        tally.read();
        assert!(tally.all_delivered());
        assert_eq!(tally.acked_count, 3);
        assert_eq!(tally.effects, [1, 2, 1]);
        assert_eq!(tally.delivery_counts(), (4, 1));
        assert_eq!(
            tally.suspects(),
            [Suspect {
                msg: 1,
                token: 12,
                incarnation: 1
            }]
        );
        assert_eq!(tally.crash_points().get("crash_after_effect"), Some(&1));
    }
}
