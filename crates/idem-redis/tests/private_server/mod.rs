//! A private `redis-server` for fault tests: a free port, a temporary directory, killed on drop.
//! The shared server on 6379 is never stopped (other tests use it).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use idem_testkit::{ServerProcess, free_port, missing};

/// A `redis-server` child process that the test owns.
pub(crate) struct PrivateRedis {
    child: Option<ServerProcess>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    tls: bool,
}

impl PrivateRedis {
    /// Starts a server with `args` (extra configuration, e.g. `["--appendonly", "yes"]`), or
    /// `None` (loudly) when `redis-server` is not installed outside CI. In CI, panics.
    pub(crate) fn start(args: &[&str]) -> Option<Self> {
        Self::start_with(args, false)
    }

    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    /// Starts a server that accepts only TLS connections, with a certificate for `127.0.0.1`
    /// signed by a throwaway CA (made with the `openssl` command); returns the server and the
    /// CA certificate (PEM) a client must trust.
    pub(crate) fn start_tls() -> Option<(Self, Vec<u8>)> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (ca, ca_key, cert, key, csr, ext) = (
            path("ca.pem"),
            path("ca.key"),
            path("cert.pem"),
            path("key.pem"),
            path("server.csr"),
            path("ext.cnf"),
        );
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write the extensions");
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=idem test CA",
                "-keyout",
                &ca_key,
                "-out",
                &ca,
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        ];
        for step in steps {
            let made = Command::new("openssl")
                .args(step)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !made.is_ok_and(|s| s.success()) {
                return missing("openssl cannot make test certificates");
            }
        }
        let args = [
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ];
        let server = Self::start_with(&args, true)?;
        let pem = std::fs::read(&ca).expect("read the CA certificate");
        // The server read its files when it started.
        drop(dir);
        Some((server, pem))
    }

    fn start_with(args: &[&str], tls: bool) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            return missing("redis-server is not installed");
        }
        let port = free_port();
        let mut server = Self {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            tls,
        };
        server.spawn();
        Some(server)
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` for a TLS server).
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The data directory (the append-only file lives there).
    pub(crate) fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let ports = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = ServerProcess::spawn(
            Command::new("redis-server")
                .args(ports)
                .args(["--bind", "127.0.0.1"])
                .args(["--save", "", "--dir"])
                .arg(self.dir.path())
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            self.port,
        );
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the server answers (it listens before it has loaded its dataset).
    fn wait_ready(&self) {
        if self.tls {
            // A TLS handshake needs the client's TLS set-up; a listening port is enough.
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ping = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private redis-server on port {} did not come up: {ping:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the server dies at once, as in a crash.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts the server again on the same port and directory.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server.
    pub(crate) fn signal(&self, signal: &str) {
        self.child.as_ref().expect("server running").signal(signal);
    }

    /// A plain connection for test set-up and inspection.
    pub(crate) fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("connect to the private server")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        // SIGKILL ends a stopped (SIGSTOP) server too.
        self.kill();
    }
}
