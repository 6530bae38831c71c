//! Fuzzes what tollgate owns (`api::owned`) against the simulator's model
//! of the gateway: for any path, query and body, whatever `ozeki-sim` would
//! take as a send must be routed to the Ozeki door and classified as a send
//! of at least as many messages, or refused. Also checks that path
//! normalisation is idempotent.
//!
//! Input layout: path `\n` query `\n` body (missing parts are empty).
//!
//! Run: `cargo +nightly fuzz run owned`
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::api::owned::{normalise_path, query_names_owned_action, Route, Router};
use tollgate::api::ozeki::{classify, parse_params, Command, ParamLimits};
use tollgate::sim::params::{is_api_path, Params as SimParams};
use tollgate::sim::server::collect_messages;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let query = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();

    let once = normalise_path(&path);
    assert_eq!(normalise_path(&once), once, "normalising twice changed {path:?}");

    let router = Router::new(
        &["/api".into(), "/httpapi".into(), "/ozeki".into()],
        "/boxis",
        "/soap",
        &[],
    );
    let query_text = String::from_utf8_lossy(query).into_owned();
    let route = router.route(&path, Some(&query_text));

    // What the simulator would do with it.
    let api = is_api_path(&path);
    let sim = if api {
        SimParams::parse(query, Some(body))
    } else {
        SimParams::parse(query, None)
    };
    if sim.action().as_deref() != Some("sendmessage") {
        return;
    }
    let sim_messages = collect_messages(&sim);
    if sim_messages.is_empty() {
        return;
    }
    // The simulator would deliver: tollgate must own the request ...
    if api {
        assert_eq!(route, Route::Ozeki, "API path {path:?} not routed to the Ozeki door");
    } else {
        assert!(query_names_owned_action(query), "query {query_text:?} not owned");
        assert_eq!(route, Route::Ozeki);
    }
    // ... and price at least as many messages, or refuse. (The Ozeki door
    // reads the body of every request it owns, whatever its path.)
    let Ok(params) = parse_params(Some(query), Some(body), &ParamLimits::default()) else {
        return; // refused: invalid_request
    };
    match classify(&params) {
        Err(_) => {} // refused
        Ok(Command::SendMessage(send)) => assert!(
            send.messages.len() >= sim_messages.len(),
            "priced {} messages, the gateway would send {}",
            send.messages.len(),
            sim_messages.len()
        ),
        Ok(other) => panic!("a send the gateway would deliver classified as {other:?}"),
    }
});
