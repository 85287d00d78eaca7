//! A throwaway PKI for the TLS and wss tests, generated with rcgen inside
//! each test (nothing checked in, nothing that expires under the suite):
//! a test CA (ECDSA P-256), a server certificate for `localhost` and
//! 127.0.0.1 signed by it, client certificates by common name, an unrelated
//! "wrong" CA, and expired certificates (validity ended in 2001).
//!
//! Every file is PEM, written into the test's [`TempDir`]: certificates as
//! `CERTIFICATE` blocks, keys as PKCS#8 `PRIVATE KEY` blocks.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use super::TempDir;

/// Whether a leaf certificate is still valid or expired long ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// 2020-01-01 to 2100-01-01.
    Current,
    /// 2000-01-01 to 2001-01-01: `not_after` is in the past.
    Expired,
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (for a server: the chain, leaf first).
    pub cert: PathBuf,
    /// Its private key (PKCS#8).
    pub key: PathBuf,
}

impl CertFiles {
    /// The certificate's path as a string, for command lines.
    pub fn cert(&self) -> &str {
        path_str(&self.cert)
    }

    /// The key's path as a string, for command lines.
    pub fn key(&self) -> &str {
        path_str(&self.key)
    }
}

/// A certificate authority that signs leaf certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (what clients trust, or `--client-ca`).
    pub pem: PathBuf,
}

impl TestCa {
    /// A self-signed CA named `name`, written to `dir/<file>.pem`.
    pub fn new(dir: &TempDir, file: &str, name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let pem = dir.path(&format!("{file}.pem"));
        write(&pem, &issuer.pem());
        TestCa { issuer, pem }
    }

    /// The CA certificate's path as a string.
    pub fn pem(&self) -> &str {
        path_str(&self.pem)
    }

    /// A server certificate for DNS name `localhost` and IP 127.0.0.1
    /// (CN `localhost`), written to `dir/<file>.pem` and `dir/<file>.key`.
    pub fn server(&self, dir: &TempDir, file: &str, validity: Validity) -> CertFiles {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server SANs");
        params.distinguished_name = dn("localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(params, dir, file, validity)
    }

    /// A client certificate whose subject CN is `cn`, written to
    /// `dir/<file>.pem` and `dir/<file>.key`.
    pub fn client(&self, dir: &TempDir, file: &str, cn: &str, validity: Validity) -> CertFiles {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.leaf(params, dir, file, validity)
    }

    fn leaf(
        &self,
        mut params: CertificateParams,
        dir: &TempDir,
        file: &str,
        validity: Validity,
    ) -> CertFiles {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = match validity {
            Validity::Current => (date_time_ymd(2020, 1, 1), date_time_ymd(2100, 1, 1)),
            Validity::Expired => (date_time_ymd(2000, 1, 1), date_time_ymd(2001, 1, 1)),
        };
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let files = CertFiles {
            cert: dir.path(&format!("{file}.pem")),
            key: dir.path(&format!("{file}.key")),
        };
        write(&files.cert, &cert.pem());
        write(&files.key, &key.serialize_pem());
        files
    }
}

/// The usual set: the test CA, a current server certificate from it, and
/// an unrelated CA that signed nothing the broker uses.
pub struct Pki {
    /// The CA the broker's certificate (and good client certificates) chain to.
    pub ca: TestCa,
    /// An unrelated CA: trusting it instead of `ca` must fail.
    pub wrong_ca: TestCa,
    /// The broker's certificate (`--cert` / `--key`).
    pub server: CertFiles,
}

impl Pki {
    /// Generates the set into `dir`: `ca.pem`, `wrong-ca.pem`,
    /// `server.pem` / `server.key`.
    pub fn new(dir: &TempDir) -> Pki {
        let ca = TestCa::new(dir, "ca", "coremq test CA");
        let wrong_ca = TestCa::new(dir, "wrong-ca", "coremq unrelated CA");
        let server = ca.server(dir, "server", Validity::Current);
        Pki {
            ca,
            wrong_ca,
            server,
        }
    }

    /// `--cert S --key K` for the broker's current certificate.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--cert".into(),
            self.server.cert().into(),
            "--key".into(),
            self.server.key().into(),
        ]
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "coremq tests");
    dn.push(DnType::CommonName, cn);
    dn
}

fn write(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A UTF-8 path (every temp path here is) as `&str`.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}
