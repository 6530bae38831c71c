//! Writes a deterministic synthetic prefix table (`prefix,price` CSV) for
//! load tests and benchmarks:
//!
//! ```text
//! cargo run --example gen_prefixes -- conf/prefixes.csv [count=200000] [seed=1]
//! ```
//!
//! Point a tariff's `prefixes_file` at the output to try a 200 000-prefix
//! rate deck. Never price real traffic with it.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: gen_prefixes PATH [COUNT=200000] [SEED=1]");
        return ExitCode::from(2);
    };
    let parse = |i: usize, default: u64| -> Option<u64> {
        match args.get(i) {
            None => Some(default),
            Some(s) => s.parse().ok(),
        }
    };
    let (Some(count), Some(seed)) = (parse(1, 200_000), parse(2, 1)) else {
        eprintln!("COUNT and SEED must be whole numbers");
        return ExitCode::from(2);
    };
    let csv = tollgate::tariff::gen::generate_prefix_table(count as usize, seed);
    if let Err(e) = std::fs::write(path, csv) {
        eprintln!("{path}: {e}");
        return ExitCode::FAILURE;
    }
    println!("wrote {count} prefixes to {path}");
    ExitCode::SUCCESS
}
