//! Refused MQTT logins summed up for the audit log, so a flood of attempts writes a few rows
//! instead of one per attempt. Per (source address, reason) and window
//! (`mqtt.auth_failure_window_s`, opened by that pair's first refusal): the first refusal is
//! written at once, as before; the others are counted and written as one row
//! (`"<reason> (N more attempts in W s)"`) when the window closes, or at shutdown.
//!
//! A source is what the edge's failed-login throttle counts: an IPv4 address or an IPv6 /64
//! (an attacker holds the whole prefix); a summary for a /64 names the prefix.
//!
//! Bounded: at most `mqtt.max_tracked_addresses` pairs are open; refusals from further pairs
//! while it is full are summed per reason in one overflow row without an address. Pure logic:
//! the caller (`mqtt_auth::write_events`) passes the time, writes the entries, and calls
//! [`LoginDigest::due`] about once a second and [`LoginDigest::flush`] at shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use companion_broker::DenyReason;

use crate::audit::{AuditEntry, Outcome};

/// The audit action of a device login.
pub const ACTION: &str = "mqtt.connect";

#[derive(Debug, Clone, Copy)]
struct Open {
    since: Instant,
    /// Refusals after the first, not written yet.
    more: u64,
}

/// Open windows of refused logins.
#[derive(Debug)]
pub struct LoginDigest {
    window: Duration,
    capacity: usize,
    open: HashMap<(IpAddr, DenyReason), Open>,
    /// Refusals from pairs that found the table full, per reason.
    overflow: HashMap<DenyReason, Open>,
}

impl LoginDigest {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window: window.max(Duration::from_secs(1)),
            capacity: capacity.max(1),
            open: HashMap::new(),
            overflow: HashMap::new(),
        }
    }

    /// A refused login; returns what to write now (its own row if it opens a window, and
    /// the summary of the pair's previous window if that closed unflushed).
    pub fn refused(
        &mut self,
        client_id: &str,
        peer: SocketAddr,
        reason: DenyReason,
        now: Instant,
    ) -> Vec<AuditEntry> {
        let mut out = Vec::new();
        let key = (source(peer.ip()), reason);
        if let Some(open) = self.open.get_mut(&key) {
            if now.duration_since(open.since) < self.window {
                open.more += 1;
                return out;
            }
            let closed = *open;
            self.open.remove(&key);
            out.extend(self.summary(Some(key.0), reason, closed));
        }
        if self.open.len() >= self.capacity {
            let window = self.window;
            let o = self.overflow.entry(reason).or_insert(Open {
                since: now,
                more: 0,
            });
            if now.duration_since(o.since) >= window {
                let closed = *o;
                *o = Open {
                    since: now,
                    more: 0,
                };
                out.extend(self.summary(None, reason, closed));
            }
            if let Some(o) = self.overflow.get_mut(&reason) {
                o.more += 1;
            }
            return out;
        }
        self.open.insert(
            key,
            Open {
                since: now,
                more: 0,
            },
        );
        out.push(first_entry(client_id, peer, reason));
        out
    }

    /// Closes the windows that are over; returns their summaries.
    pub fn due(&mut self, now: Instant) -> Vec<AuditEntry> {
        let window = self.window;
        self.close(|open| now.duration_since(open.since) >= window)
    }

    /// Closes every window (shutdown).
    pub fn flush(&mut self) -> Vec<AuditEntry> {
        self.close(|_| true)
    }

    /// Open (address, reason) windows, the overflow ones included.
    pub fn len(&self) -> usize {
        self.open.len() + self.overflow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.overflow.is_empty()
    }

    fn close(&mut self, over: impl Fn(&Open) -> bool) -> Vec<AuditEntry> {
        let mut closed: Vec<(Option<IpAddr>, DenyReason, Open)> = Vec::new();
        self.open.retain(|&(ip, reason), open| {
            let keep = !over(open);
            if !keep {
                closed.push((Some(ip), reason, *open));
            }
            keep
        });
        self.overflow.retain(|&reason, open| {
            let keep = !over(open);
            if !keep {
                closed.push((None, reason, *open));
            }
            keep
        });
        closed
            .into_iter()
            .filter_map(|(ip, reason, open)| self.summary(ip, reason, open))
            .collect()
    }

    fn summary(&self, ip: Option<IpAddr>, reason: DenyReason, open: Open) -> Option<AuditEntry> {
        if open.more == 0 {
            return None;
        }
        let from = match ip {
            Some(IpAddr::V4(_)) => String::new(),
            Some(IpAddr::V6(prefix)) => format!(" from {prefix}/64"),
            None => " from addresses not tracked separately".to_owned(),
        };
        let mut entry = AuditEntry::new("mqtt", ACTION, Outcome::Denied).detail(format!(
            "{} ({} more attempts in {} s{from})",
            reason.as_str(),
            open.more,
            self.window.as_secs()
        ));
        entry.remote_addr = ip.map(|ip| ip.to_string());
        Some(entry)
    }
}

/// The source a refusal counts against: the IPv4 address (also when IPv4-mapped), or the
/// IPv6 /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The row for a single refused login (the first of its window).
fn first_entry(client_id: &str, peer: SocketAddr, reason: DenyReason) -> AuditEntry {
    // Empty: refused before its CONNECT was read (a blocked address).
    let entry = if client_id.is_empty() {
        AuditEntry::new("mqtt", ACTION, Outcome::Denied)
    } else {
        AuditEntry::new(format!("mqtt:{client_id}"), ACTION, Outcome::Denied).target(client_id)
    };
    entry.remote(Some(peer)).detail(reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    fn peer(s: &str) -> SocketAddr {
        format!("{s}:40000").parse().unwrap()
    }

    fn count(entries: &[AuditEntry]) -> u64 {
        entries
            .iter()
            .map(|e| {
                let d = e.detail.as_deref().unwrap();
                d.split_once(" (").map_or(1, |(_, rest)| {
                    rest.split(' ').next().unwrap().parse().unwrap()
                })
            })
            .sum()
    }

    #[test]
    fn the_first_refusal_is_written_and_the_rest_become_one_row_when_the_window_closes() {
        let t0 = Instant::now();
        let mut d = LoginDigest::new(W, 100);
        let first = d.refused("dev-1", peer("10.0.0.1"), DenyReason::BadToken, t0);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].detail.as_deref(), Some("bad_token"));
        assert_eq!(first[0].target.as_deref(), Some("dev-1"));
        assert_eq!(first[0].actor, "mqtt:dev-1");
        assert_eq!(first[0].remote_addr.as_deref(), Some("10.0.0.1"));
        for i in 1..1000u64 {
            let at = t0 + Duration::from_millis(i * 10);
            assert!(d
                .refused("dev-1", peer("10.0.0.1"), DenyReason::BadToken, at)
                .is_empty());
        }
        assert!(d.due(t0 + Duration::from_secs(59)).is_empty());
        let summary = d.due(t0 + W);
        assert_eq!(summary.len(), 1);
        assert_eq!(
            summary[0].detail.as_deref(),
            Some("bad_token (999 more attempts in 60 s)")
        );
        assert_eq!(summary[0].remote_addr.as_deref(), Some("10.0.0.1"));
        assert_eq!(summary[0].outcome, Outcome::Denied);
        assert_eq!(count(&first) + count(&summary), 1000);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn each_address_and_reason_has_its_own_window() {
        let t0 = Instant::now();
        let mut d = LoginDigest::new(W, 100);
        let mut written = Vec::new();
        for (ip, reason) in [
            ("10.0.0.1", DenyReason::BadToken),
            ("10.0.0.1", DenyReason::UnknownDevice),
            ("10.0.0.2", DenyReason::BadToken),
        ] {
            for _ in 0..3 {
                written.extend(d.refused("x", peer(ip), reason, t0));
            }
        }
        assert_eq!(written.len(), 3, "one first row per pair");
        written.extend(d.flush());
        assert_eq!(written.len(), 6);
        assert_eq!(count(&written), 9);
    }

    #[test]
    fn a_lone_refusal_writes_no_summary() {
        let t0 = Instant::now();
        let mut d = LoginDigest::new(W, 100);
        d.refused("x", peer("10.0.0.1"), DenyReason::Disabled, t0);
        assert!(d.due(t0 + W).is_empty());
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_refusal_after_the_window_closes_it_even_before_the_timer() {
        let t0 = Instant::now();
        let mut d = LoginDigest::new(W, 100);
        d.refused("x", peer("10.0.0.1"), DenyReason::BadToken, t0);
        d.refused("x", peer("10.0.0.1"), DenyReason::BadToken, t0);
        let later = d.refused("x", peer("10.0.0.1"), DenyReason::BadToken, t0 + W);
        assert_eq!(later.len(), 2, "the old summary and the new first row");
        assert_eq!(count(&later), 2);
    }

    #[test]
    fn a_refusal_before_connect_has_no_client_id() {
        let t0 = Instant::now();
        let mut d = LoginDigest::new(W, 100);
        let rows = d.refused("", peer("10.0.0.1"), DenyReason::Throttled, t0);
        assert_eq!(rows[0].actor, "mqtt");
        assert_eq!(rows[0].target, None);
        assert_eq!(rows[0].detail.as_deref(), Some("throttled"));
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let t0 = Instant::now();
        let mut d = LoginDigest::new(W, 100);
        let mut written = Vec::new();
        for i in 1..=50 {
            let peer: SocketAddr = format!("[2001:db8:1:2::{i:x}]:40000").parse().unwrap();
            written.extend(d.refused("x", peer, DenyReason::BadToken, t0));
        }
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].remote_addr.as_deref(), Some("2001:db8:1:2::1"));
        let summary = d.flush();
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].remote_addr.as_deref(), Some("2001:db8:1:2::"));
        assert_eq!(
            summary[0].detail.as_deref(),
            Some("bad_token (49 more attempts in 60 s from 2001:db8:1:2::/64)")
        );
        // An IPv4-mapped address is its IPv4 address.
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        d.refused("x", mapped, DenyReason::BadToken, t0);
        assert!(d
            .refused("x", peer("10.0.0.1"), DenyReason::BadToken, t0)
            .is_empty());
    }

    #[test]
    fn the_window_is_at_least_a_second_and_the_table_holds_at_least_one() {
        let t0 = Instant::now();
        let mut d = LoginDigest::new(Duration::ZERO, 0);
        assert_eq!(
            d.refused("x", peer("10.0.0.1"), DenyReason::BadToken, t0)
                .len(),
            1
        );
        assert!(d
            .refused("x", peer("10.0.0.1"), DenyReason::BadToken, t0)
            .is_empty());
        assert!(d.due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(d.due(t0 + Duration::from_secs(1)).len(), 1);
        assert!(d.is_empty());
    }

    #[test]
    fn a_full_table_sums_further_addresses_in_one_overflow_row() {
        let t0 = Instant::now();
        let mut d = LoginDigest::new(W, 2);
        let mut written = Vec::new();
        for i in 0..500 {
            let ip = format!("10.0.{}.{}", i / 250, i % 250);
            written.extend(d.refused("x", peer(&ip), DenyReason::UnknownDevice, t0));
        }
        assert_eq!(written.len(), 2, "the two tracked addresses");
        assert_eq!(d.len(), 3, "two addresses and one overflow");
        let closed = d.due(t0 + W);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].remote_addr, None);
        assert!(closed[0]
            .detail
            .as_deref()
            .unwrap()
            .starts_with("unknown_device (498 more attempts in 60 s from addresses"));
        written.extend(closed);
        assert_eq!(count(&written), 500);
        assert_eq!(d.len(), 0);
    }
}
