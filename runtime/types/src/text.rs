//! Untrusted text made safe to show a person.
//!
//! # Threat model
//!
//! File names, file contents, tool output and model output are written by
//! whoever controls the workspace, the sandboxed code or the model. Shown
//! raw, they can forge lines of a listing (a file named `a\nb.txt`), drive
//! the terminal with escape sequences (retitle it, move the cursor, hide
//! text, or write over a prompt), or reorder what is shown with Unicode
//! bidirectional controls. Everything a person is shown goes through one
//! of these functions, which turn each such character into a visible
//! escape (`\n`, `\x1b`, `\u{202e}`) and leave all other text as it is.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` must be escaped; `keep_lines` keeps `\n` and `\t` (and a
/// backslash, which only needs escaping where escapes must be unambiguous).
fn needs_escape(c: char, keep_lines: bool) -> bool {
    match c {
        '\n' | '\t' | '\\' => !keep_lines,
        // C0 controls, DEL and C1 controls.
        c if c.is_control() => true,
        // Bidirectional marks, embeddings, overrides and isolates.
        '\u{061c}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}' => true,
        // Line and paragraph separators.
        '\u{2028}' | '\u{2029}' => true,
        // Invisible characters that can hide text from a person (zero
        // widths, word joiner, BOM, soft hyphen, tag characters).
        '\u{00ad}'
        | '\u{200b}'..='\u{200d}'
        | '\u{2060}'
        | '\u{feff}'
        | '\u{e0000}'..='\u{e007f}' => true,
        _ => false,
    }
}

fn escape(text: &str, keep_lines: bool) -> Cow<'_, str> {
    if !text.chars().any(|c| needs_escape(c, keep_lines)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !needs_escape(c, keep_lines) {
            out.push(c);
            continue;
        }
        let _ = match c {
            '\n' => out.write_str("\\n"),
            '\t' => out.write_str("\\t"),
            '\r' => out.write_str("\\r"),
            '\\' => out.write_str("\\\\"),
            c if (c as u32) < 0x100 => write!(out, "\\x{:02x}", c as u32),
            c => write!(out, "\\u{{{:x}}}", c as u32),
        };
    }
    Cow::Owned(out)
}

/// `text` for one line of a listing: every control character escaped,
/// newlines and tabs too. For names and paths.
pub fn one_line(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// `text` for a terminal: lines and tabs kept, every other control
/// character escaped. For output and messages.
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_lines_and_escape_sequences_become_visible() {
        let cases = [
            ("plain name.txt", "plain name.txt", "plain name.txt"),
            ("evil\nname.txt", "evil\\nname.txt", "evil\nname.txt"),
            (
                "\x1b]0;pwned\x07title",
                "\\x1b]0;pwned\\x07title",
                "\\x1b]0;pwned\\x07title",
            ),
            ("cr\rover", "cr\\rover", "cr\\rover"),
            ("a\tb", "a\\tb", "a\tb"),
            ("c1\u{9b}31m", "c1\\x9b31m", "c1\\x9b31m"),
            ("txt.\u{202e}exe", "txt.\\u{202e}exe", "txt.\\u{202e}exe"),
            ("ünïcödé ✓", "ünïcödé ✓", "ünïcödé ✓"),
            ("a\\nb", "a\\\\nb", "a\\nb"),
            (
                "hid\u{200b}den\u{e0041}",
                "hid\\u{200b}den\\u{e0041}",
                "hid\\u{200b}den\\u{e0041}",
            ),
            ("line\u{2028}sep", "line\\u{2028}sep", "line\\u{2028}sep"),
        ];
        for (input, line, terminal) in cases {
            assert_eq!(one_line(input), line, "{input:?}");
            assert_eq!(for_terminal(input), terminal, "{input:?}");
        }
        assert!(matches!(one_line("fine"), Cow::Borrowed(_)));
    }
}
