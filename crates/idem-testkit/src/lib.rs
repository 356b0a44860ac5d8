//! # idem-testkit: what idem's test suites kept writing again
//!
//! Unpublished; a dev-dependency of the workspace's crates.
//!
//! - [`Proxy`]: a TCP proxy whose connections a test cuts, as a network failure would (the one
//!   the adapter suite uses, from `idem_conformance::proxy`), with [`socket_addr`] and [`via`]
//!   to point a URL at it;
//! - [`free_port`], and [`ServerProcess`]: a private server process (a broker, a database) on
//!   a port of its own, SIGKILLed on drop, so a test can crash and restart it without touching
//!   the shared servers;
//! - [`missing`]: a test that cannot run here skips loudly, or fails when `CI` is set;
//! - [`unique`] names, and polling: [`until`] and [`until_async`].

use std::fmt::Display;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use idem_conformance::proxy::Proxy;
pub use idem_conformance::server::is_ci;

/// A name no other test (or run) uses: `idem-test-<prefix>-<8 hex digits>`.
pub fn unique(prefix: &str) -> String {
    format!("idem-test-{prefix}-{:08x}", fastrand::u32(..))
}

/// Polls `cond` every 20 ms until it holds.
///
/// # Panics
/// After `secs`, naming `what`.
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

/// Polls the asynchronous `cond` every 50 ms until it holds (a query to a server, say).
///
/// # Panics
/// After `secs`, naming `what`.
pub async fn until_async(secs: u64, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Something a test needs is missing here (a server binary, a tool): with `CI` set this is a
/// failure; otherwise the test prints a loud `SKIPPED` line and should return (`None`).
///
/// ```ignore
/// let Some(bin) = find_binary().or_else(|| idem_testkit::missing("redis-server is not installed")) else {
///     return;
/// };
/// ```
///
/// # Panics
/// When [`is_ci`].
pub fn missing<T>(what: impl Display) -> Option<T> {
    assert!(
        !is_ci(),
        "{what}; CI is set, so this is a failure, not a skip"
    );
    eprintln!("SKIPPED: {what}; set CI=1 to make this a failure");
    None
}

/// A free TCP port on loopback (free now: bound and released).
///
/// # Panics
/// When no port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on loopback: {e}"))
}

/// `host:port` of a server URL (`scheme://[user[:password]@]host[:port][/…]`, the scheme's
/// default port when there is none), resolved; `localhost` is `127.0.0.1`.
///
/// # Panics
/// When the URL has no host and port, or the host does not resolve.
pub fn socket_addr(url: &str) -> SocketAddr {
    let (host, port) = idem_conformance::server::host_port(url).unwrap_or_else(|| {
        panic!(
            "no host and port in {}",
            idem_conformance::server::redact(url)
        )
    });
    let host = if host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        host
    };
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("cannot resolve {host}:{port}"))
}

/// `url` with its host and port replaced by `addr` (a [`Proxy`]'s): user, password, path and
/// query are kept.
///
/// # Panics
/// When `url` is not a URL with a host.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let mut u = url::Url::parse(url)
        .unwrap_or_else(|e| panic!("{}: {e}", idem_conformance::server::redact(url)));
    u.set_host(Some(&addr.ip().to_string()))
        .unwrap_or_else(|e| panic!("{}: {e}", idem_conformance::server::redact(url)));
    u.set_port(Some(addr.port()))
        .unwrap_or_else(|()| panic!("{} takes no port", idem_conformance::server::redact(url)));
    u.to_string()
}

/// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`, …) to the processes `pids` with `kill`.
///
/// # Panics
/// When `kill` fails.
pub fn signal(signal: &str, pids: impl IntoIterator<Item = impl Display>) {
    let pids: Vec<String> = pids.into_iter().map(|p| p.to_string()).collect();
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(&pids)
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(status.success(), "kill -{signal} {pids:?} failed");
}

/// How long a starting server may take to listen (a database recovering after a crash, on a
/// busy machine).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// A private server process that a test owns, SIGKILLed on drop (a crash, not a shutdown).
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    port: u16,
}

impl ServerProcess {
    /// Starts `program args` (found on the `PATH` or in `/usr/sbin`, where server binaries
    /// often live) with its output discarded, and waits (up to a minute) until `port` accepts
    /// connections. `None` when the program cannot be started (see [`missing`]: a failure in
    /// CI).
    ///
    /// # Panics
    /// When the server does not listen on `port` in time, or [`missing`] panics.
    pub fn start(program: &str, args: &[&str], port: u16) -> Option<ServerProcess> {
        let spawn = |p: &str| {
            Command::new(p)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        match spawn(program).or_else(|_| spawn(&format!("/usr/sbin/{program}"))) {
            Ok(child) => Some(Self::listening(child, port, program)),
            Err(e) => missing(format!("cannot start {program}: {e}")),
        }
    }

    /// Runs `command` as the server (the test sets its program, arguments and output), and
    /// waits (up to a minute) until `port` accepts connections.
    ///
    /// # Panics
    /// When the command cannot be spawned, or does not listen on `port` in time.
    pub fn spawn(command: &mut Command, port: u16) -> ServerProcess {
        let what = command.get_program().to_string_lossy().into_owned();
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Self::listening(child, port, &what)
    }

    fn listening(child: Child, port: u16, what: &str) -> ServerProcess {
        let mut server = ServerProcess {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{what} exited with {status} before listening on {port}");
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not listen on {port} within {LISTEN_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` (`TERM`, `STOP`, `CONT`, …) to the process.
    ///
    /// # Panics
    /// When it is not running, or `kill` fails.
    pub fn signal(&self, sig: &str) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("the server is not running"));
        signal(sig, [pid]);
    }

    /// Stops the server with SIGTERM (a clean shutdown: it may save its state) and waits for
    /// it to exit.
    pub fn terminate(&mut self) {
        if self.child.is_some() {
            self.signal("TERM");
            self.wait();
        }
    }

    /// Waits for the process to exit (after a signal the test sent).
    pub fn wait(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGKILLs the server (a crash, not a shutdown) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SIGKILL ends a stopped (SIGSTOP) server too.
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn via_replaces_host_and_port_only() {
        let addr: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(
            via("amqp://guest:secret@localhost:5672/%2f?heartbeat=5", addr),
            "amqp://guest:secret@127.0.0.1:40001/%2f?heartbeat=5"
        );
        assert_eq!(
            socket_addr("redis://localhost"),
            "127.0.0.1:6379".parse().unwrap()
        );
        assert!(unique("x").starts_with("idem-test-x-"));
        assert_ne!(unique("x"), unique("x"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_proxy_forwards_and_cuts() {
        // An echo server behind the proxy.
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start(target).await;
        let mut client = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        proxy.cut_when_connected().await;
        assert_eq!(proxy.live(), 0);
        // The cut connection is closed (or reset) under the client.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("the cut connection stays open");
        assert!(read.is_err() || rest.is_empty(), "{read:?} {rest:?}");
        // New connections go through again.
        let mut again = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        again.write_all(b"pong").await.unwrap();
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}
