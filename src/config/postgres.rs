//! `store.url`: where the PostgreSQL store lives, and how its password is
//! kept out of every log line and error message.
//!
//! Owns the parsing and checking of the URL (at configuration time: no
//! socket is opened here) and [`PgUrl::redact`], which every message that
//! may carry the URL or the password goes through. A `PgUrl` prints itself
//! (`Display`, `Debug`) only redacted: `postgres://user:***@host:5432/db`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Where the PostgreSQL store is and how long its statements may take
/// (`store.url`, `store.connect_timeout_ms`, `store.statement_timeout_ms`).
/// Sessions are opened by `store::pg` (`PgSettings::connect`).
#[derive(Clone, Debug)]
pub struct PgSettings {
    pub url: PgUrl,
    pub connect_timeout: Duration,
    /// Server-side limit of every statement of the writer, the owner's
    /// session (at most half the lease there) and the key writer.
    pub statement_timeout: Duration,
}

impl PgSettings {
    /// `url` with the default timeouts.
    pub fn new(url: PgUrl) -> PgSettings {
        PgSettings {
            url,
            connect_timeout: Duration::from_millis(super::CONNECT_TIMEOUT_MS_DEFAULT),
            statement_timeout: Duration::from_millis(super::STATEMENT_TIMEOUT_MS_DEFAULT),
        }
    }
}

/// What replaces a password in everything tollgate prints.
pub const REDACTED: &str = "***";

/// A parsed `postgres://` URL. The full text (password included) is only
/// handed to the PostgreSQL client; everything else sees
/// [`PgUrl::redacted`].
#[derive(Clone)]
pub struct PgUrl {
    config: postgres::Config,
    redacted: String,
    /// The password as written in the URL and as decoded (they differ when
    /// it is percent-encoded); each is replaced in redacted messages.
    secrets: Vec<String>,
}

impl PgUrl {
    /// Parses `text`; the error never contains the password.
    pub fn parse(text: &str) -> Result<PgUrl, String> {
        let redacted = redact_url(text);
        let mut secrets: Vec<String> = Vec::new();
        if let Some(raw) = url_password(text) {
            secrets.push(raw.to_string());
        }
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            // Not quoted: text that is no URL cannot be redacted reliably.
            return Err(
                "is not a PostgreSQL URL; write postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
                    .into(),
            );
        }
        let config = postgres::Config::from_str(text).map_err(|e| {
            format!(
                "{redacted:?} is not a valid PostgreSQL URL ({e}); write postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
            )
        })?;
        if let Some(pw) = config.get_password() {
            let decoded = String::from_utf8_lossy(pw).into_owned();
            if !secrets.contains(&decoded) {
                secrets.push(decoded);
            }
        }
        // Short secrets would redact unrelated text; longest first, so a
        // password containing another is replaced whole.
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        if config.get_hosts().is_empty() {
            return Err(format!(
                "{redacted:?} names no host; write postgres://USER@HOST[:PORT]/DATABASE"
            ));
        }
        if config.get_user().is_none() {
            return Err(format!(
                "{redacted:?} names no user; write postgres://USER@HOST[:PORT]/DATABASE"
            ));
        }
        if config.get_dbname().is_none_or(str::is_empty) {
            return Err(format!(
                "{redacted:?} names no database; write postgres://USER@HOST[:PORT]/DATABASE \
                 (tollgate creates its tables in it, never the database itself)"
            ));
        }
        Ok(PgUrl {
            config,
            redacted,
            secrets,
        })
    }

    /// The client's connection settings (password included: never print).
    pub fn config(&self) -> &postgres::Config {
        &self.config
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The database the URL names.
    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or_default()
    }

    /// `message` with every occurrence of the password replaced (for error
    /// texts from the client library or the server, which might quote it).
    pub fn redact(&self, message: &str) -> String {
        let mut out = message.to_string();
        for secret in &self.secrets {
            out = out.replace(secret.as_str(), REDACTED);
        }
        out
    }

    /// The same server and credentials, another database (tests, and
    /// tools that create the store's database).
    pub fn with_dbname(&self, dbname: &str) -> PgUrl {
        let mut config = self.config.clone();
        config.dbname(dbname);
        let redacted = match self.redacted.rsplit_once('/') {
            Some((base, rest)) => {
                let query = rest.split_once('?').map(|(_, q)| format!("?{q}"));
                format!("{base}/{dbname}{}", query.unwrap_or_default())
            }
            None => self.redacted.clone(),
        };
        PgUrl {
            config,
            redacted,
            secrets: self.secrets.clone(),
        }
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({:?})", self.redacted)
    }
}

/// The password of the userinfo part of `url`, as written.
fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    Some(password)
}

/// `url` with the password of its userinfo and any `password=` query
/// parameter replaced by `***`. Works on text that does not parse, so
/// that errors about a bad URL can quote it safely.
pub fn redact_url(url: &str) -> String {
    let mut out = match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
                    None => authority.to_string(),
                },
                None => authority.to_string(),
            };
            format!("{scheme}://{authority}{tail}")
        }
        None => url.to_string(),
    };
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                    format!("{name}={REDACTED}")
                }
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{base}{}", query.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_everywhere() {
        let url = PgUrl::parse(
            "postgres://tollgate:S3cr%40t-pw@db.example:5433/ledger?application_name=x",
        )
        .unwrap();
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            url.redacted().to_string(),
        ] {
            assert!(!shown.contains("S3cr"), "{shown}");
            assert!(
                shown.contains("postgres://tollgate:***@db.example:5433/ledger"),
                "{shown}"
            );
        }
        // As written and as decoded.
        let message = "FATAL: password S3cr%40t-pw or S3cr@t-pw rejected";
        assert_eq!(url.redact(message), "FATAL: password *** or *** rejected");
        assert_eq!(url.dbname(), "ledger");
        let other = url.with_dbname("t_1");
        assert_eq!(
            other.redacted(),
            "postgres://tollgate:***@db.example:5433/t_1?application_name=x"
        );
        assert_eq!(other.redact("S3cr@t-pw"), "***");
        // A password in the query string too.
        assert_eq!(
            redact_url("postgresql://u@h/db?password=hunter2&sslmode=disable"),
            "postgresql://u@h/db?password=***&sslmode=disable"
        );
        // No password: unchanged.
        assert_eq!(redact_url("postgres://u@h:1/db"), "postgres://u@h:1/db");
    }

    #[test]
    fn bad_urls_are_refused_without_their_password() {
        for (text, why) in [
            ("mysql://u:hunter2@h/db", "not a PostgreSQL URL"),
            ("host=h user=u password=hunter2", "not a PostgreSQL URL"),
            ("postgres://u:hunter2@h:notaport/db", "not a valid"),
            ("postgres://u:hunter2@h:5432", "names no database"),
            ("postgres://h:5432/db", "names no user"),
        ] {
            let e = PgUrl::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        PgUrl::parse("postgres://postgres@127.0.0.1:5432/test").unwrap();
    }
}
