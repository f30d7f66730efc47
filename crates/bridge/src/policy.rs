//! What a run's agent may reach through the bridge: a route allowlist, the headers passed each way, size and
//! concurrency limits, and the names of the environment variables the agent gets.
//!
//! Paths are matched only after [`normalize_path`] accepted them, and it accepts a deliberately small language:
//! plain ASCII segments, no dot segments, no empty segments, no percent-escapes at all. A path the upstream might
//! decode or normalize into something else never gets as far as the matcher, so "what the bridge matched" and
//! "what the upstream routes" cannot disagree.

use http::Method;
use http::header::HeaderName;
use serde::Deserialize;

use crate::error::BridgeError;

/// A named policy: the allowlist and limits one run's bridge enforces.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BridgePolicy {
    pub name: String,
    /// The allowlist: a request must match one rule.
    pub routes: Vec<RouteRule>,
    /// Request headers forwarded upstream (lowercase). Credentials, `Host`, `Cookie`, `X-Forwarded-*`, `x-berth-*`
    /// and hop-by-hop headers can never be listed.
    #[serde(default = "default_request_headers")]
    pub request_headers: Vec<String>,
    /// Response headers passed back to the agent (lowercase).
    #[serde(default = "default_response_headers")]
    pub response_headers: Vec<String>,
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: u64,
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Requests one run may have in flight at once; more get 503 with `Retry-After`.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Covers connecting, the response head and the whole response body.
    #[serde(default = "default_upstream_timeout_ms")]
    pub upstream_timeout_ms: u64,
    #[serde(default)]
    pub env: EnvNames,
}

/// One allowed route. `path` is a pattern: literal segments, and `:name` for exactly one non-empty segment.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    pub method: String,
    pub path: String,
}

/// The environment variables that tell the agent where the bridge is.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvNames {
    pub url: String,
    pub token: String,
    pub run_id: Option<String>,
}

impl Default for EnvNames {
    fn default() -> Self {
        Self {
            url: "BERTH_API_URL".to_owned(),
            token: "BERTH_API_TOKEN".to_owned(),
            run_id: Some("BERTH_RUN_ID".to_owned()),
        }
    }
}

fn default_request_headers() -> Vec<String> {
    [
        "accept",
        "content-type",
        "if-match",
        "if-none-match",
        "idempotency-key",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn default_response_headers() -> Vec<String> {
    ["content-type", "etag", "last-modified", "retry-after"]
        .map(str::to_owned)
        .to_vec()
}

fn default_max_request_bytes() -> u64 {
    1024 * 1024
}

fn default_max_response_bytes() -> u64 {
    8 * 1024 * 1024
}

fn default_max_in_flight() -> u32 {
    32
}

fn default_upstream_timeout_ms() -> u64 {
    30_000
}

/// Headers no policy may forward in either direction: credentials, routing, proxy and hop-by-hop headers, and the
/// ones the bridge sets itself.
const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "proxy-authenticate",
    "cookie",
    "host",
    "forwarded",
    "via",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
];
const NEVER_FORWARDED_PREFIXES: &[&str] = &["x-forwarded-", "x-berth-", "proxy-"];

/// The reference system's documented heartbeat route surface (its baseline `DEFAULT_SANDBOX_CALLBACK_BRIDGE_ROUTE_
/// ALLOWLIST`), with `(a|b)` and `(/x)?` expanded into separate rules.
const PAPERCLIP_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/agents/me"),
    ("GET", "/api/agents/me/inbox-lite"),
    ("GET", "/api/agents/me/inbox/mine"),
    ("GET", "/api/agents/:id"),
    ("GET", "/api/agents/:id/skills"),
    ("POST", "/api/agents/:id/skills/sync"),
    ("PATCH", "/api/agents/:id/instructions-path"),
    ("GET", "/api/companies/:id"),
    ("GET", "/api/companies/:id/dashboard"),
    ("GET", "/api/companies/:id/agents"),
    ("GET", "/api/companies/:id/issues"),
    ("GET", "/api/companies/:id/projects"),
    ("GET", "/api/companies/:id/goals"),
    ("GET", "/api/companies/:id/org"),
    ("GET", "/api/companies/:id/approvals"),
    ("GET", "/api/companies/:id/routines"),
    ("GET", "/api/companies/:id/skills"),
    ("GET", "/api/projects/:id"),
    ("GET", "/api/goals/:id"),
    ("GET", "/api/issues/:id"),
    ("GET", "/api/issues/:id/heartbeat-context"),
    ("GET", "/api/issues/:id/comments"),
    ("GET", "/api/issues/:id/comments/:cid"),
    ("GET", "/api/issues/:id/documents"),
    ("GET", "/api/issues/:id/documents/:key"),
    ("GET", "/api/issues/:id/documents/:key/revisions"),
    ("GET", "/api/issues/:id/approvals"),
    ("POST", "/api/issues/:id/comments"),
    ("PUT", "/api/issues/:id/documents/:key"),
    ("POST", "/api/issues/:id/checkout"),
    ("POST", "/api/issues/:id/release"),
    ("PATCH", "/api/issues/:id"),
    ("GET", "/api/issues/:id/interactions"),
    ("GET", "/api/issues/:id/interactions/:iid"),
    ("POST", "/api/issues/:id/interactions"),
    ("POST", "/api/issues/:id/interactions/:iid/accept"),
    ("POST", "/api/issues/:id/interactions/:iid/reject"),
    ("POST", "/api/issues/:id/interactions/:iid/respond"),
    ("POST", "/api/companies/:id/issues"),
    ("GET", "/api/approvals/:id"),
    ("GET", "/api/approvals/:id/issues"),
    ("GET", "/api/approvals/:id/comments"),
    ("POST", "/api/approvals/:id/comments"),
    ("POST", "/api/companies/:id/approvals"),
    ("GET", "/api/execution-workspaces/:id"),
    (
        "POST",
        "/api/execution-workspaces/:id/runtime-services/start",
    ),
    (
        "POST",
        "/api/execution-workspaces/:id/runtime-services/stop",
    ),
    (
        "POST",
        "/api/execution-workspaces/:id/runtime-services/restart",
    ),
    ("GET", "/api/routines/:id"),
    ("GET", "/api/routines/:id/runs"),
    ("POST", "/api/companies/:id/routines"),
    ("PATCH", "/api/routines/:id"),
    ("POST", "/api/routines/:id/run"),
    ("POST", "/api/routines/:id/triggers"),
    ("PATCH", "/api/routine-triggers/:id"),
    ("DELETE", "/api/routine-triggers/:id"),
];

// === impl BridgePolicy ===

impl BridgePolicy {
    /// The berth agent API (API.md §6): `GET /api/agent/run` and `POST /api/agent/events`.
    pub fn agent_default() -> Self {
        Self::with_routes(
            "default",
            &[("GET", "/api/agent/run"), ("POST", "/api/agent/events")],
            EnvNames::default(),
        )
    }

    /// The reference system's heartbeat surface, for agents written against it; they find the bridge in
    /// `PAPERCLIP_API_URL` / `PAPERCLIP_API_KEY`.
    pub fn paperclip() -> Self {
        Self::with_routes(
            "paperclip",
            PAPERCLIP_ROUTES,
            EnvNames {
                url: "PAPERCLIP_API_URL".to_owned(),
                token: "PAPERCLIP_API_KEY".to_owned(),
                run_id: None,
            },
        )
    }

    /// A built-in policy by name: `default` or `paperclip`.
    pub fn profile(name: &str) -> Option<Self> {
        match name {
            "default" => Some(Self::agent_default()),
            "paperclip" => Some(Self::paperclip()),
            _ => None,
        }
    }

    /// Parses a policy (unknown fields are refused) and [validates](Self::validate) it.
    pub fn from_json(text: &str) -> Result<Self, BridgeError> {
        let policy: Self =
            serde_json::from_str(text).map_err(|err| BridgeError::InvalidPolicy {
                message: err.to_string(),
            })?;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks what serde cannot: well-formed route patterns and methods, forwardable header names, identifier env
    /// names, and positive limits. Reports the first problem, with its path.
    pub fn validate(&self) -> Result<(), BridgeError> {
        let invalid = |message: String| Err(BridgeError::InvalidPolicy { message });
        if self.name.trim().is_empty() {
            return invalid("name: must not be empty".to_owned());
        }
        for (index, rule) in self.routes.iter().enumerate() {
            if let Err(problem) = validate_method(&rule.method) {
                return invalid(format!("routes[{index}].method: {problem}"));
            }
            if let Err(problem) = validate_pattern(&rule.path) {
                return invalid(format!("routes[{index}].path: {problem}"));
            }
        }
        for (field, names) in [
            ("requestHeaders", &self.request_headers),
            ("responseHeaders", &self.response_headers),
        ] {
            for (index, name) in names.iter().enumerate() {
                if let Err(problem) = validate_header_name(name) {
                    return invalid(format!("{field}[{index}]: {problem}"));
                }
            }
        }
        for (field, value) in [
            ("maxRequestBytes", self.max_request_bytes),
            ("maxResponseBytes", self.max_response_bytes),
            ("maxInFlight", u64::from(self.max_in_flight)),
            ("upstreamTimeoutMs", self.upstream_timeout_ms),
        ] {
            if value == 0 {
                return invalid(format!("{field}: must be greater than 0"));
            }
        }
        for (field, name) in [
            ("env.url", Some(&self.env.url)),
            ("env.token", Some(&self.env.token)),
            ("env.runId", self.env.run_id.as_ref()),
        ] {
            if let Some(name) = name
                && !is_env_name(name)
            {
                return invalid(format!("{field}: `{name}` is not a valid variable name"));
            }
        }
        Ok(())
    }

    /// Normalizes `path` and matches it against the allowlist: `Ok(())` if allowed,
    /// [`BridgeError::PathRejected`] (400) for a path the bridge will not match at all,
    /// [`BridgeError::RouteNotAllowed`] (403) for a clean path no rule allows.
    pub fn check(&self, method: &Method, path: &str) -> Result<(), BridgeError> {
        let path = normalize_path(path)?;
        let allowed = self
            .routes
            .iter()
            .any(|rule| rule.method == method.as_str() && pattern_matches(&rule.path, path));
        if allowed {
            Ok(())
        } else {
            Err(BridgeError::RouteNotAllowed {
                method: method.as_str().to_owned(),
                path: path.to_owned(),
            })
        }
    }

    /// The request headers to forward, parsed. Names that can never be forwarded are left out even if the policy
    /// was built in code without [`validate`](Self::validate).
    pub(crate) fn request_header_names(&self) -> Vec<HeaderName> {
        forwardable(&self.request_headers)
    }

    pub(crate) fn response_header_names(&self) -> Vec<HeaderName> {
        forwardable(&self.response_headers)
    }

    fn with_routes(name: &str, routes: &[(&str, &str)], env: EnvNames) -> Self {
        Self {
            name: name.to_owned(),
            routes: routes
                .iter()
                .map(|(method, path)| RouteRule {
                    method: (*method).to_owned(),
                    path: (*path).to_owned(),
                })
                .collect(),
            request_headers: default_request_headers(),
            response_headers: default_response_headers(),
            max_request_bytes: default_max_request_bytes(),
            max_response_bytes: default_max_response_bytes(),
            max_in_flight: default_max_in_flight(),
            upstream_timeout_ms: default_upstream_timeout_ms(),
            env,
        }
    }
}

/// Accepts only paths the bridge can match unambiguously, and returns the path unchanged. Rejects, before any
/// matching: a path not starting with `/`; `.` and `..` segments; empty segments (`//`, a trailing `/`); any
/// percent-escape (so `%2f`, `%5c`, `%2e` and `%00` in any case); backslashes; non-ASCII; control characters; and
/// anything else outside the RFC 3986 path characters.
pub fn normalize_path(path: &str) -> Result<&str, BridgeError> {
    let reject = |reason| Err(BridgeError::PathRejected { reason });
    let Some(rest) = path.strip_prefix('/') else {
        return reject("the path must start with '/'");
    };
    for byte in path.bytes() {
        match byte {
            b'%' => return reject("percent-escapes are not accepted"),
            b'\\' => return reject("backslashes are not accepted"),
            0..=0x1f | 0x7f => return reject("control characters are not accepted"),
            0x80..=0xff => return reject("non-ASCII characters are not accepted"),
            byte if !is_path_char(byte) => {
                return reject("the path holds a character outside RFC 3986 path characters");
            }
            _ => {}
        }
    }
    // "/" alone is the root; everywhere else an empty segment is `//` or a trailing slash.
    if rest.is_empty() {
        return Ok(path);
    }
    for segment in rest.split('/') {
        match segment {
            "" => return reject("empty path segments are not accepted"),
            "." | ".." => return reject("dot segments are not accepted"),
            _ => {}
        }
    }
    Ok(path)
}

/// RFC 3986 `pchar` without `%` (escapes are refused outright), plus the `/` separator.
fn is_path_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

/// Matches a normalized `path` against a validated pattern, segment by segment.
fn pattern_matches(pattern: &str, path: &str) -> bool {
    let mut pattern_segments = pattern.split('/');
    let mut path_segments = path.split('/');
    loop {
        match (pattern_segments.next(), path_segments.next()) {
            (None, None) => return true,
            (Some(expected), Some(actual)) => {
                let matches = if expected.starts_with(':') {
                    !actual.is_empty()
                } else {
                    expected == actual
                };
                if !matches {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

fn validate_method(method: &str) -> Result<(), &'static str> {
    if method.is_empty() || method.len() > 32 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("must be an uppercase method name such as GET");
    }
    Ok(())
}

fn validate_pattern(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with('/') {
        return Err(format!("`{pattern}` must start with '/'"));
    }
    // A pattern must itself be a path the bridge would accept, with `:name` segments.
    normalize_path(pattern).map_err(|err| format!("`{pattern}`: {err}"))?;
    for segment in pattern.split('/').skip(1) {
        if let Some(name) = segment.strip_prefix(':')
            && (name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            return Err(format!(
                "`{pattern}`: a parameter is ':' and a name of letters, digits and '_'"
            ));
        }
    }
    Ok(())
}

fn validate_header_name(name: &str) -> Result<(), String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a header name"))?;
    if parsed.as_str() != name {
        return Err(format!("`{name}` must be lowercase"));
    }
    if is_never_forwarded(name) {
        return Err(format!("`{name}` can never be forwarded"));
    }
    Ok(())
}

fn is_never_forwarded(name: &str) -> bool {
    NEVER_FORWARDED.contains(&name)
        || NEVER_FORWARDED_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

fn forwardable(names: &[String]) -> Vec<HeaderName> {
    let mut parsed: Vec<HeaderName> = names
        .iter()
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .filter(|name| !is_never_forwarded(name.as_str()))
        .collect();
    parsed.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    parsed.dedup();
    parsed
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(policy: &BridgePolicy, path: &str) -> Result<(), BridgeError> {
        policy.check(&Method::GET, path)
    }

    #[test]
    fn the_default_profile_is_the_agent_api() {
        let policy = BridgePolicy::agent_default();
        policy.validate().unwrap();
        assert_eq!(policy.name, "default");
        assert!(get(&policy, "/api/agent/run").is_ok());
        assert!(policy.check(&Method::POST, "/api/agent/events").is_ok());
        // Method and path must both match.
        assert!(matches!(
            policy.check(&Method::POST, "/api/agent/run"),
            Err(BridgeError::RouteNotAllowed { .. })
        ));
        assert!(matches!(
            get(&policy, "/api/agent/events"),
            Err(BridgeError::RouteNotAllowed { .. })
        ));
        assert!(matches!(
            get(&policy, "/api/agent/run/extra"),
            Err(BridgeError::RouteNotAllowed { .. })
        ));
        assert!(matches!(
            get(&policy, "/api/agent"),
            Err(BridgeError::RouteNotAllowed { .. })
        ));
        assert!(matches!(
            get(&policy, "/"),
            Err(BridgeError::RouteNotAllowed { .. })
        ));
        assert_eq!(policy.env.url, "BERTH_API_URL");
        assert_eq!(policy.env.token, "BERTH_API_TOKEN");
        assert_eq!(policy.env.run_id.as_deref(), Some("BERTH_RUN_ID"));
        assert_eq!(policy.max_request_bytes, 1024 * 1024);
        assert_eq!(policy.max_response_bytes, 8 * 1024 * 1024);
        assert_eq!(policy.max_in_flight, 32);
        assert_eq!(policy.upstream_timeout_ms, 30_000);
    }

    #[test]
    fn the_paperclip_profile_permits_the_heartbeat_surface_and_nothing_else() {
        let policy = BridgePolicy::profile("paperclip").unwrap();
        policy.validate().unwrap();
        assert_eq!(policy.env.url, "PAPERCLIP_API_URL");
        assert_eq!(policy.env.token, "PAPERCLIP_API_KEY");
        assert_eq!(policy.env.run_id, None);
        assert_eq!(policy.routes.len(), 56);
        for (method, path) in [
            ("GET", "/api/agents/me"),
            ("GET", "/api/agents/me/inbox-lite"),
            ("GET", "/api/agents/a1b2/skills"),
            ("POST", "/api/agents/a1b2/skills/sync"),
            ("GET", "/api/companies/c1/dashboard"),
            ("GET", "/api/companies/c1/skills"),
            ("GET", "/api/issues/i1/comments"),
            ("GET", "/api/issues/i1/comments/c9"),
            ("GET", "/api/issues/i1/documents/plan/revisions"),
            ("PUT", "/api/issues/i1/documents/plan"),
            ("PATCH", "/api/issues/i1"),
            ("POST", "/api/issues/i1/interactions/x/respond"),
            (
                "POST",
                "/api/execution-workspaces/w/runtime-services/restart",
            ),
            ("DELETE", "/api/routine-triggers/t"),
        ] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert!(policy.check(&method, path).is_ok(), "{method} {path}");
        }
        for (method, path) in [
            ("DELETE", "/api/issues/i1"),
            ("GET", "/api/companies/c1/secrets"),
            ("POST", "/api/issues/i1/interactions/x/withdraw"),
            ("GET", "/api/admin"),
            ("PUT", "/api/issues/i1/documents"),
            ("GET", "/api/issues/i1/comments/c9/extra"),
        ] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert!(
                matches!(
                    policy.check(&method, path),
                    Err(BridgeError::RouteNotAllowed { .. })
                ),
                "{method} {path}"
            );
        }
        assert!(BridgePolicy::profile("default").is_some());
        assert!(BridgePolicy::profile("other").is_none());
    }

    #[test]
    fn parameters_match_exactly_one_non_empty_segment() {
        let policy = BridgePolicy::from_json(
            r#"{"name":"t","routes":[{"method":"GET","path":"/api/issues/:id/comments"}]}"#,
        )
        .unwrap();
        assert!(get(&policy, "/api/issues/42/comments").is_ok());
        assert!(get(&policy, "/api/issues/a-b_c~d/comments").is_ok());
        for path in [
            "/api/issues/comments",
            "/api/issues/1/2/comments",
            "/api/issues/42/comments/x",
            "/api/issues/42",
        ] {
            assert!(
                matches!(get(&policy, path), Err(BridgeError::RouteNotAllowed { .. })),
                "{path}"
            );
        }
        // An empty segment where the parameter would be is refused before matching.
        assert!(matches!(
            get(&policy, "/api/issues//comments"),
            Err(BridgeError::PathRejected { .. })
        ));
    }

    #[test]
    fn every_path_trick_is_rejected_before_matching() {
        let policy = BridgePolicy::agent_default();
        for path in [
            "/api/agent/../admin",
            "/api/agent/./run",
            "/api/agent/..",
            "/..",
            "//api/agent/run",
            "/api//agent/run",
            "/api/agent/run/",
            "/api/agent%2frun",
            "/api/agent%2Frun",
            "/api/agent/%2e%2e/x",
            "/api/agent/%2E%2E/x",
            "/api/agent/run%00",
            "/api/agent%5crun",
            "/api/agent/%41",
            "/api/ågent",
            "/api/agent\\run",
            "/api\\agent/run",
            "/api/agent/run\0",
            "/api/agent/run\n",
            "/api/agent/run\t",
            "/api/agent/run\x7f",
            "/api/agent/run run",
            "/api/agent/run?x=1",
            "/api/agent/run#frag",
            "/api/<agent>/run",
            "api/agent/run",
            "",
            "*",
            "http://evil/api/agent/run",
        ] {
            let err = get(&policy, path).unwrap_err();
            assert!(
                matches!(err, BridgeError::PathRejected { .. }),
                "{path:?}: {err:?}"
            );
            assert_eq!(err.code(), "path_rejected");
            assert_eq!(err.status().as_u16(), 400);
            assert!(normalize_path(path).is_err(), "{path:?}");
        }
        assert_eq!(normalize_path("/api/agent/run").unwrap(), "/api/agent/run");
        assert_eq!(normalize_path("/").unwrap(), "/");
        assert_eq!(
            normalize_path("/a/.b/..c/b..").unwrap(),
            "/a/.b/..c/b..",
            "dots inside a segment are fine"
        );
    }

    #[test]
    fn policies_parse_with_defaults_and_refuse_unknown_fields() {
        let policy = BridgePolicy::from_json(
            r#"{"name":"custom","routes":[{"method":"GET","path":"/x/:id"}],
                "maxInFlight":4,"upstreamTimeoutMs":250,
                "env":{"url":"MY_URL","token":"MY_TOKEN","runId":null}}"#,
        )
        .unwrap();
        assert_eq!(policy.max_in_flight, 4);
        assert_eq!(policy.upstream_timeout_ms, 250);
        assert_eq!(policy.max_request_bytes, 1024 * 1024);
        assert_eq!(policy.request_headers, default_request_headers());
        assert_eq!(policy.response_headers, default_response_headers());
        assert_eq!(policy.env.run_id, None);

        let defaults = BridgePolicy::from_json(r#"{"name":"d","routes":[]}"#).unwrap();
        assert_eq!(defaults.env.url, "BERTH_API_URL");

        for text in [
            r#"{"name":"x","routes":[],"extra":1}"#,
            r#"{"name":"x","routes":[{"method":"GET","path":"/a","extra":1}]}"#,
            r#"{"name":"x","routes":[],"env":{"url":"A","token":"B","extra":"C"}}"#,
            r#"{"name":"x","route":[]}"#,
            r#"{"routes":[]}"#,
            r#"not json"#,
        ] {
            let err = BridgePolicy::from_json(text).unwrap_err();
            assert!(
                matches!(err, BridgeError::InvalidPolicy { .. }),
                "{text}: {err:?}"
            );
            assert_eq!(err.code(), "invalid_policy");
        }
    }

    #[test]
    fn validation_refuses_bad_patterns_methods_headers_names_and_limits() {
        let with = |field: &str| {
            format!(r#"{{"name":"x","routes":[{{"method":"GET","path":"/a"}}],{field}}}"#)
        };
        let route = |method: &str, path: &str| {
            format!(r#"{{"name":"x","routes":[{{"method":"{method}","path":"{path}"}}]}}"#)
        };
        for text in [
            route("get", "/a"),
            route("G ET", "/a"),
            route("", "/a"),
            route("GET", "a"),
            route("GET", ""),
            route("GET", "/a//b"),
            route("GET", "/a/"),
            route("GET", "/a/../b"),
            route("GET", "/a/./b"),
            route("GET", "/a/%2e"),
            route("GET", "/a/:"),
            route("GET", "/a/:b-c"),
            route("GET", "/a/b\\\\c"),
            r#"{"name":" ","routes":[]}"#.to_owned(),
            with(r#""requestHeaders":["authorization"]"#),
            with(r#""requestHeaders":["Cookie"]"#),
            with(r#""requestHeaders":["cookie"]"#),
            with(r#""requestHeaders":["host"]"#),
            with(r#""requestHeaders":["x-forwarded-for"]"#),
            with(r#""requestHeaders":["x-berth-signature"]"#),
            with(r#""requestHeaders":["transfer-encoding"]"#),
            with(r#""requestHeaders":["bad header"]"#),
            with(r#""responseHeaders":["content-length"]"#),
            with(r#""responseHeaders":["connection"]"#),
            with(r#""maxRequestBytes":0"#),
            with(r#""maxResponseBytes":0"#),
            with(r#""maxInFlight":0"#),
            with(r#""upstreamTimeoutMs":0"#),
            with(r#""env":{"url":"1URL","token":"T"}"#),
            with(r#""env":{"url":"U","token":"T-K"}"#),
            with(r#""env":{"url":"U","token":"T","runId":""}"#),
        ] {
            let err = BridgePolicy::from_json(&text).unwrap_err();
            assert!(
                matches!(err, BridgeError::InvalidPolicy { .. }),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn header_lists_drop_unforwardable_names_even_without_validation() {
        let mut policy = BridgePolicy::agent_default();
        policy.request_headers = vec![
            "accept".into(),
            "authorization".into(),
            "x-berth-run-id".into(),
            "accept".into(),
            "not a header".into(),
        ];
        let names = policy.request_header_names();
        assert_eq!(names, vec![HeaderName::from_static("accept")]);
    }
}
