//! Encryption in qcow2 images.
//!
//! QEMU encrypts qcow2 guest data with LUKS1 (`encrypt.format=luks`): the LUKS header and
//! key material live in clusters of the image, named by the full-disk-encryption header
//! extension, and each 512-byte sector of guest data is encrypted with the master key. The
//! legacy method (`encrypt.format=aes`, `crypt_method` 1) keys AES-CBC directly from the
//! passphrase and has no header.
//!
//! This crate owns the LUKS1 on-disk header ([`luks::LuksHeader`]): parsing with QEMU's
//! checks and messages, and the description `qemu-img info` prints without the secret
//! ([`luks::LuksInfo`]), and opening with a passphrase ([`luks::LuksHeader::unlock`]:
//! PBKDF2, the anti-forensic merge, the digest check in constant time) into a
//! [`SectorCipher`], the seam through which the image engine encrypts and decrypts guest
//! sectors without knowing the algorithms ([`cipher`]: AES-128/192/256 in XTS or CBC with
//! the IV generators plain, plain64 and essiv). Key material lives in buffers that are
//! zeroized when dropped (AES key schedules included). [`keyslot`] creates headers and
//! adds or erases key slots, with randomness and the PBKDF2 benchmark behind seams.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod cipher;
pub mod hash;
pub mod keyslot;
pub mod luks;

pub use cipher::{CipherError, CipherSpec, SectorCipher};
pub use hash::HashAlg;

pub use luks::{LuksError, LuksHeader, LuksInfo, LuksKeySlot};

/// A passphrase (QEMU's `secret` object): bytes zeroized when dropped, never shown by
/// `Debug`.
#[derive(Clone)]
pub struct Secret(zeroize::Zeroizing<Vec<u8>>);

impl Secret {
    /// Takes the bytes (QEMU uses them as given, without a trailing NUL).
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(zeroize::Zeroizing::new(bytes))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl PartialEq for Secret {
    /// Constant-time comparison.
    fn eq(&self, other: &Secret) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.0.len() && bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for Secret {}
