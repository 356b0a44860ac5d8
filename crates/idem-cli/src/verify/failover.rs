//! `--failover`: a master of the Redis Cluster store fails over while store mode runs, and the
//! report counts what that lost.
//!
//! Once a third of store mode's transfers are acked, the master serving the most slots is
//! replaced by its replica with `CLUSTER FAILOVER TAKEOVER` (at once, without the master's
//! agreement, as after a crash). With a lag, the replica is first cut off from its master
//! (the master refuses its `PSYNC` through the default user's ACL and drops its replication
//! link) for at least that long and until some transfers went through: as after a network split
//! or a slow replica, everything the master acknowledged meanwhile is missing from the replica
//! that takes over. The ACL is restored right after the takeover. At the end, every
//! transfer's record is read back: an acked transfer whose completed record is gone was lost by
//! the failover.
//!
//! This changes the cluster's topology for good (the old master becomes a replica): never point
//! it at a cluster that serves anything else.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use idem::{Namespace, State, Store};
use idem_redis::cluster::{ClusterNode, node_url, parse_nodes, seed_addrs};
use idem_verify::{ModeName, Observer, Stats, StoreFailover, Workload};
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

/// Transfers that must be acked while the replica is cut off, so that the cut covers writes.
const ACKED_WHILE_CUT: u64 = 30;
/// The longest a cut lasts waiting for them.
const CUT_AT_MOST: Duration = Duration::from_secs(10);
/// How long the cluster gets to settle after the takeover.
const SETTLE: Duration = Duration::from_secs(30);

/// The failover of one run: an [`Observer`] that starts it in store mode and passes every event
/// on to `inner` (the progress bar).
pub(crate) struct Failover {
    /// The store's URL, credentials included.
    url: String,
    lag: Duration,
    durability: String,
    inner: Arc<dyn Observer>,
    task: Mutex<Option<JoinHandle<StoreFailover>>>,
    /// Store mode is over: a failover still waiting for its moment gives up.
    finished: Arc<AtomicBool>,
}

impl Failover {
    pub(crate) fn new(
        url: String,
        lag: Duration,
        durability: String,
        inner: Arc<dyn Observer>,
    ) -> Self {
        Self {
            url,
            lag,
            durability,
            inner,
            task: Mutex::new(None),
            finished: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What the failover did, once store mode is over (`None` if it never started).
    pub(crate) async fn outcome(&self) -> Option<StoreFailover> {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some(task.await.unwrap_or_else(|e| StoreFailover {
            error: Some(format!("the failover task failed: {e}")),
            ..StoreFailover::default()
        }))
    }
}

impl Observer for Failover {
    fn mode_started(&self, mode: ModeName, messages: u64, stats: &Arc<Stats>) {
        self.inner.mode_started(mode, messages, stats);
        if mode != ModeName::Store {
            return;
        }
        let (url, lag, stats) = (self.url.clone(), self.lag, Arc::clone(stats));
        let (durability, finished) = (self.durability.clone(), Arc::clone(&self.finished));
        let task = tokio::spawn(async move {
            let mut report = StoreFailover {
                durability,
                ..StoreFailover::default()
            };
            // A third of the way, so that the cluster is busy before and after.
            while stats.acked() < messages / 3 {
                if finished.load(Ordering::Acquire) {
                    report.error =
                        Some("store mode ended before a third of its transfers were acked".into());
                    return report;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            report.acked_before = stats.acked();
            if let Err(e) = fail_over(&url, lag, &stats, &mut report).await {
                report.error = Some(format!("{e:#}"));
            }
            report
        });
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    fn mode_finished(
        &self,
        mode: ModeName,
        elapsed: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        if mode == ModeName::Store {
            self.finished.store(true, Ordering::Release);
        }
        self.inner.mode_finished(mode, elapsed)
    }
}

/// One node's connection.
async fn connect(url: &str, addr: &str) -> anyhow::Result<MultiplexedConnection> {
    let node = node_url(url, addr);
    let client = redis::Client::open(node.as_str())
        .with_context(|| format!("the URL of node {addr} is invalid"))?;
    // No command of the failover waits for ever on a node that stopped answering.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to node {addr}"))
}

async fn nodes(conn: &mut MultiplexedConnection) -> anyhow::Result<Vec<ClusterNode>> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(conn)
        .await
        .context("CLUSTER NODES")?;
    Ok(parse_nodes(&text))
}

/// The master serving the most slots that has a healthy replica, and that replica.
fn pick(nodes: &[ClusterNode]) -> Option<(ClusterNode, ClusterNode)> {
    let mut masters: Vec<&ClusterNode> = nodes.iter().filter(|n| n.master && !n.failing).collect();
    masters.sort_by_key(|n| std::cmp::Reverse(n.slot_count()));
    masters.into_iter().find_map(|m| {
        let replica = nodes
            .iter()
            .find(|r| r.master_id.as_deref() == Some(m.id.as_str()) && !r.failing)?;
        Some((m.clone(), replica.clone()))
    })
}

async fn fail_over(
    url: &str,
    lag: Duration,
    stats: &Stats,
    report: &mut StoreFailover,
) -> anyhow::Result<()> {
    let seed = seed_addrs(url)
        .into_iter()
        .next()
        .context("the store URL names no node")?;
    let mut any = connect(url, &seed).await?;
    let topology = nodes(&mut any).await?;
    let Some((master, replica)) = pick(&topology) else {
        bail!("no master of the cluster has a healthy replica to promote");
    };
    report.master.clone_from(&master.addr);
    report.promoted.clone_from(&replica.addr);
    let mut old = connect(url, &master.addr).await?;
    let mut new = connect(url, &replica.addr).await?;
    let mut on_replica = new.clone();
    let takeover = async move {
        redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .arg("TAKEOVER")
            .query_async::<()>(&mut on_replica)
            .await
            .context("CLUSTER FAILOVER TAKEOVER on the replica")
    };
    let started;
    if lag.is_zero() {
        report.how = "CLUSTER FAILOVER TAKEOVER".to_owned();
        started = Instant::now();
        takeover.await?;
    } else {
        redis::cmd("ACL")
            .arg(&["SETUSER", "default", "-psync", "-sync"][..])
            .query_async::<()>(&mut old)
            .await
            .context("denying PSYNC on the master (ACL SETUSER default -psync -sync)")?;
        let cut = async {
            let dropped: i64 = redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "replica"][..])
                .query_async(&mut old)
                .await
                .context("CLIENT KILL TYPE replica on the master")?;
            if dropped == 0 {
                bail!("the master had no replication link to cut");
            }
            let cut_at = Instant::now();
            let acked = stats.acked();
            tokio::time::sleep(lag).await;
            while stats.acked() < acked + ACKED_WHILE_CUT && cut_at.elapsed() < CUT_AT_MOST {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            report.acked_while_cut = stats.acked() - acked;
            report.how = format!(
                "replica cut off for {} ms, then CLUSTER FAILOVER TAKEOVER",
                cut_at.elapsed().as_millis()
            );
            anyhow::Ok(())
        };
        let done = match cut.await {
            Ok(()) => {
                let at = Instant::now();
                takeover.await.map(|()| at)
            }
            Err(e) => Err(e),
        };
        // Whatever happened, the master takes PSYNC again (it is about to be a replica, and
        // may be a master again one day).
        let restored = redis::cmd("ACL")
            .arg(&["SETUSER", "default", "+psync", "+sync"][..])
            .query_async::<()>(&mut old)
            .await
            .context("restoring PSYNC on the old master (ACL SETUSER default +psync +sync)");
        started = done?;
        restored?;
    }
    // Promoted once the new master sees itself so, and the old one sees itself its replica.
    loop {
        let promoted = nodes(&mut new)
            .await?
            .iter()
            .any(|n| n.myself && n.master && n.slot_count() > 0);
        let demoted = nodes(&mut old)
            .await?
            .iter()
            .any(|n| n.myself && n.master_id.as_deref() == Some(replica.id.as_str()));
        if promoted && demoted {
            break;
        }
        if started.elapsed() > SETTLE {
            bail!(
                "{} was not master, with {} its replica, {} s after the takeover",
                replica.addr,
                master.addr,
                SETTLE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.took_ms = millis(started.elapsed());
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut old)
            .await
            .context("INFO replication on the old master")?;
        if info.contains("master_link_status:up") {
            report.resynced_ms = Some(millis(started.elapsed()));
            break;
        }
        if started.elapsed() > SETTLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How many of the workload's transfers have no completed record in `store` under
/// `namespace`: after a store-mode run, in which every transfer was acked once completed, each
/// is a completion the store lost.
pub(crate) async fn records_lost<S: Store>(
    store: &S,
    namespace: &Namespace,
    messages: u32,
) -> anyhow::Result<u64> {
    let missing = futures_util::stream::iter(0..messages)
        .map(|i| async move {
            let key = namespace.key(Workload::message_id(i))?;
            let record = store.get(&key).await?;
            anyhow::Ok(u64::from(
                !record.is_some_and(|r| r.state == State::Completed),
            ))
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    missing.into_iter().sum::<anyhow::Result<u64>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_with_most_slots_and_a_healthy_replica_is_picked() {
        let text = "\
a 127.0.0.1:7000@17000 master - 0 0 1 connected 0-5000
b 127.0.0.1:7001@17001 master - 0 0 2 connected 5001-16383
c 127.0.0.1:7002@17002 slave,fail b 0 0 2 connected
d 127.0.0.1:7003@17003 slave a 0 0 1 connected
";
        let (m, r) = pick(&parse_nodes(text)).expect("a pick");
        assert_eq!((m.port, r.port), (7000, 7003));
        assert!(pick(&parse_nodes(&text.replace("slave a", "slave,fail a"))).is_none());
    }
}
