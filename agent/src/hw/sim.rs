//! Simulated hardware: audio from and to WAV files, buttons from lines on stdin or a Unix
//! socket, the LED as log lines (and a watch channel for tests and tools).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    parse_button_line, AudioIn, AudioOut, ButtonInput, Buttons, HwError, LedState, Leds, PcmSink,
    PcmSource, FRAME_SAMPLES,
};

const FRAME: Duration = Duration::from_millis(20);

/// Paces a loop at one frame per 20 ms of wall time (simulated hardware has no clock of its
/// own; real ALSA devices pace themselves).
struct Pacer {
    start: Option<Instant>,
    frames: u32,
}

impl Pacer {
    fn new() -> Self {
        Self {
            start: None,
            frames: 0,
        }
    }
    fn wait(&mut self) {
        let start = *self.start.get_or_insert_with(Instant::now);
        self.frames += 1;
        let due = start + FRAME * self.frames;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
}

/// A microphone that plays a WAV file (16 kHz mono 16-bit), or a quiet 440 Hz tone forever.
#[derive(Debug, Clone)]
pub struct WavIn {
    pub path: Option<PathBuf>,
    /// Deliver frames at real-time pace (a real microphone does).
    pub realtime: bool,
}

impl AudioIn for WavIn {
    fn open(&self) -> Result<Box<dyn PcmSource>, HwError> {
        let samples = match &self.path {
            Some(p) => Some(read_wav(p)?),
            None => None,
        };
        Ok(Box::new(WavSource {
            samples,
            at: 0,
            pacer: self.realtime.then(Pacer::new),
        }))
    }
}

/// Reads a 16 kHz mono 16-bit WAV file.
pub fn read_wav(p: &std::path::Path) -> Result<Vec<i16>, HwError> {
    let err = |reason: String| HwError::Wav {
        path: p.display().to_string(),
        reason,
    };
    let r = hound::WavReader::open(p).map_err(|e| err(e.to_string()))?;
    let spec = r.spec();
    if spec.sample_rate != 16_000 || spec.channels != 1 || spec.bits_per_sample != 16 {
        return Err(err(format!(
            "{} Hz, {} channel(s), {} bit; 16000 Hz mono 16-bit is needed (sox in.wav -r 16000 -c 1 -b 16 out.wav)",
            spec.sample_rate, spec.channels, spec.bits_per_sample
        )));
    }
    r.into_samples::<i16>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))
}

struct WavSource {
    samples: Option<Vec<i16>>,
    at: usize,
    pacer: Option<Pacer>,
}

impl PcmSource for WavSource {
    fn read_frame(&mut self, out: &mut [i16; FRAME_SAMPLES]) -> Result<bool, HwError> {
        match &self.samples {
            Some(s) => {
                if self.at >= s.len() {
                    return Ok(false);
                }
                let end = (self.at + FRAME_SAMPLES).min(s.len());
                out.fill(0);
                out[..end - self.at].copy_from_slice(&s[self.at..end]);
            }
            None => {
                for (i, o) in out.iter_mut().enumerate() {
                    let t = (self.at + i) as f32 / 16_000.0;
                    *o = (2000.0 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()) as i16;
                }
            }
        }
        self.at += FRAME_SAMPLES;
        if let Some(p) = &mut self.pacer {
            p.wait();
        }
        Ok(true)
    }
}

/// A speaker that writes each reply to a WAV file (`reply-N.wav` in `dir`, or exactly
/// `file`), or only counts samples when neither is set.
#[derive(Debug, Clone, Default)]
pub struct WavOut {
    pub dir: Option<PathBuf>,
    pub file: Option<PathBuf>,
    pub realtime: bool,
    pub samples_played: Arc<AtomicU64>,
    opened: Arc<AtomicU64>,
}

impl WavOut {
    pub fn new(dir: Option<PathBuf>, file: Option<PathBuf>, realtime: bool) -> Self {
        Self {
            dir,
            file,
            realtime,
            ..Self::default()
        }
    }
}

impl AudioOut for WavOut {
    fn open(&self) -> Result<Box<dyn PcmSink>, HwError> {
        let n = self.opened.fetch_add(1, Ordering::Relaxed);
        let path = self
            .file
            .clone()
            .or_else(|| self.dir.as_ref().map(|d| d.join(format!("reply-{n}.wav"))));
        let writer = match &path {
            Some(p) => {
                let spec = hound::WavSpec {
                    channels: 1,
                    sample_rate: 16_000,
                    bits_per_sample: 16,
                    sample_format: hound::SampleFormat::Int,
                };
                Some(hound::WavWriter::create(p, spec).map_err(|e| HwError::Wav {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?)
            }
            None => None,
        };
        Ok(Box::new(WavSink {
            writer,
            path,
            pacer: self.realtime.then(Pacer::new),
            played: self.samples_played.clone(),
        }))
    }
}

struct WavSink {
    writer: Option<hound::WavWriter<std::io::BufWriter<std::fs::File>>>,
    path: Option<PathBuf>,
    pacer: Option<Pacer>,
    played: Arc<AtomicU64>,
}

impl WavSink {
    fn wav_err(&self, e: hound::Error) -> HwError {
        HwError::Wav {
            path: self
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            reason: e.to_string(),
        }
    }
}

impl PcmSink for WavSink {
    fn write_frame(&mut self, pcm: &[i16]) -> Result<(), HwError> {
        if let Some(w) = &mut self.writer {
            for s in pcm {
                if let Err(e) = w.write_sample(*s) {
                    return Err(self.wav_err(e));
                }
            }
        }
        self.played.fetch_add(pcm.len() as u64, Ordering::Relaxed);
        if let Some(p) = &mut self.pacer {
            p.wait();
        }
        Ok(())
    }

    fn finish(&mut self, _abort: bool) -> Result<(), HwError> {
        if let Some(w) = self.writer.take() {
            w.finalize().map_err(|e| self.wav_err(e))?;
        }
        Ok(())
    }
}

/// Buttons from `button action` lines on any async reader (stdin).
pub struct LineButtons<R> {
    pub reader: R,
}

impl<R: AsyncBufRead + Unpin + Send + 'static> Buttons for LineButtons<R> {
    fn start(
        self: Box<Self>,
        tx: mpsc::Sender<ButtonInput>,
        shutdown: CancellationToken,
    ) -> Result<(), HwError> {
        tokio::spawn(read_lines(self.reader, tx, shutdown));
        Ok(())
    }
}

async fn read_lines<R: AsyncBufRead + Unpin>(
    reader: R,
    tx: mpsc::Sender<ButtonInput>,
    shutdown: CancellationToken,
) {
    let mut lines = reader.lines();
    loop {
        // Cases: shutdown; the next line (or the end of input).
        let line = tokio::select! {
            _ = shutdown.cancelled() => return,
            l = lines.next_line() => l,
        };
        match line {
            Ok(Some(l)) if l.trim().is_empty() => {}
            Ok(Some(l)) => match parse_button_line(&l) {
                Some(b) => {
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
                None => tracing::warn!(line = %l, "not a button line (expected e.g. `talk press`)"),
            },
            Ok(None) | Err(_) => return,
        }
    }
}

/// Buttons from stdin.
pub fn stdin_buttons() -> LineButtons<BufReader<tokio::io::Stdin>> {
    LineButtons {
        reader: BufReader::new(tokio::io::stdin()),
    }
}

/// Buttons from lines written to a Unix socket (`echo 'talk press' | nc -U sock`).
pub struct SocketButtons {
    pub path: PathBuf,
}

impl Buttons for SocketButtons {
    fn start(
        self: Box<Self>,
        tx: mpsc::Sender<ButtonInput>,
        shutdown: CancellationToken,
    ) -> Result<(), HwError> {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path)?;
        tokio::spawn(async move {
            loop {
                // Cases: shutdown; a new connection.
                let conn = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    c = listener.accept() => c,
                };
                match conn {
                    Ok((stream, _)) => {
                        tokio::spawn(read_lines(
                            BufReader::new(stream),
                            tx.clone(),
                            shutdown.clone(),
                        ));
                    }
                    Err(e) => tracing::warn!(error = %e, "button socket accept failed"),
                }
            }
        });
        Ok(())
    }
}

/// Buttons fed from a channel (tests and tools).
pub struct ChannelButtons {
    pub rx: mpsc::Receiver<ButtonInput>,
}

impl Buttons for ChannelButtons {
    fn start(
        mut self: Box<Self>,
        tx: mpsc::Sender<ButtonInput>,
        shutdown: CancellationToken,
    ) -> Result<(), HwError> {
        tokio::spawn(async move {
            loop {
                // Cases: shutdown; the next input.
                let b = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    b = self.rx.recv() => b,
                };
                let Some(b) = b else { return };
                if tx.send(b).await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }
}

/// The LED as log lines, also published on a watch channel.
pub struct LogLeds {
    tx: watch::Sender<LedState>,
}

impl LogLeds {
    pub fn new() -> (Self, watch::Receiver<LedState>) {
        let (tx, rx) = watch::channel(LedState::OFF);
        (Self { tx }, rx)
    }
}

impl Leds for LogLeds {
    fn show(&mut self, state: LedState) {
        if *self.tx.borrow() != state {
            tracing::info!(target: "led", led = %state, "led");
            self.tx.send_replace(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wav_round_trips_through_the_sim_speaker_and_microphone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.wav");
        let out = WavOut::new(None, Some(file.clone()), false);
        let mut sink = out.open().unwrap();
        let frame: Vec<i16> = (0..FRAME_SAMPLES as i16).collect();
        sink.write_frame(&frame).unwrap();
        sink.write_frame(&frame[..100]).unwrap();
        sink.finish(false).unwrap();
        assert_eq!(out.samples_played.load(Ordering::Relaxed), 420);
        let mut src = WavIn {
            path: Some(file),
            realtime: false,
        }
        .open()
        .unwrap();
        let mut buf = [0i16; FRAME_SAMPLES];
        assert!(src.read_frame(&mut buf).unwrap());
        assert_eq!(buf[5], 5);
        assert!(src.read_frame(&mut buf).unwrap());
        assert_eq!((buf[99], buf[100]), (99, 0), "the last frame is padded");
        assert!(!src.read_frame(&mut buf).unwrap());
    }

    #[test]
    fn a_wav_in_the_wrong_format_is_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 44_100,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        hound::WavWriter::create(&file, spec)
            .unwrap()
            .finalize()
            .unwrap();
        let err = read_wav(&file).unwrap_err().to_string();
        assert!(err.contains("16000 Hz mono"), "{err}");
    }

    #[tokio::test]
    async fn button_lines_become_inputs_and_bad_lines_are_skipped() {
        let (tx, mut rx) = mpsc::channel(8);
        let input: &[u8] = b"talk press\nnonsense\n\ntalk release\n";
        Box::new(LineButtons { reader: input })
            .start(tx, CancellationToken::new())
            .unwrap();
        assert_eq!(
            rx.recv().await.unwrap().action,
            companion_schema::ButtonAction::Press
        );
        assert_eq!(
            rx.recv().await.unwrap().action,
            companion_schema::ButtonAction::Release
        );
        assert!(rx.recv().await.is_none());
    }
}
