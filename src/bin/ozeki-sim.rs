//! ozeki-sim: an Ozeki NG HTTP API simulator for demos, tests and benchmarks.
//!
//! ```text
//! ozeki-sim [--listen 127.0.0.1:9502] [--reject-prefix P]... [--latency-ms N]
//!           [--user NAME:PASSWORD:BALANCE[:admin]]... [--no-default-users]
//!           [--threads N] [--no-record] [--verbose]
//! ```
//!
//! After binding it prints one line, `ozeki-sim listening on ADDR`, to stdout.

use clap::Parser;
use tollgate::sim::{self, SimConfig, User};

/// Ozeki NG HTTP API simulator (paths /api, /httpapi, /ozeki; control under /sim/).
#[derive(Debug, Parser)]
#[command(name = "ozeki-sim", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = sim::DEFAULT_LISTEN)]
    listen: String,
    /// Reject recipients whose number (leading + ignored) starts with P
    /// (status code 11, "Invalid recipient"). Repeatable.
    #[arg(long = "reject-prefix", value_name = "P")]
    reject_prefix: Vec<String>,
    /// Latency added to every API request, in milliseconds.
    #[arg(long, default_value_t = 0, value_name = "N")]
    latency_ms: u64,
    /// A user, NAME:PASSWORD:BALANCE[:admin]; adds to (or replaces by name)
    /// the defaults admin:abc123:1000:admin and john:secret1:744. Repeatable.
    #[arg(long = "user", value_name = "SPEC", value_parser = User::parse_spec)]
    users: Vec<User>,
    /// Start without the default users (admin, john).
    #[arg(long)]
    no_default_users: bool,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2, value_name = "N")]
    threads: usize,
    /// Do not keep the /sim/requests log (counters are still kept).
    #[arg(long)]
    no_record: bool,
    /// Log every request (also enabled by setting RUST_LOG).
    #[arg(long)]
    verbose: bool,
}

fn main() {
    let args = Args::parse();
    let verbose = args.verbose || std::env::var_os("RUST_LOG").is_some();
    if verbose {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let mut config = SimConfig {
        reject_prefixes: args.reject_prefix,
        latency_ms: args.latency_ms,
        record: !args.no_record,
        verbose,
        threads: args.threads,
        ..SimConfig::default()
    };
    if args.no_default_users {
        config.users.clear();
    }
    for user in args.users {
        config.upsert_user(user);
    }
    if let Err(e) = sim::run(config, &args.listen) {
        eprintln!("ozeki-sim: {e}");
        std::process::exit(1);
    }
}
