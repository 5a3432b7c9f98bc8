//! The replication hook: how the run loop lets a fault-tolerance layer (the `ft` crate) act,
//! without naming it.
//!
//! ```text
//!  Vmx::run_with(&mut R)            R: Replication
//!   loop ─┬─ vCPU RPC (output drained) ─────▶ after_output   (release or hold output)
//!         ├─ R::events() ready ─────────────▶ on_event       (acks, lost link)
//!         ├─ R::aux() ready ────────────────▶ on_aux         (joins, pre-copy done)
//!         ├─ R::deadline() passed ──────────▶ tick           (capture an epoch)
//!         ├─ control `status` ──────────────▶ status         (the answer's `ft` member)
//!         ├─ control `migrate` ─────────────▶ request        (answered now or later)
//!         ├─ every vCPU done ───────────────▶ finish         (last epoch, goodbye)
//!         └─ after each of them: moved()? ──▶ the run ends: Outcome::Moved
//! ```
//!
//! Every method has a default body that does nothing (and refuses `migrate`), so
//! [`Unreplicated`] is empty.

use std::time::Instant;

use crossbeam_channel::{never, Receiver, Sender};
use serde_json::Value;

use crate::control::{Answer, Request};
use crate::machine::Vmx;

/// Where a VM went (see [`Replication::moved`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moved {
    /// The address of the host it runs on now.
    pub to: String,
    /// The generation it runs as there.
    pub generation: u64,
}

/// What the run loop calls; a fault-tolerance layer implements it.
pub trait Replication {
    /// Events from the replication link.
    type Event: Send;
    /// Other events (a standby joined, a pre-copy ended).
    type Aux: Send;
    /// Error of the layer; the run loop returns it as [`crate::Error::Replication`].
    type Error: std::error::Error + Send + Sync + 'static;

    /// The link's events, for the run loop to select on.
    fn events(&self) -> Receiver<Self::Event> {
        never()
    }
    /// Other events, for the run loop to select on.
    fn aux(&self) -> Receiver<Self::Aux> {
        never()
    }
    /// When [`Replication::tick`] wants to run next.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// A link event arrived.
    fn on_event(
        &mut self,
        _ev: Self::Event,
        _vmx: &mut Vmx,
    ) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
    /// An aux event arrived.
    fn on_aux(&mut self, _a: Self::Aux, _vmx: &mut Vmx) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
    /// The deadline passed.
    fn tick(&mut self, _vmx: &mut Vmx) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
    /// vCPUs drained output (it is held while replication holds it).
    fn after_output(&mut self, _vmx: &mut Vmx) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
    /// Every vCPU is done.
    fn finish(&mut self, _vmx: &mut Vmx) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
    /// The `ft` member of the `status` answer.
    fn status(&self) -> Option<Value> {
        None
    }
    /// A control request the VM itself does not serve (`migrate`): answer it on `reply`, now
    /// or when it is done. Default: refused, with the reason.
    fn request(
        &mut self,
        req: Request,
        reply: Sender<Value>,
        _vmx: &mut Vmx,
    ) -> std::result::Result<(), Self::Error> {
        let what = match req {
            Request::Migrate { .. } => "migrate",
            _ => "this request",
        };
        let _ = reply.send(Answer::refused(format!(
            "{what} needs a VM run by `tandem primary`; this one has no replication layer"
        )));
        Ok(())
    }
    /// The VM moved to another host: the run ends with [`crate::Outcome::Moved`].
    fn moved(&self) -> Option<Moved> {
        None
    }
}

/// No replication: the VM runs alone.
pub struct Unreplicated;

impl Replication for Unreplicated {
    type Event = ();
    type Aux = ();
    type Error = std::convert::Infallible;
}
