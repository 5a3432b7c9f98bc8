//! Taking descriptor chains off a queue and checking every descriptor of them.
//!
//! ```text
//!  avail ring ──▶ head ──▶ desc[head] ─next─▶ desc[n] ─next─▶ … ─▶ desc[m] (no NEXT)
//!                          │ R │ R │ … │ W │ W │      readable ones first, then writable ones
//!                          └────── readable stream ──────┘└─ writable stream ─┘
//! ```
//!
//! virtio-queue's iterator already stops at a loop (a chain visits at most the queue size of
//! descriptors), at a `next` outside the table, at an unreadable descriptor, at a nested
//! indirect table and when the lengths add up past 4 GiB, but it stops *silently*. We notice
//! it: a chain whose last descriptor still says NEXT was cut short ([`ChainError::Truncated`]).
//! We add what it does not check: at most [`MAX_CHAIN_DESCRIPTORS`], every buffer's
//! `addr + len` neither wraps nor leaves guest memory, and no readable descriptor follows a
//! writable one. Those three are per-request faults ([`DescFault`]): the device fails the
//! request (an error status where it has somewhere to put one) and goes on. The structural
//! errors ([`ChainError`]) make the device need a reset.
//!
//! Guest memory is only ever touched through vm-memory's checked accessors, so even a check
//! missed here could not reach outside the guest.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{Error, GuestMem, Result, MAX_CHAIN_DESCRIPTORS};

/// A chain the device cannot walk to its end: the device needs a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The available ring names a head outside the descriptor table.
    #[error("the available ring names descriptor {head}, the queue has {size}")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// The chain ended before a descriptor without NEXT: a loop, a `next` outside the table,
    /// a bad indirect table, or lengths adding up past 4 GiB.
    #[error("the descriptor chain at head {head} does not end after {seen} descriptors (a loop, a `next` outside the table, a bad indirect table, or more than 4 GiB)")]
    Truncated {
        /// The head index.
        head: u16,
        /// Descriptors seen before it stopped.
        seen: usize,
    },
    /// More than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("the descriptor chain at head {head} has more than {max} descriptors")]
    TooLong {
        /// The head index.
        head: u16,
        /// The limit.
        max: usize,
    },
}

/// A descriptor the device will not use; the request fails, the device goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescFault {
    /// `addr + len` wraps around the 64-bit address space.
    AddressOverflow {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The buffer is not entirely inside guest memory.
    OutsideMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
}

impl std::fmt::Display for DescFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DescFault::AddressOverflow { addr, len } => {
                write!(
                    f,
                    "buffer {addr:#x}+{len:#x} wraps around the address space"
                )
            }
            DescFault::OutsideMemory { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} is outside guest memory")
            }
            DescFault::ReadableAfterWritable => {
                write!(
                    f,
                    "a device-readable descriptor follows a device-writable one"
                )
            }
        }
    }
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Inside guest memory (only such segments are ever accessed).
    pub ok: bool,
}

/// A walked chain: its head and its readable and writable buffers, in order.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    /// Head index (what goes into the used ring).
    pub head: u16,
    /// Device-readable buffers.
    pub readable: Vec<Segment>,
    /// Device-writable buffers.
    pub writable: Vec<Segment>,
    /// The first per-request fault found, if any.
    pub fault: Option<DescFault>,
}

impl Chain {
    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Where the last writable byte is, if the last non-empty writable buffer is inside guest
    /// memory (for a status byte even in a chain with a fault elsewhere).
    pub fn last_writable_byte(&self) -> Option<u64> {
        let last = self.writable.iter().rev().find(|s| s.len > 0)?;
        last.ok.then(|| last.addr + u64::from(last.len) - 1)
    }
}

/// Takes the next chain off `queue` (index `qidx`, for messages), if the driver made one
/// available. A ring index that runs more than the queue size ahead and a head outside the
/// table are errors.
pub fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    qidx: usize,
) -> Result<Option<DescriptorChain<&'m GuestMem>>> {
    if !queue.ready() {
        return Ok(None);
    }
    let qerr = |source| Error::Queue {
        queue: qidx,
        source,
    };
    let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(qerr)?;
    if avail == Wrapping(queue.next_avail()) {
        return Ok(None);
    }
    let size = queue.size();
    let chain = queue.iter(mem).map_err(qerr)?.next();
    match chain {
        Some(c) if c.head_index() >= size => Err(Error::Chain {
            queue: qidx,
            source: ChainError::HeadOutOfRange {
                head: c.head_index(),
                size,
            },
        }),
        Some(c) => Ok(Some(c)),
        // The ring entry itself could not be read: the ring left guest memory.
        None => Err(qerr(virtio_queue::Error::InvalidAvailRingIndex)),
    }
}

/// Whether the driver has made any chain available on `queue`.
pub fn has_available(queue: &Queue, mem: &GuestMem, qidx: usize) -> Result<bool> {
    if !queue.ready() {
        return Ok(false);
    }
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|source| Error::Queue {
            queue: qidx,
            source,
        })?;
    Ok(avail != Wrapping(queue.next_avail()))
}

/// Walks a chain and checks every descriptor (see the module docs).
pub fn walk(chain: DescriptorChain<&GuestMem>, mem: &GuestMem, qidx: usize) -> Result<Chain> {
    let mut out = Chain {
        head: chain.head_index(),
        ..Default::default()
    };
    let mut seen = 0usize;
    let mut last_has_next = true;
    for d in chain {
        seen += 1;
        if seen > MAX_CHAIN_DESCRIPTORS {
            return Err(Error::Chain {
                queue: qidx,
                source: ChainError::TooLong {
                    head: out.head,
                    max: MAX_CHAIN_DESCRIPTORS,
                },
            });
        }
        last_has_next = d.has_next();
        let (addr, len) = (d.addr().0, d.len());
        let mut fault = None;
        if addr.checked_add(u64::from(len)).is_none() {
            fault = Some(DescFault::AddressOverflow { addr, len });
        } else if len > 0 && !mem.check_range(GuestAddress(addr), len as usize) {
            fault = Some(DescFault::OutsideMemory { addr, len });
        }
        let seg = Segment {
            addr,
            len,
            ok: fault.is_none(),
        };
        if d.is_write_only() {
            out.writable.push(seg);
        } else {
            if !out.writable.is_empty() && fault.is_none() {
                fault = Some(DescFault::ReadableAfterWritable);
            }
            out.readable.push(seg);
        }
        if out.fault.is_none() {
            out.fault = fault;
        }
    }
    if seen == 0 || last_has_next {
        return Err(Error::Chain {
            queue: qidx,
            source: ChainError::Truncated {
                head: out.head,
                seen,
            },
        });
    }
    Ok(out)
}

/// Calls `f(guest address, stream offset, length)` for each piece of bytes
/// `[offset, offset + len)` of a stream made of `segs`, in pieces of at most `chunk` bytes.
/// Returns how many bytes were covered (less than `len` when the stream is shorter).
pub fn for_each_piece<E>(
    segs: &[Segment],
    offset: u64,
    len: u64,
    chunk: usize,
    mut f: impl FnMut(GuestAddress, u64, usize) -> std::result::Result<(), E>,
) -> std::result::Result<u64, E> {
    let end = offset.saturating_add(len);
    let mut pos = 0u64; // stream offset of the current segment
    let mut done = 0u64;
    for s in segs {
        let seg_end = pos + u64::from(s.len);
        let from = offset.max(pos);
        let to = end.min(seg_end);
        let mut at = from;
        while at < to {
            let n = (to - at).min(chunk as u64) as usize;
            f(GuestAddress(s.addr + (at - pos)), at - offset, n)?;
            at += n as u64;
            done += n as u64;
        }
        pos = seg_end;
        if pos >= end {
            break;
        }
    }
    Ok(done)
}

/// Reads `buf.len()` bytes from offset `offset` of the stream `segs`. Fails if the stream is
/// shorter or memory fails.
pub fn read_stream(mem: &GuestMem, segs: &[Segment], offset: u64, buf: &mut [u8]) -> bool {
    let len = buf.len() as u64;
    let r = for_each_piece(segs, offset, len, usize::MAX, |addr, at, n| {
        let at = at as usize;
        mem.read_slice(&mut buf[at..at + n], addr).map_err(|_| ())
    });
    matches!(r, Ok(n) if n == len)
}

/// Writes `data` at offset `offset` of the stream `segs`. Fails if the stream is shorter or
/// memory fails.
pub fn write_stream(mem: &GuestMem, segs: &[Segment], offset: u64, data: &[u8]) -> bool {
    let len = data.len() as u64;
    let r = for_each_piece(segs, offset, len, usize::MAX, |addr, at, n| {
        let at = at as usize;
        mem.write_slice(&data[at..at + n], addr).map_err(|_| ())
    });
    matches!(r, Ok(n) if n == len)
}

/// Puts a chain into the used ring with `len` bytes written.
pub fn add_used(queue: &mut Queue, mem: &GuestMem, qidx: usize, head: u16, len: u32) -> Result<()> {
    queue
        .add_used(mem, head, len)
        .map_err(|source| Error::Queue {
            queue: qidx,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_a_range_across_segments() {
        let segs = [
            Segment {
                addr: 0x1000,
                len: 10,
                ok: true,
            },
            Segment {
                addr: 0x2000,
                len: 0,
                ok: true,
            },
            Segment {
                addr: 0x3000,
                len: 10,
                ok: true,
            },
        ];
        let mut got = vec![];
        let n = for_each_piece::<()>(&segs, 5, 10, 3, |a, at, n| {
            got.push((a.0, at, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 10);
        assert_eq!(
            got,
            vec![
                (0x1005, 0, 3),
                (0x1008, 3, 2),
                (0x3000, 5, 3),
                (0x3003, 8, 2)
            ]
        );
        assert_eq!(
            for_each_piece::<()>(&segs, 15, 100, 64, |_, _, _| Ok(())),
            Ok(5)
        );
    }
}
