//! `--tls-ca`: loadgen's clients over TLS against coremq's TLS listener,
//! with a CA and a server certificate made here by rcgen. conn and churn
//! complete with nothing failed (churn resumes sessions, as real clients
//! do), pubsub delivers every QoS 1 message once, and trusting another CA
//! fails every connection as `tls`. With `--ws` too: WebSocket over TLS on
//! coremq's `--wss-listen`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose,
};

mod common;

use common::{
    assert_every_message_delivered, coremq_with, free_port, loadgen_failing, loadgen_ok, u,
    wait_listening,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A self-signed CA, written as `dir/<name>.pem`.
fn ca(dir: &Path, name: &str) -> (CertifiedIssuer<'static, KeyPair>, PathBuf) {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = date_time_ymd(2000, 1, 1);
    params.not_after = date_time_ymd(2100, 1, 1);
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, issuer.pem()).unwrap();
    (issuer, pem)
}

/// The CA, a server certificate for `localhost` signed by it (cert, key),
/// and an unrelated CA.
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let (issuer, ca_pem) = ca(dir, "ca");
    let (_, wrong_pem) = ca(dir, "wrong-ca");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_pem, key_pem) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    (ca_pem, cert_pem, key_pem, wrong_pem)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// coremq with one shard and a TLS listener whose certificate the test CA
/// signed; the PEM files live until it is dropped.
struct TlsBroker {
    server: common::Server,
    addr: String,
    /// `--wss-listen`.
    wss_addr: String,
    ca: PathBuf,
    wrong_ca: PathBuf,
    dir: PathBuf,
}

impl TlsBroker {
    fn start(tag: &str) -> TlsBroker {
        let dir = std::env::temp_dir().join(format!("loadgen-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, cert, key, wrong_ca) = pki(&dir);
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let wss_port = free_port();
        let wss_addr = format!("127.0.0.1:{wss_port}");
        let (server, _plain) = coremq_with(&[
            "--shards",
            "1",
            "--tls-listen",
            &addr,
            "--wss-listen",
            &wss_addr,
            "--cert",
            s(&cert),
            "--key",
            s(&key),
        ]);
        wait_listening(port);
        wait_listening(wss_port);
        TlsBroker {
            server,
            addr,
            wss_addr,
            ca,
            wrong_ca,
            dir,
        }
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn conn_and_churn_over_tls_against_coremq() {
    let t = TlsBroker::start("conn");
    let (ca, wrong, tls_addr) = (t.ca.clone(), t.wrong_ca.clone(), t.addr.clone());
    let pid = t.server.pid();

    let r = loadgen_ok(
        &[
            "conn",
            "-b",
            &tls_addr,
            "--tls-ca",
            s(&ca),
            "-n",
            "200",
            "--hold",
            "1",
            "--keepalive",
            "1",
            "--broker-pid",
            &pid,
        ],
        LIMIT,
    );
    assert_eq!(u(&r, "connected"), 200, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{r}");
    assert!(u(&r, "pongs") > 0, "PINGREQ/PINGRESP through TLS: {r}");

    let r = loadgen_ok(
        &[
            "churn",
            "-b",
            &tls_addr,
            "--tls-ca",
            s(&ca),
            "-c",
            "5",
            "--duration",
            "1",
            "--source-skip",
            "8",
        ],
        LIMIT,
    );
    assert!(u(&r, "cycles") > 10, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{r}");

    // A CA that did not sign the broker's certificate: every connection
    // fails as `tls`, none hangs until the timeout.
    let r = loadgen_failing(
        &[
            "conn",
            "-b",
            &tls_addr,
            "--tls-ca",
            s(&wrong),
            "-n",
            "20",
            "--hold",
            "0.1",
            "--source-skip",
            "16",
        ],
        LIMIT,
    );
    assert_eq!(u(&r, "connected"), 0, "{r}");
    assert_eq!(r["failures"]["tls"].as_u64(), Some(20), "{r}");
}

#[test]
fn pubsub_over_tls_delivers_every_message_once() {
    let t = TlsBroker::start("pubsub");
    let (ca, tls_addr) = (t.ca.clone(), t.addr.clone());
    let r = loadgen_ok(
        &[
            "pubsub",
            "-b",
            &tls_addr,
            "--tls-ca",
            s(&ca),
            "--pairs",
            "20",
            "--qos",
            "1",
            "--duration",
            "1",
            "--rate",
            "2000",
        ],
        LIMIT,
    );
    assert_eq!(
        u(&r["pubsub"], "unique"),
        u(&r["pubsub"], "expected"),
        "{r}"
    );
    assert_every_message_delivered(&r);
}

#[test]
fn conn_and_churn_over_websocket_over_tls() {
    let t = TlsBroker::start("wss");
    let (ca, wss) = (t.ca.clone(), t.wss_addr.clone());
    let r = loadgen_ok(
        &[
            "conn",
            "-b",
            &wss,
            "--tls-ca",
            s(&ca),
            "--ws",
            "/mqtt",
            "-n",
            "100",
            "--hold",
            "1",
            "--keepalive",
            "1",
        ],
        LIMIT,
    );
    assert_eq!(u(&r, "connected"), 100, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{r}");
    assert!(u(&r, "pongs") > 0, "{r}");

    let r = loadgen_ok(
        &[
            "churn",
            "-b",
            &wss,
            "--tls-ca",
            s(&ca),
            "--ws",
            "/mqtt",
            "-c",
            "5",
            "--duration",
            "1",
            "--source-skip",
            "8",
        ],
        LIMIT,
    );
    assert!(u(&r, "cycles") > 10, "{r}");
    assert_eq!(u(&r, "failed_total"), 0, "{r}");
}
