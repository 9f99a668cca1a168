//! References of persistent dirty bitmaps (QEMU's `qcow2_check_bitmaps_refcounts`): the
//! bitmap directory, every bitmap table and every bitmap data cluster.

use qcow2_format::features::AUTOCLEAR_BITMAPS;
use qcow2_format::limits::MAX_BITMAP_DIRECTORY_SIZE;

use crate::engine::{Res, Run};
use crate::finding::{errno_of, EINVAL};
use crate::io::{be64_at, pread};

const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;
const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
const BME_MAX_GRANULARITY_BITS: u8 = 31;
const BME_MIN_GRANULARITY_BITS: u8 = 9;
const BME_MAX_NAME_SIZE: u16 = 1023;
const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
const BME_FLAG_IN_USE: u32 = 1;
const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;
const DIR_ENTRY_FIXED: usize = 24;

/// One bitmap's table, as `bitmap_list_load` keeps it.
struct BitmapTable {
    offset: u64,
    size: u32,
}

/// QEMU's `check_table_entry`.
fn table_entry_ok(entry: u64, cs: u64) -> bool {
    if entry & BME_TABLE_ENTRY_RESERVED_MASK != 0 {
        return false;
    }
    let offset = entry & BME_TABLE_ENTRY_OFFSET_MASK;
    if offset != 0 && (entry & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 || offset % cs != 0) {
        return false;
    }
    true
}

/// `bitmap_list_load` without the error messages (the checker discards them): the
/// directory must hold exactly `nb_bitmaps` valid entries and nothing else.
fn load_list(dir: &[u8], nb_bitmaps: u32, cs: u64, virtual_size: u64) -> Option<Vec<BitmapTable>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let end = dir.len();
    let mut count = 0u32;
    while pos < end {
        if pos + DIR_ENTRY_FIXED > end {
            return None;
        }
        count += 1;
        if count > nb_bitmaps {
            return None;
        }
        let e = &dir[pos..pos + DIR_ENTRY_FIXED];
        let table_offset = be64_at(e, 0);
        let table_size = u32::from_be_bytes([e[8], e[9], e[10], e[11]]);
        let flags = u32::from_be_bytes([e[12], e[13], e[14], e[15]]);
        let ty = e[16];
        let granularity_bits = e[17];
        let name_size = u16::from_be_bytes([e[18], e[19]]);
        let extra_data_size = u32::from_be_bytes([e[20], e[21], e[22], e[23]]);
        let entry_size =
            (DIR_ENTRY_FIXED as u64 + u64::from(name_size) + u64::from(extra_data_size))
                .div_ceil(8)
                * 8;
        let next = pos as u64 + entry_size;
        if next > end as u64 {
            return None;
        }
        if extra_data_size != 0 {
            return None;
        }
        // check_dir_entry
        let bad = table_size == 0
            || table_offset == 0
            || table_offset % cs != 0
            || u64::from(table_size) > BME_MAX_TABLE_SIZE
            || !(BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS).contains(&granularity_bits)
            || flags & BME_RESERVED_FLAGS != 0
            || name_size > BME_MAX_NAME_SIZE
            || ty != 1;
        if bad {
            return None;
        }
        let phys = u64::from(table_size) * cs;
        if phys > BME_MAX_PHYS_SIZE {
            return None;
        }
        if flags & BME_FLAG_IN_USE == 0 && virtual_size > (phys * 8) << granularity_bits {
            return None;
        }
        out.push(BitmapTable {
            offset: table_offset,
            size: table_size,
        });
        pos = next as usize;
    }
    if count != nb_bitmaps || pos != end {
        return None;
    }
    Some(out)
}

/// `qcow2_check_bitmaps_refcounts`. A directory or table that cannot be loaded is a
/// corruption and fails the check (`EINVAL` or the read error), as in QEMU.
pub(crate) fn check_bitmaps_refcounts(run: &mut Run<'_, '_>, res: &mut Res) -> Result<(), i32> {
    let img = run.image();
    let Some(ext) = img.ext.bitmaps else {
        return Ok(());
    };
    if img.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 || ext.nb_bitmaps == 0 {
        return Ok(());
    }
    let (cs, vsize) = (img.cs, img.virtual_size);
    let storage = img.storage.clone();
    run.inc_refcounts(res, ext.directory_offset as i64, ext.directory_size as i64)?;
    if ext.directory_size == 0 || ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
        res.corruptions += 1;
        return Err(EINVAL);
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    if pread(&*storage, &mut dir, ext.directory_offset).is_err() {
        res.corruptions += 1;
        return Err(EINVAL);
    }
    let Some(list) = load_list(&dir, ext.nb_bitmaps, cs, vsize) else {
        res.corruptions += 1;
        return Err(EINVAL);
    };
    for bm in list {
        run.inc_refcounts(res, bm.offset as i64, i64::from(bm.size) * 8)?;
        // Bounded by check_dir_entry: size * cluster_size <= 512 MiB, so at most 8 MiB here.
        let mut table = vec![0u8; bm.size as usize * 8];
        if let Err(e) = pread(&*storage, &mut table, bm.offset) {
            res.corruptions += 1;
            return Err(errno_of(&e));
        }
        let entries: Vec<u64> = (0..bm.size as usize)
            .map(|i| be64_at(&table, i * 8))
            .collect();
        if entries.iter().any(|&e| !table_entry_ok(e, cs)) {
            res.corruptions += 1;
            return Err(EINVAL);
        }
        for e in entries {
            let offset = e & BME_TABLE_ENTRY_OFFSET_MASK;
            if offset != 0 {
                run.inc_refcounts(res, offset as i64, cs as i64)?;
            }
        }
    }
    Ok(())
}
