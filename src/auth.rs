//! Who may connect: the password file and the CONNECT username/password check.
//!
//! # Password file format
//!
//! The same as mosquitto 2.x's, so a file written by `mosquitto_passwd` works
//! here and one written by `coremq passwd` works in mosquitto. One user per
//! line:
//!
//! ```text
//! # comment lines and blank lines are ignored
//! alice:$7$101$VjFfItQ3aNuTr4NS$hsfjPJiGK5mHgGch4KXIw/r6ZKwW44x/Ht04qO8g+62cBcSRbgvWCd85wj1a1YIQXCwPeW7GIN/3gal6nOMJcQ==
//! bob:$6$gIt6tflvwyrvYMOt$LQEMPvMHxbeFSaOGxS2Yu54NLf/wdDuxkXt0w/HZ445IHajK5DE1nOvb+/UXb4Msr+6qa61fj9g6/nZryCmHiA==
//! ```
//!
//! - `USER:$7$ITERATIONS$SALT$HASH` — PBKDF2-HMAC-SHA512 (mosquitto 2.x's
//!   default). `SALT` and `HASH` are standard base64 with padding; `coremq
//!   passwd` writes a 12-byte random salt, a 64-byte hash and 101 iterations,
//!   as `mosquitto_passwd` does.
//! - `USER:$6$SALT$HASH` — mosquitto 1.x's format (`mosquitto_passwd -H
//!   sha512`): `HASH = SHA-512(password ‖ salt)`. Read, never written: one
//!   SHA-512 is far cheaper to brute-force than PBKDF2.
//!
//! The user name is everything before the first `:` (so it cannot contain
//! one); a line whose first non-blank character is `#` is a comment. A user
//! listed twice, a plain-text password or any other hash is an error naming
//! the file and line.
//!
//! # Decisions
//!
//! [`Authenticator::check`] follows mosquitto 2.x for *who* gets in and the
//! MQTT spec for *which* refusal code:
//!
//! | username | password file | result |
//! |---|---|---|
//! | none | any | accept if `allow_anonymous`, else *not authorized* (5) |
//! | given | yes | accept if the password verifies, else *bad user name or password* (4) |
//! | given | no | accept if `allow_anonymous` (the name is not checked), else *not authorized* (5) |
//!
//! With a password file and `allow_anonymous`, a client that *does* send a
//! username must still get its password right: anonymity is for clients that
//! send none. mosquitto answers 5 for a wrong password too; the spec's 4
//! (MQTT-3.2.2.3, v5 0x86) tells the client its credentials are at fault.
//! A password sent without a username (allowed by MQTT 5) is ignored.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use sha2::{Digest, Sha512};

use crate::config::{Config, DEFAULT_PASSWD_ITERATIONS};

/// Bytes of random salt `coremq passwd` writes (mosquitto's choice).
const SALT_LEN: usize = 12;
/// Bytes of a SHA-512 / PBKDF2-HMAC-SHA512 hash.
const HASH_LEN: usize = 64;
/// The MQTT user name and password fields are at most this long (2-byte length).
const MAX_FIELD_LEN: usize = 65_535;

/// Standard alphabet; padding written (as mosquitto does) but not required on read.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What the CONNACK says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthDecision {
    /// Let the client in.
    Accept,
    /// Wrong password, unknown user, or no password: v3.1.1 return code 4,
    /// v5 reason 0x86.
    BadCredentials,
    /// Anonymous client and anonymous access is off: v3.1.1 return code 5,
    /// v5 reason 0x87.
    NotAuthorized,
}

/// The read-only CONNECT check; build one at start and share it as
/// `Arc<Authenticator>` across shards.
#[derive(Debug, Clone)]
pub struct Authenticator {
    passwords: Option<PasswordFile>,
    allow_anonymous: bool,
}

impl Authenticator {
    /// An authenticator from its parts.
    pub fn new(passwords: Option<PasswordFile>, allow_anonymous: bool) -> Self {
        Authenticator {
            passwords,
            allow_anonymous,
        }
    }

    /// Loads `config.password_file` (if any) and takes `allow_anonymous`.
    pub fn from_config(config: &Config) -> Result<Self, AuthError> {
        let passwords = config
            .password_file
            .as_deref()
            .map(PasswordFile::load)
            .transpose()?;
        Ok(Authenticator::new(passwords, config.allow_anonymous))
    }

    /// The password file in use, if any.
    pub fn passwords(&self) -> Option<&PasswordFile> {
        self.passwords.as_ref()
    }

    /// Decides a CONNECT; see the table in the module docs. Costs one
    /// PBKDF2 (~0.1 ms at 101 iterations) when a password is checked.
    pub fn check(&self, username: Option<&str>, password: Option<&[u8]>) -> AuthDecision {
        match (username, &self.passwords) {
            (None, _) | (Some(_), None) => {
                if self.allow_anonymous {
                    AuthDecision::Accept
                } else {
                    AuthDecision::NotAuthorized
                }
            }
            (Some(user), Some(file)) => match password {
                Some(pw) if file.verify(user, pw) => AuthDecision::Accept,
                _ => AuthDecision::BadCredentials,
            },
        }
    }
}

/// A loaded password file: user name → hash.
#[derive(Clone)]
pub struct PasswordFile {
    users: HashMap<String, PasswordHash>,
}

impl fmt::Debug for PasswordFile {
    // Hashes stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish()
    }
}

impl PasswordFile {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.to_owned(),
            source: Arc::new(source),
        })?;
        Self::parse(&text, path)
    }

    /// Parses file contents; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AuthError> {
        let mut users: HashMap<String, (usize, PasswordHash)> = HashMap::new();
        for entry in entries(text) {
            let (line_no, user, hash) = entry.map_err(|(line, problem)| AuthError::Parse {
                path: path.to_owned(),
                line,
                problem,
            })?;
            let fail = |problem: String| AuthError::Parse {
                path: path.to_owned(),
                line: line_no,
                problem,
            };
            let hash =
                PasswordHash::parse(hash).map_err(|p| fail(format!("user {user:?}: {p}")))?;
            if let Some((first, _)) = users.get(user) {
                return Err(fail(format!("user {user:?} is already on line {first}")));
            }
            users.insert(user.to_owned(), (line_no, hash));
        }
        Ok(PasswordFile {
            users: users.into_iter().map(|(u, (_, h))| (u, h)).collect(),
        })
    }

    /// True if `user` is listed and `password` matches its hash; the
    /// comparison takes the same time wherever the bytes differ.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        self.users.get(user).is_some_and(|h| h.verify(password))
    }

    /// True if `user` is listed.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True if the file lists no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// The non-comment lines of a password file: `(line number, user, hash)`,
/// or `(line number, problem)` for a line with no `:`.
fn entries(text: &str) -> impl Iterator<Item = Result<(usize, &str, &str), (usize, String)>> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let line = line.trim_end();
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            return None;
        }
        Some(match line.split_once(':') {
            Some((user, hash)) if !user.is_empty() => Ok((i + 1, user, hash)),
            _ => Err((i + 1, "expected USER:HASH".to_owned())),
        })
    })
}

/// One stored password hash, in either mosquitto format.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        /// PBKDF2 rounds.
        iterations: u32,
        /// Salt bytes.
        salt: Vec<u8>,
        /// The 64-byte derived key.
        hash: [u8; HASH_LEN],
    },
    /// `$6$`: SHA-512(password ‖ salt).
    Sha512 {
        /// Salt bytes.
        salt: Vec<u8>,
        /// The 64-byte digest.
        hash: [u8; HASH_LEN],
    },
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordHash::Pbkdf2Sha512 { iterations, .. } => {
                write!(f, "Pbkdf2Sha512 {{ iterations: {iterations}, .. }}")
            }
            PasswordHash::Sha512 { .. } => f.write_str("Sha512 { .. }"),
        }
    }
}

impl fmt::Display for PasswordHash {
    /// The text after `USER:` on a password-file line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => write!(
                f,
                "$7${iterations}${}${}",
                B64.encode(salt),
                B64.encode(hash)
            ),
            PasswordHash::Sha512 { salt, hash } => {
                write!(f, "$6${}${}", B64.encode(salt), B64.encode(hash))
            }
        }
    }
}

impl PasswordHash {
    /// Parses `$7$ITER$SALT$HASH` or `$6$SALT$HASH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let decode = |what: &str, b64: &str| {
            B64.decode(b64)
                .map_err(|e| format!("{what} is not base64: {e}"))
        };
        let hash64 = |b64: &str| -> Result<[u8; HASH_LEN], String> {
            let v = decode("hash", b64)?;
            v.as_slice()
                .try_into()
                .map_err(|_| format!("hash is {} bytes, expected {HASH_LEN}", v.len()))
        };
        let salt = |b64: &str| -> Result<Vec<u8>, String> {
            let v = decode("salt", b64)?;
            if v.is_empty() {
                return Err("salt is empty".into());
            }
            Ok(v)
        };
        if let Some(rest) = s.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iter), Some(s), Some(h), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("expected $7$ITERATIONS$SALT$HASH".into());
            };
            let iterations = match iter.parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(format!("bad iteration count {iter:?}")),
            };
            Ok(PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt: salt(s)?,
                hash: hash64(h)?,
            })
        } else if let Some(rest) = s.strip_prefix("$6$") {
            let mut parts = rest.split('$');
            let (Some(s), Some(h), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err("expected $6$SALT$HASH".into());
            };
            Ok(PasswordHash::Sha512 {
                salt: salt(s)?,
                hash: hash64(h)?,
            })
        } else {
            Err(
                "unknown hash format: expected $7$... or $6$... (plain-text passwords are \
                 not accepted; write the file with `coremq passwd` or `mosquitto_passwd`)"
                    .into(),
            )
        }
    }

    /// A new PBKDF2-SHA512 hash of `password` with a fresh random salt.
    pub fn new(password: &[u8], iterations: u32) -> Result<Self, AuthError> {
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::getrandom(&mut salt)
            .map_err(|e| AuthError::Invalid(format!("cannot get random salt: {e}")))?;
        Ok(Self::pbkdf2(password, salt, iterations))
    }

    fn pbkdf2(password: &[u8], salt: Vec<u8>, iterations: u32) -> Self {
        let mut hash = [0u8; HASH_LEN];
        pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, iterations, &mut hash);
        PasswordHash::Pbkdf2Sha512 {
            iterations,
            salt,
            hash,
        }
    }

    /// True if `password` hashes to this.
    pub fn verify(&self, password: &[u8]) -> bool {
        let mut computed = [0u8; HASH_LEN];
        let expected = match self {
            PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut computed);
                hash
            }
            PasswordHash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                computed.copy_from_slice(&d.finalize());
                hash
            }
        };
        constant_time_eq(&computed, expected)
    }
}

/// Compares without an early exit, so timing does not reveal how many
/// leading bytes matched.
fn constant_time_eq(a: &[u8; HASH_LEN], b: &[u8; HASH_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `$7$101$SALT$HASH` for `password`, with a fresh random salt and
/// mosquitto_passwd's default 101 iterations.
pub fn hash_password(password: &[u8]) -> Result<String, AuthError> {
    hash_password_with(password, DEFAULT_PASSWD_ITERATIONS)
}

/// As [`hash_password`] with a chosen iteration count (≥ 1).
pub fn hash_password_with(password: &[u8], iterations: u32) -> Result<String, AuthError> {
    if iterations == 0 {
        return Err(AuthError::Invalid("iterations must be at least 1".into()));
    }
    check_password(password)?;
    Ok(PasswordHash::new(password, iterations)?.to_string())
}

/// Rejects user names the file format or MQTT cannot carry.
pub fn check_username(user: &str) -> Result<(), AuthError> {
    let problem = if user.is_empty() {
        "user name must not be empty"
    } else if user.contains(':') {
        "user name must not contain ':'"
    } else if user.trim_start().starts_with('#') {
        // It would read back as a comment line.
        "user name must not start with '#'"
    } else if user.chars().any(char::is_control) {
        "user name must not contain control characters"
    } else if user.len() > MAX_FIELD_LEN {
        "user name must be at most 65535 bytes"
    } else {
        return Ok(());
    };
    Err(AuthError::Invalid(problem.into()))
}

/// Rejects passwords `coremq passwd` will not store.
pub fn check_password(password: &[u8]) -> Result<(), AuthError> {
    let problem = if password.is_empty() {
        "password must not be empty"
    } else if password.contains(&b'\n') || password.contains(&b'\r') {
        "password must not contain a line break"
    } else if password.len() > MAX_FIELD_LEN {
        "password must be at most 65535 bytes"
    } else {
        return Ok(());
    };
    Err(AuthError::Invalid(problem.into()))
}

/// `text` with `user`'s line set to `user:hash`, replacing it in place or
/// appending it; every other line (comments included) is kept as it was.
pub fn set_entry(text: &str, user: &str, hash: &str) -> String {
    let new_line = format!("{user}:{hash}");
    let mut out = String::with_capacity(text.len() + new_line.len() + 1);
    let mut replaced = false;
    for line in text.lines() {
        if line_user(line) == Some(user) {
            // A second line for the same user is dropped, not kept stale.
            if !replaced {
                out.push_str(&new_line);
                out.push('\n');
                replaced = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !replaced {
        out.push_str(&new_line);
        out.push('\n');
    }
    out
}

/// `text` without `user`'s line, or `None` if `user` is not listed.
pub fn delete_entry(text: &str, user: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    for line in text.lines() {
        if line_user(line) == Some(user) {
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    found.then_some(out)
}

fn line_user(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    line.split_once(':').map(|(u, _)| u)
}

/// Adds `user` to the file at `path` or changes their password; `create`
/// starts a new file (replacing any). The file is replaced atomically.
pub fn set_password(
    path: &Path,
    user: &str,
    password: &[u8],
    iterations: u32,
    create: bool,
) -> Result<(), AuthError> {
    check_username(user)?;
    let hash = hash_password_with(password, iterations)?;
    let text = if create {
        String::new()
    } else {
        read_for_edit(path)?
    };
    write_atomically(path, &set_entry(&text, user, &hash), create)
}

/// Removes `user` from the file at `path`; an error if they are not in it.
pub fn delete_user(path: &Path, user: &str) -> Result<(), AuthError> {
    let text = read_for_edit(path)?;
    let Some(new) = delete_entry(&text, user) else {
        return Err(AuthError::Invalid(format!(
            "user {user:?} is not in {}",
            path.display()
        )));
    };
    write_atomically(path, &new, false)
}

/// Reads the file and checks it parses, so an edit never hides a broken
/// line the broker would then refuse.
fn read_for_edit(path: &Path) -> Result<String, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
        path: path.to_owned(),
        source: Arc::new(if source.kind() == io::ErrorKind::NotFound {
            io::Error::new(source.kind(), format!("{source} (use -c to create it)"))
        } else {
            source
        }),
    })?;
    PasswordFile::parse(&text, path)?;
    Ok(text)
}

/// Writes to a temporary file beside `path` and renames it over, so a
/// crash or a broker reading at the same time never sees half a file. A new
/// file is owner-only (0600); an existing file keeps its permissions.
fn write_atomically(path: &Path, text: &str, create: bool) -> Result<(), AuthError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io_err = |source: io::Error| AuthError::Io {
        path: path.to_owned(),
        source: Arc::new(source),
    };
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => 0o600,
        Err(e) => return Err(io_err(e)),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

/// Why a password file could not be read, parsed or edited.
#[derive(Debug, Clone)]
pub enum AuthError {
    /// The file could not be read or written.
    Io {
        /// The password file.
        path: PathBuf,
        /// The OS error (`Arc` so the error stays `Clone`).
        source: Arc<io::Error>,
    },
    /// A line is malformed.
    Parse {
        /// The password file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// A user name, password or edit that cannot be done.
    Invalid(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Io { path, source } => {
                write!(f, "password file {}: {source}", path.display())
            }
            AuthError::Parse {
                path,
                line,
                problem,
            } => write!(f, "password file {} line {line}: {problem}", path.display()),
            AuthError::Invalid(problem) => f.write_str(problem),
        }
    }
}

impl std::error::Error for AuthError {}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by mosquitto 2.0.11's mosquitto_passwd:
    //   mosquitto_passwd -c -b pw user pass
    const MOSQ_7_USER_PASS: &str = "$7$101$VjFfItQ3aNuTr4NS$hsfjPJiGK5mHgGch4KXIw/r6ZKwW44x/Ht04qO8g+62cBcSRbgvWCd85wj1a1YIQXCwPeW7GIN/3gal6nOMJcQ==";
    //   mosquitto_passwd -b pw alice 's3cret:x'
    const MOSQ_7_ALICE: &str = "$7$101$XtSj9ym0fdB5E6X/$jIFCLRVbLhQdiAaC0nFhFPk5hnV5SRpKeVmxoHRTOV8JYE0uEHcTX12e5sDm5S9ZhJt1AwWj8/F4Y5RoZi978Q==";
    //   mosquitto_passwd -I 1000 -c -b pw user 'pa:ss wörd'
    const MOSQ_7_1000: &str = "$7$1000$tu4i6uDNwHC2yImu$Mgm1A5iJjauSLxPx+TQ3jSrZ8UTiI9kqvKXRDgtd0ldgRhvC5BFRUeyKqFUgIys8vjzB/JpaYUyfDnL5293V8w==";
    //   mosquitto_passwd -H sha512 -c -b pw user pass
    const MOSQ_6_USER_PASS: &str = "$6$gIt6tflvwyrvYMOt$LQEMPvMHxbeFSaOGxS2Yu54NLf/wdDuxkXt0w/HZ445IHajK5DE1nOvb+/UXb4Msr+6qa61fj9g6/nZryCmHiA==";

    fn file(text: &str) -> PasswordFile {
        PasswordFile::parse(text, Path::new("pw")).unwrap()
    }

    fn parse_err(text: &str) -> String {
        PasswordFile::parse(text, Path::new("pw"))
            .unwrap_err()
            .to_string()
    }

    /// A fresh folder under the temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir()
                .join(format!("coremq-auth-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn verifies_hashes_written_by_mosquitto_passwd() {
        let f = file(&format!(
            "user:{MOSQ_7_USER_PASS}\nalice:{MOSQ_7_ALICE}\r\nold:{MOSQ_6_USER_PASS}\n"
        ));
        assert_eq!(f.len(), 3);
        assert!(f.verify("user", b"pass"));
        assert!(!f.verify("user", b"pass "));
        assert!(!f.verify("user", b"Pass"));
        assert!(!f.verify("user", b""));
        assert!(f.verify("alice", b"s3cret:x"), "password may contain ':'");
        assert!(f.verify("old", b"pass"), "$6$ (mosquitto 1.x) hashes");
        assert!(!f.verify("old", b"passs"));
        assert!(!f.verify("nobody", b"pass"));
        assert!(PasswordHash::parse(MOSQ_7_1000)
            .unwrap()
            .verify("pa:ss wörd".as_bytes()));
    }

    #[test]
    fn hash_password_writes_mosquittos_layout() {
        let h = hash_password(b"pass").unwrap();
        let parts: Vec<&str> = h.split('$').collect();
        assert_eq!(parts[..3], ["", "7", "101"]);
        assert_eq!(B64.decode(parts[3]).unwrap().len(), 12);
        assert_eq!(B64.decode(parts[4]).unwrap().len(), 64);
        assert!(
            parts[3].len() == 16 && parts[4].ends_with("=="),
            "padded base64 as mosquitto writes"
        );
        assert!(PasswordHash::parse(&h).unwrap().verify(b"pass"));
        assert_ne!(hash_password(b"pass").unwrap(), h, "fresh salt each time");
        let h = hash_password_with(b"pass", 7).unwrap();
        assert!(h.starts_with("$7$7$"));
        assert!(hash_password_with(b"pass", 0).is_err());
    }

    #[test]
    fn known_pbkdf2_vector_round_trips_through_display() {
        let h = PasswordHash::pbkdf2(b"pass", B64.decode("VjFfItQ3aNuTr4NS").unwrap(), 101);
        assert_eq!(h.to_string(), MOSQ_7_USER_PASS);
        let h6 = PasswordHash::parse(MOSQ_6_USER_PASS).unwrap();
        assert_eq!(h6.to_string(), MOSQ_6_USER_PASS);
    }

    #[test]
    fn comments_blank_lines_and_crlf_are_allowed() {
        let f = file(&format!(
            "# users\n\n   \n  # indented comment\r\nuser:{MOSQ_7_USER_PASS}\r\n"
        ));
        assert_eq!(f.len(), 1);
        assert!(f.verify("user", b"pass"));
        assert!(file("").is_empty());
    }

    #[test]
    fn parse_errors_name_file_and_line() {
        assert_eq!(
            parse_err("# c\nuserpass\n"),
            "password file pw line 2: expected USER:HASH"
        );
        assert_eq!(
            parse_err(":$6$x$y\n"),
            "password file pw line 1: expected USER:HASH"
        );
        let e = parse_err("\nbob:secret\n");
        assert!(
            e.starts_with("password file pw line 2: user \"bob\": unknown hash format"),
            "{e}"
        );
        let e = parse_err(&format!("a:{MOSQ_7_USER_PASS}\n\na:{MOSQ_6_USER_PASS}\n"));
        assert_eq!(
            e,
            "password file pw line 3: user \"a\" is already on line 1"
        );
        let e = parse_err("a:$7$0$VjFfItQ3aNuTr4NS$aGFzaA==\n");
        assert!(e.contains("bad iteration count \"0\""), "{e}");
        let e = parse_err("a:$7$101$VjFfItQ3aNuTr4NS$aGFzaA==\n");
        assert!(e.contains("hash is 4 bytes, expected 64"), "{e}");
        let e = parse_err("a:$7$101$!!$aGFzaA==\n");
        assert!(e.contains("salt is not base64"), "{e}");
        let e = parse_err("a:$7$101$x\n");
        assert!(e.contains("expected $7$ITERATIONS$SALT$HASH"), "{e}");
        let e = parse_err("a:$6$x\n");
        assert!(e.contains("expected $6$SALT$HASH"), "{e}");
    }

    #[test]
    fn load_names_the_file_on_io_error() {
        let e = PasswordFile::load(Path::new("/nonexistent/pw")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "password file /nonexistent/pw: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn set_entry_replaces_in_place_and_keeps_other_lines() {
        let text = "# head\nalice:$6$a$b\n\nbob:$6$c$d\n# tail\n";
        assert_eq!(
            set_entry(text, "alice", "NEW"),
            "# head\nalice:NEW\n\nbob:$6$c$d\n# tail\n"
        );
        assert_eq!(
            set_entry(text, "carol", "NEW"),
            "# head\nalice:$6$a$b\n\nbob:$6$c$d\n# tail\ncarol:NEW\n"
        );
        assert_eq!(set_entry("", "carol", "NEW"), "carol:NEW\n");
        assert_eq!(
            set_entry("x:1", "carol", "N"),
            "x:1\ncarol:N\n",
            "adds a missing final newline"
        );
        assert_eq!(
            set_entry("#alice:1\n", "alice", "N"),
            "#alice:1\nalice:N\n",
            "comments untouched"
        );
    }

    #[test]
    fn delete_entry_removes_only_that_user() {
        let text = "# head\nalice:$6$a$b\nbob:$6$c$d\n";
        assert_eq!(delete_entry(text, "alice").unwrap(), "# head\nbob:$6$c$d\n");
        assert_eq!(delete_entry(text, "al"), None);
        assert_eq!(delete_entry("# alice:x\n", "alice"), None);
    }

    #[test]
    fn usernames_and_passwords_are_checked() {
        assert!(check_username("alice").is_ok());
        assert!(check_username("ünïcode user").is_ok());
        for bad in ["", "a:b", "#a", "a\nb", "a\0b"] {
            assert!(check_username(bad).is_err(), "{bad:?}");
        }
        assert!(check_username(&"u".repeat(65_536)).is_err());
        assert!(check_password(b"x").is_ok());
        assert!(check_password(b"").is_err());
        assert!(check_password(b"a\nb").is_err());
    }

    #[test]
    fn file_edits_create_update_delete() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("edit");
        let path = dir.0.join("pw");
        let e = set_password(&path, "alice", b"one", 101, false).unwrap_err();
        assert!(e.to_string().contains("use -c to create it"), "{e}");

        set_password(&path, "alice", b"one", 101, true).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        set_password(&path, "bob", b"two", 5, false).unwrap();
        std::fs::write(
            &path,
            format!("# keep me\n{}", std::fs::read_to_string(&path).unwrap()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        set_password(&path, "alice", b"three", 101, false).unwrap();
        let f = PasswordFile::load(&path).unwrap();
        assert!(f.verify("alice", b"three") && !f.verify("alice", b"one"));
        assert!(f.verify("bob", b"two"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# keep me\nalice:$7$101$"), "{text}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );

        delete_user(&path, "alice").unwrap();
        let f = PasswordFile::load(&path).unwrap();
        assert!(!f.contains("alice") && f.contains("bob"));
        assert!(delete_user(&path, "alice")
            .unwrap_err()
            .to_string()
            .contains("is not in"));

        set_password(&path, "carol", b"x", 101, true).unwrap();
        let f = PasswordFile::load(&path).unwrap();
        assert_eq!(f.len(), 1, "-c starts over");
        assert_eq!(
            std::fs::read_dir(&dir.0).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn editing_refuses_a_broken_file() {
        let dir = TempDir::new("broken");
        let path = dir.0.join("pw");
        std::fs::write(&path, "alice:plaintext\n").unwrap();
        let e = set_password(&path, "bob", b"x", 101, false).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    fn auth(with_file: bool, allow_anonymous: bool) -> Authenticator {
        let passwords = with_file.then(|| file(&format!("user:{MOSQ_7_USER_PASS}\n")));
        Authenticator::new(passwords, allow_anonymous)
    }

    #[test]
    fn anonymous_client_depends_on_allow_anonymous() {
        for with_file in [false, true] {
            assert_eq!(
                auth(with_file, true).check(None, None),
                AuthDecision::Accept
            );
            assert_eq!(
                auth(with_file, false).check(None, None),
                AuthDecision::NotAuthorized
            );
            // A password without a user name (MQTT 5) does not authenticate.
            assert_eq!(
                auth(with_file, false).check(None, Some(b"pass")),
                AuthDecision::NotAuthorized
            );
        }
    }

    #[test]
    fn username_with_password_file_must_verify() {
        for allow_anonymous in [false, true] {
            let a = auth(true, allow_anonymous);
            assert_eq!(a.check(Some("user"), Some(b"pass")), AuthDecision::Accept);
            assert_eq!(
                a.check(Some("user"), Some(b"nope")),
                AuthDecision::BadCredentials
            );
            assert_eq!(a.check(Some("user"), None), AuthDecision::BadCredentials);
            assert_eq!(
                a.check(Some("bob"), Some(b"pass")),
                AuthDecision::BadCredentials
            );
        }
    }

    #[test]
    fn username_without_password_file_is_anonymous_like_mosquitto() {
        assert_eq!(
            auth(false, true).check(Some("anyone"), Some(b"x")),
            AuthDecision::Accept
        );
        assert_eq!(
            auth(false, true).check(Some("anyone"), None),
            AuthDecision::Accept
        );
        assert_eq!(
            auth(false, false).check(Some("anyone"), Some(b"x")),
            AuthDecision::NotAuthorized
        );
    }

    #[test]
    fn authenticator_is_shareable_across_shards() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Authenticator>();
        send_sync::<Arc<Authenticator>>();
    }

    #[test]
    fn from_config_loads_the_file() {
        let dir = TempDir::new("from-config");
        let path = dir.0.join("pw");
        std::fs::write(&path, format!("user:{MOSQ_7_USER_PASS}\n")).unwrap();
        let config = Config {
            password_file: Some(path),
            allow_anonymous: false,
            ..Config::default()
        };
        let a = Authenticator::from_config(&config).unwrap();
        assert_eq!(a.passwords().map(PasswordFile::len), Some(1));
        assert_eq!(a.check(Some("user"), Some(b"pass")), AuthDecision::Accept);
        assert_eq!(a.check(None, None), AuthDecision::NotAuthorized);
        let a = Authenticator::from_config(&Config::default()).unwrap();
        assert_eq!(a.check(None, None), AuthDecision::Accept);
    }
}
