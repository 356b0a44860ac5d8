//! The bookkeeping behind [`KafkaSource`](super::KafkaSource), with no I/O: per assigned
//! partition, the messages fetched and not settled yet, which of them may be handed out now
//! (record-key lanes), nacked ones waiting for their redelivery time, the offset that may be
//! committed (the first unsettled one), and whether the partition should be paused.
//!
//! Every delivery carries its partition's *epoch*: a partition assigned again gets a new one,
//! so that a late ack of an earlier assignment settles nothing.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

use bytes::Bytes;
use tokio::time::Instant;

use crate::message::Message;

/// Which messages of a partition must not run at the same time: those of one lane.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Lane {
    /// No constraint (a message without a record key, in per-key order).
    Free,
    /// Messages with this record key.
    Key(Bytes),
    /// The whole partition (strict partition order).
    Partition,
}

/// A message as the poller fetched it.
#[derive(Debug)]
pub(super) struct Fetched {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) lane: Lane,
    pub(super) message: Message,
}

/// Where one delivery is: partition, offset, and the partition's epoch when it was handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Spot {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Behind another message of its lane.
    Waiting,
    /// In the ready queue.
    Ready,
    /// Handed out, not settled.
    Out,
    /// Nacked: ready again at its timer.
    Parked,
}

#[derive(Debug)]
struct Entry {
    message: Message,
    lane: Lane,
    status: Status,
    deliveries: u32,
}

#[derive(Debug)]
struct Part {
    epoch: u64,
    /// Fetched and not settled, by offset.
    entries: BTreeMap<i64, Entry>,
    /// The offsets of each constrained lane, oldest first; the first is the one that may run.
    lanes: HashMap<Lane, VecDeque<i64>>,
    /// The offset after the last one fetched in this assignment.
    fetched_upto: Option<i64>,
    /// The last offset committed (or being committed) in this assignment.
    committed: Option<i64>,
    paused: bool,
}

impl Part {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            entries: BTreeMap::new(),
            lanes: HashMap::new(),
            fetched_upto: None,
            committed: None,
            paused: false,
        }
    }

    /// The offset to commit: the first unsettled one, or past the last fetched.
    fn point(&self) -> Option<i64> {
        self.entries
            .first_key_value()
            .map(|(o, _)| *o)
            .or(self.fetched_upto)
    }
}

/// The state of all assigned partitions.
#[derive(Debug)]
pub(super) struct State {
    parts: HashMap<i32, Part>,
    ready: VecDeque<Spot>,
    timers: BinaryHeap<Reverse<(Instant, Spot)>>,
    epochs: u64,
    max_held: usize,
}

/// Partitions to pause and to resume.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Flow {
    pub(super) pause: Vec<i32>,
    pub(super) resume: Vec<i32>,
}

impl State {
    /// No partition yet; partitions holding more than `max_held` unsettled messages pause.
    pub(super) fn new(max_held: usize) -> Self {
        Self {
            parts: HashMap::new(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            epochs: 0,
            max_held: max_held.max(1),
        }
    }

    /// Partitions were assigned: each starts afresh, in a new epoch.
    pub(super) fn assign(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            self.epochs += 1;
            self.parts.insert(p, Part::new(self.epochs));
        }
    }

    /// Partitions were revoked: returns the offsets to commit for them (those that moved
    /// since the last commit) and forgets them.
    pub(super) fn revoke(&mut self, partitions: impl IntoIterator<Item = i32>) -> Vec<(i32, i64)> {
        let mut points = Vec::new();
        for p in partitions {
            if let Some(part) = self.parts.remove(&p)
                && let Some(point) = part.point()
                && part.committed.is_none_or(|c| point > c)
            {
                points.push((p, point));
            }
        }
        points
    }

    /// Partitions were lost: forgets them without committing.
    pub(super) fn lose(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            self.parts.remove(&p);
        }
    }

    /// The partitions held now.
    #[cfg(test)]
    pub(super) fn partitions(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.parts.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Adds fetched messages; returns whether one became ready. Messages of partitions not
    /// held, or already fetched in this assignment, are dropped.
    pub(super) fn insert(&mut self, fetched: impl IntoIterator<Item = Fetched>) -> bool {
        let mut woke = false;
        for f in fetched {
            let Some(part) = self.parts.get_mut(&f.partition) else {
                continue;
            };
            if part.fetched_upto.is_some_and(|upto| f.offset < upto) {
                continue;
            }
            part.fetched_upto = Some(f.offset + 1);
            let status = match &f.lane {
                Lane::Free => Status::Ready,
                lane => {
                    let queue = part.lanes.entry(lane.clone()).or_default();
                    queue.push_back(f.offset);
                    if queue.len() == 1 {
                        Status::Ready
                    } else {
                        Status::Waiting
                    }
                }
            };
            if status == Status::Ready {
                self.ready.push_back(Spot {
                    partition: f.partition,
                    offset: f.offset,
                    epoch: part.epoch,
                });
                woke = true;
            }
            part.entries.insert(
                f.offset,
                Entry {
                    message: f.message,
                    lane: f.lane,
                    status,
                    deliveries: 0,
                },
            );
        }
        woke
    }

    /// Hands out up to `max` ready messages (nacked ones whose time has come first), each with
    /// its delivery count.
    pub(super) fn take(&mut self, max: usize, now: Instant) -> Vec<(Message, Spot)> {
        self.wake_due(now);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(spot) = self.ready.pop_front() else {
                break;
            };
            let Some(entry) = self.entry(spot) else {
                continue;
            };
            if entry.status != Status::Ready {
                continue;
            }
            entry.status = Status::Out;
            entry.deliveries += 1;
            let message = entry.message.clone().with_delivery_count(entry.deliveries);
            out.push((message, spot));
        }
        out
    }

    /// When the next nacked message is due, if any.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    fn wake_due(&mut self, now: Instant) {
        while let Some(Reverse((at, spot))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(entry) = self.entry(spot)
                && entry.status == Status::Parked
            {
                entry.status = Status::Ready;
                self.ready.push_back(spot);
            }
        }
    }

    fn entry(&mut self, spot: Spot) -> Option<&mut Entry> {
        let part = self.parts.get_mut(&spot.partition)?;
        if part.epoch != spot.epoch {
            return None;
        }
        part.entries.get_mut(&spot.offset)
    }

    /// A delivery was settled (acked, or dead-lettered and confirmed): forgets it, and lets
    /// the next message of its lane go. Returns whether a message became ready. A delivery
    /// of an earlier assignment, or not handed out, settles nothing.
    pub(super) fn settle(&mut self, spot: Spot) -> bool {
        let Some(part) = self.parts.get_mut(&spot.partition) else {
            return false;
        };
        if part.epoch != spot.epoch
            || part
                .entries
                .get(&spot.offset)
                .is_none_or(|e| e.status != Status::Out)
        {
            return false;
        }
        let Some(entry) = part.entries.remove(&spot.offset) else {
            return false;
        };
        if entry.lane == Lane::Free {
            return false;
        }
        let Some(queue) = part.lanes.get_mut(&entry.lane) else {
            return false;
        };
        queue.retain(|o| *o != spot.offset);
        let Some(&next) = queue.front() else {
            part.lanes.remove(&entry.lane);
            return false;
        };
        match part.entries.get_mut(&next) {
            Some(e) if e.status == Status::Waiting => {
                e.status = Status::Ready;
                self.ready.push_back(Spot {
                    partition: spot.partition,
                    offset: next,
                    epoch: part.epoch,
                });
                true
            }
            _ => false,
        }
    }

    /// A delivery is to be handed out again at `at` (a nack, or a delivery dropped unsettled);
    /// its lane stays blocked behind it and the commit point stays at it.
    pub(super) fn park(&mut self, spot: Spot, at: Instant) {
        if let Some(entry) = self.entry(spot)
            && entry.status == Status::Out
        {
            entry.status = Status::Parked;
            self.timers.push(Reverse((at, spot)));
        }
    }

    /// The offsets to commit now (partitions whose point moved since their last commit),
    /// which count as committed from here on (see [`uncommit`](State::uncommit)).
    pub(super) fn commit_points(&mut self) -> Vec<(i32, i64)> {
        let mut points = Vec::new();
        for (p, part) in &mut self.parts {
            if let Some(point) = part.point()
                && part.committed.is_none_or(|c| point > c)
            {
                part.committed = Some(point);
                points.push((*p, point));
            }
        }
        points.sort_unstable();
        points
    }

    /// A commit of these partitions failed: commit them again next time.
    pub(super) fn uncommit(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            if let Some(part) = self.parts.get_mut(&p) {
                part.committed = None;
            }
        }
    }

    /// Partitions to pause (holding more than `max_held`) and to resume (paused, holding half
    /// as many or fewer); their paused flags are updated.
    pub(super) fn flow(&mut self) -> Flow {
        let mut flow = Flow::default();
        for (p, part) in &mut self.parts {
            let held = part.entries.len();
            if !part.paused && held > self.max_held {
                part.paused = true;
                flow.pause.push(*p);
            } else if part.paused && held <= self.max_held / 2 {
                part.paused = false;
                flow.resume.push(*p);
            }
        }
        flow
    }

    /// Whether a partition is paused.
    pub(super) fn any_paused(&self) -> bool {
        self.parts.values().any(|p| p.paused)
    }

    /// Messages held (fetched and unsettled) in all partitions.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.parts.values().map(|p| p.entries.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fetched(partition: i32, offset: i64, key: Option<&str>) -> Fetched {
        let lane = match key {
            Some(k) => Lane::Key(Bytes::copy_from_slice(k.as_bytes())),
            None => Lane::Free,
        };
        Fetched {
            partition,
            offset,
            lane,
            message: Message::new("t", Bytes::new())
                .with_message_id(format!("{partition}-{offset}")),
        }
    }

    fn ids(got: &[(Message, Spot)]) -> Vec<i64> {
        got.iter().map(|(_, s)| s.offset).collect()
    }

    #[test]
    fn the_commit_point_is_the_first_unsettled_offset() {
        let mut st = State::new(100);
        st.assign([0]);
        assert_eq!(st.commit_points(), vec![]);
        st.insert((10..15).map(|o| fetched(0, o, None)));
        let now = Instant::now();
        let got = st.take(10, now);
        assert_eq!(ids(&got), [10, 11, 12, 13, 14]);
        assert_eq!(st.commit_points(), vec![(0, 10)]);
        // Settled out of order: 11 and 13 do not move the point past 10.
        st.settle(got[1].1);
        st.settle(got[3].1);
        assert_eq!(st.commit_points(), vec![]);
        st.settle(got[0].1);
        assert_eq!(st.commit_points(), vec![(0, 12)]);
        st.settle(got[2].1);
        st.settle(got[4].1);
        assert_eq!(st.commit_points(), vec![(0, 15)]);
        assert_eq!(st.commit_points(), vec![], "nothing moved");
        // A gap in the offsets (compaction) is passed.
        st.insert([fetched(0, 20, None)]);
        let got = st.take(10, now);
        st.settle(got[0].1);
        assert_eq!(st.commit_points(), vec![(0, 21)]);
    }

    #[test]
    fn a_parked_message_holds_the_point_and_its_key() {
        let mut st = State::new(100);
        st.assign([0]);
        st.insert([
            fetched(0, 0, Some("a")),
            fetched(0, 1, Some("b")),
            fetched(0, 2, Some("a")),
            fetched(0, 3, None),
        ]);
        let now = Instant::now();
        let got = st.take(10, now);
        assert_eq!(ids(&got), [0, 1, 3], "2 waits behind 0 (key a)");
        st.park(got[0].1, now + Duration::from_millis(500));
        st.settle(got[1].1);
        st.settle(got[2].1);
        assert_eq!(st.commit_points(), vec![(0, 0)], "never past the parked 0");
        assert!(st.take(10, now).is_empty(), "2 still waits; 0 not due");
        assert_eq!(st.next_due(), Some(now + Duration::from_millis(500)));
        let again = st.take(10, now + Duration::from_millis(500));
        assert_eq!(ids(&again), [0]);
        assert_eq!(again[0].0.delivery_count(), 2);
        assert!(st.settle(again[0].1), "2 may go now");
        let last = st.take(10, now);
        assert_eq!(ids(&last), [2]);
        assert_eq!(last[0].0.delivery_count(), 1);
        st.settle(last[0].1);
        assert_eq!(st.commit_points(), vec![(0, 4)]);
        assert_eq!(st.held(), 0);
    }

    #[test]
    fn strict_order_runs_one_message_of_a_partition_at_a_time() {
        let mut st = State::new(100);
        st.assign([0, 1]);
        st.insert((0..3).flat_map(|o| {
            [0, 1].map(|p| Fetched {
                lane: Lane::Partition,
                ..fetched(p, o, None)
            })
        }));
        let now = Instant::now();
        for expected in 0..3 {
            let got = st.take(10, now);
            assert_eq!(ids(&got), [expected, expected], "one per partition");
            assert!(st.take(10, now).is_empty());
            for (_, spot) in got {
                st.settle(spot);
            }
        }
        assert_eq!(st.commit_points(), vec![(0, 3), (1, 3)]);
    }

    #[test]
    fn a_new_assignment_ignores_old_acks_and_revoke_commits_the_point() {
        let mut st = State::new(100);
        st.assign([0]);
        st.insert([fetched(0, 0, None), fetched(0, 1, None)]);
        let now = Instant::now();
        let old = st.take(10, now);
        st.settle(old[0].1);
        assert_eq!(st.revoke([0]), vec![(0, 1)]);
        st.assign([0]);
        // The new owner starts from the commit: offset 1 comes again.
        st.insert([fetched(0, 1, None)]);
        assert!(!st.settle(old[1].1));
        assert_eq!(
            st.commit_points(),
            vec![(0, 1)],
            "the old ack settled nothing"
        );
        let new = st.take(10, now);
        assert_eq!(ids(&new), [1]);
        st.settle(new[0].1);
        st.lose([0]);
        assert_eq!(st.revoke([0]), vec![], "a lost partition commits nothing");
        assert_eq!(st.partitions(), Vec::<i32>::new());
    }

    #[test]
    fn partitions_pause_when_full_and_resume_at_half() {
        let mut st = State::new(4);
        st.assign([0]);
        st.insert((0..5).map(|o| fetched(0, o, None)));
        assert_eq!(
            st.flow(),
            Flow {
                pause: vec![0],
                resume: vec![]
            }
        );
        assert!(st.any_paused());
        let got = st.take(10, Instant::now());
        for (_, spot) in &got[..2] {
            st.settle(*spot);
        }
        assert_eq!(st.flow(), Flow::default(), "3 held: still above half");
        st.settle(got[2].1);
        assert_eq!(
            st.flow(),
            Flow {
                pause: vec![],
                resume: vec![0]
            }
        );
        // Refetched messages (librdkafka fetches again after a resume) are not taken twice.
        st.insert((3..6).map(|o| fetched(0, o, None)));
        assert_eq!(st.held(), 3, "3 and 4 held once, 5 added");
    }
}
