//! Empty library target: lets `proxy-userspace` declare a build dependency on this crate so
//! cargo rebuilds the embedded object when the eBPF sources change (aya-template's pattern).
#![no_std]
