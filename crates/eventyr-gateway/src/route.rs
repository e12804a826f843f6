//! The route table: which route a request takes, its path on the way upstream, and
//! which cluster of a weighted split serves it. Pure; built once per configuration.
//!
//! Order: higher `priority` first; then the more specific route (an exact path, then a
//! template, then the longest prefix; then a route that names a host; then the one
//! with more conditions on methods and headers); then the one declared first. So a
//! `x-canary: true` route on the same prefix as the default one wins without a
//! priority, as Kong orders its routes (Envoy takes the first that matches, which
//! makes every configuration an ordering puzzle).

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::CacheConfig;
use crate::config::{
    AggregateCall, CorsConfig, GatewayConfig, PathConfig, RetryConfig, RewriteConfig,
};

/// A path pattern, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
    Template(Vec<Segment>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{name}`: one segment.
    Param(String),
    /// `{*name}`: the rest of the path (last only).
    Rest(String),
}

impl PathPattern {
    /// Errors: a path not starting with '/', a bad or repeated parameter name, `{*name}`
    /// not last.
    pub fn parse(config: &PathConfig) -> Result<Self, String> {
        let text = match config {
            PathConfig::Exact(p) | PathConfig::Prefix(p) | PathConfig::Template(p) => p,
        };
        if !text.starts_with('/') || text.contains(['?', '#']) {
            return Err("a path starts with '/' and has no query or fragment".to_owned());
        }
        Ok(match config {
            PathConfig::Exact(p) => Self::Exact(p.clone()),
            PathConfig::Prefix(p) => Self::Prefix(p.trim_end_matches('/').to_owned()),
            PathConfig::Template(p) => {
                let mut segments = Vec::new();
                let parts: Vec<&str> = p[1..].split('/').collect();
                for (i, part) in parts.iter().enumerate() {
                    let segment = match part.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => match name.strip_prefix('*') {
                            Some(rest) if i + 1 == parts.len() => Segment::Rest(rest.to_owned()),
                            Some(_) => return Err("{*name} only as the last segment".to_owned()),
                            None => Segment::Param(name.to_owned()),
                        },
                        None if part.contains(['{', '}']) => {
                            return Err(format!("a parameter is a whole segment: {part}"));
                        }
                        None => Segment::Literal((*part).to_owned()),
                    };
                    if let Segment::Param(name) | Segment::Rest(name) = &segment {
                        let valid = !name.is_empty()
                            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                        if !valid {
                            return Err(format!("parameter names are a-z, 0-9, '_': {{{name}}}"));
                        }
                    }
                    segments.push(segment);
                }
                let pattern = Self::Template(segments);
                let names = pattern.parameters();
                let mut unique = names.clone();
                unique.sort();
                unique.dedup();
                if unique.len() != names.len() {
                    return Err("a parameter appears twice".to_owned());
                }
                pattern
            }
        })
    }

    /// The parameter names of a template.
    pub fn parameters(&self) -> Vec<String> {
        match self {
            Self::Template(segments) => segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Param(n) | Segment::Rest(n) => Some(n.clone()),
                    Segment::Literal(_) => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The parameters if `path` matches.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        match self {
            Self::Exact(p) => (p == path).then(Vec::new),
            Self::Prefix(p) => {
                let at_boundary = path
                    .strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
                at_boundary.then(Vec::new)
            }
            Self::Template(segments) => {
                let mut parts = path.strip_prefix('/')?.split('/');
                let mut params = Vec::new();
                for segment in segments {
                    match segment {
                        Segment::Literal(text) => (parts.next()? == text).then_some(())?,
                        Segment::Param(name) => {
                            let value = parts.next().filter(|v| !v.is_empty())?;
                            params.push((name.clone(), value.to_owned()));
                        }
                        Segment::Rest(name) => {
                            let rest: Vec<&str> = parts.by_ref().collect();
                            params.push((name.clone(), rest.join("/")));
                        }
                    }
                }
                parts.next().is_none().then_some(params)
            }
        }
    }

    /// (kind, literal length): exact 3, template 2, prefix 1.
    fn specificity(&self) -> (u8, usize) {
        match self {
            Self::Exact(p) => (3, p.len()),
            Self::Template(segments) => (
                2,
                segments
                    .iter()
                    .map(|s| match s {
                        Segment::Literal(l) => l.len() + 1,
                        _ => 0,
                    })
                    .sum(),
            ),
            Self::Prefix(p) => (1, p.len()),
        }
    }
}

/// The `{name}` and `{*name}` names of a replacement template.
pub fn template_names(template: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        names.push(
            rest[open + 1..open + close]
                .trim_start_matches('*')
                .to_owned(),
        );
        rest = &rest[open + close + 1..];
    }
    names
}

/// What a route needs to know of a request.
pub struct RequestHead<'a> {
    /// The `Host` header (or the URI's authority), port included or not.
    pub host: Option<&'a str>,
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// A header's value by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
}

/// How long an upstream may take to answer unless its route says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A route, compiled.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub timeout: Duration,
    pub retries: RetryConfig,
    pub cors: Option<Arc<CorsConfig>>,
    pub permissions: Arc<[String]>,
    pub cache: Option<Arc<CacheConfig>>,
    pub aggregate: Arc<[AggregateCall]>,
    pub builtin: Option<crate::config::Builtin>,
    /// `allowed_hosts`, lower case; empty: any.
    pub allowed_hosts: Arc<[String]>,
    priority: i32,
    host: Option<String>,
    path: PathPattern,
    methods: Vec<String>,
    headers: Vec<(String, String)>,
    rewrite: Option<RewriteConfig>,
    /// (cluster, weight); one entry when the route has one cluster.
    clusters: Vec<(Arc<str>, u32)>,
}

/// A request's route, its parameters, and the path to send upstream.
#[derive(Debug, Clone)]
pub struct Matched<'a> {
    pub route: &'a Arc<Route>,
    pub params: Vec<(String, String)>,
    pub upstream_path: String,
}

impl Route {
    /// The cluster for a draw `random` in [0, 1): each by its share of the weights.
    pub fn cluster(&self, random: f64) -> &Arc<str> {
        static NONE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        let total: u64 = self.clusters.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut ticket = (random.clamp(0.0, 1.0) * total as f64) as u64;
        for (cluster, weight) in &self.clusters {
            if ticket < u64::from(*weight) {
                return cluster;
            }
            ticket -= u64::from(*weight);
        }
        self.clusters
            .iter()
            .rev()
            .find(|(_, w)| *w > 0)
            .map_or_else(|| NONE.get_or_init(|| Arc::from("")), |(c, _)| c)
    }
}

/// The routes in the order they are tried.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// The table of a checked configuration (`GatewayConfig::check`); a route whose
    /// path does not parse is left out.
    pub fn new(config: &GatewayConfig) -> Self {
        let mut routes: Vec<(usize, Route)> = config
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let path = PathPattern::parse(&r.path).ok()?;
                let clusters = match &r.cluster {
                    Some(cluster) => vec![(Arc::from(cluster.as_str()), 1)],
                    None => r
                        .split
                        .iter()
                        .map(|s| (Arc::from(s.cluster.as_str()), s.weight))
                        .collect(),
                };
                Some((
                    i,
                    Route {
                        name: Arc::from(r.name.as_str()),
                        timeout: r.timeout.unwrap_or(DEFAULT_TIMEOUT),
                        retries: r.retries.clone(),
                        cors: r.cors.clone().map(Arc::new),
                        permissions: Arc::from(r.permissions.clone()),
                        cache: r.cache.clone().map(Arc::new),
                        aggregate: Arc::from(r.aggregate.clone()),
                        builtin: r.builtin,
                        allowed_hosts: r
                            .allowed_hosts
                            .iter()
                            .map(|h| h.to_ascii_lowercase())
                            .collect(),
                        priority: r.priority,
                        host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                        path,
                        methods: r.methods.clone(),
                        headers: r
                            .headers
                            .iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect(),
                        rewrite: r.rewrite.clone(),
                        clusters,
                    },
                ))
            })
            .collect();
        routes.sort_by_key(|(i, r)| {
            let (kind, length) = r.path.specificity();
            let conditions = r.headers.len() + usize::from(!r.methods.is_empty());
            (
                Reverse(r.priority),
                Reverse(kind),
                Reverse(length),
                Reverse(r.host.is_some()),
                Reverse(conditions),
                *i,
            )
        });
        Self {
            routes: routes.into_iter().map(|(_, r)| Arc::new(r)).collect(),
        }
    }

    /// The routes in the order they are tried.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route names in the order they are tried.
    pub fn order(&self) -> Vec<&str> {
        self.routes.iter().map(|r| &*r.name).collect()
    }

    /// The first route that matches `request`.
    pub fn find<'t>(&'t self, request: &RequestHead<'_>) -> Option<Matched<'t>> {
        self.routes.iter().find_map(|route| {
            if let Some(host) = &route.host
                && !host_matches(host, request.host?)
            {
                return None;
            }
            if !route.methods.is_empty() && !route.methods.iter().any(|m| m == request.method) {
                return None;
            }
            let headers_hold = route.headers.iter().all(|(name, want)| {
                (request.header)(name).is_some_and(|got| want == "*" || got == want)
            });
            if !headers_hold {
                return None;
            }
            let params = route.path.matches(request.path)?;
            let upstream_path = rewrite(route.rewrite.as_ref(), request.path, &params);
            Some(Matched {
                route,
                params,
                upstream_path,
            })
        })
    }
}

/// `pattern` (lower case; `*.example.com` for its subdomains) against a Host header.
impl Route {
    /// Whether the route answers for `host` (a `Host` header, port and all).
    pub fn allows_host(&self, host: Option<&str>) -> bool {
        if self.allowed_hosts.is_empty() {
            return true;
        }
        host.is_some_and(|host| self.allowed_hosts.iter().any(|a| host_matches(a, host)))
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => host == pattern,
    }
}

fn rewrite(rewrite: Option<&RewriteConfig>, path: &str, params: &[(String, String)]) -> String {
    match rewrite {
        None => path.to_owned(),
        Some(RewriteConfig::StripPrefix(prefix)) => {
            let prefix = prefix.trim_end_matches('/');
            match path.strip_prefix(prefix) {
                Some("") => "/".to_owned(),
                Some(rest) if rest.starts_with('/') => rest.to_owned(),
                _ => path.to_owned(),
            }
        }
        Some(RewriteConfig::Replace(template)) => fill(template, params),
    }
}

/// A template (`/orders/{id}/{*rest}`) with the route's parameters filled in.
pub fn fill(template: &str, params: &[(String, String)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in params {
        out = out
            .replace(&format!("{{{name}}}"), value)
            .replace(&format!("{{*{name}}}"), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &str) -> RouteTable {
        let text = format!(
            "[[clusters]]\nname = \"a\"\nendpoints = [{{ url = \"http://127.0.0.1:1\" }}]\n\
             [[clusters]]\nname = \"b\"\nendpoints = [{{ url = \"http://127.0.0.1:2\" }}]\n{routes}"
        );
        RouteTable::new(&GatewayConfig::parse(&text).expect("valid"))
    }

    fn find<'t>(
        table: &'t RouteTable,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<Matched<'t>> {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let host = lookup("host");
        table.find(&RequestHead {
            host,
            method,
            path,
            header: &lookup,
        })
    }

    #[test]
    fn paths_match_exactly_by_prefix_at_a_segment_or_by_template() {
        let t = table(
            r#"
            [[routes]]
            name = "exact"
            path = { exact = "/health" }
            cluster = "a"
            [[routes]]
            name = "prefix"
            path = { prefix = "/api/" }
            cluster = "a"
            [[routes]]
            name = "order"
            path = { template = "/api/orders/{id}" }
            cluster = "b"
            [[routes]]
            name = "files"
            path = { template = "/files/{*rest}" }
            cluster = "b"
            "#,
        );
        assert_eq!(t.order(), ["exact", "order", "files", "prefix"]);
        assert_eq!(
            find(&t, "GET", "/health", &[])
                .expect("exact")
                .route
                .name
                .as_ref(),
            "exact"
        );
        assert!(find(&t, "GET", "/health/x", &[]).is_none());
        let order = find(&t, "GET", "/api/orders/42", &[]).expect("template");
        assert_eq!(order.route.name.as_ref(), "order");
        assert_eq!(order.params, [("id".to_owned(), "42".to_owned())]);
        assert_eq!(
            find(&t, "GET", "/api/orders/42/lines", &[])
                .expect("prefix")
                .route
                .name
                .as_ref(),
            "prefix"
        );
        assert_eq!(
            find(&t, "GET", "/api", &[])
                .expect("prefix")
                .route
                .name
                .as_ref(),
            "prefix"
        );
        assert!(
            find(&t, "GET", "/apix", &[]).is_none(),
            "a prefix ends at a segment"
        );
        let files = find(&t, "GET", "/files/a/b.txt", &[]).expect("rest");
        assert_eq!(files.params, [("rest".to_owned(), "a/b.txt".to_owned())]);
    }

    #[test]
    fn hosts_methods_and_headers_narrow_a_route_and_the_narrower_wins() {
        let t = table(
            r#"
            [[routes]]
            name = "default"
            path = { prefix = "/api/orders" }
            cluster = "a"
            [[routes]]
            name = "canary"
            path = { prefix = "/api/orders" }
            headers = { x-canary = "true" }
            cluster = "b"
            [[routes]]
            name = "admin-host"
            host = "*.example.com"
            path = { prefix = "/api/orders" }
            methods = ["DELETE"]
            cluster = "b"
            [[routes]]
            name = "pinned"
            priority = 10
            path = { prefix = "/api" }
            headers = { x-pin = "*" }
            cluster = "a"
            "#,
        );
        assert_eq!(t.order(), ["pinned", "admin-host", "canary", "default"]);
        let route = |method: &str, headers: &[(&str, &str)]| {
            find(&t, method, "/api/orders/1", headers).map(|m| m.route.name.to_string())
        };
        assert_eq!(route("GET", &[]).as_deref(), Some("default"));
        assert_eq!(
            route("GET", &[("x-canary", "true")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            route("GET", &[("x-canary", "false")]).as_deref(),
            Some("default")
        );
        assert_eq!(
            route("DELETE", &[("host", "Shop.Example.com:8080")]).as_deref(),
            Some("admin-host")
        );
        assert_eq!(
            route("DELETE", &[("host", "example.com")]).as_deref(),
            Some("default")
        );
        assert_eq!(
            route("GET", &[("host", "shop.example.com")]).as_deref(),
            Some("default")
        );
        assert_eq!(
            route("GET", &[("x-pin", "anything")]).as_deref(),
            Some("pinned")
        );
    }

    #[test]
    fn paths_are_rewritten_and_splits_follow_their_weights() {
        let t = table(
            r#"
            [[routes]]
            name = "strip"
            path = { prefix = "/api/inventory" }
            rewrite = { strip_prefix = "/api" }
            cluster = "a"
            [[routes]]
            name = "replace"
            path = { template = "/api/orders/{id}/items/{*rest}" }
            rewrite = { replace = "/v2/orders/{id}/{rest}" }
            split = [{ cluster = "a", weight = 90 }, { cluster = "b", weight = 10 }]
            "#,
        );
        let strip = find(&t, "GET", "/api/inventory/SKU-1", &[]).expect("strip");
        assert_eq!(strip.upstream_path, "/inventory/SKU-1");
        assert_eq!(strip.route.cluster(0.99).as_ref(), "a");
        let replace = find(&t, "GET", "/api/orders/7/items/3/x", &[]).expect("replace");
        assert_eq!(replace.upstream_path, "/v2/orders/7/3/x");
        let draws = 10_000;
        let to_b = (0..draws)
            .filter(|i| {
                replace
                    .route
                    .cluster(f64::from(*i) / f64::from(draws))
                    .as_ref()
                    == "b"
            })
            .count();
        assert_eq!(to_b, 1_000, "10 % to the canary");
    }

    #[test]
    fn templates_refuse_what_they_cannot_mean() {
        for bad in ["/a/{*rest}/b", "/a/x{id}", "/a/{id}/{id}", "/a/{}", "a/b"] {
            assert!(
                PathPattern::parse(&PathConfig::Template(bad.to_owned())).is_err(),
                "{bad}"
            );
        }
        let pattern = PathPattern::parse(&PathConfig::Template("/a/{id}".to_owned())).expect("ok");
        assert_eq!(pattern.matches("/a/"), None, "a parameter is never empty");
        assert_eq!(pattern.matches("/a/1/"), None);
    }
}
