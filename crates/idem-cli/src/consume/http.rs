//! `--http URL`: POSTs each message once per key to an HTTP endpoint, with the key in the
//! `Idempotency-Key` header.
//!
//! A 2xx answer is a success. Every other answer, a refused connection or a timeout is a failed
//! attempt: released, retried with backoff, dead-lettered after `--max-attempts` with the status
//! and the start of the body as the reason. That includes 4xx: some are transient (408, 409 while
//! the endpoint is busy with the same key, 429, a 404 before a deploy finishes), and the
//! executor has no way to dead-letter at once, so a permanent 4xx costs `--max-attempts`
//! attempts before it reaches the dead-letter destination. Redirects are not followed (a POST
//! turned into a GET would lose the payload), so a 3xx is a failure too.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use idem::Attempt;
use idem_broker::Message;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use super::exec::acquisition;
use super::{Failure, ResultMode, excerpt};
use crate::store_url::redact;

/// How much of an error answer's body goes into the reason.
const REASON_BODY: usize = 200;

/// An endpoint to POST to.
#[derive(Debug)]
pub(crate) struct Http {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL without its password, for reasons and logs.
    shown: String,
    content_type: HeaderValue,
    result: ResultMode,
}

impl Http {
    /// Checks the URL and builds the client (HTTP/1.1, no proxy, no redirects).
    ///
    /// # Errors
    /// A URL that is not `http://HOST…`, or a bad `content_type`.
    pub(crate) fn new(
        url: &str,
        content_type: &str,
        timeout: Duration,
        result: ResultMode,
    ) -> anyhow::Result<Http> {
        let shown = redact(url);
        let parsed =
            reqwest::Url::parse(url).with_context(|| format!("--http {shown} is not a URL"))?;
        match parsed.scheme() {
            "http" => {}
            "https" => bail!(
                "--http {shown}: https is not built into this idem; the endpoint is meant to be \
                 local (http://127.0.0.1:PORT/PATH)"
            ),
            other => bail!("--http {shown}: expected an http:// URL, not {other}://"),
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            bail!("--http {shown} has no host");
        }
        let content_type = HeaderValue::from_str(content_type)
            .with_context(|| format!("--content-type {content_type:?} is not a header value"))?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Http {
            client,
            url: parsed,
            shown,
            content_type,
            result,
        })
    }

    /// POSTs one message. Keeps at most `limit + 1` bytes of the body, enough for the executor
    /// to fail a key whose result is over the store's limit.
    ///
    /// # Errors
    /// A [`Failure`] for a non-2xx answer, a connection error or a timeout.
    pub(crate) async fn post(
        &self,
        message: &Message,
        attempt: &Attempt,
        limit: usize,
    ) -> Result<Bytes, Failure> {
        let headers = self.headers(message, attempt)?;
        let fail = |what: &str, e: reqwest::Error| {
            Failure(format!(
                "POST {}: {what}: {}",
                self.shown,
                chain(&e.without_url())
            ))
        };
        let mut response = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(message.payload().clone())
            .send()
            .await
            .map_err(|e| fail("no answer", e))?;
        let status = response.status();
        let keep = if status.is_success() && self.result == ResultMode::None {
            0
        } else {
            limit.saturating_add(1)
        };
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| fail("reading the answer", e))?
        {
            let room = keep.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if status.is_success() {
            return Ok(Bytes::from(body));
        }
        let text = excerpt(&body, REASON_BODY);
        Err(Failure(if text.is_empty() {
            format!("POST {} answered {status}", self.shown)
        } else {
            format!("POST {} answered {status}: {text}", self.shown)
        }))
    }

    /// The request's headers: the key, the content type, the message's metadata, and its
    /// headers as `Idem-Header-<name>` (those that are valid HTTP header names and values).
    fn headers(&self, message: &Message, attempt: &Attempt) -> Result<HeaderMap, Failure> {
        let mut h = HeaderMap::new();
        let key = attempt.key().to_string();
        let key = HeaderValue::from_bytes(key.as_bytes()).map_err(|_| {
            Failure(format!(
                "the key {key:?} cannot be sent as an Idempotency-Key header"
            ))
        })?;
        h.insert(HeaderName::from_static("idempotency-key"), key);
        let content_type = message
            .header("content-type")
            .and_then(|v| HeaderValue::from_bytes(v).ok())
            .unwrap_or_else(|| self.content_type.clone());
        h.insert(CONTENT_TYPE, content_type);
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        if let Some(id) = message.message_id() {
            put("idem-message-id", id);
        }
        put("idem-attempt", &attempt.number().to_string());
        put("idem-acquisition", acquisition(attempt.acquisition()));
        put("idem-delivery-count", &message.delivery_count().to_string());
        put("idem-origin", message.origin());
        for (name, value) in message.headers() {
            let name = HeaderName::from_bytes(format!("idem-header-{name}").as_bytes());
            if let (Ok(name), Ok(value)) = (name, HeaderValue::from_bytes(value))
                && !h.contains_key(&name)
            {
                h.insert(name, value);
            }
        }
        Ok(h)
    }
}

/// An error with its sources, `a: b: c`: reqwest's own message says little ("error sending
/// request"); the cause (connection refused, timed out) is in the chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(url: &str) -> anyhow::Result<Http> {
        Http::new(
            url,
            "application/octet-stream",
            Duration::from_secs(1),
            ResultMode::Output,
        )
    }

    #[test]
    fn checks_the_url_at_start_without_printing_passwords() {
        assert!(http("http://127.0.0.1:8080/hook").is_ok());
        let err = |url: &str| match http(url) {
            Ok(_) => panic!("{url} accepted"),
            Err(e) => format!("{e:#}"),
        };
        let e = err("https://u:secret@example.com/hook");
        assert!(
            e.contains("https is not built") && !e.contains("secret"),
            "{e}"
        );
        let e = err("ftp://h/x");
        assert!(e.contains("expected an http:// URL"), "{e}");
        let e = err("not a url");
        assert!(e.contains("is not a URL"), "{e}");
    }
}
