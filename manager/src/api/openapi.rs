//! The OpenAPI 3 document served at `/api/openapi.json`, generated from the route table
//! (paths, methods, parameters, bodies) plus the schemas written out here.

use super::routes::{Route, ROUTES};
use serde_json::{json, Map, Value};

fn schemas() -> Value {
    let int = json!({"type": "integer", "format": "int64", "minimum": 0});
    let string = json!({"type": "string"});
    let change = json!({
        "type": "object",
        "required": ["rev", "path", "origin", "kind"],
        "properties": {
            "rev": int, "path": string, "origin": string, "at_ms": int, "at": {"type": "string", "format": "date-time"},
            "kind": {"type": "string", "enum": ["file", "dir", "symlink", "deleted"]},
            "size": {"type": ["integer", "null"]}, "hash": {"type": ["string", "null"]},
            "version": {"type": ["object", "null"], "description": "The wire form of the version (see docs/protocol.md); null for a deletion."}
        }
    });
    let conflict = json!({
        "type": "object",
        "properties": {
            "id": int, "path": string, "copy": {"type": "string", "description": "The conflict file that kept the node's version."},
            "node": string, "base": int, "current_rev": int, "copy_rev": int, "at_ms": int, "at": {"type": "string", "format": "date-time"}
        }
    });
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string", "description": "What went wrong and what to do."}}},
        "Node": {
            "type": "object",
            "required": ["id", "online", "url", "last_seen_ms", "pending_changes", "pending_pulls", "software"],
            "properties": {
                "id": string, "online": {"type": "boolean"}, "url": {"type": "string", "description": "The node's content server."},
                "software": string, "last_seen_ms": int, "last_seen": {"type": "string", "format": "date-time"},
                "pending_changes": int, "pending_pulls": int,
                "kept_bytes": {"type": "integer", "description": "Bytes of old versions' contents the node confirmed it keeps (retention)."},
                "residency": {
                    "type": ["object", "null"],
                    "description": "A node with files on demand (docs/on-demand.md): bytes local and on demand, its pin rules ([path, pinned]) and the pulls under way, from its last heartbeat; null for other nodes.",
                    "properties": {
                        "local_bytes": int, "remote_bytes": int, "more_pins": int,
                        "pins": {"type": "array", "items": {"type": "array"}},
                        "pulls": {"type": "array", "items": {"type": "object", "properties": {"hash": string, "size": int, "done": int}}}
                    }
                }
            }
        },
        "NodeList": {"type": "object", "properties": {"nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}},
        "Health": {
            "type": "object",
            "properties": {
                "ok": {"type": "boolean", "description": "False while the manager is stuck on work it took up (also answered with 503)."},
                "stalled_seconds": {"type": ["integer", "null"], "description": "How long the unfinished work has waited, when stuck."},
                "last_failure": {"type": ["string", "null"], "description": "Why the manager's last broker session ended (a full disk, a locked database, a lost broker), or the broker blocked its connection (a memory or disk alarm), since it started."},
                "last_failure_ms": {"type": ["integer", "null"], "description": "When that was, in milliseconds since the Unix epoch."},
                "dead_lettered": int, "refused_senders": int,
                "queue_drops": {"type": "integer", "description": "Messages node queues dropped past their length limit since the manager started; each node named was asked to sync."}
            }
        },
        "Status": {
            "type": "object",
            "properties": {
                "head": int, "files": int, "conflicts": int, "nodes": int, "nodes_online": int, "pending_changes": int,
                "pending_pulls": int, "outbox": int, "messages_published": int,
                "changes_decided": {"type": "object", "additionalProperties": int},
                "caught_up": {
                    "type": ["object", "null"],
                    "description": "The last time the database was found behind its nodes (brought back from an older copy): a node had taken revision `seen` while the database ended at `head`; revisions went on after `to`, and every node was asked to sync.",
                    "properties": {"at_ms": int, "node": string, "seen": int, "head": int, "to": int}
                }
            }
        },
        "Change": change,
        "ChangeList": {"type": "object", "properties": {"head": int, "changes": {"type": "array", "items": {"$ref": "#/components/schemas/Change"}}}},
        "FileList": {
            "type": "object",
            "properties": {"total": int, "offset": int, "limit": int, "files": {"type": "array", "items": {"$ref": "#/components/schemas/Change"}}}
        },
        "FileHistory": {
            "type": "object",
            "properties": {
                "path": string, "current_rev": int, "deleted": {"type": "boolean"},
                "holders": {"type": "array", "items": {"type": "object", "properties": {"node": string, "url": string}}},
                "revisions": {"type": "array", "items": {"$ref": "#/components/schemas/Change"}},
                "conflicts": {"type": "array", "items": {"$ref": "#/components/schemas/Conflict"}}
            }
        },
        "Conflict": conflict,
        "ConflictList": {"type": "object", "properties": {"total": int, "conflicts": {"type": "array", "items": {"$ref": "#/components/schemas/Conflict"}}}},
        "Accepted": {"type": "object", "properties": {"node": string, "requested": {"type": "string"}}},
        "CreateNode": {
            "type": "object",
            "additionalProperties": false,
            "description": "Nodes to start in containers on the manager's machine; each gets the cluster token.",
            "properties": {
                "id": {"type": "string", "description": "Node id: 1-64 of A-Z a-z 0-9 . _ -; chosen by the manager if absent. With count > 1, the prefix of id-1..id-N."},
                "count": {"type": "integer", "minimum": 1, "maximum": 50, "default": 1}
            }
        },
        "CreateVm": {
            "type": "object",
            "additionalProperties": false,
            "description": "Virtual machines to start through the EC2 API; each runs one node holding the cluster token.",
            "required": ["image_id", "broker_public"],
            "properties": {
                "image_id": {"type": "string", "description": "Machine image (a Debian or Ubuntu AMI with cloud-init)."},
                "broker_public": {"type": "string", "description": "Broker URL as the VMs reach it."},
                "count": {"type": "integer", "minimum": 1, "maximum": 50, "default": 1},
                "instance_type": string,
                "key_name": string,
                "security_group": string,
                "endpoint_url": {"type": "string", "description": "EC2-compatible endpoint (OpenStack, moto); AWS by default."},
                "region": string
            }
        },
        "Provisioned": {"type": "object", "description": "What the provisioner reports about the node or VM.", "additionalProperties": true},
        "VmList": {"type": "object", "properties": {"vms": {"type": "array", "items": {"type": "object", "additionalProperties": true}}}},
        "Versions": {
            "type": "object",
            "properties": {
                "path": string,
                "versions": {"type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "rev": int, "node": string, "at_ms": int, "ended_ms": {"type": ["integer", "null"], "description": "When it stopped being current; absent for the current one."},
                        "refused": {"type": "boolean", "description": "A put refused at the conflict-file cap, kept only as a version."},
                        "available": {"type": "boolean", "description": "A node that keeps (or holds) its content is online."},
                        "keepers": {"type": "array", "items": string},
                        "version": {"type": ["object", "null"], "description": "The wire form of the version; null for a deletion."}
                    }
                }}
            }
        },
        "Trash": {
            "type": "object",
            "properties": {"items": {"type": "array", "items": {
                "type": "object",
                "properties": {
                    "path": string, "deleted_rev": int, "deleted_ms": int, "deleted_by": string,
                    "restore_rev": {"type": "integer", "description": "The revision a restore takes by default: the last one at which the path and everything below it were there."},
                    "below": {"type": "integer", "description": "Paths below it that a restore brings back."},
                    "version": {"type": "object"}
                }
            }}}
        },
        "RestoreRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["path"],
            "properties": {
                "path": string,
                "rev": {"type": "integer", "description": "Revision to restore as of (default: the previous version, or what was there before the delete)."},
                "to": {"type": "string", "description": "Restore at this path instead."},
                "base": {"type": "integer", "description": "The revision of the path the caller saw; if it changed since (or this is absent and the path exists), the restored version goes beside it."}
            }
        },
        "Restored": {
            "type": "object",
            "properties": {
                "from_rev": int,
                "restored": {"type": "array", "items": string},
                "beside": {"type": "array", "items": {"type": "array", "items": string}, "description": "[path, where its restored version went]"},
                "unavailable": {"type": "array", "items": string}
            }
        },
        "OpenApi": {"type": "object", "description": "This document."}
    })
}

fn json_content(schema: &str) -> Value {
    json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}})
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": json_content("Error")})
}

fn operation(r: &Route) -> Value {
    let mut params: Vec<Value> = Vec::new();
    for seg in r.path.split('/').filter(|s| s.starts_with('{')) {
        let name = seg.trim_start_matches('{').trim_end_matches('}');
        params.push(json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}));
    }
    for q in r.query {
        params.push(json!({"name": q.name, "in": "query", "required": q.required, "description": q.description, "schema": {"type": q.kind}}));
    }
    let (status, schema) = r.ok;
    let ok = match schema {
        "text" => {
            let mime = match r.path {
                "/" => "text/html",
                "/api/events" => "text/event-stream",
                _ => "text/plain",
            };
            let mut content = Map::new();
            content.insert(mime.into(), json!({"schema": {"type": "string"}}));
            json!({"description": "OK", "content": content})
        }
        s => json!({"description": "OK", "content": json_content(s)}),
    };
    let mut responses = Map::new();
    responses.insert(status.to_string(), ok);
    if !params.is_empty() || r.body.is_some() {
        responses.insert("400".into(), error_response("Malformed request (JSON body or parameters)."));
    }
    if !r.public {
        responses.insert("401".into(), error_response("Missing or wrong operator token."));
    }
    if r.path.contains('{') || r.path == "/api/files/history" || r.path == "/api/files/versions" || r.path == "/api/restore" {
        responses.insert("404".into(), error_response("No such node, VM or path."));
    }
    if r.query.iter().any(|q| q.kind == "integer") {
        responses.insert("422".into(), error_response("A parameter is out of range (e.g. paging past the end)."));
    }
    if r.body.is_some() {
        responses.insert("413".into(), error_response("Request body too large."));
    }
    responses.insert("default".into(), error_response("Any other error."));
    let mut op = json!({
        "summary": r.summary,
        "operationId": format!("{:?}", r.op),
        "parameters": params,
        "responses": responses,
    });
    if let Some(body) = r.body {
        op["requestBody"] = json!({"required": true, "content": json_content(body)});
    }
    if r.public {
        op["security"] = json!([]);
    }
    op
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let item = paths.entry(r.path).or_insert_with(|| json!({}));
        item[r.method.to_ascii_lowercase()] = operation(r);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Sync manager API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Nodes, files, changes, conflicts and provisioning of a sync cluster. Every route except / and this document requires the operator token (`manager credentials show`) as `Authorization: Bearer <token>`. Errors are `{\"error\": \"...\"}`."
        },
        "security": [{"operatorToken": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"operatorToken": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document lists exactly the router's routes, and every schema it refers to exists.
    #[test]
    fn document_matches_the_route_table() {
        let doc = document();
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push((method.to_ascii_uppercase(), path.clone()));
            }
        }
        let mut routed: Vec<(String, String)> = ROUTES.iter().map(|r| (r.method.to_string(), r.path.to_string())).collect();
        documented.sort();
        routed.sort();
        assert_eq!(documented, routed);
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            assert!(schemas.contains_key(&name), "schema {name} is referred to but missing");
        }
    }
}
