//! A connection's QoS 1 acknowledgements that wait for a [`Receipt`]: released in the order the
//! publishes arrived (MQTT 3.1.1 §4.6), each as soon as everything ahead of it is settled.

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::packet;
use crate::receipts::{Receipt, Settled};

/// Acknowledgements waiting at most; past it the edge stops reading from the device until
/// some are settled (backpressure instead of memory).
pub(super) const MAX_HELD: usize = 256;

enum Entry {
    /// Acknowledge.
    Ack(u16),
    /// Acknowledge as dropped and count it: the backend refused to store it.
    Refused(u16),
    /// Waiting for the receipt.
    Wait(u16, Receipt),
    /// The receipt was lost (the store went away): nothing may be acknowledged any more.
    Lost,
}

/// The receipt of a held message can no longer arrive (the backend went away): the
/// connection ends without acknowledging, so the device sends it again.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ReceiptLost;

#[derive(Default)]
pub(super) struct Acks {
    queue: VecDeque<Entry>,
}

impl Acks {
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Queues the acknowledgement of `packet_id`; true when it can be written right away
    /// (no receipt and nothing waiting ahead of it), in which case nothing is queued.
    pub fn ack(&mut self, packet_id: u16, receipt: Option<Receipt>) -> bool {
        match receipt {
            None if self.queue.is_empty() => true,
            None => {
                self.queue.push_back(Entry::Ack(packet_id));
                false
            }
            Some(r) => {
                self.queue.push_back(Entry::Wait(packet_id, r));
                false
            }
        }
    }

    /// Writes every settled acknowledgement at the head of the queue; the number refused.
    pub fn release(&mut self, out: &mut BytesMut, v5: bool) -> Result<u64, ReceiptLost> {
        let mut refused = 0;
        while let Some(front) = self.queue.front_mut() {
            if let Entry::Wait(id, receipt) = front {
                let id = *id;
                *front = match receipt.try_settled() {
                    None => break,
                    Some(s) => settled(id, s),
                };
            }
            match self.queue.pop_front() {
                Some(Entry::Ack(id)) => packet::put_ack(out, packet::PUBACK, id),
                Some(Entry::Refused(id)) => {
                    refused += 1;
                    out.extend_from_slice(&packet::puback_dropped(id, v5));
                }
                Some(Entry::Lost) => return Err(ReceiptLost),
                Some(Entry::Wait(..)) | None => break,
            }
        }
        Ok(refused)
    }
}

/// What a receipt's outcome makes of the acknowledgement.
fn settled(id: u16, outcome: Settled) -> Entry {
    match outcome {
        Settled::Stored => Entry::Ack(id),
        Settled::Refused => Entry::Refused(id),
        Settled::Lost => Entry::Lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipts::Ledger;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::Arc;

    fn acked_ids(out: &BytesMut) -> Vec<(u8, u16)> {
        // PUBACK 3.1.1: 0x40 0x02 id; MQTT 5 with a reason: 0x40 0x04 id reason 0.
        let mut ids = Vec::new();
        let mut i = 0;
        while i < out.len() {
            let len = usize::from(out[i + 1]);
            let id = u16::from_be_bytes([out[i + 2], out[i + 3]]);
            let reason = if len > 2 { out[i + 4] } else { 0 };
            ids.push((reason, id));
            i += 2 + len;
        }
        ids
    }

    #[test]
    fn nothing_waiting_acknowledges_at_once() {
        let mut acks = Acks::default();
        assert!(acks.ack(1, None));
        assert_eq!(acks.len(), 0);
    }

    #[test]
    fn acknowledgements_keep_their_order_behind_a_receipt() {
        let mut acks = Acks::default();
        let ledger = Arc::new(Ledger::new(Gauge::default()));
        let r1 = ledger.hold(1, |_| false).unwrap();
        let r2 = ledger.hold(2, |_| false).unwrap();
        assert!(!acks.ack(1, Some(r1)));
        assert!(!acks.ack(2, None), "waits behind 1");
        assert!(!acks.ack(3, None));
        assert!(!acks.ack(4, Some(r2)));
        let mut out = BytesMut::new();
        assert_eq!(acks.release(&mut out, true), Ok(0));
        assert!(out.is_empty(), "nothing before 1 is stored");

        ledger.refuse(2);
        assert_eq!(acks.release(&mut out, true), Ok(0));
        assert!(out.is_empty(), "4 is settled but 1 is not");

        ledger.store(1);
        assert_eq!(acks.release(&mut out, true), Ok(1), "4 was refused");
        assert_eq!(
            acked_ids(&out),
            vec![(0, 1), (0, 2), (0, 3), (packet::reason::QUOTA_EXCEEDED, 4)]
        );
        assert_eq!(acks.len(), 0);
        assert!(acks.ack(5, None), "empty again");
    }

    #[test]
    fn a_lost_receipt_acknowledges_nothing_after_it() {
        let mut acks = Acks::default();
        let ledger = Arc::new(Ledger::new(Gauge::default()));
        assert!(!acks.ack(1, ledger.hold(1, |_| false)));
        assert!(!acks.ack(2, None));
        ledger.close();
        let mut out = BytesMut::new();
        assert_eq!(acks.release(&mut out, false), Err(ReceiptLost));
        assert!(out.is_empty());
    }
}
