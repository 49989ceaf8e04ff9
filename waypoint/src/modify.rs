//! Request and response changes a route dictates: header modifiers, URL rewrite,
//! redirect and direct response.

use ambit_api::config::v1 as pb;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, uri::PathAndQuery};
use regex::Regex;

use crate::{
    body::{ProxyBody, local_response},
    routes::{Consumed, ConvertError, Invalid},
};

/// Compiled [`pb::HeaderModifier`]: set, then add, then remove.
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Absent modifier: no changes.
    pub fn try_from_proto(m: Option<&pb::HeaderModifier>) -> Result<Self, ConvertError> {
        let Some(m) = m else {
            return Ok(Self::default());
        };
        let pairs = |list: &[pb::HeaderValue], field: &str| {
            list.iter()
                .enumerate()
                .map(|(i, h)| {
                    let name = header_name(&h.name).map_err(|e| {
                        ConvertError::new(format!("{field}[{i}].name"), Invalid::HeaderName(e))
                    })?;
                    let value = HeaderValue::from_str(&h.value).map_err(|e| {
                        ConvertError::new(format!("{field}[{i}].value"), Invalid::HeaderValue(e))
                    })?;
                    Ok((name, value))
                })
                .collect::<Result<Vec<_>, ConvertError>>()
        };
        let remove = m
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| {
                header_name(n)
                    .map_err(|e| ConvertError::new(format!("remove[{i}]"), Invalid::HeaderName(e)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            set: pairs(&m.set, "set")?,
            add: pairs(&m.add, "add")?,
            remove,
        })
    }

    /// No changes at all.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Apply to a header map.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// `:authority` is carried as `host` in an `http::Request`'s header map.
fn header_name(name: &str) -> Result<HeaderName, http::header::InvalidHeaderName> {
    if name == ":authority" {
        return Ok(http::header::HOST);
    }
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
}

/// Compiled [`pb::HttpRewrite`].
#[derive(Debug)]
pub struct Rewrite {
    path: Option<PathRewrite>,
    authority: Option<HeaderValue>,
}

#[derive(Debug)]
enum PathRewrite {
    Full(String),
    Prefix(String),
    Regex(Regex, String),
}

impl Rewrite {
    /// Compile; a bad regex or authority names its field.
    pub fn try_from_proto(r: &pb::HttpRewrite) -> Result<Self, ConvertError> {
        use pb::http_rewrite::Path;
        let path = match &r.path {
            None => None,
            Some(Path::FullPath(p)) => Some(PathRewrite::Full(p.clone())),
            Some(Path::Prefix(p)) => Some(PathRewrite::Prefix(p.clone())),
            Some(Path::Regex(rr)) => Some(PathRewrite::Regex(
                Regex::new(&rr.pattern)
                    .map_err(|e| ConvertError::new("regex.pattern", Invalid::Regex(e)))?,
                // `\1` (RE2 / Envoy) → `${1}` (Rust regex).
                backrefs(&rr.substitution),
            )),
        };
        let authority = if r.authority.is_empty() {
            None
        } else {
            Some(
                HeaderValue::from_str(&r.authority)
                    .map_err(|e| ConvertError::new("authority", Invalid::HeaderValue(e)))?,
            )
        };
        Ok(Self { path, authority })
    }

    /// Rewrite the request's path (keeping the query) and authority.
    pub fn apply<B>(&self, request: &mut http::Request<B>, consumed: Consumed) {
        if let Some(rewrite) = &self.path {
            let old = request.uri().path().to_owned();
            let new = match rewrite {
                PathRewrite::Full(p) => p.clone(),
                PathRewrite::Prefix(p) => {
                    let rest = match consumed {
                        Consumed::Prefix(n) => old.get(n..).unwrap_or(""),
                        Consumed::Whole => "",
                    };
                    join_prefix(p, rest)
                }
                PathRewrite::Regex(re, sub) => re.replace_all(&old, sub.as_str()).into_owned(),
            };
            let pq = match request.uri().query() {
                Some(q) => format!("{new}?{q}"),
                None => new,
            };
            if let Ok(pq) = PathAndQuery::try_from(pq) {
                let mut parts = request.uri().clone().into_parts();
                parts.path_and_query = Some(pq);
                if let Ok(uri) = Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
            }
        }
        if let Some(authority) = &self.authority {
            request
                .headers_mut()
                .insert(http::header::HOST, authority.clone());
            if let Ok(a) = http::uri::Authority::try_from(authority.as_bytes()) {
                let mut parts = request.uri().clone().into_parts();
                if parts.authority.is_some() {
                    parts.authority = Some(a);
                    if let Ok(uri) = Uri::from_parts(parts) {
                        *request.uri_mut() = uri;
                    }
                }
            }
        }
    }
}

/// Gateway API `ReplacePrefixMatch`: `/foo` + `/bar` → `/foo/bar`, `/` + `/bar` → `/bar`,
/// never a double slash, never an empty path.
fn join_prefix(prefix: &str, rest: &str) -> String {
    let joined = if prefix.ends_with('/') && rest.starts_with('/') {
        format!("{prefix}{}", &rest[1..])
    } else {
        format!("{prefix}{rest}")
    };
    if joined.is_empty() {
        "/".to_owned()
    } else {
        joined
    }
}

fn backrefs(sub: &str) -> String {
    let mut out = String::with_capacity(sub.len());
    let mut chars = sub.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.next_if(char::is_ascii_digit) {
                    out.push(d);
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// Compiled [`pb::Redirect`].
#[derive(Debug)]
pub struct Redirect {
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<RedirectPath>,
    status: StatusCode,
}

#[derive(Debug)]
enum RedirectPath {
    Full(String),
    Prefix(String),
}

impl Redirect {
    /// Compile; the status must be a redirect status.
    pub fn try_from_proto(r: &pb::Redirect) -> Result<Self, ConvertError> {
        let status = match r.status_code {
            0 => StatusCode::MOVED_PERMANENTLY,
            s @ (301 | 302 | 303 | 307 | 308) => StatusCode::from_u16(s as u16)
                .map_err(|_| ConvertError::new("status_code", Invalid::Status(s)))?,
            s => return Err(ConvertError::new("status_code", Invalid::Status(s))),
        };
        let port = match r.port {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| ConvertError::new("port", Invalid::Port(p)))?),
        };
        let path = match &r.path {
            None => None,
            Some(pb::redirect::Path::FullPath(p)) => Some(RedirectPath::Full(p.clone())),
            Some(pb::redirect::Path::Prefix(p)) => Some(RedirectPath::Prefix(p.clone())),
        };
        Ok(Self {
            scheme: (!r.scheme.is_empty()).then(|| r.scheme.clone()),
            host: (!r.host.is_empty()).then(|| r.host.clone()),
            port,
            path,
            status,
        })
    }

    /// The redirect response for `request`.
    pub fn respond<B>(
        &self,
        request: &http::Request<B>,
        consumed: Consumed,
    ) -> http::Response<ProxyBody> {
        let req_scheme = request.uri().scheme_str().unwrap_or("http");
        let scheme = self.scheme.as_deref().unwrap_or(req_scheme);
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let (req_host, req_port) = split_host_port(&authority);
        let host = self.host.as_deref().unwrap_or(req_host);
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => Some(p),
            // Changing the scheme drops the old port: the new scheme's default applies.
            (None, Some(_)) => None,
            (None, None) => req_port,
        };
        let default_port = match scheme {
            "https" => 443,
            _ => 80,
        };
        let path = match &self.path {
            None => request.uri().path().to_owned(),
            Some(RedirectPath::Full(p)) => p.clone(),
            Some(RedirectPath::Prefix(p)) => {
                let old = request.uri().path();
                let rest = match consumed {
                    Consumed::Prefix(n) => old.get(n..).unwrap_or(""),
                    Consumed::Whole => "",
                };
                join_prefix(p, rest)
            }
        };
        let mut location = format!("{scheme}://{host}");
        if let Some(port) = port.filter(|&p| p != default_port) {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(q) = request.uri().query() {
            location.push('?');
            location.push_str(q);
        }
        let mut response = local_response(self.status, Bytes::new());
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(http::header::LOCATION, value);
        }
        response
    }
}

fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            match port.parse() {
                Ok(p) => (host, Some(p)),
                Err(_) => (authority, None),
            }
        }
        _ => (authority, None),
    }
}

/// Compiled [`pb::DirectResponse`].
#[derive(Debug)]
pub struct DirectResponse {
    status: StatusCode,
    body: Bytes,
}

impl DirectResponse {
    /// Compile; the status must be a valid HTTP status.
    pub fn try_from_proto(d: &pb::DirectResponse) -> Result<Self, ConvertError> {
        let status = u16::try_from(d.status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(|| ConvertError::new("status", Invalid::Status(d.status)))?;
        Ok(Self {
            status,
            body: Bytes::from(d.body.clone()),
        })
    }

    /// The response.
    pub fn respond(&self) -> http::Response<ProxyBody> {
        local_response(self.status, self.body.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_join_never_doubles_slashes() {
        assert_eq!(join_prefix("/", "/bar"), "/bar");
        assert_eq!(join_prefix("/new", "/bar"), "/new/bar");
        assert_eq!(join_prefix("/new/", ""), "/new/");
        assert_eq!(join_prefix("", ""), "/");
    }

    #[test]
    fn backrefs_convert() {
        assert_eq!(backrefs(r"/v2/\1/x"), "/v2/${1}/x");
        assert_eq!(backrefs("$a"), "$$a");
    }
}
