//! `syncctl`: talks to a running node's HTTP server: status, sync, conflicts.

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use fs_node::link::SyncReport;
use fs_node::status::NodeStatus;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "syncctl", version, about = "Control a running sync node")]
struct Cli {
    /// The node's data directory (its URL is read from node.url there).
    #[arg(long, env = "SYNC_DATA", global = true)]
    data: Option<PathBuf>,
    /// The node's HTTP URL, instead of --data.
    #[arg(long, env = "SYNC_NODE_URL", global = true)]
    node: Option<String>,
    /// Cluster token, if the node requires one.
    #[arg(long, env = "SYNC_CLUSTER_TOKEN", hide_env_values = true, global = true)]
    cluster_token: Option<String>,
    /// Extra CA certificates (PEM) to trust when the node serves https.
    #[arg(long, env = "SYNC_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connected or offline, pending changes, transfers, last sync.
    Status {
        #[arg(long)]
        json: bool,
        /// Keep watching: progress bars on a terminal, a line per change otherwise.
        #[arg(long)]
        watch: bool,
    },
    /// Reconcile with the manager now; prints what was pushed, pulled and conflicted.
    /// Exits non-zero if the manager cannot be reached.
    Sync,
    /// List the conflict files in the mount.
    Conflicts,
    /// List the paths this node keeps to itself (ignore rules), below DIR if given (a
    /// directory in the mount, or a path relative to it).
    Ignored { dir: Option<PathBuf> },
}

fn node_url(cli: &Cli) -> anyhow::Result<String> {
    if let Some(u) = &cli.node {
        return Ok(u.trim_end_matches('/').to_string());
    }
    let Some(d) = &cli.data else { bail!("say which node: --data DIR or --node URL") };
    let p = d.join("node.url");
    let u = std::fs::read_to_string(&p).with_context(|| format!("reading {} (is the node running?)", p.display()))?;
    Ok(u.trim().to_string())
}

fn conflict_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(" (conflict from ") {
            out.push(p.clone());
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            conflict_files(&p, out);
        }
    }
}

async fn request(cli: &Cli, method: reqwest::Method, path: &str) -> anyhow::Result<reqwest::Response> {
    let url = format!("{}{}", node_url(cli)?, path);
    let mut req = fs_node::puller::http_client(cli.tls_ca.as_deref())?.request(method, &url);
    if let Some(t) = &cli.cluster_token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.with_context(|| format!("cannot reach the node at {url}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        bail!("{}", body.get("error").and_then(|e| e.as_str()).map(str::to_string).unwrap_or_else(|| format!("the node answered {status}")));
    }
    Ok(resp)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    if cli_support::generate_if_asked(Cli::command())? {
        return Ok(());
    }
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Status { watch: true, .. } => watch(&cli).await?,
        Cmd::Status { json, watch: false } => {
            let s: NodeStatus = request(&cli, reqwest::Method::GET, "/status").await?.json().await.context("decoding the status")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("node:      {}", s.id);
                println!("state:     {}", if s.connected { "online" } else { "offline" });
                println!("mount:     {}", s.mount);
                println!("revision:  {} (last seen from the manager)", s.last_revision);
                println!("uploads:   {} local change(s) waiting for the manager", s.pending_changes);
                println!("downloads: {} pull(s) in progress", s.pending_pulls);
                println!("files:     {} ({} directories)", s.files, s.dirs);
                println!("conflicts: {}", s.conflicts_seen);
                println!("ignored:   {} path(s) kept to this node (syncctl ignored)", s.ignored);
                match &s.last_sync {
                    Some(r) => println!("last sync: pushed {}, pulled {}, conflicts {}, failed {}", r.pushed, r.pulled, r.conflicts, r.failed),
                    None => println!("last sync: none yet"),
                }
            }
        }
        Cmd::Sync => {
            let sync = request(&cli, reqwest::Method::POST, "/sync");
            let r: SyncReport = with_progress(&cli, sync).await?.json().await.context("decoding the sync report")?;
            println!(
                "pushed {} change(s), pulled {}, {} conflict(s), {} failed (retried automatically); revision {} ({:.2}s)",
                r.pushed, r.pulled, r.conflicts, r.failed, r.head, r.seconds
            );
        }
        Cmd::Ignored { dir } => {
            let s: NodeStatus = status(&cli).await?;
            let paths: Vec<String> = request(&cli, reqwest::Method::GET, "/ignored").await?.json().await.context("decoding the ignored paths")?;
            let below = match dir {
                Some(d) => {
                    let abs = if d.is_absolute() { d.clone() } else { std::env::current_dir()?.join(d) };
                    let rel = abs.strip_prefix(&s.mount).map(Path::to_path_buf).unwrap_or_else(|_| d.clone());
                    rel.to_string_lossy().trim_matches('/').to_string()
                }
                None => String::new(),
            };
            for p in paths.iter().filter(|p| below.is_empty() || p.as_str() == below || p.starts_with(&format!("{below}/"))) {
                println!("{}", Path::new(&s.mount).join(p).display());
            }
        }
        Cmd::Conflicts => {
            let s: NodeStatus = request(&cli, reqwest::Method::GET, "/status").await?.json().await.context("decoding the status")?;
            let mut files = Vec::new();
            conflict_files(Path::new(&s.mount), &mut files);
            files.sort();
            for f in &files {
                println!("{}", f.display());
            }
            if files.is_empty() {
                eprintln!("no conflict files");
            }
        }
    }
    Ok(())
}

async fn status(cli: &Cli) -> anyhow::Result<NodeStatus> {
    request(cli, reqwest::Method::GET, "/status").await?.json().await.context("decoding the status")
}

/// Transfers as a bar: the longest queue of pulls seen is the length, what is done of it
/// the position.
struct Transfers {
    bar: Option<indicatif::ProgressBar>,
    most: u64,
    last_line: String,
    /// Plain lines go to stderr when stdout carries a result (`sync`).
    lines_to_stderr: bool,
}

impl Transfers {
    fn new(lines_to_stderr: bool) -> Transfers {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} pulls  {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        Transfers { bar, most: 0, last_line: String::new(), lines_to_stderr }
    }

    fn show(&mut self, s: &NodeStatus) {
        if s.pending_pulls == 0 {
            self.most = 0;
        }
        self.most = self.most.max(s.pending_pulls);
        let state = if s.connected { "online" } else { "offline" };
        let msg = format!("{} pending change(s), {} MB pulled, {} conflict(s)", s.pending_changes, s.bytes_pulled / 1_000_000, s.conflicts_seen);
        match &self.bar {
            Some(b) => {
                b.set_prefix(format!("{} {state}", s.id));
                b.set_length(self.most);
                b.set_position(self.most - s.pending_pulls);
                b.set_message(msg);
            }
            None => {
                let line = format!("{} {state}: {} pull(s) in progress, {msg}", s.id, s.pending_pulls);
                if line != self.last_line {
                    if self.lines_to_stderr {
                        eprintln!("{line}");
                    } else {
                        println!("{line}");
                    }
                    self.last_line = line;
                }
            }
        }
    }
}

async fn watch(cli: &Cli) -> anyhow::Result<()> {
    let mut t = Transfers::new(false);
    loop {
        t.show(&status(cli).await?);
        // Often enough that a transfer of a second or less still shows up.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Runs `fut` while showing the node's transfers.
async fn with_progress<T>(cli: &Cli, fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let mut t = Transfers::new(true);
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(300));
    loop {
        tokio::select! {
            r = &mut fut => {
                if let Some(b) = &t.bar {
                    b.finish_and_clear();
                }
                return r;
            }
            _ = tick.tick() => {
                if let Ok(s) = status(cli).await {
                    t.show(&s);
                }
            }
        }
    }
}
