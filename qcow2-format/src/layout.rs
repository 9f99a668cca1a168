//! The layout of a fresh image, byte-identical to `qemu-img create -f qcow2` with
//! `preallocation=off` (reference §1.13).
//!
//! QEMU creates an image in steps: a minimal header in cluster 0, a one-cluster refcount
//! table in cluster 1 pointing at an empty refcount block in cluster 2, then it opens the
//! image, allocates clusters 0-2, rewrites the full header, and grows the L1 table to
//! `ceil(size / l2_coverage)` entries, allocated first-fit from cluster 3 and written with
//! exactly `l1_size * 8` bytes (so the file is not padded to a cluster). When the L1 table
//! spills beyond what the first refcount block covers (small clusters), QEMU's refcount
//! engine allocates further refcount blocks behind the L1 table, restarting the allocation
//! each time a block is hooked up (`-EAGAIN`); [`fresh_image`] replays that algorithm on an
//! in-memory model so the result matches to the byte.

use crate::extensions::{CryptoHeaderExtension, Extensions, FirstCluster, SerializeError};
use crate::features::{
    CompressionType, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE, INCOMPAT_EXTL2,
};
use crate::header::{Header, V2_HEADER_SIZE, V3_HEADER_SIZE};
use crate::limits::{
    DEFAULT_CLUSTER_SIZE, ENTRY_SIZE, MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_L1_SIZE,
    MAX_REFTABLE_SIZE, MIN_CLUSTER_BITS, SECTOR_SIZE,
};
use crate::Geometry;

/// The `compat` create option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compat {
    /// `compat=0.10`: header version 2.
    V0_10,
    /// `compat=1.1` (the default): header version 3.
    #[default]
    V1_1,
}

impl Compat {
    /// The header version this level writes.
    pub const fn version(self) -> u32 {
        match self {
            Self::V0_10 => 2,
            Self::V1_1 => 3,
        }
    }

    /// The name `qemu-img info` prints ("0.10" or "1.1").
    pub const fn name(self) -> &'static str {
        match self {
            Self::V0_10 => "0.10",
            Self::V1_1 => "1.1",
        }
    }
}

/// The `qemu-img create -f qcow2` options the layout depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512, as qemu-img does silently).
    pub size: u64,
    /// Cluster size in bytes (power of two, 512..=2 MiB).
    pub cluster_size: u64,
    /// Refcount width in bits (1, 2, 4, ..., 64; only 16 with compat 0.10).
    pub refcount_bits: u32,
    /// Compatibility level.
    pub compat: Compat,
    /// `lazy_refcounts=on` (compat 1.1 only).
    pub lazy_refcounts: bool,
    /// `compression_type` (zstd needs compat 1.1).
    pub compression_type: CompressionType,
    /// `extended_l2=on` (compat 1.1 and clusters of at least 16 KiB).
    pub extended_l2: bool,
    /// `-b`: backing file name, stored as given.
    pub backing_file: Option<String>,
    /// `-F`: backing file format.
    pub backing_format: Option<String>,
    /// `data_file=NAME`: guest data goes to this external file (compat 1.1 only); the
    /// name is stored as given.
    pub data_file: Option<String>,
    /// `data_file_raw=on`: the data file is kept a valid raw image of the disk.
    pub data_file_raw: bool,
    /// `encrypt.format=luks`: the LUKS header area (header and key material, as the
    /// crypto crate builds it), stored in clusters allocated after the L1 table and named
    /// by the full-disk-encryption header extension; `crypt_method` becomes 2.
    pub luks_area: Option<LuksArea>,
}

/// The bytes of a LUKS header area to store in a new image (`Debug` shows the length
/// only: key material is not for logs).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LuksArea(pub Vec<u8>);

impl std::fmt::Debug for LuksArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LuksArea({} bytes)", self.0.len())
    }
}

impl CreateOptions {
    /// qemu-img's defaults for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            refcount_bits: 16,
            compat: Compat::V1_1,
            lazy_refcounts: false,
            compression_type: CompressionType::Deflate,
            extended_l2: false,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            luks_area: None,
        }
    }
}

/// Create options qemu-img refuses, or layouts this builder cannot reproduce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Cluster size not a power of two in 512..=2 MiB.
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize {
        /// The value given.
        cluster_size: u64,
    },
    /// Extended L2 needs compat 1.1.
    #[error("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    ExtendedL2NeedsV3,
    /// Extended L2 needs clusters of at least 16 KiB.
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize {
        /// The value given.
        cluster_size: u64,
    },
    /// `data_file_raw=on` without `data_file`.
    #[error("data-file-raw requires data-file")]
    DataFileRawWithoutDataFile,
    /// External data files need compat 1.1.
    #[error("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    DataFileNeedsV3,
    /// `-F` without `-b`.
    #[error("Backing format cannot be used without backing file")]
    BackingFormatWithoutFile,
    /// Lazy refcounts need compat 1.1.
    #[error("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    LazyRefcountsNeedV3,
    /// Refcount width not a power of two up to 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountBits {
        /// The value given.
        refcount_bits: u32,
    },
    /// Compat 0.10 with a refcount width other than 16.
    #[error("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")]
    RefcountBitsNeedV3 {
        /// The value given.
        refcount_bits: u32,
    },
    /// zstd with compat 0.10.
    #[error("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    CompressionNeedsV3,
    /// The backing file name is longer than 1023 bytes.
    #[error("Backing file name too long")]
    BackingFileNameTooLong {
        /// Its length.
        length: usize,
    },
    /// The backing format name does not fit QEMU's 16-byte buffer.
    #[error("Backing format name too long: {length} bytes (max 15)")]
    BackingFormatTooLong {
        /// Its length.
        length: usize,
    },
    /// The L1 table for this size would exceed QEMU's 32 MiB limit.
    #[error("Could not resize image: Failed to grow the L1 table: File too large")]
    ImageTooBig {
        /// The virtual size.
        size: u64,
    },
    /// The first cluster cannot hold header, extensions and backing file name.
    #[error(transparent)]
    FirstCluster(#[from] SerializeError),
}

/// A fresh image: what to write where, and how long the file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreshImage {
    /// The first cluster as a value (header with final L1 fields, extensions, backing name).
    pub first_cluster: FirstCluster,
    /// Non-overlapping writes in ascending offset order; together with zeros elsewhere they
    /// form the whole file.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Final file length (the file ends right after the L1 entries or the last refcount
    /// block, whichever is later; it is not padded to a cluster).
    pub file_length: u64,
}

impl FreshImage {
    /// The whole file as one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.file_length as usize];
        for (off, data) in &self.writes {
            let start = *off as usize;
            if let Some(dst) = out.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        out
    }

    /// The header as written.
    pub fn header(&self) -> &Header {
        &self.first_cluster.header
    }
}

/// Validates the options in the order `qcow2_co_create` does.
fn validate(opts: &CreateOptions) -> Result<(), LayoutError> {
    let cs = opts.cluster_size;
    let v3 = opts.compat == Compat::V1_1;
    if opts.extended_l2 && !v3 {
        return Err(LayoutError::ExtendedL2NeedsV3);
    }
    if !cs.is_power_of_two() || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs) {
        return Err(LayoutError::ClusterSize { cluster_size: cs });
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(LayoutError::ExtendedL2ClusterSize { cluster_size: cs });
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return Err(LayoutError::BackingFormatWithoutFile);
    }
    if opts.lazy_refcounts && !v3 {
        return Err(LayoutError::LazyRefcountsNeedV3);
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(LayoutError::RefcountBits {
            refcount_bits: opts.refcount_bits,
        });
    }
    if !v3 && opts.refcount_bits != 16 {
        return Err(LayoutError::RefcountBitsNeedV3 {
            refcount_bits: opts.refcount_bits,
        });
    }
    if opts.compression_type != CompressionType::Deflate && !v3 {
        return Err(LayoutError::CompressionNeedsV3);
    }
    if opts.data_file_raw && opts.data_file.is_none() {
        return Err(LayoutError::DataFileRawWithoutDataFile);
    }
    if opts.data_file.is_some() && !v3 {
        return Err(LayoutError::DataFileNeedsV3);
    }
    if let Some(b) = &opts.backing_file {
        if b.len() as u64 > MAX_BACKING_FILE_NAME {
            return Err(LayoutError::BackingFileNameTooLong { length: b.len() });
        }
    }
    if let Some(f) = &opts.backing_format {
        if f.len() >= 16 {
            return Err(LayoutError::BackingFormatTooLong { length: f.len() });
        }
    }
    Ok(())
}

/// Builds the exact bytes `qemu-img create -f qcow2` (preallocation=off) writes.
pub fn fresh_image(opts: &CreateOptions) -> Result<FreshImage, LayoutError> {
    validate(opts)?;
    let size = opts
        .size
        .checked_next_multiple_of(SECTOR_SIZE)
        .ok_or(LayoutError::ImageTooBig { size: opts.size })?;
    let cluster_bits = opts.cluster_size.trailing_zeros();
    let refcount_order = opts.refcount_bits.trailing_zeros();
    let geometry = Geometry::new(cluster_bits, refcount_order, opts.extended_l2).map_err(|_| {
        LayoutError::ClusterSize {
            cluster_size: opts.cluster_size,
        }
    })?;
    let cs = geometry.cluster_size();

    let l1_size = geometry.l1_entries_for(size);
    if l1_size > MAX_L1_SIZE / ENTRY_SIZE {
        return Err(LayoutError::ImageTooBig { size });
    }

    // Clusters 0..=2 (header, refcount table, first refcount block) are allocated first,
    // then the L1 table, exactly as QEMU's create path does.
    let mut sim = RefcountSim::new(geometry);
    sim.alloc_clusters(3)
        .map_err(|()| LayoutError::ImageTooBig { size })?;
    let l1_offset = if l1_size > 0 {
        let l1_clusters = geometry.size_to_clusters(l1_size * ENTRY_SIZE);
        let first = sim
            .alloc_clusters(l1_clusters)
            .map_err(|()| LayoutError::ImageTooBig { size })?;
        first << cluster_bits
    } else {
        0
    };
    // QEMU sets up encryption after the L1 table (qcow2_set_up_encryption): the LUKS
    // area takes the next free clusters, zero-filled whole, then header and slot 0.
    let luks = match &opts.luks_area {
        Some(area) if !area.0.is_empty() => {
            let len = area.0.len() as u64;
            let clusters = geometry.size_to_clusters(len);
            let first = sim
                .alloc_clusters(clusters)
                .map_err(|()| LayoutError::ImageTooBig { size })?;
            Some((first << cluster_bits, len, clusters << cluster_bits))
        }
        _ => None,
    };

    let v3 = opts.compat == Compat::V1_1;
    let mut incompatible = 0;
    if opts.compression_type != CompressionType::Deflate {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    if opts.extended_l2 {
        incompatible |= INCOMPAT_EXTL2;
    }
    if opts.data_file.is_some() {
        incompatible |= INCOMPAT_DATA_FILE;
    }
    let header = Header {
        version: opts.compat.version(),
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: if luks.is_some() {
            crate::header::CRYPT_LUKS
        } else {
            0
        },
        // l1_size <= 4 Mi entries, checked above.
        l1_size: l1_size as u32,
        l1_table_offset: l1_offset,
        refcount_table_offset: sim.reftable_offset << cluster_bits,
        // At most 8 MiB of entries (checked by the growth replay).
        refcount_table_clusters: sim.reftable_clusters() as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if v3 { incompatible } else { 0 },
        compatible_features: if opts.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if opts.data_file_raw {
            AUTOCLEAR_DATA_FILE_RAW
        } else {
            0
        },
        refcount_order,
        header_length: if v3 {
            V3_HEADER_SIZE as u32
        } else {
            V2_HEADER_SIZE as u32
        },
        compression_type: opts.compression_type.as_u8(),
        unknown_fields: Vec::new(),
    };
    let extensions = Extensions {
        backing_format: opts.backing_format.as_ref().map(|f| f.as_bytes().to_vec()),
        data_file: opts.data_file.as_ref().map(|f| f.as_bytes().to_vec()),
        crypto_header: luks.map(|(offset, length, _)| CryptoHeaderExtension { offset, length }),
        ..Extensions::default()
    };
    let mut first_cluster = FirstCluster {
        header,
        extensions,
        backing_file: opts.backing_file.as_ref().map(|b| b.as_bytes().to_vec()),
    };
    let cluster0 = first_cluster.to_bytes()?;
    // Keep the value in sync with what was serialized (backing name position).
    first_cluster.header.backing_file_offset = u64::from_be_bytes(
        cluster0
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; 8]),
    );
    first_cluster.header.backing_file_size = first_cluster
        .backing_file
        .as_ref()
        .map_or(0, |b| b.len() as u32);

    if v3 && cs > 4096 {
        // Written by QEMU's header rewrite; recorded so the value equals a parse of the bytes.
        first_cluster.extensions.feature_table = Some(crate::features::qemu_feature_table());
    }
    let mut writes = vec![(0u64, cluster0)];
    let mut file_length = 3 * cs;
    let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
    // Tables replaced by a growth keep the bytes they had when abandoned (QEMU frees the
    // clusters without discarding them); the current table is written in full.
    for (offset, entries) in sim.abandoned.iter().chain(std::iter::once(&(
        sim.reftable_offset,
        sim.reftable.clone(),
    ))) {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        let at = offset << cluster_bits;
        file_length = file_length.max(at + bytes.len() as u64);
        blocks.push((at, bytes));
    }
    for (ti, &block_offset) in sim.reftable.iter().enumerate() {
        if block_offset == 0 {
            continue;
        }
        let mut block = vec![0u8; cs as usize];
        let first_cluster_index = (ti as u64) << geometry.refcount_block_bits();
        for i in 0..geometry.refcount_block_entries() {
            if sim.stored(first_cluster_index + i) != 0 {
                // Index < entries per block and 1 <= refcount_max: cannot fail.
                let _ = crate::refcount::set(&mut block, refcount_order, i, 1);
            }
        }
        file_length = file_length.max(block_offset + cs);
        blocks.push((block_offset, block));
    }
    if l1_size > 0 {
        let l1_bytes = l1_size * ENTRY_SIZE;
        file_length = file_length.max(l1_offset + l1_bytes);
        blocks.push((l1_offset, vec![0u8; l1_bytes as usize]));
    }
    if let (Some((offset, _, padded)), Some(area)) = (luks, &opts.luks_area) {
        let mut bytes = area.0.clone();
        // `padded` covers `len` bytes in whole clusters, so it is at least as long.
        bytes.resize(padded as usize, 0);
        file_length = file_length.max(offset + padded);
        blocks.push((offset, bytes));
    }
    blocks.sort_by_key(|(off, _)| *off);
    writes.extend(blocks);
    Ok(FreshImage {
        first_cluster,
        writes,
        file_length,
    })
}

/// The outcome QEMU's `alloc_refcount_block` signals with `-EAGAIN`: a new block was hooked
/// up (or the table grew) and the caller must restart its free-cluster search. `Fatal` is
/// QEMU's `-EFBIG`: the refcount structures would exceed their limits.
enum SimError {
    Again,
    Fatal,
}

/// In-memory replay of QEMU's refcount allocation (`qcow2_alloc_clusters`,
/// `alloc_clusters_noref`, `update_refcount`, `alloc_refcount_block`,
/// `qcow2_refcount_area`) for a fresh image.
struct RefcountSim {
    geometry: Geometry,
    /// Refcount-table entries (host offsets of refcount blocks).
    reftable: Vec<u64>,
    /// Cluster index of the refcount table.
    reftable_offset: u64,
    /// Tables replaced by growth: cluster index and the entries they held then.
    abandoned: Vec<(u64, Vec<u64>)>,
    /// Refcounts by cluster index; only meaningful where the block is hooked up.
    refcounts: Vec<u64>,
    /// QEMU's `free_cluster_index` hint.
    free_cluster_index: u64,
}

impl RefcountSim {
    fn new(geometry: Geometry) -> Self {
        // One cluster of entries at cluster 1; entry 0 points at the empty block in
        // cluster 2.
        let mut reftable = vec![0u64; geometry.table_entries_per_cluster() as usize];
        if let Some(first) = reftable.first_mut() {
            *first = 2 * geometry.cluster_size();
        }
        Self {
            geometry,
            reftable,
            reftable_offset: 1,
            abandoned: Vec::new(),
            refcounts: Vec::new(),
            free_cluster_index: 0,
        }
    }

    fn reftable_clusters(&self) -> u64 {
        self.reftable.len() as u64 / self.geometry.table_entries_per_cluster()
    }

    fn stored(&self, cluster: u64) -> u64 {
        self.refcounts.get(cluster as usize).copied().unwrap_or(0)
    }

    fn store(&mut self, cluster: u64, value: u64) {
        let i = cluster as usize;
        if self.refcounts.len() <= i {
            self.refcounts.resize(i + 1, 0);
        }
        if let Some(slot) = self.refcounts.get_mut(i) {
            *slot = value;
        }
    }

    fn hooked(&self, cluster: u64) -> bool {
        let ti = self.geometry.reftable_index(cluster) as usize;
        self.reftable.get(ti).is_some_and(|&e| e != 0)
    }

    fn get(&self, cluster: u64) -> u64 {
        if self.hooked(cluster) {
            self.stored(cluster)
        } else {
            0
        }
    }

    fn add(&mut self, cluster: u64, delta: i64) {
        let v = self.stored(cluster).saturating_add_signed(delta);
        self.store(cluster, v);
        if v == 0 && cluster < self.free_cluster_index {
            self.free_cluster_index = cluster;
        }
    }

    fn alloc_clusters(&mut self, n: u64) -> Result<u64, ()> {
        loop {
            let start = self.alloc_noref(n);
            match self.update(start, n) {
                Ok(()) => return Ok(start),
                Err(SimError::Again) => continue,
                Err(SimError::Fatal) => return Err(()),
            }
        }
    }

    fn alloc_noref(&mut self, n: u64) -> u64 {
        'retry: loop {
            for _ in 0..n {
                let c = self.free_cluster_index;
                self.free_cluster_index += 1;
                if self.get(c) != 0 {
                    continue 'retry;
                }
            }
            return self.free_cluster_index - n;
        }
    }

    fn update(&mut self, start: u64, n: u64) -> Result<(), SimError> {
        let mut current_block = None;
        for c in start..start + n {
            let ti = self.geometry.reftable_index(c);
            if current_block != Some(ti) {
                if let Err(e) = self.alloc_block(c) {
                    // QEMU undoes the part already done (which may lower the hint).
                    for u in start..c {
                        self.add(u, -1);
                    }
                    return Err(e);
                }
                current_block = Some(ti);
            }
            self.add(c, 1);
        }
        Ok(())
    }

    fn alloc_block(&mut self, cluster: u64) -> Result<(), SimError> {
        if self.hooked(cluster) {
            return Ok(());
        }
        let ti = self.geometry.reftable_index(cluster);
        let new_block = self.alloc_noref(1);
        if self.geometry.reftable_index(new_block) == ti {
            // Self-describing block: zeroed, with its own refcount set.
            self.clear_block(ti);
            self.store(new_block, 1);
        } else {
            self.update(new_block, 1)?;
        }
        if let Some(slot) = self.reftable.get_mut(ti as usize) {
            *slot = new_block << self.geometry.cluster_bits();
            return Err(SimError::Again);
        }
        // The table is full: new self-describing structures go right after the refcount
        // blocks needed so far (which cover `cluster` and the new block).
        let blocks_used = cluster
            .max(new_block)
            .saturating_add(1)
            .div_ceil(self.geometry.refcount_block_entries());
        let meta_start = blocks_used.saturating_mul(self.geometry.refcount_block_entries());
        self.refcount_area(meta_start, ti, new_block)?;
        Err(SimError::Again)
    }

    /// Zeroes the refcounts a fresh (zero-filled) block `ti` describes.
    fn clear_block(&mut self, ti: u64) {
        let per = self.geometry.refcount_block_entries();
        let first = (ti.saturating_mul(per) as usize).min(self.refcounts.len());
        let last = (ti.saturating_add(1).saturating_mul(per) as usize).min(self.refcounts.len());
        if let Some(cells) = self.refcounts.get_mut(first..last) {
            cells.fill(0);
        }
    }

    /// QEMU's `qcow2_refcount_area(start, 0, exact_size = false, new_index, new_block)`:
    /// a new table 50 % larger than needed and the missing refcount blocks, placed at
    /// cluster `start` and counting themselves; the old table is freed.
    fn refcount_area(
        &mut self,
        start: u64,
        new_index: u64,
        new_block: u64,
    ) -> Result<(), SimError> {
        let g = self.geometry;
        let per_block = g.refcount_block_entries();
        let per_table_cluster = g.table_entries_per_cluster();
        let total = crate::refcount::refcount_metadata_size(
            start,
            g.cluster_size(),
            g.refcount_order(),
            true,
        )
        .map_err(|_| SimError::Fatal)?
        .refblocks;
        // QEMU compares both counts with QCOW_MAX_REFTABLE_SIZE (-EFBIG).
        let table_size = (total + total.div_ceil(2)).next_multiple_of(per_table_cluster);
        if total > MAX_REFTABLE_SIZE || table_size > MAX_REFTABLE_SIZE {
            return Err(SimError::Fatal);
        }
        let table_clusters = table_size / per_table_cluster;
        let mut table = self.reftable.clone();
        table.resize(table_size as usize, 0);
        if let Some(slot) = table.get_mut(new_index as usize) {
            *slot = new_block << g.cluster_bits();
        }
        let area_index = start / per_block;
        let missing = (area_index..total)
            .filter(|&i| table.get(i as usize).is_some_and(|&e| e == 0))
            .count() as u64;
        let table_offset = start + missing;
        let end = table_offset + table_clusters;
        let mut block = start;
        for i in area_index..total {
            if table.get(i as usize).is_some_and(|&e| e == 0) {
                self.clear_block(i);
                if let Some(slot) = table.get_mut(i as usize) {
                    *slot = block << g.cluster_bits();
                }
                block += 1;
            }
        }
        // Every cluster of the new structures counts one reference; the table switch
        // below makes them visible.
        for c in start..end {
            self.store(c, 1);
        }
        let old = std::mem::replace(&mut self.reftable, table);
        let old_offset = std::mem::replace(&mut self.reftable_offset, table_offset);
        let old_clusters = old.len() as u64 / per_table_cluster;
        self.abandoned.push((old_offset, old));
        for c in old_offset..old_offset + old_clusters {
            self.add(c, -1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_for(size: u64, cluster_size: u64) -> u64 {
        let mut o = CreateOptions::new(size);
        o.cluster_size = cluster_size;
        fresh_image(&o).unwrap().file_length
    }

    #[test]
    fn observed_file_lengths() {
        // Reference §1.13, qemu-img 10.0.2.
        assert_eq!(len_for(1 << 30, 65536), 196_624);
        assert_eq!(len_for(64 << 20, 65536), 196_616);
        assert_eq!(len_for(1 << 30, 4096), 16384);
        assert_eq!(len_for(1 << 30, 512), 264_704);
        assert_eq!(len_for(1 << 30, 2 << 20), 6_291_464);
        assert_eq!(len_for(0, 65536), 196_608);
    }

    /// LUKS areas land after the L1 table in whole zero-padded clusters (file lengths
    /// and offsets of qemu-img 10.0.2's images with the default LUKS options: a
    /// 2068480-byte area).
    #[test]
    fn luks_area_after_l1() {
        let area: Vec<u8> = (0..2_068_480u32).map(|i| (i % 251) as u8 + 1).collect();
        for (size, cs, offset, file_length) in [
            (64u64 << 20, 65536u64, 0x40000u64, 2_359_296u64),
            (1 << 20, 512, 2048, 2_078_208),
        ] {
            let o = CreateOptions {
                cluster_size: cs,
                luks_area: Some(LuksArea(area.clone())),
                ..CreateOptions::new(size)
            };
            let f = fresh_image(&o).unwrap();
            assert_eq!(f.header().crypt_method, crate::header::CRYPT_LUKS);
            let ext = f.first_cluster.extensions.crypto_header.unwrap();
            assert_eq!(
                (ext.offset, ext.length),
                (offset, area.len() as u64),
                "{cs}"
            );
            assert_eq!(f.file_length, file_length, "{cs}");
            let bytes = f.to_bytes();
            assert_eq!(&bytes[offset as usize..][..area.len()], &area[..]);
            let end = (offset as usize + area.len()).next_multiple_of(cs as usize);
            assert!(bytes[offset as usize + area.len()..end]
                .iter()
                .all(|&b| b == 0));
            let parsed = crate::header::open_first_cluster(
                &bytes,
                &crate::header::OpenOptions {
                    read_write: true,
                    check_mode: false,
                },
            )
            .unwrap();
            assert_eq!(parsed, f.first_cluster);
        }
    }

    #[test]
    fn small_clusters_get_extra_refblocks() {
        let mut o = CreateOptions::new(1 << 30);
        o.cluster_size = 512;
        let img = fresh_image(&o).unwrap();
        let bytes = img.to_bytes();
        // Reftable entries: 0x400, 0x40600, 0x40800.
        assert_eq!(&bytes[0x200..0x208], &0x400u64.to_be_bytes());
        assert_eq!(&bytes[0x208..0x210], &0x40600u64.to_be_bytes());
        assert_eq!(&bytes[0x210..0x218], &0x40800u64.to_be_bytes());
        // Block 2 counts clusters 512..=516 (three L1 clusters, both new blocks).
        assert_eq!(
            &bytes[0x40800..0x4080c],
            &[0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0]
        );
    }

    #[test]
    fn option_errors() {
        let mut o = CreateOptions::new(1 << 20);
        o.cluster_size = 1000;
        assert!(matches!(
            fresh_image(&o),
            Err(LayoutError::ClusterSize { .. })
        ));
        let mut o = CreateOptions::new(1 << 20);
        o.compat = Compat::V0_10;
        o.refcount_bits = 8;
        assert!(matches!(
            fresh_image(&o),
            Err(LayoutError::RefcountBitsNeedV3 { .. })
        ));
        let mut o = CreateOptions::new(1 << 20);
        o.extended_l2 = true;
        o.cluster_size = 8192;
        assert!(matches!(
            fresh_image(&o),
            Err(LayoutError::ExtendedL2ClusterSize { .. })
        ));
        let mut o = CreateOptions::new(u64::MAX - 10);
        o.cluster_size = 512;
        assert!(matches!(
            fresh_image(&o),
            Err(LayoutError::ImageTooBig { .. })
        ));
    }

    #[test]
    fn refcount_table_growth_is_replayed() {
        // 512-byte clusters with 64-bit refcounts: one reftable cluster covers 4096
        // clusters, an 8 GiB image needs a 4096-cluster L1 table, so the table grows.
        let mut o = CreateOptions::new(8 << 30);
        o.cluster_size = 512;
        o.refcount_bits = 64;
        let img = fresh_image(&o).unwrap();
        let h = &img.first_cluster.header;
        // The L1 table goes right after the first three clusters, the new table after
        // the refcount blocks that cover everything before it.
        assert_eq!(h.l1_table_offset, 3 * 512);
        assert!(h.refcount_table_offset > h.l1_table_offset + 4096 * 512);
        assert!(h.refcount_table_clusters > 1);
        assert!(img.file_length >= h.refcount_table_offset + 512);
    }

    #[test]
    fn parses_back() {
        let mut o = CreateOptions::new(10 << 30);
        o.refcount_bits = 1;
        o.backing_file = Some("base.qcow2".into());
        o.backing_format = Some("qcow2".into());
        let img = fresh_image(&o).unwrap();
        let bytes = img.to_bytes();
        let fc = crate::header::open_first_cluster(
            &bytes,
            &crate::header::OpenOptions {
                read_write: true,
                check_mode: false,
            },
        )
        .unwrap();
        assert_eq!(fc, img.first_cluster);
        assert_eq!(fc.backing_file.as_deref(), Some(&b"base.qcow2"[..]));
    }
}
