//! TLS end to end: the manager and the nodes reach the broker over `amqps://` (the TLS
//! listener scripts/setup.sh opens on 127.0.0.1:5671, with a certificate from its local
//! test CA), and nodes serve and pull contents over https with a certificate of the
//! test's own. Untrusted certificates are refused on both paths.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use system_tests::*;

/// The CA scripts/setup.sh made for the broker's TLS listener.
const BROKER_CA: &str = "/etc/rabbitmq/syncfs-tls/ca.pem";

fn amqps_url(vhost: &Vhost, query: &str) -> String {
    format!("amqps://guest:guest@127.0.0.1:5671/{}?heartbeat=5{query}", vhost.name)
}

fn connect_error(url: &str) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    match rt.block_on(broker_link::connect(url)) {
        Ok(_) => panic!("connected to {url}, which should have been refused"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn broker_connections_over_tls_verify_the_broker() {
    assert!(Path::new(BROKER_CA).exists(), "{BROKER_CA} is missing: run scripts/setup.sh");
    let vhost = Vhost::new("amqps");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = broker_link::connect(&amqps_url(&vhost, &format!("&cacertfile={BROKER_CA}"))).await.expect("amqps with the broker's CA connects");
        let ch = broker_link::confirmed_channel(&conn).await.unwrap();
        broker_link::declare_common(&conn).await.expect("the topology is declared over TLS");
        broker_link::publish_confirmed(&ch, "", wire::topology::UPDATE_QUEUE, "tls-probe", b"probe").await.expect("a publish over TLS is confirmed");
    });

    // Without the CA the broker's certificate is not trusted: no connection.
    let err = connect_error(&amqps_url(&vhost, ""));
    assert!(err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"), "{err}");
    assert!(!err.contains("guest:guest"), "the password leaked into the error: {err}");
    // A CA file that is not there, or not PEM, is said plainly.
    let err = connect_error(&amqps_url(&vhost, "&cacertfile=/nonexistent/ca.pem"));
    assert!(err.contains("reading the broker's CA certificate /nonexistent/ca.pem"), "{err}");
    let not_pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_pem.path(), "not a certificate").unwrap();
    let err = connect_error(&amqps_url(&vhost, &format!("&cacertfile={}", not_pem.path().display())));
    assert!(err.contains("holds no PEM certificate"), "{err}");
    // A CA file with a plain amqp:// URL is a mistake, not a silent downgrade.
    let err = connect_error(&format!("amqp://guest:guest@127.0.0.1:5672/{}?cacertfile={BROKER_CA}", vhost.name));
    assert!(err.contains("not amqps://"), "{err}");
}

fn write_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (dir.join("node-cert.pem"), dir.join("node-key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    (cert_pem, key_pem)
}

fn curl(url: &str, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"]).args(extra).arg(url).output().expect("curl runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn nodes_sync_over_amqps_and_pull_over_https() {
    let dir = tempfile::Builder::new().prefix("syncfs-tls-").tempdir().unwrap();
    let vhost = Vhost::new("tls");
    let broker = amqps_url(&vhost, &format!("&cacertfile={BROKER_CA}"));
    let _manager = ManagerProc::start(dir.path(), &broker);
    let (cert, key) = write_cert(dir.path());
    let opts = NodeOpts {
        broker: Some(broker.clone()),
        extra: ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--tls-ca", cert.to_str().unwrap()].map(String::from).to_vec(),
        tls_ca: Some(cert.clone()),
        ..Default::default()
    };
    let nodes: Vec<NodeProc> = ["n1", "n2"].iter().map(|id| NodeProc::start_opts(dir.path(), id, &vhost, opts.clone())).collect();
    for n in &nodes {
        n.wait_connected();
    }
    let url = std::fs::read_to_string(nodes[0].data.join("node.url")).unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // A file written on n1 reaches n2: decided over amqps, pulled over https.
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    write(&nodes[0].p("over-tls.bin"), &body);
    eventually("the file to reach n2 over TLS", Duration::from_secs(60), || std::fs::read(nodes[1].p("over-tls.bin")).ok().as_deref() == Some(&body[..]));
    let metrics = curl(&format!("{url}/metrics"), &["--cacert", cert.to_str().unwrap()]);
    assert!(metrics.0 && metrics.1.ends_with("\n200"), "{metrics:?}");
    let served: f64 = metrics
        .1
        .lines()
        .find(|l| l.starts_with("syncfs_node_bytes_served_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no bytes-served counter in:\n{}", metrics.1));
    assert!(served >= body.len() as f64, "n1 served {served} bytes, expected at least {}", body.len());

    // The node's HTTPS server refuses clients that do not trust it, and plain HTTP.
    let (ok, _, err) = curl(&format!("{url}/status"), &[]);
    assert!(!ok && err.to_lowercase().contains("certificate"), "an untrusted certificate was accepted: {err}");
    let plain = url.replacen("https://", "http://", 1);
    let (ok, out, _) = curl(&format!("{plain}/status"), &[]);
    assert!(!ok || !out.contains("\"connected\""), "plain HTTP got a status from the TLS port: {out}");
}
