//! Command-line pieces of the HTTP front end: the `serve` flags of the HTTP server and
//! `manager credentials show|init-broker`. The only place that prints a secret is
//! `credentials show`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use manager::api::{self, broker_user, credentials};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `manager serve` flags for the dashboard and the REST API.
#[derive(Args, Debug)]
#[command(next_help_heading = "HTTP API and dashboard")]
pub struct HttpArgs {
    /// Address of the dashboard, the REST API and /metrics [default: 127.0.0.1:8080, and
    /// if that is taken the manager runs without them]. Port 0 picks a free port.
    #[arg(long = "http", env = "SYNC_MANAGER_HTTP", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain: serve HTTPS instead of HTTP (with --tls-key).
    #[arg(long, env = "SYNC_MANAGER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SYNC_MANAGER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl HttpArgs {
    pub fn config(self) -> api::Config {
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(api::TlsFiles { cert, key }),
            _ => None,
        };
        match self.listen {
            Some(listen) => api::Config { listen, required: true, tls, ..api::Config::default() },
            None => api::Config { tls, ..api::Config::default() },
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum CredentialsCmd {
    /// Print the cluster token, the operator token and the broker user (secrets!).
    Show {
        #[arg(long, env = "SYNC_MANAGER_DB", default_value = "manager.db")]
        db: PathBuf,
        /// Print the credentials file's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create (or re-key) the cluster's own RabbitMQ user with rabbitmqctl on this host,
    /// with rights on one vhost, and store its password with the other credentials.
    InitBroker {
        #[arg(long, env = "SYNC_MANAGER_DB", default_value = "manager.db")]
        db: PathBuf,
        /// Virtual host the cluster uses (created if missing).
        #[arg(long, default_value = "/")]
        vhost: String,
        /// Name of the broker user.
        #[arg(long, default_value = broker_user::DEFAULT_USER)]
        user: String,
        /// host:port of the broker, for the URL printed at the end.
        #[arg(long, default_value = "127.0.0.1:5672")]
        broker_host: String,
    },
}

pub fn credentials(cmd: CredentialsCmd) -> anyhow::Result<()> {
    match cmd {
        CredentialsCmd::Show { db, json } => {
            let path = credentials::path_for_db(&db);
            let c = credentials::Credentials::load(&path)?;
            if json {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
                return Ok(());
            }
            println!("file:           {}", path.display());
            println!("operator token: {}", c.operator_token.expose());
            println!("cluster token:  {}", c.cluster_token.expose());
            match &c.broker {
                Some(b) => println!("broker user:    {} on vhost {:?}, password {}", b.user, b.vhost, b.password.expose()),
                None => println!("broker user:    none yet (`manager credentials init-broker` creates one)"),
            }
            Ok(())
        }
        CredentialsCmd::InitBroker { db, vhost, user, broker_host } => {
            if vhost.is_empty() {
                bail!("--vhost must not be empty");
            }
            let path = credentials::path_for_db(&db);
            let b = broker_user::init(&path, &user, &vhost)?;
            println!("broker user {} can now use vhost {:?}; its password is in {}", b.user, b.vhost, path.display());
            println!("nodes connect with: {}", broker_link::redact(&b.url(&broker_host)));
            Ok(())
        }
    }
}
