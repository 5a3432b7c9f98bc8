//! virtio-blk: requests, and one test per hostile-descriptor case.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::*;
use crate::virtio::mmio::{reg, status, INT_CONFIG};
use crate::virtio::persist::{self, VirtioState};
use crate::virtio::testutil::*;
use crate::virtio::{CountingInterrupt, MmioTransport};

const SECTORS: u64 = 64;
const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x8000;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn image(readonly: bool) -> (tempfile::NamedTempFile, Block) {
    let mut f = tempfile::Builder::new().prefix("disk").tempfile().unwrap();
    let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE).map(pattern).collect();
    f.write_all(&bytes).unwrap();
    let cfg = BlockConfig {
        path: f.path().to_path_buf(),
        readonly,
    };
    let b = Block::new(cfg).unwrap();
    (f, b)
}

fn drv() -> (tempfile::NamedTempFile, Driver<Block>) {
    let (f, b) = image(false);
    (f, Driver::start(b))
}

fn hdr(d: &Driver<Block>, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.put(HDR, &h);
}

/// Submits `bufs` with the header at HDR; returns (status byte at STATUS, used len).
fn run(d: &mut Driver<Block>, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
    d.put(STATUS, &[0xee]);
    let head = d.submit(0, bufs);
    let used = d.used(0);
    assert_eq!(used.len(), 1, "one chain used");
    assert_eq!(used[0].0, u32::from(head));
    (d.byte(STATUS), used[0].1)
}

fn read_req(d: &mut Driver<Block>, sector: u64, len: u32) -> (u8, u32) {
    hdr(d, VIRTIO_BLK_T_IN, sector);
    run(d, &[(HDR, 16, false), (BUF, len, true), (STATUS, 1, true)])
}

fn write_req(d: &mut Driver<Block>, sector: u64, data: &[u8]) -> (u8, u32) {
    hdr(d, VIRTIO_BLK_T_OUT, sector);
    d.put(BUF, data);
    run(
        d,
        &[
            (HDR, 16, false),
            (BUF, data.len() as u32, false),
            (STATUS, 1, true),
        ],
    )
}

/// The device still serves a plain read after a failed request.
fn still_serves(d: &mut Driver<Block>) {
    assert_eq!(read_req(d, 1, 512), (OK, 513));
    assert_eq!(
        d.get(BUF, 512),
        (512..1024).map(pattern).collect::<Vec<_>>()
    );
    assert!(!d.needs_reset());
}

fn assert_needs_reset(d: &mut Driver<Block>, why: &str) {
    assert!(d.needs_reset(), "status {:#x}", d.t.status());
    let reason = d.t.needs_reset_reason().unwrap_or_default().to_string();
    assert!(
        reason.contains(why),
        "reason {reason:?} should contain {why:?}"
    );
    assert_eq!(
        d.r(reg::INTERRUPT_STATUS) & INT_CONFIG,
        INT_CONFIG,
        "config interrupt"
    );
    assert!(!d.t.is_active());
    // Further notifies are ignored until a reset.
    let before = d.t.queues()[0].next_avail();
    d.kick(0);
    assert_eq!(d.t.queues()[0].next_avail(), before);
}

#[test]
fn config_parses_file_and_readonly() {
    assert_eq!(
        BlockConfig::parse("/a/b.img").unwrap(),
        BlockConfig {
            path: "/a/b.img".into(),
            readonly: false
        }
    );
    assert!(BlockConfig::parse("/a/b.img,readonly").unwrap().readonly);
    let e = BlockConfig::parse("/a,rw").unwrap_err().to_string();
    assert!(e.contains("FILE[,readonly]"), "{e}");
    assert!(BlockConfig::parse("").is_err());
    let e = Block::new(BlockConfig::parse("/nonexistent/x.img").unwrap()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
}

#[test]
fn config_space_and_features() {
    let (_f, b) = image(true);
    let mut d = Driver::new(b);
    assert_eq!(d.r(reg::DEVICE_ID), 2);
    let f = d.features();
    assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_ne!(f & 1 << VIRTIO_BLK_F_FLUSH, 0);
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    let mut cap = [0u8; 8];
    d.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut seg = [0u8; 4];
    d.t.read(0x10c, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), (MAX_CHAIN_DESCRIPTORS - 2) as u32);
    let mut past = [0xffu8; 4];
    d.t.read(0x180, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn reads_writes_flushes_get_id_and_tracks_dirty_blocks() {
    let (f, mut d) = drv();
    assert_eq!(read_req(&mut d, 2, 1024), (OK, 1025));
    assert_eq!(
        d.get(BUF, 1024),
        (1024..2048).map(pattern).collect::<Vec<_>>()
    );

    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(write_req(&mut d, 3, &data), (OK, 1));
    let mut back = vec![0u8; 1024];
    f.as_file().read_exact_at(&mut back, 3 * 512).unwrap();
    assert_eq!(back, data);
    assert_eq!(write_req(&mut d, 8, &data[..512]), (OK, 1)); // bytes 4096.. → block 1
    assert_eq!(d.t.device().dirty_block_count(), 2);
    assert_eq!(d.t.device_mut().take_dirty_blocks(), vec![0, 1]);
    assert_eq!(d.t.device_mut().take_dirty_blocks(), Vec::<u64>::new());

    // A read spread over three descriptors.
    hdr(&d, VIRTIO_BLK_T_IN, 3);
    let r = run(
        &mut d,
        &[
            (HDR, 16, false),
            (BUF, 100, true),
            (BUF + 0x800, 412, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(r, (OK, 513));
    assert_eq!(d.get(BUF, 100), data[..100]);
    assert_eq!(d.get(BUF + 0x800, 412), data[100..512]);

    hdr(&d, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut d, &[(HDR, 16, false), (STATUS, 1, true)]), (OK, 1));

    hdr(&d, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        run(
            &mut d,
            &[(HDR, 16, false), (BUF, 20, true), (STATUS, 1, true)]
        ),
        (OK, 21)
    );
    let name = f.path().file_name().unwrap().to_string_lossy().into_owned();
    let n = name.len().min(20);
    assert_eq!(&d.get(BUF, n)[..], &name.as_bytes()[..n]);
    assert!(d.irq.triggered() >= 6);
    assert_eq!(d.t.device().stats().errors, 0);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    // VERSION_1 implies any layout: header and data in one readable buffer, data and status
    // in one writable buffer.
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 4);
    d.put(STATUS, &[0xee]);
    let h = d.submit(0, &[(HDR, 16, false), (STATUS - 512, 513, true)]);
    assert_eq!(d.used(0), vec![(u32::from(h), 513)]);
    assert_eq!(d.byte(STATUS), OK);
    assert_eq!(
        d.get(STATUS - 512, 512),
        (2048..2560).map(pattern).collect::<Vec<_>>()
    );

    let mut req = vec![0u8; 16 + 512];
    req[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    req[8..16].copy_from_slice(&5u64.to_le_bytes());
    req[16..].fill(0x5a);
    d.put(HDR, &req);
    assert_eq!(
        run(&mut d, &[(HDR, 528, false), (STATUS, 1, true)]),
        (OK, 1)
    );
    assert_eq!(read_req(&mut d, 5, 512), (OK, 513));
    assert_eq!(d.get(BUF, 512), vec![0x5a; 512]);
}

#[test]
fn write_to_a_readonly_disk_is_ioerr() {
    let (f, b) = image(true);
    let mut d = Driver::start(b);
    assert_eq!(write_req(&mut d, 0, &[1u8; 512]), (IOERR, 1));
    let mut back = [0u8; 512];
    f.as_file().read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back.to_vec(), (0..512).map(pattern).collect::<Vec<_>>());
    assert_eq!(d.t.device().dirty_block_count(), 0);
    still_serves(&mut d);
}

#[test]
fn request_past_the_end_is_ioerr() {
    let (_f, mut d) = drv();
    assert_eq!(read_req(&mut d, SECTORS - 1, 1024), (IOERR, 1));
    assert_eq!(write_req(&mut d, SECTORS, &[0u8; 512]), (IOERR, 1));
    still_serves(&mut d);
}

#[test]
fn sector_number_that_overflows_is_ioerr() {
    let (_f, mut d) = drv();
    assert_eq!(read_req(&mut d, u64::MAX / 256, 512), (IOERR, 1));
    assert_eq!(read_req(&mut d, u64::MAX, 512), (IOERR, 1));
    still_serves(&mut d);
}

#[test]
fn unsupported_request_type_is_unsupp() {
    let (_f, mut d) = drv();
    hdr(&d, 11 /* DISCARD */, 0);
    assert_eq!(
        run(
            &mut d,
            &[(HDR, 16, false), (BUF, 16, false), (STATUS, 1, true)]
        ),
        (UNSUPP, 1)
    );
    assert_eq!(d.t.device().stats().unsupported, 1);
    still_serves(&mut d);
}

#[test]
fn data_that_is_not_whole_sectors_is_ioerr() {
    let (_f, mut d) = drv();
    assert_eq!(read_req(&mut d, 0, 100), (IOERR, 1));
    assert_eq!(write_req(&mut d, 0, &[0u8; 513]), (IOERR, 1));
    still_serves(&mut d);
}

// ---- hostile descriptors: one test per case ----

#[test]
fn hostile_chain_that_loops_needs_reset() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    d.desc(0, 0, HDR, 16, F_NEXT, 1);
    d.desc(0, 1, BUF, 512, F_NEXT | F_WRITE, 0); // back to 0
    d.publish(0, 0);
    d.kick(0);
    assert_needs_reset(&mut d, "does not end after 16");
    assert!(d.used(0).is_empty());
}

#[test]
fn hostile_next_index_outside_the_table_needs_reset() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    d.desc(0, 0, HDR, 16, F_NEXT, 200); // the table has 16
    d.publish(0, 0);
    d.kick(0);
    assert_needs_reset(&mut d, "does not end after 1 ");
}

#[test]
fn hostile_head_outside_the_table_needs_reset() {
    let (_f, mut d) = drv();
    d.publish(0, 40);
    d.kick(0);
    assert_needs_reset(&mut d, "names descriptor 40");
}

#[test]
fn hostile_available_index_far_ahead_needs_reset() {
    let (_f, mut d) = drv();
    d.set_avail_idx(0, 17); // 17 chains in a queue of 16
    d.kick(0);
    assert_needs_reset(&mut d, "more descriptors to process than queue size");
}

#[test]
fn hostile_buffer_outside_guest_memory_is_ioerr() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    let r = run(
        &mut d,
        &[
            (HDR, 16, false),
            (0x4000_0000, 512, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(r, (IOERR, 1));
    still_serves(&mut d);
}

#[test]
fn hostile_buffer_straddling_the_end_of_memory_is_ioerr() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    let r = run(
        &mut d,
        &[
            (HDR, 16, false),
            (MEM_SIZE - 256, 512, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(r, (IOERR, 1));
    // Nothing was written into the part inside memory.
    assert_eq!(d.get(MEM_SIZE - 256, 256), vec![0; 256]);
    still_serves(&mut d);
}

#[test]
fn hostile_address_plus_length_that_wraps_is_ioerr() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    let r = run(
        &mut d,
        &[
            (HDR, 16, false),
            (u64::MAX - 100, 512, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(r, (IOERR, 1));
    still_serves(&mut d);
}

#[test]
fn hostile_lengths_adding_up_past_4_gib_need_reset() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    d.submit(
        0,
        &[
            (HDR, 16, false),
            (BUF, 0x8000_0000, true),
            (BUF, 0x8000_0000, true),
            (STATUS, 1, true),
        ],
    );
    assert_needs_reset(&mut d, "does not end after 2 ");
}

#[test]
fn hostile_header_in_a_writable_descriptor_is_ioerr() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    let r = run(
        &mut d,
        &[(HDR, 16, true), (BUF, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(r, (IOERR, 1));
    still_serves(&mut d);
}

#[test]
fn hostile_read_into_readable_buffers_is_ioerr() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    d.put(BUF, &[0x11; 512]);
    let r = run(
        &mut d,
        &[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)],
    );
    assert_eq!(r, (IOERR, 1));
    assert_eq!(
        d.get(BUF, 512),
        vec![0x11; 512],
        "the readable buffer was not written"
    );
    still_serves(&mut d);
}

#[test]
fn hostile_write_from_writable_buffers_is_ioerr() {
    let (f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_OUT, 0);
    d.put(BUF, &[0x22; 512]);
    let r = run(
        &mut d,
        &[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(r, (IOERR, 1));
    let mut back = [0u8; 512];
    f.as_file().read_exact_at(&mut back, 0).unwrap();
    assert_ne!(back, [0x22; 512], "the image was not written");
    still_serves(&mut d);
}

#[test]
fn hostile_readable_after_writable_is_ioerr() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    let r = run(
        &mut d,
        &[
            (HDR, 16, false),
            (BUF, 512, true),
            (BUF + 0x1000, 16, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(r, (IOERR, 1));
    still_serves(&mut d);
}

#[test]
fn hostile_chain_without_a_writable_status_byte_is_returned_untouched() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    d.put(STATUS, &[0xee]);
    let h = d.submit(
        0,
        &[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, false)],
    );
    assert_eq!(d.used(0), vec![(u32::from(h), 0)]);
    assert_eq!(d.byte(STATUS), 0xee);
    assert_eq!(d.t.device().stats().no_status, 1);
    still_serves(&mut d);
}

#[test]
fn hostile_status_byte_outside_memory_is_returned_untouched() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    let h = d.submit(
        0,
        &[
            (HDR, 16, false),
            (BUF, 512, true),
            (MEM_SIZE + 4096, 1, true),
        ],
    );
    assert_eq!(d.used(0), vec![(u32::from(h), 0)]);
    still_serves(&mut d);
}

#[test]
fn hostile_chain_with_too_many_descriptors_needs_reset() {
    let (_f, b) = image(false);
    let mut d = Driver::start_with(b, 256);
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    let mut bufs = vec![(HDR, 16, false)];
    bufs.extend((0..MAX_CHAIN_DESCRIPTORS).map(|i| (BUF + i as u64 * 512, 512, true)));
    bufs.push((STATUS, 1, true));
    d.submit(0, &bufs);
    assert_needs_reset(&mut d, "more than 128 descriptors");
}

#[test]
fn hostile_header_that_is_too_short_is_ioerr() {
    let (_f, mut d) = drv();
    hdr(&d, VIRTIO_BLK_T_IN, 0);
    let r = run(
        &mut d,
        &[(HDR, 8, false), (BUF, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(r, (IOERR, 1));
    still_serves(&mut d);
}

/// Writes descriptor `i` of an indirect table at `table`.
fn indirect_desc(
    d: &Driver<Block>,
    table: u64,
    i: u64,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&addr.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&next.to_le_bytes());
    d.put(table + 16 * i, &b);
}

#[test]
fn requests_through_indirect_tables_are_served() {
    let (f, mut d) = drv();
    assert_ne!(
        d.features() & 1 << VIRTIO_RING_F_INDIRECT_DESC,
        0,
        "indirect descriptors are offered"
    );
    const TABLE: u64 = DATA + 0x9000;
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();
    // Write 2 sectors at sector 3: one ring descriptor pointing at a 3-entry table.
    hdr(&d, VIRTIO_BLK_T_OUT, 3);
    d.put(BUF, &data);
    indirect_desc(&d, TABLE, 0, HDR, 16, F_NEXT, 1);
    indirect_desc(&d, TABLE, 1, BUF, 1024, F_NEXT, 2);
    indirect_desc(&d, TABLE, 2, STATUS, 1, F_WRITE, 0);
    d.desc(0, 0, TABLE, 48, F_INDIRECT, 0);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.used(0), vec![(0, 1)]);
    assert_eq!(d.byte(STATUS), OK);
    let mut disk = vec![0u8; 1024];
    f.as_file().read_exact_at(&mut disk, 3 * 512).unwrap();
    assert_eq!(disk, data, "the image holds the indirect write");
    // Read them back the same way.
    hdr(&d, VIRTIO_BLK_T_IN, 3);
    d.put(BUF, &[0u8; 1024]);
    indirect_desc(&d, TABLE, 0, HDR, 16, F_NEXT, 1);
    indirect_desc(&d, TABLE, 1, BUF, 1024, F_NEXT | F_WRITE, 2);
    indirect_desc(&d, TABLE, 2, STATUS, 1, F_WRITE, 0);
    d.desc(0, 1, TABLE, 48, F_INDIRECT, 0);
    d.publish(0, 1);
    d.kick(0);
    assert_eq!(d.used(0), vec![(1, 1025)]);
    assert_eq!(d.byte(STATUS), OK);
    assert_eq!(d.get(BUF, 1024), data);
    assert!(!d.needs_reset());
}

#[test]
fn hostile_indirect_table_of_bad_length_needs_reset() {
    let (_f, mut d) = drv();
    d.desc(0, 0, HDR, 16, F_NEXT, 1);
    d.desc(0, 1, BUF, 24, F_INDIRECT, 0); // not a whole number of descriptors
    d.publish(0, 0);
    d.kick(0);
    assert_needs_reset(&mut d, "does not end after 1 ");
}

#[test]
fn hostile_queue_size_not_a_power_of_two_needs_reset() {
    let (_f, b) = image(false);
    let mut d = Driver::begin(b);
    d.w(reg::QUEUE_SEL, 0);
    d.w(reg::QUEUE_NUM, 12);
    assert!(d.needs_reset());
    let st = d.r(reg::STATUS);
    d.w(reg::STATUS, st | status::DRIVER_OK);
    assert!(
        !d.t.is_active(),
        "a device that needs a reset does not start"
    );
}

#[test]
fn hostile_queue_size_over_the_maximum_needs_reset() {
    let (_f, b) = image(false);
    let mut d = Driver::begin(b);
    d.w(reg::QUEUE_NUM, 512);
    assert!(d.needs_reset());
    assert_eq!(d.t.queues()[0].size(), QUEUE_SIZE);
}

#[test]
fn hostile_misaligned_ring_needs_reset() {
    let (_f, b) = image(false);
    let mut d = Driver::begin(b);
    d.w(reg::QUEUE_DESC_LOW, 0x1_0008);
    assert!(d.needs_reset());
}

#[test]
fn hostile_rings_outside_guest_memory_are_refused_at_ready() {
    let (_f, b) = image(false);
    let mut d = Driver::begin(b);
    d.w(reg::QUEUE_NUM, 16);
    d.w(reg::QUEUE_DESC_LOW, 0);
    d.w(reg::QUEUE_DESC_HIGH, 1); // 4 GiB: no RAM there
    d.w(reg::QUEUE_DRIVER_LOW, 0x1000);
    d.w(reg::QUEUE_DEVICE_LOW, 0x2000);
    d.w(reg::QUEUE_READY, 1);
    assert_eq!(d.r(reg::QUEUE_READY), 0);
    assert!(d.needs_reset());
}

#[test]
fn hostile_queue_changed_while_the_device_runs_needs_reset() {
    let (_f, mut d) = drv();
    let before = d.t.queues()[0].desc_table();
    d.w(reg::QUEUE_SEL, 0);
    d.w(reg::QUEUE_DESC_LOW, 0x3_0000);
    assert_needs_reset(&mut d, "while the device runs");
    assert_eq!(
        d.t.queues()[0].desc_table(),
        before,
        "the queue is unchanged"
    );
}

#[test]
fn hostile_ready_queue_changed_before_driver_ok_needs_reset() {
    let (_f, b) = image(false);
    let mut d = Driver::begin(b);
    d.setup_queue(0, 16);
    d.w(reg::QUEUE_NUM, 8);
    assert!(d.needs_reset());
    assert_eq!(d.t.queues()[0].size(), 16);
}

#[test]
fn reset_after_needs_reset_brings_the_device_back() {
    let (_f, mut d) = drv();
    d.publish(0, 40);
    d.kick(0);
    assert!(d.needs_reset());
    d.w(reg::STATUS, 0);
    assert_eq!(d.r(reg::STATUS), 0);
    assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
    assert_eq!(d.r(reg::QUEUE_READY), 0);
    // Bring it up again through the registers on the same transport state.
    d.w(reg::STATUS, status::ACKNOWLEDGE);
    d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w(reg::DRIVER_FEATURES_SEL, 1);
    d.w(reg::DRIVER_FEATURES, 1);
    d.w(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    d.setup_queue(0, 16);
    d.w(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    still_serves(&mut d);
}

#[test]
fn save_and_restore_mid_stream_gives_the_same_results() {
    // Two identical images; one device runs straight through, the other is saved after a
    // few requests and restored into a fresh device.
    let (fa, ba) = image(false);
    let (fb, bb) = image(false);
    let mut a = Driver::start(ba);
    let mut b = Driver::start(bb);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 1) as u8).collect();
    for d in [&mut a, &mut b] {
        assert_eq!(write_req(d, 1, &data), (OK, 1));
        assert_eq!(read_req(d, 0, 512), (OK, 513));
    }
    // Save b, leave a request pending in its ring, restore into a fresh device.
    let saved = VirtioState::decode(&b.t.save().encode()).unwrap();
    assert_eq!(saved.transport.queues[0].next_avail, 2);
    let irq = Arc::new(CountingInterrupt::default());
    let fresh = persist::restore_block(
        &saved,
        b.mem.clone(),
        irq.clone(),
        Some(fb.reopen().unwrap()),
    )
    .unwrap();
    assert!(fresh.is_active());
    b.t = fresh;
    b.irq = irq;
    for d in [&mut a, &mut b] {
        assert_eq!(read_req(d, 1, 1024), (OK, 1025));
        assert_eq!(d.get(BUF, 1024), data);
        assert_eq!(write_req(d, 10, &data[..512]), (OK, 1));
    }
    assert_eq!(a.t.queues()[0].next_avail(), b.t.queues()[0].next_avail());
    assert_eq!(a.t.queues()[0].next_used(), b.t.queues()[0].next_used());
    assert_eq!(
        std::fs::read(fa.path()).unwrap(),
        std::fs::read(fb.path()).unwrap()
    );
    assert_eq!(a.get(0, MEM_SIZE as usize), b.get(0, MEM_SIZE as usize));
}

#[test]
fn restore_refuses_a_different_image_size_and_unknown_versions() {
    let (_f, b) = image(false);
    let d = Driver::start(b);
    let saved = d.t.save();
    let mut bytes = saved.encode();
    bytes[0] = 9;
    let e = VirtioState::decode(&bytes).unwrap_err().to_string();
    assert!(e.contains("version 9"), "{e}");
    assert!(VirtioState::decode(&[1, 0]).is_err());

    let small = tempfile::NamedTempFile::new().unwrap();
    small.as_file().set_len(512).unwrap();
    let e = persist::restore_block(
        &saved,
        mem(),
        Arc::new(CountingInterrupt::default()),
        Some(small.reopen().unwrap()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sectors"), "{e}");

    let mut other = saved.clone();
    other.transport.queues[0].size = 12;
    assert!(
        persist::restore_block(&other, mem(), Arc::new(CountingInterrupt::default()), None)
            .is_err()
    );
    let mut far = saved.clone();
    far.transport.queues[0].used_ring = 0x4000_0000;
    let e = persist::restore_block(&far, mem(), Arc::new(CountingInterrupt::default()), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("guest memory"), "{e}");
}

#[test]
fn device_writes_to_guest_memory_show_in_the_dirty_bitmap() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let (_f, mut d) = drv();
    let region = d.mem.find_region(GuestAddress(BUF)).unwrap();
    assert!(
        !region.bitmap().dirty_at(BUF as usize),
        "nothing wrote there yet"
    );
    assert_eq!(read_req(&mut d, 0, 512), (OK, 513));
    let region = d.mem.find_region(GuestAddress(BUF)).unwrap();
    assert!(region.bitmap().dirty_at(BUF as usize), "the data page");
    assert!(
        region.bitmap().dirty_at(d.qs[0].used as usize),
        "the used ring"
    );
}

#[test]
fn transports_can_move_between_threads() {
    fn send<T: Send>() {}
    send::<MmioTransport<Block>>();
    send::<MmioTransport<crate::virtio::Net>>();
    send::<MmioTransport<Box<dyn crate::virtio::VirtioDevice>>>();
}

#[test]
fn disk_writes_from_a_hostile_primary_are_refused_and_good_ones_apply_in_parts() {
    let cap = 64 * 1024;
    let enc = |w: &DiskWrites| postcard::to_stdvec(w).unwrap();
    let good = DiskWrites {
        full: true,
        capacity: cap,
        runs: vec![
            (0, vec![1u8; 4096]),
            (8192, vec![2u8; 8192]),
            (60 * 1024, vec![3u8; 512]),
        ],
    };
    assert_eq!(DiskWrites::decode(&enc(&good), cap).unwrap(), good);
    for (runs, why) in [
        (vec![(100u64, vec![0u8; 4096])], "unaligned"),
        (vec![(0, vec![])], "empty"),
        (vec![(0, vec![0u8; 100])], "not whole sectors"),
        (vec![(cap - 4096, vec![0u8; 8192])], "past the end"),
        (vec![(u64::MAX - 4095, vec![0u8; 4096])], "overflow"),
    ] {
        let bad = DiskWrites {
            full: false,
            capacity: cap,
            runs,
        };
        assert!(DiskWrites::decode(&enc(&bad), cap).is_err(), "{why}");
    }
    assert!(
        DiskWrites::decode(&enc(&good), cap * 2).is_err(),
        "another disk's size"
    );
    assert!(DiskWrites::decode(b"\xff\xff\xff", cap).is_err(), "garbage");
    // Parts: only the first zeroes the replica.
    let parts = good.clone().split(8192);
    assert_eq!(parts.len(), 3, "4 KiB | 8 KiB | 512 B under an 8 KiB bound");
    assert!(parts[0].full && parts[1..].iter().all(|p| !p.full));
    let dir = std::env::temp_dir().join(format!("tandem-diskwrites-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("replica");
    std::fs::write(&path, vec![9u8; cap as usize]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    for p in &parts {
        p.apply(&f).unwrap();
    }
    let got = std::fs::read(&path).unwrap();
    let mut want = vec![0u8; cap as usize];
    want[..4096].fill(1);
    want[8192..16384].fill(2);
    want[60 * 1024..60 * 1024 + 512].fill(3);
    assert_eq!(got, want, "a full sync rebuilds the replica from zeros");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn take_writes_reads_back_exactly_the_blocks_written_since_the_last_take() {
    let dir = std::env::temp_dir().join(format!("tandem-takewrites-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    let mut b = Block::new(BlockConfig {
        path: path.clone(),
        readonly: false,
    })
    .unwrap();
    assert!(b.take_writes(false).unwrap().runs.is_empty());
    b.dirty.mark(4096 * 3, 4096 * 2);
    f.write_all_at(&[7u8; 8192], 4096 * 3).unwrap();
    let w = b.take_writes(false).unwrap();
    assert_eq!(w.runs, vec![(4096 * 3, vec![7u8; 8192])]);
    assert!(b.take_writes(false).unwrap().runs.is_empty(), "taken");
    let full = b.take_writes(true).unwrap();
    assert!(full.full);
    assert_eq!(
        full.runs,
        vec![(4096 * 3, vec![7u8; 8192])],
        "zero blocks left out"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Under speculation a flush completes without `fdatasync` (counted); leaving it syncs what
/// was written, and flushes are real again.
#[test]
fn speculative_flushes_complete_at_once_and_leaving_speculation_syncs() {
    let (_f, mut d) = drv();
    d.t.device_mut().set_speculative(true).unwrap();
    assert_eq!(write_req(&mut d, 3, &[7u8; 512]), (OK, 1));
    hdr(&d, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut d, &[(HDR, 16, false), (STATUS, 1, true)]), (OK, 1));
    let s = d.t.device().stats().clone();
    assert_eq!((s.flushes, s.speculative_flushes), (1, 1));
    assert!(d.t.device().unsynced, "the write is not synced yet");
    d.t.device_mut().set_speculative(false).unwrap();
    assert!(!d.t.device().unsynced, "leaving speculation synced it");
    hdr(&d, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut d, &[(HDR, 16, false), (STATUS, 1, true)]), (OK, 1));
    let s = d.t.device().stats().clone();
    assert_eq!((s.flushes, s.speculative_flushes), (2, 1));
}
