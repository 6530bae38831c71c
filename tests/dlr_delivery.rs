//! `charge_on: delivery` over real TCP: the real `tollgate` binary in front
//! of `ozeki-sim`, which calls tollgate's `reporturl` back like the
//! gateway. The accept answer charges nothing: each accepted share (each
//! part of it) stays reserved as a delivery hold until its report posts
//! (delivered) or voids (failed, expired, rejected) it. After each test
//! `tollgate ledger verify` must be clean.
//!
//! The timeout default (`dlr.on_timeout`, both ways) is tested with the
//! injected clock in `src/dlr/prop_tests.rs`: `dlr.timeout_s` is at least
//! 60 s, too long for a test over TCP.

mod common;

use std::time::Duration;

use common::*;

/// Every recipient costs 1 credit per part (prefix 36), +3620 costs 2.
struct Setup {
    sim: Sim,
    tg: Tollgate,
    dlr_port: u16,
}

fn start(sim_args: &[&str], extra_dlr: &str) -> Setup {
    start_on(sim_args, STORE_YAML, extra_dlr)
}

fn start_on(sim_args: &[&str], store_yaml: &str, extra_dlr: &str) -> Setup {
    let sim = Sim::start(sim_args);
    let dlr_port = free_port();
    let yaml = format!(
        "{store_yaml}\
         dlr: {{ enabled: true, listen: 127.0.0.1:{dlr_port}, request: always, charge_on: {{ default: delivery }}{extra_dlr} }}\n\
         outbox: {{ retry_initial_ms: 50, retry_max_ms: 200 }}\n"
    );
    let tg = Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: yaml,
            ..Default::default()
        },
    );
    wait_until(
        || std::net::TcpStream::connect(("127.0.0.1", dlr_port)).is_ok(),
        "the dlr listener",
    );
    Setup { sim, tg, dlr_port }
}

fn wait_for_dlr(port: u16) {
    wait_until(
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the dlr listener",
    );
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn sim_post(sim: &Sim, path_and_query: &str) {
    let r = client().post(sim.url(path_and_query)).send().unwrap();
    assert!(r.status().is_success(), "{path_and_query}");
}

fn send(tg: &Tollgate, recipients: &str, text: &str) -> String {
    let q = format!(
        "/api?action=sendmessage&username=john&password=secret1&originator=ACME&recipient={}&messagedata={}",
        enc(recipients),
        enc(text)
    );
    let (status, body) = get(&tg.url(&q));
    assert_eq!(status, 200, "{body}");
    body
}

/// What `getcredits` shows: the spendable (available) any-time balance.
fn balance(tg: &Tollgate) -> f64 {
    tg.balance("john", "secret1").parse().unwrap()
}

/// The any-time bucket's (posted, reserved) from the admin API.
fn bucket(tg: &Tollgate) -> (f64, f64) {
    let a = tg.admin_get("/admin/accounts/john");
    let n = |k: &str| a["anytime"][k].as_str().unwrap().parse::<f64>().unwrap();
    (n("posted"), n("reserved"))
}

fn holds_listed(tg: &Tollgate) -> usize {
    tg.admin_get("/admin/reservations?state=delivery")["reservations"]
        .as_array()
        .unwrap()
        .len()
}

fn resolved(tg: &Tollgate, result: &str) -> f64 {
    tg.metric_value(&format!(
        "tollgate_dlr_holds_resolved_total{{cause=\"report\",result=\"{result}\"}}"
    ))
}

fn verify_clean(tg: &Tollgate) {
    let out = tg.cli(&["ledger", "verify"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ledger verify:\n{text}");
}

fn sim_calls(sim: &Sim) -> Vec<serde_json::Value> {
    client()
        .get(sim.url("/sim/dlr"))
        .send()
        .unwrap()
        .json::<serde_json::Value>()
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The stored journal's (post, void) entries of delivery holds.
fn hold_entries(tg: &Tollgate) -> (usize, usize) {
    use tollgate::store::Store;
    let mut store = tollgate::store::SqliteStore::open_existing(&tg.store_path()).unwrap();
    let (mut posts, mut voids) = (0, 0);
    store
        .for_each_entry(&mut |e| {
            let hold = e
                .reference
                .as_deref()
                .is_some_and(|r| r.starts_with("delivery:"));
            match e.kind {
                tollgate::ledger::EntryKind::Post if hold => posts += 1,
                tollgate::ledger::EntryKind::Void if hold => voids += 1,
                _ => {}
            }
            Ok(())
        })
        .unwrap();
    (posts, voids)
}

/// The token of the last send's callback URL (as forwarded to the sim).
#[test]
fn each_outcome_posts_or_releases_its_share_and_nothing_is_charged_on_accept() {
    let s = start(&["--reject-prefix", "3680"], "");
    sim_post(&s.sim, "/sim/dlr?prefix=3620&outcome=delivered");
    sim_post(&s.sim, "/sim/dlr?prefix=3630&outcome=failed");
    sim_post(&s.sim, "/sim/dlr?prefix=3631&outcome=expired");
    sim_post(&s.sim, "/sim/dlr?prefix=3670&outcome=rejected");
    sim_post(&s.sim, "/sim/dlr?prefix=3699&outcome=never");
    // Reports wait until the state before them is checked.
    sim_post(&s.sim, "/sim/dlr/hold?on=1");
    let before = balance(&s.tg);
    let (posted0, reserved0) = bucket(&s.tg);
    assert_eq!(reserved0, 0.0);
    send(
        &s.tg,
        "+36201111111,+36301111111,+36311111111,+36701111111,+36801111111,+36991111111",
        "hi",
    );
    // The answer charged nothing; the rejected-at-accept recipient was
    // released at once; the other five shares (2+1+1+1+1) are held.
    assert_eq!(bucket(&s.tg), (posted0, 6.0));
    assert_eq!(balance(&s.tg), before - 6.0, "held credit is not spendable");
    assert_eq!(holds_listed(&s.tg), 5);
    assert_eq!(
        s.tg.metric_value("tollgate_reservations_held_milli{state=\"delivery\"}"),
        6000.0
    );
    sim_post(&s.sim, "/sim/dlr/hold?on=0");
    wait_until(
        || resolved(&s.tg, "charged") == 1.0 && resolved(&s.tg, "released") == 3.0,
        "four reports settled",
    );
    // Delivered charged; failed, expired, rejected released; the silent
    // one still held, waiting for dlr.timeout_s.
    assert_eq!(bucket(&s.tg), (posted0 - 2.0, 1.0));
    assert_eq!(balance(&s.tg), before - 3.0);
    assert_eq!(holds_listed(&s.tg), 1);
    assert_eq!(hold_entries(&s.tg), (1, 3));
    wait_until(
        || {
            s.tg.metric_value("tollgate_dlr_pending_shares{policy=\"delivery\"}") == 1.0
        },
        "one share pending",
    );
    assert_eq!(s.tg.metric_value("tollgate_dlr_refunds_total"), 0.0);
    // An operator cannot take a hold: its report or the timeout does.
    let id = s.tg.admin_get("/admin/reservations?state=delivery")["reservations"][0]["id"]
        .as_u64()
        .unwrap();
    let r = client()
        .post(s.tg.admin_url(&format!("/admin/reservations/{id}/void")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    verify_clean(&s.tg);
}

#[test]
fn multipart_partial_failure_releases_only_the_failed_part() {
    let s = start(&[], ", keywords: { part: \"$part\" }");
    // Two parts at 2 credits each (+3620): part 2 fails. Two parts at 1
    // credit each (+3630): both delivered, one report each.
    sim_post(
        &s.sim,
        "/sim/dlr?prefix=3620&outcome=delivered,failed&parts=2",
    );
    sim_post(&s.sim, "/sim/dlr?prefix=3630&outcome=delivered&parts=2");
    sim_post(&s.sim, "/sim/dlr/hold?on=1");
    let before = balance(&s.tg);
    let (posted0, _) = bucket(&s.tg);
    send(&s.tg, "+36201111111,+36301111111", &"x".repeat(200));
    assert_eq!(bucket(&s.tg), (posted0, 6.0));
    assert_eq!(holds_listed(&s.tg), 4, "one hold per part");
    sim_post(&s.sim, "/sim/dlr/hold?on=0");
    wait_until(
        || resolved(&s.tg, "charged") == 3.0 && resolved(&s.tg, "released") == 1.0,
        "every part settled",
    );
    assert_eq!(bucket(&s.tg), (posted0 - 4.0, 0.0));
    assert_eq!(balance(&s.tg), before - 4.0);
    assert_eq!(holds_listed(&s.tg), 0);
    verify_clean(&s.tg);
}

#[test]
fn duplicate_early_out_of_order_and_late_reports_move_nothing_twice() {
    let s = start(&[], "");
    sim_post(
        &s.sim,
        "/sim/dlr?prefix=3630&outcome=delivered&duplicates=3",
    );
    sim_post(&s.sim, "/sim/dlr?prefix=3631&outcome=failed&duplicates=3");
    sim_post(&s.sim, "/sim/dlr/mode?reverse=1&early=1");
    let before = balance(&s.tg);
    let (posted0, _) = bucket(&s.tg);
    send(&s.tg, "+36301111111,+36311111111", "hi");
    wait_until(|| sim_calls(&s.sim).len() == 8, "all eight calls made");
    wait_until(
        || resolved(&s.tg, "charged") == 1.0 && resolved(&s.tg, "released") == 1.0,
        "both shares settled",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        resolved(&s.tg, "charged"),
        1.0,
        "duplicates charged nothing"
    );
    assert_eq!(resolved(&s.tg, "released"), 1.0);
    assert_eq!(bucket(&s.tg), (posted0 - 1.0, 0.0));
    assert_eq!(balance(&s.tg), before - 1.0);
    assert_eq!(hold_entries(&s.tg).0, 1);
    // Late: the send is closed; a replayed report is an unknown token.
    let url = sim_calls(&s.sim)[0]["url"].as_str().unwrap().to_string();
    wait_until(|| get(&url).0 == 404, "the closed token is unknown");
    let base = format!("http://127.0.0.1:{}", s.dlr_port);
    let late = format!(
        "{base}/dlr/{}?messageid=x&recipient=%2B36311111111&deliverystatus=delivered",
        &url.split("/dlr/").nth(1).unwrap()[..32]
    );
    assert_eq!(get(&late).0, 404);
    assert_eq!(balance(&s.tg), before - 1.0);
    verify_clean(&s.tg);
}

#[test]
fn kill_9_with_pending_delivery_shares_keeps_them_reserved_and_settles_once() {
    let s = start(&[], "");
    let mut tg = s.tg;
    // No report comes by itself: tollgate is killed with both shares held.
    sim_post(&s.sim, "/sim/dlr?prefix=36&outcome=never");
    let before = balance(&tg);
    let (posted0, _) = bucket(&tg);
    send(&tg, "+36301111111,+36201111111", "hi");
    let token = last_dlr_token(&s.sim);
    assert_eq!(bucket(&tg), (posted0, 3.0));
    tg.stop_with("KILL");
    tg.spawn();
    wait_for_dlr(s.dlr_port);
    // After the restart: still reserved, still listed as delivery holds
    // (not in doubt), nothing posted.
    assert_eq!(bucket(&tg), (posted0, 3.0));
    assert_eq!(balance(&tg), before - 3.0);
    assert_eq!(holds_listed(&tg), 2);
    assert!(
        tg.admin_get("/admin/reservations?state=in_doubt")["reservations"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    verify_clean(&tg);
    // The reports then settle them, once.
    let base = format!("http://127.0.0.1:{}", s.dlr_port);
    let report = |to: &str, status: &str| {
        get(&format!(
            "{base}/dlr/{token}?messageid=m{}&recipient={}&deliverystatus={status}",
            &to[1..],
            enc(to)
        ))
    };
    assert_eq!(report("+36301111111", "delivered"), (200, "OK\n".into()));
    assert_eq!(report("+36301111111", "delivered").1, "duplicate\n");
    assert_eq!(report("+36201111111", "undelivered").0, 200);
    assert_eq!(bucket(&tg), (posted0 - 1.0, 0.0));
    assert_eq!(balance(&tg), before - 1.0);
    // Another kill -9: nothing is posted or released again.
    tg.stop_with("KILL");
    tg.spawn();
    wait_for_dlr(s.dlr_port);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(bucket(&tg), (posted0 - 1.0, 0.0));
    assert_eq!(holds_listed(&tg), 0);
    assert_eq!(report("+36301111111", "delivered").0, 404);
    assert_eq!(hold_entries(&tg), (1, 1));
    verify_clean(&tg);
}

#[test]
fn on_postgres_pending_delivery_shares_survive_kill_9() {
    let db = common::pg::TestDb::create("dlr_delivery");
    let s = start_on(&[], &common::pg::store_yaml(&db.url(), ""), "");
    let mut tg = s.tg;
    sim_post(&s.sim, "/sim/dlr?prefix=36&outcome=never");
    let before = balance(&tg);
    send(&tg, "+36301111111", "hi");
    let token = last_dlr_token(&s.sim);
    tg.stop_with("KILL");
    tg.spawn();
    wait_for_dlr(s.dlr_port);
    assert_eq!(balance(&tg), before - 1.0);
    assert_eq!(holds_listed(&tg), 1);
    let url = format!(
        "http://127.0.0.1:{}/dlr/{token}?messageid=x&recipient=%2B36301111111&deliverystatus=expired",
        s.dlr_port
    );
    assert_eq!(get(&url).0, 200);
    assert_eq!(balance(&tg), before, "expired: released");
    assert_eq!(holds_listed(&tg), 0);
    verify_clean(&tg);
}

#[test]
fn kill_9_with_reports_in_flight_posts_each_hold_at_most_once() {
    let s = start(&[], "");
    let mut tg = s.tg;
    // Reports trickle in while tollgate is killed and restarted; the sim
    // retries what tollgate did not answer.
    sim_post(&s.sim, "/sim/dlr?prefix=36&outcome=delivered&delay_ms=150");
    let before = balance(&tg);
    let (posted0, _) = bucket(&tg);
    let recipients: Vec<String> = (0..8).map(|i| format!("+3630111111{i}")).collect();
    send(&tg, &recipients.join(","), "hi");
    std::thread::sleep(Duration::from_millis(500));
    tg.stop_with("KILL");
    std::thread::sleep(Duration::from_millis(150));
    tg.spawn();
    wait_for_dlr(s.dlr_port);
    wait_until(
        || sim_calls(&s.sim).len() >= 8,
        "every report called (some retried)",
    );
    std::thread::sleep(Duration::from_millis(500));
    let acknowledged = sim_calls(&s.sim)
        .iter()
        .filter(|c| c["status"] == 200)
        .count();
    let (posts, voids) = hold_entries(&tg);
    // An acknowledged report was posted exactly once; one whose callbacks
    // all failed (tollgate down) at most once; the rest stay held.
    assert!(
        (acknowledged..=8).contains(&posts),
        "{posts} posts for {acknowledged} acknowledged reports"
    );
    assert_eq!(voids, 0);
    assert_eq!(bucket(&tg), (posted0 - posts as f64, (8 - posts) as f64));
    assert_eq!(
        balance(&tg),
        before - 8.0,
        "posted or held: never spendable"
    );
    assert_eq!(holds_listed(&tg), 8 - posts);
    verify_clean(&tg);
}
