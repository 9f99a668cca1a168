//! `qemu-img amend`: changing image options in place (QEMU's `qcow2_amend_options`,
//! `qcow2_upgrade`, `qcow2_downgrade`, `qcow2_change_refcount_order`,
//! `qcow2_expand_zero_clusters`; reference §3.8, iotests 061 and 112).
//!
//! Order of the steps is QEMU's: upgrade first (some options need compat=1.1), then the
//! refcount width, a header update, the backing-file check, lazy refcounts, the size, and
//! the downgrade last (so that features can be removed before). A refusal of a later step
//! leaves the earlier ones applied, as in QEMU (iotest 061: "the resize was already
//! applied").
//!
//! Crash safety of every new metadata path:
//! - refcount width: the new refcount blocks and table are written into clusters beyond
//!   everything the old structures count (unreferenced until the switch), flushed, then one
//!   header write switches order, table offset and size together; the old structures
//!   become leaks of the new ones until they are freed. At every instant the header names
//!   a complete, never under-counting structure (invariants 1 and 4).
//! - zero-cluster expansion: a new cluster's refcount and its zeros are durable before the
//!   L2 table naming it is written; the old cluster a shared preallocated zero cluster
//!   pointed at loses its reference only after the rewritten table is durable (invariants 1
//!   and 3).

use crate::error::{ImageError, Op, Result, ENOTSUP};
use crate::overlap::bits;
use crate::Image;
use qcow2_cache::CacheId;
use qcow2_format::entry::{L1E_OFFSET_MASK, OFLAG_COPIED};
use qcow2_format::features::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DIRTY,
};
use qcow2_format::layout::Compat;
use qcow2_format::refcount::{RefcountCodec, REFT_OFFSET_MASK};
use qcow2_format::{ClusterType, L2Entry};
use qcow2_io::errno::EINVAL;
use qcow2_io::StorageExt;
use qcow2_refcount::{Change, DiscardType};
use std::collections::{BTreeSet, HashSet};

/// Options `qemu-img amend -o` can change on a qcow2 image. `None` leaves a setting as it is
/// (QEMU: "only change explicitly defined options").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `compat=0.10|v2|1.1|v3`: downgrade or upgrade the header version.
    pub compat: Option<Compat>,
    /// `refcount_bits=N` (1, 2, 4, ..., 64; only 16 with compat 0.10).
    pub refcount_bits: Option<u32>,
    /// `lazy_refcounts=on|off` (on: v3 only; off: the image is made clean first).
    pub lazy_refcounts: Option<bool>,
    /// `size=N`: resize to exactly this many bytes (growing or shrinking, as
    /// [`Image::resize`]).
    pub size: Option<u64>,
    /// `backing_file=NAME`: only accepted when equal to the current name (QEMU: "Cannot
    /// amend the backing file"; use rebase instead).
    pub backing_file: Option<String>,
    /// `backing_fmt=FMT`: as `backing_file`.
    pub backing_format: Option<String>,
    /// `data_file=NAME`: renames the external data file (images that have one).
    pub data_file: Option<String>,
    /// `data_file_raw=on|off`: `off` drops the raw promise; `on` is refused on existing
    /// images that do not have it.
    pub data_file_raw: Option<bool>,
    /// `encrypt.*`: LUKS key-slot changes (see [`crate::KeyslotAmend`]).
    pub encrypt: Option<crate::KeyslotAmend>,
    /// `--force`: allow erasing the last active key slot and overwriting an active one.
    pub force: bool,
    /// The secrets `encrypt.new-secret` / `encrypt.old-secret` name, by id (QEMU's
    /// `--object secret` objects).
    pub secrets: Vec<(String, qcow2_crypto::Secret)>,
}

/// `qcow2_create_opts` names that `amend` refuses with "This option is only supported for
/// image creation".
const CREATION_ONLY: &[&str] = &[
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
];

fn refused(message: impl Into<String>, hint: Option<&str>, errno: i32) -> ImageError {
    ImageError::Refused {
        op: Op::Amend,
        message: message.into(),
        hint: hint.map(str::to_owned),
        errno,
    }
}

/// QEMU's boolean option parser (`on`/`off`, `yes`/`no`, `true`/`false`).
fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(refused(
            format!("Parameter '{name}' expects 'on' or 'off'"),
            None,
            EINVAL,
        )),
    }
}

/// A size with qemu-img's binary suffixes (`k`, `M`, `G`, `T`, `P`, `E`; plain bytes).
fn parse_size(name: &str, v: &str) -> Result<u64> {
    let bad = || {
        refused(
            format!(
                "Parameter '{name}' expects a non-negative number below 2^64\nOptional suffix \
                 k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, \
                 respectively."
            ),
            None,
            EINVAL,
        )
    };
    let (num, shift) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(bad()),
            };
            (&v[..i], shift)
        }
        _ => (v, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

impl AmendOptions {
    /// Parses `qemu-img amend -o` text (`key=value,key=value`) with QEMU's messages:
    /// "Invalid parameter 'foo'"; for creation-only options (`cluster_size`, `extended_l2`,
    /// `preallocation`, `compression_type`, `encryption`, ...) "Invalid parameter 'X'" with
    /// the hint "This option is only supported for image creation"; "Unknown compatibility
    /// level 0.42"; "Refcount width must be a power of two and may not exceed 64 bits".
    /// All are [`ImageError::Refused`] with `op` [`Op::Amend`].
    pub fn parse(text: &str) -> Result<AmendOptions> {
        let mut o = AmendOptions::default();
        for item in text.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, "on"));
            match key {
                "compat" => {
                    o.compat = Some(match value {
                        "0.10" | "v2" => Compat::V0_10,
                        "1.1" | "v3" => Compat::V1_1,
                        _ => {
                            return Err(refused(
                                format!("Unknown compatibility level {value}"),
                                None,
                                EINVAL,
                            ))
                        }
                    })
                }
                "refcount_bits" => {
                    let bits = value.parse::<u32>().unwrap_or(0);
                    o.refcount_bits = Some(bits);
                    validate_refcount_bits(bits)?;
                }
                "lazy_refcounts" => o.lazy_refcounts = Some(parse_bool(key, value)?),
                "size" => o.size = Some(parse_size(key, value)?),
                "backing_file" => o.backing_file = Some(value.to_owned()),
                "backing_fmt" => o.backing_format = Some(value.to_owned()),
                "data_file" => o.data_file = Some(value.to_owned()),
                "data_file_raw" => o.data_file_raw = Some(parse_bool(key, value)?),
                "encrypt.state" | "encrypt.keyslot" | "encrypt.new-secret"
                | "encrypt.old-secret" | "encrypt.iter-time" => o
                    .encrypt
                    .get_or_insert_with(Default::default)
                    .set(key, value)?,
                k if CREATION_ONLY.contains(&k) => {
                    return Err(refused(
                        format!("Invalid parameter '{k}'"),
                        Some("This option is only supported for image creation"),
                        EINVAL,
                    ))
                }
                k => return Err(refused(format!("Invalid parameter '{k}'"), None, EINVAL)),
            }
        }
        Ok(o)
    }
}

fn validate_refcount_bits(bits: u32) -> Result<()> {
    if bits == 0 || bits > 64 || !bits.is_power_of_two() {
        return Err(refused(
            "Refcount width must be a power of two and may not exceed 64 bits",
            None,
            EINVAL,
        ));
    }
    Ok(())
}

/// QEMU's `Qcow2AmendHelperCBInfo`: turns per-operation progress into overall progress
/// over the number of operations amend performs.
struct Progress<'a> {
    cb: &'a mut dyn FnMut(u64, u64),
    total_ops: u64,
    done_ops: u64,
    offset_completed: u64,
    last_work: u64,
    current: u32,
    last: u32,
}

impl Progress<'_> {
    fn start(&mut self, operation: u32) {
        self.current = operation;
    }

    fn report(&mut self, offset: u64, work: u64) {
        if self.total_ops == 0 {
            return;
        }
        if self.current != self.last {
            if self.last != 0 {
                self.offset_completed += self.last_work;
                self.done_ops += 1;
            }
            self.last = self.current;
        }
        self.last_work = work;
        let current = self.offset_completed + work;
        let remaining_ops = self.total_ops.saturating_sub(self.done_ops + 1);
        let projected = current * remaining_ops / (self.done_ops + 1);
        (self.cb)(self.offset_completed + offset, current + projected);
    }
}

impl Image {
    /// `qemu-img amend -o ...` (QEMU's `qcow2_amend_options`); see [`Image::amend_with_progress`].
    pub fn amend(&mut self, opts: &AmendOptions) -> Result<()> {
        self.amend_with_progress(opts, &mut |_, _| {})
    }

    /// Changes image options in place, in QEMU's order, with QEMU's refusals (all
    /// [`ImageError::Refused`] with QEMU's message and errno unless an I/O error occurred):
    ///
    /// 1. `compat=1.1` on a v2 image: the snapshot table is rewritten if an entry lacks the
    ///    v3 extra data, then the header becomes a v3 header.
    /// 2. `refcount_bits`: new refcount blocks and table at the new width ("Refcount widths
    ///    other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or
    ///    greater)"; narrowing below a refcount in use: "Cannot decrease refcount entry
    ///    width to 1 bits: Cluster at offset 0x50000 has a refcount of 2", image
    ///    untouched).
    /// 3. backing file: only the current values are accepted ("Cannot amend the backing
    ///    file", hint "You can use 'qemu-img rebase' instead.").
    /// 4. `lazy_refcounts`: on needs v3 ("Lazy refcounts only supported with compatibility
    ///    level 1.1 and above (use compat=1.1 or greater)"); off makes the image clean
    ///    first.
    /// 5. `size`: [`Image::resize`].
    /// 6. `compat=0.10`: refused for refcount widths other than 16 ("compat=0.10 requires
    ///    refcount_bits=16"), snapshots of another disk size or with a VM state above 4 GiB
    ///    ("Internal snapshots prevent downgrade of image"), incompatible features other than
    ///    dirty and zstd ("Cannot downgrade an image with incompatible features 0x10 set"),
    ///    zstd with compressed clusters; zero clusters (active and snapshot trees) become
    ///    unallocated (no backing file) or zero-filled data clusters; then a 72-byte v2
    ///    header without feature bits.
    ///
    /// `progress(done, total)` is called as QEMU's status callback (arbitrary units, `done
    /// == total` at the end of each operation). A refusal of a later step leaves earlier
    /// steps applied, as in QEMU. Afterwards the image is reopened from disk (all derived
    /// state rebuilt) and stays usable.
    pub fn amend_with_progress(
        &mut self,
        opts: &AmendOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let op = Op::Amend;
        self.check_writable(op)?;
        if !self.l1_dirty.is_empty() {
            self.flush_caches(op, true)?;
        }
        if let Some(bits) = opts.refcount_bits {
            validate_refcount_bits(bits)?;
        }
        if opts.encrypt.is_some() {
            crate::keyslots::check_amendable(self.fc.header.crypt_method)?;
        }
        if opts.data_file.is_some() && self.data.is_none() {
            return Err(refused(
                "data-file can only be set for images that use an external data file",
                None,
                EINVAL,
            ));
        }
        if opts.data_file_raw == Some(true) && !self.data_file_raw {
            return Err(refused(
                "data-file-raw cannot be set on existing images",
                None,
                EINVAL,
            ));
        }
        // Renaming the data file, or dropping the raw promise, is a header rewrite.
        let mut rename = false;
        if let Some(name) = &opts.data_file {
            self.fc.extensions.data_file = Some(name.as_bytes().to_vec());
            rename = true;
        }
        if opts.data_file_raw == Some(false) && self.data_file_raw {
            self.fc.header.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
            self.data_file_raw = false;
            rename = true;
        }
        if rename {
            self.rewrite_header(op)?;
        }
        let old_version = self.fc.header.version;
        let new_version = match opts.compat {
            Some(Compat::V0_10) => 2,
            Some(Compat::V1_1) => 3,
            None => old_version,
        };
        let old_bits = self.geo.refcount_bits();
        let new_bits = opts.refcount_bits.unwrap_or(old_bits);
        let mut p = Progress {
            cb: progress,
            total_ops: u64::from(new_version != old_version)
                + u64::from(new_bits != old_bits)
                + u64::from(opts.encrypt.is_some()),
            done_ops: 0,
            offset_completed: 0,
            last_work: 0,
            current: 0,
            last: 0,
        };

        if new_version > old_version {
            p.start(1);
            self.upgrade(&mut p)?;
        }
        // QEMU changes key slots right after the upgrade, before the refcount width.
        if let Some(e) = &opts.encrypt {
            p.start(3);
            self.amend_keyslots(e, &opts.secrets, opts.force)?;
        }
        if new_bits != old_bits {
            if new_version < 3 && new_bits != 16 {
                return Err(refused(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                    None,
                    EINVAL,
                ));
            }
            p.start(2);
            self.change_refcount_order(new_bits.trailing_zeros(), &mut p)?;
        }
        self.rewrite_header(op)?;

        if opts.backing_file.is_some() || opts.backing_format.is_some() {
            let cur_file = self.fc.backing_file_str();
            let cur_fmt = self.fc.backing_format_str();
            if opts.backing_file != cur_file || opts.backing_format != cur_fmt {
                return Err(refused(
                    "Cannot amend the backing file",
                    Some("You can use 'qemu-img rebase' instead."),
                    EINVAL,
                ));
            }
        }

        if let Some(lazy) = opts.lazy_refcounts.filter(|&l| l != self.lazy) {
            if lazy {
                if new_version < 3 {
                    return Err(refused(
                        "Lazy refcounts only supported with compatibility level 1.1 and above \
                         (use compat=1.1 or greater)",
                        None,
                        EINVAL,
                    ));
                }
                self.fc.header.compatible_features |= COMPAT_LAZY_REFCOUNTS;
                if let Err(e) = self.rewrite_header(op) {
                    self.fc.header.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
                    return Err(e);
                }
                self.lazy = true;
            } else {
                // Refcounts become accurate on disk before the bit that allowed otherwise
                // goes away.
                self.flush_caches(op, true)?;
                self.clear_dirty_bit(op)?;
                self.fc.header.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
                if let Err(e) = self.rewrite_header(op) {
                    self.fc.header.compatible_features |= COMPAT_LAZY_REFCOUNTS;
                    return Err(e);
                }
                self.lazy = false;
            }
        }

        if let Some(size) = opts.size.filter(|&s| s != 0) {
            self.resize_as(op, size)?;
        }

        if new_version < old_version {
            p.start(3);
            self.downgrade(&mut p)?;
        }
        if new_version != old_version || new_bits != old_bits {
            // The geometry or the header layout changed: rebuild everything from disk.
            let lazy = self.lazy;
            self.reopen(op)?;
            self.lazy = lazy && self.fc.header.version >= 3;
        }
        Ok(())
    }

    /// Clears the dirty bit after the caches were made durable by the caller.
    fn clear_dirty_bit(&mut self, op: Op) -> Result<()> {
        if !self.is_dirty() {
            return Ok(());
        }
        let v = self.fc.header.incompatible_features & !INCOMPAT_DIRTY;
        self.metadata_write_sync(
            op,
            "clear the dirty bit",
            &v.to_be_bytes(),
            crate::image::HDR_INCOMPAT,
        )?;
        self.fc.header.incompatible_features = v;
        Ok(())
    }

    /// QEMU's `qcow2_upgrade` to version 3.
    fn upgrade(&mut self, p: &mut Progress<'_>) -> Result<()> {
        let op = Op::Amend;
        p.report(0, 2);
        let need_update = self
            .snapshots
            .entries()
            .iter()
            .any(|s| s.extra_data_size < qcow2_format::snapshot::SNAPSHOT_V3_MIN_EXTRA_DATA);
        if need_update {
            // The table is always written in the v3 layout.
            let table = self.snapshots.table().clone();
            self.with_snapshots(op, |snaps, img| snaps.write_table(img, table))
                .map_err(|e| {
                    refused(
                        format!(
                            "Failed to update the snapshot table: {}",
                            crate::image::strerror(e.errno())
                        ),
                        None,
                        e.errno(),
                    )
                })?;
        }
        p.report(1, 2);
        let h = &mut self.fc.header;
        let saved = h.clone();
        h.version = 3;
        h.refcount_order = 4;
        h.compression_type = 0;
        if let Err(e) = self.rewrite_header(op) {
            self.fc.header = saved;
            return Err(e);
        }
        p.report(2, 2);
        Ok(())
    }

    /// QEMU's `qcow2_downgrade` to version 2.
    fn downgrade(&mut self, p: &mut Progress<'_>) -> Result<()> {
        let op = Op::Amend;
        if self.fc.header.refcount_order != 4 {
            return Err(refused(
                "compat=0.10 requires refcount_bits=16",
                None,
                ENOTSUP,
            ));
        }
        let size = self.virtual_size();
        if self
            .snapshots
            .entries()
            .iter()
            .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size != size)
        {
            return Err(refused(
                "Internal snapshots prevent downgrade of image",
                None,
                ENOTSUP,
            ));
        }
        if self.is_dirty() {
            self.flush_caches(op, true)?;
            self.engine.release_quarantine(&mut self.caches);
            self.clear_dirty_bit(op)?;
        }
        if self.data.is_some() {
            return Err(refused(
                "Cannot downgrade an image with a data file",
                None,
                ENOTSUP,
            ));
        }
        let other = self.fc.header.incompatible_features & !INCOMPAT_COMPRESSION;
        if other != 0 {
            return Err(refused(
                format!("Cannot downgrade an image with incompatible features {other:#x} set"),
                None,
                ENOTSUP,
            ));
        }
        self.fc.header.compatible_features = 0;
        self.fc.header.autoclear_features = 0;
        self.lazy = false;
        self.expand_zero_clusters(p)?;
        if self.fc.header.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            if self.has_compressed_clusters()? {
                return Err(refused(
                    "Cannot downgrade an image with zstd compression type and existing \
                     compressed clusters",
                    None,
                    ENOTSUP,
                ));
            }
            self.fc.header.incompatible_features &= !INCOMPAT_COMPRESSION;
            self.fc.header.compression_type = 0;
        }
        let saved = self.fc.header.clone();
        let h = &mut self.fc.header;
        h.version = 2;
        h.header_length = qcow2_format::header::V2_HEADER_SIZE as u32;
        h.unknown_fields.clear();
        if let Err(e) = self.rewrite_header(op) {
            self.fc.header = saved;
            return Err(e);
        }
        Ok(())
    }

    /// Whether the active tree holds a compressed cluster.
    fn has_compressed_clusters(&mut self) -> Result<bool> {
        let op = Op::Amend;
        let cs = self.geo.cluster_size();
        for i in 0..self.l1.len() {
            let l2 = self.l1[i] & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let table = self
                .storage
                .read_vec(l2, cs as usize)
                .map_err(|e| ImageError::io(op, "read an L2 table", l2, e))?;
            if table.chunks_exact(8).any(|c| {
                let w = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
                L2Entry::from_raw(w, 0).cluster_type(self.ctx) == ClusterType::Compressed
            }) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// QEMU's `qcow2_expand_zero_clusters`: every zero cluster of the active and the snapshot
    /// trees becomes unallocated (no backing file: reads as zeros either way) or a data
    /// cluster full of zeros; a preallocated zero cluster is zeroed in place when only this
    /// table references it, else replaced like a plain one. New clusters get the L2 table's
    /// refcount (a shared table gives them as many references), COPIED iff that is 1.
    fn expand_zero_clusters(&mut self, p: &mut Progress<'_>) -> Result<()> {
        let op = Op::Amend;
        // The L2 tables are rewritten directly: the L2 cache must hold nothing stale.
        if let Err(e) = self.caches.empty(CacheId::L2) {
            return Err(self.cache_err(op, e));
        }
        let mut tables: Vec<u64> = Vec::new();
        let mut seen = HashSet::new();
        let mut push = |l1: &[u64], tables: &mut Vec<u64>| {
            for e in l1 {
                let o = e & L1E_OFFSET_MASK;
                if o != 0 && seen.insert(o) {
                    tables.push(o);
                }
            }
        };
        let active = self.l1.clone();
        push(&active, &mut tables);
        for s in self.snapshots.entries().to_vec() {
            let l1 = self.read_snapshot_l1(op, &s)?;
            push(&l1, &mut tables);
        }
        let n = tables.len() as u64;
        for (i, l2) in tables.into_iter().enumerate() {
            p.report(i as u64, n);
            self.expand_zero_in_l2(l2)?;
        }
        p.report(n, n);
        self.sync_overlap_refcounts();
        Ok(())
    }

    fn expand_zero_in_l2(&mut self, l2: u64) -> Result<()> {
        let op = Op::Amend;
        let cs = self.geo.cluster_size();
        if !self.geo.is_cluster_aligned(l2) {
            return Err(self.corruption(op, true, format!("L2 table offset {l2:#x} unaligned")));
        }
        let mut table = self
            .storage
            .read_vec(l2, cs as usize)
            .map_err(|e| ImageError::io(op, "read an L2 table", l2, e))?;
        let l2_refcount = match self
            .engine
            .get(&mut self.caches, l2 >> self.geo.cluster_bits())
        {
            Ok(r) => r,
            Err(e) => return Err(self.rc_err(op, e)),
        };
        if l2_refcount == 0 {
            return Err(self.corruption(op, true, format!("L2 table at {l2:#x} has refcount 0")));
        }
        let has_backing = self.fc.backing_file.is_some();
        let mut changed = false;
        let mut unref: Vec<u64> = Vec::new();
        let zeros = vec![0u8; cs as usize];
        for c in table.chunks_exact_mut(8) {
            let w = u64::from_be_bytes((&*c).try_into().unwrap_or([0; 8]));
            let e = L2Entry::from_raw(w, 0);
            let ty = e.cluster_type(self.ctx);
            let mut host = match ty {
                ClusterType::ZeroPlain => 0,
                ClusterType::ZeroAlloc => e.host_offset(),
                _ => continue,
            };
            if host != 0 {
                let rc = match self
                    .engine
                    .get(&mut self.caches, host >> self.geo.cluster_bits())
                {
                    Ok(r) => r,
                    Err(e) => return Err(self.rc_err(op, e)),
                };
                if !self.geo.is_cluster_aligned(host) || rc != l2_refcount {
                    // Referenced from elsewhere too: zeroing it in place would change
                    // what the other references read. Replace it instead.
                    if self.geo.is_cluster_aligned(host) {
                        unref.push(host);
                    }
                    host = 0;
                }
            }
            if host == 0 && !has_backing {
                c.copy_from_slice(&0u64.to_be_bytes());
                changed = true;
                continue;
            }
            if host == 0 {
                host = match self.engine.alloc_clusters(&mut self.caches, 1) {
                    Ok(o) => o,
                    Err(e) => return Err(self.rc_err(op, e)),
                };
                if l2_refcount > 1 {
                    if let Err(e) = self.engine.update(
                        &mut self.caches,
                        host,
                        cs,
                        Change::Increase(l2_refcount - 1),
                        DiscardType::Other,
                    ) {
                        return Err(self.rc_err(op, e));
                    }
                }
                self.sync_overlap_refcounts();
            }
            if let Err(e) = self.overlap.check(host, cs, 0) {
                return Err(self.corruption(op, true, e.to_string()));
            }
            self.storage
                .write_at(&zeros, host)
                .map_err(|e| ImageError::io(op, "write a zero cluster", host, e))?;
            let copied = if l2_refcount == 1 { OFLAG_COPIED } else { 0 };
            c.copy_from_slice(&(host | copied).to_be_bytes());
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        // Refcounts of new clusters and their zeros are durable before the table names them.
        if let Err(e) = self.caches.flush(CacheId::Refblock) {
            return Err(self.cache_err(op, e));
        }
        if let Err(e) = self
            .overlap
            .check(l2, cs, bits::ACTIVE_L2 | bits::INACTIVE_L2)
        {
            return Err(self.corruption(op, true, e.to_string()));
        }
        self.metadata_write_sync(op, "write an L2 table", &table, l2)?;
        // The table no longer references the replaced clusters (durable): drop them.
        for host in unref {
            if let Err(e) = self.engine.update(
                &mut self.caches,
                host,
                cs,
                Change::Decrease(l2_refcount),
                DiscardType::Other,
            ) {
                let err = self.rc_err(op, e);
                self.messages
                    .push(format!("qcow2_free_clusters failed: {err}"));
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_change_refcount_order` (reference §3.8), crash-safe as described in the
    /// module docs. The refusal for a refcount that does not fit happens before anything is
    /// written.
    fn change_refcount_order(&mut self, new_order: u32, p: &mut Progress<'_>) -> Result<()> {
        let op = Op::Amend;
        let g = self.geo;
        let cs = g.cluster_size();
        let cb = g.cluster_bits();
        // Everything durable and the quarantine released: the refcounts on disk are the
        // truth, and the old blocks can be read directly.
        self.flush_caches(op, true)?;
        self.engine.release_quarantine(&mut self.caches);
        let old_codec = RefcountCodec::for_geometry(&g);
        let new_codec = RefcountCodec::new(new_order).map_err(|e| ImageError::InvalidArgument {
            op,
            reason: e.to_string(),
        })?;
        let old_per_block = old_codec.entries_in(cs as usize);
        let new_per_block = new_codec.entries_in(cs as usize);
        let reftable: Vec<u64> = self.engine.reftable().to_vec();
        let file_len = self
            .storage
            .len()
            .map_err(|e| ImageError::io(op, "image length", 0, e))?;

        // Walk 1: refusal check, highest used cluster, new blocks needed below it.
        let total = reftable.len() as u64;
        let mut used_end = 0u64; // one past the highest cluster with a nonzero refcount
        let mut blocks: BTreeSet<u64> = BTreeSet::new();
        for (i, &rte) in reftable.iter().enumerate() {
            p.report(i as u64, total * 2);
            let rb = rte & REFT_OFFSET_MASK;
            if rb == 0 {
                continue;
            }
            let block = self
                .storage
                .read_vec(rb, cs as usize)
                .map_err(|e| ImageError::io(op, "read a refcount block", rb, e))?;
            for k in 0..old_per_block {
                let rc = old_codec.get(&block, k).unwrap_or(0);
                if rc == 0 {
                    continue;
                }
                let cluster = (i as u64) * old_per_block + k;
                if rc > new_codec.max() {
                    return Err(refused(
                        format!(
                            "Cannot decrease refcount entry width to {} bits: Cluster at \
                             offset {:#x} has a refcount of {rc}",
                            1u32 << new_order,
                            cluster << cb
                        ),
                        None,
                        EINVAL,
                    ));
                }
                used_end = used_end.max(cluster + 1);
                blocks.insert(cluster / new_per_block);
            }
        }
        // The new structures go right after everything in use (and after the file end):
        // clusters no metadata references and the old structures do not count.
        let base = used_end.max(file_len.div_ceil(cs));
        let mut k = 0u64;
        let (new_blocks, table_clusters) = loop {
            let mut nb = blocks.clone();
            if k > 0 {
                nb.extend((base / new_per_block)..=((base + k - 1) / new_per_block));
            }
            let entries = nb.iter().next_back().map_or(0, |&b| b + 1);
            let tc = (entries * 8).div_ceil(cs).max(1);
            let need = nb.len() as u64 + tc;
            if need <= k {
                break (nb, tc);
            }
            k = need;
        };
        let table_entries = table_clusters * cs / 8;
        let mut block_at = std::collections::BTreeMap::new();
        for (n, &b) in new_blocks.iter().enumerate() {
            block_at.insert(b, (base + n as u64) << cb);
        }
        let table_off = (base + new_blocks.len() as u64) << cb;
        let region_end = (base + k) << cb;
        if let Err(e) = self.overlap.check(base << cb, region_end - (base << cb), 0) {
            return Err(self.corruption(op, true, e.to_string()));
        }

        // Walk 2: write the new blocks (old refcounts below `base`, 1 for the new
        // structures themselves).
        let mut cached_old: Option<(u64, Vec<u8>)> = None;
        let nblocks = block_at.len() as u64;
        for (n, (&b, &off)) in block_at.iter().enumerate() {
            p.report(total + (n as u64) * total / nblocks.max(1), total * 2);
            let mut buf = vec![0u8; cs as usize];
            for e in 0..new_per_block {
                let cluster = b * new_per_block + e;
                let rc = if cluster >= base && cluster < base + k {
                    1
                } else if cluster < used_end {
                    let oi = cluster / old_per_block;
                    let rb = usize::try_from(oi)
                        .ok()
                        .and_then(|i| reftable.get(i))
                        .map_or(0, |r| r & REFT_OFFSET_MASK);
                    if rb == 0 {
                        0
                    } else {
                        if cached_old.as_ref().map(|(i, _)| *i) != Some(oi) {
                            let data = self
                                .storage
                                .read_vec(rb, cs as usize)
                                .map_err(|e| ImageError::io(op, "read a refcount block", rb, e))?;
                            cached_old = Some((oi, data));
                        }
                        cached_old.as_ref().map_or(0, |(_, d)| {
                            old_codec.get(d, cluster % old_per_block).unwrap_or(0)
                        })
                    }
                } else {
                    0
                };
                if rc != 0 {
                    let _ = new_codec.set(&mut buf, e, rc);
                }
            }
            self.storage
                .write_at(&buf, off)
                .map_err(|e| ImageError::io(op, "write a new refcount block", off, e))?;
        }
        let mut table = vec![0u8; (table_entries * 8) as usize];
        for (&b, &off) in &block_at {
            let i = b as usize * 8;
            if let Some(slot) = table.get_mut(i..i + 8) {
                slot.copy_from_slice(&off.to_be_bytes());
            }
        }
        self.storage
            .write_at(&table, table_off)
            .map_err(|e| ImageError::io(op, "write the new refcount table", table_off, e))?;
        // Invariant 4: the new structures are complete and durable before the switch.
        self.storage
            .flush()
            .map_err(|e| ImageError::io(op, "flush the new refcount structures", 0, e))?;

        // One header write switches width, table offset and size together.
        let old_blocks: Vec<u64> = self.engine.refblock_offsets().collect();
        let old_table = (
            self.engine.reftable_offset(),
            self.engine.reftable_clusters() * cs,
        );
        let mut fc = self.fc.clone();
        fc.header.refcount_order = new_order;
        fc.header.refcount_table_offset = table_off;
        fc.header.refcount_table_clusters =
            u32::try_from(table_clusters).map_err(|_| ImageError::InvalidArgument {
                op,
                reason: "the new refcount table is too large".into(),
            })?;
        let bytes = fc.to_bytes().map_err(|e| ImageError::InvalidArgument {
            op,
            reason: e.to_string(),
        })?;
        self.storage
            .write_at(&bytes, 0)
            .map_err(|e| ImageError::io(op, "switch to the new refcount structures", 0, e))
            .and_then(|()| {
                self.storage
                    .flush()
                    .map_err(|e| ImageError::io(op, "switch to the new refcount structures", 0, e))
            })
            .inspect_err(|e| {
                // Which header is durable is unknown: both structures stay (leaks at most).
                self.poison(format!("refcount structure switch failed: {e}"));
            })?;
        p.report(total * 2, total * 2);
        // Rebuild everything at the new width, then free the old structures (leaks of the
        // new ones until then).
        self.reopen(op)?;
        for off in old_blocks {
            let _ = self
                .engine
                .free_clusters(&mut self.caches, off, cs, DiscardType::Other);
        }
        if old_table.1 > 0 {
            let _ = self.engine.free_clusters(
                &mut self.caches,
                old_table.0,
                old_table.1,
                DiscardType::Other,
            );
        }
        self.sync_overlap_refcounts();
        self.flush_caches(op, true)?;
        self.engine.release_quarantine(&mut self.caches);
        Ok(())
    }
}
