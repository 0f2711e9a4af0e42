//! Cloud nodes against moto_server, a real EC2-compatible endpoint on loopback, with
//! AMI validation and IAM authentication switched on: `vm create --count 2`, `vm list`
//! with ids and IPs, the user-data carrying the node start command and the broker
//! address, `vm rm`; and every failure (malformed, unreachable or non-EC2 endpoint,
//! wrong or missing credentials, unknown image, unknown VM id) as one clear line on
//! stderr, nothing on stdout, nothing recorded.
//! Needs scripts/setup-moto.sh (moto in /opt/syncfs-moto or $SYNC_MOTO_VENV) and the
//! manager built with `--features manager/ec2`.

mod prov_support;

use prov_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Requests moto serves without authentication: the three IAM calls that create the test's
/// user, its policy and its access key. Everything after that must be signed correctly.
const NO_AUTH_ACTIONS: u32 = 3;
const BROKER_PUBLIC: &str = "amqp://sync:s3cret@203.0.113.5:5672/%2f";

fn venv() -> PathBuf {
    std::env::var_os("SYNC_MOTO_VENV").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/syncfs-moto"))
}

struct Moto {
    url: String,
    _proc: Proc,
}

fn start_moto(dir: &Path, host: &str) -> Moto {
    let server = venv().join("bin/moto_server");
    assert!(server.is_file(), "{} missing: run scripts/setup-moto.sh", server.display());
    let port = free_port_on(host);
    let mut cmd = Command::new(server);
    cmd.args(["-H", host, "-p", &port.to_string()]).env("MOTO_ENABLE_AMI_VALIDATION", "true").env("INITIAL_NO_AUTH_ACTION_COUNT", NO_AUTH_ACTIONS.to_string());
    let mut proc = Proc::spawn("moto_server", &mut cmd, dir.join("moto.log"));
    eventually(Duration::from_secs(30), "moto_server to listen", || {
        proc.assert_alive();
        std::net::TcpStream::connect((host, port)).map(|_| ()).map_err(|e| e.to_string())
    });
    Moto { url: format!("http://{host}:{port}"), _proc: proc }
}

/// Creates an IAM user with an access key in moto (the only unauthenticated calls) and
/// returns (key id, secret, an AMI id moto knows).
fn credentials_and_ami(moto: &str) -> (String, String, String) {
    let script = r#"
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1")
iam = boto3.client("iam", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", **kw)
iam.create_user(UserName="syncfs-test")
iam.put_user_policy(UserName="syncfs-test", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
k = iam.create_access_key(UserName="syncfs-test")["AccessKey"]
ec2 = boto3.client("ec2", aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"], **kw)
print(k["AccessKeyId"], k["SecretAccessKey"], ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])
"#;
    let out = run_ok(Command::new(venv().join("bin/python")).args(["-c", script, moto]));
    let w: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(w.len(), 3, "unexpected helper output: {out}");
    (w[0].into(), w[1].into(), w[2].into())
}

struct Vm<'a> {
    cluster: &'a str,
    endpoint: &'a str,
    db: &'a Path,
    key: &'a str,
    secret: &'a str,
}

/// A moto EC2 endpoint with credentials and an image, and a manager database and a
/// cluster name of their own: what every VM test starts from. (Moto stops before its
/// directory goes: fields drop in order.) Its servers listen on a loopback address of
/// its own: two tests that found the same free port each talk to their own moto (CI once
/// saw one test's IAM user appear in the other's).
struct Cloud {
    host: String,
    moto: Moto,
    tmp: tempfile::TempDir,
    key: String,
    secret: String,
    ami: String,
    db: PathBuf,
    cluster: String,
}

impl Cloud {
    fn start(cluster_prefix: &str) -> Cloud {
        let tmp = tempfile::tempdir().unwrap();
        let host = own_loopback();
        let moto = start_moto(tmp.path(), &host);
        let (key, secret, ami) = credentials_and_ami(&moto.url);
        let db = tmp.path().join("manager.db");
        Cloud { host, moto, tmp, key, secret, ami, db, cluster: unique(cluster_prefix) }
    }
    fn vm(&self) -> Vm<'_> {
        Vm { cluster: &self.cluster, endpoint: &self.moto.url, db: &self.db, key: &self.key, secret: &self.secret }
    }
}

/// Words no error may show: pieces of the SDK's `Debug` of a request (which holds its
/// body, and so the user-data with the broker password), anyhow's `Caused by:` lines and
/// stack backtraces.
const NEVER_IN_AN_ERROR: &[&str] = &["body", "Request", "SdkBody", "DispatchFailure", "ConnectorError", "Caused by", "backtrace", "s3cret"];
/// An error line longer than this is a dump, not a sentence.
const MAX_ERROR_LINE: usize = 300;

impl Vm<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = manager(self.cluster);
        c.arg("vm").args(args).args(["--endpoint-url", self.endpoint, "--region", "us-east-1", "--db"]).arg(self.db);
        // Only the credentials given here: no profile or instance metadata from the machine.
        // The AWS files exist but are empty (a missing one makes the SDK log a warning).
        let empty = self.db.with_file_name("aws-empty");
        std::fs::write(&empty, "").unwrap();
        c.env("AWS_ACCESS_KEY_ID", self.key)
            .env("AWS_SECRET_ACCESS_KEY", self.secret)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", &empty)
            .env("AWS_SHARED_CREDENTIALS_FILE", &empty)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            // A stack backtrace after an error is debugging output the user opts into
            // (anyhow follows RUST_BACKTRACE); these tests check what a user sees without it.
            .env("RUST_LIB_BACKTRACE", "0");
        c
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = run(&mut self.cmd(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("built without EC2 support"), "the manager was built without EC2: build it with --features manager/ec2");
        assert!(out.status.success(), "manager vm {args:?} failed:\n{}\n{err}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn fails(&self, args: &[&str]) -> String {
        let out = run(&mut self.cmd(args));
        assert!(!out.status.success(), "manager vm {args:?} succeeded but should fail:\n{}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
    /// Runs a command that must fail with one clear line: nothing on stdout (no table
    /// header), stderr one non-empty line shorter than [`MAX_ERROR_LINE`] holding each of
    /// `words` (any case) and none of `absent` or [`NEVER_IN_AN_ERROR`]. Returns what is
    /// wrong instead of panicking, so one run reports every case.
    fn fails_in_one_line(&self, args: &[&str], words: &[&str], absent: &[&str]) -> Result<(), String> {
        let out = run(&mut self.cmd(args));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let err = stderr.trim();
        let mut wrong = Vec::new();
        if out.status.success() {
            wrong.push("succeeded".to_string());
        }
        if !stdout.trim().is_empty() {
            wrong.push(format!("printed on stdout: {:?}", stdout.trim()));
        }
        if err.is_empty() || err.contains('\n') {
            wrong.push(format!("stderr is {} lines, not one", err.lines().count()));
        }
        if err.chars().count() >= MAX_ERROR_LINE {
            wrong.push(format!("stderr is {} characters long", err.chars().count()));
        }
        let lower = err.to_lowercase();
        wrong.extend(words.iter().filter(|w| !lower.contains(&w.to_lowercase())).map(|w| format!("does not say {w:?}")));
        let secret = [self.secret].into_iter().filter(|s| !s.is_empty());
        let mut shown: Vec<&str> = NEVER_IN_AN_ERROR.iter().chain(absent).copied().filter(|w| err.contains(w)).collect();
        shown.extend(secret.filter(|s| err.contains(s)));
        wrong.extend(shown.iter().map(|w| format!("shows {w:?}")));
        if wrong.is_empty() {
            return Ok(());
        }
        let shown_err: String = err.chars().take(600).collect();
        Err(format!("manager vm {args:?} (endpoint {}): {}\n  stderr: {shown_err}", self.endpoint, wrong.join("; ")))
    }
}

/// The instance ids `vm create` printed, one per line.
fn instance_ids(out: &str) -> Vec<String> {
    out.lines().filter_map(|l| l.split_whitespace().next()).filter(|w| w.starts_with("i-")).map(str::to_string).collect()
}

fn recorded(db: &Path) -> Vec<(String, String)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c.prepare("SELECT id, state FROM vms ORDER BY id").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

#[test]
fn vms_on_moto() {
    let cloud = Cloud::start("vm");
    let (ami, db, cluster) = (cloud.ami.as_str(), cloud.db.as_path(), cloud.cluster.as_str());
    let vm = cloud.vm();

    // Two VMs in one command; ids and IPs printed and recorded.
    let out = vm.ok(&["create", "--count", "2", "--image-id", ami, "--instance-type", "t3.micro", "--broker-public", BROKER_PUBLIC]);
    let ids = instance_ids(&out);
    assert_eq!(ids.len(), 2, "create printed:\n{out}");
    assert!(!out.contains("s3cret"), "the broker password was printed:\n{out}");
    assert_eq!(recorded(db).len(), 2);

    let list = vm.ok(&["list"]);
    for id in &ids {
        let line = list.lines().find(|l| l.starts_with(id.as_str())).unwrap_or_else(|| panic!("{id} missing from:\n{list}"));
        let w: Vec<&str> = line.split_whitespace().collect();
        assert!(w[1] == "running" || w[1] == "pending", "{line}");
        assert!(w[2].parse::<std::net::Ipv4Addr>().is_ok() && w[3].parse::<std::net::Ipv4Addr>().is_ok(), "no IPs in: {line}");
    }

    // The user-data, read back from the cloud, starts a node aimed at the public broker.
    let ud = vm.ok(&["user-data", &ids[0]]);
    assert!(ud.starts_with("#!/bin/bash"), "{ud}");
    assert!(ud.contains(&format!("BROKER='{BROKER_PUBLIC}'")), "broker address missing:\n{ud}");
    assert!(ud.contains("docker run -d --name \"$NODE_ID\""), "{ud}");
    assert!(ud.contains("--id \"$NODE_ID\" --mount \"$MOUNT\" --data /var/lib/syncfs --broker \"$BROKER\""), "node start command missing:\n{ud}");
    assert!(ud.contains("apt-get install -y -q docker.io fuse3"), "{ud}");
    assert!(ud.contains(&format!("CLUSTER='{cluster}'")), "{ud}");

    // A bad request is refused before the cloud and records nothing (the cloud's
    // failures are `vm_failures_are_one_clear_line`).
    let err = vm.fails(&["create", "--image-id", ami, "--broker-public", "not-a-url"]);
    assert!(err.contains("invalid public broker URL"), "{err}");
    assert_eq!(recorded(db).len(), 2, "a failed create left rows behind");
    // An id the manager did not launch is refused even while it has VMs.
    vm.fails_in_one_line(&["rm", "i-00000000000000000"], &["no VM i-00000000000000000 in cluster"], &["cloud"]).unwrap();

    // Terminate one, then the rest.
    let out = vm.ok(&["rm", &ids[0]]);
    assert!(out.contains(&format!("terminated {}", ids[0])), "{out}");
    let list = vm.ok(&["list"]);
    let line = list.lines().find(|l| l.starts_with(ids[0].as_str())).map(str::to_string).unwrap_or_default();
    assert!(line.is_empty() || line.contains("terminated") || line.contains("shutting-down"), "{list}");
    assert_eq!(recorded(db).iter().map(|r| r.0.clone()).collect::<Vec<_>>(), vec![ids[1].clone()]);
    let out = vm.ok(&["rm", "--all"]);
    assert!(out.contains("terminated 1 VM(s)") && out.contains(&ids[1]), "{out}");
    assert!(recorded(db).is_empty());
}

/// A web server that is not EC2 (python's http.server answers a POST with 501 and a
/// page of HTML): what `--endpoint-url` reaches when it names the wrong port.
fn start_web_server(dir: &Path, host: &str) -> (String, Proc) {
    let port = free_port_on(host);
    let mut cmd = Command::new(venv().join("bin/python"));
    cmd.args(["-m", "http.server", &port.to_string(), "--bind", host]);
    let mut proc = Proc::spawn("http.server", &mut cmd, dir.join("http.log"));
    eventually(Duration::from_secs(30), "http.server to listen", || {
        proc.assert_alive();
        std::net::TcpStream::connect((host, port)).map(|_| ()).map_err(|e| e.to_string())
    });
    (format!("http://{host}:{port}"), proc)
}

/// Regression: `vm create --endpoint-url 'not a url'` printed about 1,400 characters of
/// the SDK's request (body included) under "the cloud refused", and `vm list` printed its
/// table header before failing. Every failure is one line naming the cause and what to
/// do; an unknown VM id is the manager's refusal, not the cloud's.
#[test]
fn vm_failures_are_one_clear_line() {
    let cloud = Cloud::start("vmerr");
    let (web, _web) = start_web_server(cloud.tmp.path(), &cloud.host);
    let (ami, db, cluster) = (cloud.ami.as_str(), cloud.db.as_path(), cloud.cluster.as_str());
    let vm = cloud.vm();
    let create = |image: &str| -> Vec<String> { ["create", "--image-id", image, "--broker-public", BROKER_PUBLIC].map(String::from).to_vec() };
    let mut problems = Vec::new();
    let mut check = |vm: &Vm, args: &[String], words: &[&str], absent: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(p) = vm.fails_in_one_line(&args, words, absent) {
            problems.push(p);
        }
    };
    let list = || vec!["list".to_string()];

    // A malformed endpoint is refused before the SDK sees it.
    for bad in ["not a url", "ftp://127.0.0.1:5000", "127.0.0.1:5000", "http://"] {
        let v = Vm { endpoint: bad, ..vm };
        check(&v, &create(ami), &["invalid --endpoint-url", bad, "http(s)://"], &[]);
        check(&v, &list(), &["invalid --endpoint-url"], &[]);
    }
    // Nothing listens there.
    let closed = format!("http://{}:{}", cloud.host, free_port_on(&cloud.host));
    let v = Vm { endpoint: &closed, ..vm };
    for args in [create(ami), list()] {
        check(&v, &args, &["cannot reach the EC2 endpoint", &closed, "connection refused", "--endpoint-url"], &[]);
    }
    // Something listens there, but it is not EC2.
    let v = Vm { endpoint: &web, ..vm };
    for args in [create(ami), list()] {
        check(&v, &args, &[&web, "HTTP 501", "--endpoint-url points at an EC2 API"], &[]);
    }
    // Wrong credentials: moto checks them (IAM authentication is on).
    let wrong = Vm { key: "AKIAWRONGWRONGWRONG1", secret: "not-the-secret", ..vm };
    for args in [create(ami), list()] {
        check(&wrong, &args, &["refused the credentials", &cloud.moto.url, "AuthFailure", "AWS_ACCESS_KEY_ID", "--profile"], &[]);
    }
    // No credentials at all.
    let none = Vm { key: "", secret: "", ..vm };
    check(&none, &list(), &["AWS credentials", "AWS_ACCESS_KEY_ID", "--profile"], &[]);
    // An image the region does not have.
    check(&vm, &create("ami-00000000"), &["image ami-00000000 does not exist in region us-east-1", "InvalidAMIID", "describe-images"], &[]);
    // An id the manager never launched: refused by the manager, the cloud is not asked.
    for cmd in ["rm", "user-data"] {
        let args = [cmd, "i-00000000000000000"].map(String::from);
        check(&vm, &args, &[&format!("no VM i-00000000000000000 in cluster {cluster}"), "manager vm list"], &["cloud", "InvalidInstanceID"]);
    }

    assert!(problems.is_empty(), "{} failure(s) not shown as one clear line:\n{}", problems.len(), problems.join("\n"));
    assert!(recorded(db).is_empty(), "a failed command recorded VMs: {:?}", recorded(db));
}

/// `vm create --node-users ADMIN`: each VM's node gets its own least-privilege broker user
/// and a node id chosen by the manager, both in its own user-data; `vm rm` revokes the
/// user and deletes its queue.
#[test]
fn vms_with_their_own_broker_users() {
    let cloud = Cloud::start("vmu");
    let ami = cloud.ami.as_str();
    let vm = cloud.vm();
    let vhost = Vhost::new("vm-users");
    let out = vm.ok(&["create", "--count", "2", "--image-id", ami, "--broker-public", BROKER_PUBLIC, "--node-users", &vhost.url()]);
    let ids = instance_ids(&out);
    assert_eq!(ids.len(), 2, "create printed:\n{out}");
    let users = || run_ok(Command::new("rabbitmqctl").args(["-q", "list_users"]));
    let mut nodes = Vec::new();
    for id in &ids {
        let ud = vm.ok(&["user-data", id]);
        let node = ud.lines().find_map(|l| l.strip_prefix("NODE_ID=")).expect("a fixed node id").trim_matches('\'').to_string();
        assert!(node.starts_with("vm-") && node.len() == 11, "{node}");
        let broker = ud.lines().find_map(|l| l.strip_prefix("BROKER=")).unwrap();
        assert!(broker.contains(&format!("sync-node-{node}:")) && broker.contains("203.0.113.5"), "the VM's broker URL is not its own user's: {broker}");
        assert!(!broker.contains("s3cret"), "the VM got the shared broker password");
        let perms = run_ok(Command::new("rabbitmqctl").args(["-q", "list_user_permissions", &format!("sync-node-{node}")]));
        assert!(perms.contains(&vhost.name) && perms.contains("^sync\\.updates$"), "{perms}");
        nodes.push(node);
    }
    assert_ne!(nodes[0], nodes[1]);
    vm.ok(&["rm", &ids[0]]);
    assert!(!users().contains(&format!("sync-node-{}", nodes[0])), "vm rm left the node's broker user");
    assert!(users().contains(&format!("sync-node-{}", nodes[1])));
    vm.ok(&["rm", "--all"]);
    assert!(!users().contains(&format!("sync-node-{}", nodes[1])), "vm rm --all left a node's broker user");
}
