//! Outcome counting: every packet is counted exactly once, in a per-CPU slot so CPUs never share
//! a cache line.

use crate::maps::STATS;

#[inline(always)]
pub fn count(stat: u32) {
    if let Some(slot) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}
