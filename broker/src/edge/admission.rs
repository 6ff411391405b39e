//! Admission before authentication, per source address.
//!
//! - [`Pending`]: connections accepted but not yet authenticated (TLS handshake, waiting for
//!   CONNECT, at the authenticator) are capped in all (`mqtt.max_pending`) and per source
//!   (`mqtt.max_pending_per_ip`), so idle sockets and half-finished handshakes from one
//!   address cannot take every connection slot until their timeouts. The table holds only
//!   sources with a pending connection, so it is bounded by `mqtt.max_pending`.
//! - [`Throttle`]: a source with `mqtt.auth_failures_per_ip` failed logins within
//!   `mqtt.auth_failure_window_s` is refused for `mqtt.auth_block_s`, before its TLS handshake
//!   and before the authenticator (the database). At most `mqtt.max_tracked_addresses`
//!   sources are tracked; entries expire with their window or block.
//!
//! A source is an IPv4 address, or an IPv6 /64 (one subscriber's network: an attacker holds
//! the whole prefix, so counting its addresses one by one would count nothing).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::settings::MqttSettings;

/// Where a connection comes from, for the per-source limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Source(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The tables hold counters only; a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TooMany {
    /// `mqtt.max_pending` reached.
    InAll,
    /// `mqtt.max_pending_per_ip` reached for this source.
    FromSource,
}

#[derive(Default)]
struct PendingTable {
    total: usize,
    by_source: HashMap<Source, usize>,
}

/// Connections not yet authenticated, in all and per source.
pub(crate) struct Pending {
    max_total: usize,
    max_per_source: usize,
    table: Mutex<PendingTable>,
    gauge: Gauge,
}

impl Pending {
    pub fn new(settings: &MqttSettings, gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            max_total: settings.max_pending.max(1),
            max_per_source: settings.max_pending_per_ip.max(1),
            table: Mutex::new(PendingTable::default()),
            gauge,
        })
    }

    /// Admits a connection; `source` is `None` while the client's address is not known yet
    /// (a trusted proxy's connection before its header), then [`PendingGuard::attribute`].
    pub fn enter(self: &Arc<Self>, source: Option<Source>) -> Result<PendingGuard, TooMany> {
        let mut t = lock(&self.table);
        if t.total >= self.max_total {
            return Err(TooMany::InAll);
        }
        if let Some(s) = source {
            let n = t.by_source.entry(s).or_insert(0);
            if *n >= self.max_per_source {
                return Err(TooMany::FromSource);
            }
            *n += 1;
        }
        t.total += 1;
        self.gauge.set(t.total as i64);
        Ok(PendingGuard {
            pending: self.clone(),
            source,
        })
    }

    fn leave(&self, source: Option<Source>) {
        let mut t = lock(&self.table);
        t.total = t.total.saturating_sub(1);
        if let Some(s) = source {
            release_source(&mut t.by_source, s);
        }
        self.gauge.set(t.total as i64);
    }

    /// Sources with a pending connection now.
    #[cfg(test)]
    fn sources(&self) -> usize {
        lock(&self.table).by_source.len()
    }
}

fn release_source(by_source: &mut HashMap<Source, usize>, s: Source) {
    if let Some(n) = by_source.get_mut(&s) {
        *n -= 1;
        if *n == 0 {
            by_source.remove(&s);
        }
    }
}

/// One pending connection; leaves the count when authenticated or dropped.
pub(crate) struct PendingGuard {
    pending: Arc<Pending>,
    source: Option<Source>,
}

impl PendingGuard {
    /// Counts the connection against `source` once the client's real address is known.
    pub fn attribute(&mut self, source: Source) -> Result<(), TooMany> {
        if self.source == Some(source) {
            return Ok(());
        }
        let mut t = lock(&self.pending.table);
        let n = t.by_source.get(&source).copied().unwrap_or(0);
        if n >= self.pending.max_per_source {
            return Err(TooMany::FromSource);
        }
        t.by_source.insert(source, n + 1);
        if let Some(old) = self.source.replace(source) {
            release_source(&mut t.by_source, old);
        }
        Ok(())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending.leave(self.source);
    }
}

/// What a failed login did to its source's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The source's first failure in its current window.
    pub first: bool,
    /// This failure started a block.
    pub blocked: bool,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

impl Record {
    fn expired(&self, now: Instant, window: Duration) -> bool {
        match self.blocked_until {
            Some(until) => now >= until,
            None => now.duration_since(self.window_start) >= window,
        }
    }
}

struct ThrottleTable {
    records: HashMap<Source, Record>,
    last_prune: Instant,
}

/// Failed logins per source, and the sources cooling down.
pub(crate) struct Throttle {
    threshold: u32,
    window: Duration,
    block: Duration,
    capacity: usize,
    table: Mutex<ThrottleTable>,
    gauge: Gauge,
    /// Failures not tracked because the table was full of live records.
    untracked: Counter,
}

impl Throttle {
    pub fn new(settings: &MqttSettings, gauge: Gauge, untracked: Counter, now: Instant) -> Self {
        Self {
            threshold: settings.auth_failures_per_ip,
            window: Duration::from_secs(settings.auth_failure_window_s.max(1)),
            block: Duration::from_secs(settings.auth_block_s),
            capacity: settings.max_tracked_addresses.max(1),
            table: Mutex::new(ThrottleTable {
                records: HashMap::new(),
                last_prune: now,
            }),
            gauge,
            untracked,
        }
    }

    /// Whether `source` is cooling down now.
    pub fn blocked(&self, source: Source, now: Instant) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let t = lock(&self.table);
        t.records
            .get(&source)
            .and_then(|r| r.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Records a failed login from `source`.
    pub fn failed(&self, source: Source, now: Instant) -> Failure {
        let mut t = lock(&self.table);
        if now.duration_since(t.last_prune) >= self.window {
            self.prune(&mut t, now);
        }
        if !t.records.contains_key(&source) && t.records.len() >= self.capacity {
            // Full: make room from expired records, at most once a second (a full table of
            // live records must not cost a scan per attempt).
            if now.duration_since(t.last_prune) >= Duration::from_secs(1) {
                self.prune(&mut t, now);
            }
            if t.records.len() >= self.capacity {
                self.untracked.inc();
                return Failure {
                    first: false,
                    blocked: false,
                };
            }
        }
        let fresh = Record {
            window_start: now,
            failures: 0,
            blocked_until: None,
        };
        let r = t.records.entry(source).or_insert(fresh);
        if r.expired(now, self.window) {
            *r = fresh;
        }
        r.failures = r.failures.saturating_add(1);
        let first = r.failures == 1;
        let blocked =
            self.threshold > 0 && r.blocked_until.is_none() && r.failures >= self.threshold;
        if blocked {
            r.blocked_until = Some(now + self.block);
        }
        self.gauge.set(t.records.len() as i64);
        Failure { first, blocked }
    }

    fn prune(&self, t: &mut ThrottleTable, now: Instant) {
        let window = self.window;
        t.records.retain(|_, r| !r.expired(now, window));
        t.last_prune = now;
        self.gauge.set(t.records.len() as i64);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.table).records.len()
    }
}

/// At most one log line per `every`; says how many were held back in between.
pub(crate) struct LogLimit {
    every: Duration,
    start: Instant,
    /// Milliseconds since `start` of the last line written, plus one (0: never).
    last: AtomicU64,
    held: AtomicU64,
}

impl LogLimit {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            start: Instant::now(),
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last line)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last.load(Ordering::Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < every
            || self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> MqttSettings {
        MqttSettings {
            max_pending: 3,
            max_pending_per_ip: 2,
            auth_failures_per_ip: 3,
            auth_failure_window_s: 60,
            auth_block_s: 120,
            max_tracked_addresses: 2,
            ..MqttSettings::default()
        }
    }

    fn src(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(src("2001:db8:1:2::1"), src("2001:db8:1:2:ffff::9"));
        assert_ne!(src("2001:db8:1:2::1"), src("2001:db8:1:3::1"));
        assert_eq!(src("::ffff:192.0.2.7"), src("192.0.2.7"));
        assert_eq!(src("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn pending_connections_are_capped_per_source_and_in_all() {
        let p = Pending::new(&settings(), Gauge::default());
        let a1 = p.enter(Some(src("10.0.0.1"))).unwrap();
        let _a2 = p.enter(Some(src("10.0.0.1"))).unwrap();
        assert_eq!(
            p.enter(Some(src("10.0.0.1"))).err(),
            Some(TooMany::FromSource)
        );
        let _b = p.enter(Some(src("10.0.0.2"))).unwrap();
        assert_eq!(p.enter(Some(src("10.0.0.3"))).err(), Some(TooMany::InAll));
        drop(a1);
        let _c = p.enter(Some(src("10.0.0.3"))).unwrap();
        assert_eq!(p.gauge.get(), 3);
    }

    #[test]
    fn a_dropped_guard_leaves_no_trace() {
        let p = Pending::new(&settings(), Gauge::default());
        let guards: Vec<_> = ["10.0.0.1", "10.0.0.2", "10.0.0.2"]
            .iter()
            .map(|s| p.enter(Some(src(s))).unwrap())
            .collect();
        assert_eq!(p.sources(), 2);
        drop(guards);
        assert_eq!((p.sources(), p.gauge.get()), (0, 0));
    }

    #[test]
    fn a_proxied_connection_counts_against_its_client_once_known() {
        let p = Pending::new(&settings(), Gauge::default());
        let _x = p.enter(Some(src("10.0.0.9"))).unwrap();
        let _y = p.enter(Some(src("10.0.0.9"))).unwrap();
        let mut proxied = p.enter(None).unwrap();
        assert_eq!(proxied.attribute(src("10.0.0.9")), Err(TooMany::FromSource));
        proxied.attribute(src("10.0.0.1")).unwrap();
        proxied.attribute(src("10.0.0.1")).unwrap();
        assert_eq!(lock(&p.table).by_source[&src("10.0.0.1")], 1);
        drop(proxied);
        assert_eq!(p.sources(), 1);
    }

    #[test]
    fn a_source_is_blocked_after_the_threshold_and_released_after_the_block() {
        let t0 = Instant::now();
        let t = Throttle::new(&settings(), Gauge::default(), Counter::default(), t0);
        let a = src("10.0.0.1");
        assert_eq!(
            t.failed(a, t0),
            Failure {
                first: true,
                blocked: false
            }
        );
        assert!(!t.failed(a, t0).first);
        assert!(!t.blocked(a, t0));
        assert!(t.failed(a, t0 + Duration::from_secs(10)).blocked);
        assert!(t.blocked(a, t0 + Duration::from_secs(11)));
        assert!(!t.blocked(src("10.0.0.2"), t0 + Duration::from_secs(11)));
        // A failure while blocked does not start another block.
        assert!(!t.failed(a, t0 + Duration::from_secs(12)).blocked);
        let after = t0 + Duration::from_secs(10 + 120);
        assert!(!t.blocked(a, after));
        assert!(t.failed(a, after).first, "a new window after the block");
    }

    #[test]
    fn failures_spread_over_windows_never_block() {
        let t0 = Instant::now();
        let t = Throttle::new(&settings(), Gauge::default(), Counter::default(), t0);
        let a = src("10.0.0.1");
        for i in 0..10u64 {
            let now = t0 + Duration::from_secs(31 * i);
            assert!(!t.failed(a, now).blocked, "failure {i}");
            assert!(!t.blocked(a, now));
        }
    }

    #[test]
    fn the_failure_table_is_bounded_and_expires() {
        let t0 = Instant::now();
        let gauge = Gauge::default();
        let t = Throttle::new(&settings(), gauge.clone(), Counter::default(), t0);
        t.failed(src("10.0.0.1"), t0);
        t.failed(src("10.0.0.2"), t0);
        // Full of live records: the third source is not tracked (and never blocked).
        for _ in 0..5 {
            assert!(!t.failed(src("10.0.0.3"), t0).blocked);
        }
        assert_eq!((t.len(), t.untracked.get()), (2, 5));
        // Once their window is over the old records make room.
        let later = t0 + Duration::from_secs(61);
        assert!(t.failed(src("10.0.0.3"), later).first);
        assert_eq!((t.len(), gauge.get()), (1, 1));
    }

    #[test]
    fn a_zero_threshold_never_blocks() {
        let s = MqttSettings {
            auth_failures_per_ip: 0,
            ..settings()
        };
        let t0 = Instant::now();
        let t = Throttle::new(&s, Gauge::default(), Counter::default(), t0);
        for _ in 0..100 {
            assert!(!t.failed(src("10.0.0.1"), t0).blocked);
        }
        assert!(!t.blocked(src("10.0.0.1"), t0));
    }

    #[test]
    fn the_log_limit_writes_one_line_per_interval() {
        let l = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        assert_eq!(l.held.load(Ordering::Relaxed), 2);
    }
}
