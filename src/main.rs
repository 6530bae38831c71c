//! The `tollgate` command: run the proxy, check configuration, manage
//! accounts, price a message. Only wiring lives here.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate::config::log::LogFormat;
use tollgate::config::{accounts, Config};
use tollgate::ledger::Role;
use tollgate::money::{format_credits, parse_credits};
use tollgate::tariff::{QuoteRequest, Tariff};

/// mimalloc instead of glibc's malloc: the request path allocates many small,
/// short-lived buffers and the ledger holds millions of small records;
/// mimalloc is faster on the first and packs the second without per-chunk
/// headers (benches/e2e/results.md, benches/memory.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Credit-control reverse proxy for SMS gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(short, long, default_value = "conf/tollgate.yaml")]
        config: PathBuf,
        /// Take the listening sockets and the store over from the running
        /// tollgate, which is then told by SIGQUIT (zero-downtime upgrade;
        /// see README "Restarts and upgrades").
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the configuration, tariffs and accounts; non-zero exit on error.
    Check {
        #[arg(short, long, default_value = "conf/tollgate.yaml")]
        config: PathBuf,
    },
    /// Manage seed accounts (the accounts file named by the configuration).
    Accounts {
        #[arg(short, long, default_value = "conf/tollgate.yaml")]
        config: PathBuf,
        #[command(subcommand)]
        action: AccountsAction,
    },
    /// Read the persisted ledger (the store named by `store.path` or `store.url`).
    Ledger {
        #[arg(short, long, global = true, default_value = "conf/tollgate.yaml")]
        config: PathBuf,
        #[command(subcommand)]
        action: LedgerAction,
    },
    /// Several nodes on one PostgreSQL ledger (`store.url`).
    Cluster {
        #[arg(short, long, global = true, default_value = "conf/tollgate.yaml")]
        config: PathBuf,
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Price a message with the configured tariff.
    Quote {
        #[arg(short, long, default_value = "conf/tollgate.yaml")]
        config: PathBuf,
        #[arg(long)]
        recipient: String,
        #[arg(long, default_value = "")]
        text: String,
        #[arg(long, default_value = "SMS:TEXT")]
        messagetype: String,
        /// Tariff class of the sending account.
        #[arg(long)]
        class: Option<String>,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// The registered nodes: leases, grants held, last commit.
    Status,
}

#[derive(Subcommand)]
enum LedgerAction {
    /// Write every entry, in seq order, as CSV or JSON lines.
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormatArg::Csv)]
        format: ExportFormatArg,
        /// Output file; standard output when absent.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Replay every entry and check the sums against the stored balances
    /// and open reservations; non-zero exit on any mismatch.
    Verify,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormatArg {
    Csv,
    Jsonl,
}

#[derive(Subcommand)]
enum AccountsAction {
    /// Add an account; the password is read from standard input.
    Add {
        name: String,
        #[arg(long, default_value = "user")]
        role: String,
        #[arg(long)]
        parent: Option<String>,
        #[arg(long)]
        tariff_class: Option<String>,
        /// Opening any-time balance in credits.
        #[arg(long, default_value = "0")]
        anytime: String,
        #[arg(long, default_value = "0")]
        offpeak: String,
        /// E-mail address (Boxis clients may log in with it).
        #[arg(long)]
        email: Option<String>,
        /// Generate a Boxis user key (printed once; clients compute
        /// md5(timestamp + key)). Never passed on the command line.
        #[arg(long)]
        boxis_key: bool,
    },
    /// List accounts.
    List,
    /// Show one account.
    Show { name: String },
    /// Change a password; the new one is read from standard input.
    Passwd { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tollgate: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines go to standard error, filtered by `RUST_LOG` (default
/// `info`): text for a person, or one JSON object per line for a log
/// shipper (`log.format: json`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn execute(command: Command) -> Result<(), String> {
    if !matches!(command, Command::Run { .. }) {
        init_logging(LogFormat::Text);
    }
    match command {
        Command::Run { config, upgrade } => {
            // Before anything slow: a SIGHUP while starting must not kill.
            tollgate::reload::catch_early_sighup();
            let path = config;
            let config = Config::load(&path).map_err(|e| e.to_string())?;
            init_logging(config.log.format);
            tracing::info!(config = %path.display(), "starting");
            tollgate::server::run_with(config, tollgate::server::RunOptions { upgrade })
                .map_err(|e| e.to_string())
        }
        Command::Check { config } => check(&config),
        Command::Accounts { config, action } => accounts_command(&config, action),
        Command::Ledger { config, action } => ledger_command(&config, action),
        Command::Cluster {
            config,
            action: ClusterAction::Status,
        } => {
            let config = Config::load(&config).map_err(|e| e.to_string())?;
            let Some(pg) = &config.store.postgres else {
                return Err("store.url: cluster status needs a PostgreSQL store".into());
            };
            let text = tollgate::cluster::sql::status_report(pg)
                .map_err(|e| pg.url.redact(&e.to_string()))?;
            print!("{text}");
            Ok(())
        }
        Command::Quote {
            config,
            recipient,
            text,
            messagetype,
            class,
        } => {
            let config = Config::load(&config).map_err(|e| e.to_string())?;
            let tariff = Tariff::load(&config.tariffs_path).map_err(|e| e.to_string())?;
            let q = tariff
                .quote(&QuoteRequest {
                    recipient: &recipient,
                    text: &text,
                    message_type: &messagetype,
                    class: class.as_deref(),
                    at_unix_ms: tollgate::clock::Clock::now_unix_ms(
                        &tollgate::clock::SystemClock::new(),
                    ),
                })
                .map_err(|e| e.to_string())?;
            // The admin API's words, one per line.
            for (name, value) in tollgate::admin::quote_fields(&q, tariff.version()) {
                let value = match value {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Null => "none (default_price)".to_string(),
                    other => other.to_string(),
                };
                println!("{name:<16}{value}");
            }
            Ok(())
        }
    }
}

fn check(path: &Path) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let tariff = Tariff::load(&config.tariffs_path).map_err(|e| e.to_string())?;
    let n_accounts = match &config.accounts_path {
        Some(p) => accounts::load(p).map_err(|e| e.to_string())?.len(),
        None => 0,
    };
    // A PostgreSQL store: reachable, and what `tollgate run` would migrate
    // (reported, never applied here).
    let store = match &config.store.postgres {
        Some(pg) => Some(check_postgres(path, pg)?),
        None => None,
    };
    let tls = check_tls(path, &config)?;
    println!(
        "ok: {} (tariff {} version {}, {} seed accounts)",
        path.display(),
        config.tariffs_path.display(),
        tariff.version(),
        n_accounts
    );
    if let Some(line) = store {
        println!("{line}");
    }
    for line in tls {
        println!("{line}");
    }
    Ok(())
}

/// `tls:` and `upstream.tls` as `tollgate check` reports them: the
/// certificate and key parse and belong together; the CA file parses; the
/// opt-out of verification is said out loud.
fn check_tls(config_path: &Path, config: &Config) -> Result<Vec<String>, String> {
    use tollgate::tls::{GatewayTls, ServerCert};
    let fail =
        |key: &str, e: tollgate::tls::TlsError| format!("{}: {key}: {e}", config_path.display());
    let mut lines = Vec::new();
    if let Some(tls) = &config.tls {
        let cert = ServerCert::load(&tls.cert, &tls.key).map_err(|e| fail("tls", e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let expiry = chrono::DateTime::from_timestamp(cert.not_after_unix_s, 0)
            .map_or_else(|| cert.not_after_unix_s.to_string(), |t| t.to_rfc3339());
        lines.push(format!(
            "tls: {} certificate {} (serial {}, subject {:?}, not after {expiry}){}",
            tls.listen,
            tls.cert.display(),
            cert.serial,
            cert.subject,
            if cert.expired(now) { " EXPIRED" } else { "" }
        ));
    }
    if let Some(up) = &config.upstream.tls {
        GatewayTls::new(up).map_err(|e| fail("upstream.ca_file", e))?;
        let verify = if up.insecure_skip_verify {
            "NOT VERIFIED (upstream.insecure_skip_verify: true)".to_string()
        } else {
            format!(
                "verified against {} for {}",
                up.ca_file.as_ref().map_or_else(
                    || "the system trust store".to_string(),
                    |p| p.display().to_string()
                ),
                up.sni.as_deref().unwrap_or("")
            )
        };
        lines.push(format!(
            "upstream: https://{} {verify}",
            config.upstream.address
        ));
    }
    Ok(lines)
}

/// `store.url`'s schema, as `tollgate check` reports it.
fn check_postgres(config_path: &Path, pg: &tollgate::store::PgSettings) -> Result<String, String> {
    use tollgate::store::pg::schema;
    let fail = |e: tollgate::store::StoreError| {
        format!(
            "{}: store.url: {}",
            config_path.display(),
            pg.url.redact(&e.to_string())
        )
    };
    let mut client = pg
        .connect("check", Some(pg.statement_timeout))
        .map_err(fail)?;
    let report = schema::report(&mut client, pg).map_err(fail)?;
    report.check_supported().map_err(fail)?;
    Ok(format!("store: {}: {report}", pg.url))
}

fn ledger_command(config_path: &Path, action: LedgerAction) -> Result<(), String> {
    use tollgate::store::{export, verify, PgStore, SqliteStore, Store};
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    // One read transaction (SQLite: WAL; PostgreSQL: REPEATABLE READ READ
    // ONLY): a consistent snapshot beside a running owner, without taking
    // the store's ownership.
    let (mut store, name): (Box<dyn Store>, String) =
        match (&config.store.path, &config.store.postgres) {
            (Some(path), _) => (
                Box::new(SqliteStore::open_snapshot(path).map_err(|e| e.to_string())?),
                path.display().to_string(),
            ),
            (None, Some(pg)) => {
                (
                    Box::new(PgStore::open_snapshot(pg).map_err(|e| {
                        format!("store {}: {}", pg.url, pg.url.redact(&e.to_string()))
                    })?),
                    pg.url.redacted().to_string(),
                )
            }
            (None, None) => {
                return Err(format!(
                    "{}: store.path: no store is configured (store.path or store.url), so there \
                     is no ledger to read",
                    config_path.display()
                ))
            }
        };
    match action {
        LedgerAction::Export { format, output } => {
            let format = match format {
                ExportFormatArg::Csv => export::ExportFormat::Csv,
                ExportFormatArg::Jsonl => export::ExportFormat::Jsonl,
            };
            let mut out: Box<dyn std::io::Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let n = export::export(store.as_mut(), format, &mut out).map_err(|e| e.to_string())?;
            if let Some(p) = &output {
                eprintln!("exported {n} entries to {}", p.display());
            }
            Ok(())
        }
        LedgerAction::Verify => {
            let report = verify::verify(store.as_mut()).map_err(|e| e.to_string())?;
            print!("{report}");
            if report.is_ok(config.overdraft) {
                println!(
                    "ok: {} entries replay to the stored balances",
                    report.entries
                );
                Ok(())
            } else {
                Err(format!(
                    "verify failed: the entries in {name} do not sum to the stored state"
                ))
            }
        }
    }
}

/// 32 random hex characters for a Boxis user key.
fn new_boxis_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_password() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading the password from standard input: {e}"))?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() || pw.chars().count() > 16 {
        return Err("the password must be 1 to 16 characters (Ozeki's limit)".into());
    }
    Ok(pw)
}

fn accounts_command(config_path: &Path, action: AccountsAction) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let path = config.accounts_path.ok_or_else(|| {
        format!(
            "{}: accounts: no accounts file is configured",
            config_path.display()
        )
    })?;
    let mut seeds = if path.exists() {
        accounts::load(&path).map_err(|e| e.to_string())?
    } else {
        Vec::new()
    };
    match action {
        AccountsAction::List => {
            println!(
                "{:<24} {:<6} {:<16} {:>12} {:>12}",
                "NAME", "ROLE", "PARENT", "ANYTIME", "OFFPEAK"
            );
            for s in &seeds {
                println!(
                    "{:<24} {:<6} {:<16} {:>12} {:>12}",
                    s.name,
                    s.role.as_str(),
                    s.parent.as_deref().unwrap_or("-"),
                    format_credits(s.anytime_milli),
                    format_credits(s.offpeak_milli)
                );
            }
            Ok(())
        }
        AccountsAction::Show { name } => {
            let s = seeds
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| format!("no account {name:?} in {}", path.display()))?;
            println!("name          {}", s.name);
            println!("role          {}", s.role.as_str());
            println!("parent        {}", s.parent.as_deref().unwrap_or("-"));
            println!("tariff class  {}", s.tariff_class.as_deref().unwrap_or("-"));
            println!(
                "anytime       {} (opening balance)",
                format_credits(s.anytime_milli)
            );
            println!(
                "offpeak       {} (opening balance)",
                format_credits(s.offpeak_milli)
            );
            println!("password      argon2id hash set");
            Ok(())
        }
        AccountsAction::Add {
            name,
            role,
            parent,
            tariff_class,
            anytime,
            offpeak,
            email,
            boxis_key,
        } => {
            accounts::validate_account_name(&name).map_err(|p| format!("account name: {p}"))?;
            if seeds.iter().any(|s| s.name == name) {
                return Err(format!(
                    "account {name:?} exists; use `accounts passwd` to change its password"
                ));
            }
            let role = Role::parse(&role).ok_or("--role must be admin or user")?;
            if let Some(p) = &parent {
                if !seeds.iter().any(|s| &s.name == p) {
                    return Err(format!("--parent {p:?} is not an account"));
                }
            }
            let amount = |t: &str, flag: &str| match parse_credits(t) {
                Ok(m) if m >= 0 => Ok(m),
                Ok(_) => Err(format!("{flag} cannot be negative")),
                Err(e) => Err(format!("{flag}: {e}")),
            };
            let seed = accounts::AccountSeed {
                anytime_milli: amount(&anytime, "--anytime")?,
                offpeak_milli: amount(&offpeak, "--offpeak")?,
                password_hash: accounts::hash_password(&read_password()?),
                name: name.clone(),
                role,
                parent,
                tariff_class,
                email,
                boxis_user_key: boxis_key.then(new_boxis_key),
            };
            let key = seed.boxis_user_key.clone();
            seeds.push(seed);
            // Validates the whole file (unique e-mails, key length) before writing.
            accounts::save(&path, &seeds).map_err(|e| e.to_string())?;
            accounts::load(&path).map_err(|e| e.to_string())?;
            println!("added {name} to {}", path.display());
            if let Some(key) = key {
                println!("Boxis user key (shown once): {key}");
            }
            Ok(())
        }
        AccountsAction::Passwd { name } => {
            let hash = accounts::hash_password(&read_password()?);
            let s = seeds
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| format!("no account {name:?} in {}", path.display()))?;
            s.password_hash = hash;
            accounts::save(&path, &seeds).map_err(|e| e.to_string())?;
            println!(
                "password of {name} changed in {} (a running tollgate picks it up on restart)",
                path.display()
            );
            Ok(())
        }
    }
}
