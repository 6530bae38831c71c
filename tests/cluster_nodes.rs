//! Three real tollgate nodes on one PostgreSQL ledger behind a real load
//! balancer (nginx), under load from many clients: exact spending, kill -9
//! of random nodes, a PostgreSQL restart and a node cut off from
//! PostgreSQL. What every test checks at the end:
//! - no account's available balance (posted − reserved − granted) was
//!   below zero in any sample the watcher took while the test ran;
//! - nothing acknowledged is lost: every send a client saw accepted is
//!   in the ledger, settled or still reserved (in doubt after a crash);
//! - no account spent more than its credit;
//! - `tollgate ledger verify` is clean against PostgreSQL (the journal's
//!   sums equal the balances).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::pg::{self, TestDb};
use common::*;

/// Stops every node (SIGTERM: grants go back, leases are released) and
/// checks the ledger against what the clients saw; returns the rows.
fn settle_and_check(
    nodes: &mut [Node],
    url: &str,
    accounts: &[Account],
    tally: &Tally,
    lowest: &HashMap<String, i64>,
) -> HashMap<String, Row> {
    for n in nodes.iter_mut() {
        if n.tg.try_wait().is_none() {
            let status = n.tg.stop_with("TERM");
            assert!(status.success(), "{} exited {status}: {}", n.id, n.tg.log());
        }
    }
    let mut client = pg::connect(url).unwrap();
    // A deadlock costs its statements `deadlock_timeout` (1 s), and the
    // group commit and lease renewal queued behind them that second: the
    // lock order (src/cluster/sql.rs) must leave PostgreSQL none to break.
    let deadlocks: i64 = client
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(deadlocks, 0, "PostgreSQL broke {deadlocks} deadlocks");
    let rows = rows(&mut client, accounts).unwrap();
    for a in accounts {
        let row = rows[&a.name];
        let accepted = tally.accepted(&a.name) as i64;
        // Settled (posted down from the seed) plus still reserved.
        let spent_or_held = a.credits * 1000 - row.posted + row.reserved;
        assert!(
            lowest.get(&a.name).is_some_and(|l| *l >= 0),
            "{}: available went below zero: {lowest:?}",
            a.name
        );
        assert_eq!(
            row.granted, 0,
            "{}: grants left after shutdown: {row:?}",
            a.name
        );
        assert!(row.available() >= 0, "{}: {row:?}", a.name);
        assert!(
            accepted * 1000 <= spent_or_held,
            "{}: {accepted} sends acknowledged, only {spent_or_held} milli in the ledger ({row:?})",
            a.name
        );
        assert!(
            spent_or_held <= a.credits * 1000,
            "{}: spent {spent_or_held} milli of {} credits",
            a.name,
            a.credits
        );
    }
    let out = nodes[0].tg.cli(&["ledger", "verify"]);
    assert!(
        out.status.success(),
        "ledger verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    rows
}

fn three_nodes(sim: &Sim, url: &str, accounts: &[Account]) -> Vec<Node> {
    ["node-a", "node-b", "node-c"]
        .iter()
        .map(|id| Node::start(sim, url, id, accounts))
        .collect()
}

fn accounts(prefix: &str, n: usize, credits: i64) -> Vec<Account> {
    (0..n)
        .map(|i| Account::new(&format!("{prefix}{i}"), credits))
        .collect()
}

#[test]
fn three_nodes_behind_nginx_accept_exactly_each_accounts_credit() {
    const K: i64 = 200;
    let db = TestDb::create("cluster_exact");
    let accounts = accounts("exact", 5, K);
    let sim = sim_for(&accounts);
    let mut nodes = three_nodes(&sim, &db.url(), &accounts);
    let nginx = Nginx::start(&nodes.iter().map(|n| n.tg.addr).collect::<Vec<_>>());
    let watcher = Watcher::start(db.url(), &accounts);

    let started = Instant::now();
    let load = Load::start(vec![nginx.url("")], &accounts, 64);
    // The last credits of an account are usable from any node: a grant
    // another node holds comes back after `grant_idle_ms`.
    let spent = within(Duration::from_secs(120), || {
        accounts
            .iter()
            .all(|a| load.tally.accepted(&a.name) >= K as u64)
    });
    let took = started.elapsed();
    // Nothing more may be accepted, however long the clients keep trying.
    std::thread::sleep(Duration::from_secs(2));
    let tally = load.stop();
    let (samples, lowest) = watcher.stop();

    let accepted: Vec<u64> = accounts.iter().map(|a| tally.accepted(&a.name)).collect();
    eprintln!(
        "exact spend: {accepted:?} of {K} each in {took:?}, {} refused insufficient, \
         other answers {:?}, {samples} watcher samples, lowest available {lowest:?}",
        tally
            .insufficient
            .load(std::sync::atomic::Ordering::Relaxed),
        tally.others()
    );
    assert!(
        spent.is_some(),
        "not all credit was spent: {accepted:?}\n{}",
        tails(&nodes, &nginx)
    );
    assert_eq!(accepted, vec![K as u64; accounts.len()]);
    assert!(
        tally.others().is_empty(),
        "answers no client caused: {:?}\n{}",
        tally.others(),
        nginx.error_log()
    );
    assert!(samples > 20, "the watcher took {samples} samples");
    let rows = settle_and_check(&mut nodes, &db.url(), &accounts, &tally, &lowest);
    for a in &accounts {
        let row = rows[&a.name];
        assert_eq!((row.posted, row.reserved), (0, 0), "{}: {row:?}", a.name);
    }
}

/// Restarts every node but `except` whose process exited (a node whose
/// lease is lost exits 75 for its supervisor), saying so after `when`.
fn supervise(nodes: &mut [Node], except: Option<usize>, when: &str) {
    for (i, n) in nodes.iter_mut().enumerate() {
        if Some(i) == except {
            continue;
        }
        if let Some(status) = n.supervise() {
            eprintln!("{when}{} had exited ({status}); restarted", n.id);
        }
    }
}

/// The last lines of every node's log and of nginx's error log.
fn tails(nodes: &[Node], nginx: &Nginx) -> String {
    let tail = |s: String| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let mut out = format!("--- nginx ---\n{}\n", tail(nginx.error_log()));
    for n in nodes {
        out.push_str(&format!("--- {} ---\n{}\n", n.id, tail(n.tg.log())));
    }
    out
}

/// A small deterministic generator (the seed is printed to replay a run).
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn ten_kill_nines_under_load_lose_nothing_acknowledged_and_overspend_nothing() {
    let db = TestDb::create("cluster_kill");
    // Busy accounts never run out; small ones do, while nodes die.
    let mut accounts = accounts("busy", 3, 1_000_000);
    accounts.extend(self::accounts("small", 2, 40));
    let sim = sim_for(&accounts);
    let mut nodes = three_nodes(&sim, &db.url(), &accounts);
    let nginx = Nginx::start(&nodes.iter().map(|n| n.tg.addr).collect::<Vec<_>>());
    let watcher = Watcher::start(db.url(), &accounts);
    let load = Load::start(vec![nginx.url("")], &accounts, 64);
    let mut client = db.client();

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill -9 rounds, seed {seed}");
    let mut returned = Vec::new();
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(700));
        let victim = (next(&mut seed) % nodes.len() as u64) as usize;
        let id = nodes[victim].id.clone();
        // A victim that holds grants (a node just restarted takes its
        // first ones with its first sends), so that nearly every round
        // measures a real return (a grant its last commit spent is gone at
        // once, into reserved).
        within(Duration::from_secs(5), || {
            held_by(&mut client, &id).is_ok_and(|h| h >= 10_000)
        });
        let held = held_by(&mut client, &id).unwrap();
        assert!(held > 0, "round {round}: {id} never took a grant");
        let before = load.tally.total_accepted();
        nodes[victim].kill9();
        let killed = std::time::Instant::now();
        // Its grants come back to the accounts within the grant TTL (the
        // other nodes' keepers sweep them once its lease has run out). A
        // survivor that exited meanwhile is restarted at once, as its
        // supervisor would.
        let took = within(
            Duration::from_millis(LEASE_MS + GRANT_TTL_MS + 5000),
            || {
                supervise(&mut nodes, Some(victim), &format!("round {round}: "));
                held_by(&mut client, &id).is_ok_and(|h| h == 0)
            },
        );
        // Meanwhile the balancer sends the clients to the living nodes.
        std::thread::sleep(Duration::from_millis(500).saturating_sub(killed.elapsed()));
        let served = load.tally.total_accepted() - before;
        eprintln!(
            "round {round}: killed {id} holding {held} milli, grants back after {took:?}, \
             {served} sends accepted meanwhile"
        );
        assert!(
            took.is_some(),
            "round {round}: {id}'s grants never came back\n{}",
            tails(&nodes, &nginx)
        );
        assert!(
            served > 0,
            "round {round}: nothing was served while {id} was down\n{}",
            tails(&nodes, &nginx)
        );
        returned.push(took.unwrap());
        nodes[victim].restart();
        supervise(&mut nodes, None, &format!("round {round}: "));
    }
    std::thread::sleep(Duration::from_secs(1));
    let tally = load.stop();
    let (_, lowest) = watcher.stop();
    returned.sort();
    eprintln!(
        "grants returned after (sorted) {returned:?}; accepted {:?}; other answers {:?}",
        tally.accepted.lock().unwrap(),
        tally.others()
    );
    // A dead node's grants are free again within the grant TTL (plus the
    // keeper's sweep period and the lease the node held when it died).
    let limit = Duration::from_millis(LEASE_MS + GRANT_TTL_MS + 1500);
    assert!(
        returned.iter().all(|t| *t <= limit),
        "grants returned after {returned:?} (limit {limit:?})"
    );
    for a in accounts.iter().filter(|a| a.name.starts_with("small")) {
        assert!(tally.accepted(&a.name) <= a.credits as u64);
    }
    // What the clients saw beyond accepted and insufficient: only the
    // moments a node died under a request nginx could not move.
    let others: u64 = tally.others().values().sum();
    assert!(
        others * 100 <= tally.total_accepted(),
        "{others} failed answers for {} accepted: {:?}",
        tally.total_accepted(),
        tally.others()
    );
    settle_and_check(&mut nodes, &db.url(), &accounts, &tally, &lowest);
}

#[test]
fn a_postgresql_restart_under_load_overspends_nothing_and_heals_by_itself() {
    let server = pg::PrivateServer::start();
    pg::connect(&server.url("postgres"))
        .unwrap()
        .batch_execute("CREATE DATABASE tollgate")
        .unwrap();
    let url = server.url("tollgate");
    let mut accounts = accounts("busy", 2, 1_000_000);
    accounts.extend(self::accounts("small", 1, 30));
    let sim = sim_for(&accounts);
    let mut nodes: Vec<Node> = ["node-a", "node-b"]
        .iter()
        .map(|id| Node::start(&sim, &url, id, &accounts))
        .collect();
    let watcher = Watcher::start(url.clone(), &accounts);
    let targets: Vec<String> = nodes.iter().map(|n| n.tg.url("")).collect();
    let load = Load::start(targets.clone(), &accounts, 16);
    std::thread::sleep(Duration::from_secs(1));
    assert!(load.tally.total_accepted() > 0);

    server.stop();
    std::thread::sleep(Duration::from_secs(3));
    server.start_again();
    let up = Instant::now();
    // Every node serves again by itself (a node whose lease ran out while
    // the database was away exits 75 and its supervisor starts it again).
    let healed = within(Duration::from_secs(60), || {
        supervise(&mut nodes, None, "");
        let last = load.tally.last_accepted.lock().unwrap();
        targets
            .iter()
            .all(|t| last.get(t).is_some_and(|at| *at > up))
    });
    std::thread::sleep(Duration::from_secs(1));
    let tally = load.stop();
    let (_, lowest) = watcher.stop();
    eprintln!(
        "PostgreSQL restart: healed after {healed:?}, restarts {:?}, accepted {:?}, other answers {:?}",
        nodes.iter().map(|n| n.restarts).collect::<Vec<_>>(),
        tally.accepted.lock().unwrap(),
        tally.others()
    );
    assert!(healed.is_some(), "a node never served again");
    assert!(tally.accepted("small0") <= 30);
    settle_and_check(&mut nodes, &url, &accounts, &tally, &lowest);
}

#[test]
fn a_node_cut_off_from_postgresql_stops_spending_and_the_others_go_on() {
    let db = TestDb::create("cluster_cut");
    let hole = Blackhole::start("127.0.0.1:5432".parse().unwrap());
    let url = db.url();
    let cut_url = url.replace(":5432/", &format!(":{}/", hole.addr.port()));
    assert_ne!(url, cut_url);
    let mut accounts = accounts("busy", 2, 1_000_000);
    accounts.extend(self::accounts("small", 1, 60));
    let sim = sim_for(&accounts);
    let mut nodes = vec![
        Node::start(&sim, &cut_url, "node-a", &accounts),
        Node::start(&sim, &url, "node-b", &accounts),
    ];
    let watcher = Watcher::start(url.clone(), &accounts);
    let targets: Vec<String> = nodes.iter().map(|n| n.tg.url("")).collect();
    let load = Load::start(targets.clone(), &accounts, 16);
    std::thread::sleep(Duration::from_millis(1500));
    let mut client = db.client();
    assert!(
        held_by(&mut client, "node-a").unwrap() > 0,
        "node-a holds no grant"
    );

    hole.pause();
    let cut = Instant::now();
    // node-a's grants come back once its lease has run out on the
    // database's clock, and node-b may spend them.
    let swept = within(
        Duration::from_millis(LEASE_MS + GRANT_TTL_MS + 5000),
        || held_by(&mut client, "node-a").is_ok_and(|h| h == 0),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (a_last, b_last) = {
        let last = load.tally.last_accepted.lock().unwrap();
        (
            last.get(&targets[0]).copied(),
            last.get(&targets[1]).copied(),
        )
    };
    hole.resume();
    let back = Instant::now();
    let healed = within(Duration::from_secs(60), || {
        supervise(&mut nodes, None, "");
        let last = load.tally.last_accepted.lock().unwrap();
        last.get(&targets[0]).is_some_and(|at| *at > back)
    });
    std::thread::sleep(Duration::from_millis(500));
    let tally = load.stop();
    let (_, lowest) = watcher.stop();
    eprintln!(
        "cut off: grants swept after {swept:?}; node-a last accepted {:?} after the cut, \
         node-b {:?}; node-a served again after {healed:?} (restarts {}); accepted {:?}; other answers {:?}",
        a_last.map(|t| t.saturating_duration_since(cut)),
        b_last.map(|t| t.saturating_duration_since(cut)),
        nodes[0].restarts,
        tally.accepted.lock().unwrap(),
        tally.others()
    );
    assert!(swept.is_some(), "node-a's grants never came back");
    // With `durability: sync` a send is acknowledged only after its
    // commit: nothing node-a decides after the cut can be accepted.
    assert!(
        // (An answer whose commit went through just before the cut may
        // reach its client a little after it on a busy machine.)
        a_last.is_some_and(|t| t.saturating_duration_since(cut) < Duration::from_millis(LEASE_MS / 2)),
        "node-a accepted sends after it was cut off"
    );
    assert!(
        b_last.is_some_and(|t| t.saturating_duration_since(cut) > Duration::from_millis(LEASE_MS)),
        "node-b stopped serving while node-a was cut off"
    );
    assert!(healed.is_some(), "node-a never served again");
    assert!(tally.accepted("small0") <= 60);
    settle_and_check(&mut nodes, &url, &accounts, &tally, &lowest);
}

#[test]
fn an_idempotency_key_retried_on_another_node_charges_once() {
    let db = TestDb::create("cluster_idem");
    let accounts = accounts("idem", 1, 10);
    let sim = sim_for(&accounts);
    let a = Node::start(&sim, &db.url(), "node-a", &accounts);
    let b = Node::start(&sim, &db.url(), "node-b", &accounts);
    let acct = &accounts[0];
    let send = |node: &Node, key: &str| {
        let r = client()
            .get(node.tg.url(&format!(
                "/api?action=sendmessage&username={}&password={}&recipient={RECIPIENT}&messagedata=hi",
                acct.name, acct.password
            )))
            .header("Idempotency-Key", key)
            .send()
            .unwrap();
        let replayed = r.headers().get("idempotent-replayed").is_some();
        (r.status().as_u16(), replayed, r.text().unwrap())
    };
    let (status, replayed, first) = send(&a, "order-1");
    assert_eq!((status, replayed), (200, false), "{first}");
    assert!(first.contains("accepted"), "{first}");
    // The retry lands on the other node: the first answer, no second send.
    let (status, replayed, again) = send(&b, "order-1");
    assert_eq!((status, replayed), (200, true), "{again}");
    assert_eq!(again, first);
    // The same key with another request is refused on either node.
    let r = client()
        .get(b.tg.url(&format!(
            "/api?action=sendmessage&username={}&password={}&recipient=%2B36309999999&messagedata=hi",
            acct.name, acct.password
        )))
        .header("Idempotency-Key", "order-1")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    // Charged once: 1 credit of 10 across the cluster.
    assert_eq!(b.tg.balance(&acct.name, &acct.password), "9");
    assert_eq!(a.tg.balance(&acct.name, &acct.password), "9");
}
