//! The layer's own answers, as `application/problem+json` (RFC 9457).

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::ResponseBody;

/// The media type of the layer's error answers.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem document: `type` is `about:blank`, `title` the status's reason phrase, `detail`
/// the explanation, `code` a stable machine-readable name, plus optional extra members.
pub(crate) fn problem(
    status: StatusCode,
    code: &str,
    detail: &str,
    extra: &[(&str, serde_json::Value)],
) -> Response<ResponseBody> {
    let mut doc = serde_json::Map::new();
    doc.insert("type".into(), "about:blank".into());
    doc.insert(
        "title".into(),
        status.canonical_reason().unwrap_or("Error").into(),
    );
    doc.insert("status".into(), status.as_u16().into());
    doc.insert("detail".into(), detail.into());
    doc.insert("code".into(), code.into());
    for (k, v) in extra {
        doc.insert((*k).into(), v.clone());
    }
    let body = serde_json::to_vec(&serde_json::Value::Object(doc)).unwrap_or_default();
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    resp
}

/// Adds `Retry-After` in whole seconds, rounded up, at least 1.
pub(crate) fn retry_after(
    mut resp: Response<ResponseBody>,
    after: Duration,
) -> Response<ResponseBody> {
    let secs = after.as_millis().div_ceil(1000).max(1);
    resp.headers_mut().insert(
        RETRY_AFTER,
        HeaderValue::from(u64::try_from(secs).unwrap_or(u64::MAX)),
    );
    resp
}
