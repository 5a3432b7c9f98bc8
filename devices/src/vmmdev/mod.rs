//! The guest-host device ("vmmdev", after VirtualBox's VMMDev): guest info and the guest
//! heartbeat.
//!
//! ```text
//!  port 0x512  out eax = heartbeat interval in ms (0: off)     the host arms a flatline timer
//!  port 0x513  out      = heartbeat ping                        at 2 × interval after each ping
//!  port 0x514  out eax = guest version (guest info)
//!
//!  ping ─┬─ ping ──┬─ ping ──── … silence … ──▶ 2 × interval: "guest flatlined" (logged, reported)
//!        │         │                           a later ping: "guest reawakened"
//! ```
//!
//! Saved state (group `vmmdev`): version 2 adds the heartbeat fields to version 1, which held
//! only the guest info; a version-1 state still loads, with the heartbeat off (as VMMDev's
//! saved state went from 15 to 16 with the heartbeat and still loads 15).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub mod persist;
pub use persist::{VmmDevGroup, VmmDevStateV1, VmmDevStateV2, VMMDEV_STATE_VERSION};

/// Heartbeat interval port.
pub const CONFIG_PORT: u16 = 0x512;
/// Heartbeat ping port.
pub const PING_PORT: u16 = 0x513;
/// Guest info port.
pub const GUEST_INFO_PORT: u16 = 0x514;
/// Longest heartbeat interval a guest may ask for.
pub const MAX_INTERVAL_MS: u32 = 3_600_000;

/// Something the heartbeat noticed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeartbeatEvent {
    /// No ping for `silent_ms` ≥ 2 × interval.
    Flatlined {
        /// Time since the last ping when it was noticed.
        silent_ms: u64,
        /// The interval the guest asked for.
        interval_ms: u32,
    },
    /// A ping after a flatline.
    Reawakened {
        /// How long the guest was silent.
        silent_ms: u64,
    },
}

/// The device.
#[derive(Debug, Default)]
pub struct VmmDev {
    guest_version: u32,
    interval_ms: u32,
    last_ping: Option<Instant>,
    pings: u64,
    flatlined: bool,
    flatlines: u64,
}

impl VmmDev {
    /// Whether this device handles `port`.
    pub fn claims(port: u16) -> bool {
        (CONFIG_PORT..=GUEST_INFO_PORT).contains(&port)
    }

    /// A guest write. A ping after a flatline returns the reawakening.
    pub fn write(&mut self, port: u16, data: u32, now: Instant) -> Option<HeartbeatEvent> {
        match port {
            CONFIG_PORT => {
                self.interval_ms = data.min(MAX_INTERVAL_MS);
                self.flatlined = false;
                self.last_ping = (data != 0).then_some(now);
                None
            }
            PING_PORT => {
                self.pings += 1;
                let silent = self.last_ping.map(|t| now.saturating_duration_since(t));
                self.last_ping = Some(now);
                if self.flatlined {
                    self.flatlined = false;
                    return Some(HeartbeatEvent::Reawakened {
                        silent_ms: silent.unwrap_or_default().as_millis() as u64,
                    });
                }
                None
            }
            GUEST_INFO_PORT => {
                self.guest_version = data;
                None
            }
            _ => None,
        }
    }

    /// When the flatline timer fires, if it is armed.
    pub fn deadline(&self) -> Option<Instant> {
        if self.interval_ms == 0 || self.flatlined {
            return None;
        }
        self.last_ping
            .map(|t| t + 2 * Duration::from_millis(u64::from(self.interval_ms)))
    }

    /// Checks the flatline timer.
    pub fn check(&mut self, now: Instant) -> Option<HeartbeatEvent> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        self.flatlined = true;
        self.flatlines += 1;
        let silent = now.saturating_duration_since(self.last_ping.unwrap_or(now));
        Some(HeartbeatEvent::Flatlined {
            silent_ms: silent.as_millis() as u64,
            interval_ms: self.interval_ms,
        })
    }

    /// The VM is paused: a stopped guest cannot ping, so the timer stops too.
    pub fn suspend_timer(&mut self) {
        self.last_ping = None;
    }

    /// The VM runs again: the timer restarts from `now`.
    pub fn resume_timer(&mut self, now: Instant) {
        if self.interval_ms != 0 && !self.flatlined {
            self.last_ping = Some(now);
        }
    }

    /// The version the guest reported.
    pub fn guest_version(&self) -> u32 {
        self.guest_version
    }

    /// Flatlines so far.
    pub fn flatlines(&self) -> u64 {
        self.flatlines
    }

    /// Pings so far.
    pub fn pings(&self) -> u64 {
        self.pings
    }
    /// Whether the guest is flatlined now.
    pub fn flatlined(&self) -> bool {
        self.flatlined
    }
    /// The heartbeat interval (0: off).
    pub fn interval_ms(&self) -> u32 {
        self.interval_ms
    }

    /// The device's saved state (current version).
    pub fn save_state(&self) -> VmmDevStateV2 {
        VmmDevStateV2 {
            guest_version: self.guest_version,
            heartbeat_interval_ms: self.interval_ms,
            heartbeat_pings: self.pings,
            heartbeat_flatlined: self.flatlined,
            heartbeat_flatlines: self.flatlines,
        }
    }

    /// Loads saved state of `version` 1 or 2 (see [`persist::VmmDevPersist`]). The flatline
    /// timer restarts at `now`: time the VM spent saved does not count as guest silence.
    pub fn restore_state(&mut self, version: u32, data: &[u8], now: Instant) -> Result<()> {
        let s = <persist::VmmDevPersist as checkpoint::Persist>::decode(version, data)
            .map_err(|e| Error::State(e.to_string()))?;
        if s.heartbeat_interval_ms > MAX_INTERVAL_MS {
            return Err(Error::State(format!(
                "heartbeat interval {} ms is out of range",
                s.heartbeat_interval_ms
            )));
        }
        *self = VmmDev {
            guest_version: s.guest_version,
            interval_ms: s.heartbeat_interval_ms,
            last_ping: (s.heartbeat_interval_ms != 0).then_some(now),
            pings: s.heartbeat_pings,
            flatlined: s.heartbeat_flatlined,
            flatlines: s.heartbeat_flatlines,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatlines_after_twice_the_interval_and_reawakens_on_a_ping() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = VmmDev::default();
        assert_eq!(d.deadline(), None);
        d.write(CONFIG_PORT, 100, t0);
        d.write(PING_PORT, 0, ms(50));
        assert_eq!(d.deadline(), Some(ms(250)));
        assert_eq!(d.check(ms(249)), None);
        assert_eq!(
            d.check(ms(251)),
            Some(HeartbeatEvent::Flatlined {
                silent_ms: 201,
                interval_ms: 100
            })
        );
        assert_eq!(d.check(ms(400)), None, "reported once");
        assert_eq!(
            d.write(PING_PORT, 0, ms(450)),
            Some(HeartbeatEvent::Reawakened { silent_ms: 400 })
        );
        assert!(!d.flatlined());
        d.write(CONFIG_PORT, 0, ms(500));
        assert_eq!(d.deadline(), None, "interval 0 turns it off");
    }

    #[test]
    fn version_1_state_loads_with_the_heartbeat_off() {
        let v1 = postcard::to_stdvec(&VmmDevStateV1 { guest_version: 7 }).unwrap();
        let mut d = VmmDev::default();
        d.restore_state(1, &v1, Instant::now()).unwrap();
        assert_eq!(
            d.save_state(),
            VmmDevStateV2 {
                guest_version: 7,
                ..Default::default()
            }
        );
        let mut e = VmmDev::default();
        e.write(CONFIG_PORT, 100, Instant::now());
        e.write(PING_PORT, 0, Instant::now());
        let v2 = postcard::to_stdvec(&e.save_state()).unwrap();
        let mut f = VmmDev::default();
        f.restore_state(2, &v2, Instant::now()).unwrap();
        assert_eq!(f.save_state(), e.save_state());
        assert!(f
            .restore_state(3, &v2, Instant::now())
            .unwrap_err()
            .to_string()
            .contains("newer"));
        assert!(f.restore_state(2, &[0xff; 3], Instant::now()).is_err());
    }
}
