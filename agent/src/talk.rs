//! `companion-agent talk --wav IN.wav [--out REPLY.wav]`: one push-to-talk utterance from a
//! file through the real agent stack (link, controller, Opus, jitter buffer), printing the
//! session events and writing the reply audio.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use companion_schema::{ButtonAction, SessionState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::controller::Observed;
use crate::hw::sim::{ChannelButtons, LogLeds, WavIn, WavOut};
use crate::hw::ButtonInput;
use crate::{Hardware, RunOptions};

#[derive(Debug, thiserror::Error)]
pub enum TalkError {
    #[error("no connection to the server within {0:?}")]
    NoConnection(Duration),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("the session failed: {0}")]
    Session(String),
    #[error(transparent)]
    Wav(#[from] crate::hw::HwError),
    #[error("the agent stopped: {0}")]
    Agent(String),
}

/// What one utterance produced.
#[derive(Debug, Clone, Default)]
pub struct TalkOutcome {
    pub transcript: Option<String>,
    pub reply_text: Option<String>,
    pub states: Vec<SessionState>,
    pub reply_played: bool,
}

pub struct TalkOptions {
    pub wav: PathBuf,
    pub out: Option<PathBuf>,
    pub timeout: Duration,
    /// Stream the file at real-time pace (as a microphone would).
    pub realtime: bool,
}

/// Runs one utterance. `print` gets each line meant for the person at the terminal.
pub async fn talk(
    settings: Settings,
    opts: TalkOptions,
    mut print: impl FnMut(String),
) -> Result<TalkOutcome, TalkError> {
    crate::hw::sim::read_wav(&opts.wav)?;
    let (press_tx, press_rx) = mpsc::channel(4);
    let (obs_tx, mut obs) = mpsc::channel(crate::controller::OBSERVER_CAPACITY);
    let (leds, _led_rx) = LogLeds::new();
    let hardware = Hardware {
        audio_in: Arc::new(WavIn {
            path: Some(opts.wav.clone()),
            realtime: opts.realtime,
        }),
        audio_out: Arc::new(WavOut::new(None, opts.out.clone(), false)),
        buttons: Box::new(ChannelButtons { rx: press_rx }),
        leds: Box::new(leds),
    };
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(crate::run(
        settings,
        hardware,
        RunOptions {
            observer: Some(obs_tx),
            ..Default::default()
        },
        shutdown.clone(),
    ));
    let result = tokio::time::timeout(opts.timeout, drive(&press_tx, &mut obs, &mut print)).await;
    shutdown.cancel();
    match agent.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(TalkError::Agent(format!("{e:#}"))),
        Err(e) => return Err(TalkError::Agent(e.to_string())),
    }
    match result {
        Ok(r) => r,
        Err(_) => Err(TalkError::Timeout(opts.timeout)),
    }
}

async fn drive(
    press: &mpsc::Sender<ButtonInput>,
    obs: &mut mpsc::Receiver<Observed>,
    print: &mut impl FnMut(String),
) -> Result<TalkOutcome, TalkError> {
    let mut out = TalkOutcome::default();
    let mut session = None;
    let mut idle = false;
    let mut closed = false;
    while let Some(o) = obs.recv().await {
        match o {
            Observed::Connected(true) if session.is_none() => {
                let b = ButtonInput {
                    button: crate::controller::DEFAULT_TALK_BUTTON.into(),
                    action: ButtonAction::Press,
                };
                let _ = press.send(b).await;
            }
            Observed::Started(s) => {
                print(format!("session {s}: streaming"));
                session = Some(s);
            }
            Observed::Stopped { session: s, chunks } => {
                print(format!("session {s}: sent {chunks} audio chunks"));
            }
            Observed::Session(e) if Some(&e.session_id) == session.as_ref() => {
                print(format!("session {}: {:?}", e.session_id, e.state));
                if let Some(t) = &e.transcript {
                    print(format!("  transcript: {t}"));
                    out.transcript = Some(t.clone());
                }
                if let Some(r) = &e.reply_text {
                    print(format!("  reply: {r}"));
                    out.reply_text = Some(r.clone());
                }
                out.states.push(e.state);
                if e.state == SessionState::Error {
                    return Err(TalkError::Session(e.error.unwrap_or_default()));
                }
                if e.state == SessionState::Idle && out.states.len() > 1 {
                    idle = true;
                }
            }
            Observed::PlaybackEnded { cancelled, .. } => out.reply_played = !cancelled,
            Observed::ReplyClosed(s) if Some(&s) == session.as_ref() => closed = true,
            _ => {}
        }
        if idle && closed {
            return Ok(out);
        }
    }
    Err(TalkError::Agent("the controller stopped".into()))
}
