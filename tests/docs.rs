//! The README is part of the contract: every metric family tollgate exports
//! and every error code must be documented there.

use tollgate::error::ErrorCode;
use tollgate::metrics::Metrics;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn every_metric_family_is_in_the_readme() {
    let readme = readme();
    let metrics = Metrics::new();
    let missing: Vec<String> = metrics
        .registry
        .gather()
        .iter()
        .map(|f| f.get_name().to_string())
        .filter(|name| !readme.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "undocumented metric families: {missing:?}"
    );
}

#[test]
fn every_error_code_is_in_the_readme_table() {
    let readme = readme();
    for code in ErrorCode::ALL {
        let row = format!("| {} | `{}` |", code.code(), code.name());
        assert!(readme.contains(&row), "README lacks the row {row:?}");
    }
}
