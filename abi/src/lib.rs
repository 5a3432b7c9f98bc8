//! # guest-abi — the contract between Tandem and its guests
//!
//! Everything a guest and the host must agree on, in one `no_std` crate that the monitor, the
//! devices, the workload generators and the Rust guests all use:
//!
//! * [`layout`]: the guest-physical layout, the entry registers, the ports, the shared limits
//!   (page size, largest RAM, most vCPUs), the virtio-mmio windows and their interrupt lines;
//! * [`ring`]: the output ring and its 32-byte [`ring::Record`];
//! * [`boot`]: the boot-info page (TSC frequency, devices, guest arguments).
#![no_std]
#![forbid(unsafe_code)]

pub mod boot;
pub mod layout;
pub mod ring;

pub use ring::Record;
