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
//! ([`luks::LuksInfo`]). Opening with a secret (PBKDF2, the anti-forensic splitter, the
//! ciphers) comes with the encryption work; until then the engine refuses I/O on encrypted
//! images.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod luks;

pub use luks::{LuksError, LuksHeader, LuksInfo, LuksKeySlot};
