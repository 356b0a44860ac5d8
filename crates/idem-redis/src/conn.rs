//! The store's connection: one multiplexed connection to a standalone server, or a Redis
//! Cluster client (one multiplexed connection per node, commands routed by their key's slot,
//! `MOVED`/`ASK` followed and the slot map refreshed by the client), and a way to send commands
//! to one chosen master of a cluster (the scans walk every master).

use futures_util::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// The connection a [`RedisStore`](crate::RedisStore) holds, shared by its clones: a
/// standalone server's, or a Redis Cluster's. It implements [`ConnectionLike`], so the
/// caller's own commands run on it (`redis::cmd(…).query_async(&mut conn)`).
///
/// On a cluster, a command with keys goes to the master of its key's slot; the keys of one
/// command, and every command of one pipeline, must lie in one slot (the client refuses
/// `CROSSSLOT` otherwise), except `DEL`, `UNLINK`, `EXISTS` and `MGET`, which the client splits
/// by slot. `KEYS` runs on every master, but `SCAN` reaches one node only: use
/// [`RedisStore::scan_keys`](crate::RedisStore::scan_keys) to walk every master.
#[derive(Clone)]
#[non_exhaustive]
pub enum RedisConnection {
    /// One standalone server (or a primary behind a proxy): reconnects by itself.
    Standalone(ConnectionManager),
    /// A Redis Cluster: reconnects and follows the slot map by itself.
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection whose commands all go to one node: on a cluster, the master of the slot
/// `node` (every command and pipeline, whatever its keys); on a standalone server, or with
/// `node` `None`, the connection's own routing.
pub(crate) struct OnNode {
    pub(crate) conn: RedisConnection,
    pub(crate) node: Option<Route>,
}

impl ConnectionLike for OnNode {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match (&mut self.conn, self.node) {
            (RedisConnection::Cluster(c), Some(route)) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                c.route_command(cmd.clone(), routing).boxed()
            }
            (conn, _) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match (&mut self.conn, self.node) {
            (RedisConnection::Cluster(c), Some(route)) => c
                .route_pipeline(
                    pipeline.clone(),
                    offset,
                    count,
                    SingleNodeRoutingInfo::SpecificNode(route),
                )
                .boxed(),
            (conn, _) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// Hash slots in a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;

/// The hash slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM) of the hash tag (the
/// text between the first `{` and the next `}`, when not empty) or of the whole key, modulo
/// 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let len = key[open + 1..].iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &key[open + 1..open + 1 + len])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    // The modulo keeps the value below 16384.
    crc % 16384
}

/// Which master serves each slot, as `CLUSTER SLOTS` reported it: the store groups a batch's
/// keys by master with it, and the scans walk its masters. The cluster client keeps its own
/// map to route commands; this one only decides which keys share a pipeline, and is read
/// again when a reply shows that slots moved.
pub(crate) struct SlotMap {
    /// The index in `masters` of each slot's master; `u16::MAX` for a slot no master serves.
    master_of: Vec<u16>,
    /// One slot of each master: a route to it that follows a failover.
    pub(crate) masters: Vec<u16>,
}

impl SlotMap {
    /// The map of a `CLUSTER SLOTS` reply: `[[start, end, [host, port, …], replicas…], …]`.
    pub(crate) fn parse(reply: Value) -> Option<Self> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut master_of = vec![u16::MAX; SLOTS];
        let mut addresses: Vec<(Vec<u8>, i64)> = Vec::new();
        let mut masters = Vec::new();
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let [Value::Int(start), Value::Int(end), Value::Array(master), ..] = fields.as_slice()
            else {
                return None;
            };
            let [Value::BulkString(host), Value::Int(port), ..] = master.as_slice() else {
                return None;
            };
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            if start > end || end >= SLOTS {
                return None;
            }
            let address = (host.clone(), *port);
            let index = match addresses.iter().position(|a| *a == address) {
                Some(i) => i,
                None => {
                    addresses.push(address);
                    masters.push(u16::try_from(start).ok()?);
                    addresses.len() - 1
                }
            };
            let index = u16::try_from(index).ok()?;
            master_of[start..=end].fill(index);
        }
        Some(Self { master_of, masters })
    }

    /// The index of the master serving `slot`, if any.
    pub(crate) fn master_of(&self, slot: u16) -> Option<u16> {
        let m = self.master_of[usize::from(slot)];
        (m != u16::MAX).then_some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // The CRC16 check value, and slots `CLUSTER KEYSLOT` gives.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"idem:{emails:m1}"), slot(b"emails:m1"));
    }

    #[test]
    fn parses_cluster_slots() {
        let node = |port| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
            ])
        };
        let range = |a, b, port| Value::Array(vec![Value::Int(a), Value::Int(b), node(port)]);
        let map = SlotMap::parse(Value::Array(vec![
            range(0, 99, 7000),
            range(100, 16382, 7001),
            range(200, 300, 7000),
        ]))
        .unwrap();
        assert_eq!(map.masters, [0, 100]);
        assert_eq!(map.master_of(50), Some(0));
        assert_eq!(map.master_of(250), Some(0));
        assert_eq!(map.master_of(16382), Some(1));
        assert_eq!(map.master_of(16383), None);
        assert!(SlotMap::parse(Value::Array(vec![range(5, 16384, 7000)])).is_none());
        assert!(SlotMap::parse(Value::Nil).is_none());
    }
}
