//! The API's side of provisioning: checks the request bodies and calls the provisioning
//! module (`crate::provision`), turning its errors into HTTP answers.

use super::error::{ApiError, ApiResult};
use super::State;
use crate::provision::{self, docker, ec2};
use serde_json::{json, Value};

/// Most nodes or VMs one request may create.
const MAX_COUNT: u64 = 50;

/// A provisioning error as the right status: the caller's mistake (400/404/409) or a
/// back end that is not there (503).
fn api_error(e: provision::Error) -> ApiError {
    use provision::Error as E;
    let msg = e.to_string();
    match e {
        E::Invalid { .. } => ApiError::bad_request(msg),
        E::NodeNotFound { .. } | E::VmNotFound { .. } => ApiError::not_found(msg),
        E::NodeExists { .. } => ApiError::new(axum::http::StatusCode::CONFLICT, msg),
        E::DockerUnavailable { .. } | E::ImageMissing { .. } | E::Ec2NotBuilt | E::Broker { .. } => ApiError::unavailable(msg),
        // A cloud client that cannot even be configured (no region, no credentials)
        // is this manager's missing setup; anything else the cloud said is a bad gateway.
        E::Cloud { op, .. } if op == ec2::OP_CONFIGURE => ApiError::unavailable(msg),
        E::Cloud { .. } => ApiError::new(axum::http::StatusCode::BAD_GATEWAY, msg),
        _ => ApiError::internal(anyhow::anyhow!(msg)),
    }
}

fn count(body: &Value) -> ApiResult<u64> {
    match body.get("count") {
        None | Some(Value::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_COUNT).contains(&n) => Ok(n),
            _ => Err(ApiError::unprocessable(format!("count must be a whole number from 1 to {MAX_COUNT}"))),
        },
    }
}

/// Refuses fields the route does not take, so a typo (or a field of another route) is
/// not silently ignored.
fn only_fields(body: &Value, known: &[&str]) -> ApiResult<()> {
    let Some(fields) = body.as_object() else {
        return if body.is_null() { Ok(()) } else { Err(ApiError::bad_request("the body must be a JSON object")) };
    };
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::unprocessable(format!("unknown field {k:?}: this route takes {}", known.join(", ")))),
        None => Ok(()),
    }
}

fn opt_str(body: &Value, key: &str) -> ApiResult<Option<String>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(format!("{key} must be a string"))),
    }
}

fn node_json(n: &docker::NodeInfo) -> Value {
    json!({ "name": n.name, "container_id": n.container_id, "state": n.state, "status": n.status, "url": n.url, "volume": n.volume })
}

fn vm_json(v: &ec2::VmInfo) -> Value {
    json!({ "id": v.id, "state": v.state, "public_ip": v.public_ip, "private_ip": v.private_ip, "instance_type": v.instance_type, "image_id": v.image_id })
}

/// Runs a provisioning call on a blocking thread of the runtime, with owned inputs: the
/// Docker client's futures are not `Send` for every lifetime (closures in stream
/// combinators), so the HTTP connection task cannot hold them across awaits.
async fn detached<T, Fut>(f: impl FnOnce() -> Fut + Send + 'static) -> ApiResult<T>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = provision::Result<T>>,
{
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || rt.block_on(f()))
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("provisioning task failed: {e}")))?
        .map_err(api_error)
}

/// `POST /api/nodes {"id"?: "...", "count"?: 1}`: container nodes on this machine, named
/// `id` (with a count above one, `id-1`..`id-N`), holding the cluster token.
pub async fn create_node(state: &State, body: Value) -> ApiResult<Value> {
    only_fields(&body, &["id", "count"])?;
    let n = count(&body)?;
    let spec = docker::NodeSpec {
        name: opt_str(&body, "id")?,
        broker: state.provision.broker.clone(),
        cluster_token: state.provision.cluster_token.as_ref().map(|t| t.expose().to_string()),
        node_users: state.provision.node_users,
        forgotten: crate::store::forgotten_nodes(&state.provision.db)?,
        ..Default::default()
    };
    let cluster = state.provision.cluster.clone();
    let created = detached(move || async move { docker::Docker::connect_cluster(&cluster).await?.create_nodes(&spec, n as usize).await }).await?;
    Ok(json!({ "created": created.iter().map(node_json).collect::<Vec<_>>() }))
}

/// `DELETE /api/nodes/{id}`: removes the node's container (its data volume stays, so a
/// node re-created with the same name keeps its files).
pub async fn remove_node(state: &State, id: &str) -> ApiResult<Value> {
    let (cluster, name) = (state.provision.cluster.clone(), id.to_string());
    detached(move || async move { docker::Docker::connect_cluster(&cluster).await?.remove_node(&name, false).await }).await?;
    // Its own broker user, if it had one, goes with it.
    if let Ok(node) = id.parse::<wire::NodeId>() {
        if let Err(e) = crate::api::broker_user::revoke_node(&state.provision.broker, &node).await {
            tracing::warn!("removing node {id}: revoking its broker user: {e:#}");
        }
    }
    Ok(json!({ "removed": id }))
}

fn cloud_config(state: &State, body: &Value) -> ApiResult<ec2::Ec2Config> {
    Ok(ec2::Ec2Config {
        cluster: state.provision.cluster.clone(),
        region: opt_str(body, "region")?,
        endpoint_url: opt_str(body, "endpoint_url")?,
        profile: None,
        db: state.provision.db.clone(),
    })
}

pub async fn list_vms(state: &State) -> ApiResult<Value> {
    let (db, cluster) = (state.provision.db.clone(), state.provision.cluster.clone());
    let vms = detached(move || async move { ec2::VmTable::open(&db)?.list(&cluster).await }).await?;
    Ok(json!({ "vms": vms.iter().map(vm_json).collect::<Vec<_>>() }))
}

/// `POST /api/vms {"image_id", "broker_public", "count"?, "instance_type"?, "key_name"?,
/// "security_group"?, "endpoint_url"?, "region"?}`.
pub async fn create_vm(state: &State, body: Value) -> ApiResult<Value> {
    only_fields(&body, &["image_id", "broker_public", "count", "instance_type", "key_name", "security_group", "endpoint_url", "region"])?;
    let n = count(&body)?;
    let image_id = opt_str(&body, "image_id")?.ok_or_else(|| ApiError::bad_request("image_id is required"))?;
    let broker_public =
        opt_str(&body, "broker_public")?.ok_or_else(|| ApiError::bad_request("broker_public is required (the broker URL as the VMs reach it)"))?;
    let mut spec = ec2::VmSpec {
        count: n as i32,
        image_id,
        broker_public,
        key_name: opt_str(&body, "key_name")?,
        security_group: opt_str(&body, "security_group")?,
        cluster_token: state.provision.cluster_token.as_ref().map(|t| t.expose().to_string()),
        admin_broker: state.provision.node_users.then(|| state.provision.broker.clone()),
        ..Default::default()
    };
    if let Some(t) = opt_str(&body, "instance_type")? {
        spec.instance_type = t;
    }
    ec2::validate_spec(&spec).map_err(api_error)?;
    let cfg = cloud_config(state, &body)?;
    let vms = detached(move || async move { ec2::Ec2::new(&cfg).await?.create(&spec).await }).await?;
    Ok(json!({ "created": vms.iter().map(vm_json).collect::<Vec<_>>() }))
}

/// `DELETE /api/vms/{id}`: only a VM this cluster recorded; any other id is a 404 from
/// the manager's table (the same refusal as `manager vm rm`), checked before the cloud
/// client is even configured.
pub async fn remove_vm(state: &State, id: &str) -> ApiResult<Value> {
    let (db, cluster, id1) = (state.provision.db.clone(), state.provision.cluster.clone(), id.to_string());
    detached(move || async move { ec2::VmTable::open(&db)?.require(&cluster, &id1).await }).await?;
    let (cfg, id2) = (cloud_config(state, &Value::Null)?, id.to_string());
    detached(move || async move { ec2::Ec2::new(&cfg).await?.remove(&id2).await }).await?;
    Ok(json!({ "removed": id }))
}
