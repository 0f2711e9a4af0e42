//! Cloud nodes: VMs started through the EC2 API (AWS, or any EC2-compatible endpoint
//! such as OpenStack's or moto's via `endpoint_url`), each booting a node container
//! from its user-data (cloud-init).
//!
//! Owns the `vms` table of the manager's database: a VM is recorded only after the cloud
//! accepted it, and if recording fails the instances are terminated again, so the table
//! never holds half a launch. Only instances tagged with this cluster are listed or
//! removed. The client (aws-sdk-ec2) exists only with the `ec2` cargo feature; without
//! it [`Ec2::new`] returns [`Error::Ec2NotBuilt`], so callers compile either way.

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
NODE_ID=$(md instance-id)
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
        broker = sh_quote(&spec.broker_public),
        mount = sh_quote(&spec.mount_path),
        token = sh_quote(spec.cluster_token.as_deref().unwrap_or("")),
        label = LABEL_CLUSTER,
    )
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
    use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
    use aws_sdk_ec2::types::{Filter, Instance, InstanceAttributeName, InstanceType, ResourceType, Tag, TagSpecification};
    use base64::Engine;
    use std::time::Duration;

    /// Turns an SDK error into one clear sentence, with a hint for the usual causes.
    fn cloud_err<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static, R: std::fmt::Debug>(op: &'static str, err: SdkError<E, R>) -> Error {
        let message = match &err {
            SdkError::ServiceError(se) => {
                let e = se.err();
                let code = e.code().unwrap_or("Unknown");
                let msg = e.message().unwrap_or("no message");
                let hint = match code {
                    "AuthFailure"
                    | "InvalidClientTokenId"
                    | "UnrecognizedClientException"
                    | "SignatureDoesNotMatch"
                    | "InvalidAccessKeyId"
                    | "AccessDenied"
                    | "UnauthorizedOperation" => " (check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials)",
                    c if c.starts_with("InvalidAMIID") => " (the machine image does not exist in this region: check --image-id and --region)",
                    "InstanceLimitExceeded" | "VcpuLimitExceeded" | "InsufficientInstanceCapacity" | "MaxSpotInstanceCountExceeded" => {
                        " (quota or capacity: try fewer VMs, another instance type or region, or ask for a higher limit)"
                    }
                    _ => "",
                };
                format!("{code}: {msg}{hint}")
            }
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                format!("cannot reach the EC2 endpoint: {} (check --endpoint-url / --region and the network)", DisplayErrorContext(&err))
            }
            _ => format!("{}", DisplayErrorContext(&err)),
        };
        Error::Cloud { op, message }
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
        pub async fn new(cfg: &Ec2Config) -> Result<Ec2> {
            validate_name("cluster name", &cfg.cluster)?;
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
            if sdk.region().is_none() {
                return Err(Error::Cloud { op: "configure the EC2 client", message: "no region: pass --region or set AWS_REGION".into() });
            }
            let table = VmTable::open(&cfg.db)?;
            Ok(Ec2 { client: aws_sdk_ec2::Client::new(&sdk), cluster: cfg.cluster.clone(), table })
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
            let ud = user_data(&self.cluster, spec);
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
                .min_count(spec.count)
                .max_count(spec.count)
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
            let out = req.send().await.map_err(|e| cloud_err("launch instances", e))?;
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
                    .map_err(|e| cloud_err("list instances", e))?;
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

        /// Terminates VM `id` (it must carry this cluster's tag) and forgets it.
        pub async fn remove(&self, id: &str) -> Result<()> {
            let ours = self.list().await?.into_iter().any(|v| v.id == id);
            if !ours {
                return Err(Error::Cloud { op: "terminate the instance", message: format!("no instance {id} in cluster {}", self.cluster) });
            }
            self.terminate(&[id.to_string()]).await?;
            self.table.forget(vec![id.to_string()]).await
        }

        /// Terminates every live VM of the cluster; returns their ids.
        pub async fn remove_all(&self) -> Result<Vec<String>> {
            let ids: Vec<String> = self.list().await?.into_iter().filter(|v| v.state != "terminated").map(|v| v.id).collect();
            if !ids.is_empty() {
                self.terminate(&ids).await?;
            }
            let mut forget = ids.clone();
            forget.extend(self.table.list(&self.cluster).await?.into_iter().map(|v| v.id));
            self.table.forget(forget).await?;
            Ok(ids)
        }

        /// The user-data VM `id` was launched with, decoded.
        pub async fn user_data_of(&self, id: &str) -> Result<String> {
            let out = self
                .client
                .describe_instance_attribute()
                .instance_id(id)
                .attribute(InstanceAttributeName::UserData)
                .send()
                .await
                .map_err(|e| cloud_err("read the instance's user-data", e))?;
            let b64 = out.user_data().and_then(|v| v.value()).unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| Error::Cloud { op: "read the instance's user-data", message: format!("not base64: {e}") })?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }

        async fn terminate(&self, ids: &[String]) -> Result<()> {
            self.client.terminate_instances().set_instance_ids(Some(ids.to_vec())).send().await.map_err(|e| cloud_err("terminate instances", e))?;
            Ok(())
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
        t.forget(vec!["i-1".into()]).await.unwrap();
        assert!(t.list("c").await.unwrap().is_empty());
    }
}
