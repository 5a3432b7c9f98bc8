//! The register file and the status state machine, on a dummy device.

use super::*;
use crate::virtio::testutil::*;
use crate::virtio::{chain, EventFdInterrupt};

#[derive(Debug, Default)]
struct Dummy {
    config: [u8; 4],
    activations: u32,
    resets: u32,
    processed: u32,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1
    }
    fn config_space(&self) -> Vec<u8> {
        self.config.to_vec()
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, _: &GuestMem, _: u64, _: &mut [Queue]) -> Result<()> {
        self.activations += 1;
        Ok(())
    }
    fn process_queue(
        &mut self,
        mem: &GuestMem,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool> {
        let mut used = false;
        while let Some(dc) = chain::pop(&mut queues[index], mem, index)? {
            let c = chain::walk(dc, mem, index)?;
            chain::add_used(&mut queues[index], mem, index, c.head, 0)?;
            self.processed += 1;
            used = true;
        }
        Ok(used)
    }
    fn reset(&mut self) {
        self.resets += 1;
    }
}

#[test]
fn identity_registers() {
    let mut d = Driver::new(Dummy::default());
    assert_eq!(d.r(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.r(reg::VERSION), 2);
    assert_eq!(d.r(reg::DEVICE_ID), 42);
    assert_eq!(d.r(reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(d.features(), VIRTIO_F_VERSION_1 | 1);
    d.w(reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(d.r(reg::DEVICE_FEATURES), 0);
    d.w(reg::QUEUE_SEL, 0);
    assert_eq!(d.r(reg::QUEUE_NUM_MAX), 8);
    d.w(reg::QUEUE_SEL, 1);
    assert_eq!(d.r(reg::QUEUE_NUM_MAX), 0, "no queue 1");
    assert_eq!(d.r(reg::SHM_LEN_LOW), u32::MAX, "no shared memory");
    assert_eq!(d.r(reg::CONFIG_GENERATION), 0);
}

#[test]
fn bad_widths_and_offsets_are_ignored() {
    let mut d = Driver::new(Dummy::default());
    let mut two = [0xffu8; 2];
    d.t.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    let mut four = [0xffu8; 4];
    d.t.read(reg::MAGIC_VALUE + 1, &mut four);
    assert_eq!(four, [0; 4]);
    d.t.write(reg::STATUS, &[1, 0]);
    assert_eq!(d.r(reg::STATUS), 0);
    d.w(0x0f0, 5); // unknown
    d.w(reg::MAGIC_VALUE, 5); // read-only
    assert_eq!(d.r(reg::MAGIC_VALUE), MAGIC_VALUE);
    let mut three = [0u8; 3];
    d.t.read(0x100, &mut three);
}

#[test]
fn status_must_go_step_by_step() {
    let mut d = Driver::new(Dummy::default());
    d.w(reg::STATUS, status::DRIVER);
    assert_eq!(d.r(reg::STATUS), 0, "DRIVER before ACKNOWLEDGE");
    d.w(reg::STATUS, status::ACKNOWLEDGE);
    d.w(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(
        d.r(reg::STATUS),
        status::ACKNOWLEDGE,
        "DRIVER_OK before FEATURES_OK"
    );
    d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w(reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(d.r(reg::STATUS), 3, "bits are cleared only by a reset");
    d.w(reg::STATUS, 3 | 0x10);
    assert_eq!(d.r(reg::STATUS), 3, "unknown bits");
    assert_eq!(d.t.device().activations, 0);
}

#[test]
fn features_ok_needs_version_1_and_only_offered_bits() {
    let mut d = Driver::new(Dummy::default());
    d.w(reg::STATUS, 1);
    d.w(reg::STATUS, 3);
    d.w(reg::DRIVER_FEATURES_SEL, 0);
    d.w(reg::DRIVER_FEATURES, 1);
    d.w(reg::STATUS, 3 | status::FEATURES_OK);
    assert_eq!(d.r(reg::STATUS), 3, "no VERSION_1: refused");
    d.w(reg::DRIVER_FEATURES_SEL, 1);
    d.w(reg::DRIVER_FEATURES, 1 | 2); // VERSION_1 and bit 33, not offered
    d.w(reg::STATUS, 3 | status::FEATURES_OK);
    assert_eq!(d.r(reg::STATUS), 3, "bit 33 was not offered: refused");
    d.w(reg::DRIVER_FEATURES, 1);
    d.w(reg::STATUS, 3 | status::FEATURES_OK);
    assert_eq!(d.r(reg::STATUS), 11);
    assert_eq!(d.t.acked_features(), VIRTIO_F_VERSION_1 | 1);
    d.w(reg::DRIVER_FEATURES, 0);
    assert_eq!(
        d.t.acked_features(),
        VIRTIO_F_VERSION_1 | 1,
        "features are fixed after FEATURES_OK"
    );
}

#[test]
fn queue_registers_before_features_ok_are_ignored() {
    let mut d = Driver::new(Dummy::default());
    d.w(reg::STATUS, 1);
    d.w(reg::STATUS, 3);
    d.w(reg::QUEUE_NUM, 4);
    assert_eq!(d.t.queues()[0].size(), 8);
    assert!(!d.t.needs_reset());
}

#[test]
fn driver_ok_activates_notify_processes_and_interrupts() {
    let mut d = Driver::start_with(Dummy::default(), 8);
    assert_eq!(d.t.device().activations, 1);
    d.kick(0);
    assert_eq!(d.irq.triggered(), 0, "nothing used, no interrupt");
    d.submit(0, &[(DATA, 16, false)]);
    assert_eq!(d.t.device().processed, 1);
    assert_eq!(d.r(reg::INTERRUPT_STATUS), INT_VRING);
    assert_eq!(d.irq.triggered(), 1);
    d.w(reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
    assert_eq!(d.irq.deasserted(), 1);
    d.kick(5); // no such queue
    assert!(!d.t.needs_reset());
}

#[test]
fn notify_before_driver_ok_is_ignored() {
    let mut d = Driver::begin(Dummy::default());
    d.setup_queue(0, 8);
    d.chain(0, &[(DATA, 16, false)]);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.t.device().processed, 0);
}

#[test]
fn config_space_reads_and_writes() {
    let mut d = Driver::new(Dummy::default());
    d.t.write(0x101, &[7]);
    assert_eq!(d.t.device().config, [0; 4], "config writes need DRIVER");
    d.w(reg::STATUS, 1);
    d.w(reg::STATUS, 3);
    d.t.write(0x101, &[7, 8]);
    let mut b = [0u8; 4];
    d.t.read(0x100, &mut b);
    assert_eq!(b, [0, 7, 8, 0]);
}

#[test]
fn reset_clears_everything_and_queue_ready_0_after_reset_is_fine() {
    let mut d = Driver::start_with(Dummy::default(), 8);
    d.submit(0, &[(DATA, 16, false)]);
    d.w(reg::STATUS, 0);
    assert_eq!(d.t.device().resets, 1);
    assert_eq!(d.r(reg::STATUS), 0);
    assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
    assert_eq!(d.t.acked_features(), 0);
    assert_eq!(d.r(reg::QUEUE_READY), 0);
    assert_eq!(d.t.queues()[0].next_avail(), 0);
    // Linux, removing a device: reset, then QueueReady = 0 on each queue.
    d.w(reg::QUEUE_SEL, 0);
    d.w(reg::QUEUE_READY, 0);
    assert!(!d.t.needs_reset());
}

#[test]
fn stopping_a_queue_of_a_running_device_needs_reset() {
    let mut d = Driver::start_with(Dummy::default(), 8);
    d.w(reg::QUEUE_READY, 0);
    assert!(d.t.needs_reset());
    // The register reads back 0 (virtio-drivers spins until it does), and the queue is idle.
    assert_eq!(d.r(reg::QUEUE_READY), 0);
    assert!(!d.t.queues()[0].ready());
}

#[test]
fn failed_stops_the_device() {
    let mut d = Driver::start_with(Dummy::default(), 8);
    let st = d.r(reg::STATUS);
    d.w(reg::STATUS, st | status::FAILED);
    assert!(!d.t.is_active());
    d.submit(0, &[(DATA, 16, false)]);
    assert_eq!(d.t.device().processed, 0);
}

#[test]
fn eventfd_interrupt_counts_on_its_fd() {
    let i = EventFdInterrupt::new().unwrap();
    i.trigger();
    i.trigger();
    assert_eq!(i.eventfd().read().unwrap(), 2);
}
