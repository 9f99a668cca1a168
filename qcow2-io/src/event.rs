//! The engine's named I/O events: QEMU's blkdebug event names, reported at the same points.

use std::fmt;
use std::str::FromStr;

/// A named point in the engine's I/O, reported to the storage just before the I/O it names
/// (QEMU's `BlkdebugEvent`, same names). Fault-injecting backends arm their rules on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Event {
    /// blkdebug `l1_update`.
    L1Update,
    /// blkdebug `l1_grow_alloc_table`.
    L1GrowAllocTable,
    /// blkdebug `l1_grow_write_table`.
    L1GrowWriteTable,
    /// blkdebug `l1_grow_activate_table`.
    L1GrowActivateTable,
    /// blkdebug `l2_load`.
    L2Load,
    /// blkdebug `l2_update`.
    L2Update,
    /// blkdebug `l2_update_compressed`.
    L2UpdateCompressed,
    /// blkdebug `l2_alloc_cow_read`.
    L2AllocCowRead,
    /// blkdebug `l2_alloc_write`.
    L2AllocWrite,
    /// blkdebug `read_aio`.
    ReadAio,
    /// blkdebug `read_backing_aio`.
    ReadBackingAio,
    /// blkdebug `read_compressed`.
    ReadCompressed,
    /// blkdebug `write_aio`.
    WriteAio,
    /// blkdebug `write_compressed`.
    WriteCompressed,
    /// blkdebug `vmstate_load`.
    VmstateLoad,
    /// blkdebug `vmstate_save`.
    VmstateSave,
    /// blkdebug `cow_read`.
    CowRead,
    /// blkdebug `cow_write`.
    CowWrite,
    /// blkdebug `reftable_load`.
    ReftableLoad,
    /// blkdebug `reftable_grow`.
    ReftableGrow,
    /// blkdebug `reftable_update`.
    ReftableUpdate,
    /// blkdebug `refblock_load`.
    RefblockLoad,
    /// blkdebug `refblock_update`.
    RefblockUpdate,
    /// blkdebug `refblock_update_part`.
    RefblockUpdatePart,
    /// blkdebug `refblock_alloc`.
    RefblockAlloc,
    /// blkdebug `refblock_alloc_hookup`.
    RefblockAllocHookup,
    /// blkdebug `refblock_alloc_write`.
    RefblockAllocWrite,
    /// blkdebug `refblock_alloc_write_blocks`.
    RefblockAllocWriteBlocks,
    /// blkdebug `refblock_alloc_write_table`.
    RefblockAllocWriteTable,
    /// blkdebug `refblock_alloc_switch_table`.
    RefblockAllocSwitchTable,
    /// blkdebug `cluster_alloc`.
    ClusterAlloc,
    /// blkdebug `cluster_alloc_bytes`.
    ClusterAllocBytes,
    /// blkdebug `cluster_free`.
    ClusterFree,
    /// blkdebug `flush_to_os`.
    FlushToOs,
    /// blkdebug `flush_to_disk`.
    FlushToDisk,
    /// blkdebug `pwritev_rmw_head`.
    PwritevRmwHead,
    /// blkdebug `pwritev_rmw_after_head`.
    PwritevRmwAfterHead,
    /// blkdebug `pwritev_rmw_tail`.
    PwritevRmwTail,
    /// blkdebug `pwritev_rmw_after_tail`.
    PwritevRmwAfterTail,
    /// blkdebug `pwritev`.
    Pwritev,
    /// blkdebug `pwritev_zero`.
    PwritevZero,
    /// blkdebug `pwritev_done`.
    PwritevDone,
    /// blkdebug `empty_image_prepare`.
    EmptyImagePrepare,
    /// blkdebug `l1_shrink_write_table`.
    L1ShrinkWriteTable,
    /// blkdebug `l1_shrink_free_l2_clusters`.
    L1ShrinkFreeL2Clusters,
    /// blkdebug `cor_write`.
    CorWrite,
    /// blkdebug `cluster_alloc_space`.
    ClusterAllocSpace,
    /// blkdebug `none`.
    None,
}

impl Event {
    /// Every event, in QEMU's declaration order.
    pub const ALL: [Event; 48] = [
        Event::L1Update,
        Event::L1GrowAllocTable,
        Event::L1GrowWriteTable,
        Event::L1GrowActivateTable,
        Event::L2Load,
        Event::L2Update,
        Event::L2UpdateCompressed,
        Event::L2AllocCowRead,
        Event::L2AllocWrite,
        Event::ReadAio,
        Event::ReadBackingAio,
        Event::ReadCompressed,
        Event::WriteAio,
        Event::WriteCompressed,
        Event::VmstateLoad,
        Event::VmstateSave,
        Event::CowRead,
        Event::CowWrite,
        Event::ReftableLoad,
        Event::ReftableGrow,
        Event::ReftableUpdate,
        Event::RefblockLoad,
        Event::RefblockUpdate,
        Event::RefblockUpdatePart,
        Event::RefblockAlloc,
        Event::RefblockAllocHookup,
        Event::RefblockAllocWrite,
        Event::RefblockAllocWriteBlocks,
        Event::RefblockAllocWriteTable,
        Event::RefblockAllocSwitchTable,
        Event::ClusterAlloc,
        Event::ClusterAllocBytes,
        Event::ClusterFree,
        Event::FlushToOs,
        Event::FlushToDisk,
        Event::PwritevRmwHead,
        Event::PwritevRmwAfterHead,
        Event::PwritevRmwTail,
        Event::PwritevRmwAfterTail,
        Event::Pwritev,
        Event::PwritevZero,
        Event::PwritevDone,
        Event::EmptyImagePrepare,
        Event::L1ShrinkWriteTable,
        Event::L1ShrinkFreeL2Clusters,
        Event::CorWrite,
        Event::ClusterAllocSpace,
        Event::None,
    ];

    /// The blkdebug name of this event.
    pub const fn name(self) -> &'static str {
        match self {
            Event::L1Update => "l1_update",
            Event::L1GrowAllocTable => "l1_grow_alloc_table",
            Event::L1GrowWriteTable => "l1_grow_write_table",
            Event::L1GrowActivateTable => "l1_grow_activate_table",
            Event::L2Load => "l2_load",
            Event::L2Update => "l2_update",
            Event::L2UpdateCompressed => "l2_update_compressed",
            Event::L2AllocCowRead => "l2_alloc_cow_read",
            Event::L2AllocWrite => "l2_alloc_write",
            Event::ReadAio => "read_aio",
            Event::ReadBackingAio => "read_backing_aio",
            Event::ReadCompressed => "read_compressed",
            Event::WriteAio => "write_aio",
            Event::WriteCompressed => "write_compressed",
            Event::VmstateLoad => "vmstate_load",
            Event::VmstateSave => "vmstate_save",
            Event::CowRead => "cow_read",
            Event::CowWrite => "cow_write",
            Event::ReftableLoad => "reftable_load",
            Event::ReftableGrow => "reftable_grow",
            Event::ReftableUpdate => "reftable_update",
            Event::RefblockLoad => "refblock_load",
            Event::RefblockUpdate => "refblock_update",
            Event::RefblockUpdatePart => "refblock_update_part",
            Event::RefblockAlloc => "refblock_alloc",
            Event::RefblockAllocHookup => "refblock_alloc_hookup",
            Event::RefblockAllocWrite => "refblock_alloc_write",
            Event::RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
            Event::RefblockAllocWriteTable => "refblock_alloc_write_table",
            Event::RefblockAllocSwitchTable => "refblock_alloc_switch_table",
            Event::ClusterAlloc => "cluster_alloc",
            Event::ClusterAllocBytes => "cluster_alloc_bytes",
            Event::ClusterFree => "cluster_free",
            Event::FlushToOs => "flush_to_os",
            Event::FlushToDisk => "flush_to_disk",
            Event::PwritevRmwHead => "pwritev_rmw_head",
            Event::PwritevRmwAfterHead => "pwritev_rmw_after_head",
            Event::PwritevRmwTail => "pwritev_rmw_tail",
            Event::PwritevRmwAfterTail => "pwritev_rmw_after_tail",
            Event::Pwritev => "pwritev",
            Event::PwritevZero => "pwritev_zero",
            Event::PwritevDone => "pwritev_done",
            Event::EmptyImagePrepare => "empty_image_prepare",
            Event::L1ShrinkWriteTable => "l1_shrink_write_table",
            Event::L1ShrinkFreeL2Clusters => "l1_shrink_free_l2_clusters",
            Event::CorWrite => "cor_write",
            Event::ClusterAllocSpace => "cluster_alloc_space",
            Event::None => "none",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An event name that blkdebug does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEvent(pub String);

impl fmt::Display for UnknownEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown blkdebug event '{}'", self.0)
    }
}

impl std::error::Error for UnknownEvent {}

impl FromStr for Event {
    type Err = UnknownEvent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Event::ALL
            .iter()
            .copied()
            .find(|e| e.name() == s)
            .ok_or_else(|| UnknownEvent(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for e in Event::ALL {
            assert!(seen.insert(e.name()));
            assert_eq!(e.name().parse::<Event>().unwrap(), e);
        }
        assert_eq!(
            "refblock_alloc_switch_table".parse::<Event>().unwrap(),
            Event::RefblockAllocSwitchTable
        );
        assert!("no_such_event".parse::<Event>().is_err());
    }
}
