//! A private Redis Cluster for fault tests: 3 masters with 1 replica each, on free loopback
//! ports (cluster bus ports chosen free too), temporary directories, every node SIGKILLed on
//! drop. The shared cluster of `.ci/run` (127.0.0.1:7000-7005) is never touched.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use idem_redis::cluster::{ClusterNode, parse_nodes};
use idem_testkit::{ServerProcess, free_port, missing};

/// One node: its process (while it runs), client port and directory.
struct Node {
    process: Option<ServerProcess>,
    port: u16,
    _dir: tempfile::TempDir,
}

/// A cluster that the test owns.
pub(crate) struct PrivateCluster {
    nodes: Vec<Node>,
}

impl PrivateCluster {
    /// Starts 6 nodes with `--cluster-node-timeout` `node_timeout_ms` and creates the cluster
    /// (3 masters, 1 replica each), waiting until every node reports `cluster_state:ok`. `None`
    /// (loudly) when `redis-server` or `redis-cli` is missing outside CI; in CI, panics.
    pub(crate) fn start(node_timeout_ms: u32) -> Option<Self> {
        for program in ["redis-server", "redis-cli"] {
            if Command::new(program)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_err()
            {
                return missing(format!("{program} is not installed"));
            }
        }
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let (port, bus) = (free_port(), free_port());
            let dir = tempfile::tempdir().expect("temp dir");
            let process = ServerProcess::spawn(
                Command::new("redis-server")
                    .args(["--port", &port.to_string()])
                    .args(["--cluster-port", &bus.to_string()])
                    .args(["--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", "nodes.conf"])
                    .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
                    // Replicas sync at once (the default waits 5 s for more replicas).
                    .args(["--repl-diskless-sync-delay", "0"])
                    .args(["--save", "", "--appendonly", "no", "--dir"])
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
                port,
            );
            nodes.push(Node {
                process: Some(process),
                port,
                _dir: dir,
            });
        }
        let cluster = Self { nodes };
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port)),
            )
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.wait_ok(Duration::from_secs(60));
        cluster.wait_replicas_synced(Duration::from_secs(60));
        Some(cluster)
    }

    /// Waits until every running replica has finished its sync with its master: a replica
    /// that never synced refuses to take over (its data is too old), and acknowledges no
    /// `WAIT`.
    pub(crate) fn wait_replicas_synced(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let synced = |port: u16| {
            Self::client(port).is_some_and(|mut c| {
                redis::cmd("INFO")
                    .arg("replication")
                    .query::<String>(&mut c)
                    .is_ok_and(|i| i.contains("role:master") || i.contains("master_link_status:up"))
            })
        };
        while !self.running().all(|n| synced(n.port)) {
            assert!(
                Instant::now() < deadline,
                "the private cluster's replicas did not sync within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://127.0.0.1:<port of the first node>`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }

    /// A comma-separated seed list of every node still running.
    pub(crate) fn seeds_url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.process.is_some())
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis://{}", hosts.join(","))
    }

    fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.process.is_some())
    }

    /// A plain connection to the node on `port`.
    pub(crate) fn client(port: u16) -> Option<redis::Connection> {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
            .ok()
    }

    fn info_ok(port: u16) -> bool {
        let Some(mut c) = Self::client(port) else {
            return false;
        };
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query::<String>(&mut c)
            .is_ok_and(|i| i.contains("cluster_state:ok"))
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub(crate) fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.running().all(|n| Self::info_ok(n.port)) {
            assert!(
                Instant::now() < deadline,
                "the private cluster did not reach cluster_state:ok within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cluster as a running node sees it.
    pub(crate) fn topology(&self) -> Vec<ClusterNode> {
        let port = self.running().next().expect("a running node").port;
        let mut c = Self::client(port).expect("connect to a node");
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c).unwrap();
        parse_nodes(&text)
    }

    /// The node serving `slot` as master.
    pub(crate) fn master_of(&self, slot: u16) -> ClusterNode {
        self.topology()
            .into_iter()
            .find(|n| n.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The replica of the master `master_id` (waiting, up to 30 s, until the node asked has
    /// heard of it: roles spread by gossip).
    pub(crate) fn replica_of(&self, master_id: &str) -> ClusterNode {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self
                .topology()
                .into_iter()
                .find(|n| n.master_id.as_deref() == Some(master_id));
            if let Some(replica) = found {
                return replica;
            }
            assert!(
                Instant::now() < deadline,
                "master {master_id} has no replica"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the node on `port` (a crash).
    pub(crate) fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut p) = node.process.take() {
            p.kill();
        }
    }

    /// Sends `sig` (`STOP`, `CONT`) to the node on `port`.
    pub(crate) fn signal(&self, port: u16, sig: &str) {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.process.as_ref())
            .expect("a running node of this cluster")
            .signal(sig);
    }

    /// Waits until `slot` is served by a master other than `old_port` and the surviving nodes
    /// agree the cluster is ok (the failover is done); returns how long that took.
    pub(crate) fn wait_failover(&self, slot: u16, old_port: u16, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let moved = self.running().all(|n| Self::info_ok(n.port))
                && self.master_of(slot).port != old_port;
            if moved {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "no failover of slot {slot} away from port {old_port} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
