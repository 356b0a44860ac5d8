//! A TCP proxy whose connections a test can cut, as a network failure would: clients connect
//! to [`Proxy::addr`] instead of the server's address, and [`Proxy::cut`] drops every
//! connection open through it (both directions at once). New connections are accepted again
//! right away, so a client that reconnects by itself finds the server again.
//!
//! The adapter suite ([`crate::broker`]) cuts its sources' connections with it; tests of other
//! crates reach it as `idem_testkit::Proxy`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

type Pipes = Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>;

/// A TCP proxy to one target; see the module docs. Dropping it closes the listener and cuts
/// every connection.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    pipes: Pipes,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind the proxy's port: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the proxy's address: {e}"));
        let pipes: Pipes = Arc::default();
        let open = Arc::clone(&pipes);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                lock(&open).push(pipe);
            }
        });
        Proxy {
            addr,
            pipes,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open through the proxy now.
    pub fn live(&self) -> usize {
        lock(&self.pipes)
            .iter()
            .filter(|h| !h.is_finished())
            .count()
    }

    /// Drops every open connection; returns how many there were.
    pub fn cut(&self) -> usize {
        let pipes: Vec<_> = lock(&self.pipes).drain(..).collect();
        let n = pipes.iter().filter(|h| !h.is_finished()).count();
        for pipe in pipes {
            pipe.abort();
        }
        n
    }

    /// Waits (up to 30 s) until a client is connected through the proxy (it may be
    /// reconnecting after the last cut), then drops every open connection.
    ///
    /// # Panics
    /// When no client connects within 30 s.
    pub async fn cut_when_connected(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.live() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no client connected through the proxy within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.cut();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

fn lock(pipes: &Pipes) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
    // A panic while holding the lock cannot leave the list inconsistent.
    pipes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
