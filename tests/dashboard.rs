//! The Grafana dashboard against a real Prometheus (SPEC 8): every PromQL
//! expression in `dashboards/tollgate-overview.json` must evaluate without
//! error and return data from a Prometheus that scraped a loaded tollgate.
//! That Prometheus loads the shipped recording and alerting rules (the
//! dashboard reads the recorded rates), and every rule must evaluate
//! without error on tollgate's real series.
//!
//! The test runs Debian's `prometheus` binary itself (installing the
//! package when it is missing) on a free loopback port with a temporary
//! data directory and a 1 s scrape of the test tollgate's admin listener;
//! it never touches a system Prometheus service. It also runs `promtool
//! check metrics` on a scrape and `promtool check config` on the sample
//! scrape configuration. Every wait is bounded; if Prometheus cannot be
//! installed the test fails and says so, it never skips.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pg;
use common::promtool::{ensure_prometheus, repo_path, run_bounded};
use common::*;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

const DASHBOARD: &str = "dashboards/tollgate-overview.json";
/// The rule files a Prometheus for tollgate loads (see `prometheus.yml`).
const RULE_FILES: [&str; 2] = [
    "dashboards/tollgate-recording.yml",
    "dashboards/tollgate-alerts.yml",
];
/// How long the test keeps traffic flowing once Prometheus scrapes, so that
/// every rate window holds several samples of a changing counter.
const LOADED_FOR: Duration = Duration::from_secs(6);

/// A Prometheus server of our own, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(scrape_targets: &[std::net::SocketAddr]) -> Prometheus {
        let targets: Vec<String> = scrape_targets.iter().map(|t| format!("\"{t}\"")).collect();
        let targets = targets.join(", ");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        let rule_files: String = RULE_FILES
            .iter()
            .map(|f| format!("  - \"{}\"\n", repo_path(f).display()))
            .collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n{rule_files}\
                 scrape_configs:\n  - job_name: tollgate\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = client()
                .get(p.url("/-/ready"))
                .send()
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 60 s; log:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/rules`: every rule Prometheus loaded, as (group, rule).
    fn rules(&self) -> Vec<(String, serde_json::Value)> {
        let v: serde_json::Value = client()
            .get(self.url("/api/v1/rules"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["status"], "success", "{v}");
        let mut out = Vec::new();
        for g in v["data"]["groups"].as_array().expect("rule groups") {
            let group = g["name"].as_str().unwrap().to_string();
            for r in g["rules"].as_array().unwrap() {
                out.push((group.clone(), r.clone()));
            }
        }
        out
    }

    /// Evaluates `expr` now: Ok(result vector) or Err(what went wrong).
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let url = self.url(&format!(
            "/api/v1/query?query={}",
            utf8_percent_encode(expr, NON_ALPHANUMERIC)
        ));
        let r = client().get(url).send().map_err(|e| e.to_string())?;
        let status = r.status();
        let v: serde_json::Value = r.json().map_err(|e| format!("HTTP {status}: {e}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}: {v}"));
        }
        match &v["data"]["result"] {
            serde_json::Value::Array(a) => Ok(a.clone()),
            // Scalar results (e.g. `time()`) are data too.
            other if !other.is_null() => Ok(vec![other.clone()]),
            _ => Err(format!("no result in {v}")),
        }
    }
}

/// Grafana's variables as a dashboard evaluates them with "All" selected.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

/// Every panel, rows' nested panels included.
fn all_panels(dashboard: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

/// (panel title, expression) for every query of the dashboard, template
/// variable queries included (as the PromQL Grafana runs for them).
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dashboard) {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            assert!(!expr.trim().is_empty(), "panel {title:?}: empty expr");
            out.push((title.clone(), expr.to_string()));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap();
        // label_values(METRIC, LABEL) → the series it lists.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {q:?} is not label_values(metric, label)"));
        let (metric, label) = inner.rsplit_once(',').unwrap();
        out.push((
            format!("variable {}", var["name"]),
            format!("count by ({}) ({})", label.trim(), metric.trim()),
        ));
    }
    out
}

fn send(tg: &Tollgate, recipients: &str) -> u16 {
    get(&tg.url(&format!(
        "/api?action=sendmessage&username=john&password=secret1&recipient={recipients}&messagedata=hello"
    )))
    .0
}

/// One round of ordinary traffic: accepted and rejected recipients, an
/// insufficient-credit refusal, credit actions, forwarded actions.
fn traffic_round(tg: &Tollgate) {
    assert_eq!(send(tg, "%2B36301234567,%2B36991234567"), 200);
    get(&tg.url(
        "/api?action=sendmessage&username=poor&password=poor1&recipient=%2B36301234567&messagedata=x",
    ));
    get(&tg.url("/api?action=getcredits&username=john&password=secret1"));
    get(&tg.url("/api?action=addcredits&username=admin&password=abc123&useraccount=john&add=1"));
    get(&tg.url("/api?action=receivemessage&username=john&password=secret1"));
    get(&tg.url("/somewhere/else"));
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let started = Instant::now();
    // The dashboard and provisioning files parse and hang together.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path(DASHBOARD)).unwrap())
            .expect("dashboard JSON");
    assert_eq!(dashboard["uid"], "tollgate-overview");
    let mut ids = std::collections::HashSet::new();
    for p in all_panels(&dashboard) {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id {}",
            p["id"]
        );
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    for file in [
        "dashboards/provisioning/dashboards/tollgate.yaml",
        "dashboards/provisioning/datasources/prometheus.yaml",
    ] {
        let v: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(repo_path(file)).unwrap())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(v["apiVersion"].as_u64(), Some(1), "{file}");
    }
    let ds: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_path(
            "dashboards/provisioning/datasources/prometheus.yaml",
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(ds["datasources"][0]["type"].as_str(), Some("prometheus"));
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15, "{} queries", queries.len());

    ensure_prometheus();
    let (ok, out) = run_bounded(
        Command::new("promtool")
            .arg("check")
            .arg("config")
            .arg(repo_path("dashboards/prometheus.yml")),
        Duration::from_secs(30),
    );
    assert!(
        ok,
        "promtool check config dashboards/prometheus.yml:\n{out}"
    );

    // A loaded tollgate: traffic of every kind the dashboard shows.
    let sim = Sim::start(&["--reject-prefix", "3699"]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml:
                "metrics: { balance_accounts: [john, admin] }\nstore: { path: tollgate.db }\n"
                    .into(),
            ..Default::default()
        },
    );
    // A cluster node beside it (the Cluster row): its own database,
    // scraped by the same Prometheus.
    let db = pg::TestDb::create("dashboard_cluster");
    let node = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: common::cluster::node_yaml(&db.url(), "dash-a"),
            ..Default::default()
        },
    );
    let round = |tg: &Tollgate, node: &Tollgate| {
        traffic_round(tg);
        traffic_round(node);
    };
    round(&tg, &node);
    sim.fault("http500", 1);
    send(&tg, "%2B442012345678");
    sim.fault("reset", 1);
    send(&tg, "%2B36301111111");
    let r = client()
        .post(tg.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    // promtool's own lint of what tollgate exposes.
    let scrape = get(&tg.admin_url("/metrics")).1;
    let scrape_file = tg.dir.path().join("scrape.prom");
    std::fs::write(&scrape_file, &scrape).unwrap();
    let (ok, out) = run_bounded(
        Command::new("sh")
            .arg("-c")
            .arg("promtool check metrics < \"$1\"")
            .arg("sh")
            .arg(&scrape_file),
        Duration::from_secs(30),
    );
    assert!(
        ok,
        "promtool check metrics:\n{out}\n--- scrape ---\n{scrape}"
    );

    let prometheus = Prometheus::start(&[tg.admin, node.admin]);
    // Wait for the first successful scrape, keeping traffic flowing.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        round(&tg, &node);
        let up = prometheus.query("up{job=\"tollgate\"} == 1");
        if up.is_ok_and(|r| r.len() == 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped tollgate at {}; log:\n{}",
            tg.admin,
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let loaded_until = Instant::now() + LOADED_FOR;
    while Instant::now() < loaded_until {
        round(&tg, &node);
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut failures = Vec::new();
    for (title, expr) in &queries {
        let promql = substitute(expr);
        match prometheus.query(&promql) {
            Err(e) => failures.push(format!("{title}: `{promql}` failed: {e}")),
            Ok(result) if result.is_empty() => {
                failures.push(format!("{title}: `{promql}` returned no series"))
            }
            Ok(result) => {
                let all_nan = result.iter().all(|s| s["value"][1] == "NaN");
                if all_nan {
                    failures.push(format!("{title}: `{promql}` returned only NaN: {result:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
    // Every shipped rule is loaded and evaluates without error on
    // tollgate's real series (an expression that type-checks can still
    // fail at run time, e.g. on many-to-many matches).
    let expected_rules: usize = RULE_FILES
        .iter()
        .map(|f| {
            let v: serde_yaml::Value =
                serde_yaml::from_str(&std::fs::read_to_string(repo_path(f)).unwrap()).unwrap();
            v["groups"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|g| g["rules"].as_sequence().unwrap().len())
                .sum::<usize>()
        })
        .sum();
    let rules = prometheus.rules();
    assert_eq!(rules.len(), expected_rules, "rules loaded: {rules:?}");
    let unhealthy: Vec<String> = rules
        .iter()
        .filter(|(_, r)| r["health"] != "ok")
        .map(|(g, r)| {
            format!(
                "{g}/{}: health {} {}",
                r["name"], r["health"], r["lastError"]
            )
        })
        .collect();
    assert!(unhealthy.is_empty(), "{}", unhealthy.join("\n"));
    // The tollgate this test loaded is healthy: no critical alert fires
    // (pending or firing). In-doubt and gateway-error warnings may, as
    // the traffic holds both on purpose.
    let critical: Vec<String> = rules
        .iter()
        .filter(|(_, r)| r["type"] == "alerting" && r["labels"]["severity"] == "critical")
        .filter(|(_, r)| r["state"] != "inactive")
        .map(|(_, r)| format!("{}: {} {}", r["name"], r["state"], r["alerts"]))
        .collect();
    assert!(critical.is_empty(), "{}", critical.join("\n"));

    // Spot-check that the data is tollgate's: the in-doubt send is there.
    let in_doubt = prometheus
        .query(&format!(
            "tollgate_reservations_in_doubt{{instance=\"{}\"}}",
            tg.admin
        ))
        .unwrap();
    assert_eq!(in_doubt[0]["value"][1], "1", "{in_doubt:?}");
    assert!(
        started.elapsed() < Duration::from_secs(600),
        "the test took {:?}",
        started.elapsed()
    );
}
