//! # kvstore — the core of the `kv` guest, a Redis-compatible server
//!
//! ```text
//!  TCP bytes ─▶ resp::parse ─▶ Store::execute ─▶ reply bytes (held)
//!                (bounded)          │ Outcome.log
//!                                   ▼
//!                          aof::Log::append ─▶ Log::commit (write + flush) ─▶ replies released
//!  boot: aof::Log::open replays every whole record into a fresh Store, cuts a torn tail
//! ```
//!
//! `no_std` + `alloc`: the guest (`guests/kv`), the host tests (which compare replies with a
//! real `redis-server`) and the fuzz target share this code.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod aof;
pub mod compat;
pub mod resp;
pub mod store;

pub use aof::{Disk, Log, LogError, Opened};
pub use resp::{parse, Parsed, Reply};
pub use store::{Outcome, ServerInfo, Store, Value};
