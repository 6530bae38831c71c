//! Several tollgate nodes on one PostgreSQL ledger (`cluster:`), over the
//! real binary. The grant protocol itself is tested against PostgreSQL in
//! the crate (`cluster::sql_tests`) and as a model (`cluster::model`);
//! here two real nodes share one database.

mod common;

use std::process::Command;

use common::pg::{self, TestDb};
use common::*;

fn cli_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn config(dir: &std::path::Path, store: &str, cluster: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("tariffs.yaml"), TARIFFS).unwrap();
    let path = dir.join("tollgate.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:{}\nupstream: {{ address: 127.0.0.1:{} }}\ntariffs: tariffs.yaml\n{store}{cluster}",
            free_port(),
            free_port(),
        ),
    )
    .unwrap();
    path
}

fn tollgate(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn a_cluster_section_is_validated_and_refused_where_it_cannot_hold() {
    let db = TestDb::create("cluster_check");
    let dir = tempfile::tempdir().unwrap();
    let cluster = "cluster: { node_id: node-a, lease_ms: 3000 }\n";
    let path = config(dir.path(), &pg::store_yaml(&db.url(), ""), cluster);
    let out = tollgate(&["check"], &path);
    assert!(out.status.success(), "{}", cli_text(&out));

    // On SQLite, with an unknown key, or with a rule that would let a node
    // spend what it was not granted: refused by check, naming the key.
    for (store, extra, says) in [
        (
            "store: { path: t.db }\n",
            "",
            "cluster: needs a PostgreSQL store",
        ),
        (
            "",
            "durability: async\n",
            "durability: must be sync with cluster",
        ),
        (
            "",
            "ledger: { overdraft: ozeki }\n",
            "ledger.overdraft: must be strict",
        ),
        (
            "",
            "auth: { adopt_balance: true }\n",
            "auth.adopt_balance: cannot be true",
        ),
    ] {
        let store = if store.is_empty() {
            pg::store_yaml(&db.url(), "")
        } else {
            store.to_string()
        };
        let path = config(dir.path(), &format!("{store}{extra}"), cluster);
        let out = tollgate(&["check"], &path);
        let text = cli_text(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains(says), "{says}: {text}");
    }
    let path = config(
        dir.path(),
        &pg::store_yaml(&db.url(), ""),
        "cluster: { node_id: node-a, lease: 3 }\n",
    );
    let out = tollgate(&["check"], &path);
    let text = cli_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("unknown field"), "{text}");
    // Nothing ran: no schema was made.
    let tables: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

#[test]
fn the_deployed_node_template_passes_check() {
    let db = TestDb::create("cluster_template");
    let dir = tempfile::tempdir().unwrap();
    for file in ["accounts.yaml", "tariffs.yaml"] {
        std::fs::copy(format!("conf/{file}"), dir.path().join(file)).unwrap();
    }
    let filled = include_str!("../deploy/cluster/node.yaml.tmpl")
        .replace("@LISTEN@", &format!("127.0.0.1:{}", free_port()))
        .replace("@ADMIN@", &format!("127.0.0.1:{}", free_port()))
        .replace("@UPSTREAM@", &format!("127.0.0.1:{}", free_port()))
        .replace("@STORE_URL@", &db.url())
        .replace("@NODE_ID@", "node-a")
        .replace("@ADMIN_TOKEN@", "a-token-of-32-characters-or-more-0000");
    // `@NAME@`, as run-cluster.sh fills them in.
    let placeholder = filled.match_indices('@').any(|(i, _)| {
        let rest = &filled[i + 1..];
        let name = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_uppercase() || c == '_')
                .len();
        name > 0 && rest[name..].starts_with('@')
    });
    assert!(!placeholder, "a placeholder is left: {filled}");
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, filled).unwrap();
    let out = tollgate(&["check"], &path);
    assert!(out.status.success(), "{}", cli_text(&out));
}

/// A node of a cluster on `db`, in front of `sim`.
fn node(sim: &Sim, db: &TestDb, id: &str) -> Tollgate {
    node_with(sim, db, id, default_accounts())
}

/// [`node`] with these seed accounts.
fn node_with(sim: &Sim, db: &TestDb, id: &str, accounts: String) -> Tollgate {
    Tollgate::start(
        sim.addr,
        TollgateOptions {
            extra_yaml: common::cluster::node_yaml(&db.url(), id),
            accounts,
            ..Default::default()
        },
    )
}

fn send(t: &Tollgate, user: &str, password: &str, to: &str) -> (u16, String) {
    get(&t.url(&format!(
        "/api?action=sendmessage&username={user}&password={password}&recipient={to}&messagedata=hi"
    )))
}

fn admin_add(t: &Tollgate, user: &str, credits: i64) -> (u16, String) {
    get(&t.url(&format!(
        "/api?action=addcredits&username=admin&password=abc123&useraccount={user}&add={credits}"
    )))
}

#[test]
fn two_nodes_share_one_ledger_and_spend_exactly_its_credit() {
    let db = TestDb::create("cluster_two_nodes");
    let sim = Sim::start(&["--user", "poor:poor1:1000"]);
    let a = node(&sim, &db, "node-a");
    let b = node(&sim, &db, "node-b");
    // Seeded once (by whichever started first), seen by both.
    assert_eq!(a.balance("john", "secret1"), "744");
    assert_eq!(b.balance("john", "secret1"), "744");

    // A credit action on one node is the next decision of the other.
    let (status, body) = admin_add(&a, "poor", 10);
    assert_eq!(status, 200, "{body}");
    assert_eq!(xml_field(&body, "balance").as_deref(), Some("10"), "{body}");
    assert_eq!(b.balance("poor", "poor1"), "10");

    // 1 credit a send, alternating nodes, retried until the cluster's
    // credit is gone: exactly 10 accepted, none beyond.
    let nodes = [&a, &b];
    let (mut accepted, mut refused_in_a_row, mut i) = (0, 0, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while refused_in_a_row < 20 && std::time::Instant::now() < deadline {
        let (status, body) = send(nodes[i % 2], "poor", "poor1", "%2B36201234567");
        i += 1;
        if status == 200 && body.contains("accepted") && !body.contains("rejected") {
            accepted += 1;
            refused_in_a_row = 0;
        } else {
            assert!(body.contains("nsufficient"), "{status} {body}");
            refused_in_a_row += 1;
            // Credit a node holds comes back after `grant_idle_ms`.
            std::thread::sleep(std::time::Duration::from_millis(60));
        }
    }
    assert_eq!(accepted, 5, "2 credits a send to 3620, 10 credits");
    assert_eq!(a.balance("poor", "poor1"), "0");
    assert_eq!(b.balance("poor", "poor1"), "0");

    // A deduction beyond the balance is refused cluster-wide.
    let (_, body) = admin_add(&b, "poor", -1);
    assert!(body.contains("nsufficient"), "{body}");

    // Stopping a node gives its grants back and releases its lease.
    a.balance("john", "secret1");
    let mut a = a;
    assert!(a.stop_with("TERM").success(), "{}", a.log());
    let status = cli_text(&b.cli(&["cluster", "status"]));
    assert!(
        status.contains("\"node-a\"") && status.contains("released"),
        "{status}"
    );
    let held: i64 = db
        .client()
        .query_one(
            "SELECT COALESCE(sum(amount_milli), 0)::bigint FROM grants g JOIN nodes n \
             ON n.id = g.node WHERE n.name = 'node-a'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0);
    let out = b.cli(&["ledger", "verify"]);
    assert!(out.status.success(), "{}", cli_text(&out));
}

#[test]
fn cluster_status_lists_the_nodes_their_leases_and_grants() {
    use tollgate::cluster::sql;
    use tollgate::ledger::{Bucket, Role};
    let db = TestDb::create("cluster_status");
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), &pg::store_yaml(&db.url(), ""), "");
    // Before any migration: says so.
    let out = tollgate(&["cluster", "status"], &path);
    let text = cli_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no cluster tables yet"), "{text}");

    let s = pg::settings(&db.url());
    let mut c = s.connect("test", None).unwrap();
    tollgate::store::pg::schema::migrate(&mut c, &s, 0).unwrap();
    let lease = std::time::Duration::from_secs(60);
    let a = sql::register(&mut c, &s, "node-a", lease, 0).unwrap();
    let b = sql::register(&mut c, &s, "node-b", lease, 0).unwrap();
    let seq = sql::next_node_seq(&mut c, &s, a.node).unwrap();
    sql::credit(
        &mut c,
        &s,
        a,
        seq,
        sql::CreditKind::Add,
        "john",
        Role::User,
        Bucket::Anytime,
        10_000,
        None,
        0,
    )
    .unwrap();
    sql::take(&mut c, &s, b, "john", Bucket::Anytime, 2_500).unwrap();
    sql::release(&mut c, &s, a).unwrap();

    let out = tollgate(&["cluster", "status"], &path);
    let text = cli_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2 node(s)"), "{text}");
    assert!(
        text.contains("\"node-a\"") && text.contains("released"),
        "{text}"
    );
    assert!(
        text.contains("\"node-b\"")
            && text.contains("lease valid for")
            && text.contains("1 grant(s) holding 2500 milli")
            && text.contains("never committed"),
        "{text}"
    );
}

const JOHN_BOXIS_KEY: &str = "JohnKey-0123456789";

/// A Boxis `getCreditLimit` of john's, signed for `ts`, on `t`: the
/// `credit` of the answer, or its `resulttxt` when refused.
fn credit_limit(t: &Tollgate, ts: i64) -> Result<String, String> {
    let code = tollgate::service::boxis::authcode(&ts.to_string(), JOHN_BOXIS_KEY);
    let body = format!(
        "version=1.0&timestamp={ts}&username=john&authcode={}&section=sms&action=getCreditLimit",
        std::str::from_utf8(&code).unwrap()
    );
    let (status, _, answer) = post_form(&t.url("/boxis"), body);
    assert_eq!(status, 200, "{answer}");
    match xml_field(&answer, "result").as_deref() {
        Some("1") => Ok(xml_field(&answer, "credit").unwrap()),
        _ => Err(xml_field(&answer, "resulttxt").unwrap_or(answer)),
    }
}

#[test]
fn a_boxis_authcode_is_used_once_across_the_cluster_and_limits_are_cluster_wide() {
    let db = TestDb::create("cluster_boxis");
    let sim = Sim::start(&[]);
    let accounts = format!(
        "accounts:\n\
         - {{ name: admin, role: admin, password_hash: '{}', anytime: 1000 }}\n\
         - {{ name: john, role: user, password_hash: '{}', anytime: 744, boxis_user_key: {JOHN_BOXIS_KEY} }}\n",
        password_hash("abc123"),
        password_hash("secret1"),
    );
    let a = node_with(&sim, &db, "node-a", accounts.clone());
    let b = node_with(&sim, &db, "node-b", accounts);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    // Accepted on A, then replayed on B (whose own cache never saw it) and
    // on A: refused on both.
    assert_eq!(credit_limit(&a, now), Ok("744".into()));
    assert_eq!(credit_limit(&b, now), Err("error: replayed".into()));
    assert_eq!(credit_limit(&a, now), Err("error: replayed".into()));
    // The first use on B is refused on A likewise.
    assert_eq!(credit_limit(&b, now - 1), Ok("744".into()));
    assert_eq!(credit_limit(&a, now - 1), Err("error: replayed".into()));

    // B holds no grant of john's: its limit is the cluster's balance, and
    // follows a send on A (2 credits to 3620) at once.
    let (status, body) = send(&a, "john", "secret1", "%2B36201234567");
    assert!(
        status == 200 && body.contains("accepted") && !body.contains("rejected"),
        "{status} {body}"
    );
    assert_eq!(credit_limit(&b, now - 2), Ok("742".into()));
    assert_eq!(credit_limit(&a, now - 3), Ok("742".into()));
    assert_eq!(b.balance("john", "secret1"), "742");
    // Claims are kept as hashes: no authcode or key in the database.
    let rows: Vec<Vec<u8>> = db
        .client()
        .query("SELECT key FROM boxis_authcodes", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows.len(), 4, "one claim per accepted authcode");
    assert!(rows.iter().all(|k| k.len() == 16));
    for t in [&a, &b] {
        assert!(!t.log().contains(JOHN_BOXIS_KEY));
    }
}
