//! `fetch(input, init?)`: a request made by moat itself for a handler (trusted code: the
//! container's host lists do not apply, moat's own listeners still do).

use std::rc::Rc;

use http::{Method, StatusCode};
use mlua::{Lua, Result, Value};

use super::body::{BodySlot, SharedBody};
use super::headers::LuaHeaders;
use super::meter::STREAM_HOLD;
use super::request::{LuaRequest, Outgoing, ParsedUrl, Redirect};
use super::response::LuaResponse;
use crate::body;
use crate::upstream::{self, DialRules, Upstream, UpstreamError};

/// Most redirects `fetch` follows (as in Workers).
const MAX_REDIRECTS: usize = 20;

/// A `fetch` that failed before a response arrived. If it escapes the handler, the client
/// gets the same 502/504 that egress would give (SPEC 9), not a 500.
#[derive(Debug, thiserror::Error)]
#[error("fetch {url} failed: {source}")]
pub struct FetchError {
    pub url: String,
    #[source]
    pub source: UpstreamError,
}

/// Installs `fetch`. Without an upstream (a state that only validates a script) `fetch`
/// raises an error: scripts may fetch only inside handlers.
pub fn install(lua: &Lua, upstream: Option<Rc<Upstream>>) -> Result<()> {
    let f = lua.create_async_function(move |lua, (input, init): (Value, Option<Value>)| {
        let upstream = upstream.clone();
        async move {
            let upstream = upstream.ok_or_else(|| mlua::Error::runtime("fetch can only be called inside a handler"))?;
            let req = LuaRequest::outgoing(&lua, input, init)?;
            // mlua keeps a finished future's allocation until Lua collects the call's objects,
            // and Lua's collector does not count it. Boxed, the request's state (about 3 KB)
            // is freed when the fetch ends; what Lua holds on to is this small wrapper.
            Box::pin(fetch(&lua, &upstream, req)).await
        }
    })?;
    lua.globals().set("fetch", f)
}

async fn fetch(lua: &Lua, upstream: &Upstream, req: Outgoing) -> Result<LuaResponse> {
    let Outgoing { mut method, url: url_text, mut headers, body: req_body, redirect, parsed } = req;
    // The URL as text, taken apart once: a request moat made (or `Request.new` parsed) comes
    // with its target; the `url::Url` itself is needed only to follow a redirect.
    let mut url: Option<url::Url> = None;
    let mut url_text = url_text;
    let mut next = Some(match parsed {
        Some(p) => p,
        None => {
            let u = url::Url::parse(&url_text).map_err(mlua::Error::external)?;
            let p = ParsedUrl::of(&u)?;
            url = Some(u);
            p
        }
    });
    if super::redacts_secrets(lua) {
        // A compressed body would hide a reflected secret from the redactor.
        headers.remove(http::header::ACCEPT_ENCODING);
    }
    // A streamed body can be sent once; bytes already in memory can be replayed on redirect.
    let replayable = req_body.peek_bytes();
    let mut body = Some(req_body.take()?);
    // Hop 0 is the request itself; a redirect answered on hop MAX_REDIRECTS would be the
    // 21st to follow, which Workers refuse with an error rather than return.
    for hop in 0..=MAX_REDIRECTS {
        let ParsedUrl { target, origin_form } = next.take().expect("set before every hop");
        if let Some(scope) = crate::script::scope::current()
            && !scope.take_subrequest()
        {
            return Err(mlua::Error::runtime(
                "fetch: this handler call made its limits.subrequests upstream requests already (each redirect counts)",
            ));
        }
        let may_follow = redirect == Redirect::Follow;
        // The headers are needed again only if a redirect can be followed.
        let hop_headers = if may_follow { headers.clone() } else { std::mem::take(&mut headers) };
        let uri = http::Uri::try_from(origin_form).map_err(mlua::Error::external)?;
        let this_body = match body.take() {
            Some(b) => b,
            None => match &replayable {
                Some(bytes) => body::full(bytes.clone()),
                None => {
                    return Err(mlua::Error::runtime("fetch: cannot follow a redirect that resends a streamed body"));
                }
            },
        };
        let mut http_req = http::Request::new(this_body);
        *http_req.method_mut() = method.clone();
        *http_req.uri_mut() = uri;
        *http_req.headers_mut() = hop_headers;
        let http_req = upstream::to_upstream_request(http_req, &target);
        let resp = upstream
            .send(http_req, &target, DialRules::Trusted)
            .await
            .map_err(|source| mlua::Error::external(FetchError { url: url_text.clone(), source }))?;
        let status = resp.status();
        let location = resp.headers().get(http::header::LOCATION).and_then(|l| l.to_str().ok()).map(str::to_string);
        if let (true, true, Some(loc)) = (may_follow, status.is_redirection(), location) {
            if hop == MAX_REDIRECTS {
                break;
            }
            let current = match url.take() {
                Some(u) => u,
                None => url::Url::parse(&url_text).map_err(mlua::Error::external)?,
            };
            let joined = current
                .join(&loc)
                .map_err(|e| mlua::Error::runtime(format!("fetch: bad redirect Location {loc:?}: {e}")))?;
            // RFC 9110 §15.4: 303 (and, as browsers do, 301/302 after POST) switch to GET.
            if status == StatusCode::SEE_OTHER
                || (matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND) && method == Method::POST)
            {
                method = Method::GET;
                body = Some(body::empty());
                headers.remove(http::header::CONTENT_LENGTH);
                headers.remove(http::header::CONTENT_TYPE);
            }
            if joined.origin() != current.origin() {
                headers.remove(http::header::AUTHORIZATION);
                headers.remove(http::header::COOKIE);
                drop_secret_headers(&mut headers, &joined);
            }
            next = Some(ParsedUrl::of(&joined)?);
            url_text = joined.to_string();
            url = Some(joined);
            continue;
        }
        return response_from_upstream(lua, resp, url_text);
    }
    Err(mlua::Error::runtime(format!("fetch: more than {MAX_REDIRECTS} redirects")))
}

/// On a redirect to another origin, removes every header that carries a secret value, not
/// only `Authorization`: an injected `x-api-key` (or any header a recipe uses) must not follow
/// a redirect to a host the policy never chose.
fn drop_secret_headers(headers: &mut http::HeaderMap, next: &url::Url) {
    let secrets = crate::log::secrets();
    let carries_secret = |v: &http::HeaderValue| {
        let v = v.as_bytes();
        secrets
            .iter()
            .any(|(_, s)| s.len() >= crate::log::MIN_REDACTED_LEN && v.windows(s.len()).any(|w| w == s.as_bytes()))
    };
    let names: Vec<http::HeaderName> =
        headers.keys().filter(|name| headers.get_all(*name).iter().any(carries_secret)).cloned().collect();
    for name in names {
        headers.remove(&name);
        tracing::warn!(
            "fetch: header {name} carries a secret and is not sent on the redirect to {}",
            next.origin().ascii_serialization()
        );
    }
}

/// Wraps an upstream response for Lua, without its hop-by-hop headers, charged to the state.
pub fn response_from_upstream(
    lua: &Lua,
    resp: http::Response<hyper::body::Incoming>,
    url: String,
) -> Result<LuaResponse> {
    let (mut parts, incoming) = resp.into_parts();
    if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
        crate::headers::strip_hop_by_hop_keep_upgrade(&mut parts.headers);
    } else {
        crate::headers::strip_hop_by_hop(&mut parts.headers);
    }
    let headers = LuaHeaders::detached(parts.headers);
    headers.charge_to(lua)?;
    let streaming = !hyper::body::Body::is_end_stream(&incoming);
    let mut r = LuaResponse::empty(SharedBody::new(BodySlot::Stream(body::boxed(incoming))));
    r.charge.add(lua, url.len() + if streaming { STREAM_HOLD } else { 0 })?;
    (r.status, r.headers, r.url) = (parts.status, headers, url);
    *r.extensions.get_mut() = parts.extensions;
    Ok(r)
}
