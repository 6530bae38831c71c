//! The Prometheus rules shipped in `dashboards/` (issue 16): the recording
//! rules, the alerts and their promtool unit tests.
//!
//! - `promtool check rules` accepts every rule file, and `promtool check
//!   config` the sample configuration that loads them.
//! - `promtool test rules` passes, and its test file has, for every alert,
//!   a case where the alert fires and one where it does not.
//! - Every alert says how bad it is (`severity`), what happened
//!   (`summary`), what it means and what to check first (`description`),
//!   and has a runbook section in the README under its own name.
//! - Every `tollgate_*` or `process_*` name a rule reads is a family a real
//!   tollgate's `/metrics` serves, and every recorded `tollgate:*` name a
//!   rule reads is recorded by a rule.
//!
//! promtool comes from Debian's `prometheus` package, installed when
//! missing; if it cannot be, the tests fail and say so, they never skip.
//! That the rules also load and evaluate in a running Prometheus on a real
//! tollgate's series is checked by `tests/dashboard.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::promtool::{promtool, repo_path};
use common::*;

const RECORDING: &str = "dashboards/tollgate-recording.yml";
const ALERTS: &str = "dashboards/tollgate-alerts.yml";
const RULE_TESTS: &str = "dashboards/tests/tollgate-alerts.test.yml";
const SEVERITIES: [&str; 2] = ["warning", "critical"];

fn yaml(relative: &str) -> serde_yaml::Value {
    let text =
        std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every rule of a rule file.
fn rules(relative: &str) -> Vec<serde_yaml::Value> {
    let file = yaml(relative);
    let groups = file["groups"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{relative} has no groups"));
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect()
}

fn str_of<'a>(v: &'a serde_yaml::Value, key: &str) -> Option<&'a str> {
    v[key].as_str()
}

/// (alert name, rule) for every alerting rule.
fn alerts() -> Vec<(String, serde_yaml::Value)> {
    rules(ALERTS)
        .into_iter()
        .map(|r| {
            let name = str_of(&r, "alert")
                .unwrap_or_else(|| panic!("{ALERTS}: a rule without `alert`: {r:?}"))
                .to_string();
            (name, r)
        })
        .collect()
}

/// The metric names a PromQL expression reads: identifiers outside string
/// literals that name tollgate's series (`tollgate_…`), the process ones
/// (`process_…`) or recorded ones (`tollgate:…`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Blank out "…" literals (label values, regexes) first.
    let mut plain = String::with_capacity(expr.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in expr.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            plain.push(' ');
        } else if c == '"' {
            in_string = true;
            plain.push(' ');
        } else {
            plain.push(c);
        }
    }
    plain
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| {
            w.starts_with("tollgate_") || w.starts_with("tollgate:") || w.starts_with("process_")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn metric_names_are_read_from_expressions() {
    let names = metric_names(
        "sum by (job) (rate(tollgate_requests_total{outcome=~\"tollgate_fake|x\"}[5m])) \
         / tollgate:upstream_answers:rate5m and on (job) process_open_fds",
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "process_open_fds",
            "tollgate:upstream_answers:rate5m",
            "tollgate_requests_total"
        ]
    );
}

#[test]
fn promtool_accepts_every_rule_file_and_the_sample_config() {
    for file in [RECORDING, ALERTS] {
        let (ok, out) = promtool(&["check", "rules", file]);
        assert!(ok, "promtool check rules {file}:\n{out}");
        let expected = format!("SUCCESS: {} rules found", rules(file).len());
        assert!(out.contains(&expected), "{file}: {out}");
    }
    // The sample configuration loads both files (and promtool checks them
    // again through it).
    let config = yaml("dashboards/prometheus.yml");
    let loaded: Vec<&str> = config["rule_files"]
        .as_sequence()
        .expect("prometheus.yml has rule_files")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(loaded, ["tollgate-recording.yml", "tollgate-alerts.yml"]);
    let (ok, out) = promtool(&["check", "config", "dashboards/prometheus.yml"]);
    assert!(
        ok,
        "promtool check config dashboards/prometheus.yml:\n{out}"
    );
    assert!(out.contains("SUCCESS: 2 rule files found"), "{out}");
}

#[test]
fn promtool_unit_tests_pass() {
    let (ok, out) = promtool(&["test", "rules", RULE_TESTS]);
    assert!(ok, "promtool test rules {RULE_TESTS}:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    // The unit tests read the files that ship, not copies.
    let tests = yaml(RULE_TESTS);
    let files: Vec<&str> = tests["rule_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        ["../tollgate-recording.yml", "../tollgate-alerts.yml"]
    );
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let tests = yaml(RULE_TESTS);
    // alert → (cases where it fires, cases where it must not).
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for group in tests["tests"].as_sequence().expect("tests") {
        for case in group["alert_rule_test"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
        {
            let name = str_of(&case, "alertname").expect("alertname").to_string();
            let fires = case["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| !a.is_empty());
            let entry = cases.entry(name).or_default();
            if fires {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }
    let shipped: BTreeSet<String> = alerts().into_iter().map(|(n, _)| n).collect();
    let mut problems = Vec::new();
    for name in &shipped {
        match cases.get(name) {
            None => problems.push(format!("{name}: no test case")),
            Some((0, _)) => problems.push(format!("{name}: no case where it fires")),
            Some((_, 0)) => problems.push(format!("{name}: no case where it stays quiet")),
            Some(_) => {}
        }
    }
    for name in cases.keys().filter(|n| !shipped.contains(*n)) {
        problems.push(format!("{name}: tested but not in {ALERTS}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_alert_has_severity_summary_description_and_a_runbook() {
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    let alerting = readme
        .split_once("\n## Alerting\n")
        .map(|(_, rest)| rest.split("\n## ").next().unwrap())
        .expect("the README has an `## Alerting` section");
    let mut names = BTreeSet::new();
    let mut problems = Vec::new();
    for (name, rule) in alerts() {
        assert!(names.insert(name.clone()), "alert {name} defined twice");
        assert!(
            name.starts_with("Tollgate"),
            "{name}: alert names start with Tollgate"
        );
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        if !SEVERITIES.contains(&severity) {
            problems.push(format!(
                "{name}: severity {severity:?} not in {SEVERITIES:?}"
            ));
        }
        let annotations = &rule["annotations"];
        let summary = str_of(annotations, "summary").unwrap_or("");
        if summary.trim().is_empty() {
            problems.push(format!("{name}: no summary"));
        }
        let description = str_of(annotations, "description").unwrap_or("");
        // Long enough to say what happened and what to check first.
        if description.len() < 150 || !description.contains("First check") {
            problems.push(format!(
                "{name}: the description must say what it means and, after \
                 \"First check\", what to look at first: {description:?}"
            ));
        }
        let runbook = format!("README.md, Alerting: {name}");
        if str_of(annotations, "runbook") != Some(runbook.as_str()) {
            problems.push(format!("{name}: runbook annotation is not {runbook:?}"));
        }
        let heading = format!("\n#### {name}\n");
        match alerting.split_once(&heading) {
            None => problems.push(format!("{name}: no `#### {name}` in the README's Alerting")),
            Some((_, section)) => {
                let section = section.split("\n#### ").next().unwrap();
                if !section.contains(&format!("**{severity}**")) {
                    problems.push(format!("{name}: its runbook does not say **{severity}**"));
                }
            }
        }
    }
    // No runbook for an alert that does not exist.
    for line in alerting.lines() {
        if let Some(heading) = line.strip_prefix("#### Tollgate") {
            let name = format!("Tollgate{heading}");
            if !names.contains(&name) {
                problems.push(format!("README runbook {name} has no alert"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Families a real tollgate serves, after traffic that creates the
/// families whose series appear on their first event.
fn scraped_families() -> BTreeSet<String> {
    let (_sim, tg) = start_pair(&[], STORE_YAML);
    let (status, body) = get(&tg.url(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301234567&messagedata=hi",
    ));
    assert_eq!(status, 200, "{body}");
    let text = get(&tg.admin_url("/metrics")).1;
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

#[test]
fn every_metric_a_rule_reads_is_exported_or_recorded() {
    let families = scraped_families();
    // A histogram family `x` is read as x_bucket, x_count and x_sum.
    let exported = |name: &str| {
        families.contains(name)
            || ["_bucket", "_count", "_sum"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|f| families.contains(f)))
    };
    let recorded: BTreeSet<String> = rules(RECORDING)
        .iter()
        .map(|r| {
            let name = str_of(r, "record").expect("a recording rule").to_string();
            assert!(
                name.starts_with("tollgate:"),
                "{name}: recorded names are level:metric:operations, level tollgate"
            );
            name
        })
        .collect();
    let mut read_by_rules = BTreeSet::new();
    let mut problems = Vec::new();
    let all_rules = rules(RECORDING).into_iter().chain(rules(ALERTS));
    for rule in all_rules {
        let name = str_of(&rule, "record")
            .or(str_of(&rule, "alert"))
            .unwrap()
            .to_string();
        let expr = str_of(&rule, "expr").unwrap_or_else(|| panic!("{name}: no expr"));
        let names = metric_names(expr);
        // Only the scrape alerts read Prometheus's own `up` instead.
        if names.is_empty() && !expr.contains("up{job=\"tollgate\"}") {
            problems.push(format!("{name}: reads no tollgate series: {expr}"));
        }
        for metric in names {
            let known = if metric.contains(':') {
                recorded.contains(&metric)
            } else {
                exported(&metric)
            };
            if !known {
                problems.push(format!(
                    "{name} reads {metric}, which no scrape or rule has"
                ));
            }
            read_by_rules.insert(metric);
        }
    }
    // Every recorded series is used, by a rule or by the dashboard.
    let dashboard =
        std::fs::read_to_string(repo_path("dashboards/tollgate-overview.json")).unwrap();
    for name in &recorded {
        if !read_by_rules.contains(name) && !dashboard.contains(name.as_str()) {
            problems.push(format!(
                "{name} is recorded but neither alerted on nor shown"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n(scraped families: {families:?})",
        problems.join("\n")
    );
}
