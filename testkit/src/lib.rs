//! # testkit — Tandem's test kit
//!
//! Whole protected pairs as processes, for the end-to-end tests, `cargo xtask run-pair`,
//! `soak` and the benchmarks; never a dependency of a product crate.
//!
//! * [`pair`]: starts a sink, a standby and a primary (`tandem` processes) with a fresh key and
//!   an arbiter directory, kills and rejoins them, reads their status and the sink's verdict.
//! * [`netlab`]: two test hosts in network namespaces on a bridge, with packet loss,
//!   partitions (nftables) and delay (a relay), for the network-fault tests.
//! * [`kv`]: clients of the `kv` guest that keep the history a failover check needs, and the
//!   replay of its log from a disk image.
#![forbid(unsafe_code)]

pub mod kv;
pub mod netlab;
pub mod pair;
