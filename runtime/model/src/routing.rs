//! The parts of constrained routing ([`Routing::Constrained`]) that need no
//! model: how a tool is told of in the routing step's prompts, how the
//! user's words name a tool, and how the scores combine into a choice.
//! The model's scores come from `llama.rs`.
//!
//! [`Routing::Constrained`]: crate::Routing::Constrained

use std::collections::HashSet;

use serde_json::Value;

use crate::backend::tool_name;

/// How many nats of evidence (see [`RoutingScores::evidence`]) the best
/// tool needs before the routing step names one. Measured on the BFCL dev
/// set (`agent eval --bfcl ../shared/bfcl-dev --limit 40`, SmolLM2-135M):
/// from 4.5 to 6 nats, at least 85% of `simple` and `multiple` cases pass
/// the gate with the right tool best, and at least 80% of `irrelevance`
/// cases do not pass it.
pub const ROUTING_EVIDENCE_NATS: f64 = 5.0;

/// The weight, in nats, of a word of a tool's name that the user's message
/// holds (scaled by how few of the offered names hold it).
pub const NAME_WORD_NATS: f64 = 2.0;

/// The weight, in nats, of a word of a tool's name that opens a request,
/// as its verb, on top of [`NAME_WORD_NATS`] and scaled by rarity as
/// those are (see [`name_verbs_in`]): "Read data.csv and tell me its column
/// names." holds `read` of `read_file` and `csv` of `csv_json` alike, and
/// asks to read (the model leaned to `csv_json` by 2 nats).
pub const VERB_NATS: f64 = 2.0;

/// The weight, in nats, that a message naming one of a tool's enumerated
/// parameter values adds to that tool in the choice among tools, once the
/// gate has passed ("Run the bash command date." names `bash` of
/// `execute_code`'s `language`; the model leaned to `list_dir`). Not at
/// the gate: naming a value is not asking for its tool ("Should I learn
/// Python or JavaScript first?"). Asking for it as the means of a request
/// is, and weighs [`INSTRUMENT_NATS`] there.
pub const NAMED_CHOICE_NATS: f64 = 5.0;

/// The weight, in nats, that a request naming one of a tool's enumerated
/// values as its means ("Compute 17 * 23 with Python.", see
/// [`instruments_in`]) adds to that tool's evidence at the gate. The model
/// cannot tell such a request from talk about the value: it finds "What
/// is Python?" 4.9 nats likelier beside `execute_code`, "Compute 17 * 23
/// with Python." 1.2, and "What is 2 to the power of 20? Use Python
/// code." 1.2 (SmolLM2-135M, the shipped tools). Less than
/// [`ROUTING_EVIDENCE_NATS`], so the model's own evidence must still lean
/// to the tool (1 nat).
pub const INSTRUMENT_NATS: f64 = 4.0;

/// Words that make the value after them (past an article) the means of a
/// request: "with Python", "in JavaScript", "using bash", "Use Python",
/// "Run a bash command".
const INSTRUMENT_BEFORE: &[&str] = &["with", "in", "using", "use", "via", "run", "execute"];

/// Words that make the value before them the means: "a bash command".
/// Not `code`, `script` or `program`, which name what is made as often as
/// the means ("Write a Python script hello.py that prints hello." asks for
/// a file).
const INSTRUMENT_AFTER: &[&str] = &["command", "commands"];

/// Words that may follow a value named after an [`INSTRUMENT_BEFORE`] word
/// for it to be the means ("Use Python to add", "Run Python code that");
/// any other word makes the value a modifier ("Search for TODO in Python
/// files.", "List the files in the bash directory.").
const MEANS_FOLLOWERS: &[&str] = &[
    "to", "that", "and", "for", "so", "then", "please", "instead", "code", "script", "program",
    "snippet", "command", "commands",
];

/// Verbs of talk: a request that opens with one asks to be told, not for
/// a means ("Explain closures in JavaScript.").
const TALK_VERBS: &[&str] = &[
    "explain",
    "tell",
    "describe",
    "define",
    "teach",
    "compare",
    "discuss",
    "recommend",
    "suggest",
    "translate",
    "summarise",
    "summarize",
    "say",
];

/// Words that open a statement, not a request: subjects, negations and
/// fillers ("I love coding in Python!", "Don't use Python.").
const NOT_VERBS: &[&str] = &[
    "i", "im", "ive", "we", "you", "he", "she", "it", "its", "they", "my", "our", "your", "his",
    "her", "their", "this", "that", "these", "those", "there", "here", "don", "dont", "do",
    "never", "not", "no", "yes", "thanks", "thank", "the", "a", "an", "so", "and", "but", "if",
];

/// Words that open a question rather than a request, unless a request
/// opener follows ("Can you compute it in Python?").
const QUESTION_OPENERS: &[&str] = &[
    "what", "which", "who", "whom", "whose", "when", "where", "why", "how", "is", "are", "was",
    "were", "do", "does", "did", "should", "shall", "may", "might", "must", "can", "could",
    "would", "will",
];

/// Openers that make a sentence a request, though a question in form.
const POLITE_REQUESTS: &[&[&str]] = &[
    &["can", "you"],
    &["could", "you"],
    &["would", "you"],
    &["please"],
];

/// The fewest letters an enumerated value needs to count as named: `in`,
/// `C` or `m` (units) are words of any message.
const MIN_NAMED_CHOICE_LETTERS: usize = 3;

/// Enumerated values too common in any message to name a tool.
const UNNAMING_VALUES: &[&str] = &[
    "the", "and", "or", "not", "all", "any", "none", "null", "true", "false", "yes", "no",
    "default", "auto", "other", "both", "some", "each", "every", "new",
];

/// The most characters of the user's message, and of a tool's
/// description, that the routing step's prompts hold.
pub const MAX_EVIDENCE_CHARS: usize = 400;

/// The most enumerated values of a parameter that a tool's line shows.
const MAX_SHOWN_CHOICES: usize = 8;

/// The most parameters a tool's line shows.
const MAX_SHOWN_PARAMETERS: usize = 16;

/// What the routing step measured for each offered tool, in offer order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingScores {
    /// How much the model's log-likelihood of the user's message rises
    /// when a system message tells of the tool, over one that tells of
    /// none (nats): a noisy-channel score, the log Bayes factor of "this
    /// request is for this tool".
    pub evidence: Vec<f64>,
    /// The log-likelihood of the tool's name opening a call after the
    /// conversation (nats).
    pub name: Vec<f64>,
    /// Words of the tool's name in the user's message (see
    /// [`name_words_in`]).
    pub words: Vec<f64>,
    /// Words of the tool's name that open a request in the user's message
    /// (see [`name_verbs_in`]).
    pub verbs: Vec<f64>,
    /// Whether the user's message names one of the tool's enumerated
    /// parameter values: 1 or 0 (see [`named_choices_in`]).
    pub named: Vec<f64>,
    /// Whether the user's message asks for one of the tool's enumerated
    /// values as its means: 1 or 0 (see [`instruments_in`]).
    pub instrument: Vec<f64>,
}

impl RoutingScores {
    /// Whether any tool has [`ROUTING_EVIDENCE_NATS`] of evidence, counting
    /// [`INSTRUMENT_NATS`] for a tool the request names as its means.
    pub fn some_tool_fits(&self) -> bool {
        self.evidence.iter().enumerate().any(|(i, evidence)| {
            evidence + INSTRUMENT_NATS * self.instrument.get(i).copied().unwrap_or(0.0)
                >= ROUTING_EVIDENCE_NATS
        })
    }

    /// The index of the tool to call: the best sum of the name's
    /// likelihood, the evidence (with [`INSTRUMENT_NATS`] for a means asked
    /// for), the named words, the verbs and the named values. Where no
    /// tool has the evidence alone, the gate opened only for the tools the
    /// request asks for as its means, and the choice is among them.
    /// `None` when nothing was scored.
    pub fn choice(&self) -> Option<usize> {
        let total = |i: usize| {
            self.name.get(i).copied().unwrap_or(f64::NEG_INFINITY)
                + self.evidence.get(i).copied().unwrap_or(0.0)
                + NAME_WORD_NATS * self.words.get(i).copied().unwrap_or(0.0)
                + VERB_NATS * self.verbs.get(i).copied().unwrap_or(0.0)
                + NAMED_CHOICE_NATS * self.named.get(i).copied().unwrap_or(0.0)
        };
        let asked = |i: &usize| self.instrument.get(*i).is_some_and(|a| *a > 0.0);
        let fits_alone = self.evidence.iter().any(|e| *e >= ROUTING_EVIDENCE_NATS);
        (0..self.name.len())
            .filter(|i| fits_alone || asked(i))
            .max_by(|a, b| {
                let with_means = |i: usize| {
                    total(i) + INSTRUMENT_NATS * self.instrument.get(i).copied().unwrap_or(0.0)
                };
                with_means(*a).total_cmp(&with_means(*b))
            })
    }
}

/// One line that tells of a tool:
/// `Tool NAME(PARAMETER, PARAMETER: a|b|c): DESCRIPTION`.
pub fn describe_tool(tool: &Value) -> String {
    let function = tool.get("function").unwrap_or(tool);
    let name = tool_name(tool).unwrap_or_default();
    let description = function
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // A parameter with a few named choices shows them: they say what the
    // tool is for (`language: python|javascript|bash`).
    let parameters: Vec<String> = function
        .pointer("/parameters/properties")
        .and_then(Value::as_object)
        .map(|properties| {
            properties
                .iter()
                .take(MAX_SHOWN_PARAMETERS)
                .map(|(name, schema)| {
                    let choices: Vec<&str> = schema
                        .get("enum")
                        .and_then(Value::as_array)
                        .map(|values| values.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    if choices.is_empty() || choices.len() > MAX_SHOWN_CHOICES {
                        name.clone()
                    } else {
                        format!("{name}: {}", choices.join("|"))
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "Tool {name}({}): {}",
        parameters.join(", "),
        clip(description, MAX_EVIDENCE_CHARS)
    )
}

/// For each of `names`, the words of that name that `message` holds, each
/// weighted by how rare it is among the names (`ln(names / names holding
/// it)`): "Read notes.txt" names `read_file`, and a word every name has
/// says nothing. Words are compared lower-cased and stemmed (see `stem`).
pub fn name_words_in(message: &str, names: &[&str]) -> Vec<f64> {
    name_words_among(&words(message), names)
}

/// For each of `names`, its words among `said`, each weighted by how rare
/// it is among the names (`ln(names / names holding it)`).
fn name_words_among(said: &[String], names: &[&str]) -> Vec<f64> {
    let named: Vec<Vec<String>> = names.iter().map(|name| words(name)).collect();
    let count = names.len() as f64;
    named
        .iter()
        .map(|words| {
            words
                .iter()
                .filter(|word| said.contains(word))
                .map(|word| {
                    let holding = named.iter().filter(|other| other.contains(word)).count();
                    (count / holding.max(1) as f64).ln()
                })
                .sum()
        })
        .collect()
}

/// For each of `names`, the words of that name that open a request (a
/// sentence that is not a question, see [`Sentence`]) in `message`, past
/// its polite openers ("Can you", "Please"): the request's verb ("Search the code for 'import
/// requests'." opens with `search` of `search_files`). Weighted by rarity
/// as [`name_words_in`] weighs them; compared lower-cased and stemmed.
pub fn name_verbs_in(message: &str, names: &[&str]) -> Vec<f64> {
    let verbs: Vec<String> = sentences(clip(message, MAX_EVIDENCE_CHARS))
        .iter()
        .filter(|sentence| sentence.is_request())
        .filter_map(|sentence| sentence.verb().map(|verb| verb.stemmed.clone()))
        .collect();
    name_words_among(&verbs, names)
}

/// For each of `tools`, 1 if `message` names one of the values its
/// parameters enumerate, else 0. A value is named when every one of its
/// parts is a part of the message: runs of ASCII letters or digits,
/// lower-cased, stemmed where all letters, not split at case changes ("JavaScript" is
/// `javascript`). A value with a part of one letter ("Plan B", "a_to_z"),
/// of fewer than [`MIN_NAMED_CHOICE_LETTERS`] letters in all, or among
/// [`UNNAMING_VALUES`], names nothing. The message is read up to
/// [`MAX_EVIDENCE_CHARS`], as the routing step's prompts read it.
pub fn named_choices_in(message: &str, tools: &[&Value]) -> Vec<f64> {
    let said: HashSet<String> = value_parts(clip(message, MAX_EVIDENCE_CHARS))
        .into_iter()
        .collect();
    tools
        .iter()
        .map(|tool| {
            let named = naming_values(tool)
                .iter()
                .any(|parts| parts.iter().all(|part| said.contains(part)));
            if named {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// The enumerated values of `tool`'s parameters that a message can name,
/// each as its parts (see [`value_parts`]): not one of fewer than
/// [`MIN_NAMED_CHOICE_LETTERS`] letters, with a part of one letter, or
/// among [`UNNAMING_VALUES`].
fn naming_values(tool: &Value) -> Vec<Vec<String>> {
    let function = tool.get("function").unwrap_or(tool);
    let mut values = Vec::new();
    if let Some(parameters) = function.get("parameters") {
        enumerated_values(parameters, &mut values, 0);
    }
    values
        .into_iter()
        .filter(|value| {
            let letters = value.chars().filter(char::is_ascii_alphabetic).count();
            letters >= MIN_NAMED_CHOICE_LETTERS
                && !UNNAMING_VALUES.contains(&value.to_ascii_lowercase().as_str())
        })
        .map(value_parts)
        .filter(|parts| {
            !parts.is_empty()
                && !parts
                    .iter()
                    .any(|part| part.len() == 1 && part.chars().all(|c| c.is_ascii_alphabetic()))
        })
        .collect()
}

/// For each of `tools`, 1 if `message` asks for one of the values its
/// parameters enumerate as the means of a request, else 0: in a sentence
/// that is a request (see [`Sentence`]), the value stands right after one
/// of [`INSTRUMENT_BEFORE`] (an article between allowed) and ends its
/// clause or comes before one of [`MEANS_FOLLOWERS`] ("with Python.",
/// "Use Python to add", "Run Python code that"), or it stands right
/// before one of [`INSTRUMENT_AFTER`] ("a bash command"). "Compute 17 * 23
/// with Python." asks for `execute_code`'s `python`; "Is JavaScript faster
/// than Python?", "I love coding in Python!", "Explain closures in
/// JavaScript.", "Search for TODO in Python files." and "Count the lines
/// in python/app.py." do not. Read up to [`MAX_EVIDENCE_CHARS`], as the
/// routing step's prompts read it.
pub fn instruments_in(message: &str, tools: &[&Value]) -> Vec<f64> {
    let requests: Vec<Sentence> = sentences(clip(message, MAX_EVIDENCE_CHARS))
        .into_iter()
        .filter(Sentence::asks_for_means)
        .collect();
    tools
        .iter()
        .map(|tool| {
            let values = naming_values(tool);
            let asked = requests.iter().any(|sentence| {
                values
                    .iter()
                    .any(|parts| names_as_means(&sentence.words, parts))
            });
            if asked {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// Whether `parts` run in `words` as the means (see [`instruments_in`]).
fn names_as_means(words: &[Word], parts: &[String]) -> bool {
    if parts.is_empty() || parts.len() > words.len() {
        return false;
    }
    (0..=words.len() - parts.len()).any(|start| {
        let end = start + parts.len();
        let run = &words[start..end];
        let runs = run
            .iter()
            .zip(parts)
            .all(|(word, part)| word.stemmed == *part)
            // A clause ends at the run's end only.
            && run[..run.len() - 1].iter().all(|word| !word.clause_ends);
        if !runs {
            return false;
        }
        let raw_at = |i: Option<usize>| i.and_then(|i| words.get(i)).map(|w| w.raw.as_str());
        let before = start.checked_sub(1);
        let before = match raw_at(before) {
            Some("a" | "an" | "the") => before.and_then(|i| i.checked_sub(1)),
            _ => before,
        };
        let next = raw_at(Some(end));
        let clause_ends = run.last().is_some_and(|word| word.clause_ends);
        let marked = raw_at(before).is_some_and(|w| INSTRUMENT_BEFORE.contains(&w))
            && (clause_ends || next.is_none_or(|w| MEANS_FOLLOWERS.contains(&w)));
        marked || (!clause_ends && next.is_some_and(|w| INSTRUMENT_AFTER.contains(&w)))
    })
}

/// A word of a sentence (see [`sentences`]).
#[derive(Debug, Clone, PartialEq)]
struct Word {
    /// As written, lower-cased; a token with `/`, `.`, `_`, `@`, `\` or
    /// `=` inside (`python/app.py`, `csv_to_json`) is one word.
    raw: String,
    /// As [`value_parts`] has it (stemmed where all letters); a token
    /// kept whole is kept whole here too, so no value's part matches it.
    stemmed: String,
    /// Whether a clause ends after it: `,`, `;` or `:` follows, or the
    /// sentence ends.
    clause_ends: bool,
}

/// One sentence of a message.
#[derive(Debug, Clone, PartialEq)]
struct Sentence {
    words: Vec<Word>,
    /// Whether it holds a `?`.
    question_mark: bool,
}

impl Sentence {
    /// The words past polite openers ([`POLITE_REQUESTS`], repeated:
    /// "Please, can you list it").
    fn after_openers(&self) -> &[Word] {
        let mut rest = self.words.as_slice();
        while let Some(opener) = POLITE_REQUESTS
            .iter()
            .find(|opener| opens_with(rest, opener))
        {
            rest = &rest[opener.len()..];
        }
        rest
    }

    /// Whether this is a request, not a question: it opens with a polite
    /// opener ("Can you compute it in Python?"), or it holds no `?` and
    /// opens with none of [`QUESTION_OPENERS`].
    fn is_request(&self) -> bool {
        let polite = self.after_openers().len() < self.words.len();
        let asks = self.question_mark
            || self
                .words
                .first()
                .is_some_and(|w| QUESTION_OPENERS.contains(&w.raw.as_str()));
        !self.words.is_empty() && (polite || !asks)
    }

    /// The word that opens the request, past its polite openers: its verb.
    fn verb(&self) -> Option<&Word> {
        self.after_openers().first()
    }

    /// Whether this request can ask for a means: a request whose verb is
    /// an action, not talk ([`TALK_VERBS`]: "Explain closures in
    /// JavaScript.") or a statement's subject ([`NOT_VERBS`]: "I love
    /// coding in Python!").
    fn asks_for_means(&self) -> bool {
        self.is_request()
            && self.verb().is_some_and(|verb| {
                !TALK_VERBS.contains(&verb.raw.as_str()) && !NOT_VERBS.contains(&verb.raw.as_str())
            })
    }
}

/// The sentences of `text`. A sentence ends at `.`, `!` or `?` before a
/// space or the end (so `app.toml` stays in one), and at a line break.
fn sentences(text: &str) -> Vec<Sentence> {
    let mut found = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let next = chars.peek().map(|(_, n)| *n);
        let ends =
            c == '\n' || (matches!(c, '.' | '!' | '?') && next.is_none_or(char::is_whitespace));
        if ends {
            found.push(sentence(&text[start..at + c.len_utf8()]));
            start = at + c.len_utf8();
        }
    }
    if start < text.len() {
        found.push(sentence(&text[start..]));
    }
    found.retain(|sentence| !sentence.words.is_empty());
    found
}

/// Characters that keep a token whole: it is a path, a file or an
/// identifier, not words.
const WHOLE_TOKEN_MARKS: &[char] = &['/', '.', '_', '@', '\\', '='];

/// One sentence's words (see [`Word`]).
fn sentence(text: &str) -> Sentence {
    let mut words: Vec<Word> = Vec::new();
    for token in text.split_whitespace() {
        let core = token.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        let trailing = &token[token
            .rfind(|c: char| c.is_ascii_alphanumeric())
            .map_or(0, |i| i + 1)..];
        let clause_ends = trailing.contains([',', ';', ':']);
        if core.is_empty() {
            // Punctuation alone (" - ", " , ") ends the clause before it.
            if let Some(last) = words.last_mut() {
                last.clause_ends |= clause_ends;
            }
            continue;
        }
        let lower = core.to_ascii_lowercase();
        let before = words.len();
        if lower.contains(WHOLE_TOKEN_MARKS) {
            words.push(Word {
                raw: lower.clone(),
                stemmed: lower,
                clause_ends: false,
            });
        } else {
            for part in lower
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|part| !part.is_empty())
            {
                words.push(Word {
                    raw: part.to_string(),
                    stemmed: value_parts(part).pop().unwrap_or_default(),
                    clause_ends: false,
                });
            }
        }
        if words.len() > before {
            if let Some(last) = words.last_mut() {
                last.clause_ends = clause_ends;
            }
        }
    }
    if let Some(last) = words.last_mut() {
        last.clause_ends = true;
    }
    Sentence {
        question_mark: text.contains('?'),
        words,
    }
}

/// Whether `words` (as written, lower-cased) open with `opener`.
fn opens_with(words: &[Word], opener: &[&str]) -> bool {
    opener.len() <= words.len() && opener.iter().zip(words).all(|(o, w)| *o == w.raw)
}

/// How deep [`enumerated_values`] looks into nested schemas.
const MAX_SCHEMA_DEPTH: usize = 8;

/// The string values `schema` and the schemas inside it enumerate: its
/// own `enum`, and those of its properties, items and alternatives (a
/// property *named* `enum` is a property, not a keyword).
fn enumerated_values<'a>(schema: &'a Value, values: &mut Vec<&'a str>, depth: usize) {
    if depth > MAX_SCHEMA_DEPTH {
        return;
    }
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        values.extend(choices.iter().filter_map(Value::as_str));
    }
    if let Some(constant) = schema.get("const").and_then(Value::as_str) {
        values.push(constant);
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for property in properties.values() {
            enumerated_values(property, values, depth + 1);
        }
    }
    if let Some(items) = schema.get("items") {
        enumerated_values(items, values, depth + 1);
    }
    for alternatives in ["anyOf", "oneOf", "allOf"] {
        for alternative in schema
            .get(alternatives)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            enumerated_values(alternative, values, depth + 1);
        }
    }
}

/// The parts of `text` for [`named_choices_in`]: runs of ASCII letters or
/// digits, lower-cased, stemmed where all letters (see `stem`).
fn value_parts(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|part| !part.is_empty())
        .map(|part| {
            let lower = part.to_ascii_lowercase();
            if lower.chars().all(|c| c.is_ascii_alphabetic()) {
                stem(&lower)
            } else {
                lower
            }
        })
        .collect()
}

/// The distinct words of `text`: runs of ASCII letters, split at
/// lower-to-upper case changes, lower-cased and stemmed, of 2 letters or
/// more.
fn words(text: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut previous_lower = false;
    let flush = |current: &mut String, words: &mut Vec<String>| {
        if current.len() >= 2 {
            let word = stem(&current.to_ascii_lowercase());
            if !words.contains(&word) {
                words.push(word);
            }
        }
        current.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            if previous_lower && c.is_ascii_uppercase() {
                flush(&mut current, &mut words);
            }
            previous_lower = c.is_ascii_lowercase();
            current.push(c);
        } else {
            previous_lower = false;
            flush(&mut current, &mut words);
        }
    }
    flush(&mut current, &mut words);
    words
}

/// `word` without an `-ing`, `-ed`, `-es` or `-s` ending (the first that
/// fits), where the word has 5 letters or more. Crude, and measured as
/// it is: `files` becomes `fil` while `file` stays, so the two do not
/// match.
fn stem(word: &str) -> String {
    for ending in ["ing", "ed", "es", "s"] {
        if word.len() > 4 {
            if let Some(root) = word.strip_suffix(ending) {
                return root.to_string();
            }
        }
    }
    word.to_string()
}

/// `text` cut to at most `most` characters.
pub fn clip(text: &str, most: usize) -> &str {
    text.char_indices()
        .nth(most)
        .map_or(text, |(at, _)| &text[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, description: &str, properties: Value) -> Value {
        serde_json::json!({
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": {"type": "object", "properties": properties}
            }
        })
    }

    #[test]
    fn a_tool_line_shows_parameters_and_their_few_choices() {
        let code = tool(
            "execute_code",
            "Run a snippet of code.",
            serde_json::json!({
                "code": {"type": "string"},
                "language": {"type": "string", "enum": ["python", "javascript", "bash"]}
            }),
        );
        assert_eq!(
            describe_tool(&code),
            "Tool execute_code(code, language: python|javascript|bash): Run a snippet of code."
        );
        let many: Vec<String> = (0..9).map(|i| format!("v{i}")).collect();
        let wide = tool(
            "pick",
            &"x".repeat(1000),
            serde_json::json!({"which": {"enum": many}}),
        );
        let line = describe_tool(&wide);
        assert!(line.starts_with("Tool pick(which): "), "{line}");
        assert_eq!(line.len(), "Tool pick(which): ".len() + MAX_EVIDENCE_CHARS);
        let properties: serde_json::Map<String, Value> = (0..20)
            .map(|i| (format!("p{i:02}"), serde_json::json!({"type": "string"})))
            .collect();
        let broad = tool("broad", "Many parameters.", Value::Object(properties));
        let line = describe_tool(&broad);
        assert_eq!(
            line.matches(", ").count() + 1,
            MAX_SHOWN_PARAMETERS,
            "{line}"
        );
    }

    /// (message, names, the name with the most weight, or none)
    const NAMED: &[(&str, &[&str], Option<&str>)] = &[
        (
            "What is in notes.txt? Read it.",
            &["read_file", "write_file", "list_dir"],
            Some("read_file"),
        ),
        (
            "Save the text to a file",
            &["read_file", "write_file"],
            None,
        ),
        (
            "Write the number 42 to answer.txt.",
            &["read_file", "write_file"],
            Some("write_file"),
        ),
        (
            "List the contents of src",
            &["read_file", "list_dir"],
            Some("list_dir"),
        ),
        (
            "Searching all files for FIXME",
            &["search_files", "read_file"],
            Some("search_files"),
        ),
        (
            "Find the triangle's area",
            &["calculateTriangleArea", "get_weather"],
            Some("calculateTriangleArea"),
        ),
        ("Hello there", &["read_file", "write_file"], None),
    ];

    #[test]
    fn the_words_of_a_name_count_by_how_rare_they_are() {
        for (message, names, expected) in NAMED {
            let weights = name_words_in(message, names);
            let top = weights.iter().copied().fold(0.0, f64::max);
            let best: Vec<&str> = names
                .iter()
                .zip(&weights)
                .filter(|(_, w)| top > 0.0 && **w == top)
                .map(|(name, _)| *name)
                .collect();
            assert_eq!(best, Vec::from_iter(*expected), "{message}: {weights:?}");
        }
        // A word every name holds weighs nothing.
        assert_eq!(
            name_words_in("file", &["read_file", "write_file"]),
            [0.0, 0.0]
        );
    }

    #[test]
    fn the_choice_adds_the_three_scores_and_the_gate_needs_evidence() {
        // Measured for "What is in notes.txt? Read it." with the seven
        // shipped tools (two shown: `write_file`, `read_file`): the model
        // leans to `write_file` on evidence and name alike; "Read" is a
        // word of one name in seven.
        let scores = RoutingScores {
            evidence: vec![9.53, 8.35],
            name: vec![-9.72, -10.05],
            words: vec![0.0, 7f64.ln()],
            named: vec![0.0, 0.0],
            instrument: vec![0.0, 0.0],
            verbs: vec![0.0, 0.0],
        };
        assert!(scores.some_tool_fits());
        assert_eq!(scores.choice(), Some(1));
        let weak = RoutingScores {
            evidence: vec![4.9, -2.0],
            ..scores.clone()
        };
        assert!(!weak.some_tool_fits());
        assert_eq!(RoutingScores::default().choice(), None);
    }

    #[test]
    fn a_named_value_weighs_in_the_choice_and_never_opens_the_gate() {
        // Measured for "Run the bash command date." (`execute_code`,
        // `list_dir`): the model leans to `list_dir`; the message names
        // `execute_code`'s `bash`.
        let code = RoutingScores {
            evidence: vec![7.96, 9.90],
            name: vec![-9.0, -8.5],
            words: vec![0.0, 0.0],
            named: vec![1.0, 0.0],
            instrument: vec![0.0, 0.0],
            verbs: vec![0.0, 0.0],
        };
        assert!(code.some_tool_fits());
        assert_eq!(code.choice(), Some(0));
        assert_eq!(
            RoutingScores {
                named: vec![0.0, 0.0],
                ..code.clone()
            }
            .choice(),
            Some(1)
        );
        // "Should I learn Python or JavaScript first?": named, yet no tool
        // has the evidence, so no call.
        let talk = RoutingScores {
            evidence: vec![1.09, 1.22],
            ..code.clone()
        };
        assert!(!talk.some_tool_fits());
    }

    /// (message, names, the names its verbs name)
    const VERBS: &[(&str, &[&str], &[&str])] = &[
        (
            "Read data.csv and tell me its column names.",
            &["csv_json", "read_file"],
            &["read_file"],
        ),
        (
            "Search the code for 'import requests'.",
            &["search_files", "list_dir"],
            &["search_files"],
        ),
        (
            "Please list the contents of src. Read it too.",
            &["list_dir", "read_file", "write_file"],
            &["list_dir", "read_file"],
        ),
        // A word of the name that is not the verb, and a question's verb.
        (
            "Convert data.csv and read it",
            &["csv_json", "read_file"],
            &[],
        ),
        ("Read it? Then list it.", &["read_file", "list_dir"], &[]),
        (
            "What is in notes.txt? List it.",
            &["read_file", "list_dir"],
            &["list_dir"],
        ),
        // A polite request is a request.
        (
            "Can you read notes.txt?",
            &["read_file", "list_dir"],
            &["read_file"],
        ),
        (
            "Could you please list src",
            &["read_file", "list_dir"],
            &["list_dir"],
        ),
        (
            "Please, can you read it",
            &["read_file", "list_dir"],
            &["read_file"],
        ),
        // A verb every name holds says nothing.
        ("Get the time", &["get_time", "get_date"], &[]),
    ];

    #[test]
    fn the_verb_of_a_request_names_a_tool() {
        for (message, names, expected) in VERBS {
            let verbs = name_verbs_in(message, names);
            let got: Vec<&str> = names
                .iter()
                .zip(&verbs)
                .filter(|(_, v)| **v > 0.0)
                .map(|(name, _)| *name)
                .collect();
            assert_eq!(got, expected.to_vec(), "{message}: {verbs:?}");
        }
        // Measured for "Read data.csv and tell me its column names."
        // (`csv_json`, `read_file`, of the seven shipped tools): the
        // model leans to `csv_json`, each name has a word of the message.
        let scores = RoutingScores {
            evidence: vec![13.61, 8.25],
            name: vec![-11.06, -7.70],
            words: vec![7f64.ln(), 7f64.ln()],
            named: vec![0.0, 0.0],
            instrument: vec![0.0, 0.0],
            verbs: vec![0.0, 7f64.ln()],
        };
        assert_eq!(scores.choice(), Some(1));
        assert_eq!(
            RoutingScores {
                verbs: vec![0.0, 0.0],
                ..scores
            }
            .choice(),
            Some(0)
        );
    }

    #[test]
    fn a_value_asked_for_as_the_means_opens_the_gate_with_some_evidence() {
        // Measured for "Compute 17 * 23 with Python." (`execute_code`,
        // `unit_convert`): the model finds it 1.22 nats likelier beside
        // `execute_code`, under the gate; the request asks for `python`.
        let asked = RoutingScores {
            evidence: vec![1.22, 2.47],
            name: vec![-9.0, -8.5],
            words: vec![0.0, 0.0],
            named: vec![1.0, 0.0],
            instrument: vec![1.0, 0.0],
            verbs: vec![0.0, 0.0],
        };
        assert!(asked.some_tool_fits());
        assert_eq!(asked.choice(), Some(0));
        // The same words with no means asked for: no call.
        let named_only = RoutingScores {
            instrument: vec![0.0, 0.0],
            ..asked.clone()
        };
        assert!(!named_only.some_tool_fits());
        // The means counts for its own tool only, and the model's own
        // evidence must still lean to it.
        let elsewhere = RoutingScores {
            instrument: vec![0.0, 1.0],
            evidence: vec![1.22, 0.5],
            ..asked.clone()
        };
        assert!(!elsewhere.some_tool_fits());
        let against = RoutingScores {
            evidence: vec![0.9, -1.0],
            ..asked.clone()
        };
        assert!(!against.some_tool_fits());
        // Where only the means opened the gate, the choice is among the
        // tools asked for, however the model leans.
        let leaning = RoutingScores {
            name: vec![-12.0, -6.0],
            ..asked.clone()
        };
        assert_eq!(leaning.choice(), Some(0));
        // Where a tool has the evidence alone, the means weighs in the
        // choice as at the gate, and the model's leaning can still win.
        // Measured for "Use a bash command to count the lines of
        // lines.txt." (`execute_code`, `read_file`): `read_file` by 2 nats.
        let means = RoutingScores {
            evidence: vec![9.02, 14.69],
            name: vec![-14.76, -9.43],
            words: vec![0.0, 0.0],
            named: vec![1.0, 0.0],
            instrument: vec![1.0, 0.0],
            verbs: vec![0.0, 0.0],
        };
        assert_eq!(means.choice(), Some(1));
        let closer = RoutingScores {
            evidence: vec![9.02, 10.69],
            ..means
        };
        assert_eq!(closer.choice(), Some(0));
        assert_eq!(
            RoutingScores {
                instrument: vec![0.0, 0.0],
                ..closer
            }
            .choice(),
            Some(1)
        );
    }

    #[test]
    fn sentences_end_at_a_stop_before_a_space_and_keep_paths_whole() {
        let found = sentences("What port does config/app.toml set?! Run it, now.\nok");
        let words: Vec<Vec<&str>> = found
            .iter()
            .map(|s| s.words.iter().map(|w| w.raw.as_str()).collect())
            .collect();
        assert_eq!(
            words,
            [
                vec!["what", "port", "does", "config/app.toml", "set"],
                vec!["run", "it", "now"],
                vec!["ok"],
            ]
        );
        assert_eq!(
            found.iter().map(|s| s.question_mark).collect::<Vec<_>>(),
            [true, false, false]
        );
        // A clause ends at a comma and at the sentence's end.
        let ends: Vec<bool> = found[1].words.iter().map(|w| w.clause_ends).collect();
        assert_eq!(ends, [false, true, true]);
        assert!(sentences("  ... ").is_empty());
    }

    /// (message, the tools that count as asked for as the means among
    /// `shipped()`)
    const INSTRUMENTS: &[(&str, &[&str])] = &[
        // The eval's requests.
        ("Compute 17 * 23 with Python.", &["execute_code"]),
        (
            "Calculate the first 10 Fibonacci numbers in Python.",
            &["execute_code"],
        ),
        (
            "What is 2 to the power of 20? Use Python code.",
            &["execute_code"],
        ),
        (
            "Use Python to add up the numbers from 1 to 100.",
            &["execute_code"],
        ),
        (
            "With JavaScript, print the length of the string 'runtime'.",
            &["execute_code"],
        ),
        (
            "Use a bash command to count the lines of lines.txt.",
            &["execute_code"],
        ),
        ("Run the bash command date.", &["execute_code"]),
        ("Compute 12 * 12 in JavaScript.", &["execute_code"]),
        (
            "Use JavaScript to reverse the string 'stack'.",
            &["execute_code"],
        ),
        (
            "Sort the numbers 3, 1, 2 with JavaScript and print them.",
            &["execute_code"],
        ),
        (
            "Run a bash command that prints the current directory.",
            &["execute_code"],
        ),
        ("Use bash to echo the word banana.", &["execute_code"]),
        (
            "Run Python code that prints 'stack' in upper case.",
            &["execute_code"],
        ),
        ("write it using the JavaScript", &["execute_code"]),
        ("Run these bash commands", &["execute_code"]),
        (
            "Count the lines of config/app.toml with bash",
            &["execute_code"],
        ),
        // A polite request, though a question in form.
        ("Can you compute 12 * 12 in JavaScript?", &["execute_code"]),
        ("Please, in bash: list the files", &["execute_code"]),
        ("Please can you run it with Python", &["execute_code"]),
        ("Can you tell me what the bash command ls does?", &[]),
        ("Will you use Python for this?", &[]),
        ("You use Python?!", &[]),
        // A question, not a request.
        ("Is JavaScript faster than Python?", &[]),
        ("What is Python?", &[]),
        ("Should I learn Python or JavaScript first?", &[]),
        ("How do I write a loop in Python?", &[]),
        ("how do I write a loop in Python", &[]),
        ("Is this in Python? Tell me.", &[]),
        // Named, not as the means.
        ("Tell me about Python.", &[]),
        ("Python is a snake. So is a boa.", &[]),
        ("The bash party was fun", &[]),
        ("I love coding in Python!", &[]),
        ("I've worked with JavaScript for years.", &[]),
        ("Don't use Python. Just tell me 17*23.", &[]),
        ("Explain closures in JavaScript.", &[]),
        // A modifier, not the means: a word follows, or it is part of a
        // path.
        ("Search for TODO in Python files.", &[]),
        ("List the files in the bash directory.", &[]),
        ("Count the lines in python/app.py.", &[]),
        ("Can you run Python here?", &[]),
        // What is made, not the means.
        ("Write a Python script hello.py that prints hello.", &[]),
        // Every word of a value, in order; values that name nothing
        // (`in`, `Plan B`) are no means either.
        ("Convert it with CSV", &[]),
        ("Convert it with csv to json", &["csv_json"]),
        ("Put it in the box, 5 m in m", &[]),
        ("Compute it with plan B", &[]),
    ];

    #[test]
    fn a_request_asks_for_a_value_as_its_means() {
        let tools = shipped();
        let offered: Vec<&Value> = tools.iter().collect();
        let names: Vec<&str> = tools.iter().filter_map(|t| tool_name(t)).collect();
        for (message, expected) in INSTRUMENTS {
            let asked = instruments_in(message, &offered);
            let got: Vec<&str> = names
                .iter()
                .zip(&asked)
                .filter(|(_, a)| **a > 0.0)
                .map(|(name, _)| *name)
                .collect();
            assert_eq!(got, expected.to_vec(), "{message}: {asked:?}");
        }
        // Read as far as the routing step reads.
        let far = format!(
            "{} Compute it with Python.",
            "x ".repeat(MAX_EVIDENCE_CHARS)
        );
        assert_eq!(instruments_in(&far, &offered[..1]), [0.0]);
    }

    /// (message, the tools that count as named among `shipped()`)
    const NAMED_CHOICES: &[(&str, &[&str])] = &[
        ("Compute 17 * 23 with Python.", &["execute_code"]),
        ("Use bash to echo the word banana.", &["execute_code"]),
        ("With JavaScript, print the length", &["execute_code"]),
        ("Convert this CSV to JSON please", &["csv_json"]),
        // Units of two letters or one are words of any message.
        ("Put it in the box, 5 m from here", &[]),
        // A value with a one-letter part, or a common word, names nothing.
        ("What type of tree is a maple? Plan a trip", &[]),
        ("Is it true that all of them are new?", &[]),
        ("What is the weather in Paris?", &[]),
        // Every word of a value, not one.
        ("Turn this CSV into a table", &[]),
        // A property named `enum` is not a keyword.
        ("an enum of python", &["execute_code"]),
    ];

    fn shipped() -> Vec<Value> {
        let mut odd = tool(
            "odd",
            "A property named enum.",
            serde_json::json!({"enum": {"type": "string", "description": "an enum"}}),
        );
        odd["function"]["parameters"]["properties"]["nested"] =
            serde_json::json!({"type": "array", "items": {"anyOf": [{"const": "zz"}]}});
        vec![
            tool(
                "execute_code",
                "Run code.",
                serde_json::json!({
                    "code": {"type": "string"},
                    "language": {"type": "string", "enum": ["python", "javascript", "bash"]}
                }),
            ),
            tool(
                "unit_convert",
                "Convert units.",
                serde_json::json!({"from": {"enum": ["mm", "m", "in", "C", "Type A", "Plan B", "true", "all", "new"]}}),
            ),
            tool(
                "csv_json",
                "Convert between CSV and JSON.",
                serde_json::json!({"direction": {"enum": ["csv_to_json", "json_to_csv"]}}),
            ),
            odd,
        ]
    }

    #[test]
    fn a_message_names_a_tools_value_by_all_its_words() {
        let tools = shipped();
        let offered: Vec<&Value> = tools.iter().collect();
        let names: Vec<&str> = tools.iter().filter_map(|t| tool_name(t)).collect();
        for (message, expected) in NAMED_CHOICES {
            let named = named_choices_in(message, &offered);
            let got: Vec<&str> = names
                .iter()
                .zip(&named)
                .filter(|(_, n)| **n > 0.0)
                .map(|(name, _)| *name)
                .collect();
            assert_eq!(got, expected.to_vec(), "{message}: {named:?}");
        }
        // `const` and nested schemas count; values too short do not.
        let mut long = tools[3].clone();
        long["function"]["parameters"]["properties"]["nested"]["items"]["anyOf"][0]["const"] =
            serde_json::json!("zebra");
        assert_eq!(named_choices_in("a zebra", &[&long]), [1.0]);
        assert_eq!(named_choices_in("zz top", &[&tools[3]]), [0.0]);
    }

    #[test]
    fn clipping_keeps_whole_characters() {
        assert_eq!(clip("héllo", 2), "hé");
        assert_eq!(clip("abc", 10), "abc");
    }
}
