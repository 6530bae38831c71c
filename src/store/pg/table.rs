//! The one reconnecting session of a side table's writer thread (the
//! idempotency keys, the outbox): tables the store's migrations create in
//! the store's own database, each written by one thread of its own.
//!
//! Failure modes: the session is opened on first use and again after it
//! ended or a statement broke it ([`session_broken`]); a statement's own
//! error keeps it. Errors are text with the URL's password redacted.

use postgres::Client;

use super::{describe, schema, session_broken, PgSettings};

pub struct TableSession {
    settings: PgSettings,
    /// `application_name` suffix: `tollgate <purpose>`.
    purpose: &'static str,
    /// `None` after the session ended; the next use reconnects.
    client: Option<Client>,
}

impl TableSession {
    /// Connects and checks that the store's migrations reached `version`
    /// (`missing`: what is missing before it, for the error; `tollgate run`
    /// opens the ledger store, which migrates, first).
    pub fn open(
        settings: &PgSettings,
        purpose: &'static str,
        version: i32,
        missing: &str,
    ) -> Result<TableSession, String> {
        let mut session = TableSession {
            settings: settings.clone(),
            purpose,
            client: None,
        };
        let client = session.client()?;
        let report = schema::report(client, settings).map_err(|e| e.to_string())?;
        if report.current < version {
            return Err(format!(
                "{}: {missing} (schema version {}); start tollgate with this store.url \
                 once so that it migrates the store",
                settings.url, report.current
            ));
        }
        Ok(session)
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    /// The session, reconnected if it ended.
    pub fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let client = self
                .settings
                .connect(self.purpose, Some(self.settings.statement_timeout))
                .map_err(|e| e.to_string())?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// The text of `e`, redacted; drops the session if `e` broke it.
    pub fn failed(&mut self, e: &postgres::Error) -> String {
        self.forget_if(session_broken(e));
        self.settings.url.redact(&describe(e))
    }

    /// Drops the session when `broken` or when it closed, so the next use
    /// reconnects.
    pub fn forget_if(&mut self, broken: bool) {
        if broken || self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
    }
}
