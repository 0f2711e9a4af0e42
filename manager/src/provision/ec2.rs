//! Cloud nodes: VMs started through the EC2 API (AWS, or any EC2-compatible endpoint
//! such as OpenStack's or moto's via `endpoint_url`), each booting a node container
//! from its user-data (cloud-init).
//!
//! Owns the `vms` table of the manager's database: a VM is recorded only after the cloud
//! accepted it, and if recording fails the instances are terminated again, so the table
//! never holds half a launch. Only instances tagged with this cluster are listed or
//! removed. The client (aws-sdk-ec2) exists only with the `ec2` cargo feature; without
//! it [`Ec2::new`] returns [`Error::Ec2NotBuilt`], so callers compile either way.
//!
//! Every failure is one line naming the cause and what to do: the SDK's errors are taken
//! apart (code, status, causes) and never shown as they are, since their `Debug` and some
//! of their messages hold the whole request, body (the user-data, with the broker's
//! password) included.

use super::{Error, Result, LABEL_CLUSTER};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Instance type when none is given: the smallest that runs Docker and a node comfortably.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.small";
/// Most VMs one `create` call starts: a guard against typos, well under usual quotas.
pub const MAX_VMS_PER_CALL: i32 = 50;
/// EC2 rejects user-data above 16 KiB (before base64).
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;
/// How long one cloud call may take, retries included, before we give up and say so.
pub const OPERATION_TIMEOUT_S: u64 = 60;
/// How long connecting to the endpoint may take.
pub const CONNECT_TIMEOUT_S: u64 = 5;
/// How long SQLite waits for the manager's own loop to release the database.
pub const DB_BUSY_TIMEOUT_MS: u64 = 5_000;
/// Most characters of cloud or user text (a cloud's message, an id, a URL) quoted in one
/// error: enough for any real cloud message's first sentence, short enough that an error
/// stays one readable line instead of a dump.
pub const MAX_QUOTED_CHARS: usize = 200;
/// The `op` of [`Error::Cloud`] when the client itself cannot be set up (no region, no
/// credentials): this manager's missing configuration, not something the cloud said.
pub const OP_CONFIGURE: &str = "configure the EC2 client";

/// Where and as whom to talk to the cloud. Unset fields follow the standard AWS
/// configuration (env vars `AWS_*`, `~/.aws/config` and `credentials`, profile).
#[derive(Clone, Debug)]
pub struct Ec2Config {
    /// Cluster name, written as the `syncfs.cluster` tag on every instance.
    pub cluster: String,
    pub region: Option<String>,
    /// EC2-compatible endpoint (OpenStack, moto), e.g. `http://127.0.0.1:5000`.
    pub endpoint_url: Option<String>,
    /// AWS profile name.
    pub profile: Option<String>,
    /// The manager's SQLite database (the `vms` table lives there).
    pub db: PathBuf,
}

impl Default for Ec2Config {
    fn default() -> Self {
        Ec2Config { cluster: super::DEFAULT_CLUSTER.into(), region: None, endpoint_url: None, profile: None, db: PathBuf::from("manager.db") }
    }
}

/// What to launch.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub count: i32,
    pub instance_type: String,
    /// Machine image with a Debian/Ubuntu userland (cloud-init and apt are used).
    pub image_id: String,
    pub key_name: Option<String>,
    /// A security group id (`sg-…`) or name.
    pub security_group: Option<String>,
    /// Broker URL as the VMs reach it (the manager host's public address).
    pub broker_public: String,
    /// Where a VM downloads the node image tarball (`docker save` output) from; without
    /// it the machine image must already hold the node image.
    pub node_image_url: Option<String>,
    /// Node image tag to run.
    pub node_image: String,
    /// Mount path of the node inside its container.
    pub mount_path: String,
    /// Token the nodes require from peers (fs-node `--cluster-token`), if any.
    pub cluster_token: Option<String>,
    /// When set (a broker URL as the manager reaches it, with a user that may configure
    /// the vhost): each VM's node gets its own least-privilege broker user, and a node id
    /// chosen here (`vm-<8 hex>`) instead of its instance id; each VM is launched alone,
    /// with its own credentials in its user-data.
    pub admin_broker: Option<String>,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            count: 1,
            instance_type: DEFAULT_INSTANCE_TYPE.into(),
            image_id: String::new(),
            key_name: None,
            security_group: None,
            broker_public: String::new(),
            node_image_url: None,
            node_image: super::image_tag(),
            mount_path: super::DEFAULT_MOUNT_PATH.into(),
            cluster_token: None,
            admin_broker: None,
        }
    }
}

/// One VM as recorded and as last seen in the cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    pub id: String,
    pub cluster: String,
    /// EC2 state name: `pending`, `running`, `shutting-down`, `terminated`, …
    pub state: String,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    pub instance_type: String,
    pub image_id: String,
    pub launched_ms: i64,
}

/// Quotes `s` for a POSIX shell (single quotes; embedded ones closed and escaped).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The cloud-init user-data that turns a fresh Debian/Ubuntu VM into a node: installs
/// Docker and FUSE, loads the node image, starts one node container named after the
/// instance id, pointed at `spec.broker_public`. Contains the broker URL (and so its
/// password): whoever may read instance attributes can read it.
pub fn user_data(cluster: &str, spec: &VmSpec) -> String {
    user_data_for(cluster, spec, None)
}

/// The node a VM runs under its own broker user: its id and its broker URL (a secret).
pub struct OwnNode<'a> {
    pub id: &'a str,
    pub broker: &'a str,
}

/// The node id a VM's user-data fixes (a VM with its own broker user), if any.
pub fn own_node_of(user_data: &str) -> Option<wire::NodeId> {
    let line = user_data.lines().find_map(|l| l.strip_prefix("NODE_ID="))?;
    line.trim_matches('\'').parse().ok().filter(|_| !line.trim_matches('\'').is_empty())
}

/// [`user_data`], for a VM whose node runs as `own` when given.
pub fn user_data_for(cluster: &str, spec: &VmSpec, own: Option<OwnNode<'_>>) -> String {
    let port = super::VM_NODE_PORT;
    let data = super::DEFAULT_DATA_PATH;
    format!(
        r#"#!/bin/bash
# syncfs node bootstrap, written by `manager vm create` (cluster {cluster}).
set -euo pipefail
exec >>/var/log/syncfs-node-bootstrap.log 2>&1
export DEBIAN_FRONTEND=noninteractive
CLUSTER={cluster_q}
IMAGE={image}
IMAGE_URL={image_url}
BROKER={broker}
MOUNT={mount}
CLUSTER_TOKEN={token}
NODE_ID={node_id}
if ! command -v docker >/dev/null || ! command -v fusermount3 >/dev/null; then
  apt-get update -q
  apt-get install -y -q docker.io fuse3 curl
fi
systemctl enable --now docker 2>/dev/null || (nohup dockerd >/var/log/dockerd.log 2>&1 &)
for _ in $(seq 90); do docker info >/dev/null 2>&1 && break; sleep 2; done
docker info >/dev/null
if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  if [ -z "$IMAGE_URL" ]; then echo "node image $IMAGE is missing and no image URL was given" >&2; exit 1; fi
  curl -fsSL --retry 5 "$IMAGE_URL" | docker load
fi
TOKEN=$(curl -sf -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' || true)
md() {{ curl -sf ${{TOKEN:+-H "X-aws-ec2-metadata-token: $TOKEN"}} "http://169.254.169.254/latest/meta-data/$1"; }}
NODE_ID=${{NODE_ID:-$(md instance-id)}}
ADDR=$(md public-ipv4 || md local-ipv4)
docker rm -f "$NODE_ID" >/dev/null 2>&1 || true
docker run -d --name "$NODE_ID" --restart unless-stopped \
  --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined --network host \
  ${{CLUSTER_TOKEN:+-e "SYNC_CLUSTER_TOKEN=$CLUSTER_TOKEN"}} \
  -v "$NODE_ID-data:{data}" --label {label}="$CLUSTER" --label syncfs.role=node \
  "$IMAGE" --id "$NODE_ID" --mount "$MOUNT" --data {data} --broker "$BROKER" \
  --listen 0.0.0.0:{port} --advertise "http://$ADDR:{port}"
"#,
        cluster_q = sh_quote(cluster),
        image = sh_quote(&spec.node_image),
        image_url = sh_quote(spec.node_image_url.as_deref().unwrap_or("")),
        broker = sh_quote(own.as_ref().map(|o| o.broker).unwrap_or(&spec.broker_public)),
        node_id = sh_quote(own.as_ref().map(|o| o.id).unwrap_or("")),
        mount = sh_quote(&spec.mount_path),
        token = sh_quote(spec.cluster_token.as_deref().unwrap_or("")),
        label = LABEL_CLUSTER,
    )
}

/// The first non-empty line of `text`, other control and line-break characters turned
/// into spaces, cut to `max` characters (marked with "…"): how cloud and user text is
/// quoted in an error, which must stay one line.
pub fn first_line(text: &str, max: usize) -> String {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    let clean: String = line.chars().map(|c| if c.is_control() || c.is_whitespace() { ' ' } else { c }).collect();
    if clean.chars().count() <= max {
        return clean;
    }
    let mut cut: String = clean.chars().take(max).collect();
    cut.push('…');
    cut
}

/// Checks `--endpoint-url` before the SDK sees it: the SDK takes any string and fails
/// only when it sends, with an error that quotes the whole request (body included).
pub fn validate_endpoint_url(url: &str) -> Result<()> {
    let invalid = |reason: &str| Error::Invalid {
        what: "--endpoint-url",
        value: first_line(url, MAX_QUOTED_CHARS),
        reason: format!("{reason}; give the EC2 endpoint as http(s)://HOST[:PORT], e.g. http://127.0.0.1:5000"),
    };
    let uri: hyper::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid("the scheme must be http or https"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    Ok(())
}

/// Checks a region name: the SDK builds the endpoint's host name from it, so a stray
/// character would again fail only when sending. Letters too, for OpenStack's `RegionOne`.
pub fn validate_region(region: &str) -> Result<()> {
    let ok = !region.is_empty() && region.len() <= 64 && region.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        return Ok(());
    }
    Err(Error::Invalid {
        what: "--region",
        value: first_line(region, MAX_QUOTED_CHARS),
        reason: "use a region name such as us-east-1 (letters, digits, '-', '_', '.')".into(),
    })
}

/// Checks a launch request before anything reaches the cloud.
pub fn validate_spec(spec: &VmSpec) -> Result<()> {
    let invalid = |what: &'static str, value: &str, reason: &str| Err(Error::Invalid { what, value: value.into(), reason: reason.into() });
    if spec.count < 1 || spec.count > MAX_VMS_PER_CALL {
        return invalid("count", &spec.count.to_string(), &format!("must be 1 to {MAX_VMS_PER_CALL}"));
    }
    if spec.image_id.trim().is_empty() {
        return invalid("image id", &spec.image_id, "give the machine image to boot with --image-id (a Debian or Ubuntu AMI)");
    }
    if !(spec.broker_public.starts_with("amqp://") || spec.broker_public.starts_with("amqps://")) {
        // The URL may hold a password: never echo it.
        return invalid(
            "public broker URL",
            "(hidden)",
            "give the broker's address as the VMs reach it, e.g. --broker-public amqp://user:pass@203.0.113.5:5672/%2f",
        );
    }
    Ok(())
}

/// The `vms` table: what the manager launched and last saw.
#[derive(Clone)]
pub struct VmTable {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

const VMS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS vms(
    id TEXT PRIMARY KEY, cluster TEXT NOT NULL, state TEXT NOT NULL, public_ip TEXT, private_ip TEXT,
    instance_type TEXT NOT NULL, image_id TEXT NOT NULL, launched_ms INTEGER NOT NULL)";

impl VmTable {
    /// Opens (creating if needed) the `vms` table in the manager's database.
    pub fn open(db: &std::path::Path) -> Result<VmTable> {
        let conn = rusqlite::Connection::open(db)?;
        conn.busy_timeout(std::time::Duration::from_millis(DB_BUSY_TIMEOUT_MS))?;
        conn.execute_batch(VMS_SCHEMA)?;
        Ok(VmTable { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `f` with the connection on a blocking thread (SQLite must not block the runtime).
    async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static) -> Result<T> {
        let conn = self.conn.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| Error::Io { what: "the database thread".into(), source: std::io::Error::other(e) })?;
        Ok(r?)
    }

    /// Records `vms` all at once (one transaction), replacing rows with the same id.
    pub async fn record(&self, vms: Vec<VmInfo>) -> Result<()> {
        self.with(move |c| {
            let tx = c.transaction()?;
            for v in &vms {
                tx.execute(
                    "INSERT OR REPLACE INTO vms(id, cluster, state, public_ip, private_ip, instance_type, image_id, launched_ms) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                    rusqlite::params![v.id, v.cluster, v.state, v.public_ip, v.private_ip, v.instance_type, v.image_id, v.launched_ms],
                )?;
            }
            tx.commit()
        })
        .await
    }

    /// Updates state and addresses of recorded VMs; ids not recorded are ignored.
    pub async fn refresh(&self, seen: Vec<VmInfo>) -> Result<()> {
        self.with(move |c| {
            let tx = c.transaction()?;
            for v in &seen {
                tx.execute(
                    "UPDATE vms SET state = ?2, public_ip = ?3, private_ip = ?4 WHERE id = ?1",
                    rusqlite::params![v.id, v.state, v.public_ip, v.private_ip],
                )?;
            }
            tx.commit()
        })
        .await
    }

    pub async fn forget(&self, ids: Vec<String>) -> Result<()> {
        self.with(move |c| {
            let tx = c.transaction()?;
            for id in &ids {
                tx.execute("DELETE FROM vms WHERE id = ?1", [id])?;
            }
            tx.commit()
        })
        .await
    }

    /// The recorded VM `id` of `cluster`, or [`Error::VmNotFound`]. `rm` and `user-data`
    /// ask this before the cloud, so an unknown id is the manager's refusal, not the cloud's.
    pub async fn require(&self, cluster: &str, id: &str) -> Result<VmInfo> {
        let found = self.list(cluster).await?.into_iter().find(|v| v.id == id);
        found.ok_or_else(|| Error::VmNotFound { id: first_line(id, MAX_QUOTED_CHARS), cluster: cluster.to_string() })
    }

    /// The recorded VMs of `cluster`, by launch time.
    pub async fn list(&self, cluster: &str) -> Result<Vec<VmInfo>> {
        let cluster = cluster.to_string();
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT id, cluster, state, public_ip, private_ip, instance_type, image_id, launched_ms FROM vms WHERE cluster = ?1 ORDER BY launched_ms, id",
            )?;
            let rows = st.query_map([cluster], |r| {
                Ok(VmInfo {
                    id: r.get(0)?,
                    cluster: r.get(1)?,
                    state: r.get(2)?,
                    public_ip: r.get(3)?,
                    private_ip: r.get(4)?,
                    instance_type: r.get(5)?,
                    image_id: r.get(6)?,
                    launched_ms: r.get(7)?,
                })
            })?;
            rows.collect()
        })
        .await
    }
}

/// A cloud account/region to launch node VMs in, scoped to one cluster.
#[derive(Clone)]
pub struct Ec2 {
    #[cfg(feature = "ec2")]
    client: aws_sdk_ec2::Client,
    /// The endpoint as errors name it: `--endpoint-url`, or "for region R" (AWS's own).
    #[cfg(feature = "ec2")]
    endpoint: String,
    #[cfg(feature = "ec2")]
    region: String,
    cluster: String,
    table: VmTable,
}

#[cfg(not(feature = "ec2"))]
impl Ec2 {
    /// Without the `ec2` feature there is no cloud client: always [`Error::Ec2NotBuilt`].
    pub async fn new(_cfg: &Ec2Config) -> Result<Ec2> {
        Err(Error::Ec2NotBuilt)
    }
    pub async fn create(&self, _spec: &VmSpec) -> Result<Vec<VmInfo>> {
        Err(Error::Ec2NotBuilt)
    }
    pub async fn list(&self) -> Result<Vec<VmInfo>> {
        Err(Error::Ec2NotBuilt)
    }
    pub async fn remove(&self, _id: &str) -> Result<()> {
        Err(Error::Ec2NotBuilt)
    }
    pub async fn remove_all(&self) -> Result<Vec<String>> {
        Err(Error::Ec2NotBuilt)
    }
    pub async fn user_data_of(&self, _id: &str) -> Result<String> {
        Err(Error::Ec2NotBuilt)
    }
    pub fn table(&self) -> &VmTable {
        &self.table
    }
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}

#[cfg(feature = "ec2")]
mod cloud {
    use super::super::validate_name;
    use super::*;
    use aws_sdk_ec2::config::http::HttpResponse;
    use aws_sdk_ec2::config::ProvideCredentials;
    use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
    use aws_sdk_ec2::types::{Filter, Instance, InstanceAttributeName, InstanceType, ResourceType, Tag, TagSpecification};
    use base64::Engine;
    use std::time::Duration;

    /// Codes for "the endpoint does not accept who we are": the key, secret or token.
    const CREDENTIAL_CODES: &[&str] = &[
        "AuthFailure",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "InvalidToken",
        "ExpiredToken",
        "ExpiredTokenException",
    ];
    /// Codes for "we are known, but may not do this".
    const PERMISSION_CODES: &[&str] = &["UnauthorizedOperation", "AccessDenied", "AccessDeniedException"];
    /// Codes for quotas and capacity.
    const CAPACITY_CODES: &[&str] = &["InstanceLimitExceeded", "VcpuLimitExceeded", "InsufficientInstanceCapacity", "MaxSpotInstanceCountExceeded"];
    const THROTTLE_CODES: &[&str] = &["RequestLimitExceeded", "Throttling", "ThrottlingException"];
    /// Codes for a signature whose time the endpoint does not accept.
    const CLOCK_CODES: &[&str] = &["RequestExpired", "RequestTimeTooSkewed"];

    /// What a failed call was about: the words its error needs.
    pub(super) struct Call<'a> {
        pub op: &'static str,
        pub endpoint: &'a str,
        pub region: &'a str,
        /// The image a launch asked for.
        pub image: Option<&'a str>,
        /// The instances the call was about.
        pub instances: Option<&'a str>,
    }

    /// How a call failed, taken apart from the SDK's error (which must never be shown:
    /// its `Debug` and some of its `Display`s hold the whole request, body included).
    #[derive(Debug)]
    pub(super) enum Failure<'a> {
        /// The endpoint answered with an error (`code` is absent when the answer was not
        /// an EC2 error at all, e.g. a web server's 404 page).
        Service { code: Option<&'a str>, message: Option<&'a str>, status: u16 },
        /// No connection: refused, no such host, TLS failed, or (`reason` None) no
        /// connection within [`CONNECT_TIMEOUT_S`].
        Unreachable { reason: Option<String> },
        /// Connected, but the whole call took longer than [`OPERATION_TIMEOUT_S`].
        Timeout,
        /// The answer was not an EC2 response.
        BadResponse { status: u16, reason: String },
        /// The request could not be prepared (signing, endpoint, building it).
        NotSent { reason: String },
    }

    /// The one-line sentence for a failed call: what failed, why, and what to do.
    pub(super) fn explain(call: &Call, failure: &Failure) -> String {
        let (op, ep) = (call.op, first_line(call.endpoint, MAX_QUOTED_CHARS));
        let region = first_line(call.region, MAX_QUOTED_CHARS);
        let image = first_line(call.image.unwrap_or("(none)"), MAX_QUOTED_CHARS);
        let instances = first_line(call.instances.unwrap_or("(none)"), MAX_QUOTED_CHARS);
        let check_endpoint = "check that --endpoint-url points at an EC2 API";
        match failure {
            Failure::Service { code: Some(code), message, .. } => {
                let c = first_line(code, MAX_QUOTED_CHARS);
                let c = c.as_str();
                match c {
                    _ if CREDENTIAL_CODES.contains(&c) => {
                        format!("the EC2 endpoint {ep} refused the credentials ({c}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --profile")
                    }
                    _ if PERMISSION_CODES.contains(&c) => format!(
                        "the credentials are not allowed to {op} ({c}): allow it in their IAM policy, or use others (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --profile)"
                    ),
                    _ if CLOCK_CODES.contains(&c) => {
                        format!("the EC2 endpoint {ep} refused the request's time ({c}): set this machine's clock right (requests are signed with it)")
                    }
                    "OptInRequired" => format!("the account may not use EC2 in region {region} ({c}): enable the region for the account, or pass another --region"),
                    "InvalidAMIID.Malformed" => {
                        format!("image id {image} is malformed ({c}): pass an image id (ami-…) from `aws ec2 describe-images`")
                    }
                    _ if c.starts_with("InvalidAMIID") => {
                        format!("image {image} does not exist in region {region} ({c}): pass an image id from `aws ec2 describe-images`")
                    }
                    _ if c.starts_with("InvalidInstanceID") => {
                        format!("the cloud has no instance {instances} in region {region} ({c}): it may be gone already (see `manager vm list`)")
                    }
                    _ if c.starts_with("InvalidKeyPair") => {
                        format!("the key pair of --key-name does not exist in region {region} ({c}): create it or pass another")
                    }
                    _ if c.starts_with("InvalidGroup") => {
                        format!("the security group of --security-group does not exist in region {region} ({c}): create it or pass another")
                    }
                    _ if CAPACITY_CODES.contains(&c) => format!(
                        "the cloud has no room to {op} ({c}): try fewer VMs, another instance type or region, or ask for a higher limit"
                    ),
                    _ if THROTTLE_CODES.contains(&c) => format!("the cloud is throttling this account's requests ({c}): wait a minute and try again"),
                    _ => format!("the cloud refused to {op}: {c}: {}", first_line(message.unwrap_or("no message"), MAX_QUOTED_CHARS)),
                }
            }
            Failure::Service { code: None, status, .. } => {
                format!("the EC2 endpoint {ep} answered HTTP {status} without an EC2 error to {op}: {check_endpoint}")
            }
            Failure::Unreachable { reason } => {
                let reason = match reason {
                    Some(r) => first_line(r, MAX_QUOTED_CHARS),
                    None => format!("no connection within {CONNECT_TIMEOUT_S}s"),
                };
                format!("cannot reach the EC2 endpoint {ep} to {op}: {reason} (check --endpoint-url/--region and the network)")
            }
            Failure::Timeout => {
                format!("no answer from the EC2 endpoint {ep} within {OPERATION_TIMEOUT_S}s to {op} (check --endpoint-url/--region and the network)")
            }
            Failure::BadResponse { status, reason } => format!(
                "the EC2 endpoint {ep} answered HTTP {status} to {op} with something that is not an EC2 response ({}): {check_endpoint}",
                first_line(reason, MAX_QUOTED_CHARS)
            ),
            Failure::NotSent { reason } => format!("could not prepare the request to {op} for the EC2 endpoint {ep}: {}", first_line(reason, MAX_QUOTED_CHARS)),
        }
    }

    /// Text from inside the SDK, made quotable: some of its messages embed the request's
    /// `Debug` (body included), so anything from there on is cut off.
    fn sdk_text(text: &str) -> String {
        let cut = ["Request {", " to request `", "SdkBody", "Response {"].iter().filter_map(|m| text.find(m)).min().unwrap_or(text.len());
        first_line(&text[..cut], MAX_QUOTED_CHARS)
    }

    /// The texts of `e`'s causes, outermost first, each quotable and different from the one before.
    fn causes(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        /// Deeper than any SDK error nests; a guard against a cycle.
        const MAX_DEPTH: usize = 16;
        let mut out: Vec<String> = Vec::new();
        let mut next = e.source();
        while let Some(cause) = next.filter(|_| out.len() < MAX_DEPTH) {
            let t = sdk_text(&cause.to_string());
            if !t.is_empty() && out.last() != Some(&t) {
                out.push(t);
            }
            next = cause.source();
        }
        out
    }

    /// Takes the SDK's error apart into a [`Failure`], reading codes, statuses and the
    /// causes' texts, never the error's `Debug`.
    pub(super) fn failure<E: ProvideErrorMetadata + std::error::Error + 'static>(err: &SdkError<E, HttpResponse>) -> Failure<'_> {
        match err {
            SdkError::ServiceError(se) => Failure::Service { code: se.err().code(), message: se.err().message(), status: se.raw().status().as_u16() },
            SdkError::DispatchFailure(d) => match d.as_connector_error() {
                Some(c) if c.is_timeout() => Failure::Unreachable { reason: None },
                // hyper's outer levels ("client error (Connect)") say nothing; the last two
                // name the step and the cause: "tcp connect error: Connection refused (os
                // error 111)", "dns error: failed to lookup address…", "TLS handshake failed: …".
                Some(c) if c.is_io() => {
                    let all = causes(c);
                    Failure::Unreachable { reason: Some(all[all.len().saturating_sub(2)..].join(": ")) }
                }
                Some(c) => Failure::NotSent { reason: causes(c).join(": ") },
                None => Failure::NotSent { reason: causes(err).join(": ") },
            },
            SdkError::TimeoutError(_) => Failure::Timeout,
            SdkError::ResponseError(r) => Failure::BadResponse { status: r.raw().status().as_u16(), reason: causes(err).join(": ") },
            _ => Failure::NotSent { reason: causes(err).join(": ") },
        }
    }

    /// Turns an SDK error into [`Error::Cloud`] with one clear line (see [`explain`]).
    fn cloud_err<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(call: &Call, err: SdkError<E, HttpResponse>) -> Error {
        let failure = failure(&err);
        tracing::debug!(op = call.op, ?failure, "EC2 call failed");
        Error::Cloud { op: call.op, message: explain(call, &failure) }
    }

    fn info(cluster: &str, i: &Instance) -> Option<VmInfo> {
        Some(VmInfo {
            id: i.instance_id()?.to_string(),
            cluster: cluster.to_string(),
            state: i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_else(|| "unknown".into()),
            public_ip: i.public_ip_address().map(str::to_string),
            private_ip: i.private_ip_address().map(str::to_string),
            instance_type: i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
            image_id: i.image_id().unwrap_or_default().to_string(),
            launched_ms: i.launch_time().map(|t| t.to_millis().unwrap_or(0)).unwrap_or(0),
        })
    }

    impl Ec2 {
        /// Loads the standard AWS configuration with `cfg`'s overrides and opens the `vms` table.
        /// Checks the endpoint URL and region, and that credentials can be found, before
        /// any call: each of these would otherwise fail only at the first request.
        pub async fn new(cfg: &Ec2Config) -> Result<Ec2> {
            validate_name("cluster name", &cfg.cluster)?;
            if let Some(u) = &cfg.endpoint_url {
                validate_endpoint_url(u)?;
            }
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(Duration::from_secs(OPERATION_TIMEOUT_S))
                    .connect_timeout(Duration::from_secs(CONNECT_TIMEOUT_S))
                    .build(),
            );
            if let Some(r) = &cfg.region {
                loader = loader.region(aws_config::Region::new(r.clone()));
            }
            if let Some(u) = &cfg.endpoint_url {
                loader = loader.endpoint_url(u.clone());
            }
            if let Some(p) = &cfg.profile {
                loader = loader.profile_name(p.clone());
            }
            let sdk = loader.load().await;
            let Some(region) = sdk.region().map(|r| r.to_string()) else {
                return Err(Error::Cloud { op: OP_CONFIGURE, message: "no AWS region for the EC2 client: pass --region or set AWS_REGION".into() });
            };
            validate_region(&region)?;
            // The SDK would otherwise report missing credentials from inside its first
            // request, as a multi-line list of every provider it tried.
            let found = match sdk.credentials_provider() {
                Some(p) => p.provide_credentials().await.map(drop).map_err(|e| e.to_string()),
                None => Err("no credentials provider".to_string()),
            };
            if let Err(why) = found {
                return Err(Error::Cloud {
                    op: OP_CONFIGURE,
                    message: format!(
                        "cannot load AWS credentials ({}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, pass --profile, or fill ~/.aws/credentials",
                        first_line(&why, MAX_QUOTED_CHARS)
                    ),
                });
            }
            let endpoint = cfg.endpoint_url.clone().unwrap_or_else(|| format!("for region {region}"));
            let table = VmTable::open(&cfg.db)?;
            Ok(Ec2 { client: aws_sdk_ec2::Client::new(&sdk), endpoint, region, cluster: cfg.cluster.clone(), table })
        }

        /// The words an error of a call doing `op` needs.
        fn call(&self, op: &'static str) -> Call<'_> {
            Call { op, endpoint: &self.endpoint, region: &self.region, image: None, instances: None }
        }

        pub fn table(&self) -> &VmTable {
            &self.table
        }
        pub fn cluster(&self) -> &str {
            &self.cluster
        }

        /// Launches `spec.count` VMs in one request and records them. Nothing is recorded
        /// if the cloud refuses; if recording fails, the new instances are terminated.
        pub async fn create(&self, spec: &VmSpec) -> Result<Vec<VmInfo>> {
            validate_spec(spec)?;
            let Some(admin) = &spec.admin_broker else {
                return self.launch(spec, spec.count, user_data(&self.cluster, spec)).await;
            };
            // Each VM its own node id and broker user, so each its own user-data.
            let mut all = Vec::new();
            for _ in 0..spec.count {
                let secret = crate::api::credentials::Secret::random().map_err(|e| Error::Broker { node: "vm-?".into(), message: format!("{e:#}") })?;
                let id = format!("vm-{}", &secret.expose()[..8]);
                let node: wire::NodeId = id.parse().expect("vm-<hex> is a valid node id");
                let password =
                    crate::api::broker_user::admit_node(admin, &node).await.map_err(|e| Error::Broker { node: id.clone(), message: format!("{e:#}") })?;
                let broker = broker_link::with_user(&spec.broker_public, &wire::topology::node_user(&node), password.expose());
                let ud = user_data_for(&self.cluster, spec, Some(OwnNode { id: &id, broker: &broker }));
                all.extend(self.launch(spec, 1, ud).await?);
            }
            Ok(all)
        }

        /// Launches `count` VMs with user-data `ud` and records them.
        async fn launch(&self, spec: &VmSpec, count: i32, ud: String) -> Result<Vec<VmInfo>> {
            if ud.len() > MAX_USER_DATA_BYTES {
                return Err(Error::Invalid {
                    what: "user-data",
                    value: format!("{} bytes", ud.len()),
                    reason: format!("EC2 allows at most {MAX_USER_DATA_BYTES}"),
                });
            }
            let tags = TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key(LABEL_CLUSTER).value(&self.cluster).build())
                .tags(Tag::builder().key("Name").value(format!("{}-node", self.cluster)).build())
                .build();
            let mut req = self
                .client
                .run_instances()
                .image_id(&spec.image_id)
                .instance_type(InstanceType::from(spec.instance_type.as_str()))
                .min_count(count)
                .max_count(count)
                .user_data(base64::engine::general_purpose::STANDARD.encode(ud))
                .tag_specifications(tags);
            if let Some(k) = &spec.key_name {
                req = req.key_name(k);
            }
            match spec.security_group.as_deref() {
                Some(g) if g.starts_with("sg-") => req = req.security_group_ids(g),
                Some(g) => req = req.security_groups(g),
                None => {}
            }
            let out = req.send().await.map_err(|e| cloud_err(&Call { image: Some(&spec.image_id), ..self.call("launch instances") }, e))?;
            let vms: Vec<VmInfo> = out.instances().iter().filter_map(|i| info(&self.cluster, i)).collect();
            if let Err(e) = self.table.record(vms.clone()).await {
                let ids: Vec<String> = vms.iter().map(|v| v.id.clone()).collect();
                return Err(match self.terminate(&ids).await {
                    Ok(()) => e,
                    Err(t) => Error::CleanupFailed {
                        what: "recording the new VMs".into(),
                        source: Box::new(e),
                        cleanup: format!("terminating {} failed: {t}; terminate them by hand", ids.join(", ")),
                    },
                });
            }
            tracing::info!(count = vms.len(), cluster = %self.cluster, "VMs launched");
            Ok(vms)
        }

        /// The cluster's instances as the cloud sees them now (terminated ones included
        /// while the cloud still reports them); the `vms` table is brought up to date.
        pub async fn list(&self) -> Result<Vec<VmInfo>> {
            let mut seen = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let out = self
                    .client
                    .describe_instances()
                    .filters(Filter::builder().name(format!("tag:{LABEL_CLUSTER}")).values(&self.cluster).build())
                    .set_next_token(token.take())
                    .send()
                    .await
                    .map_err(|e| cloud_err(&self.call("list instances"), e))?;
                for r in out.reservations() {
                    seen.extend(r.instances().iter().filter_map(|i| info(&self.cluster, i)));
                }
                match out.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => break,
                }
            }
            self.table.refresh(seen.clone()).await?;
            // Keep the launch time we recorded when the cloud does not report one.
            let recorded = self.table.list(&self.cluster).await?;
            for v in &mut seen {
                if v.launched_ms == 0 {
                    if let Some(r) = recorded.iter().find(|r| r.id == v.id) {
                        v.launched_ms = r.launched_ms;
                    }
                }
            }
            seen.sort_by(|a, b| (a.launched_ms, &a.id).cmp(&(b.launched_ms, &b.id)));
            Ok(seen)
        }

        /// Terminates VM `id` and forgets it. Only a VM this manager recorded for the cluster
        /// (so launched with its tag) is terminated; any other id is refused before the cloud.
        pub async fn remove(&self, id: &str) -> Result<()> {
            self.table.require(&self.cluster, id).await?;
            let own = self.own_node(id).await;
            self.terminate(&[id.to_string()]).await?;
            self.table.forget(vec![id.to_string()]).await?;
            self.revoke_own_node(own);
            Ok(())
        }

        /// The VM's own node and its vhost, read from its user-data (VMs launched with
        /// node users); `None` for others, or when the cloud does not say.
        async fn own_node(&self, id: &str) -> Option<(wire::NodeId, String)> {
            let ud = self.user_data_of(id).await.ok()?;
            let node = own_node_of(&ud)?;
            let broker = ud.lines().find_map(|l| l.strip_prefix("BROKER="))?.trim_matches('\'');
            Some((node, broker_link::url_vhost(broker)))
        }

        /// Revokes a removed VM's own broker user and queue (with rabbitmqctl, on the
        /// broker's host); a failure is logged, the VM is gone either way.
        fn revoke_own_node(&self, own: Option<(wire::NodeId, String)>) {
            if let Some((node, vhost)) = own {
                match crate::api::broker_user::revoke_node_local(&vhost, &node) {
                    Ok(_) => tracing::info!(%node, "revoked the VM node's broker user"),
                    Err(e) => tracing::warn!(%node, "revoking the VM node's broker user: {e:#}"),
                }
            }
        }

        /// Terminates every live VM of the cluster; returns their ids.
        pub async fn remove_all(&self) -> Result<Vec<String>> {
            let ids: Vec<String> = self.list().await?.into_iter().filter(|v| v.state != "terminated").map(|v| v.id).collect();
            let mut own = Vec::new();
            for id in &ids {
                own.push(self.own_node(id).await);
            }
            if !ids.is_empty() {
                self.terminate(&ids).await?;
            }
            let mut forget = ids.clone();
            forget.extend(self.table.list(&self.cluster).await?.into_iter().map(|v| v.id));
            self.table.forget(forget).await?;
            for o in own {
                self.revoke_own_node(o);
            }
            Ok(ids)
        }

        /// The user-data VM `id` was launched with, decoded. Only for a VM recorded for the
        /// cluster, like [`Ec2::remove`].
        pub async fn user_data_of(&self, id: &str) -> Result<String> {
            self.table.require(&self.cluster, id).await?;
            let op = "read the instance's user-data";
            let out = self
                .client
                .describe_instance_attribute()
                .instance_id(id)
                .attribute(InstanceAttributeName::UserData)
                .send()
                .await
                .map_err(|e| cloud_err(&Call { instances: Some(id), ..self.call(op) }, e))?;
            let b64 = out.user_data().and_then(|v| v.value()).unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| Error::Cloud { op, message: format!("the cloud sent the user-data of {id} not in base64 ({e})") })?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }

        async fn terminate(&self, ids: &[String]) -> Result<()> {
            let instances = ids.join(" ");
            let call = Call { instances: Some(&instances), ..self.call("terminate instances") };
            self.client.terminate_instances().set_instance_ids(Some(ids.to_vec())).send().await.map_err(|e| cloud_err(&call, e))?;
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use aws_sdk_ec2::error::{ConnectorError, ErrorMetadata};
        use aws_sdk_ec2::operation::run_instances::RunInstancesError;

        const EP: &str = "http://127.0.0.1:5000";

        fn launch() -> Call<'static> {
            Call { op: "launch instances", endpoint: EP, region: "us-east-1", image: Some("ami-12345678"), instances: None }
        }

        fn service(code: &str, message: &str) -> String {
            explain(&launch(), &Failure::Service { code: Some(code), message: Some(message), status: 400 })
        }

        fn sdk_err(err: SdkError<RunInstancesError, HttpResponse>) -> String {
            cloud_err(&launch(), err).to_string()
        }

        fn answer(status: u16) -> HttpResponse {
            HttpResponse::new(status.try_into().unwrap(), "".into())
        }

        #[test]
        fn wrong_credentials_are_named_with_what_to_set() {
            for code in ["AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException"] {
                let m = service(code, "AWS was not able to validate the provided access credentials");
                assert_eq!(m, format!("the EC2 endpoint {EP} refused the credentials ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --profile"));
            }
            let m = service("UnauthorizedOperation", "You are not authorized to perform this operation. Encoded authorization failure message: AAAA");
            assert!(m.starts_with("the credentials are not allowed to launch instances (UnauthorizedOperation): "), "{m}");
            assert!(m.contains("AWS_ACCESS_KEY_ID") && m.contains("--profile") && !m.contains("Encoded"), "{m}");
        }

        #[test]
        fn unknown_images_and_instances_are_named_with_the_region() {
            assert_eq!(
                service("InvalidAMIID.NotFound", "The image id '[ami-12345678]' does not exist"),
                "image ami-12345678 does not exist in region us-east-1 (InvalidAMIID.NotFound): pass an image id from `aws ec2 describe-images`"
            );
            assert!(service("InvalidAMIID.Malformed", "Invalid id").starts_with("image id ami-12345678 is malformed (InvalidAMIID.Malformed)"));
            let call = Call { op: "terminate instances", instances: Some("i-1 i-2"), ..launch() };
            let m = explain(&call, &Failure::Service { code: Some("InvalidInstanceID.NotFound"), message: None, status: 400 });
            assert!(m.starts_with("the cloud has no instance i-1 i-2 in region us-east-1 (InvalidInstanceID.NotFound)"), "{m}");
            assert!(service("InstanceLimitExceeded", "x").starts_with("the cloud has no room to launch instances (InstanceLimitExceeded): "));
        }

        #[test]
        fn unknown_codes_quote_the_first_line_of_the_message_cut_short() {
            let long = format!("Something odd happened.\n{}", "x".repeat(1000));
            assert_eq!(service("OddCode", &long), "the cloud refused to launch instances: OddCode: Something odd happened.");
            let m = service("OddCode", &"y".repeat(1000));
            assert!(m.ends_with('…') && m.chars().count() < 300, "{m}");
            assert_eq!(
                explain(&launch(), &Failure::Service { code: None, message: None, status: 404 }),
                format!("the EC2 endpoint {EP} answered HTTP 404 without an EC2 error to launch instances: check that --endpoint-url points at an EC2 API")
            );
        }

        #[test]
        fn every_explanation_is_one_bounded_line() {
            let hostile = format!("a\nb\r\n{}", "z".repeat(2000));
            let call = Call { op: "list instances", endpoint: &hostile, region: &hostile, image: Some(&hostile), instances: Some(&hostile) };
            let failures = [
                Failure::Service { code: Some(&hostile), message: Some(&hostile), status: 400 },
                Failure::Service { code: Some("AuthFailure"), message: None, status: 401 },
                Failure::Service { code: Some("InvalidAMIID.NotFound"), message: None, status: 400 },
                Failure::Service { code: None, message: Some(&hostile), status: 500 },
                Failure::Unreachable { reason: Some(hostile.clone()) },
                Failure::Unreachable { reason: None },
                Failure::Timeout,
                Failure::BadResponse { status: 200, reason: hostile.clone() },
                Failure::NotSent { reason: hostile.clone() },
            ];
            for f in &failures {
                let m = explain(&call, f);
                assert!(!m.contains(['\n', '\r']), "{f:?}: {m:?}");
                // Each quoted piece is bounded, so the line is, however long the inputs.
                assert!(m.chars().count() < 4 * MAX_QUOTED_CHARS + 250, "{f:?}: {} chars", m.chars().count());
            }
        }

        #[test]
        fn sdk_errors_are_read_for_their_code_never_their_debug() {
            let auth = RunInstancesError::generic(ErrorMetadata::builder().code("AuthFailure").message("not valid").build());
            let m = sdk_err(SdkError::service_error(auth, answer(401)));
            assert!(m.starts_with(&format!("the EC2 endpoint {EP} refused the credentials (AuthFailure)")), "{m}");

            let refused = ConnectorError::io(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
            let m = sdk_err(SdkError::dispatch_failure(refused));
            assert!(m.starts_with(&format!("cannot reach the EC2 endpoint {EP} to launch instances: connection refused (")), "{m}");

            // What the SDK said for a malformed endpoint: the request's Debug, body and all.
            let dump = "failed to apply endpoint `x` to request `Request { body: SdkBody { inner: Once(Some(b\"Action=RunInstances&UserData=c2VjcmV0\")) } }`\n: endpoint must contain scheme";
            let m = sdk_err(SdkError::dispatch_failure(ConnectorError::other(dump.into(), None)));
            assert_eq!(m, format!("could not prepare the request to launch instances for the EC2 endpoint {EP}: failed to apply endpoint `x`"));

            let m = sdk_err(SdkError::response_error("unexpected element <html>\n<body>", answer(200)));
            assert!(m.starts_with(&format!("the EC2 endpoint {EP} answered HTTP 200 to launch instances with something that is not an EC2 response")), "{m}");
            assert!(!m.contains("body"), "{m}");

            let m = sdk_err(SdkError::timeout_error("operation timed out"));
            assert!(m.starts_with(&format!("no answer from the EC2 endpoint {EP} within {OPERATION_TIMEOUT_S}s")), "{m}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec { image_id: "ami-1".into(), broker_public: "amqp://u:p@203.0.113.5:5672/%2f".into(), ..Default::default() }
    }

    #[test]
    fn user_data_starts_a_node_pointed_at_the_broker() {
        let ud = user_data("c1", &spec());
        assert!(ud.starts_with("#!/bin/bash\n"));
        assert!(ud.contains("BROKER='amqp://u:p@203.0.113.5:5672/%2f'"), "{ud}");
        assert!(ud.contains("--broker \"$BROKER\""));
        assert!(ud.contains("--device /dev/fuse --cap-add SYS_ADMIN"));
        assert!(ud.len() < MAX_USER_DATA_BYTES);
    }

    #[test]
    fn first_line_keeps_one_line_and_bounds_it() {
        assert_eq!(first_line("\n  first line  \nsecond", 50), "first line");
        assert_eq!(first_line("a\tb\u{2028}c", 50), "a b c");
        assert_eq!(first_line("abcdef", 3), "abc…");
        assert_eq!(first_line("", 3), "");
    }

    #[test]
    fn endpoint_urls_are_checked_before_the_sdk_sees_them() {
        for ok in ["http://127.0.0.1:5000", "https://ec2.example.org", "http://[::1]:5000/ec2/"] {
            assert!(validate_endpoint_url(ok).is_ok(), "{ok} refused");
        }
        for bad in ["not a url", "", "ftp://127.0.0.1:5000", "127.0.0.1:5000", "localhost:5000", "http://", "http://:5000", "/ec2"] {
            let e = validate_endpoint_url(bad).expect_err(bad);
            assert!(matches!(e, Error::Invalid { what: "--endpoint-url", .. }), "{bad}: {e:?}");
            assert!(e.to_string().starts_with("invalid --endpoint-url "), "{e}");
        }
        let e = validate_endpoint_url(&format!("http://a b\n{}", "x".repeat(5000))).unwrap_err().to_string();
        assert!(!e.contains('\n') && e.len() < 400, "{e}");
    }

    #[test]
    fn regions_are_checked() {
        for ok in ["us-east-1", "RegionOne", "eu-central-2"] {
            assert!(validate_region(ok).is_ok(), "{ok} refused");
        }
        for bad in ["", "us east 1", "us-east-1/", &"r".repeat(65)] {
            assert!(validate_region(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn bad_specs_are_refused_without_echoing_the_url() {
        assert!(validate_spec(&spec()).is_ok());
        assert!(validate_spec(&VmSpec { count: 0, ..spec() }).is_err());
        assert!(validate_spec(&VmSpec { image_id: String::new(), ..spec() }).is_err());
        let e = validate_spec(&VmSpec { broker_public: "secret-pw".into(), ..spec() }).unwrap_err().to_string();
        assert!(!e.contains("secret-pw"), "{e}");
    }

    #[tokio::test]
    async fn table_records_refreshes_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let t = VmTable::open(&dir.path().join("m.db")).unwrap();
        let v = VmInfo {
            id: "i-1".into(),
            cluster: "c".into(),
            state: "pending".into(),
            public_ip: None,
            private_ip: None,
            instance_type: "t3.small".into(),
            image_id: "ami-1".into(),
            launched_ms: 5,
        };
        t.record(vec![v.clone()]).await.unwrap();
        t.refresh(vec![VmInfo { state: "running".into(), public_ip: Some("1.2.3.4".into()), ..v.clone() }]).await.unwrap();
        let l = t.list("c").await.unwrap();
        assert_eq!(l[0].state, "running");
        assert_eq!(l[0].public_ip.as_deref(), Some("1.2.3.4"));
        assert!(t.list("other").await.unwrap().is_empty());
        assert_eq!(t.require("c", "i-1").await.unwrap().id, "i-1");
        let e = t.require("other", "i-1").await.unwrap_err();
        assert!(matches!(e, Error::VmNotFound { .. }), "{e:?}");
        assert_eq!(e.to_string(), "no VM i-1 in cluster other (see `manager vm list`)");
        t.forget(vec!["i-1".into()]).await.unwrap();
        assert!(t.list("c").await.unwrap().is_empty());
        assert!(matches!(t.require("c", "i-1").await, Err(Error::VmNotFound { .. })));
    }
}
