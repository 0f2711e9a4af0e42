//! The manager's REST API, event stream, metrics and access control, against a real
//! `manager serve` process and the real broker. Nodes are simulated at the protocol level
//! (heartbeats and changes published with lapin, the node's own queue read back).

mod api_support;

use api_support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::process::Command;
use system_tests::{bin, eventually, Vhost, DEADLINE};
use wire::ToNode;

/// The manager knows node `n1` (online) and one file from it.
fn manager_with_a_node(name: &str) -> (Manager, FakeNode) {
    let m = Manager::start(name);
    let n1 = FakeNode::connect(&m.vhost, "n1");
    n1.heartbeat(2, 1);
    n1.put_file("docs/a.txt", b"hello");
    eventually("the change to be decided", DEADLINE, || m.get_json("/api/status")["head"].as_u64() == Some(m.first_head() + 2));
    (m, n1)
}

#[test]
fn nodes_endpoints_and_unknown_nodes() {
    let (m, _n1) = manager_with_a_node("api-nodes");
    let nodes = m.get_json("/api/nodes");
    let n = &nodes["nodes"][0];
    assert_eq!(n["id"], "n1");
    assert_eq!(n["online"], true);
    assert_eq!(n["url"], "http://127.0.0.1:1/n1");
    assert_eq!(n["software"], "fake-node 0.0.1");
    assert_eq!((n["pending_changes"].as_u64(), n["pending_pulls"].as_u64()), (Some(2), Some(1)));
    assert!(n["last_seen_ms"].as_i64().unwrap() > 0 && n["last_seen"].as_str().unwrap().ends_with('Z'), "{n}");
    assert_eq!(m.get_json("/api/nodes/n1")["id"], "n1");

    for (method, path) in [("GET", "/api/nodes/nobody"), ("POST", "/api/nodes/nobody/sync")] {
        let r = m.call(method, path, None);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        assert!(r.error().contains("nobody"), "{}", r.text());
    }
    let r = m.call("GET", "/api/nodes/bad%20id", None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("node id"), "{}", r.text());
    let r = m.call("GET", "/api/no/such/route", None);
    assert_eq!(r.status, 404);
    assert!(r.error().contains("openapi.json"));
    let r = m.call("PUT", "/api/nodes", Some("{}"));
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("get, post"), "{}", r.head);
}

#[test]
fn sync_request_reaches_the_node_queue() {
    let (m, n1) = manager_with_a_node("api-sync");
    let r = m.call("POST", "/api/nodes/n1/sync", None);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["node"], "n1");
    n1.wait_message("SyncRequested", |msg| matches!(msg, ToNode::SyncRequested {}));
}

#[test]
fn files_history_changes_conflicts_and_paging() {
    let (m, n1) = manager_with_a_node("api-files");
    let n2 = FakeNode::connect(&m.vhost, "n2");
    for i in 0..5 {
        n1.put_file(&format!("docs/f{i}.txt"), format!("file {i}").as_bytes());
    }
    // n2 never saw docs/a.txt: its own put based on revision 0 becomes a conflict file.
    n2.put_file("docs/a.txt", b"other");
    eventually("7 changes and a conflict", DEADLINE, || {
        let s = m.get_json("/api/status");
        s["head"].as_u64() == Some(m.first_head() + 8) && s["conflicts"].as_u64() == Some(1)
    });

    let all = m.get_json("/api/files");
    assert_eq!(all["total"], 8, "{all}"); // docs, a.txt, f0..f4 and the conflict copy
    let page = m.get_json("/api/files?prefix=docs/f&offset=1&limit=2");
    let paths: Vec<&str> = page["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["docs/f1.txt", "docs/f2.txt"]);
    assert_eq!((page["total"].as_u64(), page["files"][0]["kind"].as_str()), (Some(5), Some("file")));

    let h = m.get_json("/api/files/history?path=docs/a.txt");
    assert_eq!(h["revisions"].as_array().unwrap().len(), 1, "{h}");
    assert_eq!(h["revisions"][0]["origin"], "n1");
    assert_eq!(h["holders"][0]["node"], "n1");
    assert_eq!(h["conflicts"][0]["node"], "n2");

    let c = m.get_json("/api/conflicts");
    assert_eq!(c["total"], 1);
    let copy = c["conflicts"][0]["copy"].as_str().unwrap();
    assert!(copy.starts_with("docs/a (conflict from n2 "), "{copy}");
    let copy_history = m.get_json(&format!("/api/files/history?path={}", urlencode(copy)));
    assert_eq!(copy_history["revisions"][0]["origin"], "n2");

    let first = m.first_head();
    let ch = m.get_json(&format!("/api/changes?since={}", first + 6));
    let revs: Vec<u64> = ch["changes"].as_array().unwrap().iter().map(|c| c["rev"].as_u64().unwrap()).collect();
    assert_eq!((ch["head"].as_u64(), revs), (Some(first + 8), vec![first + 7, first + 8]));
    assert_eq!(m.get_json("/api/changes?limit=3")["changes"].as_array().unwrap().len(), 3);

    // Bad input: a clear JSON error with the right status.
    for (path, status, needle) in [
        ("/api/files?offset=50", 422, "past the end"),
        ("/api/files?limit=0", 422, "between 1 and 1000"),
        ("/api/files?limit=5000", 422, "between 1 and 1000"),
        ("/api/files?offset=-1", 422, "negative"),
        ("/api/files?limit=ten", 400, "whole number"),
        ("/api/files?colour=blue", 400, "unknown query parameter"),
        ("/api/files?limit=1&limit=2", 400, "twice"),
        ("/api/conflicts?offset=1", 422, "past the end"),
        ("/api/files/history", 400, "missing query parameter path"),
        ("/api/files/history?path=../etc/passwd", 400, "invalid path"),
        ("/api/files/history?path=docs/none.txt", 404, "never seen"),
    ] {
        let r = m.call("GET", path, None);
        assert_eq!(r.status, status, "GET {path}: {}", r.text());
        assert!(r.error().contains(needle), "GET {path}: {}", r.text());
    }
    let beyond = format!("/api/changes?since={}", first + 99);
    let r = m.call("GET", &beyond, None);
    assert_eq!(r.status, 422, "GET {beyond}: {}", r.text());
    assert!(r.error().contains(&format!("beyond the head revision {}", first + 8)), "GET {beyond}: {}", r.text());
}

fn urlencode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

#[test]
fn provisioning_routes_check_their_input() {
    let m = Manager::start("api-prov");
    for (method, path) in [("POST", "/api/nodes"), ("POST", "/api/vms")] {
        let r = m.call(method, path, Some("{not json"));
        assert_eq!(r.status, 400, "{method} {path}: {}", r.text());
        assert!(r.error().contains("malformed JSON"), "{}", r.text());
        let r = m.call(method, path, Some("[1, 2]"));
        assert_eq!(r.status, 400, "{method} {path}: {}", r.text());
        let r = m.call(method, path, Some(&format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000))));
        assert_eq!(r.status, 413, "{method} {path}: {}", r.text());
        assert!(r.error().contains("larger than"), "{}", r.text());
    }
    // Without a provisioner the routes say so; with one, unknown ids are 404.
    for (method, path) in [("DELETE", "/api/nodes/nobody"), ("DELETE", "/api/vms/i-nobody"), ("GET", "/api/vms")] {
        let r = m.call(method, path, None);
        assert!([503, 404, 200].contains(&r.status), "{method} {path}: {}", r.text());
        if r.status != 200 {
            r.error();
        }
    }
}

#[test]
fn every_route_needs_the_token_except_the_page_and_the_document() {
    let (m, _n1) = manager_with_a_node("api-auth");
    let doc = request(m.addr, "GET", "/api/openapi.json", None, None);
    assert_eq!(doc.status, 200);
    for (path, methods) in doc.json()["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            let method = method.to_ascii_uppercase();
            let concrete = path.replace("{id}", "n1");
            let public = concrete == "/" || concrete == "/api/openapi.json";
            for token in [None, Some("wrong"), Some(&"0".repeat(64) as &str)] {
                let r = request(m.addr, &method, &concrete, token, (method == "POST").then_some("{}"));
                if public {
                    assert_eq!(r.status, 200, "{method} {concrete}");
                } else {
                    assert_eq!(r.status, 401, "{method} {concrete} with {token:?}: {}", r.text());
                    assert!(r.error().contains("operator token"));
                    assert_eq!(r.header("www-authenticate").as_deref(), Some("bearer realm=\"sync-manager\""));
                }
            }
        }
    }
    // The unauthenticated VM creation of the issue, spelled out.
    let r = request(m.addr, "POST", "/api/vms", None, Some(r#"{"node": "evil"}"#));
    assert_eq!(r.status, 401);
    // The query token is for the event stream only.
    let r = request(m.addr, "GET", &format!("/api/status?token={}", m.token), None, None);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = request(m.addr, "GET", &format!("/metrics?token={}", m.token), None, None);
    assert_eq!(r.status, 400, "{}", r.text());
    // Secrets never reach the log, even with debug logging and a token in a query.
    let r = request(m.addr, "GET", &format!("/api/events?token={}x", m.token), None, None);
    assert_eq!(r.status, 401);
    assert_no_secret(&m.log, &[&m.token, &m.cluster_token]);
}

#[test]
fn openapi_document_matches_the_router() {
    let m = Manager::start("api-openapi");
    let doc = request(m.addr, "GET", "/api/openapi.json", None, None).json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            documented.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    // Every documented route is served (not "no such route", not 405)...
    for (method, path) in &documented {
        let concrete = path.replace("{id}", "n1");
        if concrete == "/api/events" {
            let ev = Events::open(m.addr, &m.token);
            assert_eq!((ev.status, ev.content_type.as_str()), (200, "text/event-stream"));
            continue;
        }
        let r = m.call(method, &concrete, (method == "POST").then_some("{}"));
        assert_ne!(r.status, 405, "{method} {path}");
        if r.status == 404 {
            assert!(!r.error().contains("no such route"), "{method} {path} is documented but not routed");
        }
    }
    // ...and every other method on those paths is refused with 405 and an Allow header
    // listing exactly the documented ones, so the router has nothing undocumented.
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        let concrete = path.replace("{id}", "n1");
        let allowed: BTreeSet<String> = documented.iter().filter(|(_, p)| p == path).map(|(m, _)| m.to_ascii_lowercase()).collect();
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if allowed.contains(&method.to_ascii_lowercase()) {
                continue;
            }
            let r = m.call(method, &concrete, None);
            assert_eq!(r.status, 405, "{method} {path} is not documented but answered {}", r.status);
            let allow: BTreeSet<String> = r.header("allow").unwrap().split(',').map(|s| s.trim().to_string()).collect();
            assert_eq!(allow, allowed, "{path}");
        }
    }
    // Paths that are not documented at all do not exist.
    for path in ["/api", "/api/", "/api/node", "/api/nodes/n1/extra", "/api/files/history/x", "/metrics/x"] {
        let r = m.call("GET", path, None);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.error().contains("no such route"));
    }
}

/// Parses the OpenMetrics text format strictly enough to catch a broken exposition:
/// HELP/TYPE/UNIT lines, `name{labels} value` samples, every sample's family declared
/// (a counter's samples end in `_total`), and `# EOF` last.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end:\n{text}");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram", "summary", "unknown", "info", "stateset", "gaugehistogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
        } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            assert!(!line.starts_with('#'), "unknown comment {line}");
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample without value: {line}"));
            let name = series.split('{').next().unwrap();
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("label without value in {line}"));
                    assert!(!k.is_empty() && v.starts_with('"') && v.ends_with('"'), "{line}");
                }
            }
            let family = ["_total", "_bucket", "_sum", "_count", "_created"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|f| types.contains_key(*f)))
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample of undeclared family: {line}");
            if types[family] == "counter" {
                assert!(name.ends_with("_total") || name.ends_with("_created"), "a counter sample must end in _total: {line}");
            }
            samples.insert(series.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line}")));
        }
    }
    samples
}

#[test]
fn metrics_parse_and_counters_move_when_changes_arrive() {
    let m = Manager::start("api-metrics");
    let scrape = || {
        let r = m.call("GET", "/metrics", None);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("content-type").unwrap().starts_with("application/openmetrics-text; version=1.0.0"));
        parse_prometheus(&r.text())
    };
    let first = m.first_head() as f64;
    let before = scrape();
    assert_eq!(before["sync_manager_head_revision"], first);
    assert_eq!(before["sync_manager_nodes_online"], 0.0);
    let n1 = FakeNode::connect(&m.vhost, "n1");
    n1.heartbeat(0, 0);
    n1.put_file("a.txt", b"a");
    n1.put_file("b.txt", b"b");
    eventually("the counters to move", DEADLINE, || {
        let s = scrape();
        s["sync_manager_head_revision"] == first + 2.0
            && s.get("sync_manager_changes_in_total{outcome=\"accepted\"}") == Some(&2.0)
            // Two broadcasts (Applied) and two replies (Decided).
            && s["sync_manager_messages_out_total"] >= 4.0
            // A heartbeat and two changes.
            && s["sync_manager_messages_in_total"] >= 3.0
            && s["sync_manager_files"] == 2.0
            && s["sync_manager_nodes_online"] == 1.0
    });
    assert!(scrape()["sync_manager_http_requests_total"] > before["sync_manager_http_requests_total"]);
}

#[test]
fn event_stream_pushes_nodes_transfers_and_changes() {
    let m = Manager::start("api-events");
    let r = request(m.addr, "GET", "/api/events?token=wrong", None, None);
    assert_eq!(r.status, 401);
    let mut ev = Events::open(m.addr, &m.token);
    assert_eq!((ev.status, ev.content_type.as_str()), (200, "text/event-stream"));
    ev.wait_for("nodes", "the empty node list", |v| v.as_array().is_some_and(|a| a.is_empty()));
    let n1 = FakeNode::connect(&m.vhost, "n1");
    n1.heartbeat(0, 3);
    ev.wait_for("nodes", "n1 online", |v| v[0]["id"] == "n1" && v[0]["online"] == true);
    ev.wait_for("transfers", "n1 pulling 3", |v| v[0]["node"] == "n1" && v[0]["pending_pulls"] == 3);
    n1.put_file("live.txt", b"live");
    let c = ev.wait_for("changes", "live.txt", |v| v["changes"].as_array().unwrap().iter().any(|c| c["path"] == "live.txt"));
    assert_eq!(c["head"], m.first_head() + 1);
    ev.wait_for("status", "the head one past the first", |v| v["head"] == m.first_head() + 1);
    n1.heartbeat(0, 0);
    ev.wait_for("transfers", "the transfer to finish", |v| v.as_array().is_some_and(|a| a.is_empty()));
}

#[test]
fn https_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let m = Manager::start_with("api-tls", &["--tls-cert", cert_pem.to_str().unwrap(), "--tls-key", key_pem.to_str().unwrap()]);
    let url = format!("https://localhost:{}/api/status", m.addr.port());
    let curl = |extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--resolve", &format!("localhost:{}:127.0.0.1", m.addr.port()), "-w", "\n%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl runs (scripts/setup.sh installs it)");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let auth = format!("Authorization: Bearer {}", m.token);
    let (ok, out, err) = curl(&["--cacert", cert_pem.to_str().unwrap(), "-H", &auth]);
    assert!(ok, "{err}");
    assert!(out.ends_with("\n200") && out.contains("\"head\":") && out.contains("\"files\":0"), "{out}");
    let (ok, out, _) = curl(&["--cacert", cert_pem.to_str().unwrap()]);
    assert!(ok && out.ends_with("\n401"), "{out}");
    // Without trusting the certificate, the client refuses the server.
    let (ok, _, err) = curl(&["-H", &auth]);
    assert!(!ok, "an untrusted certificate was accepted");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Plain HTTP on the TLS port gets no API answer.
    let mut s = std::net::TcpStream::connect(m.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    // The server may hang up before reading it all.
    let _ = write!(s, "GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", m.token);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("\"head\""), "plain HTTP was answered on the TLS port");
}

#[test]
fn credentials_file_and_cli() {
    let m = Manager::start("api-creds");
    let path = m.dir.path().join("credentials.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    for t in [&m.token, &m.cluster_token] {
        assert!(t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()), "token is 32 random bytes in hex");
    }
    assert_ne!(m.token, m.cluster_token);
    let out = Command::new(bin("manager")).args(["credentials", "show", "--db"]).arg(m.db()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&m.token) && text.contains(&m.cluster_token), "{text}");
    // `status` never shows a secret.
    let out = Command::new(bin("manager")).args(["status", "--db"]).arg(m.db()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(&m.token) && !text.contains(&m.cluster_token), "{text}");
    // A credentials file others can read is refused.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(bin("manager")).args(["credentials", "show", "--db"]).arg(m.db()).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

/// Deletes a RabbitMQ user at the end of the test.
struct BrokerUserGuard(String);
impl Drop for BrokerUserGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["-q", "delete_user", &self.0]).output();
    }
}

#[test]
fn the_cluster_broker_user_works_and_wrong_credentials_cannot_connect() {
    let m = Manager::start("api-broker-user");
    let vhost = Vhost::new("api-broker-user-own");
    let user = format!("t-sync-{}-{}", std::process::id(), rand::random::<u32>());
    let _guard = BrokerUserGuard(user.clone());
    let out = Command::new(bin("manager")).args(["credentials", "init-broker", "--vhost", &vhost.name, "--user", &user, "--db"]).arg(m.db()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "init-broker: {}", String::from_utf8_lossy(&out.stderr));
    let creds: serde_json::Value = serde_json::from_slice(&std::fs::read(m.dir.path().join("credentials.json")).unwrap()).unwrap();
    let password = creds["broker"]["password"].as_str().unwrap().to_string();
    assert_eq!(creds["broker"]["user"], user.as_str());
    assert!(!stdout.contains(&password), "init-broker printed the password: {stdout}");
    // The old tokens are kept.
    assert_eq!(creds["operator_token"], m.token.as_str());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = |pw: &str| format!("amqp://{user}:{pw}@127.0.0.1:5672/{}?heartbeat=10", vhost.name);
    rt.block_on(async {
        let good = broker_link::connect(&url(&password)).await.expect("the cluster user connects");
        broker_link::declare_common(&good).await.expect("the cluster user may declare the topology");
        let _ = good.close(200, "done".into()).await;
        let wrong = broker_link::connect(&url("not-the-password")).await;
        assert!(wrong.is_err(), "a wrong password connected");
        let other_vhost = broker_link::connect(&format!("amqp://{user}:{password}@127.0.0.1:5672/{}?heartbeat=10", m.vhost.name)).await;
        assert!(other_vhost.is_err(), "the cluster user reached a vhost it has no rights on");
    });
    // Re-running re-keys the user: the old password stops working.
    let out = Command::new(bin("manager")).args(["credentials", "init-broker", "--vhost", &vhost.name, "--user", &user, "--db"]).arg(m.db()).output().unwrap();
    assert!(out.status.success());
    rt.block_on(async { assert!(broker_link::connect(&url(&password)).await.is_err(), "the old password still works") });
    assert_no_secret(&m.log, &[&password, &m.token, &m.cluster_token]);
}

/// A manager whose database is locked says it is stuck even when no node sends anything:
/// its own periodic work (marking silent nodes offline, sending sync replies) is work it
/// took up and cannot finish. (The stall clock once ran only for batches of messages, so
/// a manager whose sessions always failed on a tick first never said so.)
#[test]
fn a_locked_database_is_reported_even_with_no_messages_coming_in() {
    let m = Manager::start("api-stuck-idle");
    assert_eq!(m.call("GET", "/api/health", None).status, 200);
    let lock = rusqlite::Connection::open(m.db()).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    eventually("the manager to say it is stuck", std::time::Duration::from_secs(90), || {
        let r = m.call("GET", "/api/health", None);
        r.status == 503 && r.json()["ok"] == false && r.json()["stalled_seconds"].as_u64().is_some_and(|s| s >= 30)
    });
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    eventually("the manager healthy again", DEADLINE, || m.call("GET", "/api/health", None).status == 200);
}
