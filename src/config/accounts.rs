//! `conf/accounts.yaml`: seed accounts with argon2id password hashes.
//!
//! Seeds create accounts (with their opening balances) that the ledger does
//! not have yet; an account the ledger already knows keeps its balance — the
//! ledger, not this file, is authoritative for money. Plain-text passwords
//! are never accepted here: the CLI (`tollgate accounts add|passwd`) hashes
//! them before they reach the file.

use std::collections::HashSet;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

use super::{yaml_error, ConfigError};
use crate::ledger::Role;
use crate::money::{format_credits, parse_credits};

/// Longest account name (SPEC 3.1).
pub const ACCOUNT_NAME_MAX_LEN: usize = 64;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccounts {
    #[serde(default)]
    accounts: Vec<FileAccount>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccount {
    name: String,
    #[serde(default = "default_role")]
    role: String,
    password_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tariff_class: Option<String>,
    /// Opening any-time balance in credits (decimal), applied once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    anytime: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offpeak: Option<serde_yaml::Value>,
    /// Boxis clients may log in with this instead of the account name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    /// The Boxis API key (SPEC 2.1), in clear: the authcode is an md5 over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boxis_user_key: Option<String>,
}

fn default_role() -> String {
    "user".into()
}

/// A validated seed account.
#[derive(Clone)]
pub struct AccountSeed {
    pub name: String,
    pub role: Role,
    /// argon2id PHC string.
    pub password_hash: String,
    pub parent: Option<String>,
    pub tariff_class: Option<String>,
    pub anytime_milli: i64,
    pub offpeak_milli: i64,
    /// Another name a Boxis client may log in with (unique, compared
    /// case-insensitively).
    pub email: Option<String>,
    /// The Boxis user key: a secret held in clear because the Boxis
    /// authcode is `md5(timestamp + user_key)`. Never printed.
    pub boxis_user_key: Option<String>,
}

impl std::fmt::Debug for AccountSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountSeed")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("parent", &self.parent)
            .field("anytime_milli", &self.anytime_milli)
            .field("offpeak_milli", &self.offpeak_milli)
            .field("email", &self.email)
            .field(
                "boxis_user_key",
                &self.boxis_user_key.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// Renders a YAML scalar as decimal text without going through floating
/// point arithmetic (a YAML number is formatted back to its shortest text).
pub fn decimal_text(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Hashes a password with argon2id (default parameters, random salt).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing with default parameters cannot fail")
        .to_string()
}

/// Checks an account name: 1..=64 characters, no control characters, no
/// characters that would need escaping in URLs or XML.
pub fn validate_account_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > ACCOUNT_NAME_MAX_LEN {
        return Err(format!(
            "must be 1 to {ACCOUNT_NAME_MAX_LEN} characters long"
        ));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "<>&\"'%+/?#".contains(c))
    {
        return Err("may not contain whitespace, control characters or any of <>&\"'%+/?#".into());
    }
    Ok(())
}

/// Longest e-mail address (RFC 5321 path limit).
pub const EMAIL_MAX_LEN: usize = 254;
/// Bounds of a Boxis user key, in characters.
pub const BOXIS_USER_KEY_LEN: std::ops::RangeInclusive<usize> = 8..=128;

/// Checks an e-mail address loosely: one `@` with text on both sides, no
/// whitespace or control characters, at most [`EMAIL_MAX_LEN`] bytes.
pub fn validate_email(email: &str) -> Result<(), String> {
    let ok = email.len() <= EMAIL_MAX_LEN
        && email.split('@').count() == 2
        && !email.starts_with('@')
        && !email.ends_with('@')
        && !email.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be an e-mail address (local@domain, at most {EMAIL_MAX_LEN} bytes, no spaces)"
        ))
    }
}

/// Checks a Boxis user key: printable ASCII without spaces, 8 to 128
/// characters. The message never contains the key.
pub fn validate_boxis_user_key(key: &str) -> Result<(), String> {
    if BOXIS_USER_KEY_LEN.contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!(
            "must be {} to {} printable ASCII characters without spaces",
            BOXIS_USER_KEY_LEN.start(),
            BOXIS_USER_KEY_LEN.end()
        ))
    }
}

fn amount(path: &Path, key: String, v: &Option<serde_yaml::Value>) -> Result<i64, ConfigError> {
    let Some(v) = v else { return Ok(0) };
    let text = decimal_text(v)
        .ok_or_else(|| ConfigError::new(path, &key, "must be a decimal amount, e.g. 100 or 2.5"))?;
    let milli = parse_credits(&text)
        .map_err(|e| ConfigError::new(path, &key, format!("{e}; write e.g. 100 or 2.5")))?;
    if milli < 0 {
        return Err(ConfigError::new(
            path,
            key,
            "an opening balance cannot be negative",
        ));
    }
    Ok(milli)
}

/// Loads and validates an accounts file.
pub fn load(path: &Path) -> Result<Vec<AccountSeed>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, "(file)", format!("cannot read: {e}")))?;
    parse(&text, path)
}

pub fn parse(text: &str, path: &Path) -> Result<Vec<AccountSeed>, ConfigError> {
    let file: FileAccounts = serde_yaml::from_str(text).map_err(|e| yaml_error(path, e))?;
    let mut seen = HashSet::new();
    let mut seen_emails = HashSet::new();
    let mut seeds = Vec::with_capacity(file.accounts.len());
    for (i, a) in file.accounts.iter().enumerate() {
        let key = |field: &str| format!("accounts[{i}].{field}");
        validate_account_name(&a.name).map_err(|p| ConfigError::new(path, key("name"), p))?;
        if !seen.insert(a.name.clone()) {
            return Err(ConfigError::new(
                path,
                key("name"),
                format!("{:?} is listed twice; account names are unique", a.name),
            ));
        }
        let role = Role::parse(&a.role).ok_or_else(|| {
            ConfigError::new(
                path,
                key("role"),
                format!("{:?} is not valid; use admin or user", a.role),
            )
        })?;
        let parsed = PasswordHash::new(&a.password_hash).map_err(|_| {
            ConfigError::new(
                path,
                key("password_hash"),
                "is not a PHC string; create one with `tollgate accounts passwd`",
            )
        })?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err(ConfigError::new(
                path,
                key("password_hash"),
                "must be an argon2id hash; create one with `tollgate accounts passwd`",
            ));
        }
        if let Some(email) = &a.email {
            validate_email(email).map_err(|p| ConfigError::new(path, key("email"), p))?;
            if !seen_emails.insert(email.to_lowercase()) {
                return Err(ConfigError::new(
                    path,
                    key("email"),
                    format!("{email:?} belongs to another account; e-mail addresses are unique"),
                ));
            }
        }
        if let Some(k) = &a.boxis_user_key {
            validate_boxis_user_key(k)
                .map_err(|p| ConfigError::new(path, key("boxis_user_key"), p))?;
        }
        seeds.push(AccountSeed {
            name: a.name.clone(),
            role,
            password_hash: a.password_hash.clone(),
            parent: a.parent.clone(),
            tariff_class: a.tariff_class.clone(),
            anytime_milli: amount(path, key("anytime"), &a.anytime)?,
            offpeak_milli: amount(path, key("offpeak"), &a.offpeak)?,
            email: a.email.clone(),
            boxis_user_key: a.boxis_user_key.clone(),
        });
    }
    for (i, s) in seeds.iter().enumerate() {
        if let Some(p) = &s.parent {
            if !seen.contains(p) {
                return Err(ConfigError::new(
                    path,
                    format!("accounts[{i}].parent"),
                    format!("{p:?} is not an account in this file"),
                ));
            }
            if p == &s.name {
                return Err(ConfigError::new(
                    path,
                    format!("accounts[{i}].parent"),
                    "an account cannot be its own parent",
                ));
            }
        }
    }
    Ok(order_parents_first(seeds))
}

/// Orders seeds so that every parent comes before its children (the ledger
/// requires a parent to exist when a child is opened). Cycles keep file order
/// and fail later at `open_account`.
fn order_parents_first(mut seeds: Vec<AccountSeed>) -> Vec<AccountSeed> {
    let mut out: Vec<AccountSeed> = Vec::with_capacity(seeds.len());
    let mut placed: HashSet<String> = HashSet::new();
    while !seeds.is_empty() {
        let before = seeds.len();
        seeds.retain(|s| {
            let ready = s.parent.as_ref().is_none_or(|p| placed.contains(p));
            if ready {
                placed.insert(s.name.clone());
                out.push(s.clone());
            }
            !ready
        });
        if seeds.len() == before {
            out.append(&mut seeds);
        }
    }
    out
}

/// Writes seeds back (used by `tollgate accounts add|passwd`).
pub fn save(path: &Path, seeds: &[AccountSeed]) -> Result<(), ConfigError> {
    let file = FileAccounts {
        accounts: seeds
            .iter()
            .map(|s| FileAccount {
                name: s.name.clone(),
                role: s.role.as_str().to_string(),
                password_hash: s.password_hash.clone(),
                parent: s.parent.clone(),
                tariff_class: s.tariff_class.clone(),
                anytime: (s.anytime_milli != 0)
                    .then(|| serde_yaml::Value::String(format_credits(s.anytime_milli))),
                offpeak: (s.offpeak_milli != 0)
                    .then(|| serde_yaml::Value::String(format_credits(s.offpeak_milli))),
                email: s.email.clone(),
                boxis_user_key: s.boxis_user_key.clone(),
            })
            .collect(),
    };
    let text = serde_yaml::to_string(&file)
        .map_err(|e| ConfigError::new(path, "(file)", format!("cannot render: {e}")))?;
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(
        &tmp,
        format!("# tollgate seed accounts; edit with `tollgate accounts`.\n{text}"),
    )
    .and_then(|_| std::fs::rename(&tmp, path))
    .map_err(|e| ConfigError::new(path, "(file)", format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(hash: &str) -> String {
        format!(
            "accounts:\n  - name: kid\n    parent: boss\n    password_hash: '{hash}'\n  - name: boss\n    role: admin\n    password_hash: '{hash}'\n    anytime: 2.5\n"
        )
    }

    #[test]
    fn loads_orders_parents_first_and_parses_amounts() {
        let hash = hash_password("pw");
        let seeds = parse(&file_with(&hash), Path::new("a.yaml")).unwrap();
        assert_eq!(seeds[0].name, "boss");
        assert_eq!(seeds[0].anytime_milli, 2500);
        assert_eq!(seeds[0].role, Role::Admin);
        assert_eq!(seeds[1].parent.as_deref(), Some("boss"));
        assert!(!format!("{:?}", seeds[0]).contains(&hash));
    }

    #[test]
    fn rejects_bad_hash_role_and_parent() {
        let e = parse(&file_with("plaintext"), Path::new("a.yaml")).unwrap_err();
        assert_eq!(e.key, "accounts[0].password_hash");
        let hash = hash_password("pw");
        let text = file_with(&hash).replace("role: admin", "role: root");
        assert_eq!(
            parse(&text, Path::new("a.yaml")).unwrap_err().key,
            "accounts[1].role"
        );
        let text = file_with(&hash).replace("parent: boss", "parent: nobody");
        assert_eq!(
            parse(&text, Path::new("a.yaml")).unwrap_err().key,
            "accounts[0].parent"
        );
    }

    #[test]
    fn boxis_identity_fields_validate_round_trip_and_stay_secret() {
        let hash = hash_password("pw");
        let text = format!(
            "accounts:\n  - name: a\n    password_hash: '{hash}'\n    email: A@Example.com\n    boxis_user_key: BX3KwWU2SuqvoEWnjYmOibf\n  - name: b\n    password_hash: '{hash}'\n"
        );
        let seeds = parse(&text, Path::new("a.yaml")).unwrap();
        assert_eq!(seeds[0].email.as_deref(), Some("A@Example.com"));
        assert_eq!(
            seeds[0].boxis_user_key.as_deref(),
            Some("BX3KwWU2SuqvoEWnjYmOibf")
        );
        assert!(!format!("{:?}", seeds[0]).contains("BX3KwWU2"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.yaml");
        save(&path, &seeds).unwrap();
        let again = load(&path).unwrap();
        assert_eq!(again[0].boxis_user_key, seeds[0].boxis_user_key);
        assert_eq!(again[1].email, None);

        let dup = text.replace("  - name: b\n", "  - name: b\n    email: a@example.COM\n");
        let e = parse(&dup, Path::new("a.yaml")).unwrap_err();
        assert_eq!(e.key, "accounts[1].email");
        let bad = text.replace("A@Example.com", "not an email");
        assert_eq!(
            parse(&bad, Path::new("a.yaml")).unwrap_err().key,
            "accounts[0].email"
        );
        let short = text.replace("BX3KwWU2SuqvoEWnjYmOibf", "short");
        let e = parse(&short, Path::new("a.yaml")).unwrap_err();
        assert_eq!(e.key, "accounts[0].boxis_user_key");
        assert!(!e.to_string().contains("short\""));
    }

    #[test]
    fn save_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.yaml");
        let seeds = parse(&file_with(&hash_password("pw")), Path::new("a.yaml")).unwrap();
        save(&path, &seeds).unwrap();
        let again = load(&path).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].anytime_milli, 2500);
    }
}
