//! Encrypted images (LUKS inside qcow2, `crypt_method` 2): unlocking at open and moving
//! encrypted guest data.
//!
//! The LUKS header and key material live at the full-disk-encryption header extension's
//! offset (refcounted clusters; the checker counts them, the overlap check guards them as
//! part of the image header). Guest data in data clusters is encrypted per 512-byte sector
//! with the sector number `host offset / 512` (QEMU's `crypt_physical_offset`), so data
//! that moves to another host cluster (copy-on-write) is decrypted and re-encrypted.
//! Zero and unallocated clusters read as zeros without decryption. Compressed clusters are
//! stored unencrypted by QEMU (it writes them so); they are read as QEMU reads them, and
//! compressed writes to encrypted images are refused here.

use crate::error::{ImageError, Op, Result};
use crate::options::OpenOptions;
use qcow2_crypto::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg};
use qcow2_crypto::luks::{LuksError, LuksHeader, LUKS_HEADER_SIZE};
use qcow2_crypto::SectorCipher;
use qcow2_format::extensions::{CryptoHeaderExtension, FirstCluster};
use qcow2_io::errno::{EINVAL, EIO};
use qcow2_io::Storage;
use std::io;
use std::sync::Arc;

/// Bytes of one encryption sector.
pub(crate) const SECTOR: u64 = 512;

fn refused(message: String) -> ImageError {
    ImageError::Refused {
        op: Op::Open,
        message,
        hint: None,
        errno: EINVAL,
    }
}

/// Reads the LUKS header named by the crypto header extension and recovers the master key
/// with [`OpenOptions::key_secret`]; QEMU's messages when the secret is missing or wrong.
/// Reads only.
pub(crate) fn unlock(
    storage: &dyn Storage,
    fc: &FirstCluster,
    opts: &OpenOptions,
) -> Result<Arc<dyn SectorCipher>> {
    // `open_first_cluster` refuses crypt_method 2 without the extension; be safe anyway.
    let ext = fc
        .extensions
        .crypto_header
        .ok_or_else(|| refused("Missing CRYPTO header for crypt method 2".into()))?;
    // QEMU's LUKS driver asks for the secret before it reads anything.
    let Some(secret) = &opts.key_secret else {
        return Err(refused(
            "Parameter 'encrypt.key-secret' is required for cipher".into(),
        ));
    };
    let mut read = |off: u64, buf: &mut [u8]| read_area(storage, &ext, off, buf);
    let mut hdr = vec![0u8; LUKS_HEADER_SIZE];
    read(0, &mut hdr).map_err(|e| refused(e.to_string()))?;
    let header = LuksHeader::parse(&hdr).map_err(|e| refused(e.to_string()))?;
    header.check().map_err(|e| refused(e.to_string()))?;
    let cipher = header
        .unlock(secret.as_bytes(), &mut read)
        .map_err(|e| refused(e.to_string()))?;
    Ok(Arc::from(cipher))
}

/// The payload cipher of a legacy AES image (`crypt_method` 1, QEMU's "qcow" encryption
/// format): AES-128-CBC with plain64 IVs, keyed directly with the passphrase's bytes up to
/// its first NUL, cut or zero-padded to 16 bytes. There is nothing to verify the key
/// against: a wrong passphrase reads garbage, as in QEMU. The IV sector is the **guest**
/// offset / 512 (QEMU's `crypt_physical_offset` is false for this format).
pub(crate) fn legacy_aes(opts: &OpenOptions) -> Result<Arc<dyn SectorCipher>> {
    let Some(secret) = &opts.key_secret else {
        return Err(refused(
            "Parameter 'encrypt.key-secret' is required for cipher".into(),
        ));
    };
    let pw = secret.as_bytes();
    let pw = &pw[..pw.iter().position(|&b| b == 0).unwrap_or(pw.len())];
    let mut bytes = vec![0u8; 16];
    let n = pw.len().min(16);
    bytes[..n].copy_from_slice(&pw[..n]);
    // Zeroized when dropped.
    let key = qcow2_crypto::Secret::new(bytes);
    let spec = CipherSpec {
        alg: CipherAlg::Aes128,
        mode: CipherMode::Cbc,
        ivgen: IvGenAlg::Plain64,
    };
    let cipher = spec
        .new_cipher(key.as_bytes())
        .map_err(|e| refused(e.to_string()))?;
    Ok(Arc::from(cipher))
}

/// Reads `buf.len()` bytes at `off` of the LUKS area the extension names (QEMU's
/// `qcow2_crypto_hdr_read_func`: reads stay inside the extension's area).
pub(crate) fn read_area(
    storage: &dyn Storage,
    ext: &CryptoHeaderExtension,
    off: u64,
    buf: &mut [u8],
) -> std::result::Result<(), LuksError> {
    let at = area_offset(ext, off, buf.len())?;
    storage.read_at(buf, at).map_err(|e| LuksError::Read {
        reason: format!(
            "Could not read encryption header: {}",
            crate::image::strerror(e.raw_os_error().unwrap_or(EIO))
        ),
    })
}

/// The file offset of `[off, off + len)` of the LUKS area, refused outside the extension's
/// area.
pub(crate) fn area_offset(
    ext: &CryptoHeaderExtension,
    off: u64,
    len: usize,
) -> std::result::Result<u64, LuksError> {
    let outside = || LuksError::Read {
        reason: "Request for data outside of extension header".into(),
    };
    let end = off.checked_add(len as u64).ok_or_else(outside)?;
    if end > ext.length {
        return Err(outside());
    }
    ext.offset.checked_add(off).ok_or_else(outside)
}

impl crate::Image {
    /// Stores a LUKS area in newly allocated clusters (zero-padded to whole clusters) and
    /// makes the image an encrypted one (`crypt_method` 2 and the header extension), as
    /// QEMU's `qcow2_set_up_encryption` does on an image it has just created. The clusters'
    /// refcounts and the area are durable before the header names them; the caller
    /// reopens the image with the secret.
    pub(crate) fn place_luks_area(&mut self, op: crate::Op, area: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let len = area.len() as u64;
        let n = len.div_ceil(cs);
        let at = match self.engine.alloc_clusters(&mut self.caches, n) {
            Ok(o) => o,
            Err(e) => return Err(self.rc_err(op, e)),
        };
        let mut bytes = area.to_vec();
        // n clusters hold len bytes: padding only.
        bytes.resize((n * cs) as usize, 0);
        let io = |e| ImageError::io(op, "write LUKS header", at, e);
        self.storage.write_at(&bytes, at).map_err(io)?;
        self.flush_caches(op, true)?;
        self.storage.flush().map_err(io)?;
        self.fc.header.crypt_method = qcow2_format::header::CRYPT_LUKS;
        self.fc.extensions.crypto_header = Some(CryptoHeaderExtension {
            offset: at,
            length: len,
        });
        self.rewrite_header(op)
    }
}

fn cipher_err(e: qcow2_crypto::CipherError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

/// Whether `[offset, offset + len)` starts and ends on sector boundaries.
pub(crate) fn sector_aligned(offset: u64, len: u64) -> bool {
    offset % SECTOR == 0 && len % SECTOR == 0
}

/// Reads `dst.len()` guest bytes stored at `host`: the whole sectors around them are read
/// and decrypted with IVs counted from `iv_offset` (the offset of `dst`'s first byte for
/// the IVs: the host offset for LUKS, the guest offset for legacy AES; both lie at the same
/// place within a sector), `dst` gets its part.
pub(crate) fn read_decrypted(
    storage: &dyn Storage,
    cipher: &dyn SectorCipher,
    host: u64,
    iv_offset: u64,
    dst: &mut [u8],
) -> io::Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    let start = host / SECTOR * SECTOR;
    let end = (host + dst.len() as u64).div_ceil(SECTOR) * SECTOR;
    let iv_start = iv_offset / SECTOR;
    if start == host && end == host + dst.len() as u64 {
        storage.read_at(dst, host)?;
        return cipher.decrypt(iv_start, dst).map_err(cipher_err);
    }
    let mut buf = vec![0u8; (end - start) as usize];
    storage.read_at(&mut buf, start)?;
    cipher.decrypt(iv_start, &mut buf).map_err(cipher_err)?;
    let at = (host - start) as usize;
    dst.copy_from_slice(&buf[at..at + dst.len()]);
    Ok(())
}

/// `data` encrypted with IVs counted from `iv_offset` (the host offset for LUKS, the
/// guest offset for legacy AES; both whole sectors).
pub(crate) fn encrypted(
    cipher: &dyn SectorCipher,
    iv_offset: u64,
    data: &[u8],
) -> io::Result<Vec<u8>> {
    if iv_offset % SECTOR != 0 || data.len() as u64 % SECTOR != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "encrypted write of {} bytes at {iv_offset:#x} is not sector aligned",
                data.len()
            ),
        ));
    }
    let mut buf = data.to_vec();
    cipher
        .encrypt(iv_offset / SECTOR, &mut buf)
        .map_err(cipher_err)?;
    Ok(buf)
}
