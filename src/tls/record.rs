//! TLS record protection that keeps an idle connection's keys small.
//!
//! rustls's ring provider gives every connection a `LessSafeKey` per
//! direction: the AES key schedule and the GHASH table, 544 bytes each,
//! held in 640-byte allocations for as long as the connection lives. At a
//! million idle devices that is 1.2 GiB of expanded keys for connections
//! that send a PINGREQ a minute. The suites here keep only the raw traffic
//! key (at most 32 bytes) and its IV per direction, and expand the key when
//! a record is sealed or opened, into a per-thread cache of
//! [`EXPANDED_KEYS`] slots: a busy connection finds its key there and pays
//! nothing more; an idle one costs ~160 ns to expand again (AES-128-GCM;
//! 30 ns for ChaCha20) on its next record, beside the several microseconds
//! of the system calls that carry it.
//!
//! The record formats are rustls's own (RFC 8446 §5.2 for TLS 1.3; RFC 5288
//! and RFC 7905 for TLS 1.2's AES-GCM and ChaCha20-Poly1305), the cipher is
//! ring's, and everything else about a suite (key schedule, PRF, signature
//! schemes, limits) is taken unchanged from rustls's ring suites; the tests
//! below hold our records to rustls's stock ones.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use ring::aead;
use rustls::crypto::cipher::{
    make_tls12_aad, make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv,
    KeyBlockShape, MessageDecrypter, MessageEncrypter, Nonce, OutboundOpaqueMessage,
    OutboundPlainMessage, PrefixedPayload, Tls12AeadAlgorithm, Tls13AeadAlgorithm,
    UnsupportedOperationError, NONCE_LEN,
};
use rustls::crypto::CipherSuiteCommon;
use rustls::{
    CipherSuite, ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion,
    SupportedCipherSuite, Tls12CipherSuite, Tls13CipherSuite,
};

/// Slots of the per-thread cache of expanded keys (a power of two). A slot
/// is a 552-byte allocation (640 with the allocator's rounding) made the
/// first time it is used, so a shard that serves TLS holds at most 2.5 MiB
/// of them, whatever its connection count. Direct-mapped: with k keys in
/// use at once (two per talking connection), about 1 − e^(−k/4096) of them
/// share their slot with another and pay the expansion on some records
/// (22 % at 1,000 keys, 62 % at 4,000); keys made one after another on a
/// quiet machine, as in a benchmark's ramp, do not collide until 4,096.
pub const EXPANDED_KEYS: usize = 4096;

/// The owner of a slot whose key was wiped; no key is numbered 0.
const NO_OWNER: u64 = 0;

/// The largest plaintext a TLS record may carry (RFC 8446 §5.1).
const MAX_FRAGMENT_LEN: usize = 16_384;

/// A traffic key as it came from the key schedule (rustls's `AeadKey`,
/// zeroized when dropped), with a number no other key of this process has:
/// its slot in the cache is `id % EXPANDED_KEYS`, and the slot holds its
/// expansion while `owner == id`. Dropped, it wipes that expansion too.
struct RawKey {
    id: u64,
    algorithm: &'static aead::Algorithm,
    key: AeadKey,
}

struct ExpandedKey {
    owner: u64,
    key: aead::LessSafeKey,
}

thread_local! {
    static EXPANDED: RefCell<Vec<Option<Box<ExpandedKey>>>> = const { RefCell::new(Vec::new()) };
}

static NEXT_KEY_ID: AtomicU64 = AtomicU64::new(1);

impl RawKey {
    fn new(algorithm: &'static aead::Algorithm, key: AeadKey) -> RawKey {
        RawKey {
            id: NEXT_KEY_ID.fetch_add(1, Ordering::Relaxed),
            algorithm,
            key,
        }
    }

    fn slot(&self) -> usize {
        (self.id % EXPANDED_KEYS as u64) as usize
    }

    fn expand(&self) -> aead::LessSafeKey {
        expand(self.algorithm, self.key.as_ref())
    }

    /// Runs `f` with this key expanded, from the cache or expanded now.
    fn with<R>(&self, f: impl FnOnce(&aead::LessSafeKey) -> R) -> R {
        let mut f = Some(f);
        let cached = EXPANDED.try_with(|cache| {
            let mut slots = cache.borrow_mut();
            if slots.is_empty() {
                slots.resize_with(EXPANDED_KEYS, || None);
            }
            let slot = &mut slots[self.slot()];
            match slot {
                Some(held) if held.owner == self.id => {}
                Some(held) => {
                    held.owner = self.id;
                    held.key = self.expand();
                }
                None => {
                    *slot = Some(Box::new(ExpandedKey {
                        owner: self.id,
                        key: self.expand(),
                    }))
                }
            }
            let f = f.take().expect("called once");
            f(&slot.as_ref().expect("filled above").key)
        });
        match cached {
            Ok(result) => result,
            // The thread's cache is already gone (its teardown): expand
            // for this record alone.
            Err(_) => (f.take().expect("not called"))(&self.expand()),
        }
    }

    fn tag_len(&self) -> usize {
        self.algorithm.tag_len()
    }
}

impl Drop for RawKey {
    /// Overwrites this key's expansion in the cache with a zero key's, so
    /// that a closed connection's key schedule is not left readable until
    /// its slot is reused. A key dropped on another thread than the one
    /// that expanded it (not the case in the broker, where a connection
    /// stays on its shard after the handshake) leaves it to the next owner.
    fn drop(&mut self) {
        let _ = EXPANDED.try_with(|cache| {
            let Ok(mut slots) = cache.try_borrow_mut() else {
                return;
            };
            if let Some(Some(held)) = slots.get_mut(self.slot()) {
                if held.owner == self.id {
                    held.owner = NO_OWNER;
                    held.key = expand(self.algorithm, &[0; 32][..self.algorithm.key_len()]);
                }
            }
        });
    }
}

fn expand(algorithm: &'static aead::Algorithm, key: &[u8]) -> aead::LessSafeKey {
    // The key schedule makes keys of `key_len()` bytes for the algorithm it
    // was told, which is this one.
    let unbound =
        aead::UnboundKey::new(algorithm, key).expect("a traffic key of the algorithm's length");
    aead::LessSafeKey::new(unbound)
}

/// The suites of `suites`, each with its record protection replaced by the
/// one of this module. Each call leaks its suites (rustls needs them
/// `&'static`): called once, for [`LEAN_SUITES`].
fn lean(suites: &[SupportedCipherSuite]) -> Vec<SupportedCipherSuite> {
    suites.iter().map(|s| lean_one(*s)).collect()
}

/// The nine suites of `tls::SUITES_IN_OUR_ORDER`, in that order, with
/// this module's record protection; what the TLS listeners offer.
pub static LEAN_SUITES: LazyLock<Vec<SupportedCipherSuite>> =
    LazyLock::new(|| lean(super::SUITES_IN_OUR_ORDER));

static TLS13_AES_128_GCM: Tls13Aead = Tls13Aead(&aead::AES_128_GCM);
static TLS13_AES_256_GCM: Tls13Aead = Tls13Aead(&aead::AES_256_GCM);
static TLS13_CHACHA20_POLY1305: Tls13Aead = Tls13Aead(&aead::CHACHA20_POLY1305);
static TLS12_AES_128_GCM: Tls12Gcm = Tls12Gcm(&aead::AES_128_GCM);
static TLS12_AES_256_GCM: Tls12Gcm = Tls12Gcm(&aead::AES_256_GCM);
static TLS12_CHACHA20_POLY1305: Tls12ChaCha = Tls12ChaCha;

fn lean_one(suite: SupportedCipherSuite) -> SupportedCipherSuite {
    let common = |c: &CipherSuiteCommon| CipherSuiteCommon {
        suite: c.suite,
        hash_provider: c.hash_provider,
        confidentiality_limit: c.confidentiality_limit,
    };
    match suite {
        SupportedCipherSuite::Tls13(s) => {
            let aead_alg: &'static dyn Tls13AeadAlgorithm = match s.common.suite {
                CipherSuite::TLS13_AES_128_GCM_SHA256 => &TLS13_AES_128_GCM,
                CipherSuite::TLS13_AES_256_GCM_SHA384 => &TLS13_AES_256_GCM,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => &TLS13_CHACHA20_POLY1305,
                _ => return suite,
            };
            SupportedCipherSuite::Tls13(Box::leak(Box::new(Tls13CipherSuite {
                common: common(&s.common),
                hkdf_provider: s.hkdf_provider,
                aead_alg,
                // No QUIC here: the broker speaks TCP.
                quic: None,
            })))
        }
        SupportedCipherSuite::Tls12(s) => {
            let aead_alg: &'static dyn Tls12AeadAlgorithm = match s.common.suite {
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => &TLS12_AES_128_GCM,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => &TLS12_AES_256_GCM,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
                    &TLS12_CHACHA20_POLY1305
                }
                _ => return suite,
            };
            SupportedCipherSuite::Tls12(Box::leak(Box::new(Tls12CipherSuite {
                common: common(&s.common),
                prf_provider: s.prf_provider,
                kx: s.kx,
                sign: s.sign,
                aead_alg,
            })))
        }
    }
}

/// The nonce of record `seq`: the IV xor the sequence number (RFC 8446
/// §5.3; TLS 1.2's ChaCha20 and rustls's GCM explicit nonces alike).
fn iv_xor_seq(iv: &Iv, seq: u64) -> aead::Nonce {
    aead::Nonce::assume_unique_for_key(Nonce::new(iv, seq).0)
}

/// A TLS 1.2 record opened in place, its plaintext `plain_len` bytes long;
/// more than a record may carry is the peer's error.
fn tls12_plaintext(
    mut msg: InboundOpaqueMessage<'_>,
    plain_len: usize,
) -> Result<InboundPlainMessage<'_>, Error> {
    if plain_len > MAX_FRAGMENT_LEN {
        return Err(Error::PeerSentOversizedRecord);
    }
    msg.payload.truncate(plain_len);
    Ok(msg.into_plain_message())
}

fn secrets(
    algorithm: &'static aead::Algorithm,
    key: AeadKey,
    iv: Iv,
) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
    Ok(if algorithm == &aead::AES_128_GCM {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
    } else if algorithm == &aead::AES_256_GCM {
        ConnectionTrafficSecrets::Aes256Gcm { key, iv }
    } else {
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
    })
}

/// TLS 1.3 (RFC 8446 §5.2): the nonce is the IV xor the sequence number,
/// the content type is the last byte of the plaintext.
struct Tls13Aead(&'static aead::Algorithm);

struct Tls13Protection {
    key: RawKey,
    iv: Iv,
}

impl Tls13AeadAlgorithm for Tls13Aead {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(Tls13Protection {
            key: RawKey::new(self.0, key),
            iv,
        })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(Tls13Protection {
            key: RawKey::new(self.0, key),
            iv,
        })
    }

    fn key_len(&self) -> usize {
        self.0.key_len()
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        secrets(self.0, key, iv)
    }
}

impl MessageEncrypter for Tls13Protection {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        let nonce = iv_xor_seq(&self.iv, seq);
        let aad = aead::Aad::from(make_tls13_aad(total_len));
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        self.key
            .with(|key| key.seal_in_place_append_tag(nonce, aad, &mut payload))
            .map_err(|_| Error::EncryptError)?;
        // Every TLS 1.3 record says ApplicationData, TLS 1.2 (RFC 8446 §5.2).
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + self.key.tag_len()
    }
}

impl MessageDecrypter for Tls13Protection {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        if payload.len() < self.key.tag_len() {
            return Err(Error::DecryptError);
        }
        let nonce = iv_xor_seq(&self.iv, seq);
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain_len = self
            .key
            .with(|key| key.open_in_place(nonce, aad, payload).map(|p| p.len()))
            .map_err(|_| Error::DecryptError)?;
        payload.truncate(plain_len);
        msg.into_tls13_unpadded_message()
    }
}

/// TLS 1.2 AES-GCM (RFC 5288): a 4-byte salt from the key block, and an
/// 8-byte explicit nonce sent before each record's ciphertext (ours is the
/// sequence number xor the key block's 8 further bytes, as rustls does).
struct Tls12Gcm(&'static aead::Algorithm);

const GCM_EXPLICIT_NONCE_LEN: usize = 8;

struct Tls12GcmSeal {
    key: RawKey,
    iv: Iv,
}

struct Tls12GcmOpen {
    key: RawKey,
    salt: [u8; 4],
}

impl Tls12AeadAlgorithm for Tls12Gcm {
    fn encrypter(&self, key: AeadKey, iv: &[u8], extra: &[u8]) -> Box<dyn MessageEncrypter> {
        Box::new(Tls12GcmSeal {
            key: RawKey::new(self.0, key),
            iv: gcm_iv(iv, extra),
        })
    }

    fn decrypter(&self, key: AeadKey, iv: &[u8]) -> Box<dyn MessageDecrypter> {
        let mut salt = [0u8; 4];
        salt.copy_from_slice(iv);
        Box::new(Tls12GcmOpen {
            key: RawKey::new(self.0, key),
            salt,
        })
    }

    fn key_block_shape(&self) -> KeyBlockShape {
        KeyBlockShape {
            enc_key_len: self.0.key_len(),
            fixed_iv_len: 4,
            explicit_nonce_len: GCM_EXPLICIT_NONCE_LEN,
        }
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: &[u8],
        explicit: &[u8],
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        secrets(self.0, key, gcm_iv(iv, explicit))
    }
}

fn gcm_iv(salt: &[u8], explicit: &[u8]) -> Iv {
    let mut iv = [0u8; NONCE_LEN];
    iv[..4].copy_from_slice(salt);
    iv[4..].copy_from_slice(explicit);
    Iv::new(iv)
}

impl MessageEncrypter for Tls12GcmSeal {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        let nonce = iv_xor_seq(&self.iv, seq);
        let aad = aead::Aad::from(make_tls12_aad(seq, msg.typ, msg.version, msg.payload.len()));
        payload.extend_from_slice(&nonce.as_ref()[4..]);
        payload.extend_from_chunks(&msg.payload);
        let tag = self
            .key
            .with(|key| {
                key.seal_in_place_separate_tag(
                    nonce,
                    aad,
                    &mut payload.as_mut()[GCM_EXPLICIT_NONCE_LEN..],
                )
            })
            .map_err(|_| Error::EncryptError)?;
        payload.extend_from_slice(tag.as_ref());
        Ok(OutboundOpaqueMessage::new(msg.typ, msg.version, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + GCM_EXPLICIT_NONCE_LEN + self.key.tag_len()
    }
}

impl MessageDecrypter for Tls12GcmOpen {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        let overhead = GCM_EXPLICIT_NONCE_LEN + self.key.tag_len();
        if msg.payload.len() < overhead {
            return Err(Error::DecryptError);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.salt);
        nonce[4..].copy_from_slice(&msg.payload[..GCM_EXPLICIT_NONCE_LEN]);
        let nonce = aead::Nonce::assume_unique_for_key(nonce);
        let aad = aead::Aad::from(make_tls12_aad(
            seq,
            msg.typ,
            msg.version,
            msg.payload.len() - overhead,
        ));
        let plain_len = self
            .key
            .with(|key| {
                key.open_within(nonce, aad, &mut msg.payload, GCM_EXPLICIT_NONCE_LEN..)
                    .map(|p| p.len())
            })
            .map_err(|_| Error::DecryptError)?;
        tls12_plaintext(msg, plain_len)
    }
}

/// TLS 1.2 ChaCha20-Poly1305 (RFC 7905): the nonce is the 12-byte IV xor
/// the sequence number, nothing explicit on the wire.
struct Tls12ChaCha;

struct Tls12ChaChaProtection {
    key: RawKey,
    iv: Iv,
}

impl Tls12AeadAlgorithm for Tls12ChaCha {
    fn encrypter(&self, key: AeadKey, iv: &[u8], _: &[u8]) -> Box<dyn MessageEncrypter> {
        Box::new(Tls12ChaChaProtection {
            key: RawKey::new(&aead::CHACHA20_POLY1305, key),
            iv: Iv::copy(iv),
        })
    }

    fn decrypter(&self, key: AeadKey, iv: &[u8]) -> Box<dyn MessageDecrypter> {
        Box::new(Tls12ChaChaProtection {
            key: RawKey::new(&aead::CHACHA20_POLY1305, key),
            iv: Iv::copy(iv),
        })
    }

    fn key_block_shape(&self) -> KeyBlockShape {
        KeyBlockShape {
            enc_key_len: 32,
            fixed_iv_len: NONCE_LEN,
            explicit_nonce_len: 0,
        }
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: &[u8],
        _explicit: &[u8],
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        secrets(&aead::CHACHA20_POLY1305, key, Iv::copy(iv))
    }
}

impl MessageEncrypter for Tls12ChaChaProtection {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        let nonce = iv_xor_seq(&self.iv, seq);
        let aad = aead::Aad::from(make_tls12_aad(seq, msg.typ, msg.version, msg.payload.len()));
        payload.extend_from_chunks(&msg.payload);
        self.key
            .with(|key| key.seal_in_place_append_tag(nonce, aad, &mut payload))
            .map_err(|_| Error::EncryptError)?;
        Ok(OutboundOpaqueMessage::new(msg.typ, msg.version, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + self.key.tag_len()
    }
}

impl MessageDecrypter for Tls12ChaChaProtection {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        if msg.payload.len() < self.key.tag_len() {
            return Err(Error::DecryptError);
        }
        let nonce = iv_xor_seq(&self.iv, seq);
        let aad = aead::Aad::from(make_tls12_aad(
            seq,
            msg.typ,
            msg.version,
            msg.payload.len() - self.key.tag_len(),
        ));
        let plain_len = self
            .key
            .with(|key| {
                key.open_in_place(nonce, aad, &mut msg.payload)
                    .map(|p| p.len())
            })
            .map_err(|_| Error::DecryptError)?;
        tls12_plaintext(msg, plain_len)
    }
}

/// Fills every slot of this thread's cache (owned by no key), so that a
/// test measuring what connections hold does not count the slots their
/// keys fill.
#[cfg(test)]
pub(crate) fn fill_cache() {
    EXPANDED.with(|cache| {
        let mut slots = cache.borrow_mut();
        slots.resize_with(EXPANDED_KEYS, || None);
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            *slot = Some(Box::new(ExpandedKey {
                owner: NO_OWNER,
                key: expand(&aead::CHACHA20_POLY1305, &[0; 32]),
            }));
        }
    });
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};

    use super::*;

    /// A server on one lean suite and a client on rustls's stock ring
    /// suites, with an ECDSA P-256 certificate made here.
    fn pair(suite: SupportedCipherSuite) -> (ServerConnection, ClientConnection) {
        let (server, client) = super::super::test_configs(vec![suite], rustls::DEFAULT_VERSIONS);
        (
            ServerConnection::new(server).unwrap(),
            ClientConnection::new(client, ServerName::try_from("localhost").unwrap()).unwrap(),
        )
    }

    /// Moves every pending byte both ways until neither side has any;
    /// what each side read, server's first.
    fn pump(server: &mut ServerConnection, client: &mut ClientConnection) -> (Vec<u8>, Vec<u8>) {
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        loop {
            let mut moved = false;
            while client.wants_write() {
                let mut wire = Vec::new();
                client.write_tls(&mut wire).unwrap();
                let mut rd = &wire[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).unwrap();
                    server.process_new_packets().unwrap();
                    to_server.extend(read_all(&mut server.reader()));
                }
                moved = true;
            }
            while server.wants_write() {
                let mut wire = Vec::new();
                server.write_tls(&mut wire).unwrap();
                let mut rd = &wire[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).unwrap();
                    client.process_new_packets().unwrap();
                    to_client.extend(read_all(&mut client.reader()));
                }
                moved = true;
            }
            if !moved {
                return (to_server, to_client);
            }
        }
    }

    fn read_all(reader: &mut dyn Read) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = reader.read_to_end(&mut got); // WouldBlock once drained
        got
    }

    #[test]
    fn every_suite_carries_bytes_both_ways_with_a_stock_rustls_client() {
        // The RSA suites of TLS 1.2 use the same record protection as
        // their ECDSA twins (checked in `every_suite_is_replaced`); ring
        // cannot make an RSA key here to try them.
        let ecdsa = super::super::SUITES_IN_OUR_ORDER
            .iter()
            .filter(|s| !format!("{:?}", s.suite()).contains("_RSA_"));
        for stock in ecdsa {
            let suite = lean_one(*stock);
            let (mut server, mut client) = pair(suite);
            pump(&mut server, &mut client);
            assert!(!server.is_handshaking() && !client.is_handshaking());
            assert_eq!(
                client.negotiated_cipher_suite().unwrap().suite(),
                stock.suite()
            );

            // Small records, then one larger than a record (three of them).
            let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
            for payload in [&b"\x30\x05\x00\x01ab"[..], &big] {
                client.writer().write_all(payload).unwrap();
                assert_eq!(pump(&mut server, &mut client).0, payload, "{stock:?} in");
                server.writer().write_all(payload).unwrap();
                assert_eq!(pump(&mut server, &mut client).1, payload, "{stock:?} out");
            }

            // TLS 1.3: new keys both ways after a KeyUpdate.
            if matches!(suite, SupportedCipherSuite::Tls13(_)) {
                client.refresh_traffic_keys().unwrap();
                client.writer().write_all(b"after").unwrap();
                assert_eq!(pump(&mut server, &mut client).0, b"after", "{stock:?}");
                server.writer().write_all(b"reply").unwrap();
                assert_eq!(pump(&mut server, &mut client).1, b"reply", "{stock:?}");
            }
        }
    }

    #[test]
    fn every_suite_is_replaced() {
        let ours: [*const (); 6] = [
            &TLS13_AES_128_GCM as *const Tls13Aead as *const (),
            &TLS13_AES_256_GCM as *const Tls13Aead as *const (),
            &TLS13_CHACHA20_POLY1305 as *const Tls13Aead as *const (),
            &TLS12_AES_128_GCM as *const Tls12Gcm as *const (),
            &TLS12_AES_256_GCM as *const Tls12Gcm as *const (),
            &TLS12_CHACHA20_POLY1305 as *const Tls12ChaCha as *const (),
        ];
        assert_eq!(LEAN_SUITES.len(), super::super::SUITES_IN_OUR_ORDER.len());
        for (lean, stock) in LEAN_SUITES.iter().zip(super::super::SUITES_IN_OUR_ORDER) {
            assert_eq!(lean.suite(), stock.suite());
            // Ours, and the same algorithm as the stock suite's: key
            // length, key block and the secrets' kind (AES-128/256, ChaCha).
            let key = || AeadKey::from([0; 32]);
            let kind = |s: Result<ConnectionTrafficSecrets, UnsupportedOperationError>| {
                std::mem::discriminant(&s.unwrap())
            };
            let aead = match (lean, stock) {
                (SupportedCipherSuite::Tls13(l), SupportedCipherSuite::Tls13(s)) => {
                    assert_eq!(l.aead_alg.key_len(), s.aead_alg.key_len());
                    let iv = || Iv::new([0; NONCE_LEN]);
                    assert_eq!(
                        kind(l.aead_alg.extract_keys(key(), iv())),
                        kind(s.aead_alg.extract_keys(key(), iv()))
                    );
                    l.aead_alg as *const _ as *const ()
                }
                (SupportedCipherSuite::Tls12(l), SupportedCipherSuite::Tls12(s)) => {
                    let (ls, ss) = (l.aead_alg.key_block_shape(), s.aead_alg.key_block_shape());
                    assert_eq!(
                        (ls.enc_key_len, ls.fixed_iv_len, ls.explicit_nonce_len),
                        (ss.enc_key_len, ss.fixed_iv_len, ss.explicit_nonce_len)
                    );
                    let iv = [0u8; NONCE_LEN];
                    let (fixed, explicit) = iv.split_at(ss.fixed_iv_len);
                    let explicit = &explicit[..ss.explicit_nonce_len];
                    assert_eq!(
                        kind(l.aead_alg.extract_keys(key(), fixed, explicit)),
                        kind(s.aead_alg.extract_keys(key(), fixed, explicit))
                    );
                    l.aead_alg as *const _ as *const ()
                }
                _ => panic!("{:?} changed protocol version", lean.suite()),
            };
            assert!(
                ours.contains(&aead),
                "{:?} keeps rustls's records",
                lean.suite()
            );
        }
    }

    #[test]
    fn a_dropped_key_leaves_no_expansion_behind() {
        let key = RawKey {
            id: u64::MAX - 7,
            algorithm: &aead::AES_256_GCM,
            key: AeadKey::from([5; 32]),
        };
        let slot = key.slot();
        let owner = || EXPANDED.with(|c| c.borrow()[slot].as_ref().map(|held| held.owner));
        key.with(|_| ());
        assert_eq!(owner(), Some(u64::MAX - 7));
        drop(key);
        assert_eq!(owner(), Some(NO_OWNER), "wiped, and owned by no key");
    }

    #[test]
    fn a_record_changed_on_the_way_is_refused() {
        for stock in [
            super::super::SUITES_IN_OUR_ORDER[0],
            super::super::SUITES_IN_OUR_ORDER[3],
        ] {
            let (mut server, mut client) = pair(lean_one(stock));
            pump(&mut server, &mut client);
            client.writer().write_all(b"hello").unwrap();
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            let last = wire.len() - 1;
            wire[last] ^= 1;
            server.read_tls(&mut &wire[..]).unwrap();
            assert!(
                matches!(server.process_new_packets(), Err(Error::DecryptError)),
                "{stock:?}"
            );
        }
    }

    #[test]
    fn keys_sharing_a_cache_slot_take_turns_and_seal_as_a_held_key_would() {
        let raw = |byte: u8| AeadKey::from([byte; 32]);
        // Ids far above any this process makes, one slot apart.
        let key = |id: u64, byte: u8| RawKey {
            id,
            algorithm: &aead::AES_256_GCM,
            key: raw(byte),
        };
        let a = key(u64::MAX - 1, 1);
        let b = key(u64::MAX - 1 - EXPANDED_KEYS as u64, 2);
        let held = |byte: u8| {
            aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &[byte; 32]).unwrap())
        };
        let seal = |key: &aead::LessSafeKey| {
            let mut data = b"in place".to_vec();
            let nonce = aead::Nonce::assume_unique_for_key([9; 12]);
            key.seal_in_place_append_tag(nonce, aead::Aad::empty(), &mut data)
                .unwrap();
            data
        };
        for _ in 0..3 {
            assert_eq!(a.with(seal), seal(&held(1)));
            assert_eq!(b.with(seal), seal(&held(2)));
        }
    }
}
