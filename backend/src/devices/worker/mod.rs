//! One device's worker: handles its events in order, runs the rules, owns its persona, config
//! and session state. The conversation's side of it is in [`conversation`].

use std::sync::Arc;
use std::time::Instant;

use companion_schema::{DeviceConfig, DeviceId, Status, Telemetry, TopicKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod conversation;

use super::persona::{self, Actor};
use super::session::Session;
use super::telemetry::{last_seq, Slot};
use super::turn::{Internal, INTERNAL_QUEUE};
use super::{intake, Command, DeviceEvent, Dispatcher, Runtime, IDLE_EXIT};
use crate::db::now_ms;
use crate::personas::Persona;
use crate::rules::store::RuleLabel;
use crate::rules::{Action, DeviceView, EventKind, Field, PersonaTarget, RuleEvent, RuleSet};

pub struct Worker {
    device: DeviceId,
    rt: Arc<Runtime>,
    dispatcher: Arc<Dispatcher>,
    persona: Arc<Persona>,
    persona_at: u64,
    persona_trigger: String,
    online: bool,
    config: DeviceConfig,
    /// Persona and config were read from the database (not defaults standing in for a
    /// database that did not answer).
    loaded: bool,
    session: Session,
    internal_tx: mpsc::Sender<Box<Internal>>,
    internal_rx: mpsc::Receiver<Box<Internal>>,
    /// The device's place in the telemetry batcher.
    slot: Arc<Slot>,
}

impl Worker {
    pub fn new(device: DeviceId, rt: Arc<Runtime>, dispatcher: Arc<Dispatcher>) -> Self {
        let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
        Self {
            slot: rt.telemetry.slot(&device),
            device,
            persona: rt.personas.default_persona().clone(),
            rt,
            dispatcher,
            persona_at: 0,
            persona_trigger: "default".into(),
            online: false,
            config: DeviceConfig::default(),
            loaded: false,
            session: Session::default(),
            internal_tx,
            internal_rx,
        }
    }

    /// Reads the device's persona, config and last telemetry sequence number. When the
    /// database does not answer, the worker runs on defaults without announcing them and
    /// tries again on the next event that needs them.
    async fn load(&mut self) {
        let persona = persona::load(&self.rt, &self.device).await;
        let cfg: Result<Option<String>, sqlx::Error> =
            sqlx::query_scalar("SELECT config_json FROM device_configs WHERE device_id = $1")
                .bind(self.device.as_str())
                .fetch_optional(self.rt.db.pool())
                .await;
        if let Some(seq) = last_seq(&self.rt.db, &self.device).await {
            self.rt.telemetry.known(&self.slot, seq);
        }
        match (persona, cfg) {
            (Ok((p, at, trigger)), Ok(cfg)) => {
                self.persona = p;
                self.persona_at = at;
                self.persona_trigger = trigger;
                if let Some(cfg) = cfg.and_then(|c| serde_json::from_str(&c).ok()) {
                    self.config = cfg;
                }
                self.loaded = true;
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(device_id = %self.device, error = %e, "loading the device's persona and config failed; will retry");
            }
        }
    }

    /// Runs until idle for [`IDLE_EXIT`] or shutdown. The handlers' futures are boxed, so an
    /// idle worker (one per connected device) holds only its state, not the largest of them.
    pub async fn run(mut self, mut rx: crate::devices::EventRx, shutdown: CancellationToken) {
        Box::pin(self.load()).await;
        // The idle timer is set once and moved only when it fires (a fresh one per event would
        // cost two timer-wheel operations a message); `busy` is when the worker last had
        // something to do. The shutdown future is likewise made once.
        let mut busy = tokio::time::Instant::now();
        let idle_exit = tokio::time::sleep_until(busy + IDLE_EXIT);
        tokio::pin!(idle_exit);
        let stopped = shutdown.cancelled();
        tokio::pin!(stopped);
        loop {
            let deadline = self.session.deadline();
            let idle = self.session.is_idle();
            if !idle {
                busy = tokio::time::Instant::now();
            }
            // Cases: a device event; a message from this device's turn task; the session's
            // deadline (listening limit or watchdog); nothing to do for a while (exit);
            // shutdown.
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        busy = tokio::time::Instant::now();
                        match *ev {
                            // The common case without a boxed future (the handlers' is large):
                            // telemetry whose rules match nothing needs no await.
                            DeviceEvent::Telemetry(t) => {
                                if let Some(event) = self.telemetry_event(t) {
                                    if let Some((set, matched)) = self.matching_rules(&event) {
                                        Box::pin(self.run_actions(event, set, matched, Instant::now())).await;
                                    }
                                }
                            }
                            ev => Box::pin(self.handle(ev)).await,
                        }
                        self.reopen_inline(&rx);
                    }
                    None => break,
                },
                Some(msg) = self.internal_rx.recv() => {
                    busy = tokio::time::Instant::now();
                    Box::pin(self.handle_internal(*msg)).await
                }
                _ = sleep_until(deadline), if deadline.is_some() => Box::pin(self.session_deadline()).await,
                _ = &mut idle_exit, if idle => {
                    let due = busy + IDLE_EXIT;
                    if due > tokio::time::Instant::now() {
                        idle_exit.as_mut().reset(due);
                    } else if self.dispatcher.retire(&self.device, &rx) {
                        return;
                    } else {
                        // Events arrived as it retired: stay, and look again later.
                        busy = tokio::time::Instant::now();
                        idle_exit.as_mut().reset(busy + IDLE_EXIT);
                    }
                }
                _ = &mut stopped => {
                    self.abandon_session();
                    break;
                }
            }
        }
        self.abandon_session();
        self.dispatcher.retire(&self.device, &rx);
    }

    async fn handle(&mut self, ev: DeviceEvent) {
        // Telemetry needs neither persona nor config: it is not held up by a retry.
        if !self.loaded && !matches!(ev, DeviceEvent::Telemetry(_)) {
            self.load().await;
        }
        match ev {
            DeviceEvent::Telemetry(t) => self.telemetry(t).await,
            DeviceEvent::Button(b, arrived) => {
                let event = RuleEvent {
                    kind: EventKind::Button,
                    topic: self.topic(TopicKind::Button),
                    fields: vec![
                        ("seq", Field::Int(i64::try_from(b.seq).unwrap_or(i64::MAX))),
                        (
                            "ts_ms",
                            Field::Int(i64::try_from(b.ts_ms).unwrap_or(i64::MAX)),
                        ),
                        ("button", Field::Text(b.button.clone())),
                        ("action", Field::Text(b.action.as_str().to_owned())),
                    ],
                };
                self.run_rules(event, arrived).await;
            }
            DeviceEvent::Status(s) => self.status(s).await,
            DeviceEvent::Audio(chunk) => self.audio(chunk).await,
            DeviceEvent::SessionControl(c, arrived) => {
                let event = RuleEvent {
                    kind: EventKind::Session,
                    topic: self.topic(TopicKind::SessionUp),
                    fields: vec![
                        ("session_id", Field::Text(c.session_id.to_string())),
                        (
                            "action",
                            Field::Text(format!("{:?}", c.action).to_lowercase()),
                        ),
                    ],
                };
                self.control(c).await;
                self.run_rules(event, arrived).await;
            }
            DeviceEvent::Presence { online } => {
                self.online = online;
                if online {
                    self.republish_retained().await;
                }
            }
            DeviceEvent::Command(c) => self.command(c).await,
            DeviceEvent::Reload => {
                if self.loaded {
                    self.load().await;
                }
            }
            DeviceEvent::Replay(events) => {
                for ev in events {
                    Box::pin(self.handle(ev)).await;
                }
            }
            DeviceEvent::Matched(m) => {
                let intake::Matched {
                    event,
                    set,
                    rules,
                    started,
                } = *m;
                self.run_actions(event, set, rules, started).await;
            }
        }
    }

    fn topic(&self, kind: TopicKind) -> companion_schema::Topic {
        companion_schema::Topic::new(self.device.clone(), kind)
    }

    fn view(&self) -> DeviceView {
        DeviceView {
            id: self.device.to_string(),
            persona: self.persona.id.to_string(),
            online: self.online,
            battery_pct: self.slot.seq().battery,
        }
    }

    /// Rumqttd keeps retained messages in memory only: after a restart, or for a device that
    /// connects, the backend announces its state again.
    async fn republish_retained(&mut self) {
        if !self.loaded {
            // Defaults stand in for a database that did not answer: announcing them would
            // replace the device's real persona. The edge still holds the last announcement.
            return;
        }
        let state = persona::state(&self.persona, self.persona_at, &self.persona_trigger);
        if let Err(e) = self
            .rt
            .bus
            .publish(&self.device, TopicKind::Persona, &state)
            .await
        {
            tracing::warn!(device_id = %self.device, error = %e, "republishing the persona failed");
        }
        if let Err(e) = self
            .rt
            .bus
            .publish(&self.device, TopicKind::Config, &self.config)
            .await
        {
            tracing::warn!(device_id = %self.device, error = %e, "republishing the config failed");
        }
    }

    async fn telemetry(&mut self, t: Telemetry) {
        if let Some(event) = self.telemetry_event(t) {
            self.run_rules(event, Instant::now()).await;
        }
    }

    /// Telemetry up to the rules, without an await ([`intake::accept`]).
    fn telemetry_event(&mut self, t: Telemetry) -> Option<RuleEvent> {
        let mut state = self.slot.seq();
        intake::accept(&self.rt, &self.slot, &mut state, t)
    }

    /// Lets telemetry skip this worker again once none waits in its queue (checked under the
    /// sequence lock the dispatcher queues telemetry under, so none can slip in between).
    fn reopen_inline(&self, rx: &crate::devices::EventRx) {
        let mut state = self.slot.seq();
        if !state.inline && rx.is_empty() {
            state.inline = true;
        }
    }

    async fn status(&mut self, s: Status) {
        self.online = s.online;
        let event = RuleEvent {
            kind: EventKind::Status,
            topic: self.topic(TopicKind::Status),
            fields: vec![
                ("online", Field::Bool(s.online)),
                ("agent_version", Field::Text(s.agent_version.clone())),
                ("boot_id", Field::Text(s.boot_id.clone())),
            ],
        };
        self.run_rules(event, Instant::now()).await;
    }

    async fn command(&mut self, c: Command) {
        match c {
            Command::SwitchPersona {
                persona,
                actor,
                remote,
                started,
                reply,
            } => {
                let result = match self.rt.personas.get(&persona).cloned() {
                    None => Err(crate::devices::SwitchError::UnknownPersona(
                        persona.to_string(),
                    )),
                    Some(to) => {
                        self.switch_to(
                            &to,
                            "api",
                            started,
                            Some(Actor {
                                name: &actor,
                                remote,
                            }),
                        )
                        .await
                    }
                };
                let _ = reply.send(result);
            }
        }
    }

    async fn switch_to(
        &mut self,
        to: &Arc<Persona>,
        trigger: &str,
        started: Instant,
        actor: Option<Actor<'_>>,
    ) -> Result<companion_schema::PersonaState, crate::devices::SwitchError> {
        let from = self.persona.clone();
        let state =
            persona::switch(&self.rt, &self.device, &from, to, trigger, started, actor).await?;
        self.persona = to.clone();
        self.persona_at = state.switched_at_ms;
        self.persona_trigger = trigger.to_owned();
        if let Some(changes) = &self.rt.changes {
            changes.device_changed(&self.device).await;
        }
        Ok(state)
    }

    /// Evaluates the rules for `event` and runs the actions of those that match. A failing
    /// rule or action is logged and counted and never stops the others.
    async fn run_rules(&mut self, event: RuleEvent, started: Instant) {
        if let Some((set, matched)) = self.matching_rules(&event) {
            self.run_actions(event, set, matched, started).await;
        }
    }

    /// Evaluates the rules for `event`; counts and logs the conditions that failed. The rules
    /// whose actions are due, if any (most events match none: they need no await).
    fn matching_rules(&self, event: &RuleEvent) -> Option<(Arc<RuleSet>, Vec<usize>)> {
        let set = self.rt.rules.current();
        // The view allocates (id, persona): built only for rule sets that read it.
        let view = if set.uses_device() {
            self.view()
        } else {
            DeviceView::default()
        };
        let matched = intake::matching(&self.rt, &set, event, &view, &self.device);
        (!matched.is_empty()).then_some((set, matched))
    }

    /// Runs the actions of the `matched` rules of `set`, in order.
    async fn run_actions(
        &mut self,
        event: RuleEvent,
        set: Arc<RuleSet>,
        matched: Vec<usize>,
        started: Instant,
    ) {
        for i in matched {
            let rule = &set.rules()[i];
            let label = || RuleLabel {
                rule: rule.name.clone(),
            };
            self.rt.rule_metrics.matches.get_or_create(&label()).inc();
            for action in &rule.actions {
                if let Err(reason) = self.execute(action, &event, &rule.name, started).await {
                    self.rt.rule_metrics.failures.get_or_create(&label()).inc();
                    self.rt.metrics.action_failures.inc();
                    tracing::error!(rule = %rule.name, device_id = %self.device, topic = %event.topic, reason = %reason, "rule action failed");
                }
            }
        }
    }

    async fn execute(
        &mut self,
        action: &Action,
        event: &RuleEvent,
        rule: &str,
        started: Instant,
    ) -> Result<(), String> {
        match action {
            Action::Persona(target) => {
                let to = match target {
                    PersonaTarget::Next => self.rt.personas.next(&self.persona.id).clone(),
                    PersonaTarget::Previous => self.rt.personas.previous(&self.persona.id).clone(),
                    PersonaTarget::Id(id) => self
                        .rt
                        .personas
                        .get(id)
                        .cloned()
                        .ok_or_else(|| format!("no persona {id}"))?,
                    PersonaTarget::Named => {
                        let text = event.fields.iter().find_map(|(k, v)| match (k, v) {
                            (&"text", Field::Text(t)) => Some(t.as_str()),
                            _ => None,
                        });
                        let Some(found) = text.and_then(|t| self.rt.personas.named_in(t)) else {
                            return Err("no persona is named in the event's text".into());
                        };
                        found.clone()
                    }
                };
                self.switch_to(&to, &format!("rule:{rule}"), started, None)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Action::Led(cmd) => self
                .rt
                .bus
                .publish(&self.device, TopicKind::Led, cmd)
                .await
                .map_err(|e| e.to_string()),
            Action::Session(verb) => {
                self.rule_session(*verb).await;
                Ok(())
            }
            Action::Say(text) => self.say(text).await,
            Action::Publish { kind, payload_json } => self.publish_json(*kind, payload_json).await,
            Action::Config(patch) => {
                patch.apply(&mut self.config);
                self.store_config().await?;
                self.rt
                    .bus
                    .publish(&self.device, TopicKind::Config, &self.config)
                    .await
                    .map_err(|e| e.to_string())
            }
            Action::Log(message) => {
                tracing::info!(rule, device_id = %self.device, topic = %event.topic, "{message}");
                Ok(())
            }
        }
    }

    async fn publish_json(&self, kind: TopicKind, json: &serde_json::Value) -> Result<(), String> {
        use companion_schema::{LedCommand, PersonaState, SessionEvent};
        let bus = &self.rt.bus;
        let d = &self.device;
        let r = match kind {
            TopicKind::Led => {
                let m: LedCommand =
                    serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
                bus.publish(d, kind, &m).await
            }
            TopicKind::Config => {
                let m: DeviceConfig =
                    serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
                bus.publish(d, kind, &m).await
            }
            TopicKind::Persona => {
                let m: PersonaState =
                    serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
                bus.publish(d, kind, &m).await
            }
            TopicKind::SessionDown => {
                let m: SessionEvent =
                    serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
                bus.publish(d, kind, &m).await
            }
            _ => return Err(format!("{} is not publishable by rules", kind.suffix())),
        };
        r.map_err(|e| e.to_string())
    }

    async fn store_config(&self) -> Result<(), String> {
        let json = serde_json::to_string(&self.config).map_err(|e| e.to_string())?;
        sqlx::query(
            "INSERT INTO device_configs (device_id, config_json, updated_at_ms)
             SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = $1)
             ON CONFLICT (device_id) DO UPDATE SET config_json = excluded.config_json, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(self.device.as_str())
        .bind(json)
        .bind(now_ms())
        .execute(self.rt.db.pool())
        .await
        .map_err(|e| e.to_string())?;
        if let Some(changes) = &self.rt.changes {
            changes.device_changed(&self.device).await;
        }
        Ok(())
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
