//! Keys and the vault that holds them: the key new files are sealed with,
//! and every key a file at hand may be sealed with.

use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{AeadCore, XChaCha20Poly1305, XNonce};
use sha2::Digest;
use zeroize::Zeroizing;

/// `N` random bytes from the OS's random source.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let take = (N - filled).min(nonce.len());
        bytes[filled..filled + take].copy_from_slice(&nonce[..take]);
        filled += take;
    }
    bytes
}

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
/// Bytes of a record's nonce field: a random 128-bit prefix per sealer and
/// a 64-bit count (XChaCha20's 192-bit nonce; for AES-256-GCM the prefix
/// makes the subkey and the count the 96-bit nonce). A blob's nonce is
/// drawn at random whole.
pub const NONCE_LEN: usize = 24;
/// Bytes of a tag.
pub const TAG_LEN: usize = 16;

/// A 256-bit key, wiped from memory when dropped; its `Debug` shows only
/// its id.
#[derive(Clone)]
pub struct Key {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: KeyId,
}

/// What names a key in a file's header: the first 8 bytes of
/// `SHA-256("stack-runtime key id v1" ‖ key)`, shown as 16 hex digits. It
/// tells keys apart and reveals nothing of them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

/// A key given as text that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a key is 64 hex digits (32 bytes); this is {0}")]
pub struct BadKeyText(pub String);

impl Key {
    /// A fresh random key (from the OS's random source).
    pub fn generate() -> Key {
        let generated = XChaCha20Poly1305::generate_key(&mut OsRng);
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(&generated);
        Key::from_bytes(bytes)
    }

    fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Key {
        let mut hash = sha2::Sha256::new();
        hash.update(b"stack-runtime key id v1");
        hash.update(&bytes[..]);
        let digest = hash.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Key {
            bytes,
            id: KeyId(id),
        }
    }

    /// Reads 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Key, BadKeyText> {
        let text = text.trim();
        let describe = || {
            if text.is_empty() {
                "empty".to_string()
            } else if text.len() != 2 * KEY_LEN {
                format!("{} characters long", text.len())
            } else {
                "not all hex digits".to_string()
            }
        };
        if text.len() != 2 * KEY_LEN {
            return Err(BadKeyText(describe()));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        for (index, pair) in text.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(high), Some(low)) => bytes[index] = (high * 16 + low) as u8,
                _ => return Err(BadKeyText(describe())),
            }
        }
        Ok(Key::from_bytes(bytes))
    }

    /// The key as 64 hex digits (wiped when dropped).
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(2 * KEY_LEN));
        for byte in self.bytes.iter() {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    /// Its id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.bytes[..]).into())
    }

    /// Seals `plaintext` under a fresh random nonce, authenticating `aad`
    /// with it: `nonce ‖ ciphertext ‖ tag`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        sealed.extend_from_slice(&nonce);
        // Encryption into a Vec fails only on a length past the cipher's
        // limit (256 GiB), which no record nears.
        match self.cipher().encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        ) {
            Ok(body) => sealed.extend_from_slice(&body),
            Err(_) => sealed.clear(),
        }
        sealed
    }

    /// A sealer for many records of the file whose header is `header`,
    /// under this key and `cipher` (see [`RecordSealer`]).
    pub fn record_sealer(&self, cipher: RecordCipher, header: Vec<u8>) -> RecordSealer {
        let prefix = random_bytes::<16>();
        RecordSealer {
            cipher: self.record_key(cipher, &prefix, &header),
            record_cipher: cipher,
            prefix,
            counter: std::sync::atomic::AtomicU64::new(0),
            header,
        }
    }

    /// The ring key that seals and opens the records of a sealer whose
    /// nonce prefix is `prefix`, in the file whose header is `header`.
    pub(crate) fn record_key(
        &self,
        cipher: RecordCipher,
        prefix: &[u8; 16],
        header: &[u8],
    ) -> ring::aead::LessSafeKey {
        let unbound = match cipher {
            RecordCipher::XChaCha20Poly1305 => {
                // XChaCha20 is ChaCha20 under the HChaCha20 subkey of the
                // nonce's first 16 bytes, with the last 8 as its nonce:
                // the prefix is fixed per sealer, so the subkey is
                // derived once.
                let mut derived = chacha20::hchacha::<chacha20::cipher::consts::U10>(
                    (&self.bytes[..]).into(),
                    prefix.into(),
                );
                let mut subkey = Zeroizing::new([0u8; KEY_LEN]);
                subkey.copy_from_slice(&derived);
                zeroize::Zeroize::zeroize(derived.as_mut_slice());
                ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &subkey[..])
                    .expect("ChaCha20-Poly1305 takes a 32-byte key")
            }
            RecordCipher::Aes256GcmV2 => self.aes_subkey(&[AES_256_GCM_V2_LABEL, &prefix[..]]),
            // The label and the prefix have fixed lengths, so the header
            // that follows them is unambiguous.
            RecordCipher::Aes256Gcm => self.aes_subkey(&[AES_256_GCM_LABEL, &prefix[..], header]),
        };
        ring::aead::LessSafeKey::new(unbound)
    }

    /// An AES-256 subkey: HKDF-SHA256 of the key (a uniformly random
    /// secret, so extracted with no salt), expanded with `info` (a label,
    /// the sealer's prefix and, in format 3, the file's header): a fresh
    /// AES-256 key per sealer, so each key seals at most 2^64 records
    /// under distinct counter nonces, far inside AES-GCM's bounds.
    fn aes_subkey(&self, info: &[&[u8]]) -> ring::aead::UnboundKey {
        let pseudorandom =
            ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&self.bytes[..]);
        let okm = pseudorandom
            .expand(info, &ring::aead::AES_256_GCM)
            .expect("HKDF-SHA256 gives 32 bytes");
        ring::aead::UnboundKey::from(okm)
    }

    /// Opens what [`seal`](Self::seal) made; `None` when it fails
    /// authentication (another key, another `aad`, a changed byte).
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad })
            .ok()
            .map(Zeroizing::new)
    }
}

/// Seals records one after another for the same file: the cipher is set
/// up once, and each nonce is a random 128-bit prefix drawn when the sealer
/// is made followed by a 64-bit count, so no two records of any sealer
/// share a nonce (two sealers share a prefix with odds of 2⁻¹²⁸ per pair)
/// and no record costs a call into the OS's random source.
pub struct RecordSealer {
    /// ring's (in assembly) under the prefix's subkey: ChaCha20-Poly1305
    /// under the HChaCha20 subkey (XChaCha20-Poly1305, byte for byte), or
    /// AES-256-GCM under the HKDF subkey (see [`RecordCipher`]).
    cipher: ring::aead::LessSafeKey,
    /// Which of the formats it writes (padding and associated data).
    record_cipher: RecordCipher,
    prefix: [u8; 16],
    counter: std::sync::atomic::AtomicU64,
    /// The file's header: the associated data of formats 1 and 2; in
    /// format 3, part of the subkey instead.
    header: Vec<u8>,
}

impl std::fmt::Debug for RecordSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSealer").finish_non_exhaustive()
    }
}

impl RecordSealer {
    /// `length (u32 LE) ‖ nonce ‖ ciphertext ‖ tag` of `plaintext`, in one
    /// buffer, encrypted in place.
    pub fn seal_framed(&self, plaintext: &[u8]) -> Vec<u8> {
        let count = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..16].copy_from_slice(&self.prefix);
        nonce[16..].copy_from_slice(&count.to_le_bytes());
        let padding = self.record_cipher.padding(plaintext.len());
        let sealed_len = NONCE_LEN + plaintext.len() + padding.len() + TAG_LEN;
        let length = u32::try_from(sealed_len).unwrap_or(u32::MAX).to_le_bytes();
        let mut framed = Vec::with_capacity(4 + sealed_len);
        framed.extend_from_slice(&length);
        framed.extend_from_slice(&nonce);
        framed.extend_from_slice(plaintext);
        framed.extend_from_slice(padding);
        let body = &mut framed[4 + NONCE_LEN..];
        let nonce = count_nonce(&count.to_le_bytes());
        // Fails only past the cipher's length limit (256 GiB); callers
        // refuse records past `MAX_RECORD` first.
        let sealed = self.record_cipher.with_aad(&self.header, &length, |aad| {
            self.cipher
                .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), body)
        });
        match sealed {
            Ok(tag) => framed.extend_from_slice(tag.as_ref()),
            Err(_) => framed.clear(),
        }
        framed
    }

    /// The header of the file it seals for.
    pub fn header(&self) -> &[u8] {
        &self.header
    }
}

/// The 96-bit nonce ring's cipher takes for a record whose nonce field
/// ends in `count` (its last 8 bytes): zeros, then the count. For
/// ChaCha20 under the HChaCha20 subkey this is XChaCha20's own nonce.
fn count_nonce(count: &[u8]) -> ring::aead::Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(count);
    ring::aead::Nonce::assume_unique_for_key(nonce)
}

/// The label of the HKDF expansion that makes a format-2 AES-256-GCM
/// sealer's subkey (followed by its 16-byte prefix).
const AES_256_GCM_V2_LABEL: &[u8] = b"stack-seal records AES-256-GCM v2";
/// The label of the HKDF expansion that makes a format-3 AES-256-GCM
/// sealer's subkey (followed by its 16-byte prefix and the file's
/// header). It differs from the format-2 label in its last byte, and
/// its expansion input is longer (83 bytes at least, against 49), so no
/// subkey of one format is a subkey of the other.
const AES_256_GCM_LABEL: &[u8] = b"stack-seal records AES-256-GCM v3";

/// An AES block: format 3 pads each record to a whole number of them.
const BLOCK_LEN: usize = 16;
/// The padding of format 3 (ISO/IEC 7816-4: one `0x80`, then zeros), of
/// which a record takes its first 1 to 16 bytes.
const PADDING: [u8; BLOCK_LEN] = {
    let mut padding = [0u8; BLOCK_LEN];
    padding[0] = 0x80;
    padding
};
/// The most padding a record takes.
pub const MAX_PADDING: usize = BLOCK_LEN;

/// The cipher of a record file's records, named by the version byte of
/// its magic (see [`crate::record`]). All are authenticated ciphers from
/// well-kept crates (ring, RustCrypto) and every nonce is a random
/// 128-bit prefix per appender followed by a count; they differ in speed
/// by CPU. Blobs are always XChaCha20-Poly1305.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordCipher {
    /// XChaCha20-Poly1305 (format 1): the record's 24-byte nonce is the
    /// XChaCha20 nonce, the header and the length field its associated
    /// data. Constant-time in software on any CPU.
    XChaCha20Poly1305,
    /// AES-256-GCM as the previous release wrote it (format 2), under
    /// `HKDF-SHA256(key, label ‖ prefix)`, the prefix being the nonce's
    /// first 16 bytes, with the nonce's last 8 (the count) as its 96-bit
    /// nonce (zero-padded), and the header and the length field as
    /// associated data. Read, and appended to in its own format (and a
    /// purge that rewrites such an audit log keeps it); the runtime makes
    /// no other file in it.
    Aes256GcmV2,
    /// AES-256-GCM (format 3) under `HKDF-SHA256(key, label ‖ prefix ‖
    /// header)`: the file's header is bound by the subkey rather than
    /// authenticated again with every record, and each record is padded
    /// to whole 16-byte blocks (one `0x80`, then zeros), so its exact
    /// length is hidden to within 16 bytes and ring never takes its
    /// slower partial-block path. No associated data: GCM authenticates
    /// the ciphertext's length, so a changed length field (which frames
    /// other bytes as the record) fails as any changed byte does. About
    /// half XChaCha20-Poly1305's time per record where the CPU has AES
    /// and carry-less multiply instructions, so new files use it there.
    Aes256Gcm,
}

impl RecordCipher {
    /// AES-256-GCM where the CPU has AES and carry-less multiply
    /// instructions (ring then uses them; without them AES is slower than
    /// ChaCha20 in constant-time software), else XChaCha20-Poly1305.
    pub fn for_this_cpu() -> RecordCipher {
        #[cfg(target_arch = "x86_64")]
        let hardware = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq");
        #[cfg(target_arch = "aarch64")]
        let hardware = std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull");
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let hardware = false;
        if hardware {
            RecordCipher::Aes256Gcm
        } else {
            RecordCipher::XChaCha20Poly1305
        }
    }

    /// Its name, as people write it.
    pub fn name(self) -> &'static str {
        match self {
            RecordCipher::XChaCha20Poly1305 => "XChaCha20-Poly1305",
            RecordCipher::Aes256GcmV2 => "AES-256-GCM (format 2)",
            RecordCipher::Aes256Gcm => "AES-256-GCM",
        }
    }

    /// What files it and the blob cipher seal, for the banner and
    /// `agent doctor`: `AES-256-GCM records, XChaCha20-Poly1305 KV state`.
    pub fn describe(self) -> &'static str {
        match self {
            RecordCipher::XChaCha20Poly1305 => "XChaCha20-Poly1305",
            RecordCipher::Aes256Gcm | RecordCipher::Aes256GcmV2 => {
                "AES-256-GCM records, XChaCha20-Poly1305 KV state"
            }
        }
    }

    /// The version byte of the magic of files whose records it seals.
    pub fn format(self) -> u8 {
        match self {
            RecordCipher::XChaCha20Poly1305 => 1,
            RecordCipher::Aes256GcmV2 => 2,
            RecordCipher::Aes256Gcm => 3,
        }
    }

    /// The cipher of the format whose version byte is `format`, if one
    /// this code knows.
    pub fn of_format(format: u8) -> Option<RecordCipher> {
        match format {
            1 => Some(RecordCipher::XChaCha20Poly1305),
            2 => Some(RecordCipher::Aes256GcmV2),
            3 => Some(RecordCipher::Aes256Gcm),
            _ => None,
        }
    }

    /// Whether each record is authenticated with the file's header and
    /// its length field as associated data (formats 1 and 2; format 3
    /// binds the header in the subkey).
    fn header_is_aad(self) -> bool {
        match self {
            RecordCipher::XChaCha20Poly1305 | RecordCipher::Aes256GcmV2 => true,
            RecordCipher::Aes256Gcm => false,
        }
    }

    /// Calls `with` on a record's associated data in this format: the
    /// file's `header` and the record's `length` field (formats 1 and 2),
    /// or none (format 3). The sealer and the opener both ask here.
    fn with_aad<R>(self, header: &[u8], length: &[u8], with: impl FnOnce(&[u8]) -> R) -> R {
        if self.header_is_aad() {
            crate::record::with_record_aad(header, length, with)
        } else {
            with(&[])
        }
    }

    /// Whether each record is padded to whole 16-byte blocks (format 3).
    fn pads(self) -> bool {
        match self {
            RecordCipher::XChaCha20Poly1305 | RecordCipher::Aes256GcmV2 => false,
            RecordCipher::Aes256Gcm => true,
        }
    }

    /// The padding a record of `len` bytes takes before it is sealed:
    /// none before format 3, then 1 to 16 bytes to the next whole block.
    pub(crate) fn padding(self, len: usize) -> &'static [u8] {
        if self.pads() {
            &PADDING[..BLOCK_LEN - len % BLOCK_LEN]
        } else {
            &[]
        }
    }

    /// `opened` without its padding (see [`RecordCipher::padding`]);
    /// `None` unless it is whole blocks whose last holds the padding this
    /// code writes.
    fn unpad(self, opened: &mut Zeroizing<Vec<u8>>) -> Option<()> {
        if !self.pads() {
            return Some(());
        }
        if opened.is_empty() || !opened.len().is_multiple_of(BLOCK_LEN) {
            return None;
        }
        let last_block = opened.len() - BLOCK_LEN;
        let marker = last_block + opened[last_block..].iter().rposition(|byte| *byte != 0)?;
        if opened[marker] != 0x80 {
            return None;
        }
        opened.truncate(marker);
        Some(())
    }
}

impl Default for RecordCipher {
    fn default() -> RecordCipher {
        RecordCipher::for_this_cpu()
    }
}

/// Why a record did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenFailure {
    /// It failed authentication: changed, or sealed for another file or
    /// under another key.
    Authentication,
    /// It is authentic but not padded as its format pads: only a writer
    /// that held the key, and was faulty, makes such a record.
    Padding,
}

/// Opens the records of one file with ring's cipher under each prefix's
/// subkey (the one its sealer used, see [`Key::record_key`]), derived
/// once per run of records that share it (one per appender that wrote
/// them).
pub(crate) struct RecordOpener<'k> {
    key: &'k Key,
    cipher: RecordCipher,
    header: &'k [u8],
    last: Option<([u8; 16], ring::aead::LessSafeKey)>,
}

impl<'k> RecordOpener<'k> {
    /// An opener of the records of the file whose header is `header`.
    pub(crate) fn new(key: &'k Key, cipher: RecordCipher, header: &'k [u8]) -> RecordOpener<'k> {
        RecordOpener {
            key,
            cipher,
            header,
            last: None,
        }
    }

    /// Opens `nonce ‖ ciphertext ‖ tag`, the record whose length field is
    /// `length`.
    pub(crate) fn open(
        &mut self,
        sealed: &[u8],
        length: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenFailure> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenFailure::Authentication);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&nonce[..16]);
        let cipher = match &mut self.last {
            Some((last, cipher)) if *last == prefix => cipher,
            slot => {
                let cipher = self.key.record_key(self.cipher, &prefix, self.header);
                &slot.insert((prefix, cipher)).1
            }
        };
        let mut opened = Zeroizing::new(body.to_vec());
        let nonce = count_nonce(&nonce[16..]);
        let opened_len = self
            .cipher
            .with_aad(self.header, length, |aad| {
                cipher
                    .open_in_place(nonce, ring::aead::Aad::from(aad), &mut opened[..])
                    .map(|plaintext| plaintext.len())
            })
            .map_err(|_| OpenFailure::Authentication)?;
        opened.truncate(opened_len);
        self.cipher.unpad(&mut opened).ok_or(OpenFailure::Padding)?;
        Ok(opened)
    }
}

/// Where a key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A key file (0600, the owner's alone).
    File(std::path::PathBuf),
    /// The `STACK_RUNTIME_KEY` environment variable.
    Environment,
    /// The OS keyring's entry (its user attribute; see [`crate::keyring`]).
    Keyring(String),
    /// Given by the embedding program.
    Given,
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(path) => write!(f, "key file {}", path.display()),
            KeySource::Environment => f.write_str("STACK_RUNTIME_KEY"),
            KeySource::Keyring(account) => write!(f, "the OS keyring ({account})"),
            KeySource::Given => f.write_str("the embedding program"),
        }
    }
}

/// The keys of a runtime: the one new files are sealed with (none: they
/// are written in plaintext), and every key that opens files at hand (the
/// sealing key, a key a rotation is moving to, `STACK_RUNTIME_KEY` beside
/// a key file).
#[derive(Debug, Clone, Default)]
pub struct Vault {
    sealing: Option<(Key, KeySource)>,
    opening: Vec<(Key, KeySource)>,
    record_cipher: RecordCipher,
}

impl Vault {
    /// Seals nothing and opens nothing.
    pub fn plaintext() -> Vault {
        Vault::default()
    }

    /// Seals new files with `key`.
    pub fn sealing(key: Key, source: KeySource) -> Vault {
        Vault {
            sealing: Some((key.clone(), source.clone())),
            opening: vec![(key, source)],
            record_cipher: RecordCipher::for_this_cpu(),
        }
    }

    /// Writes plaintext, but opens files sealed with `key` (encryption
    /// turned off after files were sealed).
    pub fn opening_only(key: Key, source: KeySource) -> Vault {
        Vault {
            sealing: None,
            opening: vec![(key, source)],
            record_cipher: RecordCipher::for_this_cpu(),
        }
    }

    /// Also opens files sealed with `key`.
    pub fn also_opening(mut self, key: Key, source: KeySource) -> Vault {
        if self.key(key.id()).is_none() {
            self.opening.push((key, source));
        }
        self
    }

    /// Seals the records of new files (and of files it seals again) with
    /// `cipher` rather than [`RecordCipher::for_this_cpu`]'s; files it
    /// appends to keep their own. The runtime never picks
    /// [`RecordCipher::Aes256GcmV2`]; tests and benchmarks do, to make
    /// files as the previous release made them.
    pub fn with_record_cipher(mut self, cipher: RecordCipher) -> Vault {
        self.record_cipher = cipher;
        self
    }

    /// The cipher of the records of new files.
    pub fn record_cipher(&self) -> RecordCipher {
        self.record_cipher
    }

    /// The key new files are sealed with, if any.
    pub fn sealing_key(&self) -> Option<&Key> {
        self.sealing.as_ref().map(|(key, _)| key)
    }

    /// Where the sealing key came from.
    pub fn sealing_source(&self) -> Option<&KeySource> {
        self.sealing.as_ref().map(|(_, source)| source)
    }

    /// The key with id `id`, if at hand.
    pub fn key(&self, id: KeyId) -> Option<&Key> {
        self.opening
            .iter()
            .find(|(key, _)| key.id() == id)
            .map(|(key, _)| key)
    }

    /// The ids of the keys at hand, for messages.
    pub fn describe_keys(&self) -> String {
        if self.opening.is_empty() {
            return "no key".into();
        }
        self.opening
            .iter()
            .map(|(key, source)| format!("{} from {source}", key.id()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether it seals new files.
    pub fn seals(&self) -> bool {
        self.sealing.is_some()
    }

    /// Whether it has any key.
    pub fn has_keys(&self) -> bool {
        !self.opening.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_only_with_its_key_and_aad() {
        let key = Key::generate();
        let sealed = key.seal(b"prompt text", b"ctx");
        assert!(!sealed.windows(6).any(|w| w == b"prompt"));
        assert_eq!(
            key.open(&sealed, b"ctx").as_deref().map(Vec::as_slice),
            Some(&b"prompt text"[..])
        );
        assert!(key.open(&sealed, b"other").is_none());
        assert!(Key::generate().open(&sealed, b"ctx").is_none());
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN + 2] ^= 1;
        assert!(key.open(&flipped, b"ctx").is_none());
    }

    /// Format 3's padding: 1 to 16 bytes to a whole block, stripped on
    /// read; anything else after an authentic open (which only a bug or
    /// a holder of the key could make) is refused, not guessed at.
    #[test]
    fn padding_fills_to_a_block_and_only_padding_is_stripped() {
        let cipher = RecordCipher::Aes256Gcm;
        for len in 0..=40 {
            let padding = cipher.padding(len);
            assert_eq!((len + padding.len()) % 16, 0);
            assert!((1..=16).contains(&padding.len()));
            let mut padded = Zeroizing::new([vec![7u8; len], padding.to_vec()].concat());
            assert_eq!(cipher.unpad(&mut padded), Some(()));
            assert_eq!(padded.len(), len);
        }
        let block = |head: &[u8]| [head, &[0u8; 16][head.len()..]].concat();
        let marked_early = [block(&[1, 0x80]), vec![0u8; 16]].concat();
        for (opened, expected) in [
            (&[][..], None),
            (&[0u8; 16][..], None),
            (&[7, 0x80, 1], None),
            (&[0x80], None),
            (&[1, 0x80, 0, 0], None),
            (&block(&[7, 7, 1])[..], None),
            (&marked_early[..], None),
            (&block(&[0x80])[..], Some(&[][..])),
            (&block(&[1, 0x80])[..], Some(&[1][..])),
        ] {
            let mut stripped = Zeroizing::new(opened.to_vec());
            let stripped = cipher.unpad(&mut stripped).map(|()| stripped.to_vec());
            assert_eq!(stripped.as_deref(), expected, "{opened:?}");
        }
        let mut long = Zeroizing::new([vec![0x80u8], vec![0u8; 31]].concat());
        assert_eq!(
            cipher.unpad(&mut long),
            None,
            "more than a block of padding"
        );
        assert!(RecordCipher::Aes256GcmV2.padding(5).is_empty());
    }

    #[test]
    fn hex_round_trips_and_bad_text_says_why() {
        let key = Key::generate();
        let again = Key::from_hex(&key.to_hex()).expect("hex");
        assert_eq!(again.id(), key.id());
        assert_eq!(Key::from_hex("").expect_err("bad").0, "empty");
        assert_eq!(
            Key::from_hex("abc").expect_err("bad").0,
            "3 characters long"
        );
        assert_eq!(
            Key::from_hex(&"zz".repeat(32)).expect_err("bad").0,
            "not all hex digits"
        );
        assert!(!format!("{key:?}").contains(&key.to_hex()[..8]));
    }
}
