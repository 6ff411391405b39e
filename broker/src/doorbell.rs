//! A connection task's doorbell: one word of reasons and one waker, rung by whoever has
//! something for the task (a message in its mailbox, a receipt settled, a request to close).
//!
//! The pump used to wait on each of those separately: its mailbox, a cancellation token and
//! the receipt ledger's `Notify`. Every pass of its `select!` then polled all three, touching
//! half a dozen cache lines per connection (the channel's block and waker, the token's lock and
//! its `Notify`, the ledger's lock and `Notify`), twice per message; with 1,000 connections
//! those lines are cold. A pass now reads one word when nothing rang.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

/// Messages wait in the mailbox.
pub(crate) const MAIL: u8 = 1;
/// The connection is asked to close (kick, takeover, shutdown).
pub(crate) const STOP: u8 = 2;
/// A receipt ledger the connection holds acknowledgements on changed.
pub(crate) const RECEIPT: u8 = 4;

#[derive(Default)]
pub(crate) struct Doorbell {
    rung: AtomicU8,
    waker: AtomicWaker,
}

impl Doorbell {
    /// Rings for `why` (a set of the reasons above): the task's next wait returns it.
    pub(crate) fn ring(&self, why: u8) {
        self.rung.fetch_or(why, Ordering::Release);
        self.waker.wake();
    }

    /// Waits until the bell rang; the reasons since the last wait. Cancel-safe: reasons are
    /// taken only by the poll that returns them.
    pub(crate) fn rung(&self) -> impl Future<Output = u8> + '_ {
        std::future::poll_fn(|cx| self.poll_rung(cx))
    }

    fn poll_rung(&self, cx: &mut Context<'_>) -> Poll<u8> {
        if self.rung.load(Ordering::Relaxed) != 0 {
            return Poll::Ready(self.rung.swap(0, Ordering::Acquire));
        }
        self.waker.register(cx.waker());
        // Looked at again after registering: a ring between the two looks wakes nobody.
        match self.rung.swap(0, Ordering::AcqRel) {
            0 => Poll::Pending,
            why => Poll::Ready(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn reasons_add_up_until_taken() {
        let bell = Doorbell::default();
        bell.ring(MAIL);
        bell.ring(RECEIPT);
        assert_eq!(bell.rung().await, MAIL | RECEIPT);
        let waiting = futures::FutureExt::now_or_never(bell.rung());
        assert_eq!(waiting, None, "taken");
    }

    #[tokio::test]
    async fn a_ring_wakes_the_waiting_task() {
        let bell = Arc::new(Doorbell::default());
        let b = bell.clone();
        let waiting = tokio::spawn(async move { b.rung().await });
        tokio::task::yield_now().await;
        bell.ring(STOP);
        assert_eq!(waiting.await.unwrap(), STOP);
    }
}
