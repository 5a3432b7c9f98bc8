//! The run loop: serves vCPU RPCs, control requests and a [`Replication`] layer until the guest
//! is done or powered off.

use std::time::{Duration, Instant};

use crossbeam_channel::select;

use crate::control::{self, Request};
use crate::machine::{Outcome, Vmx};
use crate::replication::{Replication, Unreplicated};
use crate::{Error, Result};

impl Vmx {
    /// Serves user RPCs and control requests until every vCPU is done or a `snapshot` with
    /// `stop` powers the VM off.
    pub fn run(self) -> Result<Outcome> {
        self.run_with(&mut Unreplicated)
    }

    /// [`Vmx::run`] with a [`Replication`] layer (epochs, held output, failover state).
    pub fn run_with<R: Replication>(mut self, ft: &mut R) -> Result<Outcome> {
        let deadline = self.opts.timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(m) = ft.moved() {
                return Ok(Outcome::Moved {
                    to: m.to,
                    generation: m.generation,
                    report: self.report()?,
                });
            }
            if self.all_done() && self.started {
                ft.finish(&mut self)
                    .map_err(|e| Error::Replication(Box::new(e)))?;
                if ft.moved().is_some() {
                    continue;
                }
                return Ok(Outcome::Finished(self.report()?));
            }
            self.check_heartbeat();
            let ft_deadline = ft.deadline();
            let wake = [deadline, self.vmmdev.dev.deadline(), ft_deadline]
                .into_iter()
                .flatten()
                .min();
            let wait = wake.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            let ft_events = ft.events();
            let ft_aux = ft.aux();
            select! {
                recv(self.rpc_rx) -> rpc => {
                    let rpc = rpc.map_err(|_| monitor::Error::Stopped)?;
                    if let Some((s, _)) = self.handle_rpc(rpc)? {
                        log::warn!("stray checkpoint step answer {s:?}");
                    }
                    ft.after_output(&mut self).map_err(|e| Error::Replication(Box::new(e)))?;
                }
                recv(self.ctl_rx) -> env => {
                    if let Ok((req, reply)) = env {
                        if matches!(req, Request::Migrate { .. }) {
                            ft.request(req, reply, &mut self)
                                .map_err(|e| Error::Replication(Box::new(e)))?;
                            continue;
                        }
                        let (answer, stopped) = match req {
                            Request::Status => (control::reply(&self.status(ft.status())), None),
                            req => self.handle_request(req),
                        };
                        let _ = reply.send(answer);
                        if let Some(path) = stopped {
                            return Ok(Outcome::Suspended { path, report: self.report()? });
                        }
                    }
                }
                recv(ft_events) -> ev => {
                    if let Ok(ev) = ev {
                        ft.on_event(ev, &mut self).map_err(|e| Error::Replication(Box::new(e)))?;
                    }
                }
                recv(ft_aux) -> a => {
                    if let Ok(a) = a {
                        ft.on_aux(a, &mut self).map_err(|e| Error::Replication(Box::new(e)))?;
                    }
                }
                default(wait) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(Error::Timeout(self.opts.timeout.unwrap_or_default()));
                    }
                    if ft_deadline.is_some_and(|d| Instant::now() >= d) {
                        ft.tick(&mut self).map_err(|e| Error::Replication(Box::new(e)))?;
                    }
                }
            }
        }
    }
}
