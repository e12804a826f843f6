//! The gateway in front of `eventyr up`: the public API of PLAN.md on `--listen`,
//! through `eventyr-gateway` with sessions for the demo users (`alice`, `bob`:
//! customers; `admin`: every permission), role-based permissions per route, a login
//! rate limit per client address, a per-caller limit, and the order-details
//! aggregation. Behind it, the services' own API on a loopback port.
//!
//! Sessions live in `<data-dir>/gateway/sessions.db`; the token keys are made at the
//! first start and kept in `<data-dir>/gateway/secrets.json` (owner-only), so a
//! restart keeps everyone logged in.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eventyr_gateway::config::GatewayConfig;
use eventyr_gateway::gateway::Gateway;
use eventyr_gateway::session::{hash_password, random_secret};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The demo users: (name = password, role).
pub const DEMO_USERS: [(&str, &str); 3] = [
    ("alice", "customer"),
    ("bob", "customer"),
    ("admin", "admin"),
];

/// How long a stop waits for the requests under way.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct Secrets {
    access_secret: String,
    refresh_secret: String,
}

/// The token keys of this data directory, made at its first start.
fn secrets(dir: &Path) -> anyhow::Result<Secrets> {
    let file = dir.join("secrets.json");
    if let Ok(text) = std::fs::read_to_string(&file) {
        return serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged; remove it to make new keys", file.display()));
    }
    let secrets = Secrets {
        access_secret: random_secret(),
        refresh_secret: random_secret(),
    };
    let text = serde_json::to_string_pretty(&secrets)?;
    let temporary = dir.join("secrets.json.new");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        out.write_all(text.as_bytes())?;
        out.sync_all()?;
    }
    std::fs::rename(&temporary, &file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(secrets)
}

/// The gateway's configuration in front of the services' API at `internal`, with
/// its admin API at `admin`.
pub fn config(dir: &Path, front: &Front<'_>, admin: SocketAddr) -> anyhow::Result<GatewayConfig> {
    let (internal, credential) = (front.internal, front.credential);
    // The browser-facing routes answer only for the names this gateway is reached
    // by (no DNS rebinding): the local ones, its own address, the configured ones.
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
        .map(str::to_owned)
        .to_vec();
    let ip = front.listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    names.extend(front.allowed_hosts.iter().cloned());
    let hosts = serde_json::to_string(&names)?;
    let secrets = secrets(dir)?;
    let mut users = String::new();
    let demo: &[(&str, &str)] = if front.demo_users && front.users.is_empty() {
        &DEMO_USERS
    } else {
        &[]
    };
    for &(name, role) in demo {
        let hash = hash_password(name).map_err(anyhow::Error::msg)?;
        // A customer owns the customer id of their name (PLAN.md's demo data).
        let customer = if role == "customer" {
            format!(", customer_id = \"{name}\"")
        } else {
            String::new()
        };
        users.push_str(&format!(
            "  {{ name = \"{name}\", password_hash = \"{hash}\", roles = [\"{role}\"]{customer} }},\n"
        ));
    }
    let sessions = dir.join("sessions.db");
    let text = format!(
        r#"
internal_credential = "{credential}"

[auth]
issuer = "eventyr"
audience = "eventyr-api"
roles = {{ customer = [{CUSTOMER}], admin = ["*"] }}

[sessions]
store = {{ sqlite = "{sessions}" }}
access_secret = "{access}"
refresh_secret = "{refresh}"
users = [
{users}]

[[clusters]]
name = "services"
endpoints = [{{ url = "http://{internal}" }}]
max_concurrent = 4096

[[clusters]]
name = "gateway-admin"
endpoints = [{{ url = "http://{admin}" }}]

{routes}
"#,
        sessions = sessions.display(),
        access = secrets.access_secret,
        refresh = secrets.refresh_secret,
        credential = credential.expose(),
        routes = ROUTES.replace("HOSTS", &hosts),
    );
    let mut config =
        GatewayConfig::parse(&text).context("the gateway configuration of eventyr up")?;
    if let Some(sessions) = config.sessions.as_mut() {
        sessions.users.extend(front.users.iter().cloned());
    }
    config
        .check()
        .map_err(|e| anyhow::anyhow!("[[users]] in eventyr.toml: {e}"))?;
    Ok(config)
}

/// What a customer may do.
const CUSTOMER: &str = r#""orders:read", "orders:write", "inventory:read", "points:read", "payments:read", "shipments:read", "notifications:read""#;

/// The public API of PLAN.md, route by route, with the permission each needs.
const ROUTES: &str = r#"
[[routes]]
name = "login"
path = { exact = "/auth/login" }
methods = ["POST"]
builtin = "login"

[[routes]]
name = "refresh"
path = { exact = "/auth/refresh" }
methods = ["POST"]
builtin = "refresh"

[[routes]]
name = "logout"
path = { exact = "/auth/logout" }
methods = ["POST"]
builtin = "logout"

[[routes]]
name = "order-details"
path = { template = "/api/orders/{id}/details" }
methods = ["GET"]
permissions = ["orders:read", "payments:read", "shipments:read"]
aggregate = [
  { name = "order", cluster = "services", path = "/api/orders/{id}", timeout = "2s", required = true },
  { name = "payments", cluster = "services", path = "/api/payments?order_id={id}", timeout = "2s" },
  { name = "shipments", cluster = "services", path = "/api/shipments?order_id={id}", timeout = "2s" },
]

[[routes]]
name = "orders-write"
path = { prefix = "/api/orders" }
methods = ["POST"]
permissions = ["orders:write"]
cluster = "services"
timeout = "10s"

[[routes]]
name = "orders-read"
path = { prefix = "/api/orders" }
methods = ["GET"]
permissions = ["orders:read"]
cluster = "services"

[[routes]]
name = "inventory-read"
path = { prefix = "/api/inventory" }
methods = ["GET"]
permissions = ["inventory:read"]
cluster = "services"

[[routes]]
name = "inventory-write"
path = { prefix = "/api/inventory" }
methods = ["PUT"]
permissions = ["inventory:write"]
cluster = "services"

[[routes]]
name = "points"
path = { prefix = "/api/customers" }
methods = ["GET"]
permissions = ["points:read"]
cluster = "services"

[[routes]]
name = "payments"
path = { prefix = "/api/payments" }
methods = ["GET"]
permissions = ["payments:read"]
cluster = "services"

[[routes]]
name = "shipments"
path = { prefix = "/api/shipments" }
methods = ["GET"]
permissions = ["shipments:read"]
cluster = "services"

[[routes]]
name = "notifications"
path = { prefix = "/api/notifications" }
methods = ["GET"]
permissions = ["notifications:read"]
cluster = "services"

[[routes]]
name = "gateway-routes"
allowed_hosts = HOSTS
path = { exact = "/admin/routes" }
methods = ["GET"]
permissions = ["admin:gateway"]
cluster = "gateway-admin"

[[routes]]
name = "gateway-clusters"
allowed_hosts = HOSTS
path = { exact = "/admin/clusters" }
methods = ["GET"]
permissions = ["admin:gateway"]
cluster = "gateway-admin"

[[routes]]
name = "gateway-ratelimits"
allowed_hosts = HOSTS
path = { exact = "/admin/ratelimits" }
methods = ["GET"]
permissions = ["admin:gateway"]
cluster = "gateway-admin"

[[routes]]
name = "admin"
allowed_hosts = HOSTS
path = { prefix = "/admin" }
permissions = ["admin:all"]
cluster = "services"

[[routes]]
name = "dashboard"
allowed_hosts = HOSTS
path = { prefix = "/dashboard" }
methods = ["GET"]
cluster = "services"

[[routes]]
name = "probes"
path = { prefix = "/health" }
methods = ["GET"]
cluster = "services"

[[routes]]
name = "metrics"
path = { exact = "/metrics" }
methods = ["GET"]
cluster = "services"

[[rate_limits]]
name = "login-per-address"
routes = ["login"]
algorithm = "gcra"
limit = 60
period = "1m"
burst = 20
key = "client_ip"

[[rate_limits]]
name = "per-caller"
routes = ["*"]
algorithm = "gcra"
limit = 5000
period = "1s"
burst = 10000
key = "consumer"
"#;

/// Where the gateway listens and what it fronts.
pub struct Front<'a> {
    pub listen: SocketAddr,
    /// The services' API.
    pub internal: SocketAddr,
    /// What the gateway presents to it.
    pub credential: &'a eventyr_http::Credential,
    /// Whether the demo users may log in.
    pub demo_users: bool,
    /// More names the dashboard and the admin API answer for (`--allowed-host`).
    pub allowed_hosts: &'a [String],
    /// The configured users (`[[users]]`), in place of the demo users.
    pub users: &'a [eventyr_gateway::session::UserConfig],
}

/// Serves the gateway on `front.listen` in front of the services' API until `stop`
/// rings; its address, and the gateway (for the dashboard).
pub async fn serve(
    data_dir: &Path,
    front: Front<'_>,
    stop: watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<(SocketAddr, Arc<Gateway>)> {
    let listen = front.listen;
    let dir = data_dir.join("gateway");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let admin_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot listen on 127.0.0.1")?;
    let config = config(&dir, &front, admin_listener.local_addr()?)?;
    let gateway = Gateway::new(&config, None).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let until = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let admin = eventyr_gateway::admin::router(Arc::clone(&gateway));
    tasks.push(tokio::spawn(eventyr_gateway::server::serve(
        "gateway-admin",
        admin_listener,
        eventyr_gateway::server::ServerLimits::default(),
        eventyr_gateway::server::with_client(admin),
        until(stop.clone()),
        GRACE,
        None,
    )));
    tasks.push(tokio::spawn(eventyr_gateway::proxy::serve_gateway(
        listener,
        Arc::clone(&gateway),
        until(stop),
        GRACE,
    )));
    Ok((address, gateway))
}
