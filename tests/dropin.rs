//! Drop-in authentication (SPEC 5.3) over real TCP: credentials only the
//! gateway knows (`ozeki-sim --user`) are checked once with a `getcredits`
//! call, the account is adopted (balance imported when configured), later
//! requests are answered locally, wrong credentials are cached negatively,
//! and concurrent checks of the same credentials share one gateway call.

mod common;

use common::*;

/// `getcredits` calls the gateway received (tollgate's verifications: it
/// answers clients' own `getcredits` itself).
fn verifications(sim: &Sim) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r["action"].as_str() == Some("getcredits"))
        .count()
}

const DROPIN: &str = "auth: { verify_upstream: true, adopt_balance: true }\n";

#[test]
fn unknown_credentials_are_verified_once_and_the_account_is_adopted_with_its_balance() {
    let (sim, mut tg) = start_pair(
        &["--user", "carol:Carol&Pw 1:250"],
        &format!("{DROPIN}{STORE_YAML}"),
    );
    let creds = "username=carol&password=Carol%26Pw%201";
    let (status, body) = get(&tg.url(&format!("/api?action=getcredits&{creds}")));
    assert_eq!(status, 200);
    assert_eq!(
        xml_field(&body, "balance").as_deref(),
        Some("250"),
        "{body}"
    );
    assert_eq!(verifications(&sim), 1);
    // The verification was a plain Ozeki getcredits with the credentials
    // percent-encoded.
    let req = &sim.requests()[0];
    assert_eq!(req["method"], "GET");
    assert!(
        req["query"]
            .as_str()
            .unwrap()
            .contains("password=Carol%26Pw%201"),
        "{req}"
    );
    // From now on local: a send is priced and charged by tollgate.
    for _ in 0..3 {
        get(&tg.url(&format!("/api?action=getcredits&{creds}")));
    }
    let (_, body) = get(&tg.url(&format!(
        "/api?action=sendmessage&{creds}&recipient=%2B36301111111&messagedata=hi"
    )));
    assert_eq!(
        xml_field(&body, "statuscode").as_deref(),
        Some("0"),
        "{body}"
    );
    assert_eq!(tg.balance("carol", "Carol%26Pw%201"), "249");
    assert_eq!(verifications(&sim), 1, "checked once");
    let account = tg.admin_get("/admin/accounts/carol");
    assert_eq!(account["role"], "user", "{account}");
    assert_eq!(
        tg.metric_value("tollgate_upstream_verifications_total{result=\"verified\"}"),
        1.0
    );

    // After a restart the adopted account and its balance come from the
    // store; the credentials are checked with the gateway once more, and
    // the balance is not imported twice.
    assert!(tg.stop_with("TERM").success());
    tg.spawn();
    assert_eq!(tg.balance("carol", "Carol%26Pw%201"), "249");
    assert_eq!(verifications(&sim), 2);
}

#[test]
fn without_adopt_balance_the_account_starts_empty() {
    let (sim, tg) = start_pair(
        &["--user", "dave:davepw:99"],
        "auth: { verify_upstream: true }\n",
    );
    assert_eq!(tg.balance("dave", "davepw"), "0");
    let (_, body) = get(&tg.url(
        "/api?action=sendmessage&username=dave&password=davepw&recipient=%2B36301111111&messagedata=hi",
    ));
    assert_eq!(
        xml_field(&body, "statuscode").as_deref(),
        Some("1001"),
        "{body}"
    );
    assert_eq!(sim.sendmessage_count(), 0);
}

#[test]
fn wrong_credentials_are_refused_from_a_negative_cache() {
    let (sim, tg) = start_pair(
        &["--user", "carol:right:10"],
        &format!("{DROPIN}limits: {{ auth_lockout: {{ mode: off }} }}\n"),
    );
    for _ in 0..10 {
        let (_, body) = get(&tg.url("/api?action=getcredits&username=carol&password=wrong"));
        assert_eq!(
            xml_field(&body, "errorcode").as_deref(),
            Some("1003"),
            "{body}"
        );
    }
    assert_eq!(
        verifications(&sim),
        1,
        "the same wrong credentials asked once"
    );
    assert_eq!(
        tg.metric_value("tollgate_upstream_verifications_total{result=\"cached_rejection\"}"),
        9.0
    );
    // The right password is still checked (a different MAC).
    assert_eq!(tg.balance("carol", "right"), "10");
    assert_eq!(verifications(&sim), 2);
    // A local account with a wrong password never reaches the gateway.
    get(&tg.url("/api?action=getcredits&username=john&password=wrong"));
    assert_eq!(verifications(&sim), 2);
}

#[test]
fn concurrent_checks_of_the_same_credentials_share_one_gateway_call() {
    let (sim, tg) = start_pair(&["--user", "erin:erinpw:40", "--latency-ms", "300"], DROPIN);
    let url = tg.url("/api?action=getcredits&username=erin&password=erinpw");
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || get(&url))
        })
        .collect();
    for t in threads {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(xml_field(&body, "balance").as_deref(), Some("40"), "{body}");
    }
    assert_eq!(verifications(&sim), 1);
}

#[test]
fn an_unreachable_gateway_is_not_a_wrong_password() {
    // Nothing listens on the upstream port.
    let port = free_port();
    let tg = Tollgate::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        TollgateOptions {
            extra_yaml: DROPIN.to_string(),
            ..Default::default()
        },
    );
    let (_, body) = get(&tg.url("/api?action=getcredits&username=zed&password=zedpw"));
    assert_eq!(
        xml_field(&body, "errorcode").as_deref(),
        Some("1009"),
        "{body}"
    );
    // Local accounts still work.
    assert_eq!(tg.balance("john", "secret1"), "744");
}
