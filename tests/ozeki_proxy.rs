//! Integration tests of the Ozeki front door over real TCP: the real
//! `tollgate` binary in front of the real `ozeki-sim`, asserting both what
//! the client got and what the gateway received.

mod common;

use common::*;

#[test]
fn credit_actions_are_answered_locally_and_never_forwarded() {
    let (sim, tg) = start_pair(&[], "");
    let (status, body) = get(&tg.url("/api?action=getcredits&username=john&password=secret1"));
    assert_eq!(status, 200);
    assert!(
        body.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE smsapi"),
        "{body}"
    );
    assert_eq!(xml_field(&body, "action").as_deref(), Some("getcredits"));
    assert_eq!(xml_field(&body, "username").as_deref(), Some("john"));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("744"));

    // An admin reads anyone; a user only itself.
    let (_, body) =
        get(&tg.url("/api?action=getcredits&username=admin&password=abc123&useraccount=john"));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("744"));
    let (_, body) =
        get(&tg.url("/api?action=getcredits&username=john&password=secret1&useraccount=admin"));
    assert_eq!(
        xml_field(&body, "errorcode").as_deref(),
        Some("1004"),
        "{body}"
    );

    // Wrong password, unknown user: the same auth_failed answer.
    let (_, wrong) = get(&tg.url("/api?action=getcredits&username=john&password=nope"));
    let (_, unknown) = get(&tg.url("/api?action=getcredits&username=nobody&password=nope"));
    assert_eq!(xml_field(&wrong, "errorcode").as_deref(), Some("1003"));
    assert_eq!(wrong, unknown);

    // addcredits / setcredits: admin only, integers, echo names.
    let (_, body) =
        get(&tg
            .url("/api?action=addcredits&username=admin&password=abc123&useraccount=john&add=10"));
    assert_eq!(xml_field(&body, "action").as_deref(), Some("addcredits"));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("754"));
    let (_, body) =
        get(&tg
            .url("/api?action=addcredits&username=admin&password=abc123&useraccount=john&add=-4"));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("750"));
    let (_, body) = get(&tg.url("/api?action=addcredits&username=john&password=secret1&add=1000"));
    assert_eq!(xml_field(&body, "errorcode").as_deref(), Some("1004"));
    let (_, body) =
        get(&tg
            .url("/api?action=addcredits&username=admin&password=abc123&useraccount=john&add=1.5"));
    assert_eq!(xml_field(&body, "errorcode").as_deref(), Some("1006"));
    let (_, body) = get(&tg.url(
        "/api?action=setcredits&username=admin&password=abc123&useraccount=john&newbalance=5",
    ));
    assert_eq!(xml_field(&body, "action").as_deref(), Some("setcredits"));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("5"));
    let (_, body) = get(&tg
        .url("/api?action=setcredits&username=admin&password=abc123&useraccount=john&newbalance="));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("5"));
    // useraccount absent: the caller's own account.
    let (_, body) = get(&tg.url("/api?action=addcredits&username=admin&password=abc123&add=1"));
    assert_eq!(xml_field(&body, "username").as_deref(), Some("admin"));
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("1001"));
    // Over-long credentials are invalid_request.
    let (_, body) = get(&tg.url("/api?action=getcredits&username=aaaaaaaaaaaaaaaaa&password=x"));
    assert_eq!(xml_field(&body, "errorcode").as_deref(), Some("1006"));

    assert!(
        sim.requests().is_empty(),
        "credit actions reached the gateway"
    );
}

#[test]
fn a_send_is_charged_forwarded_byte_for_byte_and_relayed_unchanged() {
    let (sim, tg) = start_pair(&[], "");
    let query = "/api?action=sendMessage&userName=john&password=secret1&recepient=%2B36301234567&messageType=SMS:TEXT&messageData=Hello+world";
    let r = client().get(tg.url(query)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-cost"], "1");
    assert_eq!(r.headers()["server"], "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0");
    let body = r.text().unwrap();
    assert_eq!(
        xml_field(&body, "statuscode").as_deref(),
        Some("0"),
        "{body}"
    );
    assert_eq!(
        xml_field(&body, "recipient").as_deref(),
        Some("+36301234567")
    );
    assert_eq!(xml_field(&body, "messageid").map(|m| m.len()), Some(8));
    assert_eq!(tg.balance("john", "secret1"), "743");

    let seen = sim.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["method"], "GET");
    assert_eq!(seen[0]["path"], "/api");
    assert_eq!(
        seen[0]["query"].as_str().unwrap(),
        query.split_once('?').unwrap().1
    );
    assert_eq!(seen[0]["headers"]["x-forwarded-for"], "127.0.0.1");
}

#[test]
fn every_recipient_and_part_is_priced_and_settled_per_acceptreport() {
    // 3699… numbers are rejected by the gateway, and voided.
    let (sim, tg) = start_pair(&["--reject-prefix", "3699"], "");
    // Three recipients: 36 (1/part), 3620 (2/part), 3699 (1/part, rejected);
    // a 161-character GSM text is 2 parts.
    let text = "a".repeat(161);
    let form = format!(
        "action=sendmessage&username=john&password=secret1&recipient=%2B36301111111,%2B36201111111;%2B36991111111&messagedata={text}"
    );
    let (status, headers, body) = post_form(&tg.url("/api"), form.clone());
    assert_eq!(status, 200);
    // Reserved 8 (2×1 + 2×2 + 2×1); the rejected recipient's 2 voided:
    // the header says what was charged after settlement.
    assert_eq!(headers["x-tollgate-cost"], "6");
    assert!(!headers.contains_key("x-tollgate-held"));
    assert_eq!(xml_all(&body, "statuscode"), vec!["0", "0", "11"]);
    // Posted 6, the rejected recipient's 2 voided.
    assert_eq!(tg.balance("john", "secret1"), "738");
    let seen = sim.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["body"].as_str().unwrap(), form);
}

#[test]
fn batch_posts_are_priced_per_message_and_settled_by_index() {
    let (sim, tg) = start_pair(&["--reject-prefix", "3699"], "");
    let form = "action=sendmessage&username=john&password=secret1&messagecount=3\
        &recipient0=%2B36301111111&messagedata0=one\
        &recipient1=%2B36991111111&messagedata1=two\
        &recipient2=%2B44201111111&messagetype2=SMS:TEXT&messagedata2=three";
    let (status, headers, body) = post_form(&tg.url("/api"), form);
    assert_eq!(status, 200);
    assert_eq!(headers["x-tollgate-cost"], "4"); // 1 + 3; the rejected 1 voided
    assert_eq!(
        xml_field(&body, "statuscode1").as_deref(),
        Some("11"),
        "{body}"
    );
    assert_eq!(tg.balance("john", "secret1"), "740"); // 1 + 3 posted
    assert_eq!(sim.sendmessage_count(), 1);
}

#[test]
fn html_answers_are_settled_too() {
    let (_sim, tg) = start_pair(&["--reject-prefix", "3699"], "");
    let (status, body) = get(&tg.url(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111,%2B36991111111&messagedata=hi&responseformat=html",
    ));
    assert_eq!(status, 200);
    assert!(
        body.contains("Status code: 0") && body.contains("Status code: 11"),
        "{body}"
    );
    assert_eq!(tg.balance("john", "secret1"), "743");
}

#[test]
fn insufficient_credit_is_refused_locally_and_never_reaches_the_gateway() {
    let (sim, tg) = start_pair(&[], "");
    let (status, body) = get(&tg.url(
        "/api?action=sendmessage&username=poor&password=poor1&recipient=%2B36301111111,%2B36302222222&messagedata=hi",
    ));
    assert_eq!(status, 200);
    assert_eq!(xml_all(&body, "statuscode"), vec!["1001", "1001"], "{body}");
    assert!(xml_field(&body, "statusmessage")
        .unwrap()
        .to_lowercase()
        .contains("insufficient"));
    assert_eq!(
        xml_all(&body, "recipient"),
        vec!["+36301111111", "+36302222222"]
    );
    // All-or-nothing: john can pay for one of two 3-credit messages, not both.
    get(&tg.url(
        "/api?action=setcredits&username=admin&password=abc123&useraccount=john&newbalance=4",
    ));
    let (_, body) = get(&tg.url(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B44201111111,%2B44202222222&messagedata=hi",
    ));
    assert_eq!(xml_all(&body, "statuscode"), vec!["1001", "1001"], "{body}");
    assert_eq!(tg.balance("john", "secret1"), "4");
    // Wrong credentials: refused, not forwarded (auth.unknown_accounts: reject).
    let (_, body) = get(&tg.url("/api?action=sendmessage&username=john&password=bad&recipient=%2B36301111111&messagedata=hi"));
    assert_eq!(xml_field(&body, "statuscode").as_deref(), Some("1003"));
    assert!(sim.requests().is_empty());
}

#[test]
fn charset_parameter_decides_the_encoding_and_the_price() {
    let (_sim, tg) = start_pair(&[], "");
    // 71 × "ő" (0xF5 in ISO-8859-2) is UCS-2: 2 parts.
    let text = "%F5".repeat(71);
    let r = client()
        .get(tg.url(&format!(
            "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata={text}&_charset_=iso-8859-2"
        )))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-tollgate-cost"], "2");
    // 70 of them fit one part.
    let text = "%F5".repeat(70);
    let r = client()
        .get(tg.url(&format!(
            "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata={text}&_charset_=iso-8859-2"
        )))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-tollgate-cost"], "1");
}

#[test]
fn body_limit_refuses_large_posts_and_forwards_big_ones_intact() {
    let (sim, tg) = start_pair(&[], "");
    // 5 MiB: refused with 413, never forwarded.
    let huge = format!(
        "action=sendmessage&username=john&password=secret1&recipient=1&messagedata={}",
        "a".repeat(5 << 20)
    );
    let (status, _, _) = post_form(&tg.url("/api"), huge);
    assert_eq!(status, 413);
    assert!(sim.requests().is_empty());

    // ~900 KiB batch: forwarded whole, byte for byte.
    get(&tg.url(
        "/api?action=setcredits&username=admin&password=abc123&useraccount=john&newbalance=100000",
    ));
    let n = 5000;
    let mut form = format!("action=sendmessage&username=john&password=secret1&messagecount={n}");
    for i in 0..n {
        form.push_str(&format!(
            "&recipient{i}=%2B3630{i:07}&messagedata{i}={}",
            "x".repeat(150)
        ));
    }
    assert!(
        form.len() > 900 * 1024 && form.len() < 1024 * 1024,
        "{}",
        form.len()
    );
    let (status, headers, _) = post_form(&tg.url("/api"), form.clone());
    assert_eq!(status, 200);
    assert_eq!(headers["x-tollgate-cost"], n.to_string().as_str());
    let seen = sim.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["body_len"].as_u64(), Some(form.len() as u64));
    assert!(seen[0]["body"].as_str().unwrap() == form);
    assert_eq!(tg.balance("admin", "abc123"), "1000");
    assert_eq!(tg.balance("john", "secret1"), (100000 - n).to_string());
}

#[test]
fn gateway_5xx_voids_and_connect_failure_voids() {
    let (sim, tg) = start_pair(&[], "");
    sim.fault("http500", 1);
    let (status, _) = get(&tg.url("/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi"));
    assert_eq!(status, 500, "the gateway's answer is relayed unchanged");
    assert_eq!(tg.balance("john", "secret1"), "744");
    assert!(
        tg.admin_get("/admin/reservations?state=all")["reservations"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Upstream down: nothing written, so nothing charged.
    let dead = free_port();
    let tg2 = Tollgate::start(
        format!("127.0.0.1:{dead}").parse().unwrap(),
        TollgateOptions::default(),
    );
    let (status, body) = get(&tg2.url("/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi"));
    assert_eq!(status, 502);
    assert_eq!(
        xml_field(&body, "errorcode").as_deref(),
        Some("1009"),
        "{body}"
    );
    assert_eq!(tg2.balance("john", "secret1"), "744");
}

#[test]
fn reset_after_write_and_garbage_answers_leave_the_reservation_in_doubt() {
    let (sim, tg) = start_pair(&[], "");
    sim.fault("reset", 1);
    let r = client()
        .get(tg.url("/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi"))
        .send()
        .unwrap();
    assert!(r.status().is_server_error());
    sim.fault("garbage", 1);
    let (status, body) = get(&tg.url("/api?action=sendmessage&username=john&password=secret1&recipient=%2B44201111111&messagedata=hi"));
    assert_eq!(
        (status, body.as_str()),
        (200, "<<garbage"),
        "a garbage answer is still relayed unchanged"
    );

    // Both stay reserved: 744 − 1 − 3.
    assert_eq!(tg.balance("john", "secret1"), "740");
    let in_doubt = tg.admin_get("/admin/reservations?state=in_doubt");
    let list = in_doubt["reservations"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{in_doubt}");
    // The gateway did receive both: never retried.
    assert_eq!(sim.sendmessage_count(), 2);

    // An operator resolves them: one posted, one voided.
    let id0 = list[0]["id"].as_u64().unwrap();
    let id1 = list[1]["id"].as_u64().unwrap();
    let post = client()
        .post(tg.admin_url(&format!("/admin/reservations/{id0}/post")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(post.status(), 200);
    let void = client()
        .post(tg.admin_url(&format!("/admin/reservations/{id1}/void")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(void.status(), 200);
    let again = client()
        .post(tg.admin_url(&format!("/admin/reservations/{id1}/void")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    assert_eq!(again.status(), 409, "a reservation resolves at most once");
    let expected = 744 - list[0]["total"].as_str().unwrap().parse::<i64>().unwrap();
    assert_eq!(tg.balance("john", "secret1"), expected.to_string());
}

#[test]
fn everything_else_is_forwarded_and_relayed_byte_for_byte() {
    let (sim, tg) = start_pair(&[], "");
    for path in [
        "/api?action=receivemessage&username=john&password=secret1",
        "/httpapi?action=reporting&username=john&password=secret1&x=%41%42",
        "/ozeki?action=somethingnew&username=john",
        "/not-ozeki/at/all?q=1",
    ] {
        let direct = client().get(sim.url(path)).send().unwrap();
        let (d_status, d_body) = (direct.status(), direct.bytes().unwrap());
        let via = client().get(tg.url(path)).send().unwrap();
        assert_eq!(via.status(), d_status, "{path}");
        assert_eq!(
            via.headers()["server"],
            "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0"
        );
        assert_eq!(via.bytes().unwrap(), d_body, "{path}");
    }
    // A POST of an action tollgate does not own is forwarded whole.
    let form = format!(
        "action=reporting&username=john&password=secret1&pad={}",
        "z".repeat(300_000)
    );
    let (status, _, _) = post_form(&tg.url("/api"), form.clone());
    assert_eq!(status, 200);
    let seen = sim.requests();
    let last = seen.last().unwrap();
    assert_eq!(last["body_len"].as_u64(), Some(form.len() as u64));
    assert_eq!(tg.balance("john", "secret1"), "744");
}

#[test]
fn invalid_sends_are_refused_without_touching_a_balance() {
    let (sim, tg) = start_pair(&[], "");
    for q in [
        "action=sendmessage&username=john&password=secret1&recipient=&messagedata=hi",
        "action=sendmessage&username=john&password=secret1&recipient=abc&messagedata=hi",
        "action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagetype=SMS:TEXT:GSM7BIT&messagedata=%E2%9C%93",
        "action=sendmessage&username=john&password=secret1&messagecount=2&recipient0=%2B36301111111",
        "action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=%zz",
    ] {
        let (status, body) = get(&tg.url(&format!("/api?{q}")));
        assert_eq!(status, 200, "{q}");
        let code = xml_field(&body, "statuscode").or_else(|| xml_field(&body, "errorcode"));
        assert_eq!(code.as_deref(), Some("1006"), "{q}: {body}");
    }
    assert!(sim.requests().is_empty());
    assert_eq!(tg.balance("john", "secret1"), "744");
}

#[test]
fn concurrent_sends_never_overspend() {
    let (sim, tg) = start_pair(&["--no-record"], "");
    // Credit for exactly 40 one-part messages, 64 parallel clients × 2 tries.
    get(&tg.url(
        "/api?action=setcredits&username=admin&password=abc123&useraccount=john&newbalance=40",
    ));
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..64 {
            s.spawn(|| {
                let c = client();
                for _ in 0..2 {
                    let body = c
                        .get(tg.url("/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi"))
                        .send()
                        .unwrap()
                        .text()
                        .unwrap();
                    if xml_field(&body, "statuscode").as_deref() == Some("0") {
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(accepted.into_inner(), 40);
    assert_eq!(tg.balance("john", "secret1"), "0");
    let stats: serde_json::Value = client()
        .get(sim.url("/sim/stats"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(stats["messages_accepted"], 40);
}

#[test]
fn passthrough_mode_forwards_credit_actions_too() {
    let (sim, tg) = start_pair(&[], "mode: passthrough");
    let (status, body) = get(&tg.url("/api?action=getcredits&username=john&password=secret1"));
    assert_eq!(status, 200);
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("744"));
    assert_eq!(
        sim.requests().len(),
        1,
        "answered by the gateway, not tollgate"
    );
}

/// Issue 12: a send refused after pricing (credit, limits) logged no
/// `cost_milli`; its access line says what it would have cost.
#[test]
fn a_refused_send_logs_what_it_would_have_cost() {
    let (_sim, tg) = start_pair(&[], "");
    let (status, body) = get(&tg.url(
        "/api?action=sendmessage&username=poor&password=poor1&recipient=%2B36201111111&messagedata=hi",
    ));
    assert_eq!(status, 200);
    assert!(body.contains("<statuscode>1001</statuscode>"), "{body}");
    wait_until(
        || {
            tg.log()
                .lines()
                .any(|l| l.contains("outcome=\"insufficient_credit\""))
        },
        "the access line",
    );
    let line = tg
        .log()
        .lines()
        .find(|l| l.contains("tollgate::access") && l.contains("insufficient_credit"))
        .map(str::to_string)
        .unwrap();
    // "3620" costs 2 credits a part.
    assert!(line.contains("cost_milli=2000"), "{line}");
}
