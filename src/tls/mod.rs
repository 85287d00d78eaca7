//! TLS for `--tls-listen` and `--wss-listen`: the rustls server settings
//! built from `--cert`, `--key` and `--client-ca`, and rebuilt on SIGHUP
//! (see [`crate::reload`]).
//!
//! What stays across a rebuild is what makes a reconnect storm cheap: the
//! ticket key (TLS 1.3 tickets and TLS 1.2 session tickets, stateless on
//! our side) and the TLS 1.2 session-id cache. A client that resumes after
//! a reload still skips the full handshake.
//!
//! The connection itself is a layer of the shard's socket loop (see
//! `shard::layer`): rustls works on our byte buffers, no task or thread per
//! connection. Its records are sealed and opened by [`record`], which keeps
//! an idle connection's traffic keys unexpanded.

pub mod record;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::RootCertStore;

use crate::config::Config;

/// TLS 1.2 sessions remembered by id (for clients that do not take
/// tickets); each is a few hundred bytes.
const SESSION_CACHE: usize = 4096;

/// The cipher suites, in the order the broker picks them whatever the
/// client prefers. AES-128-GCM with SHA-256 first: most clients (OpenSSL's
/// and rustls's defaults) put AES-256-GCM-SHA384 first, whose key schedule
/// runs on SHA-512 blocks, which no x86 instruction speeds up, while
/// SHA-256 has SHA-NI; in a resumed TLS 1.3 handshake SHA-384 was the
/// broker's largest single cost (12 % of its CPU, profiled), and AES-128 is
/// also the faster cipher for the bytes that follow. ChaCha20-Poly1305
/// next, for clients without AES-128-GCM; AES-256-GCM last.
pub(crate) static SUITES_IN_OUR_ORDER: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::ring::cipher_suite::*;
    &[
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ]
};

/// What the TLS listeners need, loaded from the files `Config` names.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    require_client_cert: bool,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
}

impl TlsFiles {
    /// `None` when no TLS listener is configured.
    pub fn from_config(config: &Config) -> Result<Option<TlsFiles>, String> {
        let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
            return Ok(None);
        };
        let ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS tickets: {e}"))?;
        Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.client_ca.clone(),
            require_client_cert: config.require_client_cert,
            ticketer,
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE),
        }))
    }

    /// Reads the certificate chain, the key and the client CA bundle and
    /// builds the server settings; the error names the file and the problem
    /// in one line.
    pub fn load(&self) -> Result<Arc<ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: record::LEAN_SUITES.clone(),
            ..rustls::crypto::ring::default_provider()
        });
        let certs = read_certs(&self.cert, "--cert")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            format!(
                "--key {}: {}",
                self.key.display(),
                pem_problem(&e, "private key")
            )
        })?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(path, "--client-ca")? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("--client-ca {}: {e}", path.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if self.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| format!("--client-ca {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            format!(
                "--cert {} with --key {}: {e}",
                self.cert.display(),
                self.key.display()
            )
        })?;
        // Our order, not the client's (see SUITES_IN_OUR_ORDER).
        config.ignore_client_order = true;
        config.ticketer = self.ticketer.clone();
        config.session_storage = self.sessions.clone();
        // One ticket per handshake (rustls sends 2 by default): a
        // device reconnects from one place, and each ticket costs an
        // encryption and ~200 bytes on the wire.
        config.send_tls13_tickets = 1;
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{flag} {}: {}",
                path.display(),
                pem_problem(&e, "certificate")
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn pem_problem(e: &rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => format!("no PEM {what} in the file"),
        other => format!("not a PEM {what} ({other:?})"),
    }
}

/// The subject common name of a DER certificate, for
/// `--use-identity-as-username`.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// For tests: a server offering `server_suites` with a self-signed ECDSA
/// P-256 certificate for `localhost` made here, and a client on rustls's
/// stock ring suites and `client_versions` that trusts it.
#[cfg(test)]
pub(crate) fn test_configs(
    server_suites: Vec<rustls::SupportedCipherSuite>,
    client_versions: &[&'static rustls::SupportedProtocolVersion],
) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = CertificateDer::from(made.cert.der().to_vec());
    let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).unwrap();
    let server_provider = rustls::crypto::CryptoProvider {
        cipher_suites: server_suites,
        ..rustls::crypto::ring::default_provider()
    };
    let server = ServerConfig::builder_with_provider(Arc::new(server_provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(client_versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}
