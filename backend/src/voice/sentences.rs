//! Sentence chunking of a streamed reply: tokens in, whole sentences out as soon as each one
//! ends, so speech can start while the language model is still writing.

/// A clause longer than this (characters) is cut at its last comma or space.
const MAX_SENTENCE_CHARS: usize = 220;
/// Abbreviations whose period does not end a sentence.
const ABBREVIATIONS: [&str; 12] = [
    "mr", "mrs", "ms", "dr", "st", "prof", "sr", "jr", "vs", "etc", "e.g", "i.e",
];

/// Splits streamed text into sentences.
#[derive(Debug, Default)]
pub struct SentenceSplitter {
    buf: String,
}

impl SentenceSplitter {
    /// Adds a token; returns the sentences it completed.
    pub fn push(&mut self, token: &str) -> Vec<String> {
        self.buf.push_str(token);
        let mut out = Vec::new();
        while let Some(end) = self.boundary() {
            let sentence: String = self.buf.drain(..end).collect();
            push_clean(&mut out, &sentence);
        }
        out
    }

    /// The rest, at the end of the stream.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = Vec::new();
        push_clean(&mut out, &rest);
        out.pop()
    }

    /// Byte index just past the first complete sentence in the buffer.
    fn boundary(&self) -> Option<usize> {
        let text = &self.buf;
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\n' {
                return Some(i + 1);
            }
            if matches!(c, '.' | '!' | '?' | '…') {
                // Closing quotes and brackets belong to the sentence.
                let mut end = i + c.len_utf8();
                while let Some(&(j, q)) = chars.peek() {
                    if matches!(q, '"' | '\'' | ')' | ']' | '”' | '’' | '.' | '!' | '?') {
                        end = j + q.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                // Only a following space proves the sentence is over ("3.5", "e.g.").
                match chars.peek() {
                    Some(&(_, next)) if next.is_whitespace() => {
                        if c == '.' && is_abbreviation(&text[..i]) {
                            continue;
                        }
                        return Some(end);
                    }
                    _ => continue,
                }
            }
        }
        if let Some((limit, _)) = text.char_indices().nth(MAX_SENTENCE_CHARS) {
            let head = &text[..limit];
            let cut = head
                .rfind(", ")
                .map(|i| i + 1)
                .or_else(|| head.rfind(' '))
                .filter(|&i| i > 0)?;
            return Some(cut);
        }
        None
    }
}

fn is_abbreviation(before: &str) -> bool {
    let word = before
        .rsplit(|c: char| c.is_whitespace())
        .next()
        .unwrap_or("")
        .to_lowercase();
    let word = word.trim_start_matches(|c: char| !c.is_alphanumeric());
    ABBREVIATIONS.contains(&word) || (word.len() == 1 && word.chars().all(char::is_uppercase))
}

fn push_clean(out: &mut Vec<String>, sentence: &str) {
    let s = sentence.trim();
    if s.chars().any(char::is_alphanumeric) {
        out.push(s.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(tokens: &[&str]) -> Vec<String> {
        let mut s = SentenceSplitter::default();
        let mut out: Vec<String> = tokens.iter().flat_map(|t| s.push(t)).collect();
        out.extend(s.finish());
        out
    }

    #[test]
    fn sentences_end_at_punctuation_followed_by_space() {
        assert_eq!(
            split(&["Hel", "lo there", ". How", " are you?", " Fine!", " Bye"]),
            ["Hello there.", "How are you?", "Fine!", "Bye"]
        );
    }

    #[test]
    fn a_sentence_is_released_before_the_stream_ends() {
        let mut s = SentenceSplitter::default();
        assert!(s.push("It is sunny").is_empty());
        assert!(s.push(".").is_empty());
        assert_eq!(s.push(" Tomorrow"), ["It is sunny."]);
    }

    #[test]
    fn decimals_abbreviations_and_quotes_do_not_split_wrongly() {
        assert_eq!(
            split(&["Pi is 3.14 or so. Dr. Who said \"hi.\" Then left"]),
            ["Pi is 3.14 or so.", "Dr. Who said \"hi.\"", "Then left"]
        );
    }

    #[test]
    fn long_clauses_are_cut_and_empty_pieces_dropped() {
        let long = "word, ".repeat(60);
        let out = split(&[&long, " ... \n\n"]);
        assert!(out.len() >= 2, "{out:?}");
        assert!(out
            .iter()
            .all(|s| s.chars().count() <= MAX_SENTENCE_CHARS + 6));
    }
}
