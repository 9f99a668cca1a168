//! Sector ciphers: AES-128/192/256 in XTS or CBC mode, with the IV generators `plain`,
//! `plain64` and `essiv:HASH`, as dm-crypt and QEMU's `qcrypto_block_cipher_*` apply them:
//! data is processed in 512-byte sectors (a shorter last piece is allowed), each with the
//! IV of its sector number.

use crate::hash::HashAlg;
use aes::cipher::{
    consts::U16, generic_array::GenericArray, Block, BlockCipher, BlockDecrypt, BlockEncrypt,
    BlockSizeUser, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use thiserror::Error;

/// Bytes of one encryption sector.
pub const SECTOR_SIZE: usize = 512;

/// Why data cannot be encrypted or decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CipherError {
    /// The data is not a whole number of cipher blocks (16 bytes).
    #[error("data of {len} bytes is not a multiple of the cipher block size 16")]
    Unaligned {
        /// Bytes given.
        len: usize,
    },
    /// The key has the wrong length for the cipher.
    #[error("key of {len} bytes does not fit the cipher")]
    KeyLength {
        /// Bytes given.
        len: usize,
    },
}

/// Encrypts and decrypts 512-byte sectors, each with the IV of its sector number: the seam
/// between the image engine and the algorithms (a storage stack may plug its own).
///
/// `first_sector` is the number of the sector `buf` starts at; a `buf` longer than one
/// sector covers the following sectors; the last piece may be shorter than a sector but
/// must be a whole number of 16-byte blocks.
pub trait SectorCipher: Send + Sync {
    /// Encrypts `buf` in place.
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CipherError>;
    /// Decrypts `buf` in place.
    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CipherError>;
}

/// A cipher algorithm with its key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl CipherAlg {
    /// The AES variant for a key of `bytes` bytes.
    pub fn aes_for_key(bytes: usize) -> Option<CipherAlg> {
        match bytes {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }

    /// QEMU's name (`aes-128`, `aes-192`, `aes-256`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// Key bytes of one cipher instance.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }
}

/// Block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// XTS: the key is two cipher keys (data, then tweak).
    Xts,
    /// CBC.
    Cbc,
}

impl CipherMode {
    /// QEMU's and the LUKS header's name (`xts`, `cbc`).
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
        }
    }
}

/// IV generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The low 32 bits of the sector number, little-endian.
    Plain,
    /// The sector number, 64-bit little-endian.
    Plain64,
    /// The `plain64` IV encrypted with AES keyed by the hash of the key.
    Essiv(HashAlg),
}

impl IvGenAlg {
    /// QEMU's and the LUKS header's name (`plain`, `plain64`, `essiv`).
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv(_) => "essiv",
        }
    }
}

/// Everything that says how sectors are encrypted (the key aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    /// The algorithm of one cipher instance (XTS uses two).
    pub alg: CipherAlg,
    /// The mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGenAlg,
}

impl CipherSpec {
    /// Key bytes the spec needs (twice the cipher's for XTS).
    pub fn key_len(&self) -> usize {
        match self.mode {
            CipherMode::Xts => 2 * self.alg.key_len(),
            CipherMode::Cbc => self.alg.key_len(),
        }
    }

    /// A sector cipher keyed with `key` ([`CipherSpec::key_len`] bytes).
    pub fn new_cipher(&self, key: &[u8]) -> Result<Box<dyn SectorCipher>, CipherError> {
        if key.len() != self.key_len() {
            return Err(CipherError::KeyLength { len: key.len() });
        }
        let ivgen = IvGen::new(self.ivgen, key)?;
        Ok(match self.alg {
            CipherAlg::Aes128 => Box::new(Sectors::<Aes128>::new(self.mode, key, ivgen)?),
            CipherAlg::Aes192 => Box::new(Sectors::<Aes192>::new(self.mode, key, ivgen)?),
            CipherAlg::Aes256 => Box::new(Sectors::<Aes256>::new(self.mode, key, ivgen)?),
        })
    }
}

/// The ESSIV cipher: AES with the hash of the key (QEMU's `qcrypto_block_luks_essiv_cipher`
/// picks the AES variant whose key size is the hash's digest size).
enum Essiv {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

enum IvGen {
    Plain,
    Plain64,
    Essiv(Box<Essiv>),
}

fn new_key<C: KeyInit>(key: &[u8]) -> Result<C, CipherError> {
    C::new_from_slice(key).map_err(|_| CipherError::KeyLength { len: key.len() })
}

impl IvGen {
    fn new(alg: IvGenAlg, key: &[u8]) -> Result<IvGen, CipherError> {
        Ok(match alg {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv(hash) => {
                let salt = hash.digest(key);
                IvGen::Essiv(Box::new(match salt.len() {
                    16 => Essiv::A128(new_key(&salt)?),
                    24 => Essiv::A192(new_key(&salt)?),
                    32 => Essiv::A256(new_key(&salt)?),
                    n => return Err(CipherError::KeyLength { len: n }),
                }))
            }
        })
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                let b = GenericArray::from_mut_slice(&mut iv);
                match c.as_ref() {
                    Essiv::A128(c) => c.encrypt_block(b),
                    Essiv::A192(c) => c.encrypt_block(b),
                    Essiv::A256(c) => c.encrypt_block(b),
                }
            }
        }
        iv
    }
}

enum Mode<C> {
    /// Data cipher, tweak cipher.
    Xts(C, C),
    Cbc(C),
}

struct Sectors<C> {
    mode: Mode<C>,
    ivgen: IvGen,
}

/// Cipher blocks of one sector.
const SECTOR_BLOCKS: usize = SECTOR_SIZE / 16;

/// The XTS tweak of the next block: times x in GF(2^128), little-endian (IEEE 1619).
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 != 0 { 0x87 } else { 0 }
}

#[inline(always)]
fn load(b: &[u8]) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    u128::from_le_bytes(a)
}

impl<C> Sectors<C>
where
    C: BlockEncrypt + BlockDecrypt + BlockCipher + KeyInit + BlockSizeUser<BlockSize = U16>,
{
    fn new(mode: CipherMode, key: &[u8], ivgen: IvGen) -> Result<Self, CipherError> {
        let mode = match mode {
            CipherMode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                Mode::Xts(new_key(k1)?, new_key(k2)?)
            }
            CipherMode::Cbc => Mode::Cbc(new_key(key)?),
        };
        Ok(Sectors { mode, ivgen })
    }

    /// Encrypts or decrypts one sector (at most [`SECTOR_SIZE`] bytes, whole blocks).
    /// XTS and CBC decryption hand all of the sector's blocks to the cipher at once, so
    /// that AES-NI works on several blocks in parallel; CBC encryption is a chain.
    fn sector(&self, sector: &mut [u8], iv: [u8; 16], encrypt: bool) {
        let n = sector.len() / 16;
        let mut blocks: [Block<C>; SECTOR_BLOCKS] = Default::default();
        match &self.mode {
            Mode::Xts(data, tweak) => {
                let mut t = GenericArray::from(iv);
                tweak.encrypt_block(&mut t);
                let mut tw = u128::from_le_bytes(t.into());
                let mut tweaks = [0u128; SECTOR_BLOCKS];
                for (j, b) in blocks[..n].iter_mut().enumerate() {
                    tweaks[j] = tw;
                    b.copy_from_slice(&(load(&sector[16 * j..]) ^ tw).to_le_bytes());
                    tw = mul_alpha(tw);
                }
                if encrypt {
                    data.encrypt_blocks(&mut blocks[..n]);
                } else {
                    data.decrypt_blocks(&mut blocks[..n]);
                }
                for (j, b) in blocks[..n].iter().enumerate() {
                    let v = load(b) ^ tweaks[j];
                    sector[16 * j..16 * j + 16].copy_from_slice(&v.to_le_bytes());
                }
            }
            Mode::Cbc(c) if encrypt => {
                let mut prev = u128::from_le_bytes(iv);
                for chunk in sector.chunks_exact_mut(16) {
                    let b = &mut blocks[0];
                    b.copy_from_slice(&(load(chunk) ^ prev).to_le_bytes());
                    c.encrypt_block(b);
                    chunk.copy_from_slice(b);
                    prev = load(b);
                }
            }
            Mode::Cbc(c) => {
                for (j, b) in blocks[..n].iter_mut().enumerate() {
                    b.copy_from_slice(&sector[16 * j..16 * j + 16]);
                }
                c.decrypt_blocks(&mut blocks[..n]);
                // Backwards, so that the ciphertext block before each one is still there.
                for j in (0..n).rev() {
                    let prev = if j == 0 {
                        u128::from_le_bytes(iv)
                    } else {
                        load(&sector[16 * (j - 1)..])
                    };
                    let v = load(&blocks[j]) ^ prev;
                    sector[16 * j..16 * j + 16].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }

    fn run(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) -> Result<(), CipherError> {
        if buf.len() % 16 != 0 {
            return Err(CipherError::Unaligned { len: buf.len() });
        }
        for (i, sector) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
            let iv = self.ivgen.iv(first_sector.wrapping_add(i as u64));
            self.sector(sector, iv, encrypt);
        }
        Ok(())
    }
}

impl<C> SectorCipher for Sectors<C>
where
    C: BlockEncrypt
        + BlockDecrypt
        + BlockCipher
        + KeyInit
        + BlockSizeUser<BlockSize = U16>
        + Send
        + Sync,
{
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CipherError> {
        self.run(first_sector, buf, true)
    }

    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CipherError> {
        self.run(first_sector, buf, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn xts(alg: CipherAlg, ivgen: IvGenAlg, key: &[u8]) -> Box<dyn SectorCipher> {
        CipherSpec {
            alg,
            mode: CipherMode::Xts,
            ivgen,
        }
        .new_cipher(key)
        .unwrap()
    }

    /// IEEE 1619-2007 XTS-AES-128 vectors 1, 2 and 4 (data unit sequence numbers 0,
    /// 0x3333333333, 0 become plain64 IVs).
    #[test]
    fn xts_aes128_ieee1619() {
        let c = xts(CipherAlg::Aes128, IvGenAlg::Plain64, &[0u8; 32]);
        let mut b = vec![0u8; 32];
        c.encrypt(0, &mut b).unwrap();
        assert_eq!(
            b,
            hex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e")
        );
        c.decrypt(0, &mut b).unwrap();
        assert_eq!(b, vec![0u8; 32]);

        let key = hex("1111111111111111111111111111111122222222222222222222222222222222");
        let c = xts(CipherAlg::Aes128, IvGenAlg::Plain64, &key);
        let mut b = vec![0x44u8; 32];
        c.encrypt(0x33_3333_3333, &mut b).unwrap();
        assert_eq!(
            b,
            hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0")
        );

        // Vector 4: 512 bytes 00..ff twice, key halves of pi and e digits, sequence 0.
        let key = hex("27182818284590452353602874713526 31415926535897932384626433832795");
        let c = xts(CipherAlg::Aes128, IvGenAlg::Plain64, &key);
        let mut b: Vec<u8> = (0..512).map(|i| i as u8).collect();
        c.encrypt(0, &mut b).unwrap();
        assert_eq!(
            &b[..32],
            &hex("27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c")[..]
        );
        assert_eq!(
            &b[480..],
            &hex("eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568")[..]
        );
        c.decrypt(0, &mut b).unwrap();
        assert!(b.iter().enumerate().all(|(i, &v)| v == i as u8));
    }

    /// IEEE 1619-2007 XTS-AES-256 vector 10 (first and last blocks), sequence 0xff.
    #[test]
    fn xts_aes256_ieee1619() {
        let key = hex(
            "27182818284590452353602874713526 62497757247093699959574966967627
             31415926535897932384626433832795 02884197169399375105820974944592",
        );
        let c = xts(CipherAlg::Aes256, IvGenAlg::Plain64, &key);
        let mut b: Vec<u8> = (0..512).map(|i| i as u8).collect();
        c.encrypt(0xff, &mut b).unwrap();
        assert_eq!(
            &b[..32],
            &hex("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b")[..]
        );
        assert_eq!(
            &b[480..],
            &hex("773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151")[..]
        );
    }

    /// CBC: sector 0's plain64 IV is zero, so its first block is AES-128 of the block
    /// (FIPS-197 / SP 800-38A F.1.1); every mode and IV generator round-trips, and a
    /// sector encrypts the same alone as inside a run.
    #[test]
    fn cbc_round_trips_and_chains() {
        let key = hex("2b7e151628aed2a6abf7158809cf4f3c");
        let spec = CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGenAlg::Plain64,
        };
        let c = spec.new_cipher(&key).unwrap();
        // AES-128 ECB of the F.1.1 first block (IV zero makes CBC's first block ECB).
        let mut b = hex("6bc1bee22e409f96e93d7e117393172a");
        c.encrypt(0, &mut b).unwrap();
        assert_eq!(b, hex("3ad77bb40d7a3660a89ecaf32466ef97"));
        let plain: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        for ivgen in [
            IvGenAlg::Plain,
            IvGenAlg::Plain64,
            IvGenAlg::Essiv(HashAlg::Sha256),
        ] {
            for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
                for mode in [CipherMode::Cbc, CipherMode::Xts] {
                    let spec = CipherSpec { alg, mode, ivgen };
                    let key: Vec<u8> = (0..spec.key_len() as u8).collect();
                    let c = spec.new_cipher(&key).unwrap();
                    let mut b = plain.clone();
                    c.encrypt(9, &mut b).unwrap();
                    assert_ne!(b, plain);
                    // Sector 10 alone encrypts as the second sector of the run.
                    let mut second = plain[512..].to_vec();
                    c.encrypt(10, &mut second).unwrap();
                    assert_eq!(&b[512..], &second[..]);
                    c.decrypt(9, &mut b).unwrap();
                    assert_eq!(b, plain, "{spec:?}");
                }
            }
        }
    }

    /// CBC over a whole sector equals the chain computed block by block with the AES
    /// block cipher alone (encryption chains; decryption runs the blocks in parallel).
    #[test]
    fn cbc_matches_a_manual_chain() {
        let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7)).collect();
        let spec = CipherSpec {
            alg: CipherAlg::Aes256,
            mode: CipherMode::Cbc,
            ivgen: IvGenAlg::Plain64,
        };
        let c = spec.new_cipher(&key).unwrap();
        let plain: Vec<u8> = (0..1024u32).map(|i| (i * 31 + 5) as u8).collect();
        let mut ours = plain.clone();
        c.encrypt(0x1234, &mut ours).unwrap();
        let aes = Aes256::new_from_slice(&key).unwrap();
        let mut want = plain.clone();
        for (s, sector) in want.chunks_mut(512).enumerate() {
            let mut prev = [0u8; 16];
            prev[..8].copy_from_slice(&(0x1234u64 + s as u64).to_le_bytes());
            for b in sector.chunks_mut(16) {
                b.iter_mut().zip(prev).for_each(|(x, p)| *x ^= p);
                aes.encrypt_block(GenericArray::from_mut_slice(b));
                prev.copy_from_slice(b);
            }
        }
        assert_eq!(ours, want);
        c.decrypt(0x1234, &mut ours).unwrap();
        assert_eq!(ours, plain);
    }

    #[test]
    fn plain_truncates_to_32_bits() {
        let spec = CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGenAlg::Plain,
        };
        let c = spec.new_cipher(&[7u8; 16]).unwrap();
        let mut a = vec![1u8; 512];
        let mut b = a.clone();
        c.encrypt(5, &mut a).unwrap();
        c.encrypt((1 << 32) + 5, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_input_is_an_error() {
        let spec = CipherSpec {
            alg: CipherAlg::Aes256,
            mode: CipherMode::Xts,
            ivgen: IvGenAlg::Plain64,
        };
        assert!(spec.new_cipher(&[0u8; 32]).is_err());
        let c = spec.new_cipher(&[0u8; 64]).unwrap();
        assert_eq!(
            c.encrypt(0, &mut [0u8; 20]),
            Err(CipherError::Unaligned { len: 20 })
        );
        let spec = CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGenAlg::Essiv(HashAlg::Sha1),
        };
        assert!(spec.new_cipher(&[0u8; 16]).is_err());
    }
}
