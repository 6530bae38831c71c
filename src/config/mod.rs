//! Configuration: YAML files parsed into file structs that reject unknown
//! keys, then validated into one internal [`Config`].
//!
//! Every error names the file, the key and what would be valid, so an
//! operator can fix it without reading the source. Relative paths inside a
//! file resolve against that file's directory. This module never opens a
//! socket or touches a balance.

pub mod accounts;
pub mod cluster;
pub mod dlr;
pub mod idempotency;
pub mod limits;
pub mod log;
pub mod notify;
pub mod outbox;
pub mod pingora;
pub mod postgres;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::api::owned::normalise_path;
use crate::ledger::Overdraft;

/// A configuration problem: which file, which key, what is wrong and how to
/// fix it.
#[derive(Debug, Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            file: file.display().to_string(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// What tollgate does with credit (SPEC 5.1a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Price, reserve, refuse and settle.
    Enforce,
    /// Price and record what would have happened; never refuse, never move a balance.
    Shadow,
    /// Forward everything untouched: the emergency bypass and the benchmark reference.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Sync,
    Async,
}

/// What to do with a send from credentials tollgate does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownAccounts {
    Reject,
    Forward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InDoubtPolicy {
    /// Leave in-doubt reservations for an operator.
    Manual,
    Post,
    Void,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionEcho {
    Addcredits,
    Getcredits,
}

// ---------------------------------------------------------------------------
// File structs: exactly what `conf/tollgate.yaml` may contain.
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default = "default_mode")]
    mode: Mode,
    /// The plain HTTP client listener; optional beside `tls.listen`.
    #[serde(default)]
    listen: Option<String>,
    /// The HTTPS client listener.
    #[serde(default)]
    tls: Option<tls::FileTls>,
    #[serde(default)]
    threads: Option<usize>,
    /// pingora's own server knobs (`pingora.rs`).
    #[serde(default)]
    pingora: pingora::FilePingora,
    upstream: FileUpstream,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    ozeki: FileOzeki,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    ledger: FileLedger,
    #[serde(default)]
    settle: FileSettle,
    #[serde(default)]
    store: FileStore,
    #[serde(default = "default_durability")]
    durability: Durability,
    /// Seconds SIGTERM waits for requests in flight before stopping.
    #[serde(default = "default_shutdown_grace_s")]
    shutdown_grace_s: u64,
    tariffs: String,
    #[serde(default)]
    accounts: Option<String>,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    boxis: FileBoxis,
    #[serde(default)]
    soap: FileSoap,
    /// Rate limits and lockout (SPEC 7); reloaded with the tariffs.
    #[serde(default)]
    limits: limits::FileLimits,
    /// Client timeouts and header size.
    #[serde(default)]
    downstream: limits::FileDownstream,
    /// Log format and what access lines may carry.
    #[serde(default)]
    log: log::FileLog,
    /// Low-balance webhooks.
    #[serde(default)]
    notify: notify::FileNotify,
    /// `Idempotency-Key` handling (SPEC 3.4).
    #[serde(default)]
    idempotency: idempotency::FileIdempotency,
    /// Zero-downtime upgrade (`tollgate run --upgrade` and SIGQUIT).
    #[serde(default)]
    upgrade: FileUpgrade,
    /// The durable outbox (relayed delivery reports).
    #[serde(default)]
    outbox: outbox::FileOutbox,
    /// Delivery reports (SPEC 9a).
    #[serde(default)]
    dlr: dlr::FileDlr,
    /// Several nodes on one PostgreSQL ledger (needs `store.url`).
    #[serde(default)]
    cluster: Option<cluster::FileCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpgrade {
    /// The unix socket pingora hands the listening sockets over on.
    #[serde(default)]
    sock: Option<String>,
    /// pingora's pid file.
    #[serde(default)]
    pid_file: Option<String>,
    #[serde(default = "default_upgrade_wait_max_ms")]
    wait_max_ms: u64,
    #[serde(default = "default_handover_grace_ms")]
    handover_grace_ms: u64,
    #[serde(default = "default_takeover_max_ms")]
    takeover_max_ms: u64,
}

impl Default for FileUpgrade {
    fn default() -> Self {
        FileUpgrade {
            sock: None,
            pid_file: None,
            wait_max_ms: default_upgrade_wait_max_ms(),
            handover_grace_ms: default_handover_grace_ms(),
            takeover_max_ms: default_takeover_max_ms(),
        }
    }
}

fn default_upgrade_wait_max_ms() -> u64 {
    10_000
}
fn default_handover_grace_ms() -> u64 {
    2_000
}
fn default_takeover_max_ms() -> u64 {
    30_000
}
/// Longest unix socket path (`sun_path` holds 108 bytes with its NUL; the
/// relay socket adds `.relay`).
pub const UPGRADE_SOCK_MAX_BYTES: usize = 100;

/// Zero-downtime upgrade (`upgrade:`); see `handover.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeConfig {
    /// pingora's `upgrade_sock`: the old process sends its listening
    /// sockets here on SIGQUIT. The successor's relay socket is this path
    /// plus `.relay`.
    pub sock: PathBuf,
    /// pingora's `pid_file`.
    pub pid_file: PathBuf,
    /// How long a credit request waits for a process that does not serve
    /// credit yet (starting, or handing over) before `store_unavailable`.
    pub wait_max: Duration,
    /// How long the old process lets its credit requests in flight finish
    /// before it flushes and releases the store.
    pub handover_grace: Duration,
    /// How long a successor polls for the store's ownership before it
    /// gives up and exits non-zero.
    pub takeover_max: Duration,
}

impl UpgradeConfig {
    /// The successor's relay socket: `<sock>.relay`.
    pub fn relay_sock(&self) -> PathBuf {
        let mut s = self.sock.clone().into_os_string();
        s.push(".relay");
        PathBuf::from(s)
    }
}

fn default_mode() -> Mode {
    Mode::Enforce
}
fn default_shutdown_grace_s() -> u64 {
    3
}
fn default_durability() -> Durability {
    Durability::Sync
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    address: String,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_read_timeout_ms")]
    read_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_s")]
    idle_timeout_s: u64,
    /// HTTPS to the gateway (see `config::tls`).
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    insecure_skip_verify: bool,
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_read_timeout_ms() -> u64 {
    30_000
}
fn default_idle_timeout_s() -> u64 {
    60
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
    #[serde(default)]
    token: Option<String>,
}
impl Default for FileAdmin {
    fn default() -> Self {
        FileAdmin {
            listen: default_admin_listen(),
            token: None,
        }
    }
}
fn default_admin_listen() -> String {
    "127.0.0.1:9601".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOzeki {
    #[serde(default = "default_ozeki_paths")]
    paths: Vec<String>,
    #[serde(default = "default_addcredits_echo")]
    addcredits_action_echo: ActionEcho,
    #[serde(default = "default_body_limit")]
    body_limit_bytes: usize,
    #[serde(default)]
    blocked_paths: Vec<String>,
}
impl Default for FileOzeki {
    fn default() -> Self {
        FileOzeki {
            paths: default_ozeki_paths(),
            addcredits_action_echo: default_addcredits_echo(),
            body_limit_bytes: default_body_limit(),
            blocked_paths: Vec::new(),
        }
    }
}
fn default_ozeki_paths() -> Vec<String> {
    vec!["/api".into(), "/httpapi".into(), "/ozeki".into()]
}
fn default_addcredits_echo() -> ActionEcho {
    ActionEcho::Addcredits
}
fn default_body_limit() -> usize {
    1024 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    #[serde(default = "default_unknown_accounts")]
    unknown_accounts: UnknownAccounts,
    #[serde(default)]
    verify_upstream: bool,
    #[serde(default)]
    adopt_balance: bool,
    #[serde(default = "default_credential_cache")]
    credential_cache_entries: usize,
    #[serde(default = "default_verified_ttl_s")]
    verified_ttl_s: u64,
    #[serde(default = "default_negative_ttl_s")]
    negative_ttl_s: u64,
}
impl Default for FileAuth {
    fn default() -> Self {
        FileAuth {
            unknown_accounts: default_unknown_accounts(),
            verify_upstream: false,
            adopt_balance: false,
            credential_cache_entries: default_credential_cache(),
            verified_ttl_s: default_verified_ttl_s(),
            negative_ttl_s: default_negative_ttl_s(),
        }
    }
}
fn default_verified_ttl_s() -> u64 {
    3600
}
fn default_negative_ttl_s() -> u64 {
    30
}
fn default_unknown_accounts() -> UnknownAccounts {
    UnknownAccounts::Reject
}
fn default_credential_cache() -> usize {
    100_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLedger {
    #[serde(default = "default_overdraft")]
    overdraft: String,
}
impl Default for FileLedger {
    fn default() -> Self {
        FileLedger {
            overdraft: default_overdraft(),
        }
    }
}
fn default_overdraft() -> String {
    "strict".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettle {
    #[serde(default = "default_ttl_s")]
    reservation_ttl_s: u64,
    #[serde(default = "default_in_doubt_after_s")]
    in_doubt_after_s: u64,
    #[serde(default = "default_in_doubt_policy")]
    in_doubt_policy: InDoubtPolicy,
}
impl Default for FileSettle {
    fn default() -> Self {
        FileSettle {
            reservation_ttl_s: default_ttl_s(),
            in_doubt_after_s: default_in_doubt_after_s(),
            in_doubt_policy: default_in_doubt_policy(),
        }
    }
}
fn default_ttl_s() -> u64 {
    300
}
fn default_in_doubt_after_s() -> u64 {
    3600
}
fn default_in_doubt_policy() -> InDoubtPolicy {
    InDoubtPolicy::Manual
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    #[serde(default)]
    path: Option<String>,
    /// PostgreSQL instead of SQLite: `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`.
    #[serde(default)]
    url: Option<String>,
    /// PostgreSQL only (`None`: the default, or an error with `path`).
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    statement_timeout_ms: Option<u64>,
    #[serde(default = "default_batch_max_entries")]
    batch_max_entries: usize,
    #[serde(default = "default_batch_age_max_ms")]
    batch_age_max_ms: u64,
    #[serde(default = "default_commit_delay_us")]
    commit_delay_us: u64,
    #[serde(default = "default_queue_max_entries")]
    queue_max_entries: usize,
    #[serde(default = "default_ack_timeout_ms")]
    ack_timeout_ms: u64,
    #[serde(default = "default_lease_s")]
    lease_s: u64,
}
impl Default for FileStore {
    fn default() -> Self {
        FileStore {
            path: None,
            url: None,
            connect_timeout_ms: None,
            statement_timeout_ms: None,
            batch_max_entries: default_batch_max_entries(),
            batch_age_max_ms: default_batch_age_max_ms(),
            commit_delay_us: default_commit_delay_us(),
            queue_max_entries: default_queue_max_entries(),
            ack_timeout_ms: default_ack_timeout_ms(),
            lease_s: default_lease_s(),
        }
    }
}
fn default_batch_max_entries() -> usize {
    4096
}
fn default_batch_age_max_ms() -> u64 {
    2
}
fn default_commit_delay_us() -> u64 {
    200
}
fn default_queue_max_entries() -> usize {
    65_536
}
fn default_ack_timeout_ms() -> u64 {
    5_000
}
/// Short enough that a paused owner is replaced within seconds, long
/// enough that an fsync stall or a busy store does not cost the lease.
fn default_lease_s() -> u64 {
    5
}
/// Longest `store.lease_s`: a hung owner keeps the store this long.
pub const LEASE_S_MAX: u64 = 300;
/// `store.connect_timeout_ms` (PostgreSQL): long enough for a server on
/// another host, short enough that start-up fails quickly when it is down.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// `store.statement_timeout_ms` (PostgreSQL): a commit or renewal stuck
/// behind a lock or a stalled server fails after this and is retried.
pub const STATEMENT_TIMEOUT_MS_DEFAULT: u64 = 5_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    #[serde(default)]
    balance_accounts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBoxis {
    #[serde(default = "default_boxis_path")]
    path: String,
    #[serde(default = "default_timestamp_window_s")]
    timestamp_window_s: u64,
    #[serde(default = "default_replay_cache_entries")]
    replay_cache_entries: usize,
    #[serde(default = "default_door_body_limit")]
    body_limit_bytes: usize,
}
impl Default for FileBoxis {
    fn default() -> Self {
        FileBoxis {
            path: default_boxis_path(),
            timestamp_window_s: default_timestamp_window_s(),
            replay_cache_entries: default_replay_cache_entries(),
            body_limit_bytes: default_door_body_limit(),
        }
    }
}
fn default_boxis_path() -> String {
    "/boxis".into()
}
fn default_timestamp_window_s() -> u64 {
    300
}
fn default_replay_cache_entries() -> usize {
    // About 8 MB at most; enough for 330 authenticated calls a second
    // sustained over the default 300 s window.
    100_000
}
fn default_door_body_limit() -> usize {
    64 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSoap {
    #[serde(default = "default_soap_path")]
    path: String,
    #[serde(default = "default_door_body_limit")]
    body_limit_bytes: usize,
}
impl Default for FileSoap {
    fn default() -> Self {
        FileSoap {
            path: default_soap_path(),
            body_limit_bytes: default_door_body_limit(),
        }
    }
}
fn default_soap_path() -> String {
    "/WebServices/2.2/Simple/Account.asmx".into()
}

/// Longest accepted `boxis.timestamp_window_s` (a day): a wider window
/// only widens what a captured request is good for.
pub const TIMESTAMP_WINDOW_MAX_S: u64 = 86_400;

/// Most accounts `metrics.balance_accounts` may list: each adds two series
/// per bucket, and the list exists to keep that bounded.
pub const BALANCE_ACCOUNTS_MAX: usize = 1000;

// ---------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (for reloads and messages).
    pub source: PathBuf,
    pub mode: Mode,
    /// The plain HTTP client listener (`listen`); at least one of it and
    /// `tls` is set.
    pub listen: Option<SocketAddr>,
    /// The HTTPS client listener (`tls:`).
    pub tls: Option<tls::TlsListenerConfig>,
    /// Worker threads of the proxy service; `None` = pingora's default.
    pub threads: Option<usize>,
    /// pingora's server knobs (`pingora:`).
    pub pingora: pingora::PingoraConfig,
    pub upstream: UpstreamConfig,
    pub admin: AdminConfig,
    pub ozeki: OzekiConfig,
    pub auth: AuthConfig,
    pub overdraft: Overdraft,
    pub settle: SettleConfig,
    pub store: StoreConfig,
    pub durability: Durability,
    /// How long SIGTERM lets requests in flight finish (pingora's grace
    /// period). A send cut off after that goes in doubt, never void.
    pub shutdown_grace: Duration,
    pub tariffs_path: PathBuf,
    pub accounts_path: Option<PathBuf>,
    pub metrics: MetricsConfig,
    pub boxis: BoxisConfig,
    pub soap: SoapConfig,
    /// The limits the first snapshot starts with (reloads re-read them).
    pub limits: limits::LimitsConfig,
    pub downstream: limits::DownstreamConfig,
    pub idempotency: idempotency::IdempotencyConfig,
    pub log: log::LogConfig,
    pub notify: notify::NotifyConfig,
    pub upgrade: UpgradeConfig,
    pub outbox: outbox::OutboxConfig,
    pub dlr: dlr::DlrConfig,
    /// `cluster:`: this node is one of several on one PostgreSQL ledger
    /// (`None`: a single node, exactly as without the section).
    pub cluster: Option<cluster::ClusterConfig>,
}

/// The Boxis-compatible door (SPEC 2.1).
#[derive(Debug, Clone)]
pub struct BoxisConfig {
    /// Exact request path (`POST /boxis`).
    pub path: String,
    /// How far a request's `timestamp` may be from now, either way.
    pub timestamp_window_s: u64,
    /// Most authcodes remembered for replay detection; when that many are
    /// still inside the window, new requests are refused (`rate_limited`).
    pub replay_cache_entries: usize,
    pub body_limit_bytes: usize,
}

/// The 2sms-compatible SOAP door (SPEC 2.2).
#[derive(Debug, Clone)]
pub struct SoapConfig {
    /// Request path, matched ASCII case-insensitively (as IIS does).
    pub path: String,
    pub body_limit_bytes: usize,
}

#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    /// Accounts whose balances are exported as gauges; every other account
    /// stays out of `/metrics` so label cardinality stays bounded.
    pub balance_accounts: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub address: SocketAddr,
    pub connect_timeout: Duration,
    /// Longest wait for the gateway's answer once the request is written;
    /// past it a send's reservation goes in doubt.
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    /// HTTPS to the gateway; `None` is plain HTTP.
    pub tls: Option<tls::UpstreamTlsConfig>,
}

#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token for `/admin/*`; `None` disables those endpoints.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct OzekiConfig {
    /// The gateway's API paths: these and every path below them are read
    /// whole and decided by tollgate (`api::owned`).
    pub paths: Vec<String>,
    pub addcredits_action_echo: ActionEcho,
    pub body_limit_bytes: usize,
    /// Paths (and everything below them) refused with 403, never forwarded:
    /// the operator's switch for gateway endpoints clients must not reach.
    pub blocked_paths: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub unknown_accounts: UnknownAccounts,
    pub verify_upstream: bool,
    pub adopt_balance: bool,
    pub credential_cache_entries: usize,
    /// Drop-in mode: how long credentials the gateway confirmed are
    /// trusted locally before the gateway is asked again.
    pub verified_ttl: Duration,
    /// Drop-in mode: how long credentials the gateway refused are refused
    /// locally (so they cannot be used to hammer the gateway).
    pub negative_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct SettleConfig {
    pub reservation_ttl: Duration,
    pub in_doubt_after: Duration,
    pub in_doubt_policy: InDoubtPolicy,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// SQLite file; `None` (and no `postgres`) keeps the ledger in memory
    /// only (tests, demos).
    pub path: Option<PathBuf>,
    /// The PostgreSQL store (`store.url`); never set together with `path`.
    pub postgres: Option<postgres::PgSettings>,
    pub batch_max_entries: usize,
    pub batch_age_max: Duration,
    /// Under load (the last batch was shared by several waiting requests),
    /// how long after a commit the next one waits to gather more entries.
    pub commit_delay: Duration,
    pub queue_max_entries: usize,
    /// How long an acknowledging answer waits for its commit before failing
    /// with `store_unavailable`.
    pub ack_timeout: Duration,
    /// The store ownership lease (`store.lease_s`): renewed every third of
    /// it; an owner that did not renew it for this long is taken over by
    /// the next `tollgate run` (see `store::fence`).
    pub lease: Duration,
}

/// Resolves `value` against the directory of `file` unless it is absolute.
pub fn resolve_relative(file: &Path, value: &str) -> PathBuf {
    let p = Path::new(value);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        file.parent().unwrap_or_else(|| Path::new(".")).join(p)
    }
}

fn parse_addr(file: &Path, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::new(
            file,
            key,
            format!("{value:?} is not an address; write IP:PORT, e.g. 127.0.0.1:9501"),
        )
    })
}

/// `store.url` and its timeouts, checked: `store.path` and `store.url` are
/// mutually exclusive, and the timeouts apply to `store.url` only.
fn postgres_settings(
    file: &Path,
    f: &FileStore,
) -> Result<Option<postgres::PgSettings>, ConfigError> {
    let Some(url) = &f.url else {
        for (key, value) in [
            ("store.connect_timeout_ms", f.connect_timeout_ms),
            ("store.statement_timeout_ms", f.statement_timeout_ms),
        ] {
            if value.is_some() {
                return Err(ConfigError::new(
                    file,
                    key,
                    "applies to a PostgreSQL store only; set store.url, or remove this key",
                ));
            }
        }
        return Ok(None);
    };
    if f.path.is_some() {
        return Err(ConfigError::new(
            file,
            "store.url",
            "store.path and store.url are mutually exclusive: keep store.path for the \
             embedded SQLite store, or store.url for PostgreSQL",
        ));
    }
    let url = postgres::PgUrl::parse(url)
        .map_err(|problem| ConfigError::new(file, "store.url", problem))?;
    let millis = |key: &str, value: Option<u64>, default: u64, max: u64| {
        let value = value.unwrap_or(default);
        if (100..=max).contains(&value) {
            Ok(Duration::from_millis(value))
        } else {
            Err(ConfigError::new(
                file,
                key,
                format!("{value} is not valid; use 100 to {max} ms (default {default})"),
            ))
        }
    };
    Ok(Some(postgres::PgSettings {
        url,
        connect_timeout: millis(
            "store.connect_timeout_ms",
            f.connect_timeout_ms,
            CONNECT_TIMEOUT_MS_DEFAULT,
            60_000,
        )?,
        statement_timeout: millis(
            "store.statement_timeout_ms",
            f.statement_timeout_ms,
            STATEMENT_TIMEOUT_MS_DEFAULT,
            600_000,
        )?,
    }))
}

/// Turns a serde_yaml error into a ConfigError naming the file and position.
pub fn yaml_error(file: &Path, e: serde_yaml::Error) -> ConfigError {
    let key = match e.location() {
        Some(l) => format!("line {} column {}", l.line(), l.column()),
        None => "(document)".into(),
    };
    ConfigError::new(file, key, e.to_string())
}

/// Checks the `boxis:` and `soap:` sections: paths start with `/` and
/// differ from each other and from the Ozeki paths; bounds are sane.
fn validate_doors(path: &Path, f: &FileConfig) -> Result<(), ConfigError> {
    for (key, p) in [("boxis.path", &f.boxis.path), ("soap.path", &f.soap.path)] {
        if !p.starts_with('/') || p.contains('?') {
            return Err(ConfigError::new(
                path,
                key,
                format!("{p:?} must start with '/' and hold no query"),
            ));
        }
        let normalised = normalise_path(p);
        if f.ozeki
            .paths
            .iter()
            .any(|o| normalise_path(o) == normalised)
        {
            return Err(ConfigError::new(
                path,
                key,
                format!("{p:?} is also an ozeki.paths entry; pick another path"),
            ));
        }
    }
    if normalise_path(&f.boxis.path) == normalise_path(&f.soap.path) {
        return Err(ConfigError::new(
            path,
            "soap.path",
            "must differ from boxis.path",
        ));
    }
    if !(1..=TIMESTAMP_WINDOW_MAX_S).contains(&f.boxis.timestamp_window_s) {
        return Err(ConfigError::new(
            path,
            "boxis.timestamp_window_s",
            format!("must be 1 to {TIMESTAMP_WINDOW_MAX_S} seconds"),
        ));
    }
    if f.boxis.replay_cache_entries == 0 {
        return Err(ConfigError::new(
            path,
            "boxis.replay_cache_entries",
            "must be at least 1",
        ));
    }
    for (key, limit) in [
        ("boxis.body_limit_bytes", f.boxis.body_limit_bytes),
        ("soap.body_limit_bytes", f.soap.body_limit_bytes),
    ] {
        if !(1024..=16 * 1024 * 1024).contains(&limit) {
            return Err(ConfigError::new(
                path,
                key,
                "must be 1024 to 16777216 bytes",
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Reads and validates `conf/tollgate.yaml` (not the files it names).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "(file)", format!("cannot read: {e}")))?;
        Config::from_yaml(&text, path)
    }

    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut f: FileConfig = serde_yaml::from_str(text).map_err(|e| yaml_error(path, e))?;
        let overdraft = match f.ledger.overdraft.as_str() {
            "strict" => Overdraft::Strict,
            "ozeki" => Overdraft::Ozeki,
            other => {
                return Err(ConfigError::new(
                    path,
                    "ledger.overdraft",
                    format!("{other:?} is not valid; use strict or ozeki"),
                ))
            }
        };
        if f.threads == Some(0) {
            return Err(ConfigError::new(path, "threads", "must be at least 1"));
        }
        for (key, paths) in [
            ("ozeki.paths", &f.ozeki.paths),
            ("ozeki.blocked_paths", &f.ozeki.blocked_paths),
        ] {
            for (i, p) in paths.iter().enumerate() {
                if !p.starts_with('/') || p.contains('?') {
                    return Err(ConfigError::new(
                        path,
                        format!("{key}[{i}]"),
                        format!("{p:?} must start with '/' and hold no query"),
                    ));
                }
            }
        }
        if f.ozeki.body_limit_bytes < 1024 {
            return Err(ConfigError::new(
                path,
                "ozeki.body_limit_bytes",
                "must be at least 1024",
            ));
        }
        if f.settle.reservation_ttl_s == 0 {
            return Err(ConfigError::new(
                path,
                "settle.reservation_ttl_s",
                "must be at least 1 second",
            ));
        }
        if f.store.batch_max_entries == 0 || f.store.queue_max_entries < f.store.batch_max_entries {
            return Err(ConfigError::new(
                path,
                "store.queue_max_entries",
                "must be at least store.batch_max_entries, which must be at least 1",
            ));
        }
        if !(1..=LEASE_S_MAX).contains(&f.store.lease_s) {
            return Err(ConfigError::new(
                path,
                "store.lease_s",
                format!(
                    "{} is not valid; use 1 to {LEASE_S_MAX} seconds (default 5)",
                    f.store.lease_s
                ),
            ));
        }
        let postgres = postgres_settings(path, &f.store)?;
        let cluster = match (f.cluster.take(), &postgres) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    path,
                    "cluster",
                    "needs a PostgreSQL store: set store.url (the nodes share its database), \
                     or remove the cluster section",
                ))
            }
            (Some(c), Some(pg)) => Some(cluster::ClusterConfig::from_file(
                path,
                c,
                pg.statement_timeout,
            )?),
        };
        if cluster.is_some() && overdraft != Overdraft::Strict {
            // A grant is a slice of what is available: it cannot go below
            // zero, so a send that overdraws cannot be decided from one.
            return Err(ConfigError::new(
                path,
                "ledger.overdraft",
                "must be strict with cluster: (nodes spend from grants of available credit, \
                 which cannot go below zero)",
            ));
        }
        if cluster.is_some() && f.durability != Durability::Sync {
            // An acknowledged reservation not yet committed would be spent
            // at the gateway while its grant could come back to the
            // account (lease lost, crash): other nodes would spend it too.
            return Err(ConfigError::new(
                path,
                "durability",
                "must be sync with cluster: (a reservation is committed under the node's \
                 lease before its send leaves, so no credit is spent twice)",
            ));
        }
        if cluster.is_some() && f.auth.adopt_balance {
            // An adopted balance is a credit action of one node's ledger;
            // a cluster node journals credit only in the database.
            return Err(ConfigError::new(
                path,
                "auth.adopt_balance",
                "cannot be true with cluster: (give adopted accounts their credit with \
                 addcredits, which every node sees)",
            ));
        }
        // Both read the node's ledger, which on a cluster node holds its
        // grants, not the accounts' balances: they would report (and
        // alert on) the wrong numbers.
        if cluster.is_some() && f.notify.has_low_balance() {
            return Err(ConfigError::new(
                path,
                "notify.low_balance",
                "cannot be set with cluster: (a node's memory holds its grants, not the \
                 accounts' balances; watch balances with getcredits or the store)",
            ));
        }
        if cluster.is_some() && !f.metrics.balance_accounts.is_empty() {
            return Err(ConfigError::new(
                path,
                "metrics.balance_accounts",
                "cannot be set with cluster: (a node's memory holds its grants, not the \
                 accounts' balances)",
            ));
        }
        if f.metrics.balance_accounts.len() > BALANCE_ACCOUNTS_MAX {
            return Err(ConfigError::new(
                path,
                "metrics.balance_accounts",
                format!(
                    "lists {} accounts; at most {BALANCE_ACCOUNTS_MAX} (each adds gauge series)",
                    f.metrics.balance_accounts.len()
                ),
            ));
        }
        for (i, name) in f.metrics.balance_accounts.iter().enumerate() {
            if name.is_empty() || name.len() > 64 {
                return Err(ConfigError::new(
                    path,
                    format!("metrics.balance_accounts[{i}]"),
                    "must be an account name of 1 to 64 characters",
                ));
            }
        }
        validate_doors(path, &f)?;
        if let Some(t) = &f.admin.token {
            if t.len() < 16 {
                return Err(ConfigError::new(
                    path,
                    "admin.token",
                    "must be at least 16 characters (it guards the admin API)",
                ));
            }
        }
        for (key, value, max) in [
            ("auth.verified_ttl_s", f.auth.verified_ttl_s, 30 * 86_400),
            ("auth.negative_ttl_s", f.auth.negative_ttl_s, 86_400),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError::new(
                    path,
                    key,
                    format!("must be 1 to {max} seconds"),
                ));
            }
        }
        let limits = limits::LimitsConfig::from_file(path, f.limits)?;
        let downstream = limits::DownstreamConfig::from_file(path, f.downstream)?;
        let idempotency = idempotency::IdempotencyConfig::from_file(
            path,
            f.idempotency,
            f.store
                .path
                .as_deref()
                .map(|p| resolve_relative(path, p))
                .as_deref(),
        )?;
        if cluster.is_some() && idempotency.path.is_some() {
            // A key file is one node's: a retry on another would run again.
            return Err(ConfigError::new(
                path,
                "idempotency.path",
                "cannot be set with cluster: (the nodes share the key table in the store's \
                 database)",
            ));
        }
        let upgrade = upgrade_config(
            path,
            &f.upgrade,
            f.store
                .path
                .as_deref()
                .map(|p| resolve_relative(path, p))
                .as_deref(),
        )?;
        let listen = match &f.listen {
            Some(l) => Some(parse_addr(path, "listen", l)?),
            None => None,
        };
        let tls = match f.tls {
            Some(t) => Some(tls::TlsListenerConfig::from_file(path, t)?),
            None => None,
        };
        match (&listen, &tls) {
            (None, None) => {
                return Err(ConfigError::new(
                    path,
                    "listen",
                    "no client listener: set listen (plain HTTP), tls.listen (HTTPS) or both",
                ))
            }
            (Some(plain), Some(t)) if *plain == t.listen => {
                return Err(ConfigError::new(
                    path,
                    "tls.listen",
                    format!("{plain} is also listen; give HTTPS its own port (e.g. 8443)"),
                ))
            }
            _ => {}
        }
        let upstream_tls = tls::UpstreamTlsConfig::from_file(
            path,
            tls::FileUpstreamTls {
                tls: f.upstream.tls,
                ca_file: f.upstream.ca_file,
                sni: f.upstream.sni,
                insecure_skip_verify: f.upstream.insecure_skip_verify,
            },
        )?;
        let store_path = f.store.path.as_deref().map(|p| resolve_relative(path, p));
        let outbox = outbox::OutboxConfig::from_file(path, f.outbox, store_path.as_deref())?;
        let dlr = dlr::DlrConfig::from_file(path, f.dlr)?;
        let pingora = pingora::PingoraConfig::from_file(path, f.pingora)?;
        Ok(Config {
            source: path.to_path_buf(),
            mode: f.mode,
            listen,
            tls,
            threads: f.threads,
            pingora,
            upstream: UpstreamConfig {
                address: parse_addr(path, "upstream.address", &f.upstream.address)?,
                connect_timeout: Duration::from_millis(f.upstream.connect_timeout_ms),
                read_timeout: Duration::from_millis(f.upstream.read_timeout_ms),
                idle_timeout: Duration::from_secs(f.upstream.idle_timeout_s),
                tls: upstream_tls,
            },
            admin: AdminConfig {
                listen: parse_addr(path, "admin.listen", &f.admin.listen)?,
                token: f.admin.token,
            },
            ozeki: OzekiConfig {
                paths: f.ozeki.paths,
                addcredits_action_echo: f.ozeki.addcredits_action_echo,
                body_limit_bytes: f.ozeki.body_limit_bytes,
                blocked_paths: f.ozeki.blocked_paths,
            },
            auth: AuthConfig {
                unknown_accounts: f.auth.unknown_accounts,
                verify_upstream: f.auth.verify_upstream,
                adopt_balance: f.auth.adopt_balance,
                credential_cache_entries: f.auth.credential_cache_entries,
                verified_ttl: Duration::from_secs(f.auth.verified_ttl_s),
                negative_ttl: Duration::from_secs(f.auth.negative_ttl_s),
            },
            overdraft,
            settle: SettleConfig {
                reservation_ttl: Duration::from_secs(f.settle.reservation_ttl_s),
                in_doubt_after: Duration::from_secs(f.settle.in_doubt_after_s),
                in_doubt_policy: f.settle.in_doubt_policy,
            },
            store: StoreConfig {
                path: f.store.path.as_deref().map(|p| resolve_relative(path, p)),
                postgres,
                batch_max_entries: f.store.batch_max_entries,
                batch_age_max: Duration::from_millis(f.store.batch_age_max_ms),
                commit_delay: Duration::from_micros(f.store.commit_delay_us),
                queue_max_entries: f.store.queue_max_entries,
                ack_timeout: Duration::from_millis(f.store.ack_timeout_ms),
                lease: Duration::from_secs(f.store.lease_s),
            },
            durability: f.durability,
            shutdown_grace: Duration::from_secs(f.shutdown_grace_s),
            tariffs_path: resolve_relative(path, &f.tariffs),
            accounts_path: f.accounts.as_deref().map(|p| resolve_relative(path, p)),
            boxis: BoxisConfig {
                path: f.boxis.path,
                timestamp_window_s: f.boxis.timestamp_window_s,
                replay_cache_entries: f.boxis.replay_cache_entries,
                body_limit_bytes: f.boxis.body_limit_bytes,
            },
            soap: SoapConfig {
                path: f.soap.path,
                body_limit_bytes: f.soap.body_limit_bytes,
            },
            metrics: MetricsConfig {
                balance_accounts: f.metrics.balance_accounts,
            },
            limits,
            downstream,
            idempotency,
            log: f.log.into(),
            notify: notify::NotifyConfig::from_file(path, f.notify)?,
            upgrade,
            outbox,
            dlr,
            cluster,
        })
    }
}

/// `upgrade:`: the sockets default to the store's directory (or `/tmp`
/// without a file store), the waits are bounded.
fn upgrade_config(
    path: &Path,
    f: &FileUpgrade,
    store_path: Option<&Path>,
) -> Result<UpgradeConfig, ConfigError> {
    let dir = match store_path.and_then(Path::parent) {
        Some(d) if d.as_os_str().is_empty() => PathBuf::from("."),
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("/tmp"),
    };
    let sock = match &f.sock {
        Some(s) => resolve_relative(path, s),
        None => dir.join("tollgate.upgrade.sock"),
    };
    if sock.as_os_str().len() > UPGRADE_SOCK_MAX_BYTES {
        return Err(ConfigError::new(
            path,
            "upgrade.sock",
            format!(
                "{} is longer than {UPGRADE_SOCK_MAX_BYTES} bytes (a unix socket path); set a shorter one",
                sock.display()
            ),
        ));
    }
    let pid_file = match &f.pid_file {
        Some(p) => resolve_relative(path, p),
        None => dir.join("tollgate.pid"),
    };
    for (key, ms, max) in [
        ("upgrade.wait_max_ms", f.wait_max_ms, 120_000),
        ("upgrade.handover_grace_ms", f.handover_grace_ms, 120_000),
        ("upgrade.takeover_max_ms", f.takeover_max_ms, 600_000),
    ] {
        if !(1..=max).contains(&ms) {
            return Err(ConfigError::new(
                path,
                key,
                format!("{ms} is not between 1 and {max}"),
            ));
        }
    }
    Ok(UpgradeConfig {
        sock,
        pid_file,
        wait_max: Duration::from_millis(f.wait_max_ms),
        handover_grace: Duration::from_millis(f.handover_grace_ms),
        takeover_max: Duration::from_millis(f.takeover_max_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "listen: 127.0.0.1:9501\nupstream: { address: 127.0.0.1:9502 }\ntariffs: tariffs.yaml\n";

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let c = Config::from_yaml(MINIMAL, Path::new("/etc/tollgate/tollgate.yaml")).unwrap();
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.durability, Durability::Sync);
        assert_eq!(c.ozeki.body_limit_bytes, 1 << 20);
        assert_eq!(c.ozeki.paths, vec!["/api", "/httpapi", "/ozeki"]);
        assert_eq!(c.tariffs_path, Path::new("/etc/tollgate/tariffs.yaml"));
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9601");
    }

    #[test]
    fn upgrade_sockets_default_beside_the_store_and_waits_are_bounded() {
        let c = Config::from_yaml(MINIMAL, Path::new("/etc/tollgate/tollgate.yaml")).unwrap();
        assert_eq!(c.upgrade.sock, Path::new("/tmp/tollgate.upgrade.sock"));
        assert_eq!(c.upgrade.pid_file, Path::new("/tmp/tollgate.pid"));
        assert_eq!(c.upgrade.wait_max, Duration::from_secs(10));
        assert_eq!(c.upgrade.handover_grace, Duration::from_secs(2));
        let text = format!("{MINIMAL}store: {{ path: /var/lib/tollgate/t.db }}\n");
        let c = Config::from_yaml(&text, Path::new("/etc/tollgate/tollgate.yaml")).unwrap();
        assert_eq!(
            c.upgrade.sock,
            Path::new("/var/lib/tollgate/tollgate.upgrade.sock")
        );
        assert_eq!(
            c.upgrade.relay_sock(),
            Path::new("/var/lib/tollgate/tollgate.upgrade.sock.relay")
        );
        let text = format!("{MINIMAL}upgrade: {{ wait_max_ms: 0 }}\n");
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.key, "upgrade.wait_max_ms");
        let long = "x".repeat(120);
        let text = format!("{MINIMAL}upgrade: {{ sock: /{long} }}\n");
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.key, "upgrade.sock");
    }

    #[test]
    fn a_tls_listener_may_replace_or_join_the_plain_one() {
        let at = Path::new("/etc/tollgate/tollgate.yaml");
        let tls_only = MINIMAL.replace(
            "listen: 127.0.0.1:9501\n",
            "tls: { listen: 0.0.0.0:8443, cert: tls/cert.pem, key: tls/key.pem }\n",
        );
        let c = Config::from_yaml(&tls_only, at).unwrap();
        assert_eq!(c.listen, None);
        let tls = c.tls.unwrap();
        assert_eq!(tls.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(tls.cert, Path::new("/etc/tollgate/tls/cert.pem"));
        assert_eq!(tls.key, Path::new("/etc/tollgate/tls/key.pem"));
        assert_eq!(c.upstream.tls, None);

        let both = format!("{MINIMAL}tls: {{ listen: 127.0.0.1:9443, cert: c.pem, key: k.pem }}\n");
        let c = Config::from_yaml(&both, at).unwrap();
        assert_eq!(c.listen.unwrap().to_string(), "127.0.0.1:9501");
        assert!(c.tls.is_some());

        let none = MINIMAL.replace("listen: 127.0.0.1:9501\n", "");
        let e = Config::from_yaml(&none, at).unwrap_err();
        assert_eq!(e.key, "listen");
        assert!(e.problem.contains("tls.listen"), "{e}");
        let same = format!("{MINIMAL}tls: {{ listen: 127.0.0.1:9501, cert: c.pem, key: k.pem }}\n");
        assert_eq!(Config::from_yaml(&same, at).unwrap_err().key, "tls.listen");
        let port0 = format!("{MINIMAL}tls: {{ listen: 127.0.0.1:0, cert: c.pem, key: k.pem }}\n");
        assert_eq!(Config::from_yaml(&port0, at).unwrap_err().key, "tls.listen");
        let unknown = format!(
            "{MINIMAL}tls: {{ listen: 127.0.0.1:9443, cert: c.pem, key: k.pem, ciphers: x }}\n"
        );
        assert!(Config::from_yaml(&unknown, at).is_err());

        let https = MINIMAL.replace(
            "upstream: { address: 127.0.0.1:9502 }",
            "upstream: { address: 127.0.0.1:9502, tls: true, sni: gw.example.com, ca_file: ca.pem }",
        );
        let up = Config::from_yaml(&https, at).unwrap().upstream.tls.unwrap();
        assert_eq!(up.ca_file.unwrap(), Path::new("/etc/tollgate/ca.pem"));
        let bad = MINIMAL.replace(
            "upstream: { address: 127.0.0.1:9502 }",
            "upstream: { address: 127.0.0.1:9502, insecure_skip_verify: true }",
        );
        assert_eq!(
            Config::from_yaml(&bad, at).unwrap_err().key,
            "upstream.insecure_skip_verify"
        );
    }

    #[test]
    fn unknown_key_names_file_and_position() {
        let text = format!("{MINIMAL}bogus_key: 1\n");
        let e = Config::from_yaml(&text, Path::new("conf/tollgate.yaml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("conf/tollgate.yaml: line 4"), "{msg}");
        assert!(msg.contains("bogus_key"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        let text = MINIMAL.replace("127.0.0.1:9502", "nowhere");
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.key, "upstream.address");
        assert!(e.problem.contains("IP:PORT"));

        let text = format!("{MINIMAL}ledger: {{ overdraft: lenient }}\n");
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.key, "ledger.overdraft");
        assert!(e.problem.contains("strict or ozeki"));

        let text = format!("{MINIMAL}admin: {{ token: short }}\n");
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.key, "admin.token");
    }

    #[test]
    fn metrics_section_lists_balance_accounts_and_rejects_unknown_keys() {
        let c = Config::from_yaml(MINIMAL, Path::new("t.yaml")).unwrap();
        assert!(c.metrics.balance_accounts.is_empty());
        let text = format!("{MINIMAL}metrics: {{ balance_accounts: [john, admin] }}\n");
        let c = Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
        assert_eq!(c.metrics.balance_accounts, vec!["john", "admin"]);
        let text = format!("{MINIMAL}metrics: {{ balance_account: [john] }}\n");
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert!(e.problem.contains("balance_account"), "{e}");
        let text = format!("{MINIMAL}metrics: {{ balance_accounts: [''] }}\n");
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.key, "metrics.balance_accounts[0]");
    }

    #[test]
    fn boxis_and_soap_sections_default_and_validate() {
        let c = Config::from_yaml(MINIMAL, Path::new("t.yaml")).unwrap();
        assert_eq!(c.boxis.path, "/boxis");
        assert_eq!(c.boxis.timestamp_window_s, 300);
        assert_eq!(c.soap.path, "/WebServices/2.2/Simple/Account.asmx");
        let text = format!("{MINIMAL}boxis: {{ path: /b, timestamp_window_s: 60 }}\n");
        let c = Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
        assert_eq!(
            (c.boxis.path.as_str(), c.boxis.timestamp_window_s),
            ("/b", 60)
        );
        for (extra, key) in [
            ("boxis: { path: boxis }", "boxis.path"),
            ("boxis: { path: /api }", "boxis.path"),
            (
                "boxis: { timestamp_window_s: 0 }",
                "boxis.timestamp_window_s",
            ),
            ("soap: { path: /BOXIS }", "soap.path"),
            ("soap: { body_limit_bytes: 10 }", "soap.body_limit_bytes"),
        ] {
            let e =
                Config::from_yaml(&format!("{MINIMAL}{extra}\n"), Path::new("t.yaml")).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
        }
        let e = Config::from_yaml(
            &format!("{MINIMAL}boxis: {{ window: 5 }}\n"),
            Path::new("t.yaml"),
        )
        .unwrap_err();
        assert!(e.problem.contains("window"), "{e}");
    }

    #[test]
    fn the_store_lease_defaults_to_5_s_and_is_bounded() {
        let c = Config::from_yaml(MINIMAL, Path::new("t.yaml")).unwrap();
        assert_eq!(c.store.lease, Duration::from_secs(5));
        let text = format!("{MINIMAL}store: {{ path: t.db, lease_s: 2 }}\n");
        let c = Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
        assert_eq!(c.store.lease, Duration::from_secs(2));
        for bad in [0, LEASE_S_MAX + 1] {
            let text = format!("{MINIMAL}store: {{ lease_s: {bad} }}\n");
            let e = Config::from_yaml(&text, Path::new("conf/tollgate.yaml")).unwrap_err();
            assert_eq!(e.key, "store.lease_s");
            assert_eq!(e.file, "conf/tollgate.yaml");
            assert!(e.problem.contains("1 to 300 seconds"), "{e}");
        }
    }

    #[test]
    fn a_cluster_section_needs_a_postgres_store_and_is_absent_by_default() {
        let c = Config::from_yaml(MINIMAL, Path::new("t.yaml")).unwrap();
        assert!(c.cluster.is_none());
        let text = format!("{MINIMAL}store: {{ path: t.db }}\ncluster: {{ node_id: a }}\n");
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.key, "cluster");
        assert!(e.problem.contains("store.url"), "{e}");
        let text = format!(
            "{MINIMAL}store: {{ url: 'postgres://u@h/db' }}\ncluster: {{ node_id: node-b, lease_ms: 4000 }}\n"
        );
        let c = Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.node_id, "node-b");
        assert_eq!(cluster.lease, Duration::from_millis(4_000));
        let text = format!(
            "{MINIMAL}store: {{ url: 'postgres://u@h/db' }}\ncluster: {{ node_id: a, grants: 1 }}\n"
        );
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let text = format!(
            "{MINIMAL}store: {{ url: 'postgres://u@h/db' }}\nledger: {{ overdraft: ozeki }}\ncluster: {{ node_id: a }}\n"
        );
        let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.key, "ledger.overdraft");
    }

    #[test]
    fn a_cluster_node_refuses_what_reads_its_grants_as_balances() {
        let pg_cluster = "store: { url: 'postgres://u@h/db' }\ncluster: { node_id: a }\n";
        let low_balance =
            "notify: { low_balance: { url: 'http://127.0.0.1:9/h', secret: 0123456789abcdef, default_threshold: 10 } }\n";
        let gauges = "metrics: { balance_accounts: [john] }\n";
        for (extra, key) in [
            (low_balance, "notify.low_balance"),
            (gauges, "metrics.balance_accounts"),
        ] {
            // Valid on one node ...
            let text = format!("{MINIMAL}store: {{ url: 'postgres://u@h/db' }}\n{extra}");
            Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
            // ... refused with cluster:, naming the key.
            let text = format!("{MINIMAL}{pg_cluster}{extra}");
            let e = Config::from_yaml(&text, Path::new("t.yaml")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.problem.contains("cannot be set with cluster"), "{e}");
        }
        // An empty list is no gauge: allowed.
        let text = format!("{MINIMAL}{pg_cluster}metrics: {{ balance_accounts: [] }}\n");
        Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
    }

    #[test]
    fn a_postgres_store_is_a_url_exclusive_with_a_path() {
        let text = format!(
            "{MINIMAL}store: {{ url: 'postgres://tg:pw-Zq81@127.0.0.1:5432/ledger', statement_timeout_ms: 2000 }}\n"
        );
        let c = Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
        assert!(c.store.path.is_none());
        let pg = c.store.postgres.as_ref().unwrap();
        assert_eq!(pg.url.dbname(), "ledger");
        assert_eq!(pg.statement_timeout, Duration::from_millis(2000));
        assert_eq!(
            pg.connect_timeout,
            Duration::from_millis(CONNECT_TIMEOUT_MS_DEFAULT)
        );
        // Keys live in the same database unless idempotency.path says
        // otherwise (no key file by default).
        assert!(c.idempotency.path.is_none());
        // The password is in no debug output.
        assert!(!format!("{c:?}").contains("pw-Zq81"), "{c:?}");

        for (store, key, problem) in [
            (
                "{ path: t.db, url: 'postgres://u@h/db' }",
                "store.url",
                "mutually exclusive",
            ),
            (
                "{ url: 'mysql://u:pw-Zq81@h/db' }",
                "store.url",
                "not a PostgreSQL URL",
            ),
            (
                "{ url: 'postgres://u:pw-Zq81@h' }",
                "store.url",
                "names no database",
            ),
            (
                "{ path: t.db, statement_timeout_ms: 100 }",
                "store.statement_timeout_ms",
                "PostgreSQL store only",
            ),
            (
                "{ url: 'postgres://u@h/db', connect_timeout_ms: 1 }",
                "store.connect_timeout_ms",
                "100 to 60000 ms",
            ),
        ] {
            let text = format!("{MINIMAL}store: {store}\n");
            let e = Config::from_yaml(&text, Path::new("conf/tollgate.yaml")).unwrap_err();
            assert_eq!(
                (e.file.as_str(), e.key.as_str()),
                ("conf/tollgate.yaml", key),
                "{e}"
            );
            assert!(e.problem.contains(problem), "{e}");
            assert!(!e.to_string().contains("pw-Zq81"), "{e}");
        }
    }

    #[test]
    fn admin_token_is_not_in_debug_output() {
        let text = format!("{MINIMAL}admin: {{ token: very-secret-token-123 }}\n");
        let c = Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
        assert!(!format!("{c:?}").contains("very-secret-token-123"));
    }
}
