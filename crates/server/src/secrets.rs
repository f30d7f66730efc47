//! Secrets at rest: the master key, and authenticated encryption of each stored secret.
//!
//! Secrets (SSH private keys, passwords) are stored encrypted with XChaCha20-Poly1305 under one 32-byte master key.
//! Each secret gets a fresh random 24-byte nonce: XChaCha's nonce is long enough that random nonces never collide in
//! practice, so no counter has to be kept consistent across restarts or replicas. Callers pass the secret's id and
//! company id as associated data, which binds a ciphertext to its row: copied into another row, or another
//! company's, it no longer decrypts.
//!
//! The master key comes from `BERTH_MASTER_KEY` when set (so it can live in a secret manager, away from the data it
//! protects), else from `<data dir>/master-key`, created on first start. Losing that key loses every stored secret,
//! so an existing key file is never overwritten, even when it cannot be read or parsed.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use berth_core::ErrorKind;
use chacha20poly1305::aead::{Aead as _, Payload};
use chacha20poly1305::{KeyInit as _, XChaCha20Poly1305, XNonce};
use rand::TryRngCore as _;
use zeroize::Zeroizing;

use crate::private_file::{IfExists, write_private};

/// Name of the key file inside the data directory.
pub const MASTER_KEY_FILE: &str = "master-key";
/// The environment variable that, when set, holds the master key.
pub const MASTER_KEY_ENV: &str = "BERTH_MASTER_KEY";
/// Length of the master key in bytes.
pub const MASTER_KEY_LEN: usize = 32;
/// Length of the nonce stored beside each ciphertext.
pub const NONCE_LEN: usize = 24;

/// What a well-formed key looks like, for error messages. Never includes the value given.
const KEY_FORMAT: &str = "must be 32 bytes, written as base64 or as 64 hex characters";

/// Encrypts and decrypts stored secrets under the master key.
///
/// The key lives only inside the cipher, which zeroizes it on drop; `Debug` shows nothing of it.
pub struct SecretCipher {
    cipher: XChaCha20Poly1305,
    /// A key for the callback bridge, derived from the master key so that replicas sharing the master key agree on
    /// it without storing another secret.
    bridge_secret: Zeroizing<[u8; 32]>,
}

/// HMAC-SHA256(key, label): a subkey for one purpose.
fn derive(key: &[u8; MASTER_KEY_LEN], label: &[u8]) -> Zeroizing<[u8; 32]> {
    use hmac::{KeyInit as _, Mac as _};
    let Ok(mut mac) = <hmac::Hmac<sha2::Sha256>>::new_from_slice(key) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(label);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{MASTER_KEY_ENV} is not a valid master key: {reason}")]
    InvalidEnvKey { reason: &'static str },

    #[error("the master key file {} is not valid: {reason}; it was left untouched", path.display())]
    InvalidKeyFile { path: PathBuf, reason: &'static str },

    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("the operating system's random number generator failed")]
    Random,

    #[error("secret encryption failed")]
    Encrypt,

    /// Wrong key, wrong associated data (the ciphertext belongs to another row), or corrupted data: authenticated
    /// encryption does not say which, by design.
    #[error(
        "secret decryption failed: the data is corrupted or belongs elsewhere, or the master key changed"
    )]
    Decrypt,
}

// === impl SecretCipher ===

impl SecretCipher {
    /// A cipher under `key`. Prefer [`load_or_create`](Self::load_or_create); this is for callers that manage the
    /// key themselves (tests, key rotation).
    pub fn new(key: &[u8; MASTER_KEY_LEN]) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new(key.into()),
            bridge_secret: derive(key, b"berth bridge secret v1"),
        }
    }

    /// The callback bridge's server secret: HMAC-SHA256 of the master key over a fixed label. Knowing it reveals
    /// nothing of the master key, and the secrets it keys (run credentials, upstream signatures) are useless for
    /// decrypting stored secrets.
    pub fn bridge_secret(&self) -> &[u8; 32] {
        &self.bridge_secret
    }

    /// Loads the master key: from `env_key` (the value of `BERTH_MASTER_KEY`) when given, else from
    /// `<data_dir>/master-key`, which is created with a fresh random key if it does not exist.
    ///
    /// `env_key` is base64 (padding optional) or 64 hex characters; anything else, including an empty value, is an
    /// error rather than a silent fall back to the file, because a different key would make every stored secret
    /// unreadable.
    ///
    /// The key file is created with mode 0600, atomically: the key is written to a private temporary file which is
    /// then linked into place, so the file is never visible half-written nor readable by others, even briefly, and
    /// two servers starting at once agree on one key. An existing key file that group or others can read is still
    /// used (refusing to start would strand the secrets it protects), but a warning is logged: tighten it with
    /// `chmod 600`.
    ///
    /// Blocking file IO: call it at startup, before serving.
    pub fn load_or_create(data_dir: &Path, env_key: Option<&str>) -> Result<Self, SecretsError> {
        if let Some(text) = env_key {
            let key = parse_key(text).map_err(|reason| SecretsError::InvalidEnvKey { reason })?;
            tracing::info!("master key loaded from {MASTER_KEY_ENV}");
            return Ok(Self::new(&key));
        }
        let path = data_dir.join(MASTER_KEY_FILE);
        match read_key_file(&path)? {
            Some(key) => Ok(Self::new(&key)),
            None => {
                let key = create_key_file(data_dir, &path)?;
                Ok(Self::new(&key))
            }
        }
    }

    /// Encrypts `plaintext`, bound to `aad` (the secret's id and company id). Returns the fresh nonce and the
    /// ciphertext; both must be stored, and the same `aad` given to [`decrypt`](Self::decrypt).
    pub fn encrypt(
        &self,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), SecretsError> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ciphertext = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| SecretsError::Encrypt)?;
        Ok((nonce.to_vec(), ciphertext))
    }

    /// Decrypts a secret stored by [`encrypt`](Self::encrypt). Fails unless the key, `aad`, nonce and ciphertext
    /// are all exactly as they were.
    pub fn decrypt(
        &self,
        aad: &[u8],
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SecretsError> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SecretsError::Decrypt)?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SecretsError::Decrypt)
    }
}

impl std::fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretCipher").finish_non_exhaustive()
    }
}

// === impl SecretsError ===

impl SecretsError {
    /// The stable, snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            SecretsError::InvalidEnvKey { .. } => "master_key_invalid",
            SecretsError::InvalidKeyFile { .. } => "master_key_file_invalid",
            SecretsError::Io { .. } => "master_key_io",
            SecretsError::Random => "random_unavailable",
            SecretsError::Encrypt => "secret_encrypt_failed",
            SecretsError::Decrypt => "secret_decrypt_failed",
        }
    }

    /// Always internal: a client can neither cause nor fix any of these, and none may be shown in detail.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

/// Parses a key written as 64 hex characters or as base64 (standard alphabet, padding optional).
fn parse_key(text: &str) -> Result<Zeroizing<[u8; MASTER_KEY_LEN]>, &'static str> {
    let text = text.trim();
    if text.is_empty() {
        return Err("it is empty");
    }
    let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    // 64 hex characters can never be 32 bytes of base64 (that takes 43 or 44 characters), so trying hex first is
    // unambiguous.
    if text.len() == 2 * MASTER_KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode_to_slice(text, key.as_mut_slice()).map_err(|_| KEY_FORMAT)?;
        return Ok(key);
    }
    const BASE64: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let decoded = Zeroizing::new(BASE64.decode(text).map_err(|_| KEY_FORMAT)?);
    if decoded.len() != MASTER_KEY_LEN {
        return Err(KEY_FORMAT);
    }
    key.copy_from_slice(&decoded);
    Ok(key)
}

/// Reads an existing key file; `None` when there is none yet.
fn read_key_file(path: &Path) -> Result<Option<Zeroizing<[u8; MASTER_KEY_LEN]>>, SecretsError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SecretsError::Io {
                action: "open the master key file",
                path: path.to_owned(),
                source,
            });
        }
    };
    let io_error = |source| SecretsError::Io {
        action: "read the master key file",
        path: path.to_owned(),
        source,
    };
    let metadata = file.metadata().map_err(io_error)?;
    if !metadata.is_file() {
        return Err(SecretsError::InvalidKeyFile {
            path: path.to_owned(),
            reason: "it is not a regular file",
        });
    }
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", mode & 0o777),
            "the master key file can be read by other users; restrict it with `chmod 600`"
        );
    }
    let mut text = Zeroizing::new(String::new());
    io::Read::read_to_string(&mut file, &mut text).map_err(io_error)?;
    let key = parse_key(&text).map_err(|reason| SecretsError::InvalidKeyFile {
        path: path.to_owned(),
        reason,
    })?;
    tracing::debug!(path = %path.display(), "master key loaded");
    Ok(Some(key))
}

/// Creates the key file with a fresh key; if another process created it first, uses that one.
fn create_key_file(
    data_dir: &Path,
    path: &Path,
) -> Result<Zeroizing<[u8; MASTER_KEY_LEN]>, SecretsError> {
    let io_error = |action, path: &Path| {
        let path = path.to_owned();
        move |source| SecretsError::Io {
            action,
            path,
            source,
        }
    };
    fs::create_dir_all(data_dir).map_err(io_error("create the data directory", data_dir))?;

    let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    rand::rngs::OsRng
        .try_fill_bytes(key.as_mut_slice())
        .map_err(|_| SecretsError::Random)?;
    let mut text = Zeroizing::new(STANDARD.encode(key.as_slice()));
    text.push('\n');

    let suffix: [u8; 8] = rand::random();
    let temp = data_dir.join(format!(
        ".{MASTER_KEY_FILE}.{}.{}.tmp",
        std::process::id(),
        hex::encode(suffix)
    ));
    let written = write_private(&temp, text.as_bytes(), IfExists::Fail);
    // `hard_link` fails when the target exists, unlike `rename`, which would silently replace a key another
    // process has just created (and maybe already used).
    let linked = written.and_then(|()| fs::hard_link(&temp, path));
    if let Err(err) = fs::remove_file(&temp)
        && err.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %temp.display(), error = %err, "could not remove the temporary master key file");
    }
    match linked {
        Ok(()) => {
            // Make the new name durable; a crash losing it would lose the key while secrets encrypted under it
            // survive.
            if let Err(err) = File::open(data_dir).and_then(|dir| dir.sync_all()) {
                tracing::warn!(path = %data_dir.display(), error = %err, "could not sync the data directory");
            }
            tracing::info!(
                path = %path.display(),
                "created a new master key; back it up: stored secrets cannot be read without it"
            );
            Ok(key)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            read_key_file(path)?.ok_or_else(|| SecretsError::Io {
                action: "read the master key file",
                path: path.to_owned(),
                source: io::Error::from(io::ErrorKind::NotFound),
            })
        }
        Err(source) => Err(SecretsError::Io {
            action: "create the master key file",
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAD: &[u8] = b"secret:0190-aaaa|company:0190-bbbb";

    fn hex_key(byte: u8) -> String {
        hex::encode([byte; MASTER_KEY_LEN])
    }

    #[test]
    fn round_trip() {
        let cipher = SecretCipher::new(&[7; MASTER_KEY_LEN]);
        let (nonce, ciphertext) = cipher.encrypt(AAD, b"-----BEGIN KEY-----").unwrap();
        assert_eq!(nonce.len(), NONCE_LEN);
        assert_ne!(ciphertext.as_slice(), b"-----BEGIN KEY-----");
        let plaintext = cipher.decrypt(AAD, &nonce, &ciphertext).unwrap();
        assert_eq!(plaintext.as_slice(), b"-----BEGIN KEY-----");

        let (empty_nonce, empty) = cipher.encrypt(AAD, b"").unwrap();
        assert!(
            cipher
                .decrypt(AAD, &empty_nonce, &empty)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn every_encryption_uses_a_fresh_nonce() {
        let cipher = SecretCipher::new(&[7; MASTER_KEY_LEN]);
        let (first_nonce, first) = cipher.encrypt(AAD, b"same").unwrap();
        let (second_nonce, second) = cipher.encrypt(AAD, b"same").unwrap();
        assert_ne!(first_nonce, second_nonce);
        assert_ne!(first, second);
    }

    #[test]
    fn wrong_aad_fails() {
        let cipher = SecretCipher::new(&[7; MASTER_KEY_LEN]);
        let (nonce, ciphertext) = cipher.encrypt(AAD, b"hunter2").unwrap();
        let err = cipher
            .decrypt(b"secret:0190-aaaa|company:0190-cccc", &nonce, &ciphertext)
            .unwrap_err();
        assert!(matches!(err, SecretsError::Decrypt));
        assert_eq!(err.code(), "secret_decrypt_failed");
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(cipher.decrypt(b"", &nonce, &ciphertext).is_err());
    }

    #[test]
    fn tampering_fails() {
        let cipher = SecretCipher::new(&[7; MASTER_KEY_LEN]);
        let (nonce, ciphertext) = cipher.encrypt(AAD, b"hunter2").unwrap();
        for index in 0..ciphertext.len() {
            let mut tampered = ciphertext.clone();
            tampered[index] ^= 0x01;
            assert!(
                cipher.decrypt(AAD, &nonce, &tampered).is_err(),
                "byte {index}"
            );
        }
        let mut bad_nonce = nonce.clone();
        bad_nonce[0] ^= 0x01;
        assert!(cipher.decrypt(AAD, &bad_nonce, &ciphertext).is_err());
        assert!(cipher.decrypt(AAD, &nonce[..12], &ciphertext).is_err());
        assert!(cipher.decrypt(AAD, &[], &ciphertext).is_err());
        assert!(cipher.decrypt(AAD, &nonce, &ciphertext[..4]).is_err());
        assert!(cipher.decrypt(AAD, &nonce, &[]).is_err());

        let other = SecretCipher::new(&[8; MASTER_KEY_LEN]);
        assert!(other.decrypt(AAD, &nonce, &ciphertext).is_err());
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let first = SecretCipher::load_or_create(&data_dir, None).unwrap();
        let path = data_dir.join(MASTER_KEY_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        let contents = fs::read_to_string(&path).unwrap();
        assert_eq!(parse_key(&contents).unwrap().len(), MASTER_KEY_LEN);
        // Only the key file is left behind: no temporary files.
        let names: Vec<_> = fs::read_dir(&data_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [MASTER_KEY_FILE]);

        let (nonce, ciphertext) = first.encrypt(AAD, b"kept").unwrap();
        let second = SecretCipher::load_or_create(&data_dir, None).unwrap();
        assert_eq!(
            second.decrypt(AAD, &nonce, &ciphertext).unwrap().as_slice(),
            b"kept"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), contents);
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_key() {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().to_owned();
        let ciphers: Vec<SecretCipher> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| SecretCipher::load_or_create(&data_dir, None).unwrap()))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        });
        let (nonce, ciphertext) = ciphers[0].encrypt(AAD, b"shared").unwrap();
        for cipher in &ciphers {
            assert_eq!(
                cipher.decrypt(AAD, &nonce, &ciphertext).unwrap().as_slice(),
                b"shared"
            );
        }
    }

    #[test]
    fn env_key_overrides_the_file() {
        let temp = tempfile::tempdir().unwrap();
        let from_file = SecretCipher::load_or_create(temp.path(), None).unwrap();
        let (nonce, ciphertext) = from_file.encrypt(AAD, b"file").unwrap();

        let from_env = SecretCipher::load_or_create(temp.path(), Some(&hex_key(9))).unwrap();
        assert!(from_env.decrypt(AAD, &nonce, &ciphertext).is_err());
        let reference = SecretCipher::new(&[9; MASTER_KEY_LEN]);
        let (nonce, ciphertext) = reference.encrypt(AAD, b"env").unwrap();
        assert_eq!(
            from_env
                .decrypt(AAD, &nonce, &ciphertext)
                .unwrap()
                .as_slice(),
            b"env"
        );

        // The same key, as base64 with and without padding and with surrounding whitespace.
        let padded = STANDARD.encode([9u8; MASTER_KEY_LEN]);
        let unpadded = padded.trim_end_matches('=').to_owned();
        for text in [
            padded.clone(),
            unpadded,
            format!("  {padded}\n"),
            hex_key(9).to_uppercase(),
        ] {
            let cipher = SecretCipher::load_or_create(temp.path(), Some(&text)).unwrap();
            assert_eq!(
                cipher.decrypt(AAD, &nonce, &ciphertext).unwrap().as_slice(),
                b"env"
            );
        }

        // An env key never creates a key file.
        let empty = tempfile::tempdir().unwrap();
        SecretCipher::load_or_create(empty.path(), Some(&hex_key(9))).unwrap();
        assert!(!empty.path().join(MASTER_KEY_FILE).exists());
    }

    #[test]
    fn bad_env_keys_are_rejected_without_echoing_them() {
        let temp = tempfile::tempdir().unwrap();
        let short = STANDARD.encode([1u8; 16]);
        let long = STANDARD.encode([1u8; 33]);
        let not_hex = "zz".repeat(MASTER_KEY_LEN);
        let short_hex = hex_key(1)[..62].to_owned();
        for bad in ["", "   ", "not a key!", &short, &long, &not_hex, &short_hex] {
            let err = SecretCipher::load_or_create(temp.path(), Some(bad)).unwrap_err();
            assert!(
                matches!(err, SecretsError::InvalidEnvKey { .. }),
                "{bad:?}: {err:?}"
            );
            assert_eq!(err.code(), "master_key_invalid");
            assert_eq!(err.kind(), ErrorKind::Internal);
            let message = err.to_string();
            assert!(
                message.starts_with("BERTH_MASTER_KEY is not a valid master key"),
                "{message}"
            );
            if bad.trim().len() > 3 {
                assert!(!message.contains(bad.trim()), "{message}");
            }
        }
        assert!(!temp.path().join(MASTER_KEY_FILE).exists());
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_and_left_untouched() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join(MASTER_KEY_FILE);
        fs::write(&path, "definitely not a key").unwrap();
        let err = SecretCipher::load_or_create(temp.path(), None).unwrap_err();
        assert!(
            matches!(err, SecretsError::InvalidKeyFile { .. }),
            "{err:?}"
        );
        assert_eq!(err.code(), "master_key_file_invalid");
        assert!(!err.to_string().contains("definitely"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "definitely not a key");
    }

    #[test]
    fn a_readable_key_file_is_still_used() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join(MASTER_KEY_FILE);
        fs::write(&path, format!("{}\n", hex_key(3))).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let cipher = SecretCipher::load_or_create(temp.path(), None).unwrap();
        let reference = SecretCipher::new(&[3; MASTER_KEY_LEN]);
        let (nonce, ciphertext) = reference.encrypt(AAD, b"legacy").unwrap();
        assert_eq!(
            cipher.decrypt(AAD, &nonce, &ciphertext).unwrap().as_slice(),
            b"legacy"
        );
    }

    #[test]
    fn a_data_dir_that_cannot_be_created_is_an_io_error() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = SecretCipher::load_or_create(&file.join("data"), None).unwrap_err();
        assert!(matches!(err, SecretsError::Io { .. }), "{err:?}");
        assert_eq!(err.code(), "master_key_io");
    }

    #[test]
    fn debug_shows_no_key_material() {
        let cipher = SecretCipher::new(&[0xAB; MASTER_KEY_LEN]);
        assert_eq!(format!("{cipher:?}"), "SecretCipher { .. }");
    }
}
