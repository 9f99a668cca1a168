//! The LUKS1 partition header (LUKS1 on-disk format specification 1.2.3; QEMU's
//! `crypto/block-luks.c`), big-endian throughout:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 6 | magic `LUKS\xba\xbe` |
//! | 6 | 2 | version (1) |
//! | 8 | 32 | cipher name (`aes`) |
//! | 40 | 32 | cipher mode (`xts-plain64`, `cbc-essiv:sha256`) |
//! | 72 | 32 | hash spec (`sha256`) |
//! | 104 | 4 | payload offset, in 512-byte sectors |
//! | 108 | 4 | key bytes |
//! | 112 | 20 | master key digest |
//! | 132 | 32 | master key digest salt |
//! | 164 | 4 | master key digest iterations |
//! | 168 | 40 | UUID (text) |
//! | 208 | 8 × 48 | key slots: active, iterations, salt\[32\], key material offset (sectors), stripes |

use crate::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SectorCipher};
use crate::hash::{af_merge, HashAlg};
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

/// The LUKS magic.
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Size of the LUKS1 header in bytes.
pub const LUKS_HEADER_SIZE: usize = 592;
/// Number of key slots.
pub const LUKS_NUM_KEY_SLOTS: usize = 8;
/// A key slot's `active` word when in use.
pub const LUKS_KEY_SLOT_ENABLED: u32 = 0x00AC_71F3;
/// A key slot's `active` word when free.
pub const LUKS_KEY_SLOT_DISABLED: u32 = 0x0000_DEAD;
/// LUKS sectors are 512 bytes.
pub const LUKS_SECTOR_SIZE: u64 = 512;

/// Most PBKDF2 iterations a slot or the digest may ask for (2^28: minutes of work; QEMU's
/// default of two seconds stays far below). A crafted header cannot make an open spin for
/// hours.
pub const MAX_ITERATIONS: u32 = 1 << 28;
/// Most anti-forensic stripes a slot may have (LUKS1 uses 4000).
pub const MAX_STRIPES: u32 = 65536;
/// The stripes of every LUKS1 key slot (QEMU 10 refuses others).
pub const LUKS_STRIPES: u32 = 4000;
/// The master key digest is 20 bytes.
pub const LUKS_DIGEST_LEN: usize = 20;
/// Sectors of the LUKS header before the first key material (QEMU's
/// `QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET` / 512).
pub(crate) const HEADER_SECTORS: u64 = 4096 / LUKS_SECTOR_SIZE;

pub(crate) const KEY_SLOTS_OFFSET: usize = 208;
const KEY_SLOT_SIZE: usize = 48;

/// Why a LUKS header cannot be used; the texts are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LuksError {
    /// Fewer bytes than a header.
    #[error("Volume is not in LUKS format")]
    Truncated,
    /// The magic is wrong.
    #[error("Volume is not in LUKS format")]
    BadMagic,
    /// Not LUKS version 1.
    #[error("LUKS version {version} is not supported")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// A cipher QEMU does not know.
    #[error("Cipher name '{name}' is not supported")]
    UnknownCipher {
        /// The header's cipher name.
        name: String,
    },
    /// A cipher with a key size QEMU does not know.
    #[error("Cipher name '{name}' with key size {key_bytes} is not supported")]
    UnsupportedKeySize {
        /// The header's cipher name.
        name: String,
        /// The key size in bytes.
        key_bytes: u32,
    },
    /// A cipher mode or IV generator QEMU does not know.
    #[error("Unsupported cipher mode '{mode}'")]
    UnknownMode {
        /// The header's cipher mode string.
        mode: String,
    },
    /// An IV generator QEMU does not know.
    #[error("IV generator '{name}' not supported")]
    UnknownIvGen {
        /// The generator's name.
        name: String,
    },
    /// A hash this implementation cannot compute (it has sha1, sha256, sha512).
    #[error("Unsupported hash algorithm '{name}'")]
    UnknownHash {
        /// The hash name.
        name: String,
    },
    /// An algorithm QEMU knows but this implementation does not encrypt with yet.
    #[error("Unsupported cipher '{cipher}' mode '{mode}' for I/O")]
    UnsupportedCipher {
        /// The cipher name.
        cipher: String,
        /// The cipher mode string.
        mode: String,
    },
    /// ESSIV needs a hash.
    #[error("Missing IV generator hash specification")]
    MissingIvHash,
    /// ESSIV with a hash whose digest is no AES key size.
    #[error("No AES cipher with key size {digest_len} available")]
    EssivKeySize {
        /// The digest length.
        digest_len: usize,
    },
    /// A key slot whose stripes are not LUKS1's 4000 (QEMU 10 requires them).
    #[error("Keyslot {slot} is corrupted (stripes {stripes} != 4000)")]
    SlotNoStripes {
        /// The slot index.
        slot: usize,
        /// The stripes found.
        stripes: u32,
    },
    /// A text field of the header without its NUL terminator.
    #[error("LUKS header {field} is not NUL terminated")]
    NotTerminated {
        /// `cipher name`, `cipher mode` or `hash spec`.
        field: &'static str,
    },
    /// The payload starts inside the header.
    #[error("LUKS payload is overlapping with the header")]
    PayloadOverlapsHeader,
    /// The master key digest has no iterations.
    #[error("LUKS key iteration count is zero")]
    DigestNoIterations,
    /// An active key slot has no iterations.
    #[error("Keyslot {slot} iteration count is zero")]
    SlotNoIterations {
        /// The slot index.
        slot: usize,
    },
    /// A key slot's material starts inside the header.
    #[error("Keyslot {slot} is overlapping with the LUKS header")]
    SlotOverlapsHeader {
        /// The slot index.
        slot: usize,
    },
    /// A key slot whose state word is neither enabled nor disabled.
    #[error("Keyslot {slot} state (active/disable) is corrupted")]
    SlotState {
        /// The slot index.
        slot: usize,
    },
    /// A key slot's material reaches into the payload.
    #[error("Keyslot {slot} is overlapping with the encrypted payload")]
    SlotOverlapsPayload {
        /// The slot index.
        slot: usize,
    },
    /// Two key slots share sectors.
    #[error("Keyslots {a} and {b} are overlapping in the header")]
    SlotsOverlap {
        /// The first slot.
        a: usize,
        /// The second slot.
        b: usize,
    },
    /// More PBKDF2 iterations or stripes than this implementation accepts.
    #[error("Keyslot {slot} asks for {what} {value}, more than the limit {limit}")]
    SlotTooExpensive {
        /// The slot index (8 for the master key digest).
        slot: usize,
        /// `iterations` or `stripes`.
        what: &'static str,
        /// The value found.
        value: u32,
        /// The limit.
        limit: u32,
    },
    /// The header's key size does not fit its cipher.
    #[error("Master key length {key_bytes} does not fit cipher '{cipher}' mode '{mode}'")]
    KeyLength {
        /// The key size.
        key_bytes: u32,
        /// The cipher name.
        cipher: String,
        /// The cipher mode string.
        mode: String,
    },
    /// Reading key material failed.
    #[error("{reason}")]
    Read {
        /// What went wrong, with the offset.
        reason: String,
    },
    /// Key material could not be decrypted (cipher error).
    #[error("Failed to decrypt key material: {0}")]
    Cipher(#[from] crate::cipher::CipherError),
    /// No active key slot opens with the passphrase.
    #[error("Invalid password, cannot unlock any keyslot")]
    InvalidPassword,
    /// The random source failed.
    #[error("Unable to read random bytes: {reason}")]
    Random {
        /// What the source said.
        reason: String,
    },
    /// The benchmarked iteration count cannot be scaled to the iteration time.
    #[error("PBKDF iterations {iterations} too large to scale: Numerical result out of range")]
    IterationsTooLargeToScale {
        /// Iterations per second measured.
        iterations: u64,
    },
    /// The scaled iteration count does not fit the header's 32 bits.
    #[error("PBKDF iterations {iterations} larger than 4294967295: Numerical result out of range")]
    IterationsTooLarge {
        /// The scaled count.
        iterations: u64,
    },
    /// A key slot index outside 0..8.
    #[error("Invalid keyslot {slot} specified, must be between 0 and 7")]
    InvalidSlot {
        /// The index given.
        slot: i64,
    },
}

/// One key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksKeySlot {
    /// The `active` word ([`LUKS_KEY_SLOT_ENABLED`] when in use).
    pub active: u32,
    /// PBKDF2 iterations of the slot's passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; 32],
    /// Start of the key material, in 512-byte sectors from the header.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes of the key material.
    pub stripes: u32,
}

impl LuksKeySlot {
    /// Whether the slot holds a key.
    pub fn is_active(&self) -> bool {
        self.active == LUKS_KEY_SLOT_ENABLED
    }
}

/// A parsed LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Format version (1).
    pub version: u16,
    /// Cipher name, e.g. `aes`.
    pub cipher_name: String,
    /// Cipher mode with IV generator, e.g. `xts-plain64`.
    pub cipher_mode: String,
    /// Hash of the key derivation and digest, e.g. `sha256`.
    pub hash_spec: String,
    /// Start of the encrypted payload, in 512-byte sectors from the header.
    pub payload_offset_sector: u32,
    /// Master key length in bytes (both halves for XTS).
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; 20],
    /// Salt of that digest.
    pub mk_digest_salt: [u8; 32],
    /// Iterations of that digest.
    pub mk_digest_iterations: u32,
    /// The volume UUID, as text.
    pub uuid: String,
    /// The eight key slots.
    pub key_slots: Vec<LuksKeySlot>,
}

/// What `qemu-img info` shows of a LUKS volume (QEMU's `QCryptoBlockInfoLUKS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksInfo {
    /// `aes-256`, `serpent-128`, ...
    pub cipher_alg: String,
    /// `xts`, `cbc`, `ecb`, `ctr`.
    pub cipher_mode: String,
    /// `plain`, `plain64`, `essiv`.
    pub ivgen_alg: String,
    /// The ESSIV hash, only with `essiv`.
    pub ivgen_hash_alg: Option<String>,
    /// `sha256`, ...
    pub hash_alg: String,
    /// Start of the payload in bytes.
    pub payload_offset: u64,
    /// Iterations of the master key digest.
    pub master_key_iters: u64,
    /// The UUID.
    pub uuid: String,
    /// Per slot: active, and for active slots iterations and stripes; key offset in bytes.
    pub slots: Vec<LuksSlotInfo>,
}

/// One key slot as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksSlotInfo {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations (active slots only).
    pub iters: Option<u64>,
    /// Anti-forensic stripes (active slots only).
    pub stripes: Option<u64>,
    /// Start of the key material in bytes.
    pub key_offset: u64,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A NUL-terminated text field.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}

impl LuksHeader {
    /// Parses a header from at least [`LUKS_HEADER_SIZE`] bytes, checking the magic and the
    /// version as QEMU does.
    pub fn parse(bytes: &[u8]) -> Result<Self, LuksError> {
        // One bounds check here makes every fixed-offset access below in range.
        let b = bytes.get(..LUKS_HEADER_SIZE).ok_or(LuksError::Truncated)?;
        if b[..6] != LUKS_MAGIC {
            return Err(LuksError::BadMagic);
        }
        let version = be16(b, 6);
        if version != 1 {
            return Err(LuksError::UnsupportedVersion { version });
        }
        for (field, range) in [
            ("cipher name", 8..40),
            ("cipher mode", 40..72),
            ("hash spec", 72..104),
        ] {
            if !b[range].contains(&0) {
                return Err(LuksError::NotTerminated { field });
            }
        }
        let key_slots = (0..LUKS_NUM_KEY_SLOTS)
            .map(|i| {
                let s = &b[KEY_SLOTS_OFFSET + i * KEY_SLOT_SIZE..][..KEY_SLOT_SIZE];
                LuksKeySlot {
                    active: be32(s, 0),
                    iterations: be32(s, 4),
                    salt: array(&s[8..40]),
                    key_offset_sector: be32(s, 40),
                    stripes: be32(s, 44),
                }
            })
            .collect();
        Ok(LuksHeader {
            version,
            cipher_name: text(&b[8..40]),
            cipher_mode: text(&b[40..72]),
            hash_spec: text(&b[72..104]),
            payload_offset_sector: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: array(&b[112..132]),
            mk_digest_salt: array(&b[132..164]),
            mk_digest_iterations: be32(b, 164),
            uuid: text(&b[168..208]),
            key_slots,
        })
    }

    /// The description `qemu-img info` prints, with QEMU's names for the algorithms.
    pub fn info(&self) -> Result<LuksInfo, LuksError> {
        let unknown_mode = || LuksError::UnknownMode {
            mode: self.cipher_mode.clone(),
        };
        let (mode, ivgen) = self.cipher_mode.split_once('-').ok_or_else(unknown_mode)?;
        if !matches!(mode, "ecb" | "cbc" | "xts" | "ctr") {
            return Err(unknown_mode());
        }
        let (ivgen_alg, ivgen_hash) = match ivgen.split_once(':') {
            Some((alg, hash)) => (alg, Some(hash.to_string())),
            None => (ivgen, None),
        };
        if !matches!(ivgen_alg, "plain" | "plain64" | "essiv") {
            return Err(LuksError::UnknownIvGen {
                name: ivgen_alg.to_string(),
            });
        }
        // XTS keys hold two cipher keys of half the size each.
        let key_bytes = if mode == "xts" {
            self.key_bytes / 2
        } else {
            self.key_bytes
        };
        let cipher_alg = cipher_alg_name(&self.cipher_name, key_bytes)?;
        let slots = self
            .key_slots
            .iter()
            .map(|s| LuksSlotInfo {
                active: s.is_active(),
                iters: s.is_active().then_some(u64::from(s.iterations)),
                stripes: s.is_active().then_some(u64::from(s.stripes)),
                key_offset: u64::from(s.key_offset_sector) * LUKS_SECTOR_SIZE,
            })
            .collect();
        Ok(LuksInfo {
            cipher_alg,
            cipher_mode: mode.to_string(),
            ivgen_alg: ivgen_alg.to_string(),
            ivgen_hash_alg: if ivgen_alg == "essiv" {
                ivgen_hash
            } else {
                None
            },
            hash_alg: self.hash_spec.clone(),
            payload_offset: u64::from(self.payload_offset_sector) * LUKS_SECTOR_SIZE,
            master_key_iters: u64::from(self.mk_digest_iterations),
            uuid: self.uuid.clone(),
            slots,
        })
    }
}

/// Reads `buf.len()` bytes of the LUKS area at `offset` (relative to the header's start).
pub type ReadFn<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), LuksError> + 'a;

impl LuksHeader {
    /// QEMU's `qcrypto_block_luks_check_header` (QEMU 10): the payload after the header,
    /// digest iterations, and every slot with 4000 stripes, a valid state, iterations when
    /// active, its material after the header, before the payload and apart from the other
    /// slots'.
    pub fn check(&self) -> Result<(), LuksError> {
        if u64::from(self.payload_offset_sector) < HEADER_SECTORS {
            return Err(LuksError::PayloadOverlapsHeader);
        }
        if self.mk_digest_iterations == 0 {
            return Err(LuksError::DigestNoIterations);
        }
        let len = |s: &LuksKeySlot| -> u64 {
            let bytes = u64::from(self.key_bytes) * u64::from(s.stripes);
            bytes.div_ceil(LUKS_SECTOR_SIZE).div_ceil(HEADER_SECTORS) * HEADER_SECTORS
        };
        for (i, a) in self.key_slots.iter().enumerate() {
            if a.stripes != LUKS_STRIPES {
                return Err(LuksError::SlotNoStripes {
                    slot: i,
                    stripes: a.stripes,
                });
            }
            if a.active != LUKS_KEY_SLOT_ENABLED && a.active != LUKS_KEY_SLOT_DISABLED {
                return Err(LuksError::SlotState { slot: i });
            }
            if a.is_active() && a.iterations == 0 {
                return Err(LuksError::SlotNoIterations { slot: i });
            }
            let (s1, l1) = (u64::from(a.key_offset_sector), len(a));
            if s1 < HEADER_SECTORS {
                return Err(LuksError::SlotOverlapsHeader { slot: i });
            }
            if s1 + l1 > u64::from(self.payload_offset_sector) {
                return Err(LuksError::SlotOverlapsPayload { slot: i });
            }
            for (j, b) in self.key_slots.iter().enumerate().skip(i + 1) {
                let (s2, l2) = (u64::from(b.key_offset_sector), len(b));
                if l1 != 0 && l2 != 0 && s1 + l1 > s2 && s2 + l2 > s1 {
                    return Err(LuksError::SlotsOverlap { a: i, b: j });
                }
            }
        }
        Ok(())
    }

    /// The hash of the key derivation, the digest and the anti-forensic splitter.
    pub fn hash_alg(&self) -> Result<HashAlg, LuksError> {
        HashAlg::from_name(&self.hash_spec).ok_or_else(|| LuksError::UnknownHash {
            name: self.hash_spec.clone(),
        })
    }

    /// How the payload and the key material are encrypted, for the algorithms this crate
    /// implements (AES in XTS or CBC with plain, plain64 or essiv).
    pub fn cipher_spec(&self) -> Result<CipherSpec, LuksError> {
        let info = self.info()?;
        let unsupported = || LuksError::UnsupportedCipher {
            cipher: self.cipher_name.clone(),
            mode: self.cipher_mode.clone(),
        };
        let mode = match info.cipher_mode.as_str() {
            "xts" => CipherMode::Xts,
            "cbc" => CipherMode::Cbc,
            _ => return Err(unsupported()),
        };
        if self.cipher_name != "aes" {
            return Err(unsupported());
        }
        let per_cipher = match mode {
            CipherMode::Xts => self.key_bytes / 2,
            CipherMode::Cbc => self.key_bytes,
        };
        let alg = CipherAlg::aes_for_key(per_cipher as usize).ok_or_else(unsupported)?;
        let ivgen = match info.ivgen_alg.as_str() {
            "plain" => IvGenAlg::Plain,
            "plain64" => IvGenAlg::Plain64,
            _ => {
                let name = info.ivgen_hash_alg.ok_or(LuksError::MissingIvHash)?;
                let hash = HashAlg::from_name(&name).ok_or(LuksError::UnknownHash { name })?;
                if CipherAlg::aes_for_key(hash.digest_len()).is_none() {
                    return Err(LuksError::EssivKeySize {
                        digest_len: hash.digest_len(),
                    });
                }
                IvGenAlg::Essiv(hash)
            }
        };
        let spec = CipherSpec { alg, mode, ivgen };
        if spec.key_len() != self.key_bytes as usize {
            return Err(LuksError::KeyLength {
                key_bytes: self.key_bytes,
                cipher: self.cipher_name.clone(),
                mode: self.cipher_mode.clone(),
            });
        }
        Ok(spec)
    }

    /// Recovers the master key with `password` and returns the payload's sector cipher
    /// ([`LuksHeader::master_key`], then the cipher keyed with it).
    ///
    /// Errors: QEMU's header checks, unsupported algorithms, read failures, and
    /// [`LuksError::InvalidPassword`] when no slot opens.
    pub fn unlock(
        &self,
        password: &[u8],
        read: &mut ReadFn<'_>,
    ) -> Result<Box<dyn SectorCipher>, LuksError> {
        let key = self.master_key(password, read)?;
        Ok(self.cipher_spec()?.new_cipher(&key)?)
    }

    /// Recovers the master key with `password`: every active key slot in order is tried
    /// ([`LuksHeader::load_key`]) until one opens (QEMU's `qcrypto_block_luks_find_key`).
    pub fn master_key(
        &self,
        password: &[u8],
        read: &mut ReadFn<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, LuksError> {
        self.check()?;
        self.cipher_spec()?;
        self.hash_alg()?;
        check_cost(8, self.mk_digest_iterations, 0)?;
        for slot in 0..self.key_slots.len() {
            if let Some(key) = self.load_key(slot, password, read)? {
                return Ok(key);
            }
        }
        Err(LuksError::InvalidPassword)
    }

    /// Tries one key slot: `None` when it is inactive or `password` does not open it,
    /// the master key when it does. PBKDF2 of the password with the slot's salt and
    /// iterations keys the decryption of the slot's anti-forensic material (read through
    /// `read`, sector numbers from 0), the merged stripes are a candidate master key, and
    /// its PBKDF2 digest (the header's salt and iterations) is compared in constant time
    /// with the header's. Every intermediate key is zeroized when dropped.
    pub fn load_key(
        &self,
        slot_index: usize,
        password: &[u8],
        read: &mut ReadFn<'_>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, LuksError> {
        let Some(slot) = self.key_slots.get(slot_index).filter(|s| s.is_active()) else {
            return Ok(None);
        };
        let spec = self.cipher_spec()?;
        let hash = self.hash_alg()?;
        check_cost(8, self.mk_digest_iterations, 0)?;
        check_cost(slot_index, slot.iterations, slot.stripes)?;
        let key_len = spec.key_len();
        // Bounded: key_len <= 64 and stripes <= MAX_STRIPES.
        let split_len = key_len * slot.stripes as usize;
        let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
        hash.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        let mut split = Zeroizing::new(vec![0u8; split_len]);
        read(
            u64::from(slot.key_offset_sector) * LUKS_SECTOR_SIZE,
            &mut split,
        )?;
        spec.new_cipher(&slot_key)?.decrypt(0, &mut split)?;
        let mut candidate = Zeroizing::new(vec![0u8; key_len]);
        af_merge(hash, slot.stripes, &split, &mut candidate).map_err(|e| LuksError::Read {
            reason: e.to_string(),
        })?;
        let mut digest = Zeroizing::new([0u8; LUKS_DIGEST_LEN]);
        hash.pbkdf2(
            &candidate,
            &self.mk_digest_salt,
            self.mk_digest_iterations,
            &mut digest[..],
        );
        if bool::from(digest.ct_eq(&self.mk_digest)) {
            Ok(Some(candidate))
        } else {
            Ok(None)
        }
    }

    /// The 592 bytes of the header as QEMU stores it (`qcrypto_block_luks_store_header`):
    /// big-endian numbers, NUL-padded text fields.
    pub fn to_bytes(&self) -> [u8; LUKS_HEADER_SIZE] {
        let mut b = [0u8; LUKS_HEADER_SIZE];
        let put_text = |b: &mut [u8], s: &str| {
            // Text longer than its field is cut one short so the NUL stays (creation
            // refuses such names before they get here).
            let n = s.len().min(b.len() - 1);
            b[..n].copy_from_slice(&s.as_bytes()[..n]);
        };
        b[..6].copy_from_slice(&LUKS_MAGIC);
        b[6..8].copy_from_slice(&self.version.to_be_bytes());
        put_text(&mut b[8..40], &self.cipher_name);
        put_text(&mut b[40..72], &self.cipher_mode);
        put_text(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        put_text(&mut b[168..208], &self.uuid);
        for (i, s) in self.key_slots.iter().take(LUKS_NUM_KEY_SLOTS).enumerate() {
            let o = KEY_SLOTS_OFFSET + i * KEY_SLOT_SIZE;
            b[o..o + 4].copy_from_slice(&s.active.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset_sector.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }
}

/// Refuses work beyond [`MAX_ITERATIONS`] and [`MAX_STRIPES`] before any is done (slot 8
/// names the master key digest).
fn check_cost(slot: usize, iterations: u32, stripes: u32) -> Result<(), LuksError> {
    for (what, value, limit) in [
        ("iterations", iterations, MAX_ITERATIONS),
        ("stripes", stripes, MAX_STRIPES),
    ] {
        if value > limit {
            return Err(LuksError::SlotTooExpensive {
                slot,
                what,
                value,
                limit,
            });
        }
    }
    Ok(())
}

/// QEMU's name of a LUKS cipher with a key of `key_bytes` bytes (`aes` + 32 → `aes-256`).
fn cipher_alg_name(name: &str, key_bytes: u32) -> Result<String, LuksError> {
    let sizes: &[u32] = match name {
        "aes" | "serpent" | "twofish" => &[16, 24, 32],
        "cast5" | "sm4" => &[16],
        _ => {
            return Err(LuksError::UnknownCipher {
                name: name.to_string(),
            })
        }
    };
    if !sizes.contains(&key_bytes) {
        return Err(LuksError::UnsupportedKeySize {
            name: name.to_string(),
            key_bytes,
        });
    }
    Ok(if name == "sm4" {
        "sm4".to_string()
    } else {
        format!("{name}-{}", key_bytes * 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(mode: &str, key_bytes: u32) -> Vec<u8> {
        let mut b = vec![0u8; LUKS_HEADER_SIZE];
        b[..6].copy_from_slice(&LUKS_MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[8..11].copy_from_slice(b"aes");
        b[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
        b[72..78].copy_from_slice(b"sha256");
        b[104..108].copy_from_slice(&4040u32.to_be_bytes());
        b[108..112].copy_from_slice(&key_bytes.to_be_bytes());
        b[164..168].copy_from_slice(&1000u32.to_be_bytes());
        b[168..172].copy_from_slice(b"abcd");
        for i in 0..8 {
            let s = KEY_SLOTS_OFFSET + i * KEY_SLOT_SIZE;
            let active = if i == 0 {
                LUKS_KEY_SLOT_ENABLED
            } else {
                LUKS_KEY_SLOT_DISABLED
            };
            b[s..s + 4].copy_from_slice(&active.to_be_bytes());
            b[s + 4..s + 8].copy_from_slice(&2000u32.to_be_bytes());
            b[s + 40..s + 44].copy_from_slice(&(8 + 504 * i as u32).to_be_bytes());
            b[s + 44..s + 48].copy_from_slice(&4000u32.to_be_bytes());
        }
        b
    }

    #[test]
    fn info_names_as_qemu() {
        let h = LuksHeader::parse(&header("xts-plain64", 64)).unwrap();
        let i = h.info().unwrap();
        assert_eq!(i.cipher_alg, "aes-256");
        assert_eq!(
            (i.cipher_mode.as_str(), i.ivgen_alg.as_str()),
            ("xts", "plain64")
        );
        assert_eq!(i.ivgen_hash_alg, None);
        assert_eq!(i.payload_offset, 4040 * 512);
        assert_eq!(i.slots[0].iters, Some(2000));
        assert_eq!(i.slots[1].iters, None);
        assert_eq!(i.slots[1].key_offset, 512 * 512);
        let h = LuksHeader::parse(&header("cbc-essiv:sha256", 16)).unwrap();
        let i = h.info().unwrap();
        assert_eq!(i.cipher_alg, "aes-128");
        assert_eq!(i.ivgen_hash_alg.as_deref(), Some("sha256"));
        assert!(h.info().is_ok());
        assert!(LuksHeader::parse(&header("cbc-plain", 20))
            .unwrap()
            .info()
            .is_err());
        assert!(LuksHeader::parse(&header("bogus", 16))
            .unwrap()
            .info()
            .is_err());
    }

    #[test]
    fn bad_headers() {
        assert_eq!(LuksHeader::parse(&[0u8; 100]), Err(LuksError::Truncated));
        let mut b = header("xts-plain64", 64);
        b[7] = 2;
        assert_eq!(
            LuksHeader::parse(&b),
            Err(LuksError::UnsupportedVersion { version: 2 })
        );
        b[0] = b'X';
        assert_eq!(LuksHeader::parse(&b), Err(LuksError::BadMagic));
    }

    /// A LUKS area (header + one key slot's material) built with this crate's primitives:
    /// (area bytes, master key).
    fn luks_area(mode: &str, hash: &str, key_bytes: u32, password: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut b = header(mode, key_bytes);
        b[72..104].fill(0);
        b[72..72 + hash.len()].copy_from_slice(hash.as_bytes());
        let stripes = LUKS_STRIPES;
        for i in 0..8 {
            let s = KEY_SLOTS_OFFSET + i * KEY_SLOT_SIZE;
            b[s + 4..s + 8].copy_from_slice(&50u32.to_be_bytes());
            b[s + 8..s + 40].fill(i as u8 + 1);
            b[s + 44..s + 48].copy_from_slice(&stripes.to_be_bytes());
        }
        b[164..168].copy_from_slice(&20u32.to_be_bytes());
        b[132..164].fill(0x77);
        let h = LuksHeader::parse(&b).unwrap();
        let spec = h.cipher_spec().unwrap();
        let alg = h.hash_alg().unwrap();
        let mk: Vec<u8> = (0..key_bytes).map(|i| (i * 13 + 5) as u8).collect();
        let mut digest = [0u8; 20];
        alg.pbkdf2(&mk, &h.mk_digest_salt, 20, &mut digest);
        b[112..132].copy_from_slice(&digest);
        let slot = &h.key_slots[0];
        let mut slot_key = vec![0u8; mk.len()];
        alg.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        let n = mk.len() * stripes as usize;
        let random: Vec<u8> = (0..n - mk.len()).map(|i| (i * 7 + 3) as u8).collect();
        let mut split = vec![0u8; n];
        crate::hash::af_split(alg, stripes, &mk, &random, &mut split).unwrap();
        spec.new_cipher(&slot_key)
            .unwrap()
            .encrypt(0, &mut split)
            .unwrap();
        let at = slot.key_offset_sector as usize * 512;
        let mut area = vec![0u8; 4040 * 512];
        area[..b.len()].copy_from_slice(&b);
        area[at..at + n].copy_from_slice(&split);
        (area, mk)
    }

    fn unlock_area(area: &[u8], password: &[u8]) -> Result<Box<dyn SectorCipher>, LuksError> {
        let h = LuksHeader::parse(area)?;
        let mut read = |off: u64, buf: &mut [u8]| -> Result<(), LuksError> {
            let off = off as usize;
            let src = area.get(off..off + buf.len()).ok_or(LuksError::Read {
                reason: "outside".into(),
            })?;
            buf.copy_from_slice(src);
            Ok(())
        };
        h.unlock(password, &mut read)
    }

    #[test]
    fn unlock_every_mode_and_hash() {
        for (mode, kb) in [
            ("xts-plain64", 64),
            ("xts-plain64", 32),
            ("xts-plain", 48),
            ("cbc-essiv:sha256", 32),
            ("cbc-essiv:sha256", 16),
            ("cbc-plain64", 24),
        ] {
            for hash in ["sha1", "sha256", "sha512"] {
                let (area, mk) = luks_area(mode, hash, kb, b"pw");
                let c = unlock_area(&area, b"pw").unwrap();
                // The cipher is keyed with the master key.
                let h = LuksHeader::parse(&area).unwrap();
                let want = h.cipher_spec().unwrap().new_cipher(&mk).unwrap();
                let (mut a, mut b) = (vec![9u8; 1024], vec![9u8; 1024]);
                c.encrypt(77, &mut a).unwrap();
                want.encrypt(77, &mut b).unwrap();
                assert_eq!(a, b, "{mode} {hash}");
                assert_eq!(
                    unlock_area(&area, b"pW").err(),
                    Some(LuksError::InvalidPassword)
                );
            }
        }
    }

    #[test]
    fn damaged_slots_and_headers() {
        let (area, _) = luks_area("xts-plain64", "sha256", 64, b"pw");
        // A flipped bit in the key material: no slot opens.
        let mut bad = area.clone();
        bad[8 * 512 + 100] ^= 1;
        assert_eq!(
            unlock_area(&bad, b"pw").err(),
            Some(LuksError::InvalidPassword)
        );
        // A damaged digest.
        let mut bad = area.clone();
        bad[115] ^= 1;
        assert_eq!(
            unlock_area(&bad, b"pw").err(),
            Some(LuksError::InvalidPassword)
        );
        // Stripes 0, a bad state word, overlapping slots, material in the payload.
        let slot0 = KEY_SLOTS_OFFSET;
        let mut bad = area.clone();
        bad[slot0 + 44..slot0 + 48].fill(0);
        assert_eq!(
            unlock_area(&bad, b"pw").err(),
            Some(LuksError::SlotNoStripes {
                slot: 0,
                stripes: 0
            })
        );
        let mut bad = area.clone();
        bad[slot0..slot0 + 4].fill(0x11);
        assert_eq!(
            unlock_area(&bad, b"pw").err(),
            Some(LuksError::SlotState { slot: 0 })
        );
        let mut bad = area.clone();
        bad[slot0 + KEY_SLOT_SIZE + 40..slot0 + KEY_SLOT_SIZE + 44]
            .copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(
            unlock_area(&bad, b"pw").err(),
            Some(LuksError::SlotsOverlap { a: 0, b: 1 })
        );
        let mut bad = area.clone();
        bad[104..108].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            unlock_area(&bad, b"pw").err(),
            Some(LuksError::SlotOverlapsPayload { slot: 0 })
        );
        // Absurd costs are refused before any work.
        let mut bad = area.clone();
        bad[164..168].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            unlock_area(&bad, b"pw").err(),
            Some(LuksError::SlotTooExpensive { slot: 8, .. })
        ));
        let mut bad = area.clone();
        bad[slot0 + 4..slot0 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            unlock_area(&bad, b"pw").err(),
            Some(LuksError::SlotTooExpensive { slot: 0, .. })
        ));
        // Material outside the readable area: a read error, no panic.
        let short = &area[..600];
        assert!(matches!(
            unlock_area(short, b"pw").err(),
            Some(LuksError::Read { .. })
        ));
        // A key size that does not fit the cipher.
        let mut bad = area.clone();
        bad[108..112].copy_from_slice(&40u32.to_be_bytes());
        assert!(unlock_area(&bad, b"pw").is_err());
    }

    quickcheck::quickcheck! {
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) -> bool {
            let mut b = bytes;
            if b.len() >= 8 {
                b[..6].copy_from_slice(&LUKS_MAGIC);
                b[6] = 0;
                b[7] = 1;
            }
            if let Ok(h) = LuksHeader::parse(&b) {
                let _ = h.info();
                let _ = h.check();
                let _ = h.cipher_spec();
                let _ = h.hash_alg();
            }
            true
        }
    }
}
