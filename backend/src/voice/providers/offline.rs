//! Offline engines, used when a provider has no key and as the fallback when one fails:
//! pocketsphinx (`pocketsphinx_continuous`, Debian `pocketsphinx` + `pocketsphinx-en-us`)
//! for speech-to-text, espeak-ng for speech, and the persona's scripted replies as the answer.
//!
//! The programs run as child processes with `kill_on_drop`, so dropping a call (cancellation)
//! kills them; they never block a runtime thread.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tracing::debug;

use super::openai::pcm_stream;
use super::{
    AudioStream, ChatRequest, LanguageModel, LlmEvent, LlmStream, ProviderError, SpeechToText,
    TextToSpeech,
};
use crate::personas::Persona;
use crate::voice::settings::OfflineSettings;
use crate::voice::Role;

/// Bytes read from espeak-ng's stdout at a time.
const READ_CHUNK: usize = 8_192;
/// Most stderr kept for an error message.
const STDERR_LIMIT: usize = 1_024;

fn process_err(program: &'static str, message: impl Into<String>) -> ProviderError {
    ProviderError::Process {
        program,
        message: message.into(),
    }
}

/// Speech-to-text with pocketsphinx's US English model.
pub struct Pocketsphinx {
    program: PathBuf,
    model_dir: PathBuf,
    timeout: Duration,
}

impl Pocketsphinx {
    pub fn new(settings: &OfflineSettings) -> Self {
        Self {
            program: settings.pocketsphinx.clone(),
            model_dir: settings.pocketsphinx_model_dir.clone(),
            timeout: Duration::from_millis(settings.timeout_ms),
        }
    }
}

#[async_trait]
impl SpeechToText for Pocketsphinx {
    fn name(&self) -> &'static str {
        "pocketsphinx"
    }

    async fn transcribe(&self, pcm: &[i16]) -> Result<String, ProviderError> {
        const NAME: &str = "pocketsphinx";
        // A name without `.wav` makes pocketsphinx_continuous read raw 16 kHz s16le samples.
        let mut child = Command::new(&self.program)
            .arg("-infile")
            .arg("/dev/stdin")
            .arg("-hmm")
            .arg(self.model_dir.join("en-us"))
            .arg("-lm")
            .arg(self.model_dir.join("en-us.lm.bin"))
            .arg("-dict")
            .arg(self.model_dir.join("cmudict-en-us.dict"))
            .arg("-logfn")
            .arg("/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                process_err(
                    NAME,
                    format!("cannot start {}: {e}", self.program.display()),
                )
            })?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| process_err(NAME, "no stdin"))?;
        let bytes: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
        let feed = async move {
            // A child that exits early closes the pipe; its status tells why.
            let _ = stdin.write_all(&bytes).await;
            drop(stdin);
        };
        let run = async {
            let ((), output) = tokio::join!(feed, child.wait_with_output());
            output
        };
        let output = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| ProviderError::Timeout(self.timeout))?
            .map_err(|e| process_err(NAME, e.to_string()))?;
        if !output.status.success() {
            let mut err = String::from_utf8_lossy(&output.stderr).into_owned();
            err.truncate(STDERR_LIMIT);
            return Err(process_err(
                NAME,
                format!("{}: {}", output.status, err.trim()),
            ));
        }
        let text = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        debug!(chars = text.len(), "pocketsphinx transcript");
        Ok(text)
    }
}

/// Speech with espeak-ng: WAV (22.05 kHz) on stdout, streamed and resampled to 16 kHz.
pub struct Espeak {
    program: PathBuf,
    timeout: Duration,
}

impl Espeak {
    pub fn new(settings: &OfflineSettings) -> Self {
        Self {
            program: settings.espeak_ng.clone(),
            timeout: Duration::from_millis(settings.timeout_ms),
        }
    }
}

#[async_trait]
impl TextToSpeech for Espeak {
    fn name(&self) -> &'static str {
        "espeak"
    }

    fn voice(&self, persona: &Persona) -> Option<String> {
        Some(persona.voice.clone())
    }

    async fn synthesize(&self, text: &str, voice: &str) -> Result<AudioStream, ProviderError> {
        const NAME: &str = "espeak-ng";
        // Text goes through stdin: never parsed as options.
        let mut child = Command::new(&self.program)
            .arg("-v")
            .arg(voice)
            .arg("--stdout")
            .arg("--stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                process_err(
                    NAME,
                    format!("cannot start {}: {e}", self.program.display()),
                )
            })?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| process_err(NAME, "no stdin"))?;
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| process_err(NAME, e.to_string()))?;
        drop(stdin);
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| process_err(NAME, "no stdout"))?;
        let timeout = self.timeout;
        let deadline = tokio::time::Instant::now() + timeout;

        // Read until the WAV header ends, to learn the rate.
        let mut header = WavHeader::default();
        let mut first = Vec::new();
        let rate = loop {
            let mut buf = vec![0u8; READ_CHUNK];
            let n = tokio::time::timeout_at(deadline, stdout.read(&mut buf))
                .await
                .map_err(|_| ProviderError::Timeout(timeout))?
                .map_err(|e| process_err(NAME, e.to_string()))?;
            if n == 0 {
                let status = child
                    .wait()
                    .await
                    .map_err(|e| process_err(NAME, e.to_string()))?;
                return Err(process_err(
                    NAME,
                    format!("no audio ({status}); is voice {voice:?} installed?"),
                ));
            }
            if let Some((rate, rest)) = header.push(&buf[..n])? {
                first.extend_from_slice(rest);
                break rate;
            }
        };

        // The child moves into the stream: dropping the stream kills it.
        let chunks = futures::stream::unfold(
            Some((child, stdout, Some(first))),
            move |state| async move {
                let (mut child, mut stdout, first) = state?;
                if let Some(first) = first.filter(|f| !f.is_empty()) {
                    return Some((Ok(Bytes::from(first)), Some((child, stdout, None))));
                }
                let mut buf = vec![0u8; READ_CHUNK];
                match tokio::time::timeout_at(deadline, stdout.read(&mut buf)).await {
                    Err(_) => Some((Err(ProviderError::Timeout(timeout)), None)),
                    Ok(Err(e)) => Some((Err(process_err(NAME, e.to_string())), None)),
                    Ok(Ok(0)) => match child.wait().await {
                        Ok(s) if s.success() => None,
                        Ok(s) => Some((Err(process_err(NAME, s.to_string())), None)),
                        Err(e) => Some((Err(process_err(NAME, e.to_string())), None)),
                    },
                    Ok(Ok(n)) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), Some((child, stdout, None))))
                    }
                }
            },
        );
        Ok(pcm_stream(chunks.boxed(), rate))
    }
}

/// Parses a WAV header from a stream whose sizes may be placeholders (espeak-ng writes
/// 0x7ffff000 when stdout is a pipe): everything after the `data` chunk header is PCM.
#[derive(Debug, Default)]
struct WavHeader {
    buf: Vec<u8>,
    rate: Option<u32>,
}

impl WavHeader {
    /// `Some((rate, rest))` once the header is complete.
    fn push<'a>(&mut self, bytes: &'a [u8]) -> Result<Option<(u32, &'a [u8])>, ProviderError> {
        let bad = |m: &str| ProviderError::Audio(format!("espeak-ng WAV: {m}"));
        let before = self.buf.len();
        self.buf.extend_from_slice(bytes);
        if self.buf.len() < 12 {
            return Ok(None);
        }
        if &self.buf[..4] != b"RIFF" || &self.buf[8..12] != b"WAVE" {
            return Err(bad("not RIFF/WAVE"));
        }
        let mut at = 12;
        while self.buf.len() >= at + 8 {
            let id = &self.buf[at..at + 4];
            let size = u32::from_le_bytes([
                self.buf[at + 4],
                self.buf[at + 5],
                self.buf[at + 6],
                self.buf[at + 7],
            ]) as usize;
            if id == b"data" {
                let rate = self.rate.ok_or_else(|| bad("data before fmt"))?;
                let start = at + 8;
                let consumed_here = start.saturating_sub(before);
                return Ok(Some((rate, &bytes[consumed_here.min(bytes.len())..])));
            }
            if self.buf.len() < at + 8 + size {
                return Ok(None);
            }
            if id == b"fmt " {
                let body = &self.buf[at + 8..at + 8 + size];
                if body.len() < 16 {
                    return Err(bad("short fmt chunk"));
                }
                let format = u16::from_le_bytes([body[0], body[1]]);
                let channels = u16::from_le_bytes([body[2], body[3]]);
                let bits = u16::from_le_bytes([body[14], body[15]]);
                if format != 1 || channels != 1 || bits != 16 {
                    return Err(bad("expected 16-bit mono PCM"));
                }
                self.rate = Some(u32::from_le_bytes([body[4], body[5], body[6], body[7]]));
            }
            at += 8 + size + (size & 1);
            if at > 4_096 {
                return Err(bad("header too long"));
            }
        }
        Ok(None)
    }
}

/// The persona's scripted replies as the answer: the `n`th user turn gets `fallback_reply(n)`.
pub struct Scripted;

#[async_trait]
impl LanguageModel for Scripted {
    fn name(&self) -> &'static str {
        "offline"
    }

    async fn stream(&self, request: &ChatRequest<'_>) -> Result<LlmStream, ProviderError> {
        let n = request
            .turns
            .iter()
            .filter(|t| t.role == Role::User)
            .count()
            .saturating_sub(1);
        let reply = request.persona.fallback_reply(n).to_owned();
        let items = vec![Ok(LlmEvent::Text(reply)), Ok(LlmEvent::Done(None))];
        Ok(Box::pin(futures::stream::iter(items)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_wav_header_with_placeholder_sizes_parses_in_pieces() {
        let mut wav = Vec::new();
        wav.extend_from_slice(b"RIFF\x24\xf0\xff\x7fWAVEfmt \x10\0\0\0\x01\0\x01\0");
        wav.extend_from_slice(&22_050u32.to_le_bytes());
        wav.extend_from_slice(&44_100u32.to_le_bytes());
        wav.extend_from_slice(b"\x02\0\x10\0data\0\xf0\xff\x7f");
        wav.extend_from_slice(&[1, 2, 3, 4]);
        let mut h = WavHeader::default();
        let mut found = None;
        for piece in wav.chunks(5) {
            if let Some((rate, rest)) = h.push(piece).unwrap() {
                found = Some((rate, rest.to_vec()));
                break;
            }
        }
        let (rate, rest) = found.unwrap();
        assert_eq!(rate, 22_050);
        // The data header ends at byte 44; the piece holding it was bytes 40..45.
        assert_eq!(rest, [1]);
    }
}
