//! Hot reload over the real binaries (SPEC 5.2): the tariff file is
//! rewritten under continuous load, and `SIGHUP` / `POST /admin/reload` /
//! file changes all swap the snapshot without failing a request.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tollgate::money::format_credits;
use tollgate::tariff::Tariff;

/// The recipient every load request sends to (priced by prefix "44").
const RECIPIENT: &str = "%2B447700900123";
/// Load threads, each on its own keep-alive connection.
const LOAD_THREADS: usize = 3;
/// Tariff rewrites, half of them invalid.
const REWRITES: usize = 100;
/// Pause between rewrites: a little more than the watcher's debounce, so
/// most rewrites are reloaded on their own.
const REWRITE_PAUSE: Duration = Duration::from_millis(120);

/// Valid tariff number `k`: every version prices the test's recipient at its
/// own price, 1.000 + k/1000 credits, so a cost names the version.
fn valid_tariff(k: usize) -> String {
    let price = format_credits(valid_price_milli(k));
    format!(
        "# valid version {k}\n\
         default_country_code: \"36\"\n\
         default_price: \"{price}\"\n\
         prices:\n  \"44\": \"{price}\"\n  \"3620\": 3\n"
    )
}

fn valid_price_milli(k: usize) -> i64 {
    1000 + k as i64
}

/// Invalid tariff number `j`, in one of several ways. Each names a price of
/// 7.xxx credits that no valid version uses, so a request priced by an
/// invalid file would show. The defect always comes before the price, so
/// no prefix of the file (a half-written read) is a valid tariff with it.
fn invalid_tariff(j: usize) -> String {
    let price = format!("7.{:03}", j % 1000);
    match j % 7 {
        0 => format!("bogus_key: 1\ndefault_price: \"{price}\"\n"),
        1 => format!("default_price: [\"{price}\"\n"),
        2 => format!("prices: {{ \"44\": \"7.0001\" }}\ndefault_price: \"{price}\"\n"),
        3 => format!(
            "offpeak: {{ timezone: Mars/Olympus_Mons, windows: [{{ days: [sat], from: \"00:00\", to: \"24:00\" }}] }}\ndefault_price: \"{price}\"\n"
        ),
        4 => format!("prefixes_file: bad-prefixes.csv\ndefault_price: \"{price}\"\n"),
        5 => String::new(),
        _ => format!("prices: {{ \"44\": 7, \"4x\": 8 }}\ndefault_price: \"{price}\"\n"),
    }
}

fn version_of(text: &str, path: &Path) -> String {
    Tariff::from_yaml(text, path)
        .expect("a valid test tariff")
        .version()
        .to_string()
}

/// Writes `text` over `path` in place (truncate + write) or through a
/// temporary file renamed over it, as editors and deploy tools do.
fn rewrite(path: &Path, text: &str, by_rename: bool, n: usize) {
    if by_rename {
        let tmp = path.with_file_name(format!(".tariffs.yaml.{n}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    } else {
        std::fs::write(path, text).unwrap();
    }
}

fn sighup(tg: &Tollgate) {
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(tg.pid().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP failed");
}

fn admin_reload(tg: &Tollgate) -> (u16, serde_json::Value) {
    let r = client()
        .post(tg.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

fn reloads(tg: &Tollgate, result: &str) -> f64 {
    tg.metric(&format!(
        "tollgate_tariff_reloads_total{{result=\"{result}\"}}"
    ))
    .unwrap_or(0.0)
}

fn quote(tg: &Tollgate) -> serde_json::Value {
    tg.admin_get(&format!("/admin/quote?recipient={RECIPIENT}&text=hi"))
}

/// Polls `f` until it is true or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

/// What one load thread saw.
#[derive(Default)]
struct LoadReport {
    ok: usize,
    /// Up to 20 descriptions of failed requests, and their number.
    failures: Vec<String>,
    failed: usize,
    /// `X-Tollgate-Cost` → how many answers carried it.
    costs: HashMap<String, usize>,
}

/// Sends `sendmessage` requests over one keep-alive connection until
/// `stop`, checking every answer.
fn load(url: String, valid_costs: Arc<HashSet<String>>, stop: Arc<AtomicBool>) -> LoadReport {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let mut report = LoadReport::default();
    let fail = |report: &mut LoadReport, what: String| {
        report.failed += 1;
        if report.failures.len() < 20 {
            report.failures.push(what);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let r = match client.get(&url).send() {
            Ok(r) => r,
            Err(e) => {
                fail(&mut report, format!("transport: {e}"));
                continue;
            }
        };
        let status = r.status().as_u16();
        let cost = r
            .headers()
            .get("x-tollgate-cost")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match r.text() {
            Ok(b) => b,
            Err(e) => {
                fail(&mut report, format!("reading the body: {e}"));
                continue;
            }
        };
        let valid_answer = body.starts_with("<?xml")
            && xml_field(&body, "action").as_deref() == Some("sendmessage")
            && xml_field(&body, "statuscode").as_deref() == Some("0");
        match cost {
            Some(c) if status == 200 && valid_answer && valid_costs.contains(&c) => {
                report.ok += 1;
                *report.costs.entry(c).or_default() += 1;
            }
            other => fail(
                &mut report,
                format!("status {status}, cost {other:?}, body {body:?}"),
            ),
        }
    }
    report
}

/// 100 rewrites (half invalid, in place and by rename) plus SIGHUPs and
/// admin reloads, under continuous load: no request fails, every request is
/// priced by exactly one valid version (its cost and the tariff version on
/// its ledger entries agree), and the last valid file ends in force.
#[test]
fn tariff_rewrites_under_load_fail_no_request() {
    let started = Instant::now();
    let sim = Sim::start(&["--no-record"]);
    let accounts = format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{}', anytime: 10000000 }}\n",
        password_hash("abc123"),
        password_hash("secret1"),
    );
    let mut tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: STORE_YAML.to_string(),
            tariffs: valid_tariff(0),
            accounts,
        },
    );
    let tariff_path = tg.dir.path().join("tariffs.yaml");
    std::fs::write(
        tg.dir.path().join("bad-prefixes.csv"),
        "prefix,price\n44,7\n4x,1\n",
    )
    .unwrap();

    // Every valid version: its content hash and its price.
    let valid_count = REWRITES / 2;
    let versions: HashMap<String, i64> = (0..=valid_count)
        .map(|k| {
            (
                version_of(&valid_tariff(k), &tariff_path),
                valid_price_milli(k),
            )
        })
        .collect();
    assert_eq!(versions.len(), valid_count + 1, "versions are distinct");
    let valid_costs: Arc<HashSet<String>> = Arc::new(
        (0..=valid_count)
            .map(|k| format_credits(valid_price_milli(k)))
            .collect(),
    );
    assert_eq!(quote(&tg)["total"], "1");

    let stop = Arc::new(AtomicBool::new(false));
    let url = tg.url(&format!(
        "/api?action=sendmessage&username=john&password=secret1&recipient={RECIPIENT}&messagedata=hi"
    ));
    let loaders: Vec<_> = (0..LOAD_THREADS)
        .map(|_| {
            let (url, costs, stop) = (url.clone(), valid_costs.clone(), stop.clone());
            std::thread::spawn(move || load(url, costs, stop))
        })
        .collect();

    let mut valid_written = 0;
    let mut last_valid = String::new();
    let mut admin_statuses = Vec::new();
    for n in 0..REWRITES {
        // Valid and invalid alternate; each kind is written both ways.
        let by_rename = n % 4 >= 2;
        let text = if n % 2 == 0 {
            valid_written += 1;
            last_valid = valid_tariff(valid_written);
            last_valid.clone()
        } else {
            invalid_tariff(n / 2)
        };
        rewrite(&tariff_path, &text, by_rename, n);
        if n % 10 == 3 {
            sighup(&tg);
        }
        if n % 10 == 8 {
            admin_statuses.push(admin_reload(&tg).0);
        }
        std::thread::sleep(REWRITE_PAUSE);
    }
    assert_eq!(valid_written, valid_count);
    // The last rewrite was invalid: the last valid file must stay in force.
    let expected_version = version_of(&last_valid, &tariff_path);
    let expected_total = format_credits(valid_price_milli(valid_count));
    let settled = wait_until(Duration::from_secs(10), || {
        let q = quote(&tg);
        q["tariff_version"] == expected_version.as_str() && q["total"] == expected_total.as_str()
    });
    assert!(
        settled,
        "final snapshot is not the last valid file: {}",
        quote(&tg)
    );
    // Past the debounce of the last (invalid) rewrite: still in force.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(quote(&tg)["tariff_version"], expected_version.as_str());
    assert_eq!(
        tg.metric(&format!(
            "tollgate_tariff_info{{version=\"{expected_version}\"}}"
        )),
        Some(1.0)
    );

    stop.store(true, Ordering::Relaxed);
    let mut ok = 0;
    let mut costs: BTreeMap<String, usize> = BTreeMap::new();
    for loader in loaders {
        let r = loader.join().expect("a load thread panicked");
        assert_eq!(
            r.failed, 0,
            "{} failed requests, e.g. {:#?}",
            r.failed, r.failures
        );
        assert!(r.ok > 0, "a load thread sent nothing");
        ok += r.ok;
        for (c, n) in r.costs {
            *costs.entry(c).or_default() += n;
        }
    }
    // The reloads really happened while traffic flowed.
    let (reloads_ok, reloads_error) = (reloads(&tg, "ok"), reloads(&tg, "error"));
    assert!(
        reloads_ok >= 25.0 && reloads_error >= 25.0,
        "reloads ok {reloads_ok}, error {reloads_error}"
    );
    assert!(
        costs.len() >= 10,
        "too few versions priced traffic: {costs:?}"
    );
    assert!(
        admin_statuses.iter().all(|s| *s == 200 || *s == 422),
        "{admin_statuses:?}"
    );

    // Every rejected file was logged with its file, line and key.
    let log = tg.log();
    let rejections: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tariff reload rejected"))
        .collect();
    for expected in [
        "tariffs.yaml: unknown field `bogus_key`",
        "bad-prefixes.csv:3: prefix \"4x\"",
        "tariffs.yaml: prices.\"44\": ",
        "tariffs.yaml: offpeak.timezone: ",
    ] {
        assert!(
            rejections.iter().any(|l| l.contains(expected)),
            "no rejection names {expected:?}: {rejections:#?}"
        );
    }
    assert!(log.contains("trigger=\"sighup\"") || log.contains("trigger=sighup"));

    // The ledger agrees: every send's entries carry one valid version, and
    // the amount is that version's price.
    let status = tg.stop_with("TERM");
    assert!(status.success(), "tollgate exited with {status}");
    let out = tg.cli(&["ledger", "export", "--format", "jsonl"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut reserves = 0;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        if e["account"] != "john" || e["kind"] == "add" {
            continue;
        }
        let version = e["tariff_version"].as_str().unwrap_or_default();
        let Some(price) = versions.get(version) else {
            panic!("entry priced by no valid version: {e}");
        };
        let amount = e["amount_milli"].as_i64().unwrap();
        match e["kind"].as_str() {
            Some("reserve") => {
                reserves += 1;
                assert_eq!(amount, *price, "{e}");
            }
            Some("post") => assert_eq!(amount, -price, "{e}"),
            _ => panic!("unexpected entry {e}"),
        }
    }
    assert_eq!(reserves, ok, "one reservation per answered send");
    eprintln!(
        "{ok} sends over {LOAD_THREADS} connections, {} versions seen, reloads ok {reloads_ok} error {reloads_error}, {:?}",
        costs.len(),
        started.elapsed()
    );
}

#[test]
fn sighup_reloads_and_does_not_kill() {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(sim.addr, TollgateOptions::default());
    for round in 1..=3 {
        let before = reloads(&tg, "ok");
        sighup(&tg);
        assert!(
            wait_until(Duration::from_secs(10), || reloads(&tg, "ok") > before),
            "SIGHUP {round} did not reload; log:\n{}",
            tg.log()
        );
    }
    // Still serving on both listeners.
    assert_eq!(tg.balance("john", "secret1"), "744");
    assert_eq!(reloads(&tg, "error"), 0.0);
    assert!(tg.log().contains("sighup"), "{}", tg.log());

    // An invalid file on SIGHUP is rejected and the old tariff stays.
    let path = tg.dir.path().join("tariffs.yaml");
    let before_version = quote(&tg)["tariff_version"].clone();
    std::fs::write(&path, "default_price: 1\nmax_parts: 0\n").unwrap();
    sighup(&tg);
    assert!(wait_until(Duration::from_secs(10), || reloads(
        &tg, "error"
    ) >= 1.0));
    assert_eq!(quote(&tg)["tariff_version"], before_version);
    assert!(
        tg.log().contains("max_parts: 0 is not valid"),
        "{}",
        tg.log()
    );
    assert_eq!(tg.balance("john", "secret1"), "744");
}

/// A `SIGHUP` while tollgate is still starting (restoring a big store takes
/// seconds) neither ends the process nor is lost.
#[test]
fn sighup_during_startup_neither_kills_nor_is_lost() {
    let sim = Sim::start(&[]);
    let mut tg = Tollgate::start(sim.addr, TollgateOptions::default());
    tg.kill();
    // A small configuration starts in milliseconds: try until a signal
    // lands between the first log line and the listeners.
    for _attempt in 0..20 {
        std::fs::write(tg.log_path(), "").unwrap();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(tg.log_path())
            .unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["run", "-c"])
            .arg(tg.config_path())
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // The handler is in place before the first log line.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tg.log().contains("starting") {
            assert!(Instant::now() < deadline, "no start: {}", tg.log());
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut hups = 0;
        while std::net::TcpStream::connect(tg.admin).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "a SIGHUP while starting ended tollgate; log:\n{}",
                tg.log()
            );
            let sent = std::process::Command::new("kill")
                .arg("-HUP")
                .arg(child.id().to_string())
                .status()
                .unwrap();
            assert!(sent.success());
            hups += 1;
        }
        if hups == 0 {
            child.kill().unwrap();
            child.wait().unwrap();
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "{}", tg.log());
        // Still serving, and the reload the signals asked for ran.
        assert_eq!(tg.balance("john", "secret1"), "744");
        assert!(
            wait_until(Duration::from_secs(10), || reloads(&tg, "ok") >= 1.0),
            "{}",
            tg.log()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        return;
    }
    panic!("tollgate always started before a SIGHUP could be sent");
}

/// The prefixes file may live in another directory than the YAML; editing
/// it (either way) reloads as editing the YAML does.
#[test]
fn a_changed_prefixes_file_is_watched_too() {
    let sim = Sim::start(&[]);
    let prefix_dir = tempfile::tempdir().unwrap();
    let csv = prefix_dir.path().join("prefixes.csv");
    std::fs::write(&csv, "prefix,price\n44,2\n").unwrap();
    let tariffs = format!(
        "default_country_code: \"36\"\ndefault_price: 1\nprefixes_file: {}\n",
        csv.display()
    );
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            tariffs,
            ..Default::default()
        },
    );
    assert_eq!(quote(&tg)["price_per_part"], "2");
    // In place.
    std::fs::write(&csv, "prefix,price\n44,3\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || quote(&tg)["price_per_part"]
            == "3"),
        "{}",
        tg.log()
    );
    // By rename.
    let tmp = prefix_dir.path().join("prefixes.csv.new");
    std::fs::write(&tmp, "prefix,price\n44,4.5\n").unwrap();
    std::fs::rename(&tmp, &csv).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || quote(&tg)["price_per_part"]
            == "4.5"),
        "{}",
        tg.log()
    );
    // A bad line is rejected with its file and line; 4.5 stays.
    std::fs::write(&csv, "prefix,price\n44,4\n44,5\n").unwrap();
    assert!(wait_until(Duration::from_secs(10), || reloads(
        &tg, "error"
    ) >= 1.0));
    assert_eq!(quote(&tg)["price_per_part"], "4.5");
    assert!(tg.log().contains("prefixes.csv:3:"), "{}", tg.log());

    // The configuration file is watched too (its `limits:` reload with
    // the tariff): saving it triggers a reload.
    let before = reloads(&tg, "ok") + reloads(&tg, "error");
    let config = std::fs::read(tg.config_path()).unwrap();
    let tmp = tg.dir.path().join("tollgate.yaml.new");
    std::fs::write(&tmp, config).unwrap();
    std::fs::rename(&tmp, tg.config_path()).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || reloads(&tg, "ok")
            + reloads(&tg, "error")
            > before),
        "{}",
        tg.log()
    );
}

/// SPEC 5.1a: the mode is part of the hot-reloaded snapshot, so an operator
/// can switch to the passthrough bypass (and back) without a restart.
#[test]
fn a_reload_switches_the_mode_without_a_restart() {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: "mode: enforce".into(),
            ..Default::default()
        },
    );
    let getcredits = "/api?action=getcredits&username=john&password=secret1";
    assert_eq!(get(&tg.url(getcredits)).0, 200);
    assert!(
        sim.requests().is_empty(),
        "enforce answers credit actions itself"
    );

    let config = std::fs::read_to_string(tg.config_path()).unwrap();
    std::fs::write(
        tg.config_path(),
        config.replace("mode: enforce", "mode: passthrough"),
    )
    .unwrap();
    assert_eq!(admin_reload(&tg).0, 200);
    assert_eq!(get(&tg.url(getcredits)).0, 200);
    assert_eq!(
        sim.requests().len(),
        1,
        "passthrough forwards credit actions"
    );

    std::fs::write(tg.config_path(), config).unwrap();
    assert_eq!(admin_reload(&tg).0, 200);
    sim.reset();
    assert_eq!(get(&tg.url(getcredits)).0, 200);
    assert!(sim.requests().is_empty(), "back to enforce");
}

/// Switching to the passthrough bypass by reload leaves a send that is in
/// flight at the moment of the switch settled by its own answer: charged
/// for what the gateway accepted, nothing in doubt.
#[test]
fn a_reload_to_passthrough_settles_the_sends_in_flight() {
    let sim = Sim::start(&[]);
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: "mode: enforce".into(),
            ..Default::default()
        },
    );
    let before = tg.balance("john", "secret1");
    let r = client()
        .post(sim.url("/sim/fault?mode=delay&ms=1500&count=1"))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    let url = tg.url(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi",
    );
    let in_flight = std::thread::spawn(move || get(&url));
    // The send is with the gateway when the mode changes.
    assert!(wait_until(Duration::from_secs(5), || sim
        .sendmessage_count()
        == 1));
    let config = std::fs::read_to_string(tg.config_path()).unwrap();
    std::fs::write(
        tg.config_path(),
        config.replace("mode: enforce", "mode: passthrough"),
    )
    .unwrap();
    assert_eq!(admin_reload(&tg).0, 200);
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<statuscode>0</statuscode>"), "{body}");
    let in_doubt = tg.admin_get("/admin/reservations?state=in_doubt");
    assert_eq!(
        in_doubt["reservations"],
        serde_json::json!([]),
        "{in_doubt}"
    );
    // Back to enforce to read tollgate's own ledger: charged once (1 credit).
    std::fs::write(tg.config_path(), config).unwrap();
    assert_eq!(admin_reload(&tg).0, 200);
    let after = tg.balance("john", "secret1");
    assert_eq!(
        before.parse::<f64>().unwrap() - after.parse::<f64>().unwrap(),
        1.0,
        "{before} -> {after}"
    );
}
