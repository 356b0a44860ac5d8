//! `idem proxy`: a reverse proxy that gives an HTTP service written in any language
//! `Idempotency-Key` semantics (docs/http.md).
//!
//! A request with a key is forwarded upstream once; a retry with the same key and the same
//! request gets the recorded response (`Idempotent-Replayed: true`), a retry while the first is
//! still upstream gets 409 with `Retry-After` (or waits, with --wait-for-result), the same key
//! with another request gets 422. Requests the rules do not cover pass through untouched. The
//! rules, the store and the crash behaviour are the library's ([`idem_http::proxy`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use idem::AnyStore;
use idem_http::proxy::ProxyConfig;

use crate::consume::{open_store, parse_duration};
use crate::store_url::{OpenOptions, StoreUrl};

/// `idem proxy` options.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  \
      idem proxy --listen 127.0.0.1:8080 --upstream http://127.0.0.1:3000 \\\n      \
      --store sqlite:idem.db --rule 'POST:/orders/*=required' --principal-header x-api-key\n\n\
      Logs go to stderr; RUST_LOG sets the filter.")]
pub(crate) struct Args {
    /// Where to listen.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The service behind the proxy: `http://HOST[:PORT][/BASE]` (plain HTTP, next to it).
    #[arg(long, env = "IDEM_UPSTREAM", value_name = "URL")]
    upstream: String,
    /// Where the records live: `sqlite:PATH` (embedded, the default), `redis://HOST/DB`,
    /// `postgres://USER@HOST/DB` (run `idem migrate` first), `mysql://USER@HOST/DB`, or `memory`
    /// (forgotten when the proxy stops). Every replica of one proxy must share the store.
    #[arg(
        long,
        env = "IDEM_STORE",
        hide_env_values = true,
        value_name = "URL",
        default_value = "sqlite:idem.db"
    )]
    store: StoreUrl,
    /// Which requests take a key: `METHODS:PATH=required|optional|off`, e.g.
    /// `POST:/orders/*=required` (`*` one path segment, `**` any rest). Repeat it; the first
    /// rule that matches decides. Without rules: `POST,PATCH:/**=optional`.
    #[arg(long = "rule", value_name = "RULE")]
    rules: Vec<String>,
    /// Scope keys by this request header (an API key, `Authorization`): two clients may use the
    /// same key. Its value is stored hashed. A keyed request without it gets 401.
    #[arg(long, value_name = "NAME", required_unless_present = "unscoped")]
    principal_header: Option<String>,
    /// Keys are shared by every client (all of them trusted): one client's key replays another
    /// client's response.
    #[arg(long, conflicts_with = "principal_header")]
    unscoped: bool,
    /// Namespace of the keys in the store (A-Z a-z 0-9 - _ . /), so that several proxies can
    /// share one store.
    #[arg(long, value_name = "NAME", default_value = "http")]
    namespace: String,
    /// How long a request may be upstream before another proxy may take its key over, kept
    /// alive by a heartbeat while the upstream answers: a crashed proxy's keys are free again
    /// this long after the crash.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// How long a completed key is remembered.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    retention: Duration,
    /// Wait this long for the response of a request still upstream instead of answering 409.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    wait_for_result: Option<Duration>,
    /// Answer 504 when the upstream has not answered after this long; the key is released (the
    /// request may have had effects upstream). Default: no limit.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    upstream_timeout: Option<Duration>,
    /// Largest request body with a key, in bytes (413 beyond).
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    max_request_body: usize,
    /// Serve Prometheus metrics on `ADDR` (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    crate::observe::init_logging(
        crate::observe::LogFormat::Text,
        "warn,idem=info,idem_http=info",
    );
    let mut config = ProxyConfig::new(args.listen, &args.upstream)?
        .parse_rules(args.rules.iter().map(String::as_str))
        .context("invalid --rule")?;
    config = match (&args.principal_header, args.unscoped) {
        (Some(name), _) => config.principal_header(
            name.parse()
                .with_context(|| format!("invalid --principal-header {name:?}"))?,
        ),
        (None, true) => config.unscoped(),
        // clap requires one of them; the proxy refuses to start without one too.
        (None, false) => config,
    };
    config.namespace = args.namespace;
    config.lease = args.lease;
    config.retention = args.retention;
    config.wait_for_result = args.wait_for_result;
    config.upstream_timeout = args.upstream_timeout;
    config.request_body_limit = args.max_request_body;
    if args.store == StoreUrl::Memory {
        tracing::warn!(
            "the memory store forgets every record when the proxy stops: retries after a \
             restart run again upstream; use sqlite:PATH or a networked store in production"
        );
    }
    // Before the layer: its metric handles are registered when it is built.
    let endpoint = match args.metrics_addr {
        Some(addr) => Some(crate::observe::serve(addr).await?),
        None => None,
    };
    let opened = open_store(&args.store, OpenOptions::default()).await?;
    let store = with_store!(opened, s => AnyStore::new(s));
    let proxy = idem_http::proxy::Proxy::bind(config, store).await?;
    tracing::info!(
        listen = %proxy.local_addr()?,
        upstream = %args.upstream,
        store = %args.store,
        "proxying"
    );
    if let Some(e) = &endpoint {
        e.health.set_ready(true);
    }
    proxy.run(idem_broker::shutdown_signal()).await;
    if let Some(e) = &endpoint {
        e.health.set_ready(false);
    }
    Ok(())
}
