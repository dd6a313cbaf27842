//! Configuration: typed, layered, validated once, every error reported together.
//!
//! Layers, later wins: `config/default.toml` (built in; it documents every key) → an optional
//! file → environment variables `SWITCHBOARD__SECTION__KEY`. [`Config::load`] returns the typed
//! config or the full list of problems (unknown keys included, so a typo is never ignored).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde_json::Value;
use switchboard_actors::Settings;
use switchboard_actors::deps::SendRate;

use crate::store::Dialect;

/// The documented defaults, built into the binary.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// One configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `section.key`.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

/// Every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Which transport numbers connect through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportConfig {
    /// The simulator at this base URL.
    Sim {
        /// `http://host:port` of `switchboard sim serve`.
        url: String,
    },
    /// Real WhatsApp, through whatsapp-rust.
    WhatsApp(crate::whatsapp::WhatsAppOptions),
}

/// Where and how data is stored.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Database URL (secret: may hold a password).
    pub url: SecretString,
    /// SQLite or PostgreSQL, from the URL.
    pub dialect: Dialect,
    /// PostgreSQL pool size.
    pub max_connections: u32,
    /// Rows per group commit.
    pub batch_max: usize,
    /// Longest wait of a group commit.
    pub batch_wait: Duration,
    /// Session keys (`id:hex,…`), empty for the key file.
    pub session_keys: SecretString,
    /// Where the embedded key lives when no keys are given.
    pub session_key_file: String,
    /// Processed messages and sent replies are deleted once older than this.
    pub retention: Duration,
    /// How often the retention job runs.
    pub prune_every: Duration,
}

/// Fault injection for tests and demos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChaosConfig {
    /// A conversation panics on every Nth message (0: never).
    pub panic_every: u64,
    /// A random number actor crashes this often (zero: never).
    pub crash_number_every: Duration,
}

/// The cluster: set when `cluster.redis_url` is.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Redis URL (secret: may hold a password).
    pub redis_url: SecretString,
    /// Prefix of every key this cluster keeps in Redis.
    pub key_prefix: String,
    /// How long a number's lease lasts unrenewed.
    pub lease_ttl: Duration,
    /// This node's weight in placement.
    pub capacity: u32,
    /// Placement: imbalance past which numbers move, and how fast a node hands them off.
    pub placement: switchboard_actors::placement::PlacementConfig,
    /// How long a node may take on shutdown to hand its numbers over; past it, the rest are
    /// stopped and their leases released anyway.
    pub drain_deadline: Duration,
}

/// The typed configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id.
    pub node_id: String,
    /// The store.
    pub store: StoreConfig,
    /// The transport.
    pub transport: TransportConfig,
    /// Where the admin API, `/metrics`, `/livez` and `/readyz` are served.
    pub http_listen: SocketAddr,
    /// The admin API's bootstrap super-admin token (`http.admin_token`, or
    /// `SWITCHBOARD_ADMIN_TOKEN`).
    pub admin_token: Option<SecretString>,
    /// The admin API's edges: rate limit, timeout, CORS.
    pub api: crate::http::Edges,
    /// Tunables of the supervision tree.
    pub runtime: Settings,
    /// Fault injection.
    pub chaos: ChaosConfig,
    /// The cluster, if this node runs in one (else the embedded single node).
    pub cluster: Option<ClusterConfig>,
    /// Admission control of connects (the cluster's bucket applies in a cluster only).
    pub admission: crate::cluster::AdmissionRates,
}

impl Config {
    /// Loads the layers (the optional `file`, then the process environment) and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        let admin = Env::raw()
            .only(&["SWITCHBOARD_ADMIN_TOKEN"])
            .map(|_| "http.admin_token".into());
        Self::load_layers(
            file,
            Env::prefixed("SWITCHBOARD__").split("__"),
            Some(admin),
        )
    }

    /// The defaults alone (`config/default.toml`: no file, no environment), as the demo runs.
    pub fn defaults() -> Result<Self, ConfigErrors> {
        Self::load_from(None, Env::raw().filter(|_| false))
    }

    /// Like [`Config::load`], with the environment layer given (tests).
    pub fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigErrors> {
        Self::load_layers(file, env, None)
    }

    fn load_layers(file: Option<&Path>, env: Env, last: Option<Env>) -> Result<Self, ConfigErrors> {
        let mut figment = Figment::new().merge(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigErrors(vec![ConfigError {
                    key: "--config".into(),
                    problem: format!("{} does not exist", file.display()),
                }]));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(env);
        if let Some(last) = last {
            figment = figment.merge(last);
        }
        let value: Value = figment.extract().map_err(|e| {
            ConfigErrors(
                e.into_iter()
                    .map(|e| ConfigError {
                        key: e.path.join("."),
                        problem: e.kind.to_string(),
                    })
                    .collect(),
            )
        })?;
        let defaults: Value = Figment::new()
            .merge(Toml::string(DEFAULT_TOML))
            .extract()
            .map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    key: "config/default.toml".into(),
                    problem: e.to_string(),
                }])
            })?;
        let mut r = Reader {
            value: &value,
            errors: Vec::new(),
        };
        r.unknown_keys(&defaults);
        let config = read(&mut r);
        if r.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(r.errors))
        }
    }
}

fn read(r: &mut Reader<'_>) -> Config {
    let url = r.string("store.url");
    let dialect = match Dialect::of_url(&url) {
        Some(d) => d,
        None => {
            r.error("store.url", "must start with sqlite:// or postgres://");
            Dialect::Sqlite
        }
    };
    let session_keys = r.string("store.session_keys");
    if dialect == Dialect::Postgres && session_keys.trim().is_empty() {
        r.error(
            "store.session_keys",
            "required with PostgreSQL (set SWITCHBOARD__STORE__SESSION_KEYS to id:64-hex)",
        );
    }
    if !session_keys.trim().is_empty()
        && let Err(e) = crate::store::SessionCipher::parse(&session_keys)
    {
        r.error("store.session_keys", &e.to_string());
    }
    let store = StoreConfig {
        url: SecretString::from(url),
        dialect,
        max_connections: r.int("store.max_connections", 1, 1000) as u32,
        batch_max: r.int("store.batch_max", 1, 10_000) as usize,
        batch_wait: r.duration("store.batch_wait"),
        session_keys: SecretString::from(session_keys),
        session_key_file: r.string("store.session_key_file"),
        retention: r.duration("store.retention"),
        prune_every: r.duration("store.prune_every"),
    };
    let transport = match r.string("transport.kind").as_str() {
        "sim" => TransportConfig::Sim {
            url: r
                .string("transport.sim_url")
                .trim_end_matches('/')
                .to_owned(),
        },
        "whatsapp" => TransportConfig::WhatsApp(whatsapp_options(r)),
        other => {
            r.error(
                "transport.kind",
                &format!("{other:?} is not one of sim, whatsapp"),
            );
            TransportConfig::Sim { url: String::new() }
        }
    };
    let token = r.string("http.admin_token");
    let admin_token = if token.is_empty() {
        None
    } else {
        if token.chars().count() < crate::http::auth::MIN_ADMIN_TOKEN {
            r.error(
                "http.admin_token",
                &format!(
                    "at least {} characters (SWITCHBOARD_ADMIN_TOKEN too)",
                    crate::http::auth::MIN_ADMIN_TOKEN
                ),
            );
        }
        Some(SecretString::from(token))
    };
    let cors_origins: Vec<String> = r
        .string("http.cors_origins")
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect();
    for origin in &cors_origins {
        let ok = (origin.starts_with("https://") || origin.starts_with("http://"))
            && axum::http::HeaderValue::from_str(origin).is_ok();
        if !ok {
            r.error(
                "http.cors_origins",
                &format!("{origin:?} is not an origin like https://console.example.com"),
            );
        }
    }
    let api = crate::http::Edges {
        rate_per_second: r.float("http.rate_per_second", 0.01, 1_000_000.0),
        rate_burst: r.int("http.rate_burst", 1, 1_000_000) as u32,
        request_timeout: r.duration("http.request_timeout"),
        cors_origins,
    };
    let listen = r.string("http.listen");
    let http_listen = listen.parse().unwrap_or_else(|_| {
        r.error(
            "http.listen",
            &format!("{listen:?} is not an address like 0.0.0.0:8080"),
        );
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let node_id = r.string("node.id");
    if node_id.is_empty() || node_id.len() > 64 {
        r.error("node.id", "1 to 64 characters");
    }
    let runtime = Settings {
        client_label: node_id.clone(),
        conversation_idle: r.duration("runtime.conversation_idle"),
        ai_timeout: r.duration("runtime.ai_timeout"),
        send_rate: SendRate {
            burst: r.int("runtime.send_burst", 1, 1000) as u32,
            per_second: r.float("runtime.send_per_second", 0.01, 1000.0),
        },
        typing_per_char: r.duration("runtime.typing_per_char"),
        typing_max: r.duration("runtime.typing_max"),
        unsettled_wait: r.duration("runtime.unsettled_wait"),
        outbound_max_age: r.duration("runtime.outbound_max_age"),
        outbound_max_queued: r.int("runtime.outbound_max_queued", 1, 1_000_000) as usize,
        intake_max_pending: r.int("runtime.intake_max_pending", 1, 1_000_000) as usize,
        groups_enabled: r.bool("runtime.groups_enabled"),
        ..Settings::default()
    };
    let mut cluster = cluster(r, dialect);
    let admission = crate::cluster::AdmissionRates {
        node_per_second: r.float("admission.node_per_second", 0.01, 100_000.0),
        node_burst: r.int("admission.node_burst", 1, 100_000) as u32,
        cluster_per_second: r.float("admission.cluster_per_second", 0.01, 100_000.0),
        cluster_burst: r.int("admission.cluster_burst", 1, 100_000) as u32,
    };
    if let Some(c) = &mut cluster {
        // A drain hands numbers over as fast as the other nodes admit them.
        c.placement.node_admission_per_second = admission.node_per_second;
        c.placement.cluster_admission_per_second = admission.cluster_per_second;
    }
    let chaos = ChaosConfig {
        panic_every: r.int("chaos.panic_every", 0, u64::MAX),
        crash_number_every: r.duration("chaos.crash_number_every"),
    };
    Config {
        node_id,
        store,
        transport,
        http_listen,
        admin_token,
        api,
        runtime,
        chaos,
        cluster,
        admission,
    }
}

/// The `cluster.*` keys: `None` without a Redis URL.
fn cluster(r: &mut Reader<'_>, dialect: Dialect) -> Option<ClusterConfig> {
    let url = r.string("cluster.redis_url");
    let lease_ttl = r.duration("cluster.lease_ttl");
    let capacity = r.int("cluster.capacity", 1, 1_000_000) as u32;
    let key_prefix = r.string("cluster.key_prefix");
    let placement = switchboard_actors::placement::PlacementConfig {
        imbalance: r.float("cluster.rebalance_imbalance", 0.0, 1_000_000.0),
        moves_per_second: r.float("cluster.moves_per_second", 0.01, 10_000.0),
        moves_burst: r.int("cluster.moves_burst", 1, 100_000) as u32,
        ..Default::default()
    };
    let drain_deadline = r.duration("cluster.drain_deadline");
    if url.trim().is_empty() {
        return None;
    }
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        r.error("cluster.redis_url", "expected a redis:// or rediss:// URL");
    }
    if dialect != Dialect::Postgres {
        r.error(
            "cluster.redis_url",
            "a cluster's nodes share one PostgreSQL store (store.url = postgres://…)",
        );
    }
    if lease_ttl < Duration::from_secs(1) {
        r.error("cluster.lease_ttl", "at least 1s");
    }
    if drain_deadline < Duration::from_secs(5) {
        r.error("cluster.drain_deadline", "at least 5s");
    }
    if key_prefix.is_empty() || key_prefix.contains(['{', '}']) {
        r.error("cluster.key_prefix", "non-empty, without braces");
    }
    Some(ClusterConfig {
        redis_url: SecretString::from(url),
        key_prefix,
        lease_ttl,
        capacity,
        placement,
        drain_deadline,
    })
}

/// The `transport.whatsapp_*` keys.
fn whatsapp_options(r: &mut Reader<'_>) -> crate::whatsapp::WhatsAppOptions {
    let url = r.string("transport.whatsapp_url");
    if !(url.starts_with("wss://") || url.starts_with("ws://")) {
        r.error("transport.whatsapp_url", "expected a ws:// or wss:// URL");
    }
    let raw = r.string("transport.whatsapp_version");
    let parts: Vec<Option<u32>> = raw.split('.').map(|p| p.trim().parse().ok()).collect();
    let version = match parts.as_slice() {
        [Some(a), Some(b), Some(c)] => (*a, *b, *c),
        _ => {
            r.error(
                "transport.whatsapp_version",
                &format!("{raw:?} is not a version like \"2.3000.1042742319\""),
            );
            (0, 0, 0)
        }
    };
    crate::whatsapp::WhatsAppOptions {
        url,
        version,
        history_sync: r.bool("transport.history_sync"),
        ack_timeout: r.duration("transport.ack_timeout"),
    }
}

/// Reads keys from the merged value, collecting every problem.
struct Reader<'a> {
    value: &'a Value,
    errors: Vec<ConfigError>,
}

impl Reader<'_> {
    fn error(&mut self, key: &str, problem: &str) {
        self.errors.push(ConfigError {
            key: key.to_owned(),
            problem: problem.to_owned(),
        });
    }

    fn get(&self, key: &str) -> Option<&Value> {
        key.split('.').try_fold(self.value, |v, part| v.get(part))
    }

    /// Reports keys the defaults do not have (typos).
    fn unknown_keys(&mut self, defaults: &Value) {
        let mut unknown = Vec::new();
        if let Some(sections) = self.value.as_object() {
            for (section, keys) in sections {
                let Some(known) = defaults.get(section) else {
                    unknown.push(section.clone());
                    continue;
                };
                for key in keys.as_object().into_iter().flat_map(|k| k.keys()) {
                    if known.get(key).is_none() {
                        unknown.push(format!("{section}.{key}"));
                    }
                }
            }
        }
        for key in unknown {
            self.error(&key, "unknown key (see config/default.toml)");
        }
    }

    fn string(&mut self, key: &str) -> String {
        match self.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            _ => {
                self.error(key, "expected a string");
                String::new()
            }
        }
    }

    fn int(&mut self, key: &str, min: u64, max: u64) -> u64 {
        let v = match self.get(key) {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        match v {
            Some(v) if (min..=max).contains(&v) => v,
            _ => {
                self.error(key, &format!("expected a whole number from {min} to {max}"));
                min
            }
        }
    }

    fn float(&mut self, key: &str, min: f64, max: f64) -> f64 {
        let v = match self.get(key) {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        match v {
            Some(v) if (min..=max).contains(&v) => v,
            _ => {
                self.error(key, &format!("expected a number from {min} to {max}"));
                min
            }
        }
    }

    fn bool(&mut self, key: &str) -> bool {
        match self.get(key) {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            _ => {
                self.error(key, "expected true or false");
                false
            }
        }
    }

    fn duration(&mut self, key: &str) -> Duration {
        let raw = self.string(key);
        humantime::parse_duration(&raw).unwrap_or_else(|_| {
            self.error(
                key,
                &format!("{raw:?} is not a duration like \"250ms\", \"5s\", \"2m\""),
            );
            Duration::ZERO
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment layer that nothing sets.
    fn no_env() -> Env {
        Env::prefixed("SWITCHBOARD_TEST_UNSET__").split("__")
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn environment_overrides_files_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("sb.toml", "[store]\nbatch_max = 64\nbatch_wait = \"5ms\"\n")?;
            jail.set_env("SWITCHBOARD__STORE__BATCH_MAX", "128");
            jail.set_env("SWITCHBOARD__NODE__ID", "node-7");
            let c = Config::load(Some(Path::new("sb.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.store.batch_max, 128, "env wins over the file");
            assert_eq!(
                c.store.batch_wait,
                Duration::from_millis(5),
                "file wins over defaults"
            );
            assert_eq!(c.runtime.client_label, "node-7");
            Ok(())
        });
    }

    #[test]
    fn defaults_load_and_describe_the_embedded_runtime() {
        let c = Config::load_from(None, no_env()).expect("defaults are valid");
        assert_eq!(c.store.dialect, Dialect::Sqlite);
        assert_eq!(c.store.batch_wait, Duration::from_millis(1));
        assert_eq!(c.runtime.send_rate.burst, 3);
        assert_eq!(c.node_id, "node-1");
        assert!(matches!(c.transport, TransportConfig::Sim { .. }));
    }

    #[test]
    fn the_whatsapp_transport_takes_its_endpoint_and_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("wa.toml");
        std::fs::write(&file, "[transport]\nkind = \"whatsapp\"\n").expect("write");
        let c = Config::load_from(Some(&file), no_env()).expect("valid");
        let TransportConfig::WhatsApp(o) = c.transport else {
            panic!("whatsapp");
        };
        assert_eq!(
            o,
            crate::whatsapp::WhatsAppOptions::default(),
            "defaults match"
        );
        std::fs::write(
            &file,
            "[transport]\nkind = \"whatsapp\"\nwhatsapp_url = \"http://x\"\n\
             whatsapp_version = \"2.x\"\n",
        )
        .expect("write");
        let errs = Config::load_from(Some(&file), no_env()).expect_err("invalid");
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"transport.whatsapp_url"), "{errs}");
        assert!(keys.contains(&"transport.whatsapp_version"), "{errs}");
    }

    #[test]
    fn a_cluster_needs_postgres_a_redis_url_and_a_ttl_of_a_second() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[cluster]\nredis_url = \"http://x\"\nlease_ttl = \"100ms\"\nkey_prefix = \"{a}\"\n",
        )
        .expect("write");
        let err = Config::load_from(Some(&file), no_env()).expect_err("invalid");
        let keys: Vec<&str> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cluster.redis_url",
                "cluster.redis_url",
                "cluster.lease_ttl",
                "cluster.key_prefix"
            ],
            "{err}"
        );
        let c = Config::load_from(None, no_env()).expect("defaults are valid");
        assert!(c.cluster.is_none(), "embedded by default");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("bad.toml");
        std::fs::write(
            &file,
            "[store]\nurl = \"mysql://x\"\nbatch_max = 0\nbatch_wait = \"soon\"\n\
             [runtime]\nsend_burst = \"many\"\ngroups_enabled = \"yes\"\n\
             [http]\nlisten = \"nowhere\"\n[transport]\nkind = \"carrier-pigeon\"\n\
             [typo]\nx = 1\n",
        )
        .expect("write");
        let errs = Config::load_from(Some(&file), no_env()).expect_err("invalid");
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "store.url",
            "store.batch_max",
            "store.batch_wait",
            "runtime.send_burst",
            "runtime.groups_enabled",
            "http.listen",
            "transport.kind",
            "typo",
        ] {
            assert!(keys.contains(&key), "{key} missing from {errs}");
        }
    }

    #[test]
    fn postgres_needs_session_keys_and_secrets_stay_hidden() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pg.toml");
        std::fs::write(&file, "[store]\nurl = \"postgres://u:hunter2@db/x\"\n").expect("write");
        let errs = Config::load_from(Some(&file), no_env()).expect_err("keys required");
        assert!(
            errs.0.iter().any(|e| e.key == "store.session_keys"),
            "{errs}"
        );

        let key = crate::store::SessionCipher::generate("k1");
        std::fs::write(
            &file,
            format!("[store]\nurl = \"postgres://u:hunter2@db/x\"\nsession_keys = \"{key}\"\n"),
        )
        .expect("write");
        let c = Config::load_from(Some(&file), no_env()).expect("valid");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains(&key[3..]),
            "{shown}"
        );
    }
}
