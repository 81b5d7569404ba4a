//! Packet-level fixtures for the datapath, run through BPF_PROG_TEST_RUN on both entry points
//! (tc and XDP), in the style of Katran's fixture tables: each case loads known map contents,
//! feeds packets, and checks the verdict and the exact output bytes (checksums by
//! recomputation).
//!
//! Needs root and a bpffs at /sys/fs/bpf (`cargo xtask test` provides both).

mod cases;
mod cases_icmp;
mod cases_pass;
mod cases_reject;
mod cases_translate;
mod flows;
mod harness;
mod packet;
