//! References of persistent dirty bitmaps (QEMU's `qcow2_check_bitmaps_refcounts`): the
//! bitmap directory, every bitmap table and every bitmap data cluster.

use qcow2_format::bitmap::{parse_directory, table_entry_ok, BME_TABLE_ENTRY_OFFSET_MASK};
use qcow2_format::features::AUTOCLEAR_BITMAPS;
use qcow2_format::limits::MAX_BITMAP_DIRECTORY_SIZE;

use crate::engine::{Res, Run};
use crate::finding::{errno_of, EINVAL};
use crate::io::{be64_at, pread};

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
    let Ok(list) = parse_directory(&dir, ext.nb_bitmaps, cs, vsize) else {
        res.corruptions += 1;
        return Err(EINVAL);
    };
    for bm in list {
        let (offset, size) = (bm.bitmap_table_offset, bm.bitmap_table_size);
        run.inc_refcounts(res, offset as i64, i64::from(size) * 8)?;
        // Bounded by check_dir_entry: size * cluster_size <= 512 MiB, so at most 8 MiB here.
        let mut table = vec![0u8; size as usize * 8];
        if let Err(e) = pread(&*storage, &mut table, offset) {
            res.corruptions += 1;
            return Err(errno_of(&e));
        }
        let entries: Vec<u64> = (0..size as usize).map(|i| be64_at(&table, i * 8)).collect();
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
