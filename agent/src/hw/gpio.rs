//! Raspberry Pi GPIO through `rppal`: buttons (pull-up inputs, active low, polled every
//! [`POLL_MS`] on a named thread and turned into gestures by [`Gesture`]), and an RGB LED on
//! three pins driven by rppal's software PWM from a named thread that renders the pattern.

use std::collections::BTreeMap;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use rppal::gpio::{Gpio, InputPin, OutputPin};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::gesture::Gesture;
use super::pattern::{duty, LedState};
use super::{ButtonInput, Buttons, HwError, Leds};
use crate::config::LedPins;

pub const POLL_MS: u64 = 5;
/// Software PWM frequency for the LED.
pub const PWM_HZ: f64 = 200.0;
/// How often the LED thread re-renders an animated pattern.
pub const RENDER_MS: u64 = 20;

fn gpio() -> Result<Gpio, HwError> {
    Gpio::new().map_err(|e| HwError::NoGpio(e.to_string()))
}

fn pin_err(pin: u8) -> impl FnOnce(rppal::gpio::Error) -> HwError {
    move |e| HwError::Pin {
        pin,
        reason: e.to_string(),
    }
}

/// Buttons on GPIO pins, by name.
pub struct GpioButtons {
    pins: Vec<(String, InputPin)>,
}

impl GpioButtons {
    /// Claims the pins now, so a machine without GPIO fails at start-up with one clear line.
    pub fn open(pins: &BTreeMap<String, u8>) -> Result<Self, HwError> {
        let gpio = gpio()?;
        let pins = pins
            .iter()
            .map(|(name, pin)| {
                let p = gpio.get(*pin).map_err(pin_err(*pin))?.into_input_pullup();
                Ok((name.clone(), p))
            })
            .collect::<Result<_, HwError>>()?;
        Ok(Self { pins })
    }
}

impl Buttons for GpioButtons {
    fn start(
        self: Box<Self>,
        tx: mpsc::Sender<ButtonInput>,
        shutdown: CancellationToken,
    ) -> Result<(), HwError> {
        std::thread::Builder::new()
            .name("buttons-gpio".into())
            .spawn(move || {
                let start = Instant::now();
                let mut gestures: Vec<Gesture> = self.pins.iter().map(|_| Gesture::new()).collect();
                while !shutdown.is_cancelled() {
                    let now = start.elapsed().as_millis() as u64;
                    for ((name, pin), g) in self.pins.iter().zip(gestures.iter_mut()) {
                        for action in g.update(pin.is_low(), now) {
                            let input = ButtonInput {
                                button: name.clone(),
                                action,
                            };
                            if tx.blocking_send(input).is_err() {
                                return;
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(POLL_MS));
                }
            })?;
        Ok(())
    }
}

/// The RGB LED on three pins.
pub struct GpioLeds {
    tx: std_mpsc::SyncSender<LedState>,
}

/// States queued for the LED thread; older ones are skipped when it lags.
const LED_CAPACITY: usize = 8;

impl GpioLeds {
    pub fn open(pins: LedPins) -> Result<Self, HwError> {
        let gpio = gpio()?;
        let mut out: Vec<OutputPin> = Vec::new();
        for pin in [pins.r, pins.g, pins.b] {
            out.push(gpio.get(pin).map_err(pin_err(pin))?.into_output_low());
        }
        let (tx, rx) = std_mpsc::sync_channel::<LedState>(LED_CAPACITY);
        std::thread::Builder::new()
            .name("led-pwm".into())
            .spawn(move || render(out, rx))?;
        Ok(Self { tx })
    }
}

fn render(mut pins: Vec<OutputPin>, rx: std_mpsc::Receiver<LedState>) {
    let mut state = LedState::OFF;
    let mut since = Instant::now();
    let mut last = [f32::NAN; 3];
    loop {
        match rx.recv_timeout(Duration::from_millis(RENDER_MS)) {
            Ok(s) => {
                state = s;
                since = Instant::now();
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let d = duty(&state, since.elapsed().as_millis() as u64);
        for (i, pin) in pins.iter_mut().enumerate() {
            if (d[i] - last[i]).abs() > 0.004 {
                let r = if d[i] <= 0.0 {
                    pin.clear_pwm().map(|_| pin.set_low())
                } else {
                    pin.set_pwm_frequency(PWM_HZ, d[i] as f64)
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "LED PWM update failed");
                }
                last[i] = d[i];
            }
        }
    }
    for pin in &mut pins {
        let _ = pin.clear_pwm();
        pin.set_low();
    }
}

impl Leds for GpioLeds {
    fn show(&mut self, state: LedState) {
        let _ = self.tx.try_send(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_gpio_the_error_is_one_clear_line() {
        if std::path::Path::new("/dev/gpiomem").exists() {
            return; // On a Pi the pins may really open.
        }
        let err = GpioButtons::open(&BTreeMap::from([("talk".to_owned(), 17)]))
            .err()
            .expect("no GPIO here");
        let msg = err.to_string();
        assert!(msg.starts_with("no GPIO on this machine"), "{msg}");
        assert!(
            msg.contains("--hardware sim") && !msg.contains('\n'),
            "{msg}"
        );
        assert!(GpioLeds::open(LedPins { r: 5, g: 6, b: 13 }).is_err());
    }
}
