//! Helpers shared by the broker integration tests: unique names, polling, an effect ledger, a
//! TCP proxy whose connections a test can cut, and private server processes killed on drop.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use idem::Attempt;
use idem_broker::Message;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    format!("idem-test-{prefix}-{:08x}", fastrand::u32(..))
}

/// Polls `cond` until it holds, or panics after `secs`.
pub async fn until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts how many times each message id's effect was applied.
#[derive(Clone, Default)]
pub struct Ledger(Arc<Mutex<HashMap<String, u32>>>);

impl Ledger {
    pub fn apply(&self, m: &Message) {
        let id = m.message_id().unwrap_or("<none>").to_owned();
        *self.0.lock().entry(id).or_default() += 1;
    }
    pub fn count(&self, id: &str) -> u32 {
        self.0.lock().get(id).copied().unwrap_or(0)
    }
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
    pub fn total(&self) -> u32 {
        self.0.lock().values().sum()
    }
    /// Asserts every id in `ids` was applied exactly once, and nothing else.
    pub fn assert_exactly_once<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let map = self.0.lock();
        let mut n = 0;
        for id in ids {
            n += 1;
            assert_eq!(map.get(id).copied(), Some(1), "effect of {id}: {map:?}");
        }
        assert_eq!(map.len(), n, "unexpected effects: {map:?}");
    }
    /// A handler that applies the effect.
    pub fn handler(
        &self,
    ) -> impl Fn(Message, Attempt) -> std::future::Ready<Result<(), std::io::Error>>
    + Send
    + Sync
    + 'static {
        let ledger = self.clone();
        move |m: Message, _: Attempt| {
            ledger.apply(&m);
            std::future::ready(Ok(()))
        }
    }
}

/// A SQLite store in a temporary directory (kept alive by the returned guard).
pub fn sqlite_store() -> (idem_sqlite::SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = idem_sqlite::SqliteStore::open(dir.path().join("idem.db")).unwrap();
    (store, dir)
}

/// A TCP proxy to `target`: clients connect to [`Proxy::addr`]; [`Proxy::cut`] drops every
/// connection open through it (both directions, as a network failure would), and new ones are
/// accepted again right away.
pub struct Proxy {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let c = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().push(pipe);
            }
        });
        Proxy {
            addr,
            conns,
            accept,
        }
    }

    /// Open connections through the proxy.
    pub fn live(&self) -> usize {
        self.conns
            .lock()
            .iter()
            .filter(|h| !h.is_finished())
            .count()
    }

    /// Waits for the client to be connected through the proxy (it may be reconnecting), then
    /// drops every open connection.
    pub async fn cut_when_connected(&self) {
        until(30, "a connection through the proxy", || self.live() >= 1).await;
        assert!(self.cut() >= 1);
    }

    /// Drops every open connection.
    pub fn cut(&self) -> usize {
        let conns: Vec<_> = self.conns.lock().drain(..).collect();
        let n = conns.iter().filter(|h| !h.is_finished()).count();
        for h in conns {
            h.abort();
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `host:port` of a URL, resolved.
pub fn socket_addr(url: &str) -> SocketAddr {
    let (host, port) = idem_conformance::server::host_port(url).unwrap();
    let host = if host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        host
    };
    format!("{host}:{port}").parse().unwrap()
}

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_host(Some(&addr.ip().to_string())).unwrap();
    u.set_port(Some(addr.port())).unwrap();
    u.to_string()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private server process, SIGKILLed on drop.
pub struct ServerProcess {
    child: Option<Child>,
    pub port: u16,
}

impl ServerProcess {
    /// Starts `program args` and waits until `port` accepts connections.
    pub fn start(program: &str, args: &[&str], port: u16) -> Option<ServerProcess> {
        // Server binaries often live in /usr/sbin, which is not on every PATH.
        let spawn = |p: &str| {
            Command::new(p)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        let child = match spawn(program).or_else(|_| spawn(&format!("/usr/sbin/{program}"))) {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    !idem_conformance::server::is_ci(),
                    "cannot start {program}: {e}; CI is set, so this is a failure"
                );
                eprintln!("SKIPPED: cannot start {program}: {e}");
                return None;
            }
        };
        let server = ServerProcess {
            child: Some(child),
            port,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{program} did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the process to exit (after a signal sent by the test).
    pub fn wait(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGKILLs the server (a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A consumer running on a task.
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: JoinHandle<Result<idem_broker::StatsSnapshot, idem_broker::BrokerError>>,
}

/// Spawns `consumer.run` with a shutdown the test triggers with [`Running::stop`]; returns its
/// counters too.
pub fn start<Src, S, H>(
    consumer: idem_broker::Consumer<Src, S, H>,
) -> (Arc<idem_broker::Stats>, Running)
where
    Src: idem_broker::Source,
    S: idem::Store,
    H: idem_broker::Handler,
{
    let stats = consumer.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    (stats, Running { stop, handle })
}

impl Running {
    /// Waits up to `secs` for the consumer to stop by itself; returns its result.
    pub async fn ended_within(
        self,
        secs: u64,
    ) -> Result<idem_broker::StatsSnapshot, idem_broker::BrokerError> {
        let Running { stop, handle } = self;
        let out = tokio::time::timeout(std::time::Duration::from_secs(secs), handle)
            .await
            .expect("the consumer did not stop by itself")
            .unwrap();
        drop(stop);
        out
    }

    /// Shuts the consumer down gracefully and returns its counters.
    pub async fn stop(self) -> idem_broker::StatsSnapshot {
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap()
    }
}

/// Waits until the consumer's counters stay still for longer than any delayed nack it may hold
/// (the tests' leases are at most 2 s), and `drained` holds.
pub async fn wait_settled<F, Fut>(stats: &idem_broker::Stats, drained: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let before = stats.snapshot();
        tokio::time::sleep(Duration::from_secs(3)).await;
        if stats.snapshot() == before && drained().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer never settled: {:?}",
            stats.snapshot()
        );
    }
}

/// Contract scenario 8 through a broker: a consumer is killed mid-batch (its runtime dropped:
/// no graceful shutdown, no acks, its connection just goes) while the handler of `m-20` hangs
/// before its effect and most other messages are done. A new consumer on the same SQLite store
/// must apply every message exactly once: it replays what completed, and takes over `m-20` once
/// the dead consumer's lease (2 s) ends.
///
/// `connect` opens a source (on the runtime it is called from), `publish` publishes on
/// `main`'s runtime, `drained_while_running` says whether the broker holds nothing for the
/// rescuer any more, `drained_after_stop` whether nothing is left unacked once it stopped.
pub fn killed_mid_batch<Src, C, CFut, P, PFut, D, DFut, A, AFut>(
    main: &tokio::runtime::Runtime,
    connect: C,
    publish: P,
    drained_while_running: D,
    drained_after_stop: A,
) where
    Src: idem_broker::Source,
    C: Fn() -> CFut,
    CFut: std::future::Future<Output = Src>,
    P: Fn(idem_broker::Outgoing) -> PFut,
    PFut: std::future::Future<Output = ()>,
    D: Fn() -> DFut,
    DFut: std::future::Future<Output = bool>,
    A: FnOnce() -> AFut,
    AFut: std::future::Future<Output = bool>,
{
    use std::sync::atomic::{AtomicBool, Ordering};

    let msgs: Vec<idem_broker::Outgoing> = (0..40)
        .map(|i| idem_broker::Outgoing::with_id(format!("m-{i}"), format!("{i}").into_bytes()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idem.db");
    let exec = || {
        let store = idem_sqlite::SqliteStore::open(&db).unwrap();
        idem::Executor::with_config(store, idem::Config::default().lease(Duration::from_secs(2)))
    };
    let ns = || idem::Namespace::new("kill-test").unwrap();
    let ledger = Ledger::default();

    let victim = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stuck = Arc::new(AtomicBool::new(false));
    let (l, s) = (ledger.clone(), Arc::clone(&stuck));
    let handler = move |m: Message, _: Attempt| {
        let (l, s) = (l.clone(), Arc::clone(&s));
        async move {
            if m.message_id() == Some("m-20") {
                s.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            l.apply(&m);
            Ok::<_, std::io::Error>(())
        }
    };
    let stats = victim.block_on(async {
        let consumer = idem_broker::Consumer::new(connect().await, exec(), ns(), handler);
        let consumer = consumer.batch_size(8);
        let stats = consumer.stats();
        tokio::spawn(consumer.run(std::future::pending()));
        stats
    });
    for m in &msgs {
        main.block_on(publish(m.clone()));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !(stuck.load(Ordering::SeqCst) && stats.snapshot().executed >= 30) {
        assert!(
            std::time::Instant::now() < deadline,
            "the victim made no progress: {:?}",
            stats.snapshot()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    victim.shutdown_background();

    main.block_on(async {
        // Let the broker notice the dead connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (stats, rescuer) = start(idem_broker::Consumer::new(
            connect().await,
            exec(),
            ns(),
            ledger.handler(),
        ));
        until(30, "every effect", || ledger.len() == 40).await;
        wait_settled(&stats, &drained_while_running).await;
        let snap = rescuer.stop().await;
        ledger.assert_exactly_once(msgs.iter().map(idem_broker::Outgoing::id));
        assert!(snap.received >= 1, "{snap:?}");
        assert!(drained_after_stop().await, "left unacked: {snap:?}");
    });
}

/// Messages `m-0` .. `m-{n-1}` with those ids.
pub fn numbered(n: usize) -> Vec<idem_broker::Outgoing> {
    (0..n)
        .map(|i| idem_broker::Outgoing::with_id(format!("m-{i}"), format!("{i}").into_bytes()))
        .collect()
}

/// A consumer on a SQLite store whose handler takes `millis` per message, one batch of 10 at a
/// time: slow enough for a test to break things while it runs. The returned directory holds
/// the store.
pub fn start_slow<Src: idem_broker::Source>(
    source: Src,
    ledger: &Ledger,
    millis: u64,
) -> (Arc<idem_broker::Stats>, Running, tempfile::TempDir) {
    let (store, dir) = sqlite_store();
    let l = ledger.clone();
    let handler = move |m: Message, _: Attempt| {
        let l = l.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            l.apply(&m);
            Ok::<_, std::io::Error>(())
        }
    };
    let consumer = idem_broker::Consumer::new(
        source,
        idem::Executor::new(store),
        idem::Namespace::new("slow-test").unwrap(),
        handler,
    )
    .batch_size(10)
    .concurrency(1);
    let (stats, running) = start(consumer);
    (stats, running, dir)
}
