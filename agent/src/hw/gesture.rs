//! Button gestures from raw pin levels: debounce, press/release, long press and double press.
//! Pure: fed with levels and millisecond timestamps, so it is tested without hardware or
//! clocks.

use companion_schema::ButtonAction;

/// A level must hold this long to count.
pub const DEBOUNCE_MS: u64 = 20;
/// Held at least this long: a long press (sent once, while still held).
pub const LONG_PRESS_MS: u64 = 800;
/// A press this soon after a short press's release: a double press.
pub const DOUBLE_PRESS_MS: u64 = 350;

#[derive(Debug, Clone, Default)]
pub struct Gesture {
    raw: bool,
    raw_since: u64,
    stable: bool,
    pressed_at: u64,
    long_sent: bool,
    was_double: bool,
    last_short_release: Option<u64>,
}

impl Gesture {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the current level (`true` = pressed) at `now_ms`; returns the gestures completed.
    pub fn update(&mut self, pressed: bool, now_ms: u64) -> Vec<ButtonAction> {
        let mut out = Vec::new();
        if pressed != self.raw {
            self.raw = pressed;
            self.raw_since = now_ms;
        }
        if self.raw != self.stable && now_ms.saturating_sub(self.raw_since) >= DEBOUNCE_MS {
            self.stable = self.raw;
            if self.stable {
                out.push(ButtonAction::Press);
                self.was_double = matches!(self.last_short_release,
                    Some(r) if now_ms.saturating_sub(r) <= DOUBLE_PRESS_MS);
                if self.was_double {
                    out.push(ButtonAction::DoublePress);
                }
                self.pressed_at = now_ms;
                self.long_sent = false;
            } else {
                out.push(ButtonAction::Release);
                let short = !self.long_sent && !self.was_double;
                self.last_short_release = short.then_some(now_ms);
            }
        }
        if self.stable && !self.long_sent && now_ms.saturating_sub(self.pressed_at) >= LONG_PRESS_MS
        {
            self.long_sent = true;
            out.push(ButtonAction::LongPress);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ButtonAction::*;

    /// Feeds `(level, from_ms)` steps, sampling every 5 ms up to `end_ms`.
    fn run(steps: &[(bool, u64)], end_ms: u64) -> Vec<(u64, ButtonAction)> {
        let mut g = Gesture::new();
        let mut out = Vec::new();
        let mut t = 0;
        while t <= end_ms {
            let level = steps
                .iter()
                .rev()
                .find(|(_, from)| *from <= t)
                .is_some_and(|(l, _)| *l);
            out.extend(g.update(level, t).into_iter().map(|a| (t, a)));
            t += 5;
        }
        out
    }

    #[test]
    fn a_short_press_gives_press_then_release_after_debounce() {
        let ev = run(&[(true, 100), (false, 300)], 1000);
        assert_eq!(ev, vec![(120, Press), (320, Release)]);
    }

    #[test]
    fn contact_bounce_shorter_than_the_debounce_is_ignored() {
        let ev = run(
            &[
                (true, 100),
                (false, 105),
                (true, 110),
                (false, 115),
                (true, 120),
                (false, 400),
            ],
            1000,
        );
        assert_eq!(ev, vec![(140, Press), (420, Release)]);
        assert!(run(&[(true, 100), (false, 110)], 500).is_empty());
    }

    #[test]
    fn holding_past_the_threshold_gives_one_long_press() {
        let ev = run(&[(true, 0), (false, 2000)], 3000);
        let actions: Vec<_> = ev.iter().map(|(_, a)| *a).collect();
        assert_eq!(actions, vec![Press, LongPress, Release]);
        assert_eq!(ev[1].0, 20 + LONG_PRESS_MS);
    }

    #[test]
    fn two_quick_presses_give_a_double_press() {
        let ev = run(&[(true, 0), (false, 100), (true, 300), (false, 400)], 1000);
        let actions: Vec<_> = ev.iter().map(|(_, a)| *a).collect();
        assert_eq!(actions, vec![Press, Release, Press, DoublePress, Release]);
    }

    #[test]
    fn presses_far_apart_or_after_a_long_press_are_not_doubles() {
        let ev = run(&[(true, 0), (false, 100), (true, 600), (false, 700)], 1000);
        assert!(!ev.iter().any(|(_, a)| *a == DoublePress));
        let ev = run(
            &[(true, 0), (false, 1000), (true, 1100), (false, 1200)],
            1500,
        );
        assert!(!ev.iter().any(|(_, a)| *a == DoublePress));
        // A third quick press after a double starts afresh.
        let ev = run(
            &[
                (true, 0),
                (false, 100),
                (true, 200),
                (false, 300),
                (true, 400),
                (false, 500),
            ],
            1000,
        );
        assert_eq!(ev.iter().filter(|(_, a)| *a == DoublePress).count(), 1);
    }
}
