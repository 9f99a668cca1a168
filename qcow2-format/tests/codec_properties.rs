//! Property tests of the format codecs: entries, subcluster bitmaps, compressed descriptors,
//! the refcount-block codec (against a `Vec<u64>` model) and snapshot tables, plus
//! "arbitrary bytes never panic" for the parsers.

use quickcheck::{quickcheck, Arbitrary, Gen, QuickCheck, TestResult};

use qcow2_format::compressed::CompressedFormat;
use qcow2_format::entry::{
    read_l1_entry, read_l2_entry, subcluster_mask, subcluster_mask_for_bytes, write_l1_entry,
    write_l2_entry, ClusterType, L1Entry, L2Context, L2Entry, SubclusterType, L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
};
use qcow2_format::refcount::{refcount_metadata_size, RefcountCodec};
use qcow2_format::snapshot::{
    parse_snapshot_entry, parse_snapshot_table, SnapshotEntry, SnapshotReadOptions, SnapshotTable,
};
use qcow2_format::Geometry;

// ------------------------------------------------------------------------------------------
// L1 / L2 entries
// ------------------------------------------------------------------------------------------

quickcheck! {
    fn l1_entry_round_trip(offset: u64, copied: bool, index: u8) -> bool {
        let offset = offset & L1E_OFFSET_MASK;
        let e = L1Entry::new(offset, copied).unwrap();
        let mut table = vec![0u8; 256 * 8];
        write_l1_entry(&mut table, u64::from(index), e).unwrap();
        let back = read_l1_entry(&table, u64::from(index)).unwrap();
        back == e && back.l2_offset() == offset && back.is_copied() == copied
            && back.reserved_bits() == 0
    }

    fn l1_raw_words_survive(raw: u64) -> bool {
        let mut t = [0u8; 8];
        write_l1_entry(&mut t, 0, L1Entry::from_raw(raw)).unwrap();
        read_l1_entry(&t, 0).unwrap().raw() == raw && t == raw.to_be_bytes()
    }

    fn l2_standard_round_trip(raw: u64, index: u8) -> bool {
        let e = L2Entry::from_raw(raw, 0);
        let mut table = vec![0u8; 256 * 8];
        write_l2_entry(&mut table, u64::from(index), e, false).unwrap();
        read_l2_entry(&table, u64::from(index), false).unwrap() == e
    }

    fn l2_extended_round_trip(raw: u64, bitmap: u64, index: u8) -> bool {
        let e = L2Entry::from_raw(raw, bitmap);
        let mut table = vec![0u8; 256 * 16];
        write_l2_entry(&mut table, u64::from(index), e, true).unwrap();
        let back = read_l2_entry(&table, u64::from(index), true).unwrap();
        let i = usize::from(index) * 16;
        back == e
            && table[i..i + 8] == raw.to_be_bytes()
            && table[i + 8..i + 16] == bitmap.to_be_bytes()
            && back.alloc_bitmap() == bitmap as u32
            && back.zero_bitmap() == (bitmap >> 32) as u32
    }

    fn l2_normal_constructor(offset: u64, copied: bool, bitmap: u64) -> bool {
        let offset = offset & L2E_OFFSET_MASK;
        let e = L2Entry::normal(offset, copied).unwrap().with_bitmap(bitmap);
        e.host_offset() == offset
            && e.is_copied() == copied
            && !e.is_compressed()
            && e.reserved_bits() == 0
            && e.bitmap() == bitmap
            && e.with_copied(!copied).is_copied() != copied
    }

    fn out_of_range_indexes_are_errors(len: u8, index: u64) -> TestResult {
        let table = vec![0u8; usize::from(len)];
        let entries = u64::from(len) / 8;
        if index < entries {
            return TestResult::discard();
        }
        TestResult::from_bool(
            read_l1_entry(&table, index).is_err()
                && read_l2_entry(&table, index, false).is_err()
                && read_l2_entry(&table, index / 2, true).is_err() == (index / 2 >= u64::from(len) / 16),
        )
    }
}

/// An image context for classification properties.
#[derive(Debug, Clone, Copy)]
struct Ctx(L2Context);

impl Arbitrary for Ctx {
    fn arbitrary(g: &mut Gen) -> Self {
        Ctx(L2Context::new(bool::arbitrary(g), bool::arbitrary(g)))
    }
}

/// L2 words biased towards interesting shapes (offset 0, flags, sparse bitmaps).
#[derive(Debug, Clone, Copy)]
struct Words(u64, u64);

impl Arbitrary for Words {
    fn arbitrary(g: &mut Gen) -> Self {
        let flags = *g
            .choose(&[0u64, 1 << 63, 1 << 62, 1, (1 << 63) | 1, 3 << 62])
            .unwrap_or(&0);
        let offset = if bool::arbitrary(g) {
            0
        } else {
            u64::arbitrary(g) & L2E_OFFSET_MASK
        };
        let extra = if u8::arbitrary(g) < 32 {
            u64::arbitrary(g)
        } else {
            0
        };
        let bitmap = match u8::arbitrary(g) % 4 {
            0 => 0,
            1 => u64::from(u32::arbitrary(g)),
            2 => u64::from(u32::arbitrary(g)) << 32,
            _ => u64::arbitrary(g),
        };
        Words(flags | offset | extra, bitmap)
    }
}

quickcheck! {
    fn subcluster_types_follow_the_cluster_type(w: Words, ctx: Ctx) -> bool {
        let ctx = ctx.0;
        let e = L2Entry::from_raw(w.0, w.1);
        let ty = e.cluster_type(ctx);
        (0..32).all(|i| {
            let st = e.subcluster_type(ctx, i).unwrap();
            match ty {
                ClusterType::Compressed => st == SubclusterType::Compressed,
                ClusterType::ZeroPlain => st == SubclusterType::ZeroPlain && !ctx.extended_l2,
                ClusterType::ZeroAlloc => st == SubclusterType::ZeroAlloc && !ctx.extended_l2,
                ClusterType::Normal => matches!(
                    st,
                    SubclusterType::Normal
                        | SubclusterType::ZeroAlloc
                        | SubclusterType::UnallocatedAlloc
                        | SubclusterType::Invalid
                ),
                ClusterType::Unallocated => matches!(
                    st,
                    SubclusterType::ZeroPlain
                        | SubclusterType::UnallocatedPlain
                        | SubclusterType::Invalid
                ),
            }
        }) && e.subcluster_type(ctx, 32).is_err()
    }

    fn subcluster_runs_match_per_index_types(w: Words, from: u8) -> TestResult {
        let ctx = L2Context::new(true, false);
        let from = u32::from(from % 32);
        let e = L2Entry::from_raw(w.0, w.1);
        let ty = e.subcluster_type(ctx, from).unwrap();
        match e.subcluster_run(ctx, from) {
            Err(_) => TestResult::from_bool(ty == SubclusterType::Invalid),
            Ok((rty, n)) => {
                let same = (from..from + n)
                    .all(|i| e.subcluster_type(ctx, i).unwrap() == rty);
                let stops = from + n == 32 || e.subcluster_type(ctx, from + n).unwrap() != rty;
                TestResult::from_bool(rty == ty && n >= 1 && same && stops)
            }
        }
    }

    fn problems_never_panic(w: Words, ctx: Ctx, bits: u8) -> bool {
        let ctx = ctx.0;
        let bits = 9 + u32::from(bits) % 13;
        let Ok(g) = Geometry::new(bits, 4, ctx.extended_l2) else {
            return true;
        };
        let e = L2Entry::from_raw(w.0, w.1);
        let p = e.problems(ctx, &g);
        p.first().cloned().map(Err).unwrap_or(Ok(())) == e.validate(ctx, &g)
            && L1Entry::from_raw(w.0).validate(&g).is_ok()
                == (w.0 & 0x7f00_0000_0000_01ff == 0 && g.is_cluster_aligned(w.0 & L1E_OFFSET_MASK))
    }

    fn subcluster_mask_matches_model(a: u8, b: u8) -> bool {
        let (a, b) = (u32::from(a % 34), u32::from(b % 34));
        let model = if a <= b && b <= 32 {
            Some((a..b).fold(0u32, |m, i| m | (1 << i)))
        } else {
            None
        };
        subcluster_mask(a, b).ok() == model
    }

    fn byte_range_mask_matches_model(bits: u8, offset: u32, len: u32) -> bool {
        let bits = 14 + u32::from(bits) % 8;
        let g = Geometry::new(bits, 4, true).unwrap();
        let cs = g.cluster_size();
        let offset = u64::from(offset) % (cs + 2);
        let len = u64::from(len) % (cs + 2);
        let sc = g.subcluster_size();
        let model = if offset + len > cs {
            None
        } else {
            Some((0..32u64).fold(0u32, |m, i| {
                let (s, e) = (i * sc, (i + 1) * sc);
                if len > 0 && offset < e && offset + len > s {
                    m | (1 << i)
                } else {
                    m
                }
            }))
        };
        subcluster_mask_for_bytes(&g, offset, len).ok() == model
    }
}

// ------------------------------------------------------------------------------------------
// Compressed descriptors
// ------------------------------------------------------------------------------------------

quickcheck! {
    fn compressed_round_trip_every_cluster_size(offset: u64, len: u32) -> bool {
        (9..=21u32).all(|bits| {
            let f = CompressedFormat::new(bits).unwrap();
            let g = Geometry::new(bits, 4, false).unwrap();
            let cs = 1u64 << bits;
            // QEMU writes at most one cluster of compressed data.
            let len = 1 + u64::from(len) % cs;
            let offset = offset % (f.offset_limit() + 1);
            let e = f.encode(offset, len).unwrap();
            let d = f.decode(e).unwrap();
            let end = offset + d.compressed_size();
            let clusters = d.host_clusters(&g).unwrap();
            e.is_compressed()
                && !e.is_copied()
                && d.host_offset() == offset
                && d.compressed_size() >= len
                && d.compressed_size() - len < 512
                && end % 512 == 0
                && *clusters.start() == offset >> bits
                && *clusters.end() == (end - 1) >> bits
                && f.decode_raw(e.raw_entry()) == d
        })
    }

    fn compressed_decode_encode_identity(word: u64, bits: u8) -> bool {
        let bits = 9 + u32::from(bits) % 13;
        let f = CompressedFormat::new(bits).unwrap();
        let d = f.decode_raw(word);
        match f.to_entry(&d) {
            // Re-encoding a decodable descriptor gives back the descriptor bits.
            Ok(e) => e.raw_entry() == (word & ((1 << 62) - 1)) | (1 << 62) && d.offset_in_limit(&f),
            Err(_) => !d.offset_in_limit(&f),
        }
    }

    fn compressed_encode_rejects_what_does_not_fit(offset: u64, len: u64, bits: u8) -> bool {
        let bits = 9 + u32::from(bits) % 13;
        let f = CompressedFormat::new(bits).unwrap();
        let ok = len > 0
            && offset <= f.offset_limit()
            && offset.checked_add(len - 1).is_some_and(|last| last / 512 - offset / 512 <= f.max_extra_sectors());
        f.describe(offset, len).is_ok() == ok
    }
}

// ------------------------------------------------------------------------------------------
// Refcount codec against a model
// ------------------------------------------------------------------------------------------

/// A random sequence of refcount writes for one block.
#[derive(Debug, Clone)]
struct RefOps {
    block_len: usize,
    ops: Vec<(u64, u64)>,
}

impl Arbitrary for RefOps {
    fn arbitrary(g: &mut Gen) -> Self {
        let block_len = 8 * (1 + usize::arbitrary(g) % 8);
        let n = usize::arbitrary(g) % 64;
        let ops = (0..n)
            .map(|_| {
                (
                    u64::arbitrary(g) % (block_len as u64 * 8),
                    u64::arbitrary(g),
                )
            })
            .collect();
        RefOps { block_len, ops }
    }
}

fn refcount_model_holds(order: u32, ops: &RefOps) -> bool {
    let Ok(c) = RefcountCodec::new(order) else {
        return false;
    };
    let entries = c.entries_in(ops.block_len);
    let mut block = vec![0u8; ops.block_len];
    let mut model = vec![0u64; entries as usize];
    for &(index, raw) in &ops.ops {
        let index = index % entries;
        // Mix in-range values with overflowing ones to exercise the error path.
        let value = if raw & 1 == 0 { raw & c.max() } else { raw };
        let before = block.clone();
        match c.set(&mut block, index, value) {
            Ok(()) => {
                if value > c.max() {
                    return false;
                }
                model[index as usize] = value;
            }
            // A rejected write leaves the block untouched.
            Err(_) => {
                if value <= c.max() || block != before {
                    return false;
                }
            }
        }
        // Setting one entry never changes another.
        if (0..entries).any(|i| c.get(&block, i).ok() != Some(model[i as usize])) {
            return false;
        }
    }
    c.get(&block, entries).is_err()
}

quickcheck! {
    fn refcount_order_0(ops: RefOps) -> bool { refcount_model_holds(0, &ops) }
    fn refcount_order_1(ops: RefOps) -> bool { refcount_model_holds(1, &ops) }
    fn refcount_order_2(ops: RefOps) -> bool { refcount_model_holds(2, &ops) }
    fn refcount_order_3(ops: RefOps) -> bool { refcount_model_holds(3, &ops) }
    fn refcount_order_4(ops: RefOps) -> bool { refcount_model_holds(4, &ops) }
    fn refcount_order_5(ops: RefOps) -> bool { refcount_model_holds(5, &ops) }
    fn refcount_order_6(ops: RefOps) -> bool { refcount_model_holds(6, &ops) }

    fn refcount_byte_layout(order: u8, index: u16, value: u64) -> bool {
        // The codec agrees with the spec's formula for where an entry lives.
        let order = u32::from(order % 7);
        let c = RefcountCodec::new(order).unwrap();
        let bits = 1u64 << order;
        let mut block = vec![0u8; 512];
        let index = u64::from(index) % c.entries_in(512);
        let value = value & c.max();
        c.set(&mut block, index, value).unwrap();
        if bits < 8 {
            let byte = (index * bits / 8) as usize;
            let shift = (index * bits % 8) as u32;
            block[byte] == (value as u8) << shift
        } else {
            let n = (bits / 8) as usize;
            let at = index as usize * n;
            block[at..at + n] == value.to_be_bytes()[8 - n..]
        }
    }

    fn refcount_metadata_is_a_fixed_point(clusters: u32, bits: u8, order: u8) -> bool {
        let cs = 1u64 << (9 + u32::from(bits) % 13);
        let order = u32::from(order % 7);
        let m = refcount_metadata_size(u64::from(clusters), cs, order, false).unwrap();
        let per_block = (cs * 8) >> order;
        let per_table = cs / 8;
        let total = u64::from(clusters) + m.refblocks + m.reftable_clusters;
        m.refblocks == total.div_ceil(per_block)
            && m.reftable_clusters == m.refblocks.div_ceil(per_table)
            && m.bytes == (m.refblocks + m.reftable_clusters) * cs
            && refcount_metadata_size(u64::from(clusters), cs, order, true)
                .is_ok_and(|g| g.bytes >= m.bytes)
    }
}

// ------------------------------------------------------------------------------------------
// Snapshot tables
// ------------------------------------------------------------------------------------------

/// A snapshot entry as QEMU could hold it after a read (unknown data within the limit).
#[derive(Debug, Clone)]
struct ArbEntry(SnapshotEntry);

fn small_bytes(g: &mut Gen, max: usize) -> Vec<u8> {
    let n = usize::arbitrary(g) % (max + 1);
    (0..n).map(|_| u8::arbitrary(g)).collect()
}

impl Arbitrary for ArbEntry {
    fn arbitrary(g: &mut Gen) -> Self {
        let unknown = if bool::arbitrary(g) {
            Vec::new()
        } else {
            small_bytes(g, 1000)
        };
        ArbEntry(SnapshotEntry {
            l1_table_offset: u64::arbitrary(g),
            l1_size: u32::arbitrary(g),
            id: small_bytes(g, 12),
            name: small_bytes(g, 40),
            date_sec: u32::arbitrary(g),
            date_nsec: u32::arbitrary(g),
            vm_clock_nsec: u64::arbitrary(g),
            vm_state_size: if bool::arbitrary(g) {
                u64::from(u32::arbitrary(g))
            } else {
                u64::arbitrary(g)
            },
            disk_size: u64::arbitrary(g),
            icount: u64::arbitrary(g),
            extra_data_size: 24 + unknown.len() as u32,
            unknown_extra_data: unknown,
        })
    }
}

/// What a written entry reads back as: QEMU always writes at least the 24 known bytes.
fn normalized(mut e: SnapshotEntry) -> SnapshotEntry {
    e.extra_data_size = e.extra_data_size.max(24);
    e
}

quickcheck! {
    fn snapshot_entry_round_trip(e: ArbEntry, pad: u8) -> bool {
        let e = e.0;
        let mut bytes = vec![0u8; usize::from(pad % 4) * 8];
        let pos = bytes.len();
        e.write_to(0, &mut bytes).unwrap();
        let opts = SnapshotReadOptions { virtual_size: 0, repair: false };
        let p = parse_snapshot_entry(&bytes, pos, 0, &opts).unwrap();
        p.entry == e && p.start == pos && p.end == bytes.len()
            && p.end - p.start == e.encoded_len() as usize
            && p.padded_len() % 8 == 0
    }

    fn snapshot_table_round_trip(entries: Vec<ArbEntry>, size: u64) -> bool {
        let t = SnapshotTable { entries: entries.into_iter().take(16).map(|e| e.0).collect() };
        let bytes = t.to_bytes().unwrap();
        let opts = SnapshotReadOptions { virtual_size: size, repair: false };
        let read = parse_snapshot_table(&bytes, t.len() as u32, &opts).unwrap();
        read.table == t
            && read.size == bytes.len() as u64
            && t.serialized_size().unwrap() == bytes.len() as u64
            && read.table.to_bytes().unwrap() == bytes
    }

    fn snapshot_parse_arbitrary_bytes_never_panics(bytes: Vec<u8>, nb: u32, pos: usize, size: u64) -> bool {
        for repair in [false, true] {
            let opts = SnapshotReadOptions { virtual_size: size, repair };
            let _ = parse_snapshot_entry(&bytes, pos % (bytes.len() + 9), nb, &opts);
            for n in [nb, nb % 8, u32::MAX] {
                if let Ok(read) = parse_snapshot_table(&bytes, n, &opts) {
                    // Whatever parsed can be written and reads back (normalized).
                    let t = SnapshotTable {
                        entries: read.table.entries.iter().cloned().map(normalized).collect(),
                    };
                    let out = t.to_bytes().unwrap();
                    let again = parse_snapshot_table(&out, t.len() as u32, &opts).unwrap();
                    if again.table != t || read.size > bytes.len() as u64 {
                        return false;
                    }
                }
            }
        }
        true
    }

    fn snapshot_parse_mutated_tables_never_panics(entries: Vec<ArbEntry>, flips: Vec<(u16, u8)>) -> bool {
        let t = SnapshotTable { entries: entries.into_iter().take(6).map(|e| e.0).collect() };
        let mut bytes = t.to_bytes().unwrap();
        if bytes.is_empty() {
            return true;
        }
        let len = bytes.len();
        for (at, v) in flips {
            bytes[usize::from(at) % len] ^= v;
        }
        for repair in [false, true] {
            let opts = SnapshotReadOptions { virtual_size: 1, repair };
            if let Ok(read) = parse_snapshot_table(&bytes, t.len() as u32, &opts) {
                let n = read.table.entries.len();
                if n + read.discarded_snapshots as usize != t.len() {
                    return false;
                }
            }
        }
        true
    }
}

/// Large-input variant: arbitrary bytes with a bigger generator size, so that entries with
/// long strings and extra data show up.
#[test]
fn snapshot_parse_large_arbitrary_inputs() {
    fn prop(bytes: Vec<u8>, nb: u8) -> bool {
        let opts = SnapshotReadOptions {
            virtual_size: 0,
            repair: false,
        };
        let _ = parse_snapshot_table(&bytes, u32::from(nb), &opts);
        true
    }
    QuickCheck::new()
        .rng(Gen::new(4096))
        .tests(200)
        .quickcheck(prop as fn(Vec<u8>, u8) -> bool);
}
