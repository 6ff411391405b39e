//! A device for end-to-end tests: rumqttc over TLS, subscribed to its own down topics.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::Duration;

use companion_schema::*;
use rumqttc::QoS;

use super::app::{Client, Seen, TestApp, DEADLINE};

/// A device connected over TLS and subscribed to its own down topics.
pub struct Device {
    pub id: String,
    pub token: String,
    pub client: Client,
    /// What arrived while `connect` waited for SUBACKs (the retained persona and config can
    /// come before the last one); read before the event loop's channel.
    early: VecDeque<Seen>,
    /// The persona state `next_persona` returned last.
    last_persona: Option<PersonaState>,
}

impl Device {
    pub async fn connect(app: &TestApp, id: &str, token: &str) -> Device {
        let mut client = Client::connect(app.device_tls(id, token))
            .await
            .expect("device connects");
        let mut early = VecDeque::new();
        for kind in [
            TopicKind::Led,
            TopicKind::Persona,
            TopicKind::SessionDown,
            TopicKind::Config,
            TopicKind::AudioDown,
        ] {
            let topic = Topic::new(DeviceId::parse(id).unwrap(), kind).to_string();
            let qos = if kind.is_audio() {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            client.client.subscribe(topic, qos).await.unwrap();
            early.extend(wait_suback(&mut client).await);
        }
        Device {
            id: id.to_owned(),
            token: token.to_owned(),
            client,
            early,
            last_persona: None,
        }
    }

    /// The next thing the device's event loop saw, starting with what arrived during `connect`.
    pub async fn recv(&mut self) -> Option<Seen> {
        match self.early.pop_front() {
            Some(seen) => Some(seen),
            None => self.client.rx.recv().await,
        }
    }

    pub async fn register(app: &TestApp, name: &str) -> Device {
        let (id, token) = app.register(name).await;
        Device::connect(app, &id, &token).await
    }

    pub fn topic(&self, kind: TopicKind) -> String {
        Topic::new(DeviceId::parse(&self.id).unwrap(), kind).to_string()
    }

    pub async fn send<T: Message>(&self, kind: TopicKind, msg: &T) {
        let qos = if kind.is_audio() {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        self.client
            .client
            .publish(self.topic(kind), qos, false, encode(msg).unwrap())
            .await
            .unwrap();
    }

    pub async fn press(&self, seq: u64, button: &str, action: ButtonAction) {
        self.send(
            TopicKind::Button,
            &ButtonEvent {
                v: 1,
                seq,
                ts_ms: 0,
                button: button.into(),
                action,
            },
        )
        .await;
    }

    /// The next message on `kind`, skipping others, with a deadline.
    pub async fn next(&mut self, kind: TopicKind) -> Vec<u8> {
        let want = self.topic(kind);
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.recv().await {
                    Some(Seen::Publish { topic, payload }) if topic == want => return payload,
                    Some(Seen::Closed(e)) => panic!("connection closed: {e}"),
                    None => panic!("event loop ended"),
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("nothing on {want} in time"))
    }

    /// The next persona state, skipping a repeat of the one returned last: the retained
    /// announcement can arrive twice (at least once delivery, and rumqttd may hand a
    /// subscriber both the live publish and the retained copy when they cross).
    pub async fn next_persona(&mut self) -> PersonaState {
        loop {
            let state: PersonaState = decode(&self.next(TopicKind::Persona).await).unwrap();
            if self.last_persona.as_ref() != Some(&state) {
                self.last_persona = Some(state.clone());
                return state;
            }
        }
    }

    pub async fn next_led(&mut self) -> LedCommand {
        decode(&self.next(TopicKind::Led).await).unwrap()
    }

    pub async fn next_session(&mut self) -> SessionEvent {
        decode(&self.next(TopicKind::SessionDown).await).unwrap()
    }
}

/// Waits for the next SUBACK; returns the publishes that arrived before it.
pub async fn wait_suback(client: &mut Client) -> Vec<Seen> {
    tokio::time::timeout(DEADLINE, async {
        let mut before = Vec::new();
        loop {
            match client.rx.recv().await {
                Some(Seen::SubAck) => return before,
                Some(Seen::Closed(e)) => panic!("closed: {e}"),
                None => panic!("ended"),
                Some(seen) => before.push(seen),
            }
        }
    })
    .await
    .expect("SUBACK in time")
}

pub async fn metric(app: &TestApp, sample: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    super::sample(&text, sample)
}

/// Waits until `f` is true, polling the server, with a deadline.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
