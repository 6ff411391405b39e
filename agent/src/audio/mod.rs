//! Audio streams on named threads, bridged to async code with bounded tokio channels:
//! - capture (`audio-capture`): reads 20 ms PCM frames from an [`AudioIn`], Opus-encodes them
//!   and `try_send`s the packets; a full channel drops (and counts) frames rather than block.
//! - playback (`audio-playback`): receives Opus frames, orders them in a [`JitterBuffer`],
//!   decodes (concealing lost chunks) and writes to an [`AudioOut`]; a cancel flag stops it
//!   within one frame and discards what the device still queued.

pub mod alsa;
pub mod codec;
pub mod jitter;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use crate::hw::{AudioIn, AudioOut, HwError, FRAME_SAMPLES};
use codec::{CodecError, Decoder, Encoder};
use jitter::{JitterBuffer, Pop};

/// Encoded frames waiting for the uplink: 1 s.
pub const CAPTURE_CAPACITY: usize = 50;
/// Chunks waiting for the playback thread.
pub const PLAYBACK_CAPACITY: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error(transparent)]
    Hw(#[from] HwError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// A running capture. Dropping it stops the thread.
pub struct Capture {
    pub frames: mpsc::Receiver<Vec<u8>>,
    pub dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Capture {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens the input and starts encoding on the `audio-capture` thread.
pub fn start_capture(input: &dyn AudioIn, bitrate: i32) -> Result<Capture, AudioError> {
    let mut source = input.open()?;
    let mut encoder = Encoder::new(bitrate)?;
    let (tx, rx) = mpsc::channel(CAPTURE_CAPACITY);
    let stop = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let (stop2, dropped2) = (stop.clone(), dropped.clone());
    std::thread::Builder::new()
        .name("audio-capture".into())
        .spawn(move || {
            let mut pcm = [0i16; FRAME_SAMPLES];
            while !stop2.load(Ordering::Relaxed) {
                match source.read_frame(&mut pcm) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "capture failed");
                        break;
                    }
                }
                let packet = match encoder.encode(&pcm) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "encoding failed");
                        break;
                    }
                };
                match tx.try_send(packet) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        dropped2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        })
        .map_err(HwError::Io)?;
    Ok(Capture {
        frames: rx,
        dropped,
        stop,
    })
}

/// What the playback thread receives.
pub struct PlayItem {
    seq: u32,
    frames: Vec<Vec<u8>>,
    last: bool,
}

/// How a playback ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaybackReport {
    pub frames_played: u64,
    pub lost: u64,
    pub cancelled: bool,
}

/// A running playback. Dropping it without [`Playback::cancel`] lets it play out.
pub struct Playback {
    tx: Option<mpsc::Sender<PlayItem>>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<PlaybackReport>>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Playback {
    /// Queues a chunk; false (and counted) when the thread is behind or gone.
    pub fn push(&mut self, seq: u32, frames: Vec<Vec<u8>>, last: bool) -> bool {
        let ok = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(PlayItem { seq, frames, last }).is_ok());
        if last {
            self.tx = None;
        }
        ok
    }

    /// Stops at once: the thread discards what is buffered here and in the device.
    pub fn cancel(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.tx = None;
    }

    /// Resolves once the thread has stopped (played out, cancelled or failed).
    pub async fn finished(&mut self) {
        if let Some(rx) = &mut self.done {
            let _ = rx.await;
            self.done = None;
        }
    }

    /// Waits for the thread (call from a blocking context or once finished).
    pub fn join(mut self) -> PlaybackReport {
        self.tx = None;
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// Opens the output and starts the `audio-playback` thread. `volume` is 0-100.
pub fn start_playback(
    output: &dyn AudioOut,
    volume: Arc<AtomicU8>,
) -> Result<Playback, AudioError> {
    let mut sink = output.open()?;
    let mut decoder = Decoder::new()?;
    let (tx, mut rx) = mpsc::channel::<PlayItem>(PLAYBACK_CAPACITY);
    let cancel = Arc::new(AtomicBool::new(false));
    let cancel2 = cancel.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("audio-playback".into())
        .spawn(move || {
            let mut jb = JitterBuffer::new();
            let mut report = PlaybackReport::default();
            let mut pcm = Vec::with_capacity(FRAME_SAMPLES);
            let mut open = true;
            loop {
                if cancel2.load(Ordering::Relaxed) {
                    report.cancelled = true;
                    break;
                }
                // Take whatever arrived without waiting.
                while let Ok(PlayItem { seq, frames, last }) = rx.try_recv() {
                    jb.push(seq, frames, last);
                }
                let packet = match jb.pop() {
                    Pop::Frame(f) => Some(f),
                    Pop::Lost => None,
                    Pop::Empty if jb.is_done() || !open => break,
                    Pop::Empty => {
                        // Nothing to play: block for the next chunk (or the end).
                        match rx.blocking_recv() {
                            Some(PlayItem { seq, frames, last }) => jb.push(seq, frames, last),
                            None => {
                                open = false;
                                jb.push(u32::MAX, Vec::new(), true);
                            }
                        }
                        continue;
                    }
                };
                if let Err(e) = decoder.decode(packet.as_deref(), &mut pcm) {
                    tracing::warn!(error = %e, "dropping an undecodable frame");
                    continue;
                }
                let gain = volume.load(Ordering::Relaxed).min(100) as i32;
                if gain != 100 {
                    for s in pcm.iter_mut() {
                        *s = (*s as i32 * gain / 100) as i16;
                    }
                }
                if let Err(e) = sink.write_frame(&pcm) {
                    tracing::error!(error = %e, "playback failed");
                    break;
                }
                report.frames_played += 1;
            }
            report.lost = jb.lost;
            if let Err(e) = sink.finish(report.cancelled) {
                tracing::warn!(error = %e, "closing playback failed");
            }
            let _ = done_tx.send(());
            report
        })
        .map_err(HwError::Io)?;
    Ok(Playback {
        tx: Some(tx),
        cancel,
        thread: Some(thread),
        done: Some(done_rx),
    })
}
