//! Telemetry up to the rules, shared by the device's worker and the dispatcher's inline path.
//!
//! Most telemetry needs no worker: its sequence is checked, its row handed to the batch
//! writer and its rules evaluated without an await, and most messages match no rule. The
//! dispatcher does that on the publishing connection's task; only a message whose rules
//! matched goes to the worker, for the actions. The worker hop (a boxed event, a queue push, a
//! task wake-up and two polls of the worker's select) was about a tenth of the server's CPU
//! at 10,000 telemetry messages/s. Telemetry still goes through the worker while the worker
//! has not read the device's stored sequence number, has telemetry queued, or when a rule
//! reads `device` (the worker owns the device's persona and presence).

use std::sync::Arc;
use std::time::Instant;

use companion_schema::{DeviceId, Payload, Telemetry, TopicKind};

use super::telemetry::{self, classify, SeqState, SeqVerdict, Slot};
use super::{DeviceEvent, Dispatcher, Runtime};
use crate::bus::Inbox;
use crate::db::now_ms;
use crate::rules::store::RuleLabel;
use crate::rules::{DeviceView, EventKind, Field, RuleEvent, RuleSet};

/// Sequence check (gaps counted, duplicates dropped: `None`), handed to the batch writer; the
/// event for the rules. `state` is `slot`'s, locked.
pub(super) fn accept(
    rt: &Runtime,
    slot: &Arc<Slot>,
    state: &mut SeqState,
    t: Telemetry,
) -> Option<RuleEvent> {
    match classify(state.last, t.seq) {
        SeqVerdict::Duplicate => {
            // Its acknowledgement, if held, goes out once the original is stored (the
            // ledger's watermark reaches it).
            rt.metrics.telemetry_duplicates.inc();
            return None;
        }
        SeqVerdict::Accept { gap } => {
            if gap > 0 {
                rt.metrics.telemetry_gaps.inc_by(gap);
            }
        }
        SeqVerdict::Reset => {
            tracing::info!(device_id = %slot.device(), seq = t.seq, "telemetry sequence restarted");
        }
    }
    state.last = Some(t.seq);
    state.battery = t.battery_pct.map(f64::from);
    let mut fields = Vec::with_capacity(7);
    fields.extend([
        ("seq", Field::Int(i64::try_from(t.seq).unwrap_or(i64::MAX))),
        (
            "ts_ms",
            Field::Int(i64::try_from(t.ts_ms).unwrap_or(i64::MAX)),
        ),
        (
            "uptime_s",
            Field::Int(i64::try_from(t.uptime_s).unwrap_or(i64::MAX)),
        ),
    ]);
    if let Some(b) = t.battery_pct {
        fields.push(("battery_pct", Field::Float(f64::from(b))));
    }
    if let Some(c) = t.cpu_temp_c {
        fields.push(("cpu_temp_c", Field::Float(f64::from(c))));
    }
    if let Some(r) = t.rssi_dbm {
        fields.push(("rssi_dbm", Field::Int(i64::from(r))));
    }
    if let Some(m) = t.free_mem_kb {
        fields.push((
            "free_mem_kb",
            Field::Int(i64::try_from(m).unwrap_or(i64::MAX)),
        ));
    }
    let event = RuleEvent {
        kind: EventKind::Telemetry,
        topic: companion_schema::Topic::new(slot.device().clone(), TopicKind::Telemetry),
        fields,
    };
    rt.telemetry.put(slot, t);
    Some(event)
}

/// Evaluates `set` for `event` of `device`; counts and logs the conditions that failed. The
/// rules whose actions are due, by index (most events match none).
pub(super) fn matching(
    rt: &Runtime,
    set: &RuleSet,
    event: &RuleEvent,
    view: &DeviceView,
    device: &DeviceId,
) -> Vec<usize> {
    let t0 = Instant::now();
    let results = set.evaluate_indexed(event, view, now_ms());
    rt.rule_metrics
        .eval_seconds
        .observe(t0.elapsed().as_secs_f64());
    let mut matched = Vec::new();
    for (i, verdict) in results {
        match verdict {
            Ok(false) => {}
            Ok(true) => matched.push(i),
            Err(failure) => {
                let rule = &set.rules()[i];
                rt.rule_metrics
                    .failures
                    .get_or_create(&RuleLabel {
                        rule: rule.name.clone(),
                    })
                    .inc();
                tracing::error!(rule = %rule.name, device_id = %device, topic = %event.topic, reason = %failure.0, "rule condition failed");
            }
        }
    }
    matched
}

/// Rules that matched an event handled outside the worker: the worker runs their actions.
pub struct Matched {
    pub event: RuleEvent,
    pub set: Arc<RuleSet>,
    pub rules: Vec<usize>,
    pub started: Instant,
}

impl std::fmt::Debug for Matched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matched")
            .field("event", &self.event)
            .field("rules", &self.rules)
            .finish()
    }
}

impl Dispatcher {
    /// Handles `t` from `device` without waiting: inline where it can (see the module), else
    /// queued for the worker. False if it was dropped (the worker's queue was full).
    pub(super) fn telemetry(self: &Arc<Self>, device: &DeviceId, t: Telemetry) -> bool {
        let slot = self.runtime.telemetry.slot(device);
        self.telemetry_in(&slot, device, t)
    }

    /// [`Dispatcher::telemetry`] with the device's slot at hand.
    pub(super) fn telemetry_in(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        device: &DeviceId,
        t: Telemetry,
    ) -> bool {
        let rt = &self.runtime;
        let set = rt.rules.current();
        let mut state = slot.seq();
        if !state.inline || set.uses_device() {
            // Queued under the lock: the worker lets telemetry past it again only once its
            // queue is empty, so this one is accepted before any later one.
            state.inline = false;
            return self.enqueue(device, DeviceEvent::Telemetry(t));
        }
        let event = accept(rt, slot, &mut state, t);
        drop(state);
        let Some(event) = event else {
            return true;
        };
        let rules = matching(rt, &set, &event, &DeviceView::default(), device);
        if rules.is_empty() {
            return true;
        }
        self.enqueue(
            device,
            DeviceEvent::Matched(Box::new(Matched {
                event,
                set,
                rules,
                started: Instant::now(),
            })),
        )
    }
}

/// The device runtime is where the bus delivers.
impl Inbox for Arc<Dispatcher> {
    /// Telemetry is acknowledged once stored. The ledger is the device's telemetry slot's:
    /// the slot comes with it, without a lookup.
    fn deliver_held(
        &self,
        device: &DeviceId,
        payload: Payload,
        arrived: Instant,
        ledger: &Arc<companion_broker::Ledger>,
    ) -> Option<companion_broker::Receipt> {
        let Payload::Telemetry(t) = payload else {
            self.deliver(device, payload, arrived);
            return None;
        };
        // Made before the message is handed on: its row may be stored at once.
        let receipt = telemetry::receipt(ledger, t.seq);
        let slot = ledger
            .owner::<telemetry::Slot>()
            .unwrap_or_else(|| self.runtime.telemetry.slot(device));
        self.telemetry_in(&slot, device, t);
        receipt
    }

    fn deliver(&self, device: &DeviceId, payload: Payload, arrived: Instant) {
        match DeviceEvent::from_payload(payload, arrived) {
            Some(event) => {
                self.dispatch(device, event);
            }
            None => {
                tracing::debug!(device_id = %device, "a down-topic payload from the bus; ignored")
            }
        }
    }

    fn replay(&self, device: &DeviceId, events: Vec<(Payload, Instant)>) {
        let events: Vec<DeviceEvent> = events
            .into_iter()
            .filter_map(|(payload, arrived)| DeviceEvent::from_payload(payload, arrived))
            .collect();
        if !events.is_empty() {
            self.dispatch(device, DeviceEvent::Replay(events));
        }
    }
}
