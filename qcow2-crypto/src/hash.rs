//! The hash algorithms LUKS1 names in its header (`hash_spec`, and the ESSIV hash of the
//! cipher mode): digests, PBKDF2-HMAC and the anti-forensic splitter's merge.

use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use zeroize::{Zeroize, Zeroizing};

/// A hash algorithm of a LUKS1 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1 (20-byte digests).
    Sha1,
    /// SHA-224 (28-byte digests).
    Sha224,
    /// SHA-256 (32-byte digests).
    Sha256,
    /// SHA-384 (48-byte digests).
    Sha384,
    /// SHA-512 (64-byte digests).
    Sha512,
}

impl HashAlg {
    /// The algorithm a header names (`sha1`, `sha224`, `sha256`, `sha384`, `sha512`),
    /// `None` for others.
    pub fn from_name(name: &str) -> Option<HashAlg> {
        match name {
            "sha1" => Some(HashAlg::Sha1),
            "sha224" => Some(HashAlg::Sha224),
            "sha256" => Some(HashAlg::Sha256),
            "sha384" => Some(HashAlg::Sha384),
            "sha512" => Some(HashAlg::Sha512),
            _ => None,
        }
    }

    /// The name LUKS headers and QEMU use.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`, written to the start of `out` (at most
    /// [`HashAlg::digest_len`] bytes are written; a shorter `out` takes a prefix).
    pub fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            let mut full = d.finalize();
            let n = out.len().min(full.len());
            out[..n].copy_from_slice(&full[..n]);
            full.as_mut_slice().zeroize();
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts, out),
            HashAlg::Sha224 => run::<Sha224>(parts, out),
            HashAlg::Sha256 => run::<Sha256>(parts, out),
            HashAlg::Sha384 => run::<Sha384>(parts, out),
            HashAlg::Sha512 => run::<Sha512>(parts, out),
        }
    }

    /// The digest of `data`, in a buffer zeroized on drop.
    pub fn digest(self, data: &[u8]) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(vec![0u8; self.digest_len()]);
        self.digest_into(&[data], &mut out);
        out
    }

    /// PBKDF2 with HMAC of this hash (RFC 8018), filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2::pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2::pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }
}

/// The LUKS1 diffuse function: `block` is cut into digest-sized pieces (the last may be
/// shorter); piece `i` becomes the first bytes of `hash(be32(i) || piece)`.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    let mut piece = Zeroizing::new(vec![0u8; dl]);
    for (i, chunk) in block.chunks_mut(dl).enumerate() {
        let iv = (i as u32).to_be_bytes();
        hash.digest_into(&[&iv, chunk], &mut piece);
        let n = chunk.len();
        chunk.copy_from_slice(&piece[..n]);
    }
}

/// Error of [`af_merge`] / [`af_split`]: the split material is not `stripes` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("anti-forensic material of {len} bytes is not {stripes} stripes of {block_len} bytes")]
pub struct AfLengthError {
    /// Bytes given.
    pub len: usize,
    /// Stripes wanted.
    pub stripes: u32,
    /// Bytes of one stripe.
    pub block_len: usize,
}

fn af_check(split: usize, block_len: usize, stripes: u32) -> Result<(), AfLengthError> {
    let err = AfLengthError {
        len: split,
        stripes,
        block_len,
    };
    if stripes == 0 || block_len == 0 {
        return Err(err);
    }
    match block_len.checked_mul(stripes as usize) {
        Some(n) if n == split => Ok(()),
        _ => Err(err),
    }
}

/// The anti-forensic merge (LUKS1 `AFmerge`): recovers the `out.len()`-byte key from
/// `stripes` stripes of that size in `split`.
pub fn af_merge(
    hash: HashAlg,
    stripes: u32,
    split: &[u8],
    out: &mut [u8],
) -> Result<(), AfLengthError> {
    let bl = out.len();
    af_check(split.len(), bl, stripes)?;
    let mut block = Zeroizing::new(vec![0u8; bl]);
    let mut stripes_iter = split.chunks_exact(bl);
    for _ in 0..stripes - 1 {
        if let Some(s) = stripes_iter.next() {
            block.iter_mut().zip(s).for_each(|(b, s)| *b ^= s);
            diffuse(hash, &mut block);
        }
    }
    if let Some(last) = stripes_iter.next() {
        for ((o, b), s) in out.iter_mut().zip(block.iter()).zip(last) {
            *o = b ^ s;
        }
    }
    Ok(())
}

/// The anti-forensic split (LUKS1 `AFsplit`) with the first `stripes - 1` stripes taken
/// from `random` (which must hold `(stripes - 1) * key.len()` bytes); writes all stripes
/// to `split`. Used to write key slots and in tests.
pub fn af_split(
    hash: HashAlg,
    stripes: u32,
    key: &[u8],
    random: &[u8],
    split: &mut [u8],
) -> Result<(), AfLengthError> {
    let bl = key.len();
    af_check(split.len(), bl, stripes)?;
    let head = split.len() - bl;
    if random.len() != head {
        return Err(AfLengthError {
            len: random.len() + bl,
            stripes,
            block_len: bl,
        });
    }
    split[..head].copy_from_slice(random);
    let mut block = Zeroizing::new(vec![0u8; bl]);
    for s in split[..head].chunks_exact(bl) {
        block.iter_mut().zip(s).for_each(|(b, s)| *b ^= s);
        diffuse(hash, &mut block);
    }
    for ((o, b), k) in split[head..].iter_mut().zip(block.iter()).zip(key) {
        *o = b ^ k;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 6070's PBKDF2-HMAC-SHA1 vectors.
    #[test]
    fn pbkdf2_sha1_rfc6070() {
        let cases: &[(&[u8], &[u8], u32, &str)] = &[
            (
                b"password",
                b"salt",
                1,
                "0c60c80f961f0e71f3a9b524af6012062fe037a6",
            ),
            (
                b"password",
                b"salt",
                2,
                "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957",
            ),
            (
                b"password",
                b"salt",
                4096,
                "4b007901b765489abead49d926f721d065a429c1",
            ),
            (
                b"passwordPASSWORDpassword",
                b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
                4096,
                "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038",
            ),
            (
                b"pass\0word",
                b"sa\0lt",
                4096,
                "56fa6aa75548099dcc37d7f03425e0c3",
            ),
        ];
        for (p, s, c, want) in cases {
            let want = hex(want);
            let mut out = vec![0u8; want.len()];
            HashAlg::Sha1.pbkdf2(p, s, *c, &mut out);
            assert_eq!(out, want, "{c}");
        }
    }

    /// PBKDF2-HMAC-SHA256 and -SHA512 (the RFC 7914 vector and the widely used one).
    #[test]
    fn pbkdf2_sha2() {
        let mut out = vec![0u8; 64];
        HashAlg::Sha256.pbkdf2(b"passwd", b"salt", 1, &mut out);
        assert_eq!(
            out,
            hex(
                "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc\
                 49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
            )
        );
        let mut out = vec![0u8; 64];
        HashAlg::Sha512.pbkdf2(b"password", b"salt", 1, &mut out);
        assert_eq!(
            out,
            hex(
                "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252\
                 c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce"
            )
        );
    }

    #[test]
    fn af_round_trip_every_hash() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            for key_len in [16usize, 24, 32, 64, 70] {
                let key: Vec<u8> = (0..key_len as u8).collect();
                let stripes = 7u32;
                let random: Vec<u8> = (0..(stripes as usize - 1) * key_len)
                    .map(|i| (i * 31 % 251) as u8)
                    .collect();
                let mut split = vec![0u8; stripes as usize * key_len];
                af_split(hash, stripes, &key, &random, &mut split).unwrap();
                let mut back = vec![0u8; key_len];
                af_merge(hash, stripes, &split, &mut back).unwrap();
                assert_eq!(back, key, "{hash:?} {key_len}");
                // Any damaged stripe gives another key.
                split[3] ^= 1;
                af_merge(hash, stripes, &split, &mut back).unwrap();
                assert_ne!(back, key);
            }
        }
    }

    /// Two stripes by hand: merge = diffuse(s0) ^ s1, diffuse = per-digest-block hashes.
    #[test]
    fn af_merge_by_hand() {
        let s0 = [0x11u8; 40];
        let s1 = [0x22u8; 40];
        let split: Vec<u8> = s0.iter().chain(s1.iter()).copied().collect();
        let mut out = [0u8; 40];
        af_merge(HashAlg::Sha256, 2, &split, &mut out).unwrap();
        let mut want = [0u8; 40];
        let mut d = [0u8; 32];
        HashAlg::Sha256.digest_into(&[&0u32.to_be_bytes(), &s0[..32]], &mut d);
        want[..32].copy_from_slice(&d);
        HashAlg::Sha256.digest_into(&[&1u32.to_be_bytes(), &s0[32..]], &mut d);
        want[32..].copy_from_slice(&d[..8]);
        want.iter_mut().zip(s1).for_each(|(w, s)| *w ^= s);
        assert_eq!(out, want);
    }

    #[test]
    fn af_bad_lengths() {
        let mut out = [0u8; 16];
        assert!(af_merge(HashAlg::Sha1, 0, &[], &mut out).is_err());
        assert!(af_merge(HashAlg::Sha1, 2, &[0; 31], &mut out).is_err());
        assert!(af_merge(HashAlg::Sha1, u32::MAX, &[0; 32], &mut out).is_err());
    }
}
