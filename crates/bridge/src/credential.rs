//! Run-scoped credentials: the `BERTH_API_TOKEN` a run presents to the callback bridge.
//!
//! A credential names one run and when it stops working, and is signed by the server. The bridge can check one with
//! no database lookup, and a credential is useless anywhere else: it does not look like a server API key, and only
//! the bridge accepts it.
//!
//! Format: `brc1.<payload>.<tag>`, both parts unpadded base64url.
//! - payload: run id (16 bytes) | expiry in Unix milliseconds (i64, big endian) | 16 random bytes. The random bytes
//!   make every credential unique, even two minted for the same run in the same millisecond.
//! - tag: HMAC-SHA256 over the ASCII text `brc1.<payload>`. Signing the text the verifier receives (rather than
//!   re-encoded bytes) means there is exactly one accepted spelling of each credential.
//!
//! The HMAC key is not the server secret itself but a subkey derived from it for this purpose alone, so the same
//! server secret can key other things later without a credential ever doubling as something else.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use berth_core::ids::RunId;
use berth_core::time::Timestamp;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretString};
use sha2::Sha256;
use uuid::Uuid;
use zeroize::Zeroize;

use crate::error::BridgeError;

/// Shortest server secret accepted: HMAC-SHA256 keys shorter than the hash add no strength.
pub const MIN_SECRET_LEN: usize = 32;

/// The version prefix of every credential, including its separator.
const PREFIX: &str = "brc1.";
/// Purpose label for deriving the signing subkey from the server secret.
const KEY_LABEL: &[u8] = b"berth bridge run credential v1";
const RUN_ID_LEN: usize = 16;
const EXPIRY_LEN: usize = 8;
const NONCE_LEN: usize = 16;
const PAYLOAD_LEN: usize = RUN_ID_LEN + EXPIRY_LEN + NONCE_LEN;
const TAG_LEN: usize = 32;
/// The block size of SHA-256, which is HMAC-SHA256's native key size.
const HMAC_KEY_LEN: usize = 64;
/// Every credential has exactly this many bytes; anything else is rejected before any decoding or hashing.
const TOKEN_LEN: usize = PREFIX.len() + base64_len(PAYLOAD_LEN) + 1 + base64_len(TAG_LEN);

type HmacSha256 = Hmac<Sha256>;

/// Mints and checks run credentials.
#[derive(Debug)]
pub struct CredentialIssuer {
    /// The derived signing key (32 bytes), zero-padded to the HMAC block size. HMAC pads short keys with zeros
    /// anyway (RFC 2104), so the MAC is the same as with the bare 32 bytes; the block-sized array lets the keyed
    /// MAC be built infallibly. Boxed and zeroized on drop by `SecretBox`; its `Debug` is redacted.
    key: SecretBox<[u8; HMAC_KEY_LEN]>,
}

/// What a valid credential says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunCredential {
    pub run_id: RunId,
    pub expires_at: Timestamp,
}

// === impl CredentialIssuer ===

impl CredentialIssuer {
    /// An issuer keyed by `secret`, the server's bridge secret: at least [`MIN_SECRET_LEN`] bytes of randomness.
    pub fn new(secret: &[u8]) -> Result<Self, BridgeError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(BridgeError::SecretTooShort {
                min: MIN_SECRET_LEN,
                actual: secret.len(),
            });
        }
        // HMAC takes keys of any length, so this cannot fail; map it anyway rather than panic.
        let mut derive =
            HmacSha256::new_from_slice(secret).map_err(|_| BridgeError::SecretTooShort {
                min: MIN_SECRET_LEN,
                actual: secret.len(),
            })?;
        derive.update(KEY_LABEL);
        let mut derived = derive.finalize().into_bytes();
        let mut key = SecretBox::new(Box::new([0u8; HMAC_KEY_LEN]));
        key.expose_secret_mut()[..derived.len()].copy_from_slice(derived.as_slice());
        derived.as_mut_slice().zeroize();
        Ok(Self { key })
    }

    /// A credential for `run_id` that stops working at `expires_at`.
    pub fn mint(&self, run_id: RunId, expires_at: Timestamp) -> SecretString {
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[..RUN_ID_LEN].copy_from_slice(run_id.as_uuid().as_bytes());
        payload[RUN_ID_LEN..RUN_ID_LEN + EXPIRY_LEN]
            .copy_from_slice(&expires_at.unix_millis().to_be_bytes());
        payload[RUN_ID_LEN + EXPIRY_LEN..].copy_from_slice(&rand::random::<[u8; NONCE_LEN]>());

        let mut token = String::with_capacity(TOKEN_LEN);
        token.push_str(PREFIX);
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let tag = self.mac(&token).finalize().into_bytes();
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut token);
        SecretString::from(token)
    }

    /// Checks `token` and says which run it is for. Malformed, forged and expired credentials are told apart for
    /// logs and error codes; all three are "unauthenticated" to the caller.
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<RunCredential, BridgeError> {
        if token.len() != TOKEN_LEN {
            return Err(BridgeError::CredentialMalformed);
        }
        let (signed, tag) = token
            .rsplit_once('.')
            .ok_or(BridgeError::CredentialMalformed)?;
        let encoded_payload = signed
            .strip_prefix(PREFIX)
            .ok_or(BridgeError::CredentialMalformed)?;
        let payload = decode_exact::<PAYLOAD_LEN>(encoded_payload)?;
        let tag = decode_exact::<TAG_LEN>(tag)?;

        // Constant time: a forger learns nothing from how long the comparison took.
        self.mac(signed)
            .verify_slice(&tag)
            .map_err(|_| BridgeError::CredentialInvalid)?;

        // The payload's length is fixed by its type, so these splits always succeed.
        let (run_id, rest) = payload
            .split_first_chunk::<RUN_ID_LEN>()
            .ok_or(BridgeError::CredentialMalformed)?;
        let expiry = rest
            .first_chunk::<EXPIRY_LEN>()
            .ok_or(BridgeError::CredentialMalformed)?;
        let credential = RunCredential {
            run_id: RunId::from_uuid(Uuid::from_bytes(*run_id)),
            expires_at: Timestamp::from_unix_millis(i64::from_be_bytes(*expiry)),
        };
        if now >= credential.expires_at {
            return Err(BridgeError::CredentialExpired);
        }
        Ok(credential)
    }

    fn mac(&self, signed: &str) -> HmacSha256 {
        let mut mac = <HmacSha256 as KeyInit>::new(self.key.expose_secret().into());
        mac.update(signed.as_bytes());
        mac
    }
}

/// Decodes unpadded base64url that must hold exactly `N` bytes. Non-canonical spellings are refused by the engine,
/// so each credential has one accepted text.
fn decode_exact<const N: usize>(encoded: &str) -> Result<[u8; N], BridgeError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| BridgeError::CredentialMalformed)?;
    bytes
        .try_into()
        .map_err(|_| BridgeError::CredentialMalformed)
}

/// Length of `n` bytes in unpadded base64.
const fn base64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use berth_core::ErrorKind;

    use super::*;

    const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

    fn issuer() -> CredentialIssuer {
        CredentialIssuer::new(SECRET).unwrap()
    }

    fn later(now: Timestamp) -> Timestamp {
        now.saturating_add(Duration::from_secs(600))
    }

    #[test]
    fn minted_credentials_verify_and_name_their_run() {
        let issuer = issuer();
        let run_id = RunId::new();
        let now = Timestamp::from_unix_millis(1_700_000_000_000);
        let expires_at = later(now);
        let token = issuer.mint(run_id, expires_at);
        let token = token.expose_secret();
        assert!(token.starts_with("brc1."), "{token}");
        assert_eq!(token.len(), TOKEN_LEN);
        assert_eq!(
            issuer.verify(token, now).unwrap(),
            RunCredential { run_id, expires_at }
        );
    }

    #[test]
    fn each_credential_is_unique() {
        let issuer = issuer();
        let run_id = RunId::new();
        let expires_at = later(Timestamp::now());
        let first = issuer.mint(run_id, expires_at);
        let second = issuer.mint(run_id, expires_at);
        assert_ne!(first.expose_secret(), second.expose_secret());
    }

    #[test]
    fn expired_credentials_are_refused() {
        let issuer = issuer();
        let expires_at = Timestamp::from_unix_millis(1_000);
        let token = issuer.mint(RunId::new(), expires_at);
        let err = issuer
            .verify(token.expose_secret(), expires_at)
            .unwrap_err();
        assert!(matches!(err, BridgeError::CredentialExpired));
        assert_eq!(err.code(), "credential_expired");
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(
            issuer
                .verify(token.expose_secret(), Timestamp::from_unix_millis(999))
                .is_ok()
        );
    }

    #[test]
    fn credentials_from_another_key_are_refused() {
        let other = CredentialIssuer::new(&[7u8; 48]).unwrap();
        let now = Timestamp::now();
        let token = other.mint(RunId::new(), later(now));
        let err = issuer().verify(token.expose_secret(), now).unwrap_err();
        assert!(matches!(err, BridgeError::CredentialInvalid));
        assert_eq!(err.code(), "credential_invalid");
    }

    #[test]
    fn tampering_anywhere_is_detected() {
        let issuer = issuer();
        let now = Timestamp::now();
        let token = issuer.mint(RunId::new(), later(now));
        let token = token.expose_secret();
        for index in 0..token.len() {
            let mut bytes = token.as_bytes().to_vec();
            bytes[index] = if bytes[index] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            let err = issuer.verify(&tampered, now).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unauthenticated);
            // Past the prefix, flipping a character never yields an expired or valid credential.
            assert!(
                !matches!(err, BridgeError::CredentialExpired),
                "position {index}"
            );
        }
    }

    #[test]
    fn a_changed_payload_or_tag_is_invalid_not_malformed() {
        let issuer = issuer();
        let now = Timestamp::now();
        let token = issuer.mint(RunId::new(), later(now));
        let (prefix_and_payload, tag) = token.expose_secret().rsplit_once('.').unwrap();

        // Swap in the payload of another run, keeping the original tag.
        let other = issuer.mint(RunId::new(), later(now));
        let (other_signed, other_tag) = other.expose_secret().rsplit_once('.').unwrap();
        let moved = format!("{other_signed}.{tag}");
        assert!(matches!(
            issuer.verify(&moved, now),
            Err(BridgeError::CredentialInvalid)
        ));
        let retagged = format!("{prefix_and_payload}.{other_tag}");
        assert!(matches!(
            issuer.verify(&retagged, now),
            Err(BridgeError::CredentialInvalid)
        ));

        // Forge a later expiry into an otherwise genuine payload.
        let encoded = prefix_and_payload.strip_prefix(PREFIX).unwrap();
        let mut payload = URL_SAFE_NO_PAD.decode(encoded).unwrap();
        payload[RUN_ID_LEN..RUN_ID_LEN + EXPIRY_LEN].copy_from_slice(&i64::MAX.to_be_bytes());
        let forged = format!("{PREFIX}{}.{tag}", URL_SAFE_NO_PAD.encode(payload));
        assert!(matches!(
            issuer.verify(&forged, now),
            Err(BridgeError::CredentialInvalid)
        ));
    }

    #[test]
    fn garbage_never_panics_and_is_malformed() {
        let issuer = issuer();
        let now = Timestamp::now();
        let huge = "a".repeat(1 << 20);
        let right_length_not_base64 = format!("{PREFIX}{}", "!".repeat(TOKEN_LEN - PREFIX.len()));
        let multibyte = "é".repeat(TOKEN_LEN / 2) + "x".repeat(TOKEN_LEN % 2).as_str();
        let no_separator = format!("{PREFIX}{}", "A".repeat(TOKEN_LEN - PREFIX.len()));
        let wrong_prefix = format!("brc2.{}", &"A".repeat(TOKEN_LEN - PREFIX.len()));
        let padded = {
            let token = issuer.mint(RunId::new(), later(now));
            let (signed, tag) = token.expose_secret().rsplit_once('.').unwrap();
            format!("{signed}.{}=", &tag[..tag.len() - 1])
        };
        for garbage in [
            "",
            "brc1.",
            "brc1..",
            "Bearer x",
            huge.as_str(),
            right_length_not_base64.as_str(),
            multibyte.as_str(),
            no_separator.as_str(),
            wrong_prefix.as_str(),
            padded.as_str(),
        ] {
            let err = issuer.verify(garbage, now).unwrap_err();
            assert!(
                matches!(err, BridgeError::CredentialMalformed),
                "{:.40}: {err:?}",
                garbage
            );
            assert_eq!(err.code(), "credential_malformed");
            assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        }
        assert_eq!(multibyte.len(), TOKEN_LEN);
    }

    #[test]
    fn short_secrets_are_refused() {
        let err = CredentialIssuer::new(&[1u8; 31]).unwrap_err();
        assert!(matches!(
            err,
            BridgeError::SecretTooShort {
                min: 32,
                actual: 31
            }
        ));
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(CredentialIssuer::new(&[]).is_err());
    }

    #[test]
    fn debug_output_hides_the_key() {
        let rendered = format!("{:?}", issuer());
        assert!(rendered.contains("REDACTED"), "{rendered}");
    }
}
