//! Acknowledging a device's QoS 1 publish once it is stored, instead of once the router has it.
//!
//! The backend stores telemetry; with [`Receipts`] installed the edge holds the device's
//! PUBACK until the backend says the message is in the database. A crash between the two then
//! costs nothing: the device never saw an acknowledgement and sends the message again when it
//! reconnects. PUBACKs still go out in the order the publishes came (MQTT 3.1.1 §4.6): an
//! acknowledgement that needs no receipt waits behind one that does.
//!
//! Receipts settle through a per-device [`Ledger`], a watermark: each held message carries a
//! mark (telemetry: its sequence number) and is stored once the ledger's stored mark reaches
//! it. The connection asks for its device's ledger once, so holding a message and settling it
//! touch that one object: no per-message channel, no lookup in a table of every device (those
//! were a tenth of the server's CPU at 10,000 telemetry messages/s, mostly cache misses on
//! the device ids of cold table entries).

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use companion_schema::{DeviceId, TopicKind};
use prometheus_client::metrics::gauge::Gauge;

use crate::doorbell::{Doorbell, RECEIPT};

/// Decides which publishes are acknowledged only once stored.
pub trait Receipts: Send + Sync + 'static {
    /// The ledger `device`'s held acknowledgements settle through. Asked once per connection.
    fn ledger(&self, device: &DeviceId) -> Arc<Ledger>;

    /// Called for every QoS 1 publish the edge routes (its ACL and limits passed), before it
    /// goes on; `ledger` is the publishing device's. `None`: acknowledge now. Must not block.
    fn hold(&self, ledger: &Arc<Ledger>, kind: TopicKind, payload: &Bytes) -> Option<Receipt>;
}

/// How a held message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Stored: acknowledge.
    Stored,
    /// Refused (not stored): acknowledged as dropped, counted.
    Refused,
    /// The store went away: the edge ends the connection without acknowledging, and the device
    /// sends the message again.
    Lost,
}

/// Refusals remembered per device at most (a refusal is taken by the receipt it is for; these
/// bound what connections that ended leave behind).
const MAX_REFUSED: usize = 64;

/// One device's held acknowledgements: a stored watermark that receipts wait on.
pub struct Ledger {
    state: Mutex<State>,
    /// Receipts alive, over every ledger sharing the gauge.
    held: Gauge,
    /// What the [`Receipts`] hook keeps for the device alongside the ledger: whoever is handed
    /// the ledger with a message reaches it without a lookup by device id.
    owner: Option<Weak<dyn Any + Send + Sync>>,
}

#[derive(Default)]
struct State {
    /// Every mark up to this one is stored.
    stored: Option<u64>,
    /// Bumped when the stored mark goes down (the device's count restarted): receipts of an
    /// earlier epoch are settled as stored.
    epoch: u64,
    /// Marks refused, with their epoch.
    refused: Vec<(u64, u64)>,
    closed: bool,
    /// Rung on every change: the tasks waiting on receipts of this ledger (one connection,
    /// two for a moment during a takeover).
    bells: Vec<Arc<Doorbell>>,
}

impl Ledger {
    /// An empty ledger; `held` counts its receipts alive (shared by many ledgers).
    pub fn new(held: Gauge) -> Self {
        Self {
            state: Mutex::new(State::default()),
            held,
            owner: None,
        }
    }

    /// The ledger of `owner` (typically made with `Arc::new_cyclic`): see [`Ledger::owner`].
    pub fn owned_by(mut self, owner: Weak<dyn Any + Send + Sync>) -> Self {
        self.owner = Some(owner);
        self
    }

    /// The ledger's owner if it is a `T` and still alive.
    pub fn owner<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.owner.as_ref()?.upgrade()?.downcast::<T>().ok()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a few plain fields, each write complete: a panic elsewhere cannot leave
        // it half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `bell` rings (with [`RECEIPT`]) at every change while the guard lives.
    pub(crate) fn attach(self: &Arc<Self>, bell: &Arc<Doorbell>) -> Attached {
        self.state().bells.push(bell.clone());
        Attached {
            ledger: self.clone(),
            bell: bell.clone(),
        }
    }

    /// The state changed: ring the waiting tasks.
    fn changed(state: &State) {
        for bell in &state.bells {
            bell.ring(RECEIPT);
        }
    }

    /// A receipt for the message marked `mark`, unless `covered(stored mark)` says it is
    /// stored already (a resend after a lost PUBACK).
    pub fn hold(
        self: &Arc<Self>,
        mark: u64,
        covered: impl FnOnce(Option<u64>) -> bool,
    ) -> Option<Receipt> {
        let epoch = {
            let state = self.state();
            if covered(state.stored) {
                return None;
            }
            state.epoch
        };
        self.held.inc();
        Some(Receipt {
            ledger: self.clone(),
            mark,
            epoch,
        })
    }

    /// The stored mark.
    pub fn stored(&self) -> Option<u64> {
        self.state().stored
    }

    /// Everything up to `mark` is stored. A mark below the last one means the count restarted:
    /// everything held before is settled as stored too.
    pub fn store(&self, mark: u64) {
        let mut state = self.state();
        if state.stored.is_some_and(|s| s > mark) {
            state.epoch += 1;
            state.refused.clear();
        }
        state.stored = Some(mark);
        Self::changed(&state);
    }

    /// Everything up to `mark` was stored before (read back from the store): the stored mark
    /// is at least `mark`.
    pub fn raise(&self, mark: u64) {
        let mut state = self.state();
        state.stored = Some(state.stored.map_or(mark, |s| s.max(mark)));
        Self::changed(&state);
    }

    /// The message marked `mark` will not be stored: its receipt settles as refused.
    pub fn refuse(&self, mark: u64) {
        let mut state = self.state();
        if state.refused.len() >= MAX_REFUSED {
            state.refused.remove(0);
        }
        let epoch = state.epoch;
        state.refused.push((epoch, mark));
        Self::changed(&state);
    }

    /// The store is gone: receipts not settled yet are lost.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        Self::changed(&state);
    }
}

/// A doorbell attached to a ledger; detached when dropped.
pub(crate) struct Attached {
    ledger: Arc<Ledger>,
    bell: Arc<Doorbell>,
}

impl Attached {
    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.ledger
            .state()
            .bells
            .retain(|b| !Arc::ptr_eq(b, &self.bell));
    }
}

/// A held acknowledgement: settles when its device's [`Ledger`] stores or refuses its mark.
pub struct Receipt {
    ledger: Arc<Ledger>,
    mark: u64,
    epoch: u64,
}

impl Receipt {
    /// How the message ended, if it has. A refusal is taken: asked again, the receipt waits
    /// for the mark to be stored.
    pub fn try_settled(&self) -> Option<Settled> {
        let mut state = self.ledger.state();
        if let Some(at) = state
            .refused
            .iter()
            .position(|&r| r == (self.epoch, self.mark))
        {
            state.refused.swap_remove(at);
            return Some(Settled::Refused);
        }
        if state.epoch != self.epoch || state.stored.is_some_and(|s| s >= self.mark) {
            return Some(Settled::Stored);
        }
        state.closed.then_some(Settled::Lost)
    }

    /// Whether the receipt is `ledger`'s.
    pub(crate) fn is_on(&self, ledger: &Arc<Ledger>) -> bool {
        Arc::ptr_eq(&self.ledger, ledger)
    }

    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Waits until the message ended. Cancel-safe (nothing is taken before it returns).
    pub async fn settled(&self) -> Settled {
        let bell = Arc::new(Doorbell::default());
        // Attached before looking: a change between the look and the wait still rings.
        let _attached = self.ledger.attach(&bell);
        loop {
            if let Some(s) = self.try_settled() {
                return s;
            }
            bell.rung().await;
        }
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        self.ledger.held.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> Arc<Ledger> {
        Arc::new(Ledger::new(Gauge::default()))
    }

    #[test]
    fn receipts_settle_when_the_stored_mark_reaches_them() {
        let l = ledger();
        let r1 = l.hold(1, |_| false).unwrap();
        let r3 = l.hold(3, |_| false).unwrap();
        assert_eq!(l.held.get(), 2);
        assert_eq!(r1.try_settled(), None);
        l.store(2);
        assert_eq!(r1.try_settled(), Some(Settled::Stored));
        assert_eq!(r3.try_settled(), None);
        l.raise(1);
        assert_eq!(l.stored(), Some(2), "raising never lowers");
        assert!(l.hold(2, |s| s >= Some(2)).is_none(), "covered");
        l.refuse(3);
        assert_eq!(r3.try_settled(), Some(Settled::Refused));
        assert_eq!(r3.try_settled(), None, "a refusal is taken once");
        drop((r1, r3));
        assert_eq!(l.held.get(), 0);
    }

    #[test]
    fn a_ledger_reaches_its_owner_while_it_lives() {
        struct Owner(u32);
        let owner = Arc::new(Owner(7));
        let weak: Weak<dyn Any + Send + Sync> = Arc::downgrade(&owner) as _;
        let l = Ledger::new(Gauge::default()).owned_by(weak);
        assert_eq!(l.owner::<Owner>().map(|o| o.0), Some(7));
        assert!(l.owner::<String>().is_none(), "another type");
        drop(owner);
        assert!(l.owner::<Owner>().is_none(), "gone");
        assert!(ledger().owner::<Owner>().is_none(), "no owner");
    }

    #[test]
    fn a_lower_stored_mark_settles_what_was_held_before() {
        let l = ledger();
        l.store(50_000);
        let old = l.hold(50_001, |_| false).unwrap();
        let new = l.hold(2, |_| false).unwrap();
        l.store(1);
        assert_eq!(old.try_settled(), Some(Settled::Stored));
        assert_eq!(new.try_settled(), Some(Settled::Stored));
        let after = l.hold(2, |_| false).unwrap();
        assert_eq!(after.try_settled(), None, "held in the new count");
    }

    #[tokio::test]
    async fn a_closed_ledger_loses_what_is_not_stored() {
        let l = ledger();
        let r = l.hold(5, |_| false).unwrap();
        let waiting = tokio::spawn(async move { r.settled().await });
        tokio::task::yield_now().await;
        l.close();
        assert_eq!(waiting.await.unwrap(), Settled::Lost);
    }

    #[tokio::test]
    async fn a_waiting_receipt_wakes_on_the_store() {
        let l = ledger();
        let r = l.hold(5, |_| false).unwrap();
        let waiting = tokio::spawn(async move { r.settled().await });
        tokio::task::yield_now().await;
        l.store(5);
        assert_eq!(waiting.await.unwrap(), Settled::Stored);
    }
}
