//! Audio: Opus decoding of the uplink with voice activity detection ([`OpusUplink`]), Opus
//! encoding of outgoing speech in 20 ms frames batched for [`VoiceOutput::Audio`]
//! ([`OpusFramer`]), and WAV helpers for the offline engines and tests.
//!
//! Everything here is synchronous CPU work: a 20 ms frame costs tens of microseconds (see the
//! `voice` bench), so the pipeline batches it and runs batches on blocking threads.

use std::io::Cursor;

use opus::{Application, Bitrate, Channels};

use super::UplinkAudio;
use super::VoiceError;

/// The device audio format: 16 kHz mono.
pub const SAMPLE_RATE: u32 = 16_000;
/// One 20 ms frame at 16 kHz.
pub const FRAME_SAMPLES: usize = 320;
/// Opus frames per [`super::VoiceOutput::Audio`].
pub const FRAMES_PER_CHUNK: usize = 5;
/// The longest frame an uplink packet may decode to (120 ms, Opus's maximum).
const MAX_DECODED_SAMPLES: usize = 1_920;
/// Output buffer for one encoded frame (Opus caps a frame at 1275 bytes).
const MAX_PACKET: usize = 1_500;
/// earshot's analysis window: 256 samples (16 ms) at 16 kHz.
const VAD_WINDOW: usize = 256;
/// Consecutive voiced windows before an utterance counts as having started (48 ms), so a
/// click does not arm the end-of-speech timer.
const VAD_MIN_SPEECH_WINDOWS: u32 = 3;

fn opus_err(what: &str, e: opus::Error) -> VoiceError {
    VoiceError::Audio(format!("{what}: {e}"))
}

/// Decodes one utterance and watches for its end.
pub struct OpusUplink {
    decoder: opus::Decoder,
    vad: Box<earshot::Detector>,
    threshold: f32,
    pcm: Vec<i16>,
    /// Decoded samples not yet seen by the detector (< one window).
    pending: Vec<i16>,
    voiced_run: u32,
    speech_seen: bool,
    silence_samples: usize,
    silence_needed: usize,
    ended: bool,
    scratch: Vec<i16>,
}

impl std::fmt::Debug for OpusUplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusUplink")
            .field("samples", &self.pcm.len())
            .field("speech_seen", &self.speech_seen)
            .field("ended", &self.ended)
            .finish()
    }
}

impl OpusUplink {
    pub fn new(silence_ms: u32, threshold: f32) -> Result<Self, VoiceError> {
        Ok(Self {
            decoder: opus::Decoder::new(SAMPLE_RATE, Channels::Mono)
                .map_err(|e| opus_err("decoder", e))?,
            vad: earshot::Detector::default_boxed(),
            threshold,
            pcm: Vec::new(),
            pending: Vec::with_capacity(VAD_WINDOW * 2),
            voiced_run: 0,
            speech_seen: false,
            silence_samples: 0,
            silence_needed: silence_ms as usize * SAMPLE_RATE as usize / 1000,
            ended: false,
            scratch: vec![0; MAX_DECODED_SAMPLES],
        })
    }

    /// Whether speech has been heard yet.
    pub fn speech_seen(&self) -> bool {
        self.speech_seen
    }

    fn detect(&mut self, samples: &[i16]) {
        self.pending.extend_from_slice(samples);
        let mut used = 0;
        while self.pending.len() - used >= VAD_WINDOW {
            let window = &self.pending[used..used + VAD_WINDOW];
            used += VAD_WINDOW;
            let score = self.vad.predict_i16(window);
            if score >= self.threshold {
                self.voiced_run += 1;
                if self.voiced_run >= VAD_MIN_SPEECH_WINDOWS {
                    self.speech_seen = true;
                }
                self.silence_samples = 0;
            } else {
                self.voiced_run = 0;
                self.silence_samples += VAD_WINDOW;
                if self.speech_seen && self.silence_samples >= self.silence_needed {
                    self.ended = true;
                }
            }
        }
        self.pending.drain(..used);
    }
}

impl UplinkAudio for OpusUplink {
    fn push(&mut self, opus_frame: &[u8]) -> Result<bool, VoiceError> {
        if opus_frame.is_empty() {
            return Err(VoiceError::Audio("empty Opus frame".into()));
        }
        let n = self
            .decoder
            .decode(opus_frame, &mut self.scratch, false)
            .map_err(|e| opus_err("decode", e))?;
        let decoded = std::mem::take(&mut self.scratch);
        self.pcm.extend_from_slice(&decoded[..n]);
        self.detect(&decoded[..n]);
        self.scratch = decoded;
        Ok(self.ended)
    }

    fn take_pcm(&mut self) -> Vec<i16> {
        std::mem::take(&mut self.pcm)
    }
}

/// Encodes 16 kHz PCM into 20 ms Opus frames, batched [`FRAMES_PER_CHUNK`] at a time.
pub struct OpusFramer {
    encoder: opus::Encoder,
    pending: Vec<i16>,
    batch: Vec<Vec<u8>>,
}

impl std::fmt::Debug for OpusFramer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusFramer")
            .field("pending_samples", &self.pending.len())
            .field("batched_frames", &self.batch.len())
            .finish()
    }
}

impl OpusFramer {
    pub fn new(bitrate: u32) -> Result<Self, VoiceError> {
        let mut encoder = opus::Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip)
            .map_err(|e| opus_err("encoder", e))?;
        let bits = i32::try_from(bitrate).map_err(|_| VoiceError::Audio("bitrate".into()))?;
        encoder
            .set_bitrate(Bitrate::Bits(bits))
            .map_err(|e| opus_err("bitrate", e))?;
        Ok(Self {
            encoder,
            pending: Vec::with_capacity(FRAME_SAMPLES * 2),
            batch: Vec::with_capacity(FRAMES_PER_CHUNK),
        })
    }

    /// Adds PCM; returns every full batch of frames now ready.
    pub fn push(&mut self, pcm: &[i16]) -> Result<Vec<Vec<Vec<u8>>>, VoiceError> {
        let mut ready = Vec::new();
        self.pending.extend_from_slice(pcm);
        let mut used = 0;
        while self.pending.len() - used >= FRAME_SAMPLES {
            let frame = self.encode(used)?;
            used += FRAME_SAMPLES;
            self.batch.push(frame);
            if self.batch.len() == FRAMES_PER_CHUNK {
                ready.push(std::mem::replace(
                    &mut self.batch,
                    Vec::with_capacity(FRAMES_PER_CHUNK),
                ));
            }
        }
        self.pending.drain(..used);
        Ok(ready)
    }

    /// Pads the last partial frame with silence and returns the last (partial) batch.
    pub fn flush(&mut self) -> Result<Option<Vec<Vec<u8>>>, VoiceError> {
        if !self.pending.is_empty() {
            self.pending.resize(FRAME_SAMPLES, 0);
            let frame = self.encode(0)?;
            self.pending.clear();
            self.batch.push(frame);
        }
        if self.batch.is_empty() {
            Ok(None)
        } else {
            Ok(Some(std::mem::take(&mut self.batch)))
        }
    }

    fn encode(&mut self, at: usize) -> Result<Vec<u8>, VoiceError> {
        let mut out = vec![0u8; MAX_PACKET];
        let n = self
            .encoder
            .encode(&self.pending[at..at + FRAME_SAMPLES], &mut out)
            .map_err(|e| opus_err("encode", e))?;
        out.truncate(n);
        Ok(out)
    }
}

/// Encodes `pcm` (16 kHz) to 20 ms Opus frames, the last one padded (tests, benches).
pub fn encode_frames(pcm: &[i16], bitrate: u32) -> Result<Vec<Vec<u8>>, VoiceError> {
    let mut framer = OpusFramer::new(bitrate)?;
    let mut frames: Vec<Vec<u8>> = framer.push(pcm)?.into_iter().flatten().collect();
    frames.extend(framer.flush()?.into_iter().flatten());
    Ok(frames)
}

/// Decodes 16 kHz mono Opus frames to PCM (tests, benches).
pub fn decode_frames<'a>(
    frames: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<i16>, VoiceError> {
    let mut decoder =
        opus::Decoder::new(SAMPLE_RATE, Channels::Mono).map_err(|e| opus_err("decoder", e))?;
    let mut pcm = Vec::new();
    let mut buf = vec![0i16; MAX_DECODED_SAMPLES];
    for frame in frames {
        let n = decoder
            .decode(frame, &mut buf, false)
            .map_err(|e| opus_err("decode", e))?;
        pcm.extend_from_slice(&buf[..n]);
    }
    Ok(pcm)
}

/// Root mean square of 16-bit PCM.
pub fn rms(pcm: &[i16]) -> f64 {
    if pcm.is_empty() {
        return 0.0;
    }
    (pcm.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / pcm.len() as f64).sqrt()
}

/// A mono 16-bit WAV file of `pcm` at `rate`.
pub fn wav_bytes(pcm: &[i16], rate: u32) -> Result<Vec<u8>, VoiceError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut cursor = Cursor::new(Vec::with_capacity(44 + pcm.len() * 2));
    {
        let mut writer = hound::WavWriter::new(&mut cursor, spec)
            .map_err(|e| VoiceError::Audio(format!("wav: {e}")))?;
        let mut samples = writer.get_i16_writer(pcm.len() as u32);
        for &s in pcm {
            samples.write_sample(s);
        }
        samples
            .flush()
            .map_err(|e| VoiceError::Audio(format!("wav: {e}")))?;
        writer
            .finalize()
            .map_err(|e| VoiceError::Audio(format!("wav: {e}")))?;
    }
    Ok(cursor.into_inner())
}

/// Reads a 16-bit PCM WAV file (stereo is mixed down); returns samples and rate.
pub fn read_wav(bytes: &[u8]) -> Result<(Vec<i16>, u32), VoiceError> {
    let reader = hound::WavReader::new(Cursor::new(bytes))
        .map_err(|e| VoiceError::Audio(format!("wav: {e}")))?;
    let spec = reader.spec();
    if spec.bits_per_sample != 16 || spec.sample_format != hound::SampleFormat::Int {
        return Err(VoiceError::Audio(
            "wav: only 16-bit PCM is supported".into(),
        ));
    }
    let samples: Vec<i16> = reader
        .into_samples::<i16>()
        .collect::<Result<_, _>>()
        .map_err(|e| VoiceError::Audio(format!("wav: {e}")))?;
    let channels = usize::from(spec.channels.max(1));
    let mono = if channels == 1 {
        samples
    } else {
        samples
            .chunks(channels)
            .map(|c| (c.iter().map(|&s| i32::from(s)).sum::<i32>() / c.len() as i32) as i16)
            .collect()
    };
    Ok((mono, spec.sample_rate))
}

/// Little-endian 16-bit PCM bytes to samples, carrying an odd trailing byte to the next call
/// (HTTP chunk boundaries fall anywhere).
#[derive(Debug, Default)]
pub struct PcmBytes {
    carry: Option<u8>,
}

impl PcmBytes {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<i16> {
        let mut out = Vec::with_capacity(bytes.len() / 2 + 1);
        let mut rest = bytes;
        if let Some(lo) = self.carry.take() {
            match rest.split_first() {
                Some((&hi, tail)) => {
                    out.push(i16::from_le_bytes([lo, hi]));
                    rest = tail;
                }
                None => {
                    self.carry = Some(lo);
                    return out;
                }
            }
        }
        let mut pairs = rest.chunks_exact(2);
        out.extend(pairs.by_ref().map(|p| i16::from_le_bytes([p[0], p[1]])));
        self.carry = pairs.remainder().first().copied();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(secs: f64) -> Vec<i16> {
        let n = (16_000.0 * secs) as usize;
        (0..n)
            .map(|i| {
                (8_000.0 * (2.0 * std::f64::consts::PI * 300.0 * i as f64 / 16_000.0).sin()) as i16
            })
            .collect()
    }

    #[test]
    fn opus_round_trips_speech_band_audio() {
        let pcm = tone(1.0);
        let frames = encode_frames(&pcm, 24_000).unwrap();
        assert_eq!(frames.len(), 50);
        let back = decode_frames(frames.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(back.len(), 16_000);
        assert!(rms(&back[1_600..]) > 3_000.0, "rms {}", rms(&back));
    }

    #[test]
    fn the_framer_batches_five_frames_and_pads_the_last() {
        let mut framer = OpusFramer::new(24_000).unwrap();
        let batches = framer.push(&tone(0.23)).unwrap(); // 11.5 frames
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.len() == FRAMES_PER_CHUNK));
        let last = framer.flush().unwrap().unwrap();
        assert_eq!(last.len(), 2);
        assert!(framer.flush().unwrap().is_none());
    }

    #[test]
    fn silence_alone_never_ends_an_utterance() {
        let mut up = OpusUplink::new(500, 0.5).unwrap();
        let frames = encode_frames(&vec![0; 32_000], 24_000).unwrap();
        for f in &frames {
            assert!(!up.push(f).unwrap());
        }
        assert!(!up.speech_seen());
        assert_eq!(up.take_pcm().len(), 32_000);
    }

    #[test]
    fn a_corrupt_frame_is_an_error_not_a_panic() {
        let mut up = OpusUplink::new(500, 0.5).unwrap();
        assert!(up.push(&[]).is_err());
        assert!(up.push(&[0xff; 3]).is_err());
    }

    #[test]
    fn wav_round_trips_and_pcm_bytes_survive_odd_chunking() {
        let pcm = tone(0.05);
        let (back, rate) = read_wav(&wav_bytes(&pcm, 16_000).unwrap()).unwrap();
        assert_eq!((back.as_slice(), rate), (pcm.as_slice(), 16_000));
        let bytes: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut p = PcmBytes::default();
        let mut out = Vec::new();
        for chunk in bytes.chunks(7) {
            out.extend(p.push(chunk));
        }
        assert_eq!(out, pcm);
    }
}
