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

/// The weight, in nats, that a message naming one of a tool's enumerated
/// parameter values adds to that tool in the choice among tools, once the
/// gate has passed ("Run the bash command date." names `bash` of
/// `execute_code`'s `language`; the model leaned to `list_dir`). Not at
/// the gate: whether a tool is wanted at all stays the model's evidence,
/// since naming a value is not asking for its tool ("Should I learn Python
/// or JavaScript first?"), and the model cannot tell the two apart here
/// ("What is Python?" gives `execute_code` more evidence than "Compute 17
/// * 23 with Python.").
pub const NAMED_CHOICE_NATS: f64 = 5.0;

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
    /// Whether the user's message names one of the tool's enumerated
    /// parameter values: 1 or 0 (see [`named_choices_in`]).
    pub named: Vec<f64>,
}

impl RoutingScores {
    /// Whether any tool has [`ROUTING_EVIDENCE_NATS`] of evidence.
    pub fn some_tool_fits(&self) -> bool {
        self.evidence.iter().any(|e| *e >= ROUTING_EVIDENCE_NATS)
    }

    /// The index of the tool to call: the best sum of the name's
    /// likelihood, the evidence, the named words and the named values.
    /// `None` when nothing was scored.
    pub fn choice(&self) -> Option<usize> {
        let total = |i: usize| {
            self.name.get(i).copied().unwrap_or(f64::NEG_INFINITY)
                + self.evidence.get(i).copied().unwrap_or(0.0)
                + NAME_WORD_NATS * self.words.get(i).copied().unwrap_or(0.0)
                + NAMED_CHOICE_NATS * self.named.get(i).copied().unwrap_or(0.0)
        };
        (0..self.name.len()).max_by(|a, b| total(*a).total_cmp(&total(*b)))
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
    let said = words(message);
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
            let function = tool.get("function").unwrap_or(tool);
            let mut values = Vec::new();
            if let Some(parameters) = function.get("parameters") {
                enumerated_values(parameters, &mut values, 0);
            }
            let named = values.iter().any(|value| {
                let parts = value_parts(value);
                let letters: usize = value.chars().filter(char::is_ascii_alphabetic).count();
                letters >= MIN_NAMED_CHOICE_LETTERS
                    && !parts.is_empty()
                    && !UNNAMING_VALUES.contains(&value.to_ascii_lowercase().as_str())
                    && !parts.iter().any(|part| {
                        part.len() == 1 && part.chars().all(|c| c.is_ascii_alphabetic())
                    })
                    && parts.iter().all(|part| said.contains(part))
            });
            if named {
                1.0
            } else {
                0.0
            }
        })
        .collect()
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
            ..code
        };
        assert!(!talk.some_tool_fits());
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
