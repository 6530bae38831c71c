//! Smoke tests of the real `ozeki-sim` binary over TCP: API actions, answer
//! shapes, control endpoints, fault injection and keep-alive.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use serde_json::Value;

/// A running simulator, killed when dropped.
struct Sim {
    child: Child,
    base: String,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Sim {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ozeki-sim"))
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ozeki-sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read first line");
    let addr = line
        .trim()
        .strip_prefix("ozeki-sim listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    Sim {
        child,
        base: format!("http://{addr}"),
    }
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

impl Sim {
    fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base, path_and_query)
    }

    fn get(&self, path_and_query: &str) -> Response {
        client().get(self.url(path_and_query)).send().unwrap()
    }

    fn post(&self, path_and_query: &str, body: &str) -> Response {
        client()
            .post(self.url(path_and_query))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string())
            .send()
            .unwrap()
    }

    fn text(&self, path_and_query: &str) -> String {
        let r = self.get(path_and_query);
        assert_eq!(r.status(), 200);
        r.text().unwrap()
    }

    fn control(&self, path_and_query: &str) {
        let r = client().post(self.url(path_and_query)).send().unwrap();
        assert_eq!(r.status(), 200, "{path_and_query}");
    }

    fn json(&self, path: &str) -> Value {
        serde_json::from_str(&self.text(path)).unwrap()
    }
}

fn tag_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    xml.match_indices(&open)
        .map(|(i, _)| {
            let rest = &xml[i + open.len()..];
            rest[..rest.find(&close).unwrap()].to_string()
        })
        .collect()
}

fn is_message_id(id: &str) -> bool {
    id.len() == 8
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

const SEND: &str = "/api?action=sendmessage&username=john&password=secret1";

#[test]
fn one_recipient_exact_xml_shape_and_headers() {
    let sim = start(&[]);
    let r = sim.get(&format!(
        "{SEND}&recipient=%2B36201234567&messagetype=SMS:TEXT&messagedata=Hello+world"
    ));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["server"], "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0");
    assert_eq!(r.headers()["content-type"], "application/xml");
    let body = r.text().unwrap();
    let id = tag_values(&body, "messageid").pop().unwrap();
    assert!(is_message_id(&id), "{id}");
    let expected = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
<!DOCTYPE smsapi PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/smsapi.xml\">\n\
<response>\n<action>sendmessage</action>\n<data>\n<acceptreport>\n\
<statuscode>0</statuscode>\n<statusmessage>Message accepted for delivery</statusmessage>\n\
<messageid>{id}</messageid>\n<recipient>+36201234567</recipient>\n\
<messagetype>SMS:TEXT</messagetype>\n<messagedata>Hello world</messagedata>\n\
</acceptreport>\n</data>\n</response>\n"
    );
    assert_eq!(body, expected);
    // The legacy paths, a POST form, mixed-case names and `recepient` work too.
    for path in ["/httpapi", "/ozeki"] {
        let r = sim.post(
            path,
            "Action=sendMessage&UserName=john&Password=secret1&recepient=%2B3620&messageData=x%26y",
        );
        let body = r.text().unwrap();
        assert_eq!(tag_values(&body, "statuscode"), ["0"]);
        assert_eq!(tag_values(&body, "recipient"), ["+3620"]);
        assert_eq!(tag_values(&body, "messagedata"), ["x&amp;y"]);
    }
}

#[test]
fn many_recipients_with_a_reject_prefix_and_stats() {
    let sim = start(&["--reject-prefix", "3699", "--reject-prefix", "+44"]);
    let body = sim.text(&format!(
        "{SEND}&recipient=%2B36201111111,%2B36991234567;36202222222,441234&messagedata=hi"
    ));
    assert_eq!(body.matches("<acceptreport>").count(), 4);
    assert_eq!(tag_values(&body, "statuscode"), ["0", "11", "0", "11"]);
    assert_eq!(
        tag_values(&body, "statusmessage"),
        [
            "Message accepted for delivery",
            "Invalid recipient",
            "Message accepted for delivery",
            "Invalid recipient"
        ]
    );
    let ids = tag_values(&body, "messageid");
    assert!(is_message_id(&ids[0]) && is_message_id(&ids[2]) && ids[0] != ids[2]);
    assert_eq!((ids[1].as_str(), ids[3].as_str()), ("", ""));
    assert_eq!(
        tag_values(&body, "recipient"),
        ["+36201111111", "+36991234567", "36202222222", "441234"]
    );
    let stats = sim.json("/sim/stats");
    assert_eq!(stats["requests"], 1);
    assert_eq!(stats["sendmessage"], 1);
    assert_eq!(stats["messages_accepted"], 2);
    assert_eq!(stats["messages_rejected"], 2);
    // Reset clears log and counters.
    sim.control("/sim/reset");
    let stats = sim.json("/sim/stats");
    assert_eq!(stats["requests"], 0);
    assert_eq!(stats["messages_accepted"], 0);
    assert_eq!(sim.json("/sim/requests"), Value::Array(vec![]));
}

#[test]
fn batch_answers_carry_index_suffixes_and_large_bodies_arrive_whole() {
    let sim = start(&["--reject-prefix", "3699"]);
    let body = sim
        .post(
            "/api",
            "action=sendmessage&username=john&password=secret1&messagecount=2\
             &recipient0=%2B3620111&messagetype0=SMS:TEXT&messagedata0=first\
             &recipient1=%2B3699222&messagetype1=SMS:FLASH&messagedata1=second",
        )
        .text()
        .unwrap();
    assert!(body.contains("<statuscode0>0</statuscode0>\n<statusmessage0>Message accepted for delivery</statusmessage0>\n<messageid0>"));
    assert!(body.contains("</messageid0>\n<recipient0>+3620111</recipient0>\n<messagetype0>SMS:TEXT</messagetype0>\n<messagedata0>first</messagedata0>\n</acceptreport>"));
    assert!(body.contains("<statuscode1>11</statuscode1>\n<statusmessage1>Invalid recipient</statusmessage1>\n<messageid1></messageid1>\n<recipient1>+3699222</recipient1>\n<messagetype1>SMS:FLASH</messagetype1>\n<messagedata1>second</messagedata1>"));

    // ~900 KiB batch POST.
    let n = 2000;
    let text = "x".repeat(440);
    let mut form = format!("action=sendmessage&username=john&password=secret1&messagecount={n}");
    for i in 0..n {
        form.push_str(&format!(
            "&recipient{i}=%2B3630{i:07}&messagedata{i}={text}"
        ));
    }
    assert!(form.len() > 900 * 1024, "{}", form.len());
    let r = sim.post("/api", &form);
    assert_eq!(r.status(), 200);
    let body = r.text().unwrap();
    assert_eq!(body.matches("<acceptreport>").count(), n);
    assert!(body.contains(&format!(
        "<recipient{}>+3630{:07}</recipient{}>",
        n - 1,
        n - 1,
        n - 1
    )));
    let log = sim.json("/sim/requests");
    let last = log.as_array().unwrap().last().unwrap();
    assert_eq!(last["body_len"], form.len());
    assert_eq!(last["body"].as_str().unwrap(), form);
    assert_eq!(last["recipients"], n);
    assert_eq!(last["action"], "sendmessage");
}

#[test]
fn html_response_format() {
    let sim = start(&["--reject-prefix", "3699"]);
    let r = sim.get(&format!(
        "{SEND}&recipient=%2B36201234567,%2B36990000000&messagedata=hi&responseformat=html"
    ));
    assert_eq!(r.headers()["content-type"], "text/html");
    assert_eq!(r.headers()["server"], "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0");
    let body = r.text().unwrap();
    let id_start = body.find("Message ID: ").unwrap() + "Message ID: ".len();
    let id = &body[id_start..id_start + 8];
    assert!(is_message_id(id));
    assert_eq!(
        body,
        format!(
            "<html><head><title>Ozeki NG SMS Gateway</title></head><body>\n\
<p>Message accepted for delivery<br>\nStatus code: 0<br>\nMessage ID: {id}<br>\nRecipient: +36201234567<br></p>\n\
<p>Invalid recipient<br>\nStatus code: 11<br>\nMessage ID: <br>\nRecipient: +36990000000<br></p>\n\
</body></html>\n"
        )
    );
}

#[test]
fn credit_actions_and_authentication() {
    let sim = start(&["--user", "eve:pw:5", "--user", "john:newpw:100"]);
    let get = |q: &str| sim.text(&format!("/api?{q}"));
    let body = get("action=getcredits&username=john&password=newpw");
    assert!(body.contains("<response>\n<action>getcredits</action>\n<data>\n<account>\n<username>john</username>\n<balance>100</balance>\n</account>\n</data>\n</response>\n"));
    assert!(body.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE smsapi "));
    assert_eq!(
        tag_values(
            &get("action=getcredits&username=eve&password=pw"),
            "balance"
        ),
        ["5"]
    );
    // The admin default user survives --user.
    let body = get("action=GetCredits&username=admin&password=abc123&useraccount=eve");
    assert_eq!(tag_values(&body, "username"), ["eve"]);
    let body =
        get("action=setcredits&username=admin&password=abc123&useraccount=john&newbalance=50");
    assert_eq!(tag_values(&body, "action"), ["setcredits"]);
    assert_eq!(tag_values(&body, "balance"), ["50"]);
    let body = get("action=setcredits&username=admin&password=abc123&useraccount=john&newbalance=");
    assert_eq!(tag_values(&body, "balance"), ["50"]);
    let body = get("action=addcredits&username=admin&password=abc123&useraccount=john&add=-8");
    assert_eq!(tag_values(&body, "action"), ["addcredits"]);
    assert_eq!(tag_values(&body, "balance"), ["42"]);
    let body = get("action=addcredits&username=admin&password=abc123&add=7");
    assert_eq!(tag_values(&body, "username"), ["admin"]);
    assert_eq!(tag_values(&body, "balance"), ["1007"]);
    // Not an admin.
    for q in [
        "action=setcredits&username=john&password=newpw&newbalance=9999",
        "action=addcredits&username=john&password=newpw&add=1",
        "action=getcredits&username=john&password=newpw&useraccount=admin",
    ] {
        assert_eq!(
            tag_values(&get(q), "errormessage"),
            ["Access denied"],
            "{q}"
        );
    }
    // Unknown target, bad amount.
    let body = get("action=getcredits&username=admin&password=abc123&useraccount=nobody");
    assert_eq!(tag_values(&body, "errormessage"), ["Unknown user account"]);
    let body = get("action=addcredits&username=admin&password=abc123&add=lots");
    assert!(!tag_values(&body, "errormessage").is_empty());
    // Wrong password, unknown user: every action is authenticated.
    for q in [
        "action=getcredits&username=john&password=secret1",
        "action=getcredits&username=ghost&password=x",
        "action=sendmessage&username=john&password=&recipient=1",
        "action=receivemessage&username=john",
        "action=reporting&username=ghost&password=x",
    ] {
        let body = get(q);
        assert_eq!(
            tag_values(&body, "errormessage"),
            ["Invalid username or password"],
            "{q}"
        );
        assert!(body.contains("<errorcode>"), "{q}");
    }
    assert_eq!(
        tag_values(
            &get("action=getcredits&username=john&password=newpw"),
            "balance"
        ),
        ["42"]
    );
}

#[test]
fn receivemessage_drains_the_inbox() {
    let sim = start(&[]);
    let recv = "/api?action=receivemessage&username=john&password=secret1&folder=inbox";
    let body = sim.text(recv);
    assert!(body.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE response PUBLIC \"-//OZEKI//DTD XML 1.0//EN\" \"http://www.ozekisms.com/DTD/response.xml\">\n<response>\n<action>receivemessage</action>\n<data>\n"));
    assert_eq!(body.matches("<message>").count(), 0);
    sim.control("/sim/inbox?count=3");
    let body = sim.text(&format!("{recv}&limit=2"));
    assert_eq!(body.matches("<message>").count(), 2);
    for tag in [
        "originator",
        "recipient",
        "messagedata",
        "messageid",
        "senttime",
    ] {
        assert_eq!(tag_values(&body, tag).len(), 2, "{tag}");
    }
    let body = sim.text(recv);
    assert_eq!(tag_values(&body, "messagedata"), ["Incoming message 3"]);
    assert_eq!(sim.text(recv).matches("<message>").count(), 0);
}

#[test]
fn other_actions_echo_and_other_paths_404() {
    let sim = start(&[]);
    let body_sent = "action=reporting&username=john&password=secret1&from=2024-01-01&x=%E9";
    let r = sim.post("/api?q=1", body_sent);
    assert_eq!(r.status(), 200);
    let body = r.text().unwrap();
    assert!(body.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response>\n<action>reporting</action>\n<data>\n<echo>\n"));
    assert_eq!(tag_values(&body, "method"), ["POST"]);
    assert_eq!(tag_values(&body, "query"), ["q=1"]);
    assert_eq!(
        tag_values(&body, "bodylength"),
        [body_sent.len().to_string()]
    );
    assert_eq!(
        tag_values(&body, "bodyblake3"),
        [blake3::hash(body_sent.as_bytes()).to_hex().to_string()]
    );

    let body = sim.text("/api?action=AddUser&username=admin&password=abc123&newuser=z");
    assert!(body.contains("<!DOCTYPE smsapi "));
    assert_eq!(tag_values(&body, "action"), ["adduser"]);
    assert_eq!(tag_values(&body, "bodylength"), ["0"]);

    let r = sim.get("/nowhere/else?x=1");
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["server"], "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0");
    let text = r.text().unwrap();
    assert!(
        text.contains("GET") && text.contains("/nowhere/else"),
        "{text}"
    );
}

#[test]
fn request_log_and_keep_alive() {
    let sim = start(&[]);
    let c = client();
    for i in 0..5 {
        let r = c
            .post(sim.url(&format!("/api?action=sendmessage&n={i}")))
            .header("X-Test", format!("v{i}"))
            .body(format!("username=john&password=secret1&recipient=1,2,{i}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().unwrap();
    }
    let log = sim.json("/sim/requests");
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 5);
    let conns: Vec<&Value> = log.iter().map(|r| &r["conn"]).collect();
    assert!(
        conns.iter().all(|c| *c == conns[0]),
        "not kept alive: {conns:?}"
    );
    let remotes: Vec<&Value> = log.iter().map(|r| &r["remote"]).collect();
    assert!(remotes.iter().all(|c| *c == remotes[0]));
    let first = &log[0];
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/api");
    assert_eq!(first["query"], "action=sendmessage&n=0");
    assert_eq!(
        first["body"],
        "username=john&password=secret1&recipient=1,2,0"
    );
    assert_eq!(first["body_len"], 46);
    assert_eq!(first["headers"]["x-test"], "v0");
    assert_eq!(first["action"], "sendmessage");
    assert_eq!(first["recipients"], 3);
    assert_eq!(log[4]["headers"]["x-test"], "v4");
}

#[test]
fn no_record_keeps_counters_only() {
    let sim = start(&["--no-record"]);
    sim.text(&format!("{SEND}&recipient=1,2"));
    assert_eq!(sim.json("/sim/requests"), Value::Array(vec![]));
    let stats = sim.json("/sim/stats");
    assert_eq!(stats["requests"], 1);
    assert_eq!(stats["messages_accepted"], 2);
}

#[test]
fn fault_modes() {
    let sim = start(&[]);
    let send = format!("{SEND}&recipient=1");

    sim.control("/sim/fault?mode=http500");
    let r = sim.get(&send);
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers()["server"], "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0");
    assert!(r.text().unwrap().contains("500"));
    assert_eq!(sim.get(&send).status(), 200, "count defaults to 1");

    sim.control("/sim/fault?mode=http503&count=2");
    assert_eq!(sim.get(&send).status(), 503);
    assert_eq!(sim.get(&send).status(), 503);
    assert_eq!(sim.get(&send).status(), 200);

    sim.control("/sim/fault?mode=garbage");
    let r = sim.get(&send);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/xml");
    assert_eq!(r.text().unwrap(), "<<garbage");

    sim.control("/sim/fault?mode=reset");
    let err = client().get(sim.url(&send)).send().unwrap_err();
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
    assert_eq!(sim.get(&send).status(), 200);

    sim.control("/sim/fault?mode=hang");
    let quick = Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = quick.get(sim.url(&send)).send().unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(sim.get(&send).status(), 200);

    sim.control("/sim/fault?mode=delay&ms=300");
    let started = Instant::now();
    assert_eq!(sim.get(&send).status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    sim.control("/sim/fault?mode=http500&count=0");
    for _ in 0..3 {
        assert_eq!(sim.get(&send).status(), 500);
    }
    sim.control("/sim/fault?mode=none");
    assert_eq!(sim.get(&send).status(), 200);

    // Faulted requests are recorded too.
    let log = sim.json("/sim/requests");
    let faults: Vec<String> = log
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["fault"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        faults,
        [
            "http500", "http503", "http503", "garbage", "reset", "hang", "delay", "http500",
            "http500", "http500"
        ]
    );

    // Bad control requests.
    let r = client()
        .post(sim.url("/sim/fault?mode=explode"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client()
        .get(sim.url("/sim/fault?mode=none"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[test]
fn runtime_latency() {
    let sim = start(&["--latency-ms", "250"]);
    let send = format!("{SEND}&recipient=1");
    let started = Instant::now();
    sim.text(&send);
    assert!(started.elapsed() >= Duration::from_millis(250));
    sim.control("/sim/latency?ms=0");
    let started = Instant::now();
    sim.text(&send);
    assert!(started.elapsed() < Duration::from_millis(250));
    assert_eq!(sim.json("/sim/stats")["latency_ms"], 0);
}
