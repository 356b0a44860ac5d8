//! [`MemoryStore`]: records in process memory, for tests and single-process consumers.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashTable;
use parking_lot::Mutex;

use crate::error::StoreError;
use crate::key::Key;
use crate::record::{Clock, Record, State, SystemClock, Timestamp, Token};
use crate::store::{
    Claim, ClaimRequest, Completion, DEFAULT_MAX_RESULT_BYTES, Inspect, Store, WriteOutcome,
    check_result_size,
};
use crate::transition::{self, Change};

const SHARDS: usize = 64;

// Slots are `Option<Record>` so that a transition runs on the slot in place; a slot is never
// left `None` in the table (only claims create records, and `evict` removes the entry). A
// `HashTable` lets one hash of the key choose the shard and the bucket.
type Shard = Mutex<HashTable<(Key, Option<Record>)>>;

/// A [`Store`] in process memory: fast, exact, and gone when the process exits.
///
/// Use it in tests and for consumers whose duplicates all arrive within one process lifetime.
/// Records live in 64 independently locked shards; every operation is atomic within its shard,
/// and no lock is held across an `.await`. Clones share the same records.
///
/// ```
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Claim, ClaimRequest, Fingerprint, MemoryStore, Namespace, Store};
/// let store = MemoryStore::new();
/// let key = Namespace::new("emails")?.key("msg-1")?;
/// let claim = store.claim(&ClaimRequest::new(key, Fingerprint::of(b"hi"))).await?;
/// assert!(matches!(claim, Claim::Acquired(_)));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Shard]>,
    // Randomly seeded: keys come from producers, so a fixed seed would invite hash flooding.
    hasher: foldhash::fast::RandomState,
    clock: Arc<dyn Clock>,
    max_result_bytes: usize,
    /// The shard the next purge starts at: successive bounded purges go round the shards
    /// instead of scanning the first ones again every time.
    purge_from: std::sync::atomic::AtomicUsize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }

    /// An empty store on `clock` (a [`ManualClock`](crate::ManualClock) in tests).
    pub fn with_clock(clock: impl Clock) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
                hasher,
                clock: Arc::new(clock),
                max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
                purge_from: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// Sets the largest result `complete` accepts (default 64 KiB).
    ///
    /// # Panics
    /// If the store has been cloned already (set limits before sharing it).
    #[must_use]
    pub fn max_result_bytes(mut self, limit: usize) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configure MemoryStore before cloning it")
            .max_result_bytes = limit;
        self
    }

    /// How many records the store holds (expired ones included until purged).
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().iter().filter(|(_, r)| r.is_some()).count())
            .sum()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hash(&self, key: &Key) -> u64 {
        self.inner.hasher.hash_one(key)
    }

    /// The shard of a hash: middle bits, independent of the bits the table uses for the bucket
    /// (low) and the control byte (top 7).
    fn shard(&self, hash: u64) -> &Shard {
        &self.inner.shards[(hash >> 32) as usize % SHARDS]
    }

    fn clock_now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Runs a transition on one key's slot under its shard lock.
    fn with_slot<R>(
        &self,
        key: &Key,
        f: impl FnOnce(&mut Option<Record>, Timestamp) -> (R, Change),
    ) -> R {
        self.with_slot_at(key, self.clock_now(), f)
    }

    fn with_slot_at<R>(
        &self,
        key: &Key,
        now: Timestamp,
        f: impl FnOnce(&mut Option<Record>, Timestamp) -> (R, Change),
    ) -> R {
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        if let Some((_, slot)) = shard.find_mut(hash, |(k, _)| k == key) {
            return f(slot, now).0;
        }
        let mut slot = None;
        let (out, _) = f(&mut slot, now);
        if slot.is_some() {
            let hasher = &self.inner.hasher;
            shard.insert_unique(hash, (key.clone(), slot), |(k, _)| hasher.hash_one(k));
        }
        out
    }

    fn claim_at(&self, req: &ClaimRequest, now: Timestamp) -> Claim {
        self.with_slot_at(&req.key, now, |slot, now| transition::claim(slot, req, now))
    }

    fn complete_at(&self, c: &Completion, now: Timestamp) -> WriteOutcome {
        self.with_slot_at(&c.key, now, |slot, now| transition::complete(slot, c, now))
    }
}

impl Store for MemoryStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        Ok(self.claim_at(req, self.clock_now()))
    }

    async fn claim_many(&self, reqs: &[ClaimRequest]) -> Result<Vec<Claim>, StoreError> {
        let now = self.clock_now();
        Ok(reqs.iter().map(|r| self.claim_at(r, now)).collect())
    }

    async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
        check_result_size(&c.result, self.inner.max_result_bytes)?;
        Ok(self.complete_at(c, self.clock_now()))
    }

    async fn complete_many(&self, cs: &[Completion]) -> Result<Vec<WriteOutcome>, StoreError> {
        for c in cs {
            check_result_size(&c.result, self.inner.max_result_bytes)?;
        }
        let now = self.clock_now();
        Ok(cs.iter().map(|c| self.complete_at(c, now)).collect())
    }

    async fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        Ok(self.with_slot(key, |slot, now| {
            transition::release(slot, token, retention, now)
        }))
    }

    async fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        Ok(self.with_slot(key, |slot, now| transition::extend(slot, token, lease, now)))
    }

    async fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        Ok(self.with_slot(key, |slot, now| {
            transition::fail(slot, token, reason, retention, now)
        }))
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let hash = self.hash(key);
        let shard = self.shard(hash).lock();
        Ok(shard
            .find(hash, |(k, _)| k == key)
            .and_then(|(_, slot)| slot.clone()))
    }

    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        Ok(match shard.find_entry(hash, |(k, _)| k == key) {
            Ok(entry) => entry.remove().0.1.is_some(),
            Err(_) => false,
        })
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        use std::sync::atomic::Ordering;
        let now = self.clock_now();
        let mut purged = 0;
        let start = self.inner.purge_from.load(Ordering::Relaxed);
        for n in 0..SHARDS {
            let i = (start + n) % SHARDS;
            if purged >= limit {
                // The next purge starts where this one stopped.
                self.inner.purge_from.store(i, Ordering::Relaxed);
                break;
            }
            let mut shard = self.inner.shards[i].lock();
            shard.retain(|(_, slot)| {
                let Some(rec) = slot else { return false };
                if purged < limit && transition::is_purgeable(rec, now) {
                    purged += 1;
                    false
                } else {
                    true
                }
            });
        }
        Ok(purged)
    }

    fn max_result_bytes(&self) -> usize {
        self.inner.max_result_bytes
    }
}

impl Inspect for MemoryStore {
    async fn now(&self) -> Result<Timestamp, StoreError> {
        Ok(self.clock_now())
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        let mut counts: Vec<(State, u64)> = Vec::new();
        for shard in self.inner.shards.iter() {
            for rec in shard.lock().iter().filter_map(|(_, slot)| slot.as_ref()) {
                match counts.iter_mut().find(|(s, _)| *s == rec.state) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((rec.state, 1)),
                }
            }
        }
        counts.sort_by_key(|(s, _)| s.code());
        Ok(counts)
    }

    async fn in_progress(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        let mut out: Vec<Record> = Vec::new();
        for shard in self.inner.shards.iter() {
            let shard = shard.lock();
            let held = shard.iter().filter_map(|(_, slot)| slot.as_ref());
            out.extend(held.filter(|r| r.state == State::InProgress).cloned());
        }
        out.sort_by_key(|r| (r.lease_until, r.updated_at));
        out.truncate(limit);
        Ok(out)
    }
}
