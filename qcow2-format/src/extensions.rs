//! Header extensions: parsing (with QEMU's per-extension validation) and serialization in
//! the order QEMU's `qcow2_update_header` writes them, plus [`FirstCluster`], the whole
//! first cluster (header, extensions, backing file name) as one value.
//!
//! Layout: directly after the header (at `header_length`) up to `backing_file_offset` (or
//! the end of the first cluster); each extension is `be32 type, be32 length, data`, padded
//! with zeros to a multiple of 8; type 0 ends the list.

use crate::features::{
    self, FeatureNameEntry, FEATURE_ENTRY_SIZE, INCOMPAT_DATA_FILE, INCOMPAT_MASK,
};
use crate::header::{Header, CRYPT_LUKS, V3_HEADER_SIZE};
use crate::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};

/// End of the extension list.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature-name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full-disk-encryption (LUKS) header pointer.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// QEMU keeps the backing format in a 16-byte buffer, so names must be shorter.
pub const BACKING_FORMAT_BUF: u32 = 16;
/// Size of the bitmaps extension's data.
pub const BITMAPS_EXT_SIZE: u32 = 24;
/// Size of the encryption header pointer extension's data.
pub const CRYPTO_EXT_SIZE: u32 = 16;

/// Why the extension area is invalid. Messages equal QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtensionError {
    /// An extension header or its data crosses the end of the extension area.
    #[error("Header extension too large")]
    TooLarge {
        /// Offset of the extension's header.
        offset: u64,
        /// Its type.
        magic: u32,
        /// Its declared data length.
        length: u32,
        /// End of the extension area.
        end: u64,
    },
    /// The backing format name does not fit QEMU's 16-byte buffer.
    #[error("ERROR: ext_backing_format: len={length} too large (>=16)")]
    BackingFormatTooLong {
        /// Declared length.
        length: u32,
    },
    /// An encryption header pointer in an image that is not LUKS encrypted.
    #[error("CRYPTO header extension only expected with LUKS encryption method")]
    CryptoWithoutLuks {
        /// The header's `crypt_method`.
        crypt_method: u32,
    },
    /// Encryption header pointer extension of the wrong size.
    #[error("CRYPTO header extension size {length}, but expected size 16")]
    CryptoHeaderSize {
        /// Declared length.
        length: u32,
    },
    /// Encryption header not cluster aligned.
    #[error(
        "Encryption header offset '{offset}' is not a multiple of cluster size '{cluster_size}'"
    )]
    CryptoHeaderUnaligned {
        /// The offset found.
        offset: u64,
        /// The image's cluster size.
        cluster_size: u64,
    },
    /// Bitmaps extension of the wrong size.
    #[error("bitmaps_ext: Invalid extension length")]
    BitmapsLength {
        /// Declared length.
        length: u32,
    },
    /// Bitmaps extension with a nonzero reserved field.
    #[error("bitmaps_ext: Reserved field is not zero")]
    BitmapsReserved {
        /// The reserved field.
        reserved: u32,
    },
    /// More bitmaps than QEMU supports.
    #[error("bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU supported maximum of 65535")]
    TooManyBitmaps {
        /// The count found.
        nb_bitmaps: u32,
    },
    /// A bitmaps extension that lists no bitmap.
    #[error("found bitmaps extension with zero bitmaps")]
    ZeroBitmaps,
    /// Bitmap directory not cluster aligned.
    #[error("bitmaps_ext: invalid bitmap directory offset")]
    BitmapDirectoryUnaligned {
        /// The offset found.
        offset: u64,
    },
    /// Bitmap directory larger than QEMU supports.
    #[error(
        "bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size (67107840)"
    )]
    BitmapDirectoryTooLarge {
        /// The size found.
        size: u64,
    },
    /// A known extension type appears twice. The specification forbids it; QEMU silently
    /// lets the last one win, this parser refuses the image.
    #[error("Duplicate header extension {magic:#010x} at offset {offset}")]
    Duplicate {
        /// The extension type.
        magic: u32,
        /// Offset of the second occurrence.
        offset: u64,
    },
}

/// Why a first cluster cannot be serialized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerializeError {
    /// Header, extensions and backing file name do not fit in one cluster (QEMU: ENOSPC).
    #[error(
        "header, extensions and backing file name need {needed} bytes, cluster has {cluster_size}"
    )]
    NoSpace {
        /// Bytes needed.
        needed: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The backing file name is longer than 1023 bytes.
    #[error("Backing file name too long")]
    BackingFileNameTooLong {
        /// Its length.
        length: usize,
    },
    /// An extension's data is longer than a 32-bit length can say.
    #[error("header extension {magic:#010x} of {length} bytes is too long")]
    ExtensionTooLong {
        /// The extension type.
        magic: u32,
        /// Its data length.
        length: usize,
    },
}

/// The bitmaps extension's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory (1..=65535).
    pub nb_bitmaps: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory (cluster aligned).
    pub directory_offset: u64,
}

impl BitmapsExtension {
    fn to_bytes(self) -> [u8; BITMAPS_EXT_SIZE as usize] {
        let mut out = [0u8; BITMAPS_EXT_SIZE as usize];
        out[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        out[4..8].copy_from_slice(&self.reserved.to_be_bytes());
        out[8..16].copy_from_slice(&self.directory_size.to_be_bytes());
        out[16..24].copy_from_slice(&self.directory_offset.to_be_bytes());
        out
    }
}

/// The full-disk-encryption header pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CryptoHeaderExtension {
    /// Offset of the LUKS header (cluster aligned).
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
}

/// An extension this crate does not interpret, kept to be written back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnknownExtension {
    /// The extension type.
    pub magic: u32,
    /// Its data, without padding.
    pub data: Vec<u8>,
}

/// All header extensions of an image.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Extensions {
    /// Backing file format name (raw bytes, shorter than 16).
    pub backing_format: Option<Vec<u8>>,
    /// The feature-name table as stored (informational: QEMU writes its own on rewrite).
    pub feature_table: Option<Vec<FeatureNameEntry>>,
    /// Persistent bitmaps, if present and consistent (autoclear bit 0 set).
    pub bitmaps: Option<BitmapsExtension>,
    /// A bitmaps extension was present without autoclear bit 0: a program without bitmap
    /// support modified the image, so QEMU ignores the bitmaps and drops the extension on
    /// the next header rewrite.
    pub stale_bitmaps: bool,
    /// Full-disk-encryption header pointer.
    pub crypto_header: Option<CryptoHeaderExtension>,
    /// External data file name (raw bytes).
    pub data_file: Option<Vec<u8>>,
    /// Unknown extensions in the order they appear in the image.
    pub unknown: Vec<UnknownExtension>,
}

/// The first cluster of an image: header, extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FirstCluster {
    /// The header.
    pub header: Header,
    /// The header extensions.
    pub extensions: Extensions,
    /// The backing file name (raw bytes), if any.
    pub backing_file: Option<Vec<u8>>,
}

/// Reads a big-endian u32 at `off` of `buf`, if in bounds.
fn be32(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// Reads a big-endian u64 at `off` of `buf`, if in bounds.
fn be64(buf: &[u8], off: usize) -> Option<u64> {
    let b = buf.get(off..off.checked_add(8)?)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

impl Extensions {
    /// Parses the extension area of `first_cluster` (from `header_length` to
    /// [`Header::extensions_end`]) with QEMU's checks, in QEMU's order.
    ///
    /// Bytes beyond the end of `first_cluster` read as zero (an end marker).
    pub fn parse(first_cluster: &[u8], header: &Header) -> Result<Self, ExtensionError> {
        let mut ext = Self::default();
        parse_into(first_cluster, header, &mut ext).map(|()| ext)
    }

    /// Serializes the extensions in QEMU's order (backing format, data file name,
    /// encryption pointer, feature table, bitmaps, unknown in stored order) followed by the
    /// end marker. This is the exact inverse of [`Extensions::parse`]; see
    /// [`FirstCluster::to_bytes`] for what QEMU writes on a header rewrite.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SerializeError> {
        let mut out = Vec::new();
        if let Some(f) = &self.backing_format {
            push_extension(&mut out, EXT_BACKING_FORMAT, f)?;
        }
        if let Some(d) = &self.data_file {
            push_extension(&mut out, EXT_DATA_FILE, d)?;
        }
        if let Some(c) = &self.crypto_header {
            push_extension(&mut out, EXT_CRYPTO_HEADER, &crypto_bytes(c))?;
        }
        if let Some(t) = &self.feature_table {
            push_extension(&mut out, EXT_FEATURE_TABLE, &feature_table_bytes(t))?;
        }
        if let Some(b) = &self.bitmaps {
            push_extension(&mut out, EXT_BITMAPS, &b.to_bytes())?;
        }
        for u in &self.unknown {
            push_extension(&mut out, u.magic, &u.data)?;
        }
        push_extension(&mut out, EXT_END, &[])?;
        Ok(out)
    }
}

fn crypto_bytes(c: &CryptoHeaderExtension) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&c.offset.to_be_bytes());
    out[8..].copy_from_slice(&c.length.to_be_bytes());
    out
}

fn feature_table_bytes(t: &[FeatureNameEntry]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_bytes()).collect()
}

/// Appends one extension (QEMU's `header_ext_add`): type, length, data, zero padding to 8.
pub fn push_extension(out: &mut Vec<u8>, magic: u32, data: &[u8]) -> Result<(), SerializeError> {
    let len = u32::try_from(data.len()).map_err(|_| SerializeError::ExtensionTooLong {
        magic,
        length: data.len(),
    })?;
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    let pad = (8 - data.len() % 8) % 8;
    out.resize(out.len() + pad, 0);
    Ok(())
}

/// The walk of QEMU's `qcow2_read_extensions`; fills `ext` as it goes so that a caller that
/// ignores the error (as QEMU does when naming unsupported features) keeps what was read.
fn parse_into(buf: &[u8], header: &Header, ext: &mut Extensions) -> Result<(), ExtensionError> {
    let cluster_size = header.cluster_size();
    let end = header.extensions_end();
    let mut offset = u64::from(header.header_length);
    let read = |off: u64, len: u64| -> Vec<u8> {
        // In bounds of the extension area (<= cluster size); zero beyond `buf`.
        let start = off as usize;
        let mut v: Vec<u8> = buf
            .get(start..)
            .unwrap_or(&[])
            .iter()
            .take(len as usize)
            .copied()
            .collect();
        v.resize(len as usize, 0);
        v
    };
    let mut seen: Vec<u32> = Vec::new();
    while offset < end {
        let hdr_at = offset;
        let head = read(offset, 8);
        let magic = be32(&head, 0).unwrap_or(0);
        let length = be32(&head, 4).unwrap_or(0);
        offset += 8;
        if offset > end || u64::from(length) > end - offset {
            return Err(ExtensionError::TooLarge {
                offset: hdr_at,
                magic,
                length,
                end,
            });
        }
        if magic == EXT_END {
            return Ok(());
        }
        let known = matches!(
            magic,
            EXT_BACKING_FORMAT
                | EXT_FEATURE_TABLE
                | EXT_BITMAPS
                | EXT_CRYPTO_HEADER
                | EXT_DATA_FILE
        );
        if known {
            if seen.contains(&magic) {
                return Err(ExtensionError::Duplicate {
                    magic,
                    offset: hdr_at,
                });
            }
            seen.push(magic);
        }
        match magic {
            EXT_BACKING_FORMAT => {
                if length >= BACKING_FORMAT_BUF {
                    return Err(ExtensionError::BackingFormatTooLong { length });
                }
                ext.backing_format = Some(read(offset, u64::from(length)));
            }
            EXT_FEATURE_TABLE => {
                let data = read(offset, u64::from(length));
                // A partial last entry reads as zero-padded, like QEMU's zeroed buffer.
                let entries = data
                    .chunks(FEATURE_ENTRY_SIZE)
                    .map(|c| {
                        let mut e = [0u8; FEATURE_ENTRY_SIZE];
                        for (dst, src) in e.iter_mut().zip(c) {
                            *dst = *src;
                        }
                        FeatureNameEntry::from_bytes(&e)
                    })
                    .collect();
                ext.feature_table = Some(entries);
            }
            EXT_CRYPTO_HEADER => {
                if header.crypt_method != CRYPT_LUKS {
                    return Err(ExtensionError::CryptoWithoutLuks {
                        crypt_method: header.crypt_method,
                    });
                }
                if length != CRYPTO_EXT_SIZE {
                    return Err(ExtensionError::CryptoHeaderSize { length });
                }
                let data = read(offset, 16);
                let c = CryptoHeaderExtension {
                    offset: be64(&data, 0).unwrap_or(0),
                    length: be64(&data, 8).unwrap_or(0),
                };
                if c.offset % cluster_size != 0 {
                    return Err(ExtensionError::CryptoHeaderUnaligned {
                        offset: c.offset,
                        cluster_size,
                    });
                }
                ext.crypto_header = Some(c);
            }
            EXT_BITMAPS => {
                if length != BITMAPS_EXT_SIZE {
                    return Err(ExtensionError::BitmapsLength { length });
                }
                if header.autoclear_features & features::AUTOCLEAR_BITMAPS == 0 {
                    // QEMU warns, ignores the bitmaps and drops the extension later.
                    ext.stale_bitmaps = true;
                } else {
                    let data = read(offset, u64::from(BITMAPS_EXT_SIZE));
                    let b = BitmapsExtension {
                        nb_bitmaps: be32(&data, 0).unwrap_or(0),
                        reserved: be32(&data, 4).unwrap_or(0),
                        directory_size: be64(&data, 8).unwrap_or(0),
                        directory_offset: be64(&data, 16).unwrap_or(0),
                    };
                    if b.reserved != 0 {
                        return Err(ExtensionError::BitmapsReserved {
                            reserved: b.reserved,
                        });
                    }
                    if u64::from(b.nb_bitmaps) > MAX_BITMAPS {
                        return Err(ExtensionError::TooManyBitmaps {
                            nb_bitmaps: b.nb_bitmaps,
                        });
                    }
                    if b.nb_bitmaps == 0 {
                        return Err(ExtensionError::ZeroBitmaps);
                    }
                    if b.directory_offset % cluster_size != 0 {
                        return Err(ExtensionError::BitmapDirectoryUnaligned {
                            offset: b.directory_offset,
                        });
                    }
                    if b.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
                        return Err(ExtensionError::BitmapDirectoryTooLarge {
                            size: b.directory_size,
                        });
                    }
                    ext.bitmaps = Some(b);
                }
            }
            EXT_DATA_FILE => {
                ext.data_file = Some(read(offset, u64::from(length)));
            }
            _ => ext.unknown.push(UnknownExtension {
                magic,
                data: read(offset, u64::from(length)),
            }),
        }
        // length <= end - offset <= cluster size: the padded step cannot overflow.
        offset += (u64::from(length) + 7) & !7;
    }
    Ok(())
}

/// The feature-name table as QEMU finds it when reporting unsupported features: the
/// extension walk with errors ignored, keeping whatever table was read before an error.
pub fn feature_table_lenient(first_cluster: &[u8], header: &Header) -> Vec<FeatureNameEntry> {
    let mut ext = Extensions::default();
    let _ = parse_into(first_cluster, header, &mut ext);
    ext.feature_table.unwrap_or_default()
}

impl FirstCluster {
    /// The cluster size of the image.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Backing file name as text (lossy), if any.
    pub fn backing_file_str(&self) -> Option<String> {
        self.backing_file
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// Backing format name as text (lossy), if any.
    pub fn backing_format_str(&self) -> Option<String> {
        self.extensions
            .backing_format
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// The whole first cluster exactly as QEMU's `qcow2_update_header` writes it.
    ///
    /// * v2: the 72-byte header; v3: 112 bytes plus the preserved unknown header fields,
    ///   with `header_length` rewritten to match (so a 104-byte header grows to 112).
    /// * Extensions in QEMU's order: backing format; data file name (only with incompatible
    ///   bit 2); encryption pointer (only if its offset is nonzero); QEMU's own feature-name
    ///   table (only for v3 with clusters larger than 4 KiB; the stored table is not
    ///   written); bitmaps (only with at least one bitmap; a stale extension is dropped);
    ///   unknown extensions **in reverse order of `unknown`** (QEMU prepends each one it
    ///   reads to a list and writes the list front to back); the end marker.
    /// * The backing file name right after the end marker; `backing_file_offset` and
    ///   `backing_file_size` are set from it (0 without a backing file); zeros to the end.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SerializeError> {
        let cluster_size = self.cluster_size();
        let mut header = self.header.clone();
        let v3 = header.version >= 3;
        if v3 {
            header.header_length = u32::try_from(V3_HEADER_SIZE + header.unknown_fields.len())
                .map_err(|_| SerializeError::NoSpace {
                    needed: u64::MAX,
                    cluster_size,
                })?;
        }
        header.backing_file_offset = 0;
        header.backing_file_size = 0;

        let mut body = Vec::new();
        let e = &self.extensions;
        if let Some(f) = &e.backing_format {
            push_extension(&mut body, EXT_BACKING_FORMAT, f)?;
        }
        if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            if let Some(d) = &e.data_file {
                push_extension(&mut body, EXT_DATA_FILE, d)?;
            }
        }
        if let Some(c) = e.crypto_header.filter(|c| c.offset != 0) {
            push_extension(&mut body, EXT_CRYPTO_HEADER, &crypto_bytes(&c))?;
        }
        if v3 && cluster_size > 4096 {
            push_extension(
                &mut body,
                EXT_FEATURE_TABLE,
                &feature_table_bytes(&features::qemu_feature_table()),
            )?;
        }
        if let Some(b) = e.bitmaps.filter(|b| b.nb_bitmaps > 0) {
            // QEMU writes the reserved field as zero.
            push_extension(
                &mut body,
                EXT_BITMAPS,
                &BitmapsExtension { reserved: 0, ..b }.to_bytes(),
            )?;
        }
        for u in e.unknown.iter().rev() {
            push_extension(&mut body, u.magic, &u.data)?;
        }
        push_extension(&mut body, EXT_END, &[])?;

        let fixed_len = if v3 {
            V3_HEADER_SIZE + header.unknown_fields.len()
        } else {
            72
        };
        let name = self.backing_file.as_deref().unwrap_or(&[]);
        if name.len() as u64 > crate::limits::MAX_BACKING_FILE_NAME {
            return Err(SerializeError::BackingFileNameTooLong { length: name.len() });
        }
        let needed = (fixed_len + body.len() + name.len()) as u64;
        if needed > cluster_size {
            return Err(SerializeError::NoSpace {
                needed,
                cluster_size,
            });
        }
        if let Some(name) = &self.backing_file {
            header.backing_file_offset = (fixed_len + body.len()) as u64;
            // name.len() <= 1023 checked above.
            header.backing_file_size = name.len() as u32;
        }
        let mut out = header.to_bytes();
        out.extend_from_slice(&body);
        out.extend_from_slice(name);
        out.resize(cluster_size as usize, 0);
        Ok(out)
    }

    /// Whether the image has incompatible features this crate does not know.
    pub fn has_unknown_incompatible(&self) -> bool {
        self.header.incompatible_features & !INCOMPAT_MASK != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, Arbitrary, Gen};

    fn header(cluster_bits: u32) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size: 0,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 1 << cluster_bits,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: features::AUTOCLEAR_BITMAPS,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            unknown_fields: Vec::new(),
        }
    }

    fn bytes(g: &mut Gen, max: usize) -> Vec<u8> {
        let n = usize::arbitrary(g) % (max + 1);
        (0..n).map(|_| u8::arbitrary(g)).collect()
    }

    impl Arbitrary for Extensions {
        fn arbitrary(g: &mut Gen) -> Self {
            let mut e = Extensions::default();
            if bool::arbitrary(g) {
                e.backing_format = Some(bytes(g, 15));
            }
            if bool::arbitrary(g) {
                let n = usize::arbitrary(g) % 4;
                e.feature_table = Some(
                    (0..n)
                        .map(|_| FeatureNameEntry::new(u8::arbitrary(g), u8::arbitrary(g), "f"))
                        .collect(),
                );
            }
            if bool::arbitrary(g) {
                e.bitmaps = Some(BitmapsExtension {
                    nb_bitmaps: 1 + u32::arbitrary(g) % 65535,
                    reserved: 0,
                    directory_size: u64::arbitrary(g) % MAX_BITMAP_DIRECTORY_SIZE,
                    directory_offset: (u64::arbitrary(g) >> 20) << 16,
                });
            }
            if bool::arbitrary(g) {
                e.data_file = Some(bytes(g, 40));
            }
            let n = usize::arbitrary(g) % 3;
            for _ in 0..n {
                let mut magic = u32::arbitrary(g);
                if matches!(
                    magic,
                    EXT_END
                        | EXT_BACKING_FORMAT
                        | EXT_FEATURE_TABLE
                        | EXT_BITMAPS
                        | EXT_CRYPTO_HEADER
                        | EXT_DATA_FILE
                ) {
                    magic = 0x1234_5678;
                }
                e.unknown.push(UnknownExtension {
                    magic,
                    data: bytes(g, 30),
                });
            }
            e
        }
    }

    fn cluster_with(h: &Header, ext: &[u8]) -> Vec<u8> {
        let mut c = h.to_bytes();
        c.extend_from_slice(ext);
        c.resize(h.cluster_size() as usize, 0);
        c
    }

    quickcheck! {
        fn prop_extensions_round_trip(e: Extensions) -> bool {
            let h = header(16);
            let c = cluster_with(&h, &e.to_bytes().unwrap());
            Extensions::parse(&c, &h) == Ok(e)
        }

        fn prop_first_cluster_round_trip(e: Extensions, name: Vec<u8>, unknown_fields: Vec<u8>) -> bool {
            let mut h = header(16);
            h.unknown_fields = unknown_fields.into_iter().take(100).collect();
            h.header_length = (112 + h.unknown_fields.len()) as u32;
            let mut e = e;
            // What QEMU writes: its own feature table; unknown extensions reversed.
            e.feature_table = Some(features::qemu_feature_table());
            let fc = FirstCluster {
                header: h,
                extensions: e.clone(),
                backing_file: if name.is_empty() { None } else { Some(name.into_iter().take(100).collect()) },
            };
            let bytes = fc.to_bytes().unwrap();
            let back = crate::header::open_first_cluster(&bytes, &Default::default()).unwrap();
            let mut expect = e;
            expect.data_file = None; // not written without incompatible bit 2
            expect.unknown.reverse();
            back.extensions == expect
                && back.backing_file == fc.backing_file
                && back.header.unknown_fields == fc.header.unknown_fields
        }

        fn prop_parse_arbitrary_never_panics(data: Vec<u8>, cluster_bits: u8, hl: u16, bfo: u16) -> bool {
            let mut h = header(9 + u32::from(cluster_bits) % 13);
            h.header_length = u32::from(hl);
            h.backing_file_offset = u64::from(bfo);
            h.crypt_method = u32::from(cluster_bits % 3);
            let _ = Extensions::parse(&data, &h);
            let _ = feature_table_lenient(&data, &h);
            true
        }
    }

    #[test]
    fn too_large_and_duplicates() {
        let h = header(9);
        let mut ext = Vec::new();
        push_extension(&mut ext, 0x1234_5678, &[]).unwrap();
        ext[4..8].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        let c = cluster_with(&h, &ext);
        assert_eq!(
            Extensions::parse(&c, &h).unwrap_err().to_string(),
            "Header extension too large"
        );

        let mut ext = Vec::new();
        push_extension(&mut ext, EXT_BACKING_FORMAT, b"raw").unwrap();
        push_extension(&mut ext, EXT_BACKING_FORMAT, b"raw").unwrap();
        let c = cluster_with(&h, &ext);
        assert_eq!(
            Extensions::parse(&c, &h),
            Err(ExtensionError::Duplicate {
                magic: EXT_BACKING_FORMAT,
                offset: 128
            })
        );
    }

    #[test]
    fn extension_checks() {
        let h = header(16);
        let mut ext = Vec::new();
        push_extension(&mut ext, EXT_BACKING_FORMAT, &[b'a'; 16]).unwrap();
        let err = Extensions::parse(&cluster_with(&h, &ext), &h).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ERROR: ext_backing_format: len=16 too large (>=16)"
        );

        let mut ext = Vec::new();
        push_extension(&mut ext, EXT_CRYPTO_HEADER, &[0; 16]).unwrap();
        assert_eq!(
            Extensions::parse(&cluster_with(&h, &ext), &h),
            Err(ExtensionError::CryptoWithoutLuks { crypt_method: 0 })
        );

        let b = BitmapsExtension {
            nb_bitmaps: 0,
            reserved: 0,
            directory_size: 0,
            directory_offset: 0,
        };
        let mut ext = Vec::new();
        push_extension(&mut ext, EXT_BITMAPS, &b.to_bytes()).unwrap();
        assert_eq!(
            Extensions::parse(&cluster_with(&h, &ext), &h),
            Err(ExtensionError::ZeroBitmaps)
        );
        let mut no_bit = h.clone();
        no_bit.autoclear_features = 0;
        let parsed = Extensions::parse(&cluster_with(&no_bit, &ext), &no_bit).unwrap();
        assert!(parsed.stale_bitmaps && parsed.bitmaps.is_none());
    }

    #[test]
    fn fresh_64k_first_cluster_layout() {
        let mut h = header(16);
        h.autoclear_features = 0;
        let fc = FirstCluster {
            header: h,
            extensions: Extensions::default(),
            backing_file: None,
        };
        let b = fc.to_bytes().unwrap();
        assert_eq!(b.len(), 65536);
        assert_eq!(be32(&b, 112), Some(EXT_FEATURE_TABLE));
        assert_eq!(be32(&b, 116), Some(0x180));
        assert_eq!(&b[504..512], &[0u8; 8]);
        // 4 KiB clusters: no feature table.
        let mut h = header(12);
        h.autoclear_features = 0;
        let fc = FirstCluster {
            header: h,
            extensions: Extensions::default(),
            backing_file: None,
        };
        assert_eq!(&fc.to_bytes().unwrap()[112..120], &[0u8; 8]);
    }

    #[test]
    fn no_space() {
        let h = header(9);
        let fc = FirstCluster {
            header: h,
            extensions: Extensions::default(),
            backing_file: Some(vec![b'x'; 400]),
        };
        assert!(matches!(
            fc.to_bytes(),
            Err(SerializeError::NoSpace {
                needed: 520,
                cluster_size: 512
            })
        ));
    }
}
