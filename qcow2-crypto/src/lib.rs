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
//! zeroized when dropped (AES key schedules included). Creating LUKS headers and changing
//! key slots are not implemented yet.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod cipher;
pub mod hash;
pub mod luks;

pub use cipher::{CipherError, CipherSpec, SectorCipher};
pub use hash::HashAlg;

pub use luks::{LuksError, LuksHeader, LuksInfo, LuksKeySlot};
