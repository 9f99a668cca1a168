//! Writing LUKS1 key material: a new header with its first key slot (QEMU's
//! `qcrypto_block_luks_create`) and key slots added or erased later (`qemu-img amend`,
//! `qcrypto_block_luks_store_key` / `_erase_key`).
//!
//! Randomness and the PBKDF2 benchmark are seams ([`RandomSource`], [`PbkdfBench`]): the
//! operating system's generator and QEMU's CPU-time benchmark in use, a seeded generator
//! and a fixed rate in tests, so that a test can build the same header twice.
//!
//! This module only computes bytes; the caller writes them, and the order of the writes is
//! what keeps a key safe across a crash (see [`LuksHeader::store_key`] and
//! [`LuksHeader::erase_key`]).

use crate::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg};
use crate::hash::{af_split, HashAlg};
use crate::luks::{
    LuksError, LuksHeader, LuksKeySlot, HEADER_SECTORS, LUKS_DIGEST_LEN, LUKS_KEY_SLOT_DISABLED,
    LUKS_KEY_SLOT_ENABLED, LUKS_NUM_KEY_SLOTS, LUKS_SECTOR_SIZE, LUKS_STRIPES,
};
use zeroize::Zeroizing;

/// QEMU's default `iter-time`: two seconds of PBKDF2 per key slot.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;
/// Fewest PBKDF2 iterations of a key slot (QEMU's `MIN_SLOT_KEY_ITERS`).
pub const MIN_SLOT_ITERATIONS: u64 = 1000;
/// Fewest PBKDF2 iterations of the master key digest (`MIN_MASTER_KEY_ITERS`).
pub const MIN_DIGEST_ITERATIONS: u64 = 1000;
/// How often an erased slot's material is overwritten with random bytes (QEMU's
/// `QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS`).
pub const ERASE_PASSES: usize = 40;
/// Bytes of a key slot's salt and of the master key digest's salt.
const SALT_LEN: usize = 32;

/// Where random bytes come from (salts, master keys, anti-forensic stripes, UUIDs).
pub trait RandomSource {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), LuksError>;
}

/// The operating system's generator (`getrandom`), as QEMU's `qcrypto_random_bytes`.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsRandom;

impl RandomSource for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), LuksError> {
        getrandom::fill(buf).map_err(|e| LuksError::Random {
            reason: e.to_string(),
        })
    }
}

/// A deterministic generator (SplitMix64) for tests: the same seed gives the same header.
/// Not random; never use it for real keys.
#[derive(Debug, Clone)]
pub struct SeededRandom(u64);

impl SeededRandom {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> SeededRandom {
        SeededRandom(seed)
    }
}

impl RandomSource for SeededRandom {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), LuksError> {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        Ok(())
    }
}

/// How many PBKDF2 iterations per second this machine does (QEMU's
/// `qcrypto_pbkdf2_count_iters`), for a derivation of `out_len` bytes from `key` and
/// `salt`: the iteration counts of a new key slot and digest are this rate times the
/// `iter-time`.
pub trait PbkdfBench {
    /// Iterations per second.
    fn iterations_per_second(
        &mut self,
        hash: HashAlg,
        key: &[u8],
        salt: &[u8],
        out_len: usize,
    ) -> Result<u64, LuksError>;
}

/// A fixed rate (tests; or a caller that benchmarked once already).
#[derive(Debug, Clone, Copy)]
pub struct FixedBench(pub u64);

impl PbkdfBench for FixedBench {
    fn iterations_per_second(
        &mut self,
        _: HashAlg,
        _: &[u8],
        _: &[u8],
        _: usize,
    ) -> Result<u64, LuksError> {
        Ok(self.0)
    }
}

/// QEMU's benchmark: on a fresh thread, PBKDF2 runs of growing iteration counts (from
/// 2^15; times ten while a run takes under 100 ms of the thread's CPU time, rescaled to
/// one second otherwise) until a run takes more than 500 ms; the rate of that run.
/// CPU time is the thread's own (`/proc/thread-self/schedstat`), so other load on the
/// machine does not lower the count; where that file cannot be read, wall time is used.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuTimeBench;

/// The calling thread's CPU time in milliseconds, if the kernel tells it.
fn thread_cpu_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1_000_000)
}

fn bench_on_this_thread(hash: HashAlg, key: &[u8], salt: &[u8], out_len: usize) -> u64 {
    let start_wall = std::time::Instant::now();
    let now_ms = |cpu: bool| {
        if cpu {
            thread_cpu_ms().unwrap_or(0)
        } else {
            start_wall.elapsed().as_millis() as u64
        }
    };
    let cpu = thread_cpu_ms().is_some();
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let mut iterations: u64 = 1 << 15;
    loop {
        let start = now_ms(cpu);
        hash.pbkdf2(
            key,
            salt,
            iterations.min(u64::from(u32::MAX)) as u32,
            &mut out,
        );
        let delta = now_ms(cpu).saturating_sub(start);
        if delta > 500 {
            return iterations.saturating_mul(1000) / delta;
        } else if delta < 100 {
            iterations = iterations.saturating_mul(10);
        } else {
            iterations = iterations.saturating_mul(1000) / delta;
        }
        if iterations >= u64::from(u32::MAX) {
            // Faster than any header can record: the caller's range check reports it.
            return iterations;
        }
    }
}

impl PbkdfBench for CpuTimeBench {
    fn iterations_per_second(
        &mut self,
        hash: HashAlg,
        key: &[u8],
        salt: &[u8],
        out_len: usize,
    ) -> Result<u64, LuksError> {
        // A fresh thread, as QEMU 10 does: its CPU time starts at zero and is its own.
        let key = Zeroizing::new(key.to_vec());
        let salt = salt.to_vec();
        std::thread::scope(|s| {
            s.spawn(|| bench_on_this_thread(hash, &key, &salt, out_len))
                .join()
                .map_err(|_| LuksError::Random {
                    reason: "PBKDF2 benchmark thread failed".into(),
                })
        })
    }
}

/// The iteration count for `iter_time_ms` at `per_second` iterations per second, with
/// QEMU's range errors.
fn scale(per_second: u64, iter_time_ms: u64) -> Result<u64, LuksError> {
    per_second
        .checked_mul(iter_time_ms)
        .map(|n| n / 1000)
        .ok_or(LuksError::IterationsTooLargeToScale {
            iterations: per_second,
        })
}

fn fit_u32(iterations: u64) -> Result<u32, LuksError> {
    u32::try_from(iterations).map_err(|_| LuksError::IterationsTooLarge { iterations })
}

/// What `qemu-img create -o encrypt.format=luks,encrypt.*` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksCreateOptions {
    /// `encrypt.cipher-alg` (default aes-256).
    pub cipher_alg: CipherAlg,
    /// `encrypt.cipher-mode` (default xts).
    pub cipher_mode: CipherMode,
    /// `encrypt.ivgen-alg` (default plain64); ESSIV carries its hash.
    pub ivgen: IvGenAlg,
    /// `encrypt.ivgen-hash-alg` as given: written into the mode string after a colon
    /// even for plain and plain64, as QEMU does (and ignored there when read). With
    /// ESSIV it must equal the ESSIV hash (sha256 when not given).
    pub ivgen_hash: Option<HashAlg>,
    /// `encrypt.hash-alg`: PBKDF2, digest and anti-forensic hash (default sha256).
    pub hash: HashAlg,
    /// `encrypt.iter-time` in milliseconds (default 2000).
    pub iter_time_ms: u64,
}

impl Default for LuksCreateOptions {
    fn default() -> Self {
        LuksCreateOptions {
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
            hash: HashAlg::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
        }
    }
}

impl LuksCreateOptions {
    /// The payload cipher these options describe.
    pub fn cipher_spec(&self) -> CipherSpec {
        CipherSpec {
            alg: self.cipher_alg,
            mode: self.cipher_mode,
            ivgen: self.ivgen,
        }
    }

    /// The header's cipher mode string: `xts-plain64`, `cbc-essiv:sha256`, ...
    pub fn mode_string(&self) -> String {
        let base = format!("{}-{}", self.cipher_mode.name(), self.ivgen.name());
        match (self.ivgen, self.ivgen_hash) {
            (IvGenAlg::Essiv(h), _) => format!("{base}:{}", h.name()),
            (_, Some(h)) => format!("{base}:{}", h.name()),
            (_, None) => base,
        }
    }
}

/// A freshly created LUKS volume header area.
pub struct NewLuks {
    /// The header as written.
    pub header: LuksHeader,
    /// The whole area QEMU reserves before the payload (`payload_offset` bytes): the
    /// header, slot 0's material, zeros elsewhere.
    pub area: Vec<u8>,
}

impl std::fmt::Debug for NewLuks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewLuks")
            .field("header", &self.header)
            .field("area_len", &self.area.len())
            .finish()
    }
}

/// A random version-4 UUID in its text form (QEMU's `qemu_uuid_generate`).
fn random_uuid(rng: &mut dyn RandomSource) -> Result<String, LuksError> {
    let mut b = [0u8; 16];
    rng.fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// Sectors of one key slot's material: the stripes rounded up to sectors, then to the
/// header's 4 KiB (cryptsetup's and QEMU's layout).
fn split_key_sectors(key_len: usize) -> u64 {
    let bytes = key_len as u64 * u64::from(LUKS_STRIPES);
    bytes.div_ceil(LUKS_SECTOR_SIZE).div_ceil(HEADER_SECTORS) * HEADER_SECTORS
}

/// Bytes of the LUKS area a volume with these options takes before its payload (the
/// header, eight key-material slots rounded to 4 KiB): what QEMU reserves in the image
/// and what `qemu-img measure` adds.
pub fn area_len(opts: &LuksCreateOptions) -> u64 {
    let split = split_key_sectors(opts.cipher_spec().key_len());
    (HEADER_SECTORS + LUKS_NUM_KEY_SLOTS as u64 * split) * LUKS_SECTOR_SIZE
}

/// Creates a LUKS1 header with slot 0 holding a new random master key under `password`,
/// laid out as QEMU lays it out: key material from 4 KiB on, each slot's area rounded to
/// 4 KiB, the payload after slot 7. Iteration counts: the benchmarked rate times
/// `iter_time` (slot) and an eighth of that (digest), at least 1000 each.
pub fn create(
    opts: &LuksCreateOptions,
    password: &[u8],
    rng: &mut dyn RandomSource,
    bench: &mut dyn PbkdfBench,
) -> Result<NewLuks, LuksError> {
    let spec = opts.cipher_spec();
    if let IvGenAlg::Essiv(h) = opts.ivgen {
        if CipherAlg::aes_for_key(h.digest_len()).is_none() {
            return Err(LuksError::EssivKeySize {
                digest_len: h.digest_len(),
            });
        }
    }
    let key_len = spec.key_len();
    let uuid = random_uuid(rng)?;
    let mut mk_digest_salt = [0u8; SALT_LEN];
    rng.fill(&mut mk_digest_salt)?;
    let mut master_key = Zeroizing::new(vec![0u8; key_len]);
    rng.fill(&mut master_key)?;

    let per_second =
        bench.iterations_per_second(opts.hash, &master_key, &mk_digest_salt, LUKS_DIGEST_LEN)?;
    // QEMU (after cryptsetup): an eighth, so that eight slots take one iter-time to try.
    let digest_iters =
        fit_u32((scale(per_second, opts.iter_time_ms)? / 8).max(MIN_DIGEST_ITERATIONS))?;
    let mut mk_digest = [0u8; LUKS_DIGEST_LEN];
    opts.hash
        .pbkdf2(&master_key, &mk_digest_salt, digest_iters, &mut mk_digest);

    let split = split_key_sectors(key_len);
    let key_slots = (0..LUKS_NUM_KEY_SLOTS as u64)
        .map(|i| LuksKeySlot {
            active: LUKS_KEY_SLOT_DISABLED,
            iterations: 0,
            salt: [0u8; SALT_LEN],
            // At most 8 + 8 * 1000 sectors for 64-byte keys: fits.
            key_offset_sector: (HEADER_SECTORS + i * split) as u32,
            stripes: LUKS_STRIPES,
        })
        .collect();
    let payload_offset_sector = HEADER_SECTORS + LUKS_NUM_KEY_SLOTS as u64 * split;
    let mut header = LuksHeader {
        version: 1,
        cipher_name: "aes".into(),
        cipher_mode: opts.mode_string(),
        hash_spec: opts.hash.name().into(),
        payload_offset_sector: payload_offset_sector as u32,
        key_bytes: key_len as u32,
        mk_digest,
        mk_digest_salt,
        mk_digest_iterations: digest_iters,
        uuid,
        key_slots,
    };
    let material = header.store_key(0, password, &master_key, opts.iter_time_ms, rng, bench)?;
    let mut area = vec![0u8; (payload_offset_sector * LUKS_SECTOR_SIZE) as usize];
    let (at, len) = header.slot_material_range(0)?;
    area[at as usize..(at + len) as usize].copy_from_slice(&material);
    area[..crate::luks::LUKS_HEADER_SIZE].copy_from_slice(&header.to_bytes());
    Ok(NewLuks { header, area })
}

impl LuksHeader {
    /// Byte offset (from the start of the header) and length of key slot `slot`'s
    /// anti-forensic material.
    pub fn slot_material_range(&self, slot: usize) -> Result<(u64, u64), LuksError> {
        let s = self
            .key_slots
            .get(slot)
            .ok_or(LuksError::InvalidSlot { slot: slot as i64 })?;
        Ok((
            u64::from(s.key_offset_sector) * LUKS_SECTOR_SIZE,
            u64::from(self.key_bytes) * u64::from(s.stripes),
        ))
    }

    /// Index of the first inactive key slot.
    pub fn free_slot(&self) -> Option<usize> {
        self.key_slots.iter().position(|s| !s.is_active())
    }

    /// Number of active key slots.
    pub fn active_slots(&self) -> usize {
        self.key_slots.iter().filter(|s| s.is_active()).count()
    }

    /// Puts `master_key` into key slot `slot` under `password` (QEMU's
    /// `qcrypto_block_luks_store_key`): a new random salt, iterations from the benchmark
    /// times `iter_time_ms` (at least 1000), the key split into 4000 anti-forensic stripes
    /// and encrypted with the PBKDF2 key. The header (in memory) marks the slot active;
    /// the returned material belongs at [`LuksHeader::slot_material_range`].
    ///
    /// Crash safety is the caller's write order: the material first and durable, then the
    /// header. Into an inactive slot, a crash in between leaves the old header (slot still
    /// inactive), so no working key is ever lost.
    pub fn store_key(
        &mut self,
        slot: usize,
        password: &[u8],
        master_key: &[u8],
        iter_time_ms: u64,
        rng: &mut dyn RandomSource,
        bench: &mut dyn PbkdfBench,
    ) -> Result<Zeroizing<Vec<u8>>, LuksError> {
        let spec = self.cipher_spec()?;
        let hash = self.hash_alg()?;
        let key_len = spec.key_len();
        if master_key.len() != key_len {
            return Err(LuksError::KeyLength {
                key_bytes: master_key.len() as u32,
                cipher: self.cipher_name.clone(),
                mode: self.cipher_mode.clone(),
            });
        }
        let stripes = self
            .key_slots
            .get(slot)
            .ok_or(LuksError::InvalidSlot { slot: slot as i64 })?
            .stripes;
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt)?;
        let per_second = bench.iterations_per_second(hash, password, &salt, key_len)?;
        let iterations = fit_u32(scale(per_second, iter_time_ms)?.max(MIN_SLOT_ITERATIONS))?;
        let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
        hash.pbkdf2(password, &salt, iterations, &mut slot_key);
        // Bounded: stripes <= MAX_STRIPES (checked headers) and key_len <= 64.
        let split_len = key_len * stripes as usize;
        let mut random = Zeroizing::new(vec![0u8; split_len - key_len]);
        rng.fill(&mut random)?;
        let mut material = Zeroizing::new(vec![0u8; split_len]);
        af_split(hash, stripes, master_key, &random, &mut material).map_err(|e| {
            LuksError::Read {
                reason: e.to_string(),
            }
        })?;
        spec.new_cipher(&slot_key)?.encrypt(0, &mut material)?;
        let s = &mut self.key_slots[slot];
        s.salt = salt;
        s.iterations = iterations;
        s.active = LUKS_KEY_SLOT_ENABLED;
        Ok(material)
    }

    /// Marks key slot `slot` inactive in the header (in memory; QEMU's
    /// `qcrypto_block_luks_erase_key`): salt and iterations zeroed.
    ///
    /// Crash safety is the caller's write order: the header first and durable, then the
    /// old material overwritten ([`ERASE_PASSES`] passes of random bytes).
    pub fn erase_key(&mut self, slot: usize) -> Result<(), LuksError> {
        let s = self
            .key_slots
            .get_mut(slot)
            .ok_or(LuksError::InvalidSlot { slot: slot as i64 })?;
        s.salt = [0u8; SALT_LEN];
        s.iterations = 0;
        s.active = LUKS_KEY_SLOT_DISABLED;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luks::LUKS_HEADER_SIZE;

    fn read_from(area: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<(), LuksError> + '_ {
        move |off: u64, buf: &mut [u8]| {
            let off = off as usize;
            let src = area.get(off..off + buf.len()).ok_or(LuksError::Read {
                reason: "outside".into(),
            })?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn opts(alg: CipherAlg, mode: CipherMode, ivgen: IvGenAlg, hash: HashAlg) -> LuksCreateOptions {
        LuksCreateOptions {
            cipher_alg: alg,
            cipher_mode: mode,
            ivgen,
            ivgen_hash: None,
            hash,
            iter_time_ms: 10,
        }
    }

    /// QEMU's layout for each key size: slot areas of 4000 stripes rounded to 4 KiB, the
    /// payload after slot 7 (the offsets `qemu-img info` shows for qemu-img's images).
    #[test]
    fn layout_as_qemu() {
        for (alg, mode, slot_bytes, payload) in [
            (CipherAlg::Aes256, CipherMode::Xts, 258048u64, 2068480u64),
            (CipherAlg::Aes128, CipherMode::Cbc, 65536, 528384),
            (CipherAlg::Aes128, CipherMode::Xts, 131072, 1052672),
        ] {
            let o = opts(alg, mode, IvGenAlg::Plain64, HashAlg::Sha256);
            let n = create(
                &o,
                b"pw",
                &mut SeededRandom::new(1),
                &mut FixedBench(100_000),
            )
            .unwrap();
            assert_eq!(n.area.len() as u64, payload, "{alg:?} {mode:?}");
            assert_eq!(area_len(&o), payload);
            assert_eq!(u64::from(n.header.payload_offset_sector) * 512, payload);
            for (i, s) in n.header.key_slots.iter().enumerate() {
                assert_eq!(
                    u64::from(s.key_offset_sector) * 512,
                    4096 + i as u64 * slot_bytes
                );
                assert_eq!(s.stripes, 4000);
                assert_eq!(s.is_active(), i == 0);
            }
            n.header.check().unwrap();
            assert_eq!(LuksHeader::parse(&n.area).unwrap(), n.header);
        }
    }

    #[test]
    fn created_headers_unlock_in_every_mode() {
        for (alg, mode, ivgen) in [
            (CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64),
            (CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain),
            (
                CipherAlg::Aes192,
                CipherMode::Cbc,
                IvGenAlg::Essiv(HashAlg::Sha256),
            ),
            (
                CipherAlg::Aes128,
                CipherMode::Cbc,
                IvGenAlg::Essiv(HashAlg::Sha256),
            ),
        ] {
            for hash in [
                HashAlg::Sha1,
                HashAlg::Sha256,
                HashAlg::Sha512,
                HashAlg::Sha384,
            ] {
                let o = opts(alg, mode, ivgen, hash);
                let n = create(&o, b"secret", &mut OsRandom, &mut FixedBench(2000)).unwrap();
                let h = LuksHeader::parse(&n.area).unwrap();
                assert_eq!(h.hash_spec, hash.name());
                let mut read = read_from(&n.area);
                assert!(h.master_key(b"secret", &mut read).is_ok(), "{o:?}");
                assert_eq!(
                    h.master_key(b"Secret", &mut read).err(),
                    Some(LuksError::InvalidPassword)
                );
            }
        }
    }

    /// Iteration counts as QEMU scales them: slot = rate * ms / 1000, digest an eighth,
    /// both at least 1000; the digest is PBKDF2 of the master key.
    #[test]
    fn iterations_and_digest() {
        let o = LuksCreateOptions {
            iter_time_ms: 50,
            ..LuksCreateOptions::default()
        };
        let n = create(
            &o,
            b"pw",
            &mut SeededRandom::new(7),
            &mut FixedBench(400_000),
        )
        .unwrap();
        assert_eq!(n.header.key_slots[0].iterations, 20_000);
        assert_eq!(n.header.mk_digest_iterations, 2_500);
        let n = create(&o, b"pw", &mut SeededRandom::new(7), &mut FixedBench(10)).unwrap();
        assert_eq!(n.header.key_slots[0].iterations, 1000);
        assert_eq!(n.header.mk_digest_iterations, 1000);
        let mut read = read_from(&n.area);
        let mk = n.header.master_key(b"pw", &mut read).unwrap();
        let mut d = [0u8; 20];
        HashAlg::Sha256.pbkdf2(&mk, &n.header.mk_digest_salt, 1000, &mut d);
        assert_eq!(d, n.header.mk_digest);
        // Out of range: QEMU's errors, nothing created.
        assert!(matches!(
            create(
                &o,
                b"pw",
                &mut SeededRandom::new(7),
                &mut FixedBench(u64::MAX)
            ),
            Err(LuksError::IterationsTooLargeToScale { .. })
        ));
        assert!(matches!(
            create(
                &o,
                b"pw",
                &mut SeededRandom::new(7),
                &mut FixedBench(1 << 40)
            ),
            Err(LuksError::IterationsTooLarge { .. })
        ));
    }

    /// The seam is deterministic: the same seed and rate give the same bytes; another
    /// seed another salt, key and UUID.
    #[test]
    fn seeded_creation_is_reproducible() {
        let o = LuksCreateOptions {
            iter_time_ms: 1,
            ..LuksCreateOptions::default()
        };
        let a = create(&o, b"pw", &mut SeededRandom::new(3), &mut FixedBench(1)).unwrap();
        let b = create(&o, b"pw", &mut SeededRandom::new(3), &mut FixedBench(1)).unwrap();
        let c = create(&o, b"pw", &mut SeededRandom::new(4), &mut FixedBench(1)).unwrap();
        assert!(a.area == b.area);
        assert!(a.area != c.area);
        assert_ne!(a.header.uuid, c.header.uuid);
        let u = &a.header.uuid;
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn mode_strings() {
        let mut o = LuksCreateOptions::default();
        assert_eq!(o.mode_string(), "xts-plain64");
        o.ivgen_hash = Some(HashAlg::Sha1);
        assert_eq!(o.mode_string(), "xts-plain64:sha1");
        o.cipher_mode = CipherMode::Cbc;
        o.ivgen = IvGenAlg::Essiv(HashAlg::Sha256);
        o.ivgen_hash = None;
        assert_eq!(o.mode_string(), "cbc-essiv:sha256");
        o.ivgen = IvGenAlg::Essiv(HashAlg::Sha512);
        assert_eq!(
            create(&o, b"pw", &mut OsRandom, &mut FixedBench(1)).err(),
            Some(LuksError::EssivKeySize { digest_len: 64 })
        );
    }

    /// Adding a second slot and erasing the first: each password opens exactly while its
    /// slot is active; other slots' bytes are untouched by a store.
    #[test]
    fn store_and_erase_slots() {
        let o = LuksCreateOptions {
            iter_time_ms: 1,
            ..LuksCreateOptions::default()
        };
        let mut n = create(&o, b"one", &mut OsRandom, &mut FixedBench(1)).unwrap();
        let mk = n
            .header
            .master_key(b"one", &mut read_from(&n.area))
            .unwrap();
        assert_eq!(n.header.free_slot(), Some(1));
        let before = n.area.clone();
        let m = n
            .header
            .store_key(1, b"two", &mk, 1, &mut OsRandom, &mut FixedBench(1))
            .unwrap();
        let (at, len) = n.header.slot_material_range(1).unwrap();
        n.area[at as usize..(at + len) as usize].copy_from_slice(&m);
        // Before the header is written, the old header still opens with "one" only.
        let old = LuksHeader::parse(&before).unwrap();
        assert!(old.master_key(b"one", &mut read_from(&n.area)).is_ok());
        assert!(old.master_key(b"two", &mut read_from(&n.area)).is_err());
        n.area[..LUKS_HEADER_SIZE].copy_from_slice(&n.header.to_bytes());
        let h = LuksHeader::parse(&n.area).unwrap();
        assert_eq!(h.active_slots(), 2);
        assert_eq!(*h.master_key(b"two", &mut read_from(&n.area)).unwrap(), *mk);
        assert_eq!(
            h.load_key(0, b"two", &mut read_from(&n.area)).unwrap(),
            None
        );
        // Slot 0's material is unchanged by the store into slot 1.
        let (a0, l0) = h.slot_material_range(0).unwrap();
        assert_eq!(
            before[a0 as usize..(a0 + l0) as usize],
            n.area[a0 as usize..(a0 + l0) as usize]
        );
        n.header.erase_key(0).unwrap();
        n.area[..LUKS_HEADER_SIZE].copy_from_slice(&n.header.to_bytes());
        let h = LuksHeader::parse(&n.area).unwrap();
        assert_eq!(h.active_slots(), 1);
        assert!(!h.key_slots[0].is_active());
        assert_eq!(h.key_slots[0].iterations, 0);
        assert_eq!(h.key_slots[0].salt, [0u8; 32]);
        assert_eq!(
            h.master_key(b"one", &mut read_from(&n.area)).err(),
            Some(LuksError::InvalidPassword)
        );
        assert!(h.master_key(b"two", &mut read_from(&n.area)).is_ok());
        assert!(n.header.erase_key(8).is_err());
        assert!(n
            .header
            .store_key(9, b"x", &mk, 1, &mut OsRandom, &mut FixedBench(1))
            .is_err());
    }

    /// The real benchmark returns a plausible positive rate (no timing assertion).
    #[test]
    fn cpu_bench_runs() {
        let r = CpuTimeBench
            .iterations_per_second(HashAlg::Sha1, b"pw", &[1u8; 32], 20)
            .unwrap();
        assert!(r > 0);
    }
}
