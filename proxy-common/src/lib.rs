//! Map names, key and value layouts and pure helpers shared by the datapath (`proxy-ebpf`) and the
//! controller (`proxy-userspace`).
//!
//! Every key and value is `#[repr(C)]`, has explicit padding, holds no `bool`/enum/`Option`, and
//! says its byte order in the field name (`_be` = network order, as in the packet). A
//! compile-time assertion pins each size, so a layout change is a deliberate act that also bumps
//! [`LAYOUT_VERSION`].
//!
//! The families are IPv4-only today and named `*4` so an IPv6 family can be added beside them
//! (Cilium's `lb4_*`/`lb6_*` split) without touching these layouts.
#![no_std]

pub mod backend;
pub mod conntrack;
pub mod csum;
pub mod service;
pub mod stats;

/// Bumped whenever a map layout below changes. The controller refuses to adopt pinned maps whose
/// key/value sizes do not match, rather than misreading them.
pub const LAYOUT_VERSION: u32 = 1;

/// Implements `aya::Pod` for the host side. The `bytemuck::Pod` derive already proved the type
/// has no padding bytes or invalid bit patterns, which is exactly `aya::Pod`'s contract.
#[macro_export]
#[doc(hidden)]
macro_rules! impl_user_pod {
    ($($t:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: `bytemuck::Pod` is derived for the type: plain data, no padding, any bit
            // pattern valid.
            unsafe impl aya::Pod for $t {}
        )+
    };
}
