//! A Redis Cluster's nodes as `CLUSTER NODES` lists them: which node is a master, which
//! replicates which, which slots each master serves. For tools that act on the topology
//! (`idem verify --failover`, the fault tests): the store itself routes with `CLUSTER SLOTS`.

/// One node of a cluster, as a line of `CLUSTER NODES` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    /// The node's id (40 hex characters).
    pub id: String,
    /// Its client address, `host:port`.
    pub addr: String,
    /// Its client port.
    pub port: u16,
    /// A master (otherwise a replica).
    pub master: bool,
    /// The node answering `CLUSTER NODES` (flag `myself`).
    pub myself: bool,
    /// Flagged failing or possibly failing (`fail`, `fail?`), or not connected.
    pub failing: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// The slot ranges a master serves, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    /// Whether this node serves `slot` as a master.
    pub fn serves(&self, slot: u16) -> bool {
        self.master && self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }

    /// How many slots this node serves.
    pub fn slot_count(&self) -> u32 {
        self.slots
            .iter()
            .map(|&(a, b)| u32::from(b) - u32::from(a) + 1)
            .sum()
    }
}

/// The URL of the node at `addr` (`host:port`) of the cluster `url` names (`redis://h1:p1,h2:p2`
/// or one seed): the same scheme and credentials, without database or query.
pub fn node_url(url: &str, addr: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!("{scheme}://{userinfo}{addr}")
}

/// The `host:port` of each seed `url` names (`redis://[user:password@]h1:p1,h2:p2[/db]`); a
/// host without a port has Redis's, 6379.
pub fn seed_addrs(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let hosts = authority
        .rsplit_once('@')
        .map_or(authority, |(_, hosts)| hosts);
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            // `[::1]:7000`, `h:7000`, or a host alone.
            let has_port = h
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.ends_with(':') && port.parse::<u16>().is_ok());
            if has_port && (!h.starts_with('[') || h.contains("]:")) {
                h.to_owned()
            } else {
                format!("{h}:6379")
            }
        })
        .collect()
}

/// The nodes of a `CLUSTER NODES` reply. Lines of another shape are skipped, and so are slots
/// being migrated or imported (`[slot->-id]`, `[slot-<-id]`): their owner is the one listed.
pub fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines().filter_map(parse_line).collect()
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent> <pong-recv> <config-epoch>
/// <link-state> <slot> <slot> ...`
fn parse_line(line: &str) -> Option<ClusterNode> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        return None;
    }
    let addr = f[1].split(['@', ',']).next()?.to_owned();
    let port = addr.rsplit_once(':')?.1.parse().ok()?;
    let flags: Vec<&str> = f[2].split(',').collect();
    let master = flags.contains(&"master");
    let slots = f[8..]
        .iter()
        .filter(|r| !r.starts_with('['))
        .filter_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    Some(ClusterNode {
        id: f[0].to_owned(),
        addr,
        port,
        master,
        myself: flags.contains(&"myself"),
        failing: flags.iter().any(|&fl| fl == "fail" || fl == "fail?") || f[7] != "connected",
        master_id: (!master && f[3] != "-").then(|| f[3].to_owned()),
        slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_nodes_reply_is_read() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1] 12000
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave,fail 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 disconnected
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4);
        let replica = &nodes[0];
        assert_eq!(
            (replica.addr.as_str(), replica.port),
            ("127.0.0.1:30004", 30004)
        );
        assert!(!replica.master && !replica.failing);
        assert_eq!(
            replica.master_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        let me = &nodes[2];
        assert!(me.master && me.myself);
        assert_eq!(me.slots, vec![(0, 5460), (12000, 12000)]);
        assert_eq!(me.slot_count(), 5462);
        assert!(me.serves(12000) && !me.serves(5461));
        assert!(nodes[3].failing);
        assert!(parse_nodes("garbage\n").is_empty());
    }

    #[test]
    fn node_urls_keep_the_credentials_only() {
        assert_eq!(
            node_url("redis://:pw@h1:7000,h2:7001/0?wait_replicas=1", "h3:7002"),
            "redis://:pw@h3:7002"
        );
        assert_eq!(node_url("rediss://h1:7000", "h2:7001"), "rediss://h2:7001");
        assert_eq!(
            seed_addrs("redis://u:p@h1:7000,h2/0?x=1"),
            ["h1:7000", "h2:6379"]
        );
        assert_eq!(seed_addrs("redis://[::1]:7000"), ["[::1]:7000"]);
    }
}
