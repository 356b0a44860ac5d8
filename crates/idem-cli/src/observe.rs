//! `--metrics-addr` and `--log-format`: what a long-running command (`idem consume`) shows an
//! operator while it runs.
//!
//! The endpoint serves three paths, plain HTTP/1.1 on the address given (a loopback or pod
//! address; there is no TLS and no authentication, as usual for a Prometheus target):
//! - `/metrics`: every `idem_*` series in the Prometheus text format (the executor's outcome
//!   counters and store latency, the runtime's received / acked / retried / dead-lettered
//!   counters, in-flight gauge and handler latency);
//! - `/healthz`: `200 ok` while the process serves (liveness);
//! - `/readyz`: `200 ready` once the command consumes, `503` before it has connected and once
//!   it is stopping (readiness: a rolling deploy waits for it).
//!
//! Three paths and `GET` only: a small responder of our own, rather than an HTTP server stack
//! in a binary that otherwise serves nothing.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (for log shippers).
    Json,
}

/// Logs to stderr in `format`. `RUST_LOG` overrides `default_filter`.
pub(crate) fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Only fails if a subscriber is already set, which then keeps logging.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// Whether the command is ready to be sent work (what `/readyz` answers).
#[derive(Debug, Default)]
pub(crate) struct Health {
    ready: AtomicBool,
}

impl Health {
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// The running endpoint; it stops when dropped.
pub(crate) struct Endpoint {
    pub(crate) health: Arc<Health>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Installs the Prometheus recorder and serves it on `addr`. Call it before building the
/// executor and the consumer: their metric handles are registered when they are built.
///
/// # Errors
/// The address cannot be bound (in use, not local), or a recorder is already installed.
pub(crate) async fn serve(addr: SocketAddr) -> anyhow::Result<Endpoint> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics-addr"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let health = Arc::new(Health::default());
    // Histograms keep their samples until upkeep folds them into buckets.
    let upkeep = {
        let handle = handle.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                handle.run_upkeep();
            }
        })
    };
    let server = {
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (handle, health) = (handle.clone(), Arc::clone(&health));
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        answer(stream, &handle, &health),
                    )
                    .await;
                });
            }
        })
    };
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(Endpoint {
        health,
        tasks: vec![upkeep, server],
    })
}

/// Reads one request head and answers it; the connection is closed after.
async fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    health: &Health,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or(path);
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if health.is_ready() => ("200 OK", "text/plain", "ready\n".to_owned()),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".to_owned(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
