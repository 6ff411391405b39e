//! Hardware behind traits, chosen by `--hardware pi|sim`:
//! - [`AudioIn`] / [`AudioOut`]: blocking PCM sources and sinks of 20 ms frames (ALSA in
//!   [`crate::audio::alsa`], WAV files in [`sim`]); [`crate::audio`] runs them on named threads.
//! - [`Buttons`]: a task or thread feeding [`ButtonInput`]s into a bounded channel (GPIO with
//!   the [`gesture`] state machine, or lines on stdin / a Unix socket).
//! - [`Leds`]: shows an [`LedState`] (software PWM on three GPIO pins, or log lines).

pub mod gesture;
pub mod gpio;
pub mod pattern;
pub mod sim;

use companion_schema::{ButtonAction, AUDIO_FRAME_MS, AUDIO_SAMPLE_RATE};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use pattern::LedState;

/// Samples in one 20 ms frame at 16 kHz mono.
pub const FRAME_SAMPLES: usize = AUDIO_SAMPLE_RATE as usize * AUDIO_FRAME_MS as usize / 1000;
/// Button inputs waiting for the controller.
pub const BUTTON_CAPACITY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HwError {
    #[error("ALSA device {device}: {source}")]
    Alsa { device: String, source: alsa::Error },
    #[error("ALSA device {device} runs at {rate} Hz; 16000 Hz mono is needed")]
    AlsaFormat { device: String, rate: u32 },
    #[error("no GPIO on this machine ({0}); run with --hardware sim")]
    NoGpio(String),
    #[error("GPIO pin {pin}: {reason}")]
    Pin { pin: u8, reason: String },
    #[error("WAV file {path}: {reason}")]
    Wav { path: String, reason: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A blocking source of 20 ms PCM frames (16 kHz mono, i16).
pub trait PcmSource: Send {
    /// Fills `out`; false at the end of the stream.
    fn read_frame(&mut self, out: &mut [i16; FRAME_SAMPLES]) -> Result<bool, HwError>;
}

/// A blocking sink of PCM frames; writes pace playback on real hardware.
pub trait PcmSink: Send {
    fn write_frame(&mut self, pcm: &[i16]) -> Result<(), HwError>;
    /// Ends the stream: play out what is queued, or (`abort`) discard it at once.
    fn finish(&mut self, abort: bool) -> Result<(), HwError>;
}

pub trait AudioIn: Send + Sync {
    fn open(&self) -> Result<Box<dyn PcmSource>, HwError>;
}

pub trait AudioOut: Send + Sync {
    fn open(&self) -> Result<Box<dyn PcmSink>, HwError>;
}

/// A button gesture, by button name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ButtonInput {
    pub button: String,
    pub action: ButtonAction,
}

/// A source of button gestures.
pub trait Buttons: Send {
    /// Starts delivering into `tx` until `shutdown`.
    fn start(
        self: Box<Self>,
        tx: mpsc::Sender<ButtonInput>,
        shutdown: CancellationToken,
    ) -> Result<(), HwError>;
}

/// The RGB LED. `show` must not block.
pub trait Leds: Send {
    fn show(&mut self, state: LedState);
}

/// Parses a `button action` line (`talk press`, `persona double_press`).
pub fn parse_button_line(line: &str) -> Option<ButtonInput> {
    let mut it = line.split_whitespace();
    let button = it.next()?.to_owned();
    let action = match it.next()? {
        "press" => ButtonAction::Press,
        "release" => ButtonAction::Release,
        "long_press" | "long" => ButtonAction::LongPress,
        "double_press" | "double" => ButtonAction::DoublePress,
        _ => return None,
    };
    if it.next().is_some() {
        return None;
    }
    Some(ButtonInput { button, action })
}

/// Whether this looks like a Raspberry Pi (for the `--hardware` default).
pub fn is_raspberry_pi() -> bool {
    std::fs::read_to_string("/proc/device-tree/model")
        .map(|m| m.contains("Raspberry Pi"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn button_lines_parse_into_gestures() {
        assert_eq!(
            parse_button_line(" talk  press "),
            Some(ButtonInput {
                button: "talk".into(),
                action: ButtonAction::Press
            })
        );
        assert_eq!(
            parse_button_line("persona double").unwrap().action,
            ButtonAction::DoublePress
        );
        assert_eq!(parse_button_line("talk"), None);
        assert_eq!(parse_button_line("talk squeeze"), None);
        assert_eq!(parse_button_line("talk press now"), None);
    }
}
