//! A stand-in server for measurements: the real broker crate (plain + TLS, generated CA) with
//! N generated device credentials, and a backend double that answers persona presses with a
//! `PersonaState` and each utterance with `--reply-s` seconds of Opus audio at real-time pace,
//! then `idle`. Prints where everything is and runs until SIGINT/SIGTERM.
//!
//! ```sh
//! cargo run --release -p companion-agent --example local_server -- --devices 1000 --dir /tmp/cs
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use companion_agent::audio::codec::Encoder;
use companion_agent::hw::FRAME_SAMPLES;
use companion_broker::{
    AuthDecision, AuthRequest, Authenticator, DenyReason, EdgeListeners, Hooks, LocalEvent,
    MqttSettings, NullSink,
};
use companion_schema::{
    decode, encode, AudioChunk, ButtonEvent, Codec, DeviceId, PersonaId, PersonaState,
    SessionAction, SessionControl, SessionEvent, SessionState, Topic, TopicKind,
};
use serde_bytes::ByteBuf;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Auth(HashMap<String, String>);

#[async_trait::async_trait]
impl Authenticator for Auth {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision {
        match (self.0.get(req.username), DeviceId::parse(req.username)) {
            (Some(t), Ok(device)) if t.as_bytes() == req.password => AuthDecision::Allow { device },
            (Some(_), _) => AuthDecision::Deny(DenyReason::BadToken),
            (None, _) => AuthDecision::Deny(DenyReason::UnknownDevice),
        }
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let devices: usize = arg("--devices").map_or(Ok(10), |s| s.parse())?;
    let reply_s: u64 = arg("--reply-s").map_or(Ok(3), |s| s.parse())?;
    let dir = PathBuf::from(arg("--dir").unwrap_or_else(|| "/tmp/companion-local".into()));
    std::fs::create_dir_all(&dir)?;
    let mut settings = MqttSettings {
        listen: "127.0.0.1:0".into(),
        tls_listen: "127.0.0.1:0".into(),
        ..MqttSettings::default()
    };
    settings.max_connections = devices + 100;
    let material = companion_broker::tls::load_or_generate(&settings.tls, &dir, &[])?;
    let tokens: HashMap<String, String> = (0..devices)
        .map(|i| {
            (
                format!("dev-{i:05}"),
                format!("{:032x}", rand::random::<u128>()),
            )
        })
        .collect();
    let mut creds: Vec<_> = tokens.iter().map(|(d, t)| format!("{d},{t}\n")).collect();
    creds.sort();
    std::fs::write(dir.join("credentials.csv"), creds.concat())?;
    let plain = TcpListener::bind("127.0.0.1:0").await?;
    let tls = TcpListener::bind("127.0.0.1:0").await?;
    let (plain_addr, tls_addr) = (plain.local_addr()?, tls.local_addr()?);
    let mut registry = prometheus_client::registry::Registry::default();
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handle = companion_broker::start(
        &settings,
        Some(material.server_config.clone()),
        EdgeListeners {
            plain: Some(plain),
            tls: Some(tls),
            ..Default::default()
        },
        Hooks::new(Arc::new(Auth(tokens)), Arc::new(NullSink)),
        &mut registry,
        shutdown.clone(),
        &tracker,
    )
    .await?;
    println!("plain={plain_addr}");
    println!("tls={tls_addr}");
    println!("ca={}", material.ca_pem_path.display());
    println!("credentials={}", dir.join("credentials.csv").display());

    // The backend double: an in-process router client, owned by one task; replies go through
    // a queue so the audio pacing tasks can publish too.
    let mut local = handle.local_client("double").await?;
    local
        .subscribe(&[
            &TopicKind::Button.all_devices_filter(),
            &TopicKind::SessionUp.all_devices_filter(),
        ])
        .await?;
    let (out, mut queue) = mpsc::channel::<Out>(4096);
    let reply = Arc::new(reply_frames(reply_s));
    tokio::spawn(async move {
        loop {
            // Cases: a reply to publish; a delivery from the router.
            let (topic, payload) = tokio::select! {
                o = queue.recv() => {
                    let Some((topic, payload, retain)) = o else { return };
                    if local.publish(topic, payload, retain).await.is_err() {
                        return;
                    }
                    continue;
                }
                ev = local.next() => match ev {
                    Ok(LocalEvent::Publish { topic, payload, .. }) => (topic, payload),
                    Ok(LocalEvent::SubAck) => continue,
                    Err(_) => return,
                },
            };
            let Ok(t) = Topic::parse(&String::from_utf8_lossy(&topic)) else {
                continue;
            };
            match t.kind {
                TopicKind::Button if decode::<ButtonEvent>(&payload).is_ok() => {
                    let s = PersonaState {
                        v: 1,
                        persona_id: PersonaId::parse("robot").expect("valid"),
                        name: "Robot".into(),
                        color: [0, 120, 255],
                        voice: "en".into(),
                        switched_at_ms: 0,
                        trigger: "button".into(),
                    };
                    if let Ok(b) = encode(&s) {
                        let topic = Topic::new(t.device, TopicKind::Persona).to_string();
                        // Straight to the link: this task drains `queue` itself.
                        if local.publish(topic, b, true).await.is_err() {
                            return;
                        }
                    }
                }
                TopicKind::SessionUp => {
                    let Ok(c) = decode::<SessionControl>(&payload) else {
                        continue;
                    };
                    if c.action == SessionAction::Stop {
                        tokio::spawn(answer(out.clone(), t.device, c, reply.clone()));
                    }
                }
                _ => {}
            }
        }
    });
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    Ok(())
}

fn reply_frames(seconds: u64) -> Vec<Vec<u8>> {
    let Ok(mut enc) = Encoder::new(24_000) else {
        return Vec::new();
    };
    (0..seconds * 50)
        .filter_map(|f| {
            let mut pcm = [0i16; FRAME_SAMPLES];
            for (i, s) in pcm.iter_mut().enumerate() {
                let t = (f as usize * FRAME_SAMPLES + i) as f32 / 16e3;
                *s = (6000.0 * (2.0 * std::f32::consts::PI * 250.0 * t).sin()) as i16;
            }
            enc.encode(&pcm).ok()
        })
        .collect()
}

/// A publish for the double's owner task: topic, payload, retain.
type Out = (String, Vec<u8>, bool);

async fn answer(
    client: mpsc::Sender<Out>,
    device: DeviceId,
    c: SessionControl,
    frames: Arc<Vec<Vec<u8>>>,
) {
    let event = |state| SessionEvent {
        v: 1,
        session_id: c.session_id.clone(),
        state,
        transcript: Some("hello".into()),
        reply_text: Some("a reply".into()),
        error: None,
    };
    let down = Topic::new(device.clone(), TopicKind::SessionDown).to_string();
    let audio = Topic::new(device, TopicKind::AudioDown).to_string();
    for state in [SessionState::Thinking, SessionState::Speaking] {
        if let Ok(b) = encode(&event(state)) {
            let _ = client.send((down.clone(), b, false)).await;
        }
    }
    let chunks: Vec<_> = frames.chunks(3).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(60));
    for (seq, chunk) in chunks.iter().enumerate() {
        tick.tick().await;
        let c = AudioChunk {
            v: 1,
            session_id: c.session_id.clone(),
            seq: seq as u32,
            ts_ms: 0,
            codec: Codec::Opus,
            sample_rate: 16_000,
            frame_ms: 20,
            frames: chunk.iter().map(|f| ByteBuf::from(f.clone())).collect(),
            last: seq + 1 == chunks.len(),
        };
        if let Ok(b) = encode(&c) {
            let _ = client.send((audio.clone(), b, false)).await;
        }
    }
    if let Ok(b) = encode(&event(SessionState::Idle)) {
        let _ = client.send((down, b, false)).await;
    }
}
