//! The memory baseline: a hand-written sharded `HashMap`, insert-if-absent to claim, update to
//! complete, with the same concurrency and batching as the profile.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{Args, Profile};

pub(super) async fn baseline(ids: &Arc<Vec<String>>, profile: Profile, args: &Args) -> Duration {
    type Shard = std::sync::Mutex<HashMap<String, (u8, Vec<u8>)>>;
    let shards: Arc<Vec<Shard>> = Arc::new((0..64).map(|_| Shard::default()).collect());
    let shard_of = |id: &str| {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        BuildHasherDefault::<DefaultHasher>::default().hash_one(id) as usize % 64
    };
    let process = move |shards: &[Shard], id: &str| {
        let s = &shards[shard_of(id)];
        let fresh = {
            let mut map = s.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(id) {
                Some(_) => false,
                None => {
                    map.insert(id.to_owned(), (1, Vec::new()));
                    true
                }
            }
        };
        if fresh {
            let mut map = s.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = map.get_mut(id) {
                *v = (2, Vec::new());
            }
        }
    };
    let start = Instant::now();
    match profile {
        Profile::Sequential => {
            // Progress is counted per chunk: per message it would cost as much as the map.
            for chunk in ids.chunks(1024) {
                for id in chunk {
                    process(&shards, id);
                }
                super::advance(chunk.len());
            }
        }
        Profile::Concurrent => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut handles = Vec::new();
            for _ in 0..args.concurrency {
                let (ids, next, shards, batch) =
                    (ids.clone(), next.clone(), shards.clone(), args.batch);
                handles.push(tokio::spawn(async move {
                    loop {
                        let start = next.fetch_add(batch, Ordering::Relaxed);
                        if start >= ids.len() {
                            return;
                        }
                        let group = &ids[start..(start + batch).min(ids.len())];
                        for id in group {
                            process(&shards, id);
                        }
                        super::advance(group.len());
                        tokio::task::yield_now().await;
                    }
                }));
            }
            for h in handles {
                let _ = h.await;
            }
        }
    }
    start.elapsed()
}
