//! Server-sent events, as OpenAI-compatible servers stream them: lines of
//! `field: value`, events separated by a blank line, `data` lines joined.
//! Only what a completion stream uses is kept: each event's data, and
//! comments and other fields are skipped.

/// Splits a byte stream into the `data` of each event.
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    pending: Vec<u8>,
    data: Option<String>,
}

/// The most one event may hold before the stream is called malformed.
const MAX_EVENT_BYTES: usize = 16 << 20;

/// A stream that cannot be an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseError(pub String);

impl SseDecoder {
    /// Feeds `chunk`; returns the data of every event it completed.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, SseError> {
        self.pending.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line)
                .map_err(|_| SseError("an event line is not UTF-8".into()))?;
            self.line(&line, &mut events);
        }
        let held = self.pending.len() + self.data.as_ref().map_or(0, String::len);
        if held > MAX_EVENT_BYTES {
            return Err(SseError(format!(
                "one event is over {} MiB",
                MAX_EVENT_BYTES >> 20
            )));
        }
        Ok(events)
    }

    /// Ends the stream; returns an event left without its blank line.
    pub(crate) fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            let mut events = Vec::new();
            self.line(&String::from_utf8_lossy(&rest), &mut events);
        }
        self.data.take()
    }

    fn line(&mut self, line: &str, events: &mut Vec<String>) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_lines_are_joined() {
        let mut decoder = SseDecoder::default();
        let mut got = Vec::new();
        for chunk in [
            &b": keep-alive\n\ndata: {\"a\""[..],
            b":1}\r\n\r\nevent: x\ndata: one\ndata: two\n\n",
            b"data: [DONE]\n\n",
        ] {
            got.extend(decoder.push(chunk).expect("valid"));
        }
        assert_eq!(got, ["{\"a\":1}", "one\ntwo", "[DONE]"]);
        assert_eq!(decoder.finish(), None);
        let mut cut = SseDecoder::default();
        assert!(cut.push(b"data: partial").expect("valid").is_empty());
        assert_eq!(cut.finish().as_deref(), Some("partial"));
        assert!(SseDecoder::default().push(b"data: \xff\n").is_err());
    }
}
