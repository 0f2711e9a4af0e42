//! One function per route: check the parameters, run one query or one action, answer.

use super::error::{ApiError, ApiResult};
use super::routes::Op;
use super::{event_body, full, json_response, metrics, openapi, provisioning, queries, with_type, Call, State};
use axum::http::header::HeaderValue;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use wire::{NodeId, RelPath, Revision};

/// The dashboard: one self-contained page.
const DASHBOARD: &str = include_str!("dashboard.html");
/// The page may run only its own inline script and talk only to this server.
const DASHBOARD_CSP: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'";

/// Entries per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u64 = 100;
/// Most entries per page: keeps one answer (and one query) small.
pub const MAX_LIMIT: u64 = 1000;

pub(crate) async fn dispatch(state: &State, op: Op, call: Call) -> ApiResult<Response> {
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match op {
        Op::Dashboard => {
            let mut r = with_type(StatusCode::OK, "text/html; charset=utf-8", full(DASHBOARD));
            r.headers_mut().insert("content-security-policy", HeaderValue::from_static(DASHBOARD_CSP));
            r.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
            Ok(r)
        }
        Op::OpenApi => ok(openapi::document()),
        Op::Health => {
            let stalled = state.handle.stalled_for(crate::service::now_ms());
            let last_failure = state.handle.last_failure();
            let body = json!({
                "ok": stalled.is_none(),
                "stalled_seconds": stalled.map(|d| d.as_secs()),
                "last_failure": last_failure.as_ref().map(|(_, why)| why),
                "last_failure_ms": last_failure.as_ref().map(|(at, _)| at),
                "dead_lettered": state.handle.dead_lettered.load(Ordering::Relaxed),
                "refused_senders": state.handle.refused_senders.load(Ordering::Relaxed),
                "queue_drops": state.handle.queue_drops.load(Ordering::Relaxed),
            });
            Ok(json_response(if stalled.is_some() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }, &body))
        }
        Op::Metrics => {
            let counts = state.handle.with_store(|s| queries::counts(s)).await?;
            let (h, requests) = (&state.handle, state.requests.load(Ordering::Relaxed));
            let text = metrics::render(&counts, requests, h.messages_in.load(Ordering::Relaxed), h.dead_lettered.load(Ordering::Relaxed));
            Ok(with_type(StatusCode::OK, metrics::CONTENT_TYPE, full(text)))
        }
        Op::Events => {
            let rx = state.hub.subscribe(state.handle.clone(), state.cancel.clone())?;
            let mut r = with_type(StatusCode::OK, "text/event-stream", event_body(rx));
            // Proxies such as nginx must pass events through at once.
            r.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
            Ok(r)
        }
        Op::Status => {
            let counts = state.handle.with_store(|s| queries::counts(s)).await?;
            ok(queries::counts_json(&counts))
        }
        Op::ListNodes => ok(json!({"nodes": state.handle.with_store(|s| queries::nodes(s)).await?})),
        Op::GetNode => {
            let id = node_id(&call)?;
            let found = state.handle.with_store(move |s| queries::node(s, id.as_str())).await?;
            found.map_or_else(|| Err(unknown_node(&call.params[0])), ok)
        }
        Op::SyncNode => {
            let id = node_id(&call)?;
            let node = id.clone();
            let known = state
                .handle
                .with_store(move |s| {
                    if queries::node(s, node.as_str())?.is_none() {
                        return Ok(false);
                    }
                    s.transaction(|tx| tx.request_sync(&node))?;
                    Ok(true)
                })
                .await?;
            if !known {
                return Err(unknown_node(id.as_str()));
            }
            state.handle.outbox_ready.notify_one();
            tracing::info!(node = %id, "sync requested through the API");
            Ok(json_response(StatusCode::ACCEPTED, &json!({"node": id.as_str(), "requested": "sync"})))
        }
        Op::CreateNode => {
            let body = json_body(&call)?;
            Ok(json_response(StatusCode::CREATED, &provisioning::create_node(state, body).await?))
        }
        Op::RemoveNode => ok(provisioning::remove_node(state, node_id(&call)?.as_str()).await?),
        Op::ListVms => ok(provisioning::list_vms(state).await?),
        Op::CreateVm => {
            let body = json_body(&call)?;
            Ok(json_response(StatusCode::CREATED, &provisioning::create_vm(state, body).await?))
        }
        Op::RemoveVm => ok(provisioning::remove_vm(state, &call.params[0]).await?),
        Op::ListFiles => {
            let prefix = call.query("prefix").unwrap_or("").to_string();
            let offset = int_param(&call, "offset")?.unwrap_or(0);
            let limit = limit(&call)?;
            let p = prefix.clone();
            let (total, files) = state.handle.with_store(move |s| queries::files(s.conn(), &p, offset, limit)).await?;
            if offset > 0 && offset >= total {
                return Err(ApiError::unprocessable(format!("offset {offset} is past the end: {total} path(s) match prefix {prefix:?}")));
            }
            ok(json!({"total": total, "offset": offset, "limit": limit, "files": files}))
        }
        Op::FileHistory => {
            let raw = call.query("path").ok_or_else(|| ApiError::bad_request("missing query parameter path (e.g. ?path=docs/a.txt)"))?;
            let path = RelPath::new(raw).map_err(|e| ApiError::bad_request(format!("invalid path {raw:?}: {e}")))?;
            let p = path.clone();
            let found = state.handle.with_store(move |s| queries::history(s, &p)).await?;
            found.map_or_else(|| Err(ApiError::not_found(format!("the manager has never seen a path {path}"))), ok)
        }
        Op::FileVersions => {
            let path = path_param(&call, "path")?.ok_or_else(|| ApiError::bad_request("missing query parameter path (e.g. ?path=docs/a.txt)"))?;
            let p = path.clone();
            let versions = state.handle.with_store(move |s| s.transaction(|tx| tx.versions(&p, crate::service::now_ms()))).await?;
            if versions.is_empty() {
                return Err(ApiError::not_found(format!("no version of {path} is known or kept")));
            }
            ok(json!({"path": path.as_str(), "versions": versions}))
        }
        Op::Trash => {
            let dir = path_param(&call, "dir")?;
            let items = state.handle.with_store(move |s| s.transaction(|tx| tx.trash(dir.as_ref(), crate::service::now_ms()))).await?;
            ok(json!({"items": items}))
        }
        Op::Restore => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                path: RelPath,
                rev: Option<u64>,
                to: Option<RelPath>,
                base: Option<u64>,
            }
            let b: Body = serde_json::from_value(json_body(&call)?).map_err(|e| ApiError::bad_request(format!("malformed restore request: {e}")))?;
            let restored = state
                .handle
                .with_store(move |s| {
                    s.transaction(|tx| {
                        tx.restore(&b.path, b.rev.map(Revision), b.to.as_ref(), b.base.map(Revision), &NodeId::manager(), crate::service::now_ms())
                    })
                })
                .await?;
            state.handle.outbox_ready.notify_one();
            match restored {
                Ok(report) => ok(serde_json::to_value(report).map_err(|e| ApiError::internal(e.into()))?),
                Err(reason) => Err(ApiError::not_found(reason)),
            }
        }
        Op::Conflicts => {
            let offset = int_param(&call, "offset")?.unwrap_or(0);
            let limit = limit(&call)?;
            let (total, conflicts) = state.handle.with_store(move |s| queries::conflicts(s.conn(), offset, limit)).await?;
            if offset > 0 && offset >= total {
                return Err(ApiError::unprocessable(format!("offset {offset} is past the end: there are {total} conflict(s)")));
            }
            ok(json!({"total": total, "offset": offset, "limit": limit, "conflicts": conflicts}))
        }
        Op::Changes => {
            let since = int_param(&call, "since")?;
            let limit = limit(&call)?;
            let (head, changes) = state
                .handle
                .with_store(move |s| {
                    let head = queries::head(s.conn())?;
                    let changes = match since {
                        Some(since) if since > head => None,
                        Some(since) => Some(queries::changes_since(s.conn(), since, limit)?),
                        None => Some(queries::latest_changes(s.conn(), limit)?),
                    };
                    Ok((head, changes))
                })
                .await?;
            let changes = changes.ok_or_else(|| ApiError::unprocessable(format!("since {} is beyond the head revision {head}", since.unwrap_or_default())))?;
            ok(json!({"head": head, "changes": changes}))
        }
    }
}

fn unknown_node(id: &str) -> ApiError {
    ApiError::not_found(format!("no node named {id:?} has ever reported to this manager (GET /api/nodes lists them)"))
}

fn node_id(call: &Call) -> ApiResult<NodeId> {
    let raw = &call.params[0];
    raw.parse().map_err(|e| ApiError::bad_request(format!("{e}")))
}

/// A whole, non-negative number, or absent; garbage is 400, negative is out of range (422).
fn int_param(call: &Call, name: &str) -> ApiResult<Option<u64>> {
    let Some(raw) = call.query(name) else {
        return Ok(None);
    };
    let n: i64 = raw.trim().parse().map_err(|_| ApiError::bad_request(format!("query parameter {name} must be a whole number, got {raw:?}")))?;
    if n < 0 {
        return Err(ApiError::unprocessable(format!("query parameter {name} must not be negative, got {n}")));
    }
    Ok(Some(n as u64))
}

fn limit(call: &Call) -> ApiResult<u64> {
    let limit = int_param(call, "limit")?.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::unprocessable(format!("limit must be between 1 and {MAX_LIMIT}, got {limit}")));
    }
    Ok(limit)
}

/// The request body as a JSON object; an empty body is `{}`.
/// An optional query parameter that names a path.
fn path_param(call: &Call, name: &str) -> ApiResult<Option<RelPath>> {
    call.query(name).map(|raw| RelPath::new(raw).map_err(|e| ApiError::bad_request(format!("invalid path {raw:?}: {e}")))).transpose()
}

fn json_body(call: &Call) -> ApiResult<Value> {
    if call.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(&call.body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the JSON body must be an object"));
    }
    Ok(v)
}
