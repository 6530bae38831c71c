//! Several tollgate nodes on one PostgreSQL ledger (`cluster:`), over the
//! real binary. The grant protocol itself is tested against PostgreSQL in
//! the crate (`cluster::sql_tests`) and as a model (`cluster::model`);
//! `tollgate run` does not serve as a cluster node yet, and must say so
//! rather than run as a plain single node.

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
fn a_cluster_section_is_validated_and_run_refuses_it_rather_than_run_alone() {
    let db = TestDb::create("cluster_refused");
    let dir = tempfile::tempdir().unwrap();
    let cluster = "cluster: { node_id: node-a, lease_ms: 3000 }\n";
    let path = config(dir.path(), &pg::store_yaml(&db.url(), ""), cluster);
    let out = tollgate(&["check"], &path);
    assert!(out.status.success(), "{}", cli_text(&out));

    let out = tollgate(&["run"], &path);
    let text = cli_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("cluster (node node-a)")
            && text.contains("cannot serve as a cluster node yet"),
        "{text}"
    );
    // Refused before anything was written: no schema, no node.
    let tables: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);

    // On SQLite, or with an unknown key: refused by check, naming the key.
    let path = config(dir.path(), "store: { path: t.db }\n", cluster);
    let out = tollgate(&["check"], &path);
    let text = cli_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cluster: needs a PostgreSQL store"), "{text}");
    let path = config(
        dir.path(),
        &pg::store_yaml(&db.url(), ""),
        "cluster: { node_id: node-a, lease: 3 }\n",
    );
    let out = tollgate(&["check"], &path);
    let text = cli_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("unknown field"), "{text}");
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
