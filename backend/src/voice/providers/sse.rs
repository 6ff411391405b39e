//! Server-sent events (the WHATWG `text/event-stream` format) parsed incrementally from
//! arbitrary byte chunks.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:`; empty when absent (the spec's default type is "message").
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// An incremental parser: feed bytes, take complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
    /// The previous byte was `\r` (a following `\n` belongs to the same line end).
    after_cr: bool,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line.starts_with(':') {
            return; // comment
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // id, retry, unknown fields
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_line_endings_parse() {
        let text =
            "event: ping\r\ndata: {}\r\n\r\n: comment\n\nevent: a\ndata: x\ndata: y\n\ndata:z\r\r";
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(3) {
            out.extend(p.push(chunk));
        }
        assert_eq!(
            out,
            [
                SseEvent {
                    event: "ping".into(),
                    data: "{}".into()
                },
                SseEvent {
                    event: "a".into(),
                    data: "x\ny".into()
                },
                SseEvent {
                    event: "".into(),
                    data: "z".into()
                },
            ]
        );
    }

    #[test]
    fn multibyte_text_split_mid_character_survives() {
        let text = "data: café ☕\n\n".as_bytes();
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for chunk in text.chunks(1) {
            out.extend(p.push(chunk));
        }
        assert_eq!(out[0].data, "café ☕");
    }
}
