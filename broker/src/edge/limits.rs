//! A device's publish rate limits: token buckets by topic class (control, audio), the tokens
//! owed for QoS 1 publishes let through over the limit (the connection is not read again until
//! they are paid: backpressure), and the over-limit episode of dropped QoS 0 publishes that
//! ends the connection when it lasts too long.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use companion_schema::TopicKind;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::settings::RateSettings;

/// A gap this long without a dropped publish ends an over-limit episode.
const OVER_LIMIT_GAP: Duration = Duration::from_secs(1);

fn quota(per_s: u32, burst: u32) -> Quota {
    let per_s = NonZeroU32::new(per_s.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(per_s);
    Quota::per_second(per_s).allow_burst(burst)
}

pub(super) struct PublishLimits {
    control: DefaultDirectRateLimiter,
    audio: DefaultDirectRateLimiter,
    /// When the current over-limit episode began, and the last drop in it.
    over_since: Option<Instant>,
    last_drop: Option<Instant>,
    sustained: Duration,
    /// Tokens owed by class for QoS 1 publishes let through over the limit.
    owed_control: u32,
    owed_audio: u32,
}

impl PublishLimits {
    pub(super) fn new(rate: &RateSettings) -> Self {
        Self {
            control: RateLimiter::direct(quota(rate.control_per_s, rate.control_burst)),
            audio: RateLimiter::direct(quota(rate.audio_per_s, rate.audio_burst)),
            over_since: None,
            last_drop: None,
            sustained: Duration::from_secs(rate.sustained_over_limit_s),
            owed_control: 0,
            owed_audio: 0,
        }
    }

    /// Takes a token for a publish of `kind`; false when its class is over the limit.
    pub(super) fn allow(&self, kind: TopicKind) -> bool {
        let limiter = if kind.is_audio() {
            &self.audio
        } else {
            &self.control
        };
        limiter.check().is_ok()
    }

    /// A QoS 1 publish of `kind` over the limit goes through on credit: its token is paid by
    /// [`PublishLimits::repay`] before the device's connection is read again. Dropping it
    /// instead would acknowledge a message nobody stored (MQTT 3.1.1 has no negative PUBACK),
    /// and a device replaying its offline buffer would lose it.
    pub(super) fn owe(&mut self, kind: TopicKind) {
        if kind.is_audio() {
            self.owed_audio = self.owed_audio.saturating_add(1);
        } else {
            self.owed_control = self.owed_control.saturating_add(1);
        }
    }

    /// Whether tokens are owed (the connection must not be read).
    pub(super) fn in_debt(&self) -> bool {
        self.owed_control > 0 || self.owed_audio > 0
    }

    /// Waits for one owed token and takes it. Cancel-safe: the debt shrinks in the same poll
    /// that takes the token.
    pub(super) async fn repay(&mut self) {
        if self.owed_control > 0 {
            self.control.until_ready().await;
            self.owed_control -= 1;
        } else if self.owed_audio > 0 {
            self.audio.until_ready().await;
            self.owed_audio -= 1;
        }
    }

    /// A publish was dropped at `now`: true when the device has been over the limit for the
    /// configured time (drops no more than [`OVER_LIMIT_GAP`] apart) and must go.
    pub(super) fn dropped(&mut self, now: Instant) -> bool {
        let continuing = self
            .last_drop
            .is_some_and(|last| now.duration_since(last) <= OVER_LIMIT_GAP);
        if !continuing {
            self.over_since = Some(now);
        }
        self.last_drop = Some(now);
        self.over_since
            .is_some_and(|since| now.duration_since(since) >= self.sustained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_s: u32, burst: u32, sustained_s: u64) -> PublishLimits {
        PublishLimits::new(&RateSettings {
            control_per_s: per_s,
            control_burst: burst,
            audio_per_s: 1000,
            audio_burst: 1000,
            sustained_over_limit_s: sustained_s,
        })
    }

    #[test]
    fn classes_have_their_own_buckets() {
        let l = limits(1, 2, 10);
        assert!(l.allow(TopicKind::Telemetry));
        assert!(l.allow(TopicKind::Button));
        assert!(!l.allow(TopicKind::Telemetry), "the control burst is spent");
        assert!(l.allow(TopicKind::AudioUp), "audio has its own bucket");
    }

    #[tokio::test]
    async fn a_publish_on_credit_is_paid_with_a_later_token() {
        let mut l = limits(20, 1, 10);
        assert!(l.allow(TopicKind::Telemetry));
        assert!(!l.allow(TopicKind::Telemetry));
        l.owe(TopicKind::Telemetry);
        l.owe(TopicKind::Telemetry);
        assert!(l.in_debt());
        let t0 = Instant::now();
        l.repay().await;
        l.repay().await;
        assert!(!l.in_debt());
        // Two tokens at 20/s after the burst was spent: about 100 ms.
        assert!(
            t0.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t0.elapsed()
        );
        assert!(
            !l.allow(TopicKind::Telemetry),
            "the repaid tokens were taken"
        );
    }

    #[test]
    fn only_an_unbroken_episode_of_drops_disconnects() {
        let mut l = limits(1, 1, 3);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Drops every 0.5 s for 3 s: sustained.
        for i in 0..6 {
            assert!(!l.dropped(t0 + s(i) / 2), "drop {i}");
        }
        assert!(l.dropped(t0 + s(3)));
        // After a quiet gap a new episode starts from zero.
        assert!(!l.dropped(t0 + s(10)));
        assert!(!l.dropped(t0 + s(11)));
        assert!(
            !l.dropped(t0 + s(12) + s(1) / 2),
            "1.5 s gap: a new episode"
        );
    }
}
