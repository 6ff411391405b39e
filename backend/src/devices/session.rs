//! The conversation session of one device as plain state:
//! `idle → listening → busy (thinking, speaking) → idle`.
//!
//! Listening buffers the uplink audio (reordered by `seq`, duplicates dropped, late chunks
//! reported) into the voice pipeline's decoder. Busy is a turn task running (transcribe →
//! rules see the transcript → respond); cancelling it is barge-in. The worker drives this
//! type and does everything with effects: announcing states, metrics, the turn task.

use std::collections::{BTreeMap, VecDeque};

use companion_schema::{AudioChunk, SessionId};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::voice::UplinkAudio;

/// Most out-of-order chunks held while waiting for a missing one.
const MAX_PENDING_CHUNKS: usize = 64;
/// Session ids remembered in [`Session::is_recent`].
const RECENT_SESSIONS: usize = 8;

struct Listening {
    id: SessionId,
    deadline: Instant,
    /// Set by `stop`: end when the `last` chunk arrives or at this instant.
    stop_deadline: Option<Instant>,
    next_seq: u32,
    pending: BTreeMap<u32, AudioChunk>,
    // In a Mutex only to make the worker `Sync` (the decoder is `Send`, not `Sync`).
    uplink: std::sync::Mutex<Box<dyn UplinkAudio>>,
    frames: usize,
}

struct Busy {
    id: SessionId,
    cancel: CancellationToken,
    deadline: Instant,
}

#[derive(Default)]
enum Phase {
    #[default]
    Idle,
    Listening(Listening),
    Busy(Busy),
}

/// What an uplink audio chunk did.
#[derive(Debug, PartialEq, Eq)]
pub enum AudioVerdict {
    /// No session is listening, or another one is.
    Late,
    /// Already received.
    Duplicate,
    /// Held or decoded; `skipped` when a missing chunk was given up on, `ended` when the
    /// utterance is over (the `last` chunk, or the decoder heard the end of speech).
    Accepted { skipped: bool, ended: bool },
}

/// Why a session's deadline passed.
#[derive(Debug, PartialEq, Eq)]
pub enum Expired {
    /// Listening ended: `stop` waited out its grace, or the listening limit.
    Listening { after_stop: bool },
    /// A turn ran past the watchdog; it has been cancelled.
    Busy(SessionId),
}

/// A finished utterance, ready for a turn.
pub struct Utterance {
    pub id: SessionId,
    pub pcm: Vec<i16>,
    pub frames: usize,
}

#[derive(Default)]
pub struct Session {
    phase: Phase,
    /// The last few sessions started, newest last: a straggling chunk of one of them never
    /// opens a session of its own.
    recent: VecDeque<SessionId>,
}

impl Session {
    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }

    pub fn is_listening(&self) -> bool {
        matches!(self.phase, Phase::Listening(_))
    }

    pub fn is_busy(&self) -> bool {
        matches!(self.phase, Phase::Busy(_))
    }

    /// Whether `id` is one of the last sessions started here.
    pub fn is_recent(&self, id: &SessionId) -> bool {
        self.recent.contains(id)
    }

    /// The running session's id, listening or busy.
    pub fn current(&self) -> Option<&SessionId> {
        match &self.phase {
            Phase::Idle => None,
            Phase::Listening(l) => Some(&l.id),
            Phase::Busy(b) => Some(&b.id),
        }
    }

    /// The id of the session whose turn is running.
    pub fn busy_id(&self) -> Option<&SessionId> {
        match &self.phase {
            Phase::Busy(b) => Some(&b.id),
            _ => None,
        }
    }

    /// When [`Session::expire`] is due.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Idle => None,
            Phase::Listening(l) => Some(l.stop_deadline.map_or(l.deadline, |s| s.min(l.deadline))),
            Phase::Busy(b) => Some(b.deadline),
        }
    }

    /// Starts listening to session `id` until `deadline`, into `uplink`.
    pub fn listen(&mut self, id: SessionId, uplink: Box<dyn UplinkAudio>, deadline: Instant) {
        if self.recent.len() >= RECENT_SESSIONS {
            self.recent.pop_front();
        }
        self.recent.push_back(id.clone());
        self.phase = Phase::Listening(Listening {
            id,
            deadline,
            stop_deadline: None,
            next_seq: 0,
            pending: BTreeMap::new(),
            uplink: std::sync::Mutex::new(uplink),
            frames: 0,
        });
    }

    /// A turn for session `id` runs until `deadline`; `cancel` stops it.
    pub fn busy(&mut self, id: SessionId, cancel: CancellationToken, deadline: Instant) {
        self.phase = Phase::Busy(Busy {
            id,
            cancel,
            deadline,
        });
    }

    /// `stop` for the listening session (`id`, or whichever when `None`): it ends when its
    /// `last` chunk arrives or at `grace`. Anything else is ignored.
    pub fn stop(&mut self, id: Option<&SessionId>, grace: Instant) {
        let Phase::Listening(l) = &mut self.phase else {
            return;
        };
        if id.is_some_and(|i| *i != l.id) {
            return;
        }
        l.stop_deadline.get_or_insert(grace);
    }

    /// Ends the running session (`id`, or whichever when `None`), cancelling its turn.
    /// Returns its id, or `None` when there was nothing to cancel.
    pub fn cancel(&mut self, id: Option<&SessionId>) -> Option<SessionId> {
        let current = self.current()?.clone();
        if id.is_some_and(|i| *i != current) {
            return None;
        }
        if let Phase::Busy(b) = &self.phase {
            b.cancel.cancel();
        }
        self.phase = Phase::Idle;
        Some(current)
    }

    /// The turn of session `id` is over: back to idle. False (and nothing changes) when that
    /// session is no longer the running one.
    pub fn finish(&mut self, id: &SessionId) -> bool {
        if self.busy_id() != Some(id) {
            return false;
        }
        self.phase = Phase::Idle;
        true
    }

    /// Back to idle whatever runs (its turn cancelled). True if a session was running.
    pub fn abandon(&mut self) -> bool {
        match std::mem::take(&mut self.phase) {
            Phase::Idle => false,
            Phase::Listening(_) => true,
            Phase::Busy(b) => {
                b.cancel.cancel();
                true
            }
        }
    }

    /// The deadline passed: what ended. A busy session's turn is cancelled and the session
    /// stays busy until the worker has announced the failure ([`Session::finish`]).
    pub fn expire(&mut self) -> Option<Expired> {
        match &self.phase {
            Phase::Idle => None,
            Phase::Listening(l) => Some(Expired::Listening {
                after_stop: l.stop_deadline.is_some(),
            }),
            Phase::Busy(b) => {
                b.cancel.cancel();
                Some(Expired::Busy(b.id.clone()))
            }
        }
    }

    /// Ends listening: the utterance so far (the session is idle until [`Session::busy`]).
    pub fn end_listening(&mut self) -> Option<Utterance> {
        let Phase::Listening(mut l) = std::mem::take(&mut self.phase) else {
            return None;
        };
        let pcm = l.uplink.get_mut().map(|u| u.take_pcm()).unwrap_or_default();
        Some(Utterance {
            id: l.id,
            pcm,
            frames: l.frames,
        })
    }

    /// An uplink audio chunk for the listening session: held until the chunks before it
    /// arrived, then decoded in order.
    pub fn audio(&mut self, chunk: AudioChunk) -> AudioVerdict {
        let Phase::Listening(l) = &mut self.phase else {
            return AudioVerdict::Late;
        };
        if chunk.session_id != l.id {
            return AudioVerdict::Late;
        }
        if chunk.seq < l.next_seq || l.pending.contains_key(&chunk.seq) {
            return AudioVerdict::Duplicate;
        }
        l.pending.insert(chunk.seq, chunk);
        let mut skipped = false;
        if l.pending.len() > MAX_PENDING_CHUNKS {
            // A chunk is lost for good: skip to the oldest one held.
            if let Some(&first) = l.pending.keys().next() {
                skipped = true;
                l.next_seq = first;
            }
        }
        let mut ended = false;
        while let Some(chunk) = l.pending.remove(&l.next_seq) {
            l.next_seq = l.next_seq.wrapping_add(1);
            for frame in &chunk.frames {
                l.frames += 1;
                if let Ok(up) = l.uplink.get_mut() {
                    match up.push(frame) {
                        Ok(true) => ended = true,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(session_id = %l.id, error = %e, "undecodable uplink frame")
                        }
                    }
                }
            }
            if chunk.last {
                ended = true;
            }
        }
        AudioVerdict::Accepted { skipped, ended }
    }
}

/// A fresh session id for sessions the backend opens (rules, `say`).
pub fn new_session_id() -> SessionId {
    let n: u64 = rand::rng().random();
    SessionId::parse(&format!("s{n:016x}"))
        .unwrap_or_else(|_| SessionId::parse("s").expect("valid literal"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use companion_schema::{Codec, SCHEMA_VERSION};
    use serde_bytes::ByteBuf;

    use super::*;
    use crate::voice::VoiceError;

    /// Decodes a frame to its first byte as one sample; `0xff` is an undecodable frame.
    struct Bytes(Vec<i16>);

    impl UplinkAudio for Bytes {
        fn push(&mut self, frame: &[u8]) -> Result<bool, VoiceError> {
            match frame.first() {
                Some(0xff) | None => Err(VoiceError::Audio("bad frame".into())),
                Some(&b) => {
                    self.0.push(i16::from(b));
                    Ok(false)
                }
            }
        }
        fn take_pcm(&mut self) -> Vec<i16> {
            std::mem::take(&mut self.0)
        }
    }

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    fn chunk(session: &str, seq: u32, frames: &[u8], last: bool) -> AudioChunk {
        AudioChunk {
            v: SCHEMA_VERSION,
            session_id: id(session),
            seq,
            ts_ms: 0,
            codec: Codec::Opus,
            sample_rate: 16_000,
            frame_ms: 20,
            frames: frames.iter().map(|b| ByteBuf::from(vec![*b])).collect(),
            last,
        }
    }

    fn listening(session: &str) -> Session {
        let mut s = Session::default();
        s.listen(
            id(session),
            Box::new(Bytes(Vec::new())),
            Instant::now() + Duration::from_secs(30),
        );
        s
    }

    #[test]
    fn chunks_are_decoded_in_sequence_order_whatever_order_they_arrive_in() {
        let mut s = listening("s1");
        let not_ended = AudioVerdict::Accepted {
            skipped: false,
            ended: false,
        };
        assert_eq!(s.audio(chunk("s1", 2, &[5], true)), not_ended);
        assert_eq!(s.audio(chunk("s1", 1, &[3, 4], false)), not_ended);
        assert_eq!(
            s.audio(chunk("s1", 1, &[3, 4], false)),
            AudioVerdict::Duplicate
        );
        assert_eq!(
            s.audio(chunk("s1", 0, &[1, 0xff, 2], false)),
            AudioVerdict::Accepted {
                skipped: false,
                ended: true
            }
        );
        assert_eq!(
            s.audio(chunk("s1", 0, &[1], false)),
            AudioVerdict::Duplicate
        );
        assert_eq!(s.audio(chunk("s2", 0, &[1], false)), AudioVerdict::Late);
        let u = s.end_listening().unwrap();
        assert_eq!(u.id, id("s1"));
        assert_eq!(
            u.pcm,
            vec![1, 2, 3, 4, 5],
            "the bad frame is skipped, the rest in order"
        );
        assert_eq!(u.frames, 6);
        assert!(s.is_idle());
        assert_eq!(s.audio(chunk("s1", 3, &[1], false)), AudioVerdict::Late);
    }

    #[test]
    fn a_chunk_lost_for_good_is_skipped_once_enough_later_ones_wait() {
        let mut s = listening("s1");
        for seq in 1..=MAX_PENDING_CHUNKS as u32 {
            assert_eq!(
                s.audio(chunk("s1", seq, &[1], false)),
                AudioVerdict::Accepted {
                    skipped: false,
                    ended: false
                }
            );
        }
        assert_eq!(
            s.audio(chunk("s1", MAX_PENDING_CHUNKS as u32 + 1, &[1], true)),
            AudioVerdict::Accepted {
                skipped: true,
                ended: true
            }
        );
        assert_eq!(s.end_listening().unwrap().pcm.len(), MAX_PENDING_CHUNKS + 1);
    }

    #[test]
    fn stop_sets_a_grace_deadline_and_cancel_ends_only_the_named_session() {
        let mut s = listening("s1");
        let listen_deadline = s.deadline().unwrap();
        let grace = Instant::now() + Duration::from_millis(400);
        s.stop(Some(&id("other")), grace);
        assert_eq!(
            s.deadline(),
            Some(listen_deadline),
            "stop for another session"
        );
        s.stop(Some(&id("s1")), grace);
        assert_eq!(s.deadline(), Some(grace));
        assert_eq!(s.expire(), Some(Expired::Listening { after_stop: true }));

        assert_eq!(s.cancel(Some(&id("other"))), None);
        assert!(s.is_listening());
        assert_eq!(s.cancel(None), Some(id("s1")));
        assert!(s.is_idle());
        assert_eq!(s.cancel(None), None);
        assert!(
            s.is_recent(&id("s1")),
            "a straggler of s1 must not reopen it"
        );
    }

    #[test]
    fn the_watchdog_cancels_a_busy_turn_and_only_its_own_finish_ends_it() {
        let mut s = Session::default();
        let cancel = CancellationToken::new();
        s.busy(id("s1"), cancel.clone(), Instant::now());
        assert!(!s.finish(&id("s0")));
        assert_eq!(s.expire(), Some(Expired::Busy(id("s1"))));
        assert!(cancel.is_cancelled());
        assert!(s.is_busy());
        assert!(s.finish(&id("s1")));
        assert!(s.is_idle());
        assert!(!s.abandon());
    }

    #[test]
    fn only_the_last_few_sessions_are_remembered() {
        let mut s = Session::default();
        for n in 0..=RECENT_SESSIONS {
            s.listen(
                id(&format!("s{n}")),
                Box::new(Bytes(Vec::new())),
                Instant::now(),
            );
        }
        assert!(!s.is_recent(&id("s0")));
        assert!(s.is_recent(&id("s1")));
        assert!(s.is_recent(&id(&format!("s{RECENT_SESSIONS}"))));
    }
}
