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
//! Binaries come from `IDEM_NATS_SERVER`, `IDEM_REDIS_SERVER`, `IDEM_MOSQUITTO` and
//! `IDEM_RABBITMQ_SERVER` when set, otherwise from `PATH` or the usual system directories.

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
}

/// The environment variable naming a kind's server binary, and the binary's usual name.
pub(crate) fn binary_var(kind: BrokerKind) -> (&'static str, &'static str) {
    match kind {
        BrokerKind::Nats => ("IDEM_NATS_SERVER", "nats-server"),
        BrokerKind::Redis => ("IDEM_REDIS_SERVER", "redis-server"),
        BrokerKind::Mqtt => ("IDEM_MOSQUITTO", "mosquitto"),
        BrokerKind::Amqp => ("IDEM_RABBITMQ_SERVER", "rabbitmq-server"),
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
    dirs.into_iter()
        .map(|d| d.join(name))
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

impl PrivateBroker {
    /// Starts a private broker of `kind` and waits until it accepts connections.
    pub(crate) fn start(kind: BrokerKind, prefetch: usize) -> anyhow::Result<Self> {
        let program = find_binary(kind)?;
        let dir = tempfile::Builder::new()
            .prefix("idem-verify-broker-")
            .tempdir()
            .context("creating the broker's directory")?;
        let port = free_port()?;
        let d = dir.path().to_string_lossy().into_owned();
        let mut env = Vec::new();
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
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// The URL clients use.
    pub(crate) fn url(&self) -> String {
        let port = self.port;
        match self.kind {
            BrokerKind::Nats => format!("nats://127.0.0.1:{port}"),
            BrokerKind::Redis => format!("redis://127.0.0.1:{port}"),
            BrokerKind::Mqtt => format!("mqtt://127.0.0.1:{port}"),
            BrokerKind::Amqp => format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
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
            _ => Duration::from_secs(30),
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.join("server.out"))
            .context("opening the broker's output file")?;
        let err = out.try_clone()?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
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
    }
}
