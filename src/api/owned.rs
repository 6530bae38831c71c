//! What tollgate owns (SPEC 1.4a): the one place that decides, from a
//! request's path and parameters, whether the gateway could take it as a
//! send or a credit action. Such a request is priced and charged, or
//! refused; it is never forwarded uncharged.
//!
//! The rule is decided by *meaning*, not by spelling, and it errs towards
//! owning: a request tollgate owns but the gateway would not have taken as
//! a send costs a local answer; a send tollgate forwards uncharged costs
//! money. So every reading here is at least as lenient as the gateway's
//! (and the bundled `ozeki-sim`, which models the gateway, is checked
//! against it by property tests):
//!
//! - **Paths** are compared after [`normalise_path`]: percent-escapes
//!   decoded (repeatedly, for servers that decode again), `\` read as `/`,
//!   repeated slashes collapsed, `.` and `..` segments resolved, trailing
//!   dots and spaces of a segment dropped (Windows names), case folded. The
//!   gateway answers its API on a registered URL prefix (HTTP.sys), which
//!   matches the canonical path case-insensitively and everything below it,
//!   so `/API/`, `//api`, `/x/../api`, `/%61pi` and `/api/anything` are all
//!   the API.
//! - **Actions** are read with [`read_action`]: trimmed of white space and
//!   control characters and lower-cased; a value that spells an owned
//!   action with other characters in between (`send message`,
//!   `send_message`, `sendmessage.`) is a [`ActionReading::Lookalike`],
//!   refused as ambiguous rather than forwarded.
//! - A request on **any** path whose query string names an owned action is
//!   owned too ([`query_names_owned_action`], with a decoder as lenient as
//!   the gateway's: a malformed escape is kept, not an error).
//!
//! Bodies are read on every owned request, whatever their `Content-Type`
//! (see `proxy.rs`); bodies on other paths are streamed unread, because the
//! gateway reads API parameters on its API paths only.
//!
//! This module must stay pure (no I/O, no pingora types) and cheap: the
//! router runs on every request.

use crate::api::percent::decode_lenient;

/// The Ozeki actions that read or move credit: answered or charged by
/// tollgate, never forwarded uncharged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnedAction {
    SendMessage,
    GetCredits,
    SetCredits,
    AddCredits,
}

impl OwnedAction {
    pub const ALL: [OwnedAction; 4] = [
        OwnedAction::SendMessage,
        OwnedAction::GetCredits,
        OwnedAction::SetCredits,
        OwnedAction::AddCredits,
    ];

    /// The canonical (lower-case) name.
    pub fn as_str(self) -> &'static str {
        match self {
            OwnedAction::SendMessage => "sendmessage",
            OwnedAction::GetCredits => "getcredits",
            OwnedAction::SetCredits => "setcredits",
            OwnedAction::AddCredits => "addcredits",
        }
    }
}

/// `receivemessage`: owned only when the tariff prices received messages;
/// routed to the Ozeki door from any path so that the door can decide.
pub const RECEIVE_ACTION: &str = "receivemessage";

/// How an `action` value reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionReading {
    Owned(OwnedAction),
    /// Spells an owned action (or `receivemessage`) with extra characters
    /// in between: the gateway might read it as that action, tollgate
    /// cannot price it as one. Refused, never forwarded.
    Lookalike,
    /// Any other action, normalised (trimmed, lower-cased).
    Other(String),
}

impl ActionReading {
    /// Whether tollgate must look at the request (owned or ambiguous).
    pub fn is_owned_or_lookalike(&self) -> bool {
        !matches!(self, ActionReading::Other(_))
    }
}

/// How parameter names and `action` values compare: white space and
/// control characters trimmed from both ends, then lower-cased. Takes and
/// returns the `String` so the common case (a short ASCII name already in
/// shape) costs no allocation.
pub fn fold(mut raw: String) -> String {
    let plain = raw
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_whitespace() && !b.is_ascii_control());
    if plain {
        raw.make_ascii_lowercase();
        return raw;
    }
    raw.trim_matches(|c: char| c.is_whitespace() || c.is_control())
        .to_lowercase()
}

/// Reads an `action` value (see the module docs).
pub fn read_action(raw: &str) -> ActionReading {
    let action = fold(raw.to_string());
    if let Some(owned) = OwnedAction::ALL.into_iter().find(|a| a.as_str() == action) {
        return ActionReading::Owned(owned);
    }
    if action != RECEIVE_ACTION {
        let skeleton: String = action.chars().filter(char::is_ascii_alphanumeric).collect();
        let spells_owned = OwnedAction::ALL
            .iter()
            .map(|a| a.as_str())
            .chain([RECEIVE_ACTION])
            .any(|a| a == skeleton);
        if spells_owned {
            return ActionReading::Lookalike;
        }
    }
    ActionReading::Other(action)
}

/// The canonical form of a request path for matching (see the module
/// docs): always starts with `/`, never ends with one (but for `/`
/// itself), lower case.
pub fn normalise_path(raw: &str) -> String {
    // Until nothing changes: a server that unescapes once more would read
    // `%2561` as `a` (each pass shrinks the path, so this ends).
    let mut decoded = raw.as_bytes().to_vec();
    let mut next = Vec::with_capacity(decoded.len());
    while decoded.contains(&b'%') {
        decode_lenient(&decoded, false, &mut next);
        if next == decoded {
            break;
        }
        std::mem::swap(&mut decoded, &mut next);
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        if segment == ".." {
            segments.pop();
            continue;
        }
        // `.`, empty segments and Windows' trailing dots and spaces vanish.
        let segment = segment.trim_end_matches(['.', ' ']);
        if !segment.is_empty() {
            segments.push(segment);
        }
    }
    let mut path = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        path.push('/');
        path.push_str(&segment.to_lowercase());
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// Whether `path` (normalised) is `prefix` (normalised) or below it.
pub fn is_under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => rest.starts_with('/') || prefix == "/",
        None => false,
    }
}

/// Whether a query string names an owned action (or `receivemessage`, or a
/// lookalike of either) in any of its `action` parameters, read as
/// leniently as the gateway reads it: names compare after trimming and
/// case folding, escapes that are not two hex digits are kept, bytes that
/// are not UTF-8 are replaced. Allocation-free for queries without an
/// `action`-like name.
pub fn query_names_owned_action(query: &[u8]) -> bool {
    let mut name = Vec::new();
    let mut value = Vec::new();
    for pair in query.split(|&b| b == b'&') {
        let (raw_name, raw_value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        // Cheap filter: the name must contain an `a`/`A` or an escape.
        if !raw_name.iter().any(|&b| matches!(b, b'a' | b'A' | b'%')) {
            continue;
        }
        decode_lenient(raw_name, true, &mut name);
        if fold(String::from_utf8_lossy(&name).into_owned()) != "action" {
            continue;
        }
        decode_lenient(raw_value, true, &mut value);
        let reading = read_action(&String::from_utf8_lossy(&value));
        match reading {
            ActionReading::Other(a) if a != RECEIVE_ACTION => {}
            _ => return true,
        }
    }
    false
}

/// Where a request goes, decided from its path and query before its body
/// is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The Ozeki door: read whole and decided by tollgate (a request that
    /// turns out not to be owned is forwarded with its original bytes).
    Ozeki,
    /// The Boxis-compatible door (answered by tollgate).
    Boxis,
    /// The 2sms-compatible SOAP door (answered by tollgate).
    Soap,
    /// A path the operator listed in `ozeki.blocked_paths`: refused.
    Blocked,
    /// Everything else: streamed to the gateway untouched.
    Forward,
}

/// The paths of every door, normalised once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    ozeki: Vec<String>,
    boxis: String,
    soap: String,
    blocked: Vec<String>,
}

impl Router {
    pub fn new(
        ozeki_paths: &[String],
        boxis_path: &str,
        soap_path: &str,
        blocked: &[String],
    ) -> Router {
        Router {
            ozeki: ozeki_paths.iter().map(|p| normalise_path(p)).collect(),
            boxis: normalise_path(boxis_path),
            soap: normalise_path(soap_path),
            blocked: blocked.iter().map(|p| normalise_path(p)).collect(),
        }
    }

    /// Where a request with this raw path and raw query goes. Order:
    /// blocked paths, the Boxis and SOAP doors (exact), the Ozeki API paths
    /// and everything below them, then any path whose query names an owned
    /// action.
    pub fn route(&self, raw_path: &str, raw_query: Option<&str>) -> Route {
        let path = normalise_path(raw_path);
        if self.blocked.iter().any(|b| is_under(&path, b)) {
            return Route::Blocked;
        }
        if path == self.boxis {
            return Route::Boxis;
        }
        if path == self.soap {
            return Route::Soap;
        }
        if self.is_api_path(&path) {
            return Route::Ozeki;
        }
        if raw_query.is_some_and(|q| query_names_owned_action(q.as_bytes())) {
            return Route::Ozeki;
        }
        Route::Forward
    }

    /// Whether a normalised path is one of the gateway's API paths or
    /// below one.
    pub fn is_api_path(&self, normalised: &str) -> bool {
        self.ozeki.iter().any(|p| is_under(normalised, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_normalise_the_way_servers_read_them() {
        for (raw, expected) in [
            ("/api", "/api"),
            ("/api/", "/api"),
            ("/API", "/api"),
            ("//api//", "/api"),
            ("/./api", "/api"),
            ("/x/../api", "/api"),
            ("/x/%2e%2e/api", "/api"),
            ("/%61pi", "/api"),
            ("/%2561pi", "/api"),
            ("/api%2F", "/api"),
            ("\\api", "/api"),
            ("/api.", "/api"),
            ("/api. .", "/api"),
            ("/api/..", "/"),
            ("/../../api", "/api"),
            ("", "/"),
            ("/", "/"),
            ("/HttpApi/Send", "/httpapi/send"),
            ("/a%zzb", "/a%zzb"),
            (
                "/WebServices/2.2/Simple/Account.asmx",
                "/webservices/2.2/simple/account.asmx",
            ),
        ] {
            assert_eq!(normalise_path(raw), expected, "{raw:?}");
        }
    }

    #[test]
    fn under_a_prefix_means_equal_or_below() {
        assert!(is_under("/api", "/api"));
        assert!(is_under("/api/x", "/api"));
        assert!(!is_under("/apix", "/api"));
        assert!(!is_under("/ap", "/api"));
        assert!(is_under("/anything", "/"));
    }

    #[test]
    fn actions_read_by_meaning() {
        assert_eq!(
            read_action("sendmessage"),
            ActionReading::Owned(OwnedAction::SendMessage)
        );
        assert_eq!(
            read_action(" SendMessage\t"),
            ActionReading::Owned(OwnedAction::SendMessage)
        );
        assert_eq!(
            read_action("\0getCredits\u{3000}"),
            ActionReading::Owned(OwnedAction::GetCredits)
        );
        for lookalike in [
            "send message",
            "send_message",
            "sendmessage.",
            "Add-Credits",
            "receive message",
        ] {
            assert_eq!(
                read_action(lookalike),
                ActionReading::Lookalike,
                "{lookalike:?}"
            );
        }
        assert_eq!(
            read_action("receivemessage"),
            ActionReading::Other("receivemessage".into())
        );
        assert_eq!(
            read_action("getVersion"),
            ActionReading::Other("getversion".into())
        );
        assert_eq!(
            read_action("sendmessages"),
            ActionReading::Other("sendmessages".into())
        );
    }

    #[test]
    fn a_query_naming_an_owned_action_is_owned_whatever_its_spelling() {
        for q in [
            "action=sendmessage",
            "x=1&ACTION=SendMessage",
            "%61ction=sendmessage",
            "+action+=+sendmessage+",
            "action=send%6dessage",
            "action=sendmessage%",
            "action=send_message",
            "action=receivemessage",
            "a=%zz&action=addcredits",
        ] {
            assert!(query_names_owned_action(q.as_bytes()), "{q:?}");
        }
        for q in [
            "",
            "action=getversion",
            "actions=sendmessage",
            "xaction=sendmessage",
            "foo",
        ] {
            assert!(!query_names_owned_action(q.as_bytes()), "{q:?}");
        }
    }

    #[test]
    fn the_router_owns_api_paths_and_owned_actions_anywhere() {
        let router = Router::new(
            &["/api".into(), "/httpapi".into(), "/ozeki".into()],
            "/boxis",
            "/WebServices/2.2/Simple/Account.asmx",
            &["/admin-ui".into()],
        );
        assert_eq!(router.route("/api/", None), Route::Ozeki);
        assert_eq!(router.route("/HTTPAPI", Some("x=1")), Route::Ozeki);
        assert_eq!(router.route("/ozeki/send", None), Route::Ozeki);
        assert_eq!(
            router.route("/index.html", Some("action=sendmessage")),
            Route::Ozeki
        );
        assert_eq!(
            router.route("/index.html", Some("action=getversion")),
            Route::Forward
        );
        assert_eq!(router.route("/apix", None), Route::Forward);
        assert_eq!(router.route("/Boxis/", None), Route::Boxis);
        assert_eq!(
            router.route("/webservices/2.2/simple/ACCOUNT.asmx", None),
            Route::Soap
        );
        assert_eq!(
            router.route("/admin-ui/x", Some("action=sendmessage")),
            Route::Blocked
        );
    }

    proptest! {
        #[test]
        fn normalising_is_idempotent_and_canonical(raw in "[/\\\\.a-zA-Z%0-9 ]{0,24}") {
            let once = normalise_path(&raw);
            prop_assert!(once.starts_with('/'));
            prop_assert!(once == "/" || !once.ends_with('/'));
            prop_assert!(!once.contains("//"));
            prop_assert_eq!(normalise_path(&once), once.clone());
        }

        #[test]
        fn an_api_path_spelled_any_way_is_routed_to_the_ozeki_door(
            base in prop::sample::select(vec!["api", "httpapi", "ozeki"]),
            upper in prop::collection::vec(any::<bool>(), 8),
            escape in prop::collection::vec(any::<bool>(), 8),
            lead in prop::sample::select(vec!["/", "//", "/./", "/x/../", "\\\\"]),
            tail in prop::sample::select(vec!["", "/", "//", "/.", ".", "/x", "/./"]),
        ) {
            let spelled: String = base
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    let c = if upper[i % 8] { c.to_ascii_uppercase() } else { c };
                    if escape[i % 8] { format!("%{:02X}", c as u8) } else { c.to_string() }
                })
                .collect();
            let router = Router::new(
                &["/api".into(), "/httpapi".into(), "/ozeki".into()],
                "/boxis",
                "/soap",
                &[],
            );
            let raw = format!("{lead}{spelled}{tail}");
            prop_assert_eq!(router.route(&raw, None), Route::Ozeki, "{}", raw);
        }
    }
}
