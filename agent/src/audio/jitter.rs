//! The playback jitter buffer: orders frames by (chunk seq, index), holds playback until
//! [`TARGET_FRAMES`] are buffered (~60 ms), drops late frames and reports lost chunks so the
//! decoder can conceal them.

use std::collections::BTreeMap;

/// Frames buffered before playback starts: 3 x 20 ms.
pub const TARGET_FRAMES: usize = 3;
/// Beyond this, the oldest frames are dropped (the network delivered a burst we cannot play).
pub const MAX_FRAMES: usize = 250;

#[derive(Debug, PartialEq, Eq)]
pub enum Pop {
    Frame(Vec<u8>),
    /// A chunk never arrived; conceal one frame.
    Lost,
    /// Nothing to play yet (not primed, or drained).
    Empty,
}

#[derive(Debug, Default)]
pub struct JitterBuffer {
    frames: BTreeMap<(u32, u16), Vec<u8>>,
    next_chunk: Option<u32>,
    primed: bool,
    ended: bool,
    pub late: u64,
    pub lost: u64,
}

impl JitterBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, seq: u32, frames: Vec<Vec<u8>>, last: bool) {
        if self.next_chunk.is_some_and(|n| seq < n) {
            self.late += frames.len() as u64;
            if last {
                self.ended = true;
                self.primed = true;
            }
            return;
        }
        for (i, f) in frames.into_iter().enumerate() {
            self.frames.insert((seq, i as u16), f);
        }
        while self.frames.len() > MAX_FRAMES {
            self.frames.pop_first();
        }
        if last {
            self.ended = true;
        }
        if self.frames.len() >= TARGET_FRAMES || self.ended {
            self.primed = true;
        }
    }

    /// Whether every frame was played after the stream's last chunk.
    pub fn is_done(&self) -> bool {
        self.ended && self.frames.is_empty()
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn pop(&mut self) -> Pop {
        if !self.primed {
            return Pop::Empty;
        }
        let Some((&(seq, idx), _)) = self.frames.first_key_value() else {
            // Underrun: wait for the target again before resuming.
            self.primed = self.ended;
            return Pop::Empty;
        };
        if let Some(n) = self.next_chunk {
            if seq > n && idx == 0 {
                self.lost += 1;
                self.next_chunk = Some(n + 1);
                return Pop::Lost;
            }
        }
        let f = self.frames.pop_first().map(|(_, f)| f).unwrap_or_default();
        let next_is_same_chunk = self
            .frames
            .first_key_value()
            .is_some_and(|(k, _)| k.0 == seq);
        self.next_chunk = Some(if next_is_same_chunk { seq } else { seq + 1 });
        Pop::Frame(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(b: u8) -> Vec<u8> {
        vec![b]
    }

    #[test]
    fn playback_waits_for_sixty_milliseconds_of_audio() {
        let mut j = JitterBuffer::new();
        j.push(0, vec![f(1), f(2)], false);
        assert_eq!(j.pop(), Pop::Empty);
        j.push(1, vec![f(3)], false);
        assert_eq!(j.pop(), Pop::Frame(f(1)));
    }

    #[test]
    fn out_of_order_chunks_play_in_order_and_late_ones_are_dropped() {
        let mut j = JitterBuffer::new();
        j.push(1, vec![f(3), f(4)], false);
        j.push(0, vec![f(1), f(2)], false);
        let got: Vec<_> = (0..4).map(|_| j.pop()).collect();
        assert_eq!(got, [1, 2, 3, 4].map(|b| Pop::Frame(f(b))));
        j.push(0, vec![f(9)], true);
        assert_eq!(j.late, 1);
        assert!(j.ended() && j.is_done());
    }

    #[test]
    fn a_missing_chunk_is_reported_as_lost_once() {
        let mut j = JitterBuffer::new();
        j.push(0, vec![f(1)], false);
        j.push(2, vec![f(3), f(4)], true);
        assert_eq!(j.pop(), Pop::Frame(f(1)));
        assert_eq!(j.pop(), Pop::Lost);
        assert_eq!(j.pop(), Pop::Frame(f(3)));
        assert_eq!(j.pop(), Pop::Frame(f(4)));
        assert_eq!(j.pop(), Pop::Empty);
        assert_eq!(j.lost, 1);
        assert!(j.is_done());
    }

    #[test]
    fn a_short_final_stream_plays_without_reaching_the_target() {
        let mut j = JitterBuffer::new();
        j.push(0, vec![f(1)], true);
        assert_eq!(j.pop(), Pop::Frame(f(1)));
        assert!(j.is_done());
    }
}
