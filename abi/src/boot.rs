//! The boot-info page: what a guest cannot learn from its entry registers.
//!
//! The monitor writes it once, at power-on, at [`BOOT_INFO_ADDR`](crate::layout::BOOT_INFO_ADDR);
//! guests read it (it is ordinary RAM, saved and restored with the rest).
//!
//! ```text
//!  +0x000  magic     u64   "TANDEMBI" (0x4942_4d45_444e_4154 little endian)
//!  +0x008  version   u32   1
//!  +0x00c  vcpus     u32
//!  +0x010  mem_bytes u64
//!  +0x018  tsc_khz   u64   the guest's TSC frequency in kHz (0: unknown)
//!  +0x020  devices   u32   number of virtio-mmio device entries (≤ MAX_MMIO_DEVICES)
//!  +0x024  args_len  u32   bytes of the argument string (≤ MAX_ARGS)
//!  +0x040  device[16]      32 bytes each:
//!            +0 device_id u32 (virtio: 1 net, 2 block) | +4 gsi u32 | +8 base u64 | +16 size u64 | +24 0
//!  +0x400  args            UTF-8, `key=value` words separated by spaces (`--guest-arg`)
//! ```
//!
//! All little endian. [`BootInfo::parse`] bounds every count and length.

use crate::layout::{BOOT_INFO_SIZE, MAX_MMIO_DEVICES};

/// The magic at offset 0.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TANDEMBI");
/// The layout version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Offset of the device table.
pub const DEVICES_OFFSET: usize = 0x40;
/// Size of one device entry.
pub const DEVICE_ENTRY_SIZE: usize = 32;
/// Offset of the argument string.
pub const ARGS_OFFSET: usize = 0x400;
/// Longest argument string.
pub const MAX_ARGS: usize = BOOT_INFO_SIZE as usize - ARGS_OFFSET;

/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// One virtio-mmio device as the guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioDevice {
    /// virtio device id ([`VIRTIO_ID_NET`], [`VIRTIO_ID_BLOCK`]).
    pub device_id: u32,
    /// The interrupt line (GSI on the IOAPIC) the device raises.
    pub gsi: u32,
    /// GPA of the device's MMIO window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
}

/// The boot-info page, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo<'a> {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM size in bytes.
    pub mem_bytes: u64,
    /// TSC frequency in kHz (0: unknown).
    pub tsc_khz: u64,
    /// The devices (first `device_count` entries are valid).
    pub devices: [MmioDevice; MAX_MMIO_DEVICES as usize],
    /// How many entries of `devices` are valid.
    pub device_count: usize,
    /// The argument string.
    pub args: &'a str,
}

/// Why a boot-info page was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// The page is shorter than [`BOOT_INFO_SIZE`].
    Short,
    /// The magic is wrong: this is not a boot-info page.
    Magic,
    /// A version this crate does not know.
    Version(u32),
    /// More devices than [`MAX_MMIO_DEVICES`].
    Devices(u32),
    /// An argument string longer than [`MAX_ARGS`] or not UTF-8.
    Args,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl<'a> BootInfo<'a> {
    /// A boot-info page with no devices and no arguments.
    pub fn new(vcpus: u32, mem_bytes: u64, tsc_khz: u64) -> Self {
        BootInfo {
            vcpus,
            mem_bytes,
            tsc_khz,
            devices: [MmioDevice::default(); MAX_MMIO_DEVICES as usize],
            device_count: 0,
            args: "",
        }
    }

    /// The valid device entries.
    pub fn devices(&self) -> &[MmioDevice] {
        &self.devices[..self.device_count]
    }

    /// The value of `key=value` in the argument string, if present.
    pub fn arg(&self, key: &str) -> Option<&'a str> {
        self.args.split(' ').find_map(|w| {
            let (k, v) = w.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// Decodes a page, checking magic, version, counts and lengths.
    pub fn parse(page: &'a [u8]) -> Result<Self, BootInfoError> {
        if page.len() < BOOT_INFO_SIZE as usize {
            return Err(BootInfoError::Short);
        }
        if u64_at(page, 0) != MAGIC {
            return Err(BootInfoError::Magic);
        }
        let version = u32_at(page, 8);
        if version != VERSION {
            return Err(BootInfoError::Version(version));
        }
        let count = u32_at(page, 0x20);
        if count > MAX_MMIO_DEVICES {
            return Err(BootInfoError::Devices(count));
        }
        let args_len = u32_at(page, 0x24) as usize;
        if args_len > MAX_ARGS {
            return Err(BootInfoError::Args);
        }
        let args = core::str::from_utf8(&page[ARGS_OFFSET..ARGS_OFFSET + args_len])
            .map_err(|_| BootInfoError::Args)?;
        let mut info = BootInfo::new(u32_at(page, 0xc), u64_at(page, 0x10), u64_at(page, 0x18));
        info.args = args;
        info.device_count = count as usize;
        for (i, d) in info.devices[..count as usize].iter_mut().enumerate() {
            let o = DEVICES_OFFSET + i * DEVICE_ENTRY_SIZE;
            *d = MmioDevice {
                device_id: u32_at(page, o),
                gsi: u32_at(page, o + 4),
                base: u64_at(page, o + 8),
                size: u64_at(page, o + 16),
            };
        }
        Ok(info)
    }

    /// Encodes the page into `page` (at least [`BOOT_INFO_SIZE`] bytes). Fails with
    /// [`BootInfoError::Args`] when the arguments do not fit.
    pub fn write(&self, page: &mut [u8]) -> Result<(), BootInfoError> {
        if page.len() < BOOT_INFO_SIZE as usize {
            return Err(BootInfoError::Short);
        }
        if self.args.len() > MAX_ARGS {
            return Err(BootInfoError::Args);
        }
        if self.device_count > MAX_MMIO_DEVICES as usize {
            return Err(BootInfoError::Devices(self.device_count as u32));
        }
        page[..BOOT_INFO_SIZE as usize].fill(0);
        page[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        page[8..12].copy_from_slice(&VERSION.to_le_bytes());
        page[0xc..0x10].copy_from_slice(&self.vcpus.to_le_bytes());
        page[0x10..0x18].copy_from_slice(&self.mem_bytes.to_le_bytes());
        page[0x18..0x20].copy_from_slice(&self.tsc_khz.to_le_bytes());
        page[0x20..0x24].copy_from_slice(&(self.device_count as u32).to_le_bytes());
        page[0x24..0x28].copy_from_slice(&(self.args.len() as u32).to_le_bytes());
        for (i, d) in self.devices().iter().enumerate() {
            let o = DEVICES_OFFSET + i * DEVICE_ENTRY_SIZE;
            page[o..o + 4].copy_from_slice(&d.device_id.to_le_bytes());
            page[o + 4..o + 8].copy_from_slice(&d.gsi.to_le_bytes());
            page[o + 8..o + 16].copy_from_slice(&d.base.to_le_bytes());
            page[o + 16..o + 24].copy_from_slice(&d.size.to_le_bytes());
        }
        page[ARGS_OFFSET..ARGS_OFFSET + self.args.len()].copy_from_slice(self.args.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile_pages() {
        let mut info = BootInfo::new(2, 64 << 20, 2_400_000);
        info.device_count = 1;
        info.devices[0] = MmioDevice {
            device_id: VIRTIO_ID_BLOCK,
            gsi: 5,
            base: 0x4_0000_0000,
            size: 0x1000,
        };
        info.args = "ip=10.0.0.2 n=5";
        let mut page = [0u8; BOOT_INFO_SIZE as usize];
        info.write(&mut page).unwrap();
        let back = BootInfo::parse(&page).unwrap();
        assert_eq!(back, info);
        assert_eq!(back.arg("ip"), Some("10.0.0.2"));
        assert_eq!(back.arg("x"), None);

        assert_eq!(BootInfo::parse(&page[..100]), Err(BootInfoError::Short));
        let mut bad = page;
        bad[0] ^= 1;
        assert_eq!(BootInfo::parse(&bad), Err(BootInfoError::Magic));
        let mut bad = page;
        bad[0x20] = 17;
        assert_eq!(BootInfo::parse(&bad), Err(BootInfoError::Devices(17)));
        let mut bad = page;
        bad[0x24..0x28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(BootInfo::parse(&bad), Err(BootInfoError::Args));
        let mut bad = page;
        bad[ARGS_OFFSET] = 0xff;
        assert_eq!(BootInfo::parse(&bad), Err(BootInfoError::Args));
    }
}
