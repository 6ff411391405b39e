//! A streaming rational-ratio resampler: windowed-sinc (Blackman) polyphase FIR, with the
//! cut-off below the lower Nyquist frequency so downsampling does not alias. Provider audio
//! arrives at 22.05 kHz (espeak-ng) or 24 kHz (OpenAI) and leaves at 16 kHz.

/// Taps on each side of the centre, in units of the lower of the two rates' sample periods.
const HALF_TAPS: usize = 16;
/// Cut-off as a fraction of the lower Nyquist frequency.
const CUTOFF: f64 = 0.92;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Converts 16-bit mono PCM from one rate to another, chunk by chunk.
#[derive(Debug)]
pub struct Resampler {
    /// Output step in input samples is `down / up`.
    up: u64,
    down: u64,
    /// Taps per phase and the filter's half width in input samples.
    width: usize,
    half: usize,
    /// `table[phase * width + tap]`.
    table: Vec<f32>,
    /// Input not yet consumed; `history[0]` is absolute input index `base`.
    history: Vec<f32>,
    base: u64,
    /// Index of the next output sample.
    next_out: u64,
    passthrough: bool,
}

impl Resampler {
    pub fn new(from_hz: u32, to_hz: u32) -> Self {
        let g = gcd(u64::from(from_hz), u64::from(to_hz)).max(1);
        let up = u64::from(to_hz) / g;
        let down = u64::from(from_hz) / g;
        let passthrough = from_hz == to_hz;
        // Cut-off relative to the input rate (cycles per input sample, Nyquist = 0.5).
        let fc = 0.5 * CUTOFF * (f64::from(to_hz) / f64::from(from_hz)).min(1.0);
        let half = if passthrough {
            0
        } else {
            (HALF_TAPS as f64 * 0.5 / fc).ceil() as usize
        };
        let width = 2 * half;
        let phases = if passthrough { 0 } else { up as usize };
        let mut table = vec![0f32; phases * width];
        for phase in 0..phases {
            let frac = phase as f64 / up as f64;
            let row = &mut table[phase * width..(phase + 1) * width];
            let mut sum = 0.0;
            for (tap, slot) in row.iter_mut().enumerate() {
                // Input sample at offset (tap - half + 1) from floor(t); distance to t.
                let d = (tap as f64 - half as f64 + 1.0) - frac;
                let x = 2.0 * fc * d;
                let sinc = if x.abs() < 1e-12 {
                    1.0
                } else {
                    (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x)
                };
                let w = (d + half as f64) / width as f64; // 0..1 across the window
                let blackman = 0.42 - 0.5 * (2.0 * std::f64::consts::PI * w).cos()
                    + 0.08 * (4.0 * std::f64::consts::PI * w).cos();
                let v = 2.0 * fc * sinc * blackman.max(0.0);
                *slot = v as f32;
                sum += v;
            }
            // Unity gain at DC for every phase.
            for slot in row.iter_mut() {
                *slot = (f64::from(*slot) / sum) as f32;
            }
        }
        Self {
            up,
            down,
            width,
            half,
            table,
            // Zeros before the first sample, so output 0 lines up with input 0.
            history: vec![0.0; half],
            base: 0,
            next_out: 0,
            passthrough,
        }
    }

    /// Resamples `input`, returning what can be computed so far.
    pub fn process(&mut self, input: &[i16]) -> Vec<i16> {
        if self.passthrough {
            return input.to_vec();
        }
        self.history.extend(input.iter().map(|&s| f32::from(s)));
        self.drain()
    }

    /// Flushes the filter's tail at the end of a stream.
    pub fn finish(&mut self) -> Vec<i16> {
        if self.passthrough {
            return Vec::new();
        }
        let end = self.base + self.history.len() as u64 - self.half as u64;
        self.history.extend(std::iter::repeat_n(0.0, self.half + 1));
        let mut out = self.drain();
        // Only the outputs that fall within the real input.
        let total_in = end;
        let wanted = (total_in * self.up).div_ceil(self.down);
        let produced = self.next_out;
        let extra = produced.saturating_sub(wanted) as usize;
        out.truncate(out.len().saturating_sub(extra));
        out
    }

    fn drain(&mut self) -> Vec<i16> {
        let mut out = Vec::new();
        loop {
            let num = self.next_out * self.down;
            // Position in the padded stream (history has `half` leading zeros).
            let centre = num / self.up + self.half as u64;
            let phase = (num % self.up) as usize;
            let first = centre + 1 - self.half as u64;
            let last = first + self.width as u64; // exclusive
            if last > self.base + self.history.len() as u64 {
                break;
            }
            let start = (first - self.base) as usize;
            let taps = &self.table[phase * self.width..(phase + 1) * self.width];
            let window = &self.history[start..start + self.width];
            let acc: f32 = taps.iter().zip(window).map(|(t, x)| t * x).sum();
            out.push(acc.round().clamp(-32768.0, 32767.0) as i16);
            self.next_out += 1;
        }
        // Drop input no later output will need.
        let num = self.next_out * self.down;
        let keep_from = (num / self.up + 1).min(self.base + self.history.len() as u64);
        if keep_from > self.base {
            let n = (keep_from - self.base) as usize;
            self.history.drain(..n);
            self.base = keep_from;
        }
        out
    }
}

/// Resamples a whole buffer.
pub fn resample(input: &[i16], from_hz: u32, to_hz: u32) -> Vec<i16> {
    let mut r = Resampler::new(from_hz, to_hz);
    let mut out = r.process(input);
    out.extend(r.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hz: f64, rate: u32, secs: f64, amp: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n)
            .map(|i| {
                (amp * (2.0 * std::f64::consts::PI * hz * i as f64 / f64::from(rate)).sin()) as i16
            })
            .collect()
    }

    fn rms(x: &[i16]) -> f64 {
        (x.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / x.len().max(1) as f64).sqrt()
    }

    /// Goertzel power of `hz` in `x`, normalised to RMS amplitude.
    fn level_at(x: &[i16], hz: f64, rate: u32) -> f64 {
        let w = 2.0 * std::f64::consts::PI * hz / f64::from(rate);
        let (mut s1, mut s2) = (0.0, 0.0);
        for &v in x {
            let s = f64::from(v) + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s;
        }
        let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
        2.0 * power.sqrt() / x.len() as f64 / std::f64::consts::SQRT_2
    }

    #[test]
    fn a_tone_keeps_its_pitch_and_level_across_rates() {
        for from in [22_050, 24_000, 48_000, 8_000] {
            let input = tone(440.0, from, 1.0, 10_000.0);
            let out = resample(&input, from, 16_000);
            assert!(
                (out.len() as i64 - 16_000).abs() <= 2,
                "{from}: {} samples",
                out.len()
            );
            let body = &out[800..15_200];
            let at = level_at(body, 440.0, 16_000);
            assert!(
                (at / rms(body) - 1.0).abs() < 0.05,
                "{from}: {at} vs {}",
                rms(body)
            );
            assert!(
                (rms(body) - 7071.0).abs() < 150.0,
                "{from}: rms {}",
                rms(body)
            );
        }
    }

    #[test]
    fn frequencies_above_the_new_nyquist_are_removed() {
        // 10 kHz at 24 kHz would alias to 6 kHz at 16 kHz.
        let input = tone(10_000.0, 24_000, 1.0, 10_000.0);
        let out = resample(&input, 24_000, 16_000);
        assert!(
            rms(&out[800..15_200]) < 100.0,
            "rms {}",
            rms(&out[800..15_200])
        );
    }

    #[test]
    fn chunked_input_gives_the_same_output_as_one_buffer() {
        let input = tone(300.0, 22_050, 0.5, 8_000.0);
        let whole = resample(&input, 22_050, 16_000);
        let mut r = Resampler::new(22_050, 16_000);
        let mut pieces = Vec::new();
        for chunk in input.chunks(333) {
            pieces.extend(r.process(chunk));
        }
        pieces.extend(r.finish());
        assert_eq!(whole, pieces);
    }

    #[test]
    fn equal_rates_pass_through() {
        let input = tone(300.0, 16_000, 0.1, 8_000.0);
        assert_eq!(resample(&input, 16_000, 16_000), input);
    }
}
