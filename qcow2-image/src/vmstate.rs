//! QEMU's VM state area of a qcow2 image (`qcow2_vm_state_offset`, `bdrv_save_vmstate`):
//! guest-like bytes mapped through the L1/L2 tables like the disk, starting at the first
//! L1 entry past the ones the virtual disk needs. A VM snapshot keeps the machine state
//! there; `qemu-io`'s `read -b`/`write -b` reach it. Writes grow the L1 table as a write
//! past its end does (QEMU's `qcow2_grow_l1_table`); nothing else changes the virtual size.

use qcow2_io::Event;

use crate::error::{ImageError, Op, Result};
use crate::image::Image;

impl Image {
    /// Where the VM state area starts in the guest address space: the L1 entries the
    /// virtual size needs, times the bytes one L2 table maps.
    pub fn vm_state_offset(&self) -> u64 {
        let g = self.geometry();
        g.l1_entries_for(self.virtual_size())
            .saturating_mul(g.l2_coverage())
    }

    /// The guest offset of `[pos, pos + len)` of the VM state area, checked.
    fn vmstate_range(&self, op: Op, pos: u64, len: u64) -> Result<u64> {
        let start = self.vm_state_offset();
        match start
            .checked_add(pos)
            .and_then(|o| o.checked_add(len).map(|_| o))
        {
            Some(o) => Ok(o),
            None => Err(ImageError::OutOfRange {
                op,
                offset: pos,
                len,
                size: u64::MAX - start,
            }),
        }
    }

    /// Writes `buf` at `pos` of the VM state area (blkdebug event `vmstate_save`).
    pub fn save_vmstate(&mut self, pos: u64, buf: &[u8]) -> Result<()> {
        let op = Op::Write;
        self.check_writable(op)?;
        let offset = self.vmstate_range(op, pos, buf.len() as u64)?;
        self.storage.event(Event::VmstateSave);
        self.write_internal(op, offset, buf)
    }

    /// Reads `buf.len()` bytes at `pos` of the VM state area (blkdebug event
    /// `vmstate_load`); never-written bytes read as zero (or as the backing file, which
    /// ends before them).
    pub fn load_vmstate(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let op = Op::Read;
        let offset = self.vmstate_range(op, pos, buf.len() as u64)?;
        self.storage.event(Event::VmstateLoad);
        self.read_internal(op, offset, buf)
    }
}
