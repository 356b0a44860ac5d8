//! `idem proxy`: a reverse proxy that puts the [`IdempotencyLayer`] in front of an HTTP service
//! written in any language.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem_http::proxy::{self, ProxyConfig};
//! let config = ProxyConfig::new("127.0.0.1:8080".parse()?, "http://127.0.0.1:3000")?
//!     .rule("POST:/orders/*=required".parse()?)
//!     .principal_header("x-api-key".parse()?);
//! let store = idem::AnyStore::new(idem::MemoryStore::new());
//! proxy::serve(config, store, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! The proxy speaks HTTP/1.1 on both sides, without TLS (run it next to the service, or behind
//! the TLS terminator). Requests that no rule covers are forwarded untouched. Forwarded
//! requests carry `Idem-Attempt: N` and `Idem-Acquisition: new|retry|takeover|reprocess`, so
//! the service can tell a takeover (an earlier attempt may have run) from a first run.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HOST, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use idem::{Acquisition, Heartbeat, Store};
use tokio::net::TcpListener;
use tower_layer::Layer;

use crate::layer::{RequestBody, boxed};
use crate::problem::problem;
use crate::{BuildError, Idempotency, IdempotencyLayer, ResponseBody, Rule, Rules};

/// The header telling the upstream which attempt of a key this is (from 1).
pub const IDEM_ATTEMPT: HeaderName = HeaderName::from_static("idem-attempt");
/// The header telling the upstream how the key was claimed: `new`, `retry` (an earlier
/// attempt answered 5xx), `takeover` (an earlier attempt's lease ran out: it may have run) or
/// `reprocess` (the key's record had expired).
pub const IDEM_ACQUISITION: HeaderName = HeaderName::from_static("idem-acquisition");

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The upstream URL is not `http://host[:port][/base-path]`.
    #[error("invalid upstream URL {url:?}: {reason}")]
    Upstream {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither a principal header nor `unscoped` was configured.
    #[error(
        "the proxy has no principal: keys of different clients would collide. Name the header \
         that identifies a client (--principal-header, e.g. Authorization or X-Api-Key), or \
         pass --unscoped if every client is trusted"
    )]
    NoPrincipal,
    /// The layer could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The system's reason.
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
enum Principal {
    Unset,
    Header(HeaderName),
    Unscoped,
}

/// The proxy's settings. [`ProxyConfig::new`] takes what is required; every other setting has
/// the layer's default.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    upstream_scheme: Scheme,
    upstream_authority: Authority,
    upstream_base: String,
    upstream_url: String,
    principal: Principal,
    /// The rules, in order (default `POST,PATCH:/**=optional`).
    pub rules: Option<Rules>,
    /// Namespace of the keys (default `http`).
    pub namespace: String,
    /// Lease of each forwarded request, extended by a heartbeat while the upstream answers
    /// (default 30 s): a crashed proxy's keys are taken over at most this long after the crash.
    pub lease: Duration,
    /// Heartbeat (default a third of the lease).
    pub heartbeat: Heartbeat,
    /// How long a completed key is remembered (default 24 h).
    pub retention: Duration,
    /// Wait this long for an in-flight duplicate's result instead of answering 409 (default
    /// no wait).
    pub wait_for_result: Option<Duration>,
    /// Longest key (default 255).
    pub max_key_len: usize,
    /// Largest request body with a key (default 1 MiB; 413 beyond).
    pub request_body_limit: usize,
    /// Largest response body recorded (default 1 MiB, capped by the store's result limit).
    pub response_body_limit: usize,
    /// Status for a key reused with another request (default 422).
    pub mismatch_status: StatusCode,
    /// Whether upstream 5xx answers release the key (default `true`).
    pub release_server_errors: bool,
    /// Give up on an upstream answer after this long with 504 (default: no limit). The key is
    /// released: the request may have had effects, see docs/http.md.
    pub upstream_timeout: Option<Duration>,
    /// On shutdown, how long requests in flight may take to finish (default 30 s).
    pub drain_timeout: Duration,
}

impl ProxyConfig {
    /// A proxy listening on `listen` in front of `upstream` (`http://host[:port][/base]`).
    ///
    /// # Errors
    /// [`ProxyError::Upstream`] for a URL that is not plain `http://` with a host.
    pub fn new(listen: SocketAddr, upstream: &str) -> Result<Self, ProxyError> {
        let bad = |reason: &str| ProxyError::Upstream {
            url: upstream.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = upstream
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "https upstreams are not supported: the proxy runs next to the service over \
                     plain HTTP",
                ));
            }
            _ => return Err(bad("expected http://host[:port][/base-path]")),
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed in the upstream URL"));
        }
        let base = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            listen,
            upstream_scheme: Scheme::HTTP,
            upstream_authority: authority,
            upstream_base: base,
            upstream_url: upstream.to_owned(),
            principal: Principal::Unset,
            rules: None,
            namespace: "http".to_owned(),
            lease: idem::DEFAULT_LEASE,
            heartbeat: Heartbeat::Auto,
            retention: Duration::from_secs(24 * 3600),
            wait_for_result: None,
            max_key_len: 255,
            request_body_limit: 1024 * 1024,
            response_body_limit: 1024 * 1024,
            mismatch_status: StatusCode::UNPROCESSABLE_ENTITY,
            release_server_errors: true,
            upstream_timeout: None,
            drain_timeout: Duration::from_secs(30),
        })
    }

    /// Keys are scoped by this request header's value (an API key, `Authorization`): stored as
    /// a BLAKE3 hash, never in clear. Requests with a key but without this header get 401.
    #[must_use]
    pub fn principal_header(mut self, name: HeaderName) -> Self {
        self.principal = Principal::Header(name);
        self
    }

    /// Keys are not scoped by client (every client trusted); a warning is logged at start.
    #[must_use]
    pub fn unscoped(mut self) -> Self {
        self.principal = Principal::Unscoped;
        self
    }

    /// Adds a rule after the others (see [`Rule`] for the syntax `POST:/orders/*=required`).
    #[must_use]
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.get_or_insert_with(Rules::new).push(rule);
        self
    }

    /// Parses and adds rules in their text form.
    ///
    /// # Errors
    /// The first rule that does not parse.
    pub fn parse_rules<'a>(
        mut self,
        rules: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, crate::RuleError> {
        for r in rules {
            self = self.rule(r.parse()?);
        }
        Ok(self)
    }

    /// The upstream URL as given.
    pub fn upstream(&self) -> &str {
        &self.upstream_url
    }
}

/// A bound proxy, not yet serving: [`local_addr`](Proxy::local_addr) tells the port when the
/// configuration asked for port 0.
pub struct Proxy<S> {
    listener: TcpListener,
    config: ProxyConfig,
    layer: IdempotencyLayer<S>,
}

impl<S: Store> Proxy<S> {
    /// Builds the layer and binds the listen address.
    ///
    /// # Errors
    /// [`ProxyError::NoPrincipal`], [`ProxyError::Build`] or [`ProxyError::Bind`].
    pub async fn bind(config: ProxyConfig, store: S) -> Result<Self, ProxyError> {
        let mut b = IdempotencyLayer::builder(store)
            .name("proxy")
            .namespace(config.namespace.clone())
            .lease(config.lease)
            .heartbeat(config.heartbeat)
            .retention(config.retention)
            .max_key_len(config.max_key_len)
            .request_body_limit(config.request_body_limit)
            .response_body_limit(config.response_body_limit)
            .mismatch_status(config.mismatch_status)
            .release_server_errors(config.release_server_errors);
        if let Some(rules) = &config.rules {
            b = b.rules(rules.clone());
        }
        if let Some(wait) = config.wait_for_result {
            b = b.wait_for_result(wait);
        }
        b = match &config.principal {
            Principal::Unset => return Err(ProxyError::NoPrincipal),
            Principal::Unscoped => b.unscoped(),
            Principal::Header(name) => {
                let name = name.clone();
                b.principal(move |parts| {
                    let v = parts.headers.get(&name)?;
                    Some(format!("b3:{}", &blake3::hash(v.as_bytes()).to_hex()[..32]))
                })
            }
        };
        let layer = b.build()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ProxyError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            config,
            layer,
        })
    }

    /// The address the proxy listens on.
    ///
    /// # Errors
    /// The system's error (rare: the socket is bound).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets requests in flight
    /// finish for up to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, RequestBody<Incoming>> =
            Client::builder(TokioExecutor::new()).build(connector);
        let upstream = Upstream {
            client,
            config: Arc::new(self.config.clone()),
        };
        let service = TowerToHyperService::new(self.layer.layer(upstream));
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        tracing::info!(
            listen = %self.local_addr().map_or_else(|_| self.config.listen.to_string(), |a| a.to_string()),
            upstream = %self.config.upstream_url,
            "idem proxy serving"
        );
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let service = service.clone();
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(self.listener);
        tracing::info!("idem proxy stopping: waiting for requests in flight");
        if tokio::time::timeout(self.config.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "requests still in flight after {:?}; their keys will be taken over after the lease",
                self.config.drain_timeout
            );
        }
    }
}

/// Binds and serves until `shutdown` resolves (see [`Proxy::run`]).
///
/// # Errors
/// As [`Proxy::bind`].
pub async fn serve<S: Store>(
    config: ProxyConfig,
    store: S,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    Proxy::bind(config, store).await?.run(shutdown).await;
    Ok(())
}

/// Headers that belong to one connection, not to the message (RFC 9110, section 7.6.1).
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    use http::header;
    if let Some(listed) = headers.get(header::CONNECTION).cloned()
        && let Ok(listed) = listed.to_str()
    {
        for name in listed.split(',') {
            if let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) {
                headers.remove(name);
            }
        }
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The upstream as a tower service: forwards a request, answers 502/504 problems itself.
#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, RequestBody<Incoming>>,
    config: Arc<ProxyConfig>,
}

impl tower_service::Service<Request<RequestBody<Incoming>>> for Upstream {
    type Response = Response<ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Response<ResponseBody>, std::convert::Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<Incoming>>) -> Self::Future {
        let client = self.client.clone();
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            let target = format!("{}{}", config.upstream_base, path);
            let uri = Uri::builder()
                .scheme(config.upstream_scheme.clone())
                .authority(config.upstream_authority.clone())
                .path_and_query(target)
                .build();
            let Ok(uri) = uri else {
                return Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "proxy_bad_target",
                    "the request target cannot be forwarded",
                    &[],
                ));
            };
            let original_host = parts.headers.get(HOST).cloned();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(host) = original_host {
                parts
                    .headers
                    .insert(HeaderName::from_static("x-forwarded-host"), host);
            }
            if let Ok(host) = HeaderValue::from_str(config.upstream_authority.as_str()) {
                parts.headers.insert(HOST, host);
            }
            if let Some(idem) = parts.extensions.get::<Idempotency>() {
                parts
                    .headers
                    .insert(IDEM_ATTEMPT, HeaderValue::from(idem.attempt().number()));
                parts.headers.insert(
                    IDEM_ACQUISITION,
                    HeaderValue::from_static(match idem.acquisition() {
                        Acquisition::New => "new",
                        Acquisition::Retry => "retry",
                        Acquisition::Takeover => "takeover",
                        _ => "reprocess",
                    }),
                );
            }
            parts.uri = uri;
            let call = client.request(Request::from_parts(parts, body));
            let answer = match config.upstream_timeout {
                Some(t) => match tokio::time::timeout(t, call).await {
                    Ok(a) => a,
                    Err(_) => {
                        return Ok(problem(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream_timeout",
                            &format!("the upstream did not answer within {t:?}"),
                            &[],
                        ));
                    }
                },
                None => call.await,
            };
            Ok(match answer {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Response::from_parts(parts, boxed(body))
                }
                Err(e) => {
                    let detail = format!(
                        "the upstream {} cannot be reached: {}",
                        config.upstream_url,
                        error_chain(&e)
                    );
                    tracing::warn!("{detail}");
                    problem(
                        StatusCode::BAD_GATEWAY,
                        "upstream_unreachable",
                        &detail,
                        &[],
                    )
                }
            })
        })
    }
}

/// An error and its sources on one line, each said once.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let l: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let c = ProxyConfig::new(l, "http://127.0.0.1:3000/api/").unwrap();
        assert_eq!(c.upstream_base, "/api");
        assert!(ProxyConfig::new(l, "https://x").is_err());
        assert!(ProxyConfig::new(l, "127.0.0.1:3000").is_err());
        let e = ProxyConfig::new(l, "ftp://x").unwrap_err().to_string();
        assert!(e.contains("invalid upstream URL"), "{e}");
    }
}
