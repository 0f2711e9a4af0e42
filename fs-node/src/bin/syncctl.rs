//! `syncctl`: talks to a running node's HTTP server: status, sync, conflicts.

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use fs_node::link::SyncReport;
use fs_node::status::{BriefStatus, NodeStatus};
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
    /// List the kept versions of PATH (a path in the mount, or relative to it): revision,
    /// node, time, size, and whether a node that keeps it is online.
    Versions {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List deleted files and directories (below DIR if given) that can be restored.
    Trash {
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Bring back PATH as it was at a revision (default: its previous version, or what it
    /// was before it was deleted; a directory with its whole tree). A path changed since
    /// is never overwritten: the restored version goes beside it.
    Restore {
        path: PathBuf,
        /// The revision to restore (from `syncctl versions` or `syncctl trash`).
        #[arg(long)]
        rev: Option<u64>,
        /// Restore to this path instead (in the mount, or relative to it).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Keep PATH (a file or a whole directory; the mount's root for all) local: its
    /// contents are fetched now and never evicted (docs/on-demand.md).
    Pin { path: PathBuf },
    /// Make PATH on demand: its contents may be evicted from this node (while another
    /// node holds them) and new contents below it come when first read.
    Unpin { path: PathBuf },
}

/// Bytes for people: 1.5 GiB, 300 KiB, 12 B.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `p` as a path relative to the mount (it may be given inside the mount, absolute, or
/// already relative to the mount's root).
fn in_mount(p: &Path, mount: &str) -> anyhow::Result<String> {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) };
    let rel = match abs.strip_prefix(mount) {
        Ok(r) => r.to_path_buf(),
        Err(_) if p.is_relative() => p.to_path_buf(),
        Err(_) => bail!("{} is not in the mount {mount}", p.display()),
    };
    Ok(rel.to_string_lossy().trim_matches('/').to_string())
}

fn rel_path(p: &Path, mount: &str) -> anyhow::Result<wire::RelPath> {
    let rel = in_mount(p, mount)?;
    wire::RelPath::new(rel.clone()).with_context(|| format!("{rel:?} is not a path in the mount"))
}

fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn describe(v: &Option<wire::Version>) -> String {
    match v {
        None => "deleted".into(),
        Some(v) => match &v.content {
            wire::Content::File { size, .. } => format!("file {size} bytes, mode {:o}", v.mode),
            wire::Content::Dir => format!("directory, mode {:o}", v.mode),
            wire::Content::Symlink { target } => format!("symlink to {target}"),
        },
    }
}

/// Asks the manager, through the node, and returns its answer (a failure is an error).
async fn ask(cli: &Cli, query: &wire::Query) -> anyhow::Result<wire::Answer> {
    let resp = call(cli, reqwest::Method::POST, "/ask", Some(serde_json::to_vec(query)?)).await?;
    match resp.json().await.context("decoding the manager's answer")? {
        wire::Answer::Failed { reason } => bail!("{reason}"),
        a => Ok(a),
    }
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
    call(cli, method, path, None).await
}

/// A request to the node, with the cluster token and a body if given; an answer other
/// than success is an error with the node's reason.
async fn call(cli: &Cli, method: reqwest::Method, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<reqwest::Response> {
    let url = format!("{}{}", node_url(cli)?, path);
    let mut req = fs_node::puller::http_client(cli.tls_ca.as_deref())?.request(method, &url);
    if let Some(t) = &cli.cluster_token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b);
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
    // Output into a pipe closed early (`syncctl status | head -1`, `grep -q`) ends the
    // process quietly, as it does other command-line tools, not with a panic of `println!`.
    // SAFETY: called before any other thread runs; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
                println!("node:      {}", s.brief.id);
                println!("state:     {}", s.brief.state());
                println!("mount:     {}", s.brief.mount);
                println!("revision:  {} (last seen from the manager)", s.last_revision);
                println!("uploads:   {} local change(s) waiting for the manager", s.brief.pending_changes);
                println!("downloads: {} pull(s) in progress", s.brief.pending_pulls);
                println!("files:     {} ({} directories)", s.files, s.dirs);
                println!("conflicts: {}", s.brief.conflicts_seen);
                println!("ignored:   {} path(s) kept to this node (syncctl ignored)", s.ignored);
                println!(
                    "versions:  {} old content(s) kept for the cluster, {} bytes ({} on disk besides the files)",
                    s.kept_contents,
                    s.kept_bytes,
                    bytes(s.kept_disk_bytes)
                );
                let r = &s.residency;
                if r.counted {
                    println!(
                        "contents:  {} file(s) local ({}), {} on demand ({}){}",
                        r.local_files,
                        bytes(r.local_bytes),
                        r.remote_files,
                        bytes(r.remote_bytes),
                        if r.on_demand { "; new files come on demand" } else { "" }
                    );
                } else {
                    println!("contents:  every file's content kept here (no path on demand)");
                }
                if s.cache.budget > 0 {
                    println!(
                        "cache:     budget {}; {} content(s) evicted ({}); {} last cop(ies) kept",
                        bytes(s.cache.budget),
                        s.cache.evicted_contents,
                        bytes(s.cache.evicted_bytes),
                        s.cache.last_copies_kept
                    );
                }
                for (p, pinned) in &r.pins {
                    println!("{}    /{p}", if *pinned { "pinned:  " } else { "on demand:" });
                }
                for p in &s.pulls {
                    println!(
                        "fetching:  {} {} of {} ({}%)",
                        &p.hash.to_hex().as_str()[..12],
                        bytes(p.done),
                        bytes(p.size),
                        (p.done * 100).checked_div(p.size).unwrap_or(100)
                    );
                }
                match &s.last_sync {
                    Some(r) => println!("last sync: pushed {}, pulled {}, conflicts {}, failed {}", r.pushed, r.pulled, r.conflicts, r.failed),
                    None => println!("last sync: none yet"),
                }
            }
        }
        Cmd::Pin { path } | Cmd::Unpin { path } => {
            let pinned = matches!(cli.cmd, Cmd::Pin { .. });
            let s = brief_status(&cli).await?;
            let rel = in_mount(path, &s.mount)?;
            let body = serde_json::json!({ "path": rel, "pinned": pinned });
            let r: serde_json::Value =
                call(&cli, reqwest::Method::POST, "/pin", Some(serde_json::to_vec(&body)?)).await?.json().await.context("decoding the answer")?;
            let what = if rel.is_empty() { "the whole tree".to_string() } else { rel };
            if pinned {
                println!(
                    "{what} is pinned: {} file(s) being fetched (syncctl status --watch shows them)",
                    r.get("fetching").and_then(|n| n.as_u64()).unwrap_or(0)
                );
            } else {
                println!("{what} is on demand: its contents may be evicted while another node holds them");
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
            let s = brief_status(&cli).await?;
            let paths: Vec<String> = request(&cli, reqwest::Method::GET, "/ignored").await?.json().await.context("decoding the ignored paths")?;
            let below = match dir {
                Some(d) => in_mount(d, &s.mount)?,
                None => String::new(),
            };
            for p in paths.iter().filter(|p| below.is_empty() || p.as_str() == below || p.starts_with(&format!("{below}/"))) {
                println!("{}", Path::new(&s.mount).join(p).display());
            }
        }
        Cmd::Versions { path, json } => {
            let s = brief_status(&cli).await?;
            let wire::Answer::Versions { versions, .. } = ask(&cli, &wire::Query::Versions { path: rel_path(path, &s.mount)? }).await? else {
                bail!("the manager answered something else")
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&versions)?);
            } else {
                if versions.is_empty() {
                    eprintln!("no versions of {} are kept", path.display());
                }
                for v in &versions {
                    let state = if v.ended_ms.is_none() {
                        "current"
                    } else if v.refused {
                        "refused (conflict cap), kept"
                    } else if v.version.is_none() {
                        "deleted here"
                    } else if v.available {
                        "available"
                    } else {
                        "UNAVAILABLE (no node that keeps it is online)"
                    };
                    println!("r{:<8} {}  {:<12} {:<40} {state}", v.rev.0, when(v.at_ms), v.node, describe(&v.version));
                }
            }
        }
        Cmd::Trash { dir, json } => {
            let s = brief_status(&cli).await?;
            let dir = dir.as_deref().map(|d| rel_path(d, &s.mount)).transpose()?;
            let wire::Answer::Trash { items } = ask(&cli, &wire::Query::Trash { dir }).await? else { bail!("the manager answered something else") };
            if *json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                if items.is_empty() {
                    eprintln!("the trash is empty");
                }
                for t in &items {
                    let what = match t.version.content {
                        wire::Content::Dir => format!("directory with {} path(s) below", t.below),
                        _ => describe(&Some(t.version.clone())),
                    };
                    println!(
                        "{}  deleted {} by {} (r{}); restore --rev {}: {what}",
                        t.path,
                        when(t.deleted_ms),
                        t.deleted_by,
                        t.deleted_rev.0,
                        t.restore_rev.0
                    );
                }
            }
        }
        Cmd::Restore { path, rev, to } => {
            let s = brief_status(&cli).await?;
            let query = wire::Query::Restore {
                path: rel_path(path, &s.mount)?,
                rev: rev.map(wire::Revision),
                to: to.as_deref().map(|t| rel_path(t, &s.mount)).transpose()?,
                base: None,
            };
            let wire::Answer::Restored(r) = ask(&cli, &query).await? else { bail!("the manager answered something else") };
            println!("restored {} path(s) as of revision {}", r.restored.len(), r.from_rev.0);
            for (p, beside) in &r.beside {
                println!("{p} changed since: the restored version is at {beside}");
            }
            for p in &r.unavailable {
                println!("{p}: not restored (no online node keeps its content)");
            }
            if r.left_out > 0 {
                println!("({} more path(s) not listed)", r.left_out);
            }
            if r.restored.is_empty() && r.beside.is_empty() {
                bail!("nothing could be restored");
            }
        }
        Cmd::Conflicts => {
            let s = brief_status(&cli).await?;
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

/// The node's brief status: cheap at any tree size, for what polls it.
async fn brief_status(cli: &Cli) -> anyhow::Result<BriefStatus> {
    request(cli, reqwest::Method::GET, "/status/brief").await?.json().await.context("decoding the status")
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

    fn show(&mut self, s: &BriefStatus) {
        if s.pending_pulls == 0 {
            self.most = 0;
        }
        self.most = self.most.max(s.pending_pulls);
        let state = s.state();
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
        t.show(&brief_status(cli).await?);
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
                if let Ok(s) = brief_status(cli).await {
                    t.show(&s);
                }
            }
        }
    }
}
