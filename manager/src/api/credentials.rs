//! The cluster's secrets, kept in `<db dir>/credentials.json` with mode 0600: the cluster
//! token (nodes present it to join and to fetch contents from each other), the operator
//! token (the REST API, the dashboard and `/metrics` require it) and, once
//! `manager credentials init-broker` ran, the cluster's own broker user.
//!
//! The manager creates the file on its first start. Secrets are wrapped in [`Secret`],
//! whose `Debug` and `Display` print `***`, so a stray log line cannot leak one; the
//! only place that prints them is `manager credentials show`.

use anyhow::{bail, Context};
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the file, next to the manager's database.
pub const FILE_NAME: &str = "credentials.json";
/// Random bytes in a token (256 bits: not guessable, printed as 64 hex digits).
pub const TOKEN_BYTES: usize = 32;
/// The file refuses to be read if it is larger than this: it holds a few short strings.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// A secret string. Printing it with `{}` or `{:?}` shows `***`; use [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// A fresh random token of [`TOKEN_BYTES`] bytes from the kernel, as hex.
    pub fn random() -> anyhow::Result<Secret> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("getting random bytes from the kernel: {e}"))?;
        Ok(Secret(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Compares in time independent of where the strings differ, so a client cannot find
    /// a token byte by byte by timing the answers.
    pub fn matches(&self, candidate: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The cluster's broker user (not `guest`), created by `manager credentials init-broker`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUser {
    pub user: String,
    pub password: Secret,
    pub vhost: String,
}

impl BrokerUser {
    /// An AMQP URL for this user on `host:port`, password included (never log it; use
    /// `broker_link::redact`).
    pub fn url(&self, host_port: &str) -> String {
        format!("amqp://{}:{}@{}/{}?heartbeat=10", encode(&self.user), encode(self.password.expose()), host_port, encode(&self.vhost))
    }
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub cluster_token: Secret,
    pub operator_token: Secret,
    pub broker: Option<BrokerUser>,
}

/// Where the credentials of the manager whose database is `db` live.
pub fn path_for_db(db: &Path) -> PathBuf {
    match db.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(FILE_NAME),
        _ => PathBuf::from(FILE_NAME),
    }
}

impl Credentials {
    /// Fresh random tokens, no broker user.
    pub fn generate() -> anyhow::Result<Credentials> {
        Ok(Credentials { cluster_token: Secret::random()?, operator_token: Secret::random()?, broker: None })
    }

    /// Loads the file, or creates it with fresh tokens on first start.
    /// Returns the credentials and whether they were just created.
    pub fn load_or_create(path: &Path) -> anyhow::Result<(Credentials, bool)> {
        if path.exists() {
            return Ok((Credentials::load(path)?, false));
        }
        let creds = Credentials::generate()?;
        creds.save(path)?;
        Ok((creds, true))
    }

    /// Loads the file; refuses one that others can read.
    pub fn load(path: &Path) -> anyhow::Result<Credentials> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("reading {}: no credentials yet (the first `manager serve` with this database creates them)", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!("{} is readable by other users (mode {mode:03o}); run `chmod 600 {}`", path.display(), path.display());
        }
        if meta.len() > MAX_FILE_BYTES {
            bail!("{} is {} bytes, larger than a credentials file can be", path.display(), meta.len());
        }
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Credentials::parse(&text).with_context(|| format!("reading {}", path.display()))
    }

    fn parse(text: &[u8]) -> anyhow::Result<Credentials> {
        let v: serde_json::Value = serde_json::from_slice(text).context("not valid JSON")?;
        let field = |obj: &serde_json::Value, name: &str| -> anyhow::Result<String> {
            obj.get(name).and_then(|x| x.as_str()).map(str::to_string).with_context(|| format!("field {name:?} is missing or not a string"))
        };
        let broker = match v.get("broker") {
            None | Some(serde_json::Value::Null) => None,
            Some(b) => Some(BrokerUser { user: field(b, "user")?, password: Secret(field(b, "password")?), vhost: field(b, "vhost")? }),
        };
        let creds = Credentials { cluster_token: Secret(field(&v, "cluster_token")?), operator_token: Secret(field(&v, "operator_token")?), broker };
        if creds.cluster_token.0.is_empty() || creds.operator_token.0.is_empty() {
            bail!("a token is empty");
        }
        Ok(creds)
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cluster_token": self.cluster_token.expose(),
            "operator_token": self.operator_token.expose(),
            "broker": self.broker.as_ref().map(|b| serde_json::json!({
                "user": b.user, "password": b.password.expose(), "vhost": b.vhost,
            })),
        })
    }

    /// Writes the file atomically (a 0600 temporary file renamed over it).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let body = serde_json::to_vec_pretty(&self.to_json()).context("encoding the credentials")?;
        f.write_all(&body).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for_db(&dir.path().join("m.db"));
        let (a, created) = Credentials::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(a.operator_token.expose().len(), 2 * TOKEN_BYTES);
        assert_ne!(a.operator_token, a.cluster_token);
        let (b, created) = Credentials::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a, b);
    }

    #[test]
    fn a_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        Credentials::generate().unwrap().save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", Credentials::load(&path).unwrap_err());
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let c = Credentials::generate().unwrap();
        let shown = format!("{c:?} {}", c.operator_token);
        assert!(!shown.contains(c.operator_token.expose()));
        assert!(!shown.contains(c.cluster_token.expose()));
    }

    #[test]
    fn token_comparison() {
        let s = Secret::new("abc");
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches(""));
    }

    #[test]
    fn broker_user_round_trips_and_url_is_encoded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut c = Credentials::generate().unwrap();
        c.broker = Some(BrokerUser { user: "sync".into(), password: Secret::new("p@ss/w"), vhost: "/".into() });
        c.save(&path).unwrap();
        assert_eq!(Credentials::load(&path).unwrap(), c);
        assert_eq!(c.broker.unwrap().url("127.0.0.1:5672"), "amqp://sync:p%40ss%2Fw@127.0.0.1:5672/%2F?heartbeat=10");
    }
}
