//! Streaming text out of generated tokens: incremental detokenization and stop strings.
//!
//! [`IncrementalDecoder`] turns ids into text deltas the way TGI's and vLLM's detokenizers do:
//! decode a short window of recent tokens twice (without and with the new ones) and emit the
//! difference. The window keeps decoders that treat the first token specially (SentencePiece's
//! leading space) consistent, and a delta that ends in U+FFFD (a character whose bytes are spread
//! over several byte-level tokens, cut so far) is held until the character is complete.
//!
//! [`StopMatcher`] cuts streamed text at the first stop string, holding back any tail that could
//! still turn into one, so a client never sees part of a stop string.

use std::sync::Arc;

use crate::tokenizer::{LlmTokenizer, TokenizerError};

/// Streaming detokenization of one sequence. Concatenating every [`push`](Self::push) and the
/// final [`finish`](Self::finish) gives `tokenizer.decode(all_ids)` for well-formed output.
#[derive(Debug)]
pub struct IncrementalDecoder {
    tokenizer: Arc<LlmTokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the window decoded for context; its text up to `read_offset` was already emitted.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

/// U+FFFD: what a decoder gives for bytes that are not (yet) a whole character.
const REPLACEMENT: char = '\u{FFFD}';

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<LlmTokenizer>, skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Like [`new`](Self::new), with the last few prompt ids as context that is never emitted
    /// (TGI uses 5): for tokenizers whose first decoded token loses a leading space.
    pub fn with_context(tokenizer: Arc<LlmTokenizer>, skip_special_tokens: bool, context: &[u32]) -> Self {
        let mut d = Self::new(tokenizer, skip_special_tokens);
        d.ids.extend_from_slice(context);
        d.read_offset = context.len();
        d
    }

    /// Adds one generated id and returns the text it completes (often empty while a multi-byte
    /// character is cut between tokens). An id outside the vocabulary is an error and is not kept.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        let window = &self.ids[self.prefix_offset..];
        let prefix = self.tokenizer.decode(
            &window[..self.read_offset - self.prefix_offset],
            self.skip_special_tokens,
        )?;
        let text = self.tokenizer.decode(window, self.skip_special_tokens)?;
        if text.len() > prefix.len() && !text.ends_with(REPLACEMENT) {
            let delta = delta(&prefix, &text);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character decodes to U+FFFD); the decoder is then
    /// empty of pending text and may go on.
    pub fn finish(&mut self) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let window = &self.ids[self.prefix_offset..];
        // Every id was checked on push, so decoding cannot fail on ids; a decoder error leaves
        // nothing to emit.
        let prefix = self
            .tokenizer
            .decode(
                &window[..self.read_offset - self.prefix_offset],
                self.skip_special_tokens,
            )
            .unwrap_or_default();
        let text = self
            .tokenizer
            .decode(window, self.skip_special_tokens)
            .unwrap_or_default();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        delta(&prefix, &text)
    }

    /// Every id pushed (context included).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// `text` less its leading `prefix`. Should the decoder not reproduce the prefix (a decoder that
/// rewrites earlier text once more follows), the part after the common prefix, cut at a char
/// boundary.
fn delta(prefix: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(text.len()));
    let mut cut = common.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[cut..].to_string()
}

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to send now.
    pub text: String,
    /// A stop string was reached: `text` ends just before it, and the stream is over.
    pub stopped: bool,
}

/// Stop strings over streamed text (OpenAI's `stop`): the output ends before the first stop string
/// that completes, and the stop string itself is not sent. The result does not depend on how the
/// text is cut into deltas.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Held back: a suffix of the text so far that is a prefix of some stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(delta);
        // The stop string that completes first (smallest end); of those ending together, the
        // longest. Every match starts inside `held`: text before it could not begin a stop string.
        let best = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|p| (p + s.len(), p)))
            .min_by_key(|&(end, start)| (end, start));
        if let Some((_, start)) = best {
            self.held.truncate(start);
            self.stopped = true;
            return StopOutcome {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.partial_suffix_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        StopOutcome { text, stopped: false }
    }

    /// The held-back text, at the end of the stream (nothing once stopped).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn partial_suffix_len(&self) -> usize {
        let h = &self.held;
        let longest = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0).min(h.len());
        (1..=longest)
            .rev()
            .filter(|&k| h.is_char_boundary(h.len() - k))
            .find(|&k| self.stops.iter().any(|s| s.starts_with(&h[h.len() - k..])))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            let o = m.push(d);
            out.push_str(&o.text);
            if o.stopped {
                assert_eq!(m.finish(), "");
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    /// Every way of cutting `text` into two or three deltas, and one char at a time, agrees.
    fn all_cuts(stops: &[&str], text: &str) -> (String, bool) {
        let one = run(stops, &[text]);
        let bounds: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        for &i in &bounds {
            for &j in bounds.iter().filter(|&&j| j >= i) {
                assert_eq!(
                    run(stops, &[&text[..i], &text[i..j], &text[j..]]),
                    one,
                    "cut at {i},{j}"
                );
            }
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(stops, &refs), one, "char by char");
        one
    }

    #[test]
    fn stop_split_across_deltas() {
        assert_eq!(run(&["STOP"], &["hello S", "TO", "P world"]), ("hello ".into(), true));
        assert_eq!(all_cuts(&["STOP"], "hello STOP world"), ("hello ".into(), true));
        // Held text is released as soon as it can no longer start a stop string.
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("ab S").text, "ab ");
        assert_eq!(m.push("T").text, "");
        assert_eq!(m.push("x").text, "STx");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn overlapping_prefixes() {
        // "aab": the first "a" cannot start "ab" once another "a" follows, but the second can.
        assert_eq!(all_cuts(&["ab"], "xaab"), ("xa".into(), true));
        assert_eq!(all_cuts(&["abab"], "abaabab!"), ("aba".into(), true));
        assert_eq!(all_cuts(&["<|end|>"], "a <|en <|end|> b"), ("a <|en ".into(), true));
    }

    #[test]
    fn no_stop() {
        assert_eq!(
            all_cuts(&["###"], "plain text with # and ## only"),
            ("plain text with # and ## only".into(), false)
        );
        assert_eq!(all_cuts(&[], "nothing to match"), ("nothing to match".into(), false));
        // A partial stop string at the end of the stream is released by finish().
        assert_eq!(all_cuts(&["</s>"], "ends in </"), ("ends in </".into(), false));
    }

    #[test]
    fn multiple_stops() {
        // The stop string that completes first wins, whatever its position in the list.
        assert_eq!(all_cuts(&["world", "lo w"], "hello world"), ("hel".into(), true));
        assert_eq!(all_cuts(&["abcdef", "cd"], "abcdefg"), ("ab".into(), true));
        // Ending together: the longer (earlier-starting) one.
        assert_eq!(all_cuts(&["c", "abc"], "xabc"), ("x".into(), true));
        assert_eq!(
            all_cuts(&["\n\n", "User:"], "answer\n\nUser: more"),
            ("answer".into(), true)
        );
        // After a stop nothing more comes out.
        let mut m = StopMatcher::new(vec!["x".into()]);
        assert_eq!(
            m.push("axb"),
            StopOutcome {
                text: "a".into(),
                stopped: true
            }
        );
        assert_eq!(
            m.push("more"),
            StopOutcome {
                text: "".into(),
                stopped: true
            }
        );
        assert!(m.is_stopped());
    }

    #[test]
    fn empty_stops_ignored() {
        assert_eq!(all_cuts(&["", ""], "text"), ("text".into(), false));
        assert_eq!(all_cuts(&["", "x"], "text"), ("te".into(), true));
    }

    #[test]
    fn multibyte_text_and_stops() {
        assert_eq!(all_cuts(&["世界"], "你好世界!"), ("你好".into(), true));
        assert_eq!(all_cuts(&["é!"], "café é"), ("café é".into(), false));
        assert_eq!(all_cuts(&["🎉🎉"], "🎉 🎉🎉"), ("🎉 ".into(), true));
    }

    #[test]
    fn delta_falls_back_on_char_boundaries() {
        assert_eq!(delta("ab", "abc"), "c");
        assert_eq!(delta("aé", "aêz"), "êz");
        assert_eq!(delta("abc", "ab"), "");
    }
}
