//! Opus at 16 kHz mono, 20 ms frames, VOIP mode.

use crate::hw::FRAME_SAMPLES;

/// Largest Opus packet we produce.
pub const MAX_PACKET: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
}

pub struct Encoder(opus::Encoder);

impl Encoder {
    pub fn new(bitrate: i32) -> Result<Self, CodecError> {
        let mut e = opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip)?;
        e.set_bitrate(opus::Bitrate::Bits(bitrate))?;
        Ok(Self(e))
    }

    pub fn encode(&mut self, pcm: &[i16; FRAME_SAMPLES]) -> Result<Vec<u8>, CodecError> {
        Ok(self.0.encode_vec(pcm, MAX_PACKET)?)
    }
}

pub struct Decoder(opus::Decoder);

impl Decoder {
    pub fn new() -> Result<Self, CodecError> {
        Ok(Self(opus::Decoder::new(16_000, opus::Channels::Mono)?))
    }

    /// Decodes one packet, or conceals a lost one (`None`).
    pub fn decode(&mut self, packet: Option<&[u8]>, out: &mut Vec<i16>) -> Result<(), CodecError> {
        // Concealment produces as many samples as the buffer holds: exactly one frame.
        let room = if packet.is_some() {
            FRAME_SAMPLES * 6
        } else {
            FRAME_SAMPLES
        };
        out.resize(room, 0);
        let n = self.0.decode(packet.unwrap_or(&[]), out, false)?;
        out.truncate(n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tone_survives_encoding_at_24_kbps() {
        let mut enc = Encoder::new(24_000).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut out = Vec::new();
        let mut energy = 0f64;
        let mut bytes = 0;
        for f in 0..50 {
            let mut pcm = [0i16; FRAME_SAMPLES];
            for (i, s) in pcm.iter_mut().enumerate() {
                let t = (f * FRAME_SAMPLES + i) as f32 / 16_000.0;
                *s = (8000.0 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()) as i16;
            }
            let pkt = enc.encode(&pcm).unwrap();
            bytes += pkt.len();
            dec.decode(Some(&pkt), &mut out).unwrap();
            assert_eq!(out.len(), FRAME_SAMPLES);
            if f > 10 {
                energy += out.iter().map(|s| (*s as f64).powi(2)).sum::<f64>();
            }
        }
        let rms = (energy / (39.0 * FRAME_SAMPLES as f64)).sqrt();
        assert!(rms > 3000.0, "rms {rms}");
        // 24 kbps is 60 bytes per 20 ms frame; allow VBR headroom.
        let per_frame = bytes / 50;
        assert!(
            (30..=90).contains(&per_frame),
            "{per_frame} bytes per frame"
        );
        dec.decode(None, &mut out).unwrap();
        assert_eq!(
            out.len(),
            FRAME_SAMPLES,
            "loss concealment yields one frame"
        );
    }
}
