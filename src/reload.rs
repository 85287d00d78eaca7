//! Live reload: SIGHUP rereads the password file, the ACL file and the TLS
//! certificate, key and client CA without dropping a connection.
//!
//! Shard 0 notices the signal at its next tick (within 100 ms), reads and
//! parses every file, and only if all are good installs them here; every
//! shard picks the new ones up at its next tick (a generation number
//! tells it something changed). A file that cannot be read or parsed keeps
//! the old ones in force, and the log says which file and why.
//!
//! What changes applies from then on: a CONNECT is checked against the new
//! passwords, a SUBSCRIBE and a PUBLISH (and the delivery of each message)
//! against the new ACL, a TLS handshake with the new certificate (sessions
//! resumed with tickets from before the reload still resume: the ticket
//! key stays). Connections already open stay open.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::proto::acl::Acl;
use crate::tls::TlsFiles;

/// What a reload replaces.
#[derive(Clone)]
pub struct InForce {
    /// The password check.
    pub auth: Arc<Authenticator>,
    /// The ACL, if there is an ACL file.
    pub acl: Option<Arc<Acl>>,
    /// The TLS settings, if there is a TLS listener.
    pub tls: Option<Arc<ServerConfig>>,
}

/// The credentials and ACL in force, shared by every shard.
pub struct Reloadable {
    /// Set by the SIGHUP handler; taken by shard 0's tick.
    requested: Arc<AtomicBool>,
    /// Bumped when new files are installed.
    generation: AtomicU64,
    current: Mutex<InForce>,
    /// Where the TLS settings come from (and the ticket key they keep).
    tls_files: Option<TlsFiles>,
}

impl Reloadable {
    /// The files loaded at start; registers the SIGHUP handler.
    pub fn new(start: InForce, tls_files: Option<TlsFiles>) -> std::io::Result<Reloadable> {
        let requested = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, requested.clone())?;
        Ok(Reloadable {
            requested,
            generation: AtomicU64::new(0),
            current: Mutex::new(start),
            tls_files,
        })
    }

    /// Shard 0's tick: when a SIGHUP came since the last call, rereads
    /// the files named in `config`. Returns what happened, for the log.
    pub fn reload_if_requested(&self, config: &Config) -> Option<Result<String, String>> {
        if !self.requested.swap(false, Ordering::Relaxed) {
            return None;
        }
        Some(self.reload(config))
    }

    /// Rereads the password file, the ACL file and the TLS files;
    /// installs them only if all are good.
    pub fn reload(&self, config: &Config) -> Result<String, String> {
        let auth = Authenticator::from_config(config).map_err(|e| e.to_string())?;
        let acl = match config.acl_file.as_deref() {
            Some(path) => Some(Arc::new(load_acl(path)?)),
            None => None,
        };
        let tls = match &self.tls_files {
            Some(files) => Some(files.load()?),
            None => None,
        };
        let users = auth.passwords().map_or(0, |p| p.len());
        let what = match (&config.password_file, &config.acl_file) {
            (Some(p), Some(a)) => format!(
                "password file {} ({users} users) and ACL file {}",
                p.display(),
                a.display()
            ),
            (Some(p), None) => format!("password file {} ({users} users)", p.display()),
            (None, Some(a)) => format!("ACL file {}", a.display()),
            (None, None) if tls.is_none() => {
                "nothing to reload (no password, ACL or TLS files)".to_string()
            }
            (None, None) => String::new(),
        };
        let what = match (&tls, &config.cert) {
            (Some(_), Some(cert)) if what.is_empty() => {
                format!("TLS certificate {}", cert.display())
            }
            (Some(_), Some(cert)) => format!("{what} and TLS certificate {}", cert.display()),
            _ => what,
        };
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = InForce {
            auth: Arc::new(auth),
            acl,
            tls,
        };
        self.generation.fetch_add(1, Ordering::Release);
        Ok(what)
    }

    /// The files in force and their generation, when it is not `seen`.
    pub fn newer_than(&self, seen: u64) -> Option<(u64, InForce)> {
        let generation = self.generation.load(Ordering::Acquire);
        if generation == seen {
            return None;
        }
        let current = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some((generation, current))
    }
}

/// Reads and parses an ACL file; the error names the file and the line.
pub fn load_acl(path: &std::path::Path) -> Result<Acl, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("acl file {}: {e}", path.display()))?;
    Acl::parse(&text).map_err(|e| format!("acl file {}: {e}", path.display()))
}
