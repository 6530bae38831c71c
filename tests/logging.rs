//! Log lines for shippers and for privacy: `log.format: json` writes one
//! JSON object per line; access lines exist for admin requests too; message
//! text stays out of access lines unless `log.message_text: true`.

mod common;

use common::*;

const TEXT: &str = "Meet-Anna-At-Nine";

fn send_with_text(tg: &Tollgate) {
    let (status, _) = get(&tg.url(&format!(
        "/api?action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata={TEXT}"
    )));
    assert_eq!(status, 200);
}

fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .filter(|v| v["target"] == "tollgate::access")
        .collect()
}

#[test]
fn json_lines_carry_access_lines_for_every_door_and_no_message_text() {
    let (_sim, tg) = start_pair(&[], "log: { format: json }");
    send_with_text(&tg);
    let (status, _) = get(&tg.url("/api?action=getcredits&username=john&password=secret1"));
    assert_eq!(status, 200);
    let account = tg.admin_get("/admin/accounts/john");
    assert!(account.is_object());
    let (status, _) =
        get(&tg.admin_url("/admin/quote?recipient=%2B36301111111&text=Private-Quote-Text"));
    assert_eq!(status, 401, "no token: refused, and still logged");

    let log = wait_until_log(&tg, |log| {
        log.matches("\"front_door\":\"admin\"").count() >= 2
    });
    // Every line is one JSON object (access lines and the rest).
    let access = access_lines(&log);
    let send = access
        .iter()
        .find(|v| v["action"] == "sendmessage")
        .unwrap_or_else(|| panic!("no send access line in\n{log}"));
    assert_eq!(send["outcome"], "settled", "{send}");
    let url = send["url"].as_str().unwrap();
    assert!(
        url.contains(&format!("messagedata=[{} bytes]", TEXT.len())),
        "{url}"
    );
    assert!(url.contains("password=***"), "{url}");
    let admin: Vec<_> = access
        .iter()
        .filter(|v| v["front_door"] == "admin")
        .collect();
    assert!(
        admin
            .iter()
            .any(|v| v["url"] == "/admin/accounts/john" && v["status"] == 200),
        "{admin:?}"
    );
    assert!(
        admin
            .iter()
            .any(|v| v["status"] == 401 && v["url"].as_str().unwrap().contains("text=[18 bytes]")),
        "{admin:?}"
    );
    assert!(!log.contains(TEXT), "message text in the log:\n{log}");
    assert!(
        !log.contains("Private-Quote-Text"),
        "quote text in the log:\n{log}"
    );
    assert!(!log.contains(ADMIN_TOKEN), "admin token in the log");
}

#[test]
fn the_operator_may_keep_message_text_in_access_lines() {
    let (_sim, tg) = start_pair(&[], "log: { message_text: true }");
    send_with_text(&tg);
    let log = wait_until_log(&tg, |log| log.contains(TEXT));
    let line = log
        .lines()
        .find(|l| l.contains("tollgate::access") && l.contains("sendmessage"))
        .unwrap_or_else(|| panic!("no access line in\n{log}"));
    assert!(line.contains(&format!("messagedata={TEXT}")), "{line}");
    assert!(!line.contains("secret1"), "{line}");
}

#[test]
fn an_unknown_log_format_is_a_config_error() {
    let out = check_config("log: { format: xml }");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log") && err.contains("format"), "{err}");
}

/// The log once `ready` holds (access lines are written after the answer).
fn wait_until_log(tg: &Tollgate, ready: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let log = tg.log();
        if ready(&log) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
