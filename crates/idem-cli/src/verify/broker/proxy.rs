//! A TCP proxy in front of the broker, owned by `verify`: every consumer process and producer
//! connects through it, and [`Proxy::cut`] drops every open connection at once (both
//! directions, as a network failure would). New connections are accepted again right away; while
//! the broker is down, they are accepted and closed, as a load balancer in front of a dead
//! broker would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug)]
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on loopback port `port` (0: any free one) and forwards to `target`.
    pub(crate) async fn start_on(port: u16, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let c = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    // Out of file descriptors, say: try again shortly.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut conns = c.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|h| !h.is_finished());
                conns.push(pipe);
            }
        });
        Ok(Proxy {
            addr,
            conns,
            accept,
        })
    }

    /// Drops every open connection; returns how many there were.
    pub(crate) fn cut(&self) -> usize {
        let conns: Vec<_> = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        let live = conns.iter().filter(|h| !h.is_finished()).count();
        for h in conns {
            // Dropping both streams closes both sockets.
            h.abort();
        }
        live
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `url` with its host and port replaced by `addr`.
pub(crate) fn via(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("cannot parse {}: {e}", crate::store_url::redact(url)))?;
    u.set_host(Some(&addr.ip().to_string()))
        .map_err(|e| anyhow::anyhow!("cannot point the URL at the proxy: {e}"))?;
    u.set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("cannot point the URL at the proxy: no port"))?;
    Ok(u.to_string())
}

/// The socket address of a URL's host and port (the scheme's default port if none).
pub(crate) async fn target(url: &str) -> anyhow::Result<SocketAddr> {
    let u = url::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("cannot parse {}: {e}", crate::store_url::redact(url)))?;
    let host = u
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("{} has no host", crate::store_url::redact(url)))?;
    let port = u.port().unwrap_or(match u.scheme() {
        "amqp" => 5672,
        "nats" => 4222,
        "redis" => 6379,
        _ => 1883,
    });
    let host = host.trim_matches(['[', ']']);
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_and_cuts() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start_on(0, target).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(proxy.cut(), 1);
        // The client sees its connection end.
        let n = c.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);
        // And can connect again.
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"pong").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn urls_are_pointed_at_the_proxy() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            via("amqp://guest:guest@localhost:5672/%2f", addr).unwrap(),
            "amqp://guest:guest@127.0.0.1:4000/%2f"
        );
        assert_eq!(
            via("nats://127.0.0.1:4222", addr).unwrap(),
            "nats://127.0.0.1:4000"
        );
    }
}
