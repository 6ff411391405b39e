//! LED patterns as pure functions of time, and the policy that picks the LED state from the
//! persona, the session state and `LedCommand`s.

use companion_schema::{LedCommand, LedPattern, Rgb, SessionState};

/// What the LED should show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedState {
    pub pattern: LedPattern,
    pub color: Rgb,
    pub brightness: u8,
}

impl LedState {
    pub const OFF: LedState = LedState {
        pattern: LedPattern::Off,
        color: [0, 0, 0],
        brightness: 0,
    };
}

impl std::fmt::Display for LedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [r, g, b] = self.color;
        write!(
            f,
            "{:?} #{r:02x}{g:02x}{b:02x} @{}",
            self.pattern, self.brightness
        )
    }
}

pub const PULSE_PERIOD_MS: u64 = 2000;
pub const BLINK_PERIOD_MS: u64 = 1000;
pub const SPIN_PERIOD_MS: u64 = 1200;

/// The pattern's level at `t_ms`, from 0 to 1.
pub fn level(pattern: LedPattern, t_ms: u64) -> f32 {
    match pattern {
        LedPattern::Off => 0.0,
        LedPattern::Solid => 1.0,
        LedPattern::Pulse => {
            let phase = (t_ms % PULSE_PERIOD_MS) as f32 / PULSE_PERIOD_MS as f32;
            0.5 - 0.5 * (2.0 * std::f32::consts::PI * phase).cos()
        }
        LedPattern::Blink => {
            if t_ms % BLINK_PERIOD_MS < BLINK_PERIOD_MS / 2 {
                1.0
            } else {
                0.0
            }
        }
        // One LED cannot spin; it shows a "comet": a quick rise and a slow fade each turn.
        LedPattern::Spin => {
            let phase = (t_ms % SPIN_PERIOD_MS) as f32 / SPIN_PERIOD_MS as f32;
            if phase < 0.1 {
                phase / 0.1
            } else {
                1.0 - (phase - 0.1) / 0.9
            }
        }
    }
}

/// PWM duty cycles (0 to 1) for the red, green and blue pins at `t_ms`.
pub fn duty(state: &LedState, t_ms: u64) -> [f32; 3] {
    let l = level(state.pattern, t_ms) * state.brightness as f32 / 255.0;
    state.color.map(|c| c as f32 / 255.0 * l)
}

/// Brightness when idle (the persona colour, dimmed).
pub const IDLE_BRIGHTNESS: u8 = 48;
pub const ERROR_COLOR: Rgb = [255, 0, 0];
pub const DEFAULT_PERSONA_COLOR: Rgb = [255, 255, 255];

/// Picks the LED state: a `LedCommand` wins until it expires or the session changes state;
/// otherwise the session state in the persona's colour.
#[derive(Debug, Clone)]
pub struct LedPolicy {
    pub persona_color: Rgb,
    pub session: SessionState,
    pub ceiling: u8,
    command: Option<(LedCommand, Option<u64>)>,
}

impl Default for LedPolicy {
    fn default() -> Self {
        Self {
            persona_color: DEFAULT_PERSONA_COLOR,
            session: SessionState::Idle,
            ceiling: 255,
            command: None,
        }
    }
}

impl LedPolicy {
    pub fn set_session(&mut self, state: SessionState) {
        self.session = state;
        self.command = None;
    }

    pub fn set_command(&mut self, cmd: LedCommand, now_ms: u64) {
        let until = cmd.duration_ms.map(|d| now_ms + d as u64);
        self.command = Some((cmd, until));
    }

    /// When the current command expires, if it does.
    pub fn expires_at(&self) -> Option<u64> {
        self.command.as_ref().and_then(|(_, u)| *u)
    }

    pub fn state(&mut self, now_ms: u64) -> LedState {
        if let Some((_, Some(until))) = &self.command {
            if now_ms >= *until {
                self.command = None;
            }
        }
        let s = if let Some((c, _)) = &self.command {
            LedState {
                pattern: c.pattern,
                color: c.color,
                brightness: c.brightness,
            }
        } else {
            let (pattern, color, brightness) = match self.session {
                SessionState::Idle => (LedPattern::Solid, self.persona_color, IDLE_BRIGHTNESS),
                SessionState::Listening => (LedPattern::Solid, self.persona_color, 255),
                SessionState::Thinking => (LedPattern::Spin, self.persona_color, 200),
                SessionState::Speaking => (LedPattern::Pulse, self.persona_color, 255),
                SessionState::Error => (LedPattern::Blink, ERROR_COLOR, 255),
            };
            LedState {
                pattern,
                color,
                brightness,
            }
        };
        LedState {
            brightness: s.brightness.min(self.ceiling),
            ..s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_their_period() {
        assert_eq!(level(LedPattern::Solid, 12_345), 1.0);
        assert_eq!(level(LedPattern::Off, 0), 0.0);
        assert_eq!(level(LedPattern::Blink, 100), 1.0);
        assert_eq!(level(LedPattern::Blink, 600), 0.0);
        assert_eq!(level(LedPattern::Blink, 1100), 1.0);
        assert!(level(LedPattern::Pulse, 0) < 0.01);
        assert!(level(LedPattern::Pulse, 1000) > 0.99);
        assert!((level(LedPattern::Pulse, 500) - 0.5).abs() < 0.01);
        assert!((level(LedPattern::Spin, 120) - 1.0).abs() < 0.01);
        assert!(level(LedPattern::Spin, 1100) < 0.1);
        for t in (0..5000).step_by(7) {
            for p in [LedPattern::Pulse, LedPattern::Spin, LedPattern::Blink] {
                let l = level(p, t);
                assert!((0.0..=1.0).contains(&l), "{p:?} at {t}: {l}");
            }
        }
    }

    #[test]
    fn duty_scales_colour_by_brightness_and_level() {
        let s = LedState {
            pattern: LedPattern::Solid,
            color: [255, 0, 128],
            brightness: 51,
        };
        let d = duty(&s, 0);
        assert!((d[0] - 0.2).abs() < 1e-3 && d[1] == 0.0 && (d[2] - 0.1004).abs() < 1e-3);
    }

    #[test]
    fn the_session_state_drives_the_persona_colour() {
        let mut p = LedPolicy {
            persona_color: [0, 0, 255],
            ..LedPolicy::default()
        };
        assert_eq!(p.state(0).brightness, IDLE_BRIGHTNESS);
        p.set_session(SessionState::Thinking);
        assert_eq!(p.state(0).pattern, LedPattern::Spin);
        assert_eq!(p.state(0).color, [0, 0, 255]);
        p.set_session(SessionState::Error);
        assert_eq!(p.state(0).color, ERROR_COLOR);
    }

    #[test]
    fn a_timed_led_command_wins_until_it_expires() {
        let mut p = LedPolicy::default();
        p.set_command(
            LedCommand {
                v: 1,
                pattern: LedPattern::Blink,
                color: [0, 255, 0],
                brightness: 255,
                duration_ms: Some(500),
            },
            1000,
        );
        p.ceiling = 100;
        assert_eq!(p.expires_at(), Some(1500));
        let s = p.state(1200);
        assert_eq!(
            (s.pattern, s.color, s.brightness),
            (LedPattern::Blink, [0, 255, 0], 100)
        );
        assert_eq!(p.state(1500).pattern, LedPattern::Solid);
    }
}
