//! Grounded arguments: the values that a built-in tool's path parameter
//! can usefully take, surveyed from the workspace, or the shape that a
//! new path or code must have, so the model's call grammar lets it write
//! only those (the model crate's `ArgumentValues`).
//!
//! A small model knows which tool to call before it knows where it is: the
//! default 135M model asked to read `notes.txt` wrote
//! `/Users/michael.doe/Desktop/notes.txt`. The sandbox refused it, as it
//! should, and the task failed. Grounding makes the grammar offer the
//! paths that exist.
//!
//! Only parameters that must name something that already exists are
//! grounded in values, so grounding never forbids a call that could have
//! worked:
//! * `read_file.path`: a file;
//! * `list_dir.path` and `search_files.path`: a folder, `.` for the root.
//!
//! `write_file.path` names what may not exist yet, so it is grounded in a
//! shape, [`NEW_PATH_PATTERN`]: a path relative to the workspace root, no
//! part of it `.` or `..`, none empty. The model asked to write
//! `greeting.txt` otherwise writes `/greeting.txt`, which the workspace
//! refuses. Every file the tool can write has such a spelling (an absolute
//! path inside the workspace, or one through `..` that stays inside, names
//! a file a plain relative path names too), so this forbids spellings,
//! never files. The one exception: a name holding a control character
//! (C0, DEL or C1), which nobody types either (the survey leaves such
//! names out too).
//!
//! `execute_code.code` is grounded in a shape too, [`PROGRAM_PATTERN`]:
//! code that does not end open (in `(`, `,`, a space…), which is how a
//! small model's bare quote cuts its code short. It also forbids
//! spellings, never programs. Shapes show nothing of the workspace, so
//! they apply whether or not the policy lets the model list it.
//!
//! That much is [`GroundingMode::Workspace`]. [`GroundingMode::Request`]
//! also copies a new file's path and text, and a search's pattern, from
//! the user's words, which forbids what a model might rightly write of its
//! own; the default, [`GroundingMode::Auto`], keeps it to small in-process
//! models, which write neither a file's name nor its text as asked.
//!
//! The survey is exact or absent:
//! * a link anywhere in the workspace means no grounding at all: a link
//!   to a folder opens everything below it to the tools (which follow
//!   links inside the workspace), and one to `.` makes that endless;
//! * paths that the policy denies to the tool are left out (the call would
//!   be refused anyway); a folder is not entered when, for every grounded
//!   tool, an explicit `deny` rule matches both the folder and a name
//!   inside it (the rule for `.git` does), so such a folder costs nothing;
//! * a workspace with more than [`MAX_SURVEYED`] files, or folders, gives
//!   no grounding of that kind (more than [`MAX_SURVEYED`] folders: of
//!   either kind), as a partial list would forbid a path that exists; so
//!   does a name that is not UTF-8 or holds a control character, which
//!   nobody can type either, and a survey that takes longer than
//!   [`SURVEY_DEADLINE`].
//!
//! Threat model. The names are the user's, and the model may only write
//! them, never read them, but a served model's server receives them in the
//! grammar. So the survey runs only where the policy lets the model list
//! the workspace without asking (`list_dir` on `.` allowed): it then shows
//! nothing that a call could not. (The shapes are constants, and show
//! nothing.) The survey reads names only, never
//! contents; it is bounded (at most [`MAX_SURVEYED`] + 1 folders listed,
//! and the deadline), and it blocks (it lists folders), so async callers
//! run it on a blocking thread. A workspace that sandboxed code filled
//! with files costs one bounded survey per step, and grounds no names.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::policy::{Grants, Policy, Verdict};
use crate::tools::{Builtin, Executor, Registry};
use crate::workspace::Workspace;

/// Most files, and most folders besides `.`, that a survey lists; past it
/// that kind is not grounded.
pub const MAX_SURVEYED: usize = 256;

/// Longest a survey may take; past it nothing is grounded.
pub const SURVEY_DEADLINE: Duration = Duration::from_millis(250);

/// One character of a name as JSON writes it: not `/`, and `"` and `\`
/// escaped; no control characters (C0, DEL or C1).
macro_rules! name_char {
    () => {
        r#"(?:[^/"\\\x00-\x1F\x7F-\x9F]|\\["\\])"#
    };
}

/// [`name_char!`], and not `.`.
macro_rules! name_char_but_dot {
    () => {
        r#"(?:[^/."\\\x00-\x1F\x7F-\x9F]|\\["\\])"#
    };
}

/// One part of a path: a name that is not `.` or `..`.
macro_rules! path_part {
    () => {
        concat!(
            "(?:",
            name_char_but_dot!(),
            name_char!(),
            "*|\\.",
            name_char_but_dot!(),
            name_char!(),
            "*|\\.\\.",
            name_char!(),
            "+)"
        )
    };
}

/// The shape of a path `write_file` may create, as a pattern over the
/// path's JSON text (see the module docs): one or more parts joined by
/// `/`, each a name that is not `.` or `..`.
pub const NEW_PATH_PATTERN: &str = concat!("^", path_part!(), "(?:/", path_part!(), ")*$");

/// One character of a JSON string's text as llama.cpp's JSON grammar
/// writes it, but none of `$but` (inside a character class): a character
/// that needs no escape (not `"`, `\`, a C0 control or DEL), or an escape.
macro_rules! json_char_but {
    ($but:literal) => {
        concat!(
            r#"(?:[^"\\\x00-\x1F\x7F"#,
            $but,
            r#"]|\\["\\bfnrt]|\\u[0-9a-fA-F]{4})"#
        )
    };
}

/// The shape of `execute_code`'s code, as a pattern over the code's JSON
/// text: at least one character, and the last, as JSON writes it, not one
/// that leaves a program open: `(`, `[`, `{`, `,`, `=`, `:`, `+` or a
/// space. (A bare quote after a prefix, as in `print(f"`, still ends the
/// code, at `print(f`.)
///
/// What it stops: a small model writes a string literal's opening quote
/// bare (`print("`), and JSON reads it as the end of the code, so the
/// default model ran `print(` when asked to print 'stack' in upper case.
/// With the code unable to end there, the quote must be written as code
/// (`\"`, or `'`). Every program has a spelling of this shape (in Python,
/// JavaScript and bash a program means the same with a newline after it,
/// and a newline is the escape `\n`, which may end the code), so this
/// forbids spellings, never programs.
pub const PROGRAM_PATTERN: &str = concat!(
    "^",
    json_char_but!(""),
    "*",
    json_char_but!(r"(\[{,=:+ "),
    "$"
);

/// Longest request (in bytes) that [`GroundingMode::Request`] copies from:
/// a longer message is not a short command, and would offer too many
/// values to narrow anything.
pub const MAX_REQUEST_BYTES: usize = 2048;

/// What grounds a parameter: what its values are drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroundedBy {
    /// An existing file.
    File,
    /// An existing folder (`.` is the root).
    Folder,
    /// A path the tool may create: [`NEW_PATH_PATTERN`]. In
    /// [`GroundingMode::Request`], where the user's request names paths
    /// the policy allows: one of those, or an existing file.
    NewPath,
    /// Code to run: [`PROGRAM_PATTERN`].
    Program,
    /// In [`GroundingMode::Request`] only: a regular expression matching
    /// words of the user's request literally.
    RequestedPattern,
    /// In [`GroundingMode::Request`] only: text copied from the user's
    /// request.
    RequestedText,
}

/// How far grounding goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroundingMode {
    /// [`GroundingMode::Request`] for a small model (an in-process one of
    /// under a billion parameters: the default model writes neither a
    /// file's name nor its text as asked), [`GroundingMode::Workspace`]
    /// for any other; see [`GroundingMode::resolved`].
    #[default]
    Auto,
    /// Every parameter as its schema has it.
    Off,
    /// Parameters that must name an existing path (exact: never forbids a
    /// call that could have worked), `write_file.path` to a path inside
    /// the workspace ([`NEW_PATH_PATTERN`]), and `execute_code.code` to
    /// code that does not end open ([`PROGRAM_PATTERN`]).
    Workspace,
    /// Also, for small models, parameters copied from the user's request:
    /// `write_file.path` from the paths it names that the policy allows (or
    /// existing files; the shape where it names none);
    /// `search_files.pattern` (matched literally) from what it quotes (or
    /// JSON it holds) where it quotes anything, else from runs of up to
    /// [`MAX_REQUEST_WORDS`] of its words ([`requested_text`]); and
    /// `write_file.content` from the same, never a file's name it gives
    /// ([`requested_content`]). Not exact: a model that would write a file's text or
    /// a regular expression of its own cannot.
    Request,
}

impl GroundingMode {
    /// The mode a session runs under: [`GroundingMode::Auto`] made
    /// [`GroundingMode::Request`] for a small model and
    /// [`GroundingMode::Workspace`] for any other; the rest as they are.
    pub fn resolved(self, small_model: bool) -> GroundingMode {
        match self {
            GroundingMode::Auto if small_model => GroundingMode::Request,
            GroundingMode::Auto => GroundingMode::Workspace,
            mode => mode,
        }
    }
}

/// Longest run of words [`GroundingMode::Request`] offers as a value.
pub const MAX_REQUEST_WORDS: usize = 3;

/// The workspace's paths, relative to its root, `/`-separated. A kind is
/// `None` when it could not be listed exactly (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathSurvey {
    /// Files and links.
    pub files: Option<Vec<String>>,
    /// `.`, then folders and links.
    pub folders: Option<Vec<String>>,
}

/// What a grounded parameter may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroundedValues {
    /// One of these values.
    OneOf(Vec<String>),
    /// Any value whose JSON text this pattern (anchored, in the subset
    /// llama.cpp's JSON-Schema converter reads) matches.
    Matching(&'static str),
}

/// One built-in parameter grounded in the values that can work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroundedParameter {
    /// The tool's registered name.
    pub tool: String,
    /// The parameter.
    pub parameter: &'static str,
    /// What it may be.
    pub values: GroundedValues,
}

impl Builtin {
    /// This tool's groundable parameters, and what grounds each.
    pub fn grounded_parameters(self) -> &'static [(&'static str, GroundedBy)] {
        match self {
            Builtin::ReadFile => &[("path", GroundedBy::File)],
            Builtin::ListDir => &[("path", GroundedBy::Folder)],
            Builtin::SearchFiles => &[
                ("path", GroundedBy::Folder),
                ("pattern", GroundedBy::RequestedPattern),
            ],
            Builtin::WriteFile => &[
                ("path", GroundedBy::NewPath),
                ("content", GroundedBy::RequestedText),
            ],
            Builtin::ExecuteCode => &[("code", GroundedBy::Program)],
        }
    }
}

/// The words of `request`, stripped of the punctuation around them.
fn request_words(request: &str) -> Vec<&str> {
    request
        .split_whitespace()
        .map(|word| {
            word.trim_matches(|c: char| {
                matches!(
                    c,
                    '.' | ',' | ';' | ':' | '!' | '?' | '(' | ')' | '"' | '\'' | '`'
                )
            })
        })
        .filter(|word| !word.is_empty())
        .collect()
}

/// The paths `request` names: words with a `.` or `/` inside, no scheme,
/// not absolute.
pub fn requested_paths(request: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    if request.len() > MAX_REQUEST_BYTES {
        return paths;
    }
    for word in request_words(request) {
        let looks_like_path = word.contains(['.', '/'])
            && !word.starts_with('/')
            && !word.contains("://")
            && !word.split('/').any(|part| part == "..");
        if looks_like_path && !paths.iter().any(|p| p == word) {
            paths.push(word.to_string());
        }
    }
    paths
}

/// What `text` quotes: spans between a quote mark (', " or `) that opens
/// (at the start or after a space or bracket) and the same mark where it
/// closes (at the end or before a space or punctuation), so the
/// apostrophe of "don't" quotes nothing.
fn quoted_spans(text: &str) -> Vec<&str> {
    let mut spans = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (start, quote) = chars[i];
        let opens = matches!(quote, '\'' | '"' | '`')
            && (i == 0 || chars[i - 1].1.is_whitespace() || "([{".contains(chars[i - 1].1));
        if opens {
            let close = (i + 1..chars.len()).find(|&j| {
                chars[j].1 == quote
                    && chars
                        .get(j + 1)
                        .is_none_or(|(_, next)| next.is_whitespace() || next.is_ascii_punctuation())
            });
            if let Some(j) = close {
                spans.push(&text[start + quote.len_utf8()..chars[j].0]);
                i = j + 1;
                continue;
            }
        }
        i += 1;
    }
    spans
}

/// The JSON objects and arrays `text` holds whole (`{"ok": true}`,
/// `[1, 2]`): from a `{` or `[` that opens (at the start or after a space
/// or `(`) to its matching bracket, where that much parses as JSON.
fn json_spans(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let opens = matches!(bytes[i], b'{' | b'[')
            && (i == 0 || bytes[i - 1].is_ascii_whitespace() || bytes[i - 1] == b'(');
        if opens {
            let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
            let mut end = None;
            for (j, &byte) in bytes.iter().enumerate().skip(i) {
                if in_string {
                    match byte {
                        _ if escaped => escaped = false,
                        b'\\' => escaped = true,
                        b'"' => in_string = false,
                        _ => {}
                    }
                    continue;
                }
                match byte {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(j);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            // Brackets are ASCII, so both ends are character boundaries.
            if let Some(end) = end {
                let span = &text[i..=end];
                if serde_json::from_str::<serde_json::Value>(span).is_ok() {
                    spans.push(span);
                    i = end + 1;
                    continue;
                }
            }
        }
        i += 1;
    }
    spans
}

/// What `request` gives literally, each whole: the JSON objects and
/// arrays it holds, and what it quotes ('…', "…" or `…`) outside them.
fn literal_spans(request: &str) -> Vec<&str> {
    let json = json_spans(request);
    let offset = |span: &str| span.as_ptr() as usize - request.as_ptr() as usize;
    let inside_json = |quoted: &str| {
        json.iter().any(|outer| {
            let (start, at) = (offset(outer), offset(quoted));
            at >= start && at < start + outer.len()
        })
    };
    let quoted: Vec<&str> = quoted_spans(request)
        .into_iter()
        .filter(|span| !inside_json(span))
        .collect();
    json.iter().copied().chain(quoted).collect()
}

/// Text copied from `request`, none of it a value `excluded` refuses:
/// what it gives literally ([`literal_spans`]) where it gives any, since
/// quoted text is what a command means ("Which files mention 'tokio'?"
/// searches for `tokio`, not `mention`); else runs of up to
/// [`MAX_REQUEST_WORDS`] words, none holding a word `excluded` refuses.
fn copied_text(request: &str, excluded: &dyn Fn(&str) -> bool) -> Vec<String> {
    if request.len() > MAX_REQUEST_BYTES {
        return Vec::new();
    }
    let mut values: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |values: &mut Vec<String>, value: &str| {
        let value = value.trim();
        if !value.is_empty() && !excluded(value) && seen.insert(value.to_string()) {
            values.push(value.to_string());
        }
    };
    for literal in literal_spans(request) {
        add(&mut values, literal);
    }
    if !values.is_empty() {
        return values;
    }
    let words = request_words(request);
    for start in 0..words.len() {
        for end in start + 1..=(start + MAX_REQUEST_WORDS).min(words.len()) {
            let run = &words[start..end];
            if !run.iter().any(|word| excluded(word)) {
                add(&mut values, &run.join(" "));
            }
        }
    }
    values
}

/// Text copied from `request` (a search's pattern): what it quotes, or the
/// JSON it holds, where it gives any; else runs of up to
/// [`MAX_REQUEST_WORDS`] words.
pub fn requested_text(request: &str) -> Vec<String> {
    copied_text(request, &|_| false)
}

/// Text a file may be written with, copied from `request`: as
/// [`requested_text`], but never a file's name it gives, nor a run of
/// words that holds one, since a file's text is not its own name (asked
/// for a file `todo.md` that lists eggs and bread, the default model
/// wrote `todo.md` in it). A file's name here is a path
/// [`requested_paths`] finds that holds a `/` or ends in a suffix with a
/// letter (`todo.md`, `docs/a`), not a number such as `3.14`. Where all
/// it quotes is such a name (`` `todo.md` ``), the runs of words are
/// offered instead.
pub fn requested_content(request: &str) -> Vec<String> {
    let names: Vec<String> = requested_paths(request)
        .into_iter()
        .filter(|path| {
            path.contains('/')
                || path
                    .rsplit_once('.')
                    .is_some_and(|(_, suffix)| suffix.chars().any(char::is_alphabetic))
        })
        .collect();
    copied_text(request, &|text| names.iter().any(|name| name == text))
}

/// Lists the workspace's files and folders, breadth first, without
/// following links, and without entering a folder `skip` names (blocking;
/// see the module docs for the bounds).
pub fn survey_paths(workspace: &Workspace, skip: &dyn Fn(&str) -> bool) -> PathSurvey {
    let started = Instant::now();
    let mut files = Some(Vec::new());
    let mut folders = Some(vec![".".to_string()]);
    let mut queue = VecDeque::from([String::new()]);
    // Folders past the bound are still walked (their files count), but
    // every folder listed costs one `list_dir`: a tree of empty folders
    // ends the walk once the bound is passed.
    let mut listed = 0usize;
    while let Some(folder) = queue.pop_front() {
        listed += 1;
        if listed > MAX_SURVEYED + 1 || started.elapsed() > SURVEY_DEADLINE {
            // Unlisted folders remain: neither kind is known exactly.
            return PathSurvey::default();
        }
        let at = if folder.is_empty() {
            "."
        } else {
            folder.as_str()
        };
        let Ok(entries) = workspace.list_dir(at) else {
            // A folder that cannot be listed hides what is in it.
            return PathSurvey::default();
        };
        for entry in entries {
            let path = if folder.is_empty() {
                entry.name.clone()
            } else {
                format!("{folder}/{}", entry.name)
            };
            // Names are read lossily: a replacement character may stand
            // for bytes that are not UTF-8.
            let typable = !path.chars().any(|c| c.is_control() || c == '\u{fffd}');
            let add = |list: &mut Option<Vec<String>>, bound: usize| {
                if let Some(values) = list {
                    if !typable || values.len() >= bound {
                        *list = None;
                    } else {
                        values.push(path.clone());
                    }
                }
            };
            match entry.kind {
                "file" => add(&mut files, MAX_SURVEYED),
                "dir" if skip(&path) => {}
                // A folder that cannot be named cannot be listed either.
                "dir" if !typable => return PathSurvey::default(),
                "dir" => {
                    add(&mut folders, MAX_SURVEYED + 1);
                    queue.push_back(path.clone());
                }
                // A link may open a folder (or the whole tree again).
                "symlink" => return PathSurvey::default(),
                // Sockets, fifos, devices: no tool reads them.
                _ => {}
            }
        }
        if files.is_none() && folders.is_none() {
            return PathSurvey::default();
        }
    }
    PathSurvey { files, folders }
}

/// Whether an explicit `deny` rule of `policy` (or of a policy it
/// narrows) matches `tool` called with `parameter` set to `path`.
fn denied_by_rule(policy: &Policy, tool: &str, parameter: &str, path: &str) -> bool {
    let arguments = json!({ parameter: path });
    std::iter::successors(Some(policy), |p| p.outer()).any(|layer| {
        layer.rules().iter().any(|rule| {
            rule.spec.decision == Verdict::Deny && rule.applies_to(tool) && rule.matches(&arguments)
        })
    })
}

/// What grounding needs besides the workspace and the policy.
#[derive(Debug, Clone, Copy)]
pub struct GroundingRequest<'a> {
    /// How far grounding goes.
    pub mode: GroundingMode,
    /// The user's request this turn answers (for [`GroundingMode::Request`]).
    pub request: &'a str,
}

/// The grounded values of every registered built-in parameter that
/// `asked.mode` grounds, in `workspace`, leaving out paths that `policy`
/// denies that tool (blocking).
pub fn ground_arguments(
    workspace: &Workspace,
    registry: &Registry,
    policy: &Policy,
    grants: &Grants,
    asked: GroundingRequest<'_>,
) -> Vec<GroundedParameter> {
    if asked.mode == GroundingMode::Off {
        return Vec::new();
    }
    let from_request = asked.mode == GroundingMode::Request;
    let grounded_tools: Vec<(&str, Vec<(&'static str, GroundedBy)>)> = registry
        .tools()
        .filter_map(|spec| match &spec.executor {
            Executor::Builtin(builtin) => {
                let parameters: Vec<(&'static str, GroundedBy)> = builtin
                    .grounded_parameters()
                    .iter()
                    .copied()
                    .filter(|(_, kind)| {
                        from_request
                            || matches!(
                                kind,
                                GroundedBy::File
                                    | GroundedBy::Folder
                                    | GroundedBy::NewPath
                                    | GroundedBy::Program
                            )
                    })
                    .collect();
                (!parameters.is_empty()).then_some((spec.name.as_str(), parameters))
            }
            _ => None,
        })
        .collect();
    // A shape shows nothing of the workspace: it needs neither the survey
    // nor leave to list the workspace.
    let shape = |kind: GroundedBy| match kind {
        GroundedBy::Program => Some(PROGRAM_PATTERN),
        GroundedBy::NewPath if !from_request => Some(NEW_PATH_PATTERN),
        _ => None,
    };
    let mut grounded = Vec::new();
    let mut surveyed_tools: Vec<(&str, Vec<(&'static str, GroundedBy)>)> = Vec::new();
    for (tool, parameters) in grounded_tools {
        let mut surveyed = Vec::new();
        for (parameter, kind) in parameters {
            match shape(kind) {
                Some(pattern) => grounded.push(GroundedParameter {
                    tool: tool.to_string(),
                    parameter,
                    values: GroundedValues::Matching(pattern),
                }),
                None => surveyed.push((parameter, kind)),
            }
        }
        if !surveyed.is_empty() {
            surveyed_tools.push((tool, surveyed));
        }
    }
    let grounded_tools = surveyed_tools;
    if grounded_tools.is_empty() {
        return grounded;
    }
    // Only where the model may list the workspace without asking (see the
    // threat model).
    let may_list = registry
        .get(Builtin::ListDir.name())
        .is_some_and(|tool| matches!(tool.spec().executor, Executor::Builtin(Builtin::ListDir)))
        && policy
            .decide(Builtin::ListDir.name(), &json!({"path": "."}), grants)
            .verdict
            == Verdict::Allow;
    if !may_list {
        // No names: in `request` mode a new path keeps its shape.
        for (tool, parameters) in &grounded_tools {
            for (parameter, kind) in parameters {
                if *kind == GroundedBy::NewPath {
                    grounded.push(GroundedParameter {
                        tool: tool.to_string(),
                        parameter,
                        values: GroundedValues::Matching(NEW_PATH_PATTERN),
                    });
                }
            }
        }
        return grounded;
    }
    let denied = |tool: &str, parameter: &str, path: &str| {
        let arguments = json!({ parameter: path });
        policy.decide(tool, &arguments, grants).verdict == Verdict::Deny
    };
    // The folders a survey may leave out: those no surveyed parameter
    // could name (a new path is surveyed only for the existing files that
    // `request` also offers).
    let skip = |folder: &str| {
        grounded_tools.iter().all(|(tool, parameters)| {
            parameters
                .iter()
                .filter(|(_, kind)| match kind {
                    GroundedBy::File | GroundedBy::Folder => true,
                    GroundedBy::NewPath => from_request,
                    GroundedBy::Program
                    | GroundedBy::RequestedPattern
                    | GroundedBy::RequestedText => false,
                })
                .all(|(parameter, _)| {
                    denied_by_rule(policy, tool, parameter, folder)
                        && denied_by_rule(policy, tool, parameter, &format!("{folder}/x"))
                })
        })
    };
    let survey = survey_paths(workspace, &skip);
    for (tool, parameters) in grounded_tools {
        for (parameter, kind) in parameters {
            let candidates: Vec<String> = match kind {
                GroundedBy::File => survey.files.clone().unwrap_or_default(),
                GroundedBy::Folder => survey.folders.clone().unwrap_or_default(),
                GroundedBy::NewPath => {
                    let mut paths: Vec<String> = if from_request {
                        requested_paths(asked.request)
                            .into_iter()
                            .filter(|path| !denied(tool, parameter, path))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    if paths.is_empty() {
                        // Nothing named (or all of it denied): the model
                        // picks its own name, inside the workspace.
                        grounded.push(GroundedParameter {
                            tool: tool.to_string(),
                            parameter,
                            values: GroundedValues::Matching(NEW_PATH_PATTERN),
                        });
                        continue;
                    }
                    for file in survey.files.iter().flatten() {
                        if !paths.contains(file) {
                            paths.push(file.clone());
                        }
                    }
                    paths
                }
                GroundedBy::RequestedPattern => requested_text(asked.request)
                    .iter()
                    .map(|text| regex::escape(text))
                    .collect(),
                GroundedBy::RequestedText => requested_content(asked.request),
                GroundedBy::Program => unreachable!("a shape, pushed above"),
            };
            let is_path = matches!(
                kind,
                GroundedBy::File | GroundedBy::Folder | GroundedBy::NewPath
            );
            let values: Vec<String> = candidates
                .into_iter()
                .filter(|value| !is_path || !denied(tool, parameter, value))
                .collect();
            if !values.is_empty() {
                grounded.push(GroundedParameter {
                    tool: tool.to_string(),
                    parameter,
                    values: GroundedValues::OneOf(values),
                });
            }
        }
    }
    grounded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listed values of `grounded`, if it lists them.
    fn listed(grounded: &GroundedParameter) -> Option<Vec<String>> {
        match &grounded.values {
            GroundedValues::OneOf(values) => Some(values.clone()),
            GroundedValues::Matching(_) => None,
        }
    }

    fn workspace_with(files: &[&str]) -> (tempfile::TempDir, Workspace) {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in files {
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, "x").expect("write");
        }
        let workspace = Workspace::open(dir.path()).expect("open");
        (dir, workspace)
    }

    #[test]
    fn the_survey_lists_files_and_folders_breadth_first() {
        let (dir, workspace) = workspace_with(&["notes.txt", "src/main.rs", "src/util/mod.rs"]);
        std::fs::create_dir(dir.path().join("empty")).expect("mkdir");
        let survey = survey_paths(&workspace, &|_| false);
        assert_eq!(
            survey.files,
            Some(vec![
                "notes.txt".into(),
                "src/main.rs".into(),
                "src/util/mod.rs".into()
            ])
        );
        assert_eq!(
            survey.folders,
            Some(vec![
                ".".into(),
                "empty".into(),
                "src".into(),
                "src/util".into()
            ])
        );
    }

    /// A link to a folder opens what is below it to the tools (and one to
    /// `.` the whole tree again), so a link anywhere grounds nothing.
    #[test]
    fn a_link_anywhere_ungrounds_everything() {
        let (dir, workspace) = workspace_with(&["notes.txt", "src/main.rs"]);
        std::os::unix::fs::symlink("src", dir.path().join("src/again")).expect("symlink");
        assert_eq!(survey_paths(&workspace, &|_| false), PathSurvey::default());
        std::fs::remove_file(dir.path().join("src/again")).expect("rm");
        std::os::unix::fs::symlink("notes.txt", dir.path().join("link")).expect("symlink");
        assert_eq!(survey_paths(&workspace, &|_| false), PathSurvey::default());
    }

    /// Up to the bound every path is listed; past it a kind is not
    /// grounded at all, as a partial list would forbid a file that exists.
    #[test]
    fn a_workspace_past_the_bound_is_not_grounded() {
        let names: Vec<String> = (0..MAX_SURVEYED).map(|i| format!("f{i}.txt")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (dir, workspace) = workspace_with(&refs);
        let survey = survey_paths(&workspace, &|_| false);
        assert_eq!(survey.files.map(|f| f.len()), Some(MAX_SURVEYED));
        std::fs::write(dir.path().join("one-more.txt"), "x").expect("write");
        let survey = survey_paths(&workspace, &|_| false);
        assert_eq!(survey.files, None);
        assert_eq!(survey.folders, Some(vec![".".to_string()]));

        let folders: Vec<String> = (0..MAX_SURVEYED).map(|i| format!("d{i}/x")).collect();
        let refs: Vec<&str> = folders.iter().map(String::as_str).collect();
        let (dir, workspace) = workspace_with(&refs);
        let survey = survey_paths(&workspace, &|_| false);
        assert_eq!(
            survey.folders.map(|f| f.len()),
            Some(MAX_SURVEYED + 1),
            "`.` and every folder"
        );
        std::fs::create_dir(dir.path().join("one-more")).expect("mkdir");
        assert_eq!(survey_paths(&workspace, &|_| false), PathSurvey::default());
    }

    #[test]
    fn a_name_with_a_control_character_ungrounds_its_kind() {
        let (_dir, workspace) = workspace_with(&["ok.txt", "bad\u{1b}[31m.txt"]);
        let survey = survey_paths(&workspace, &|_| false);
        assert_eq!(survey.files, None);
        assert_eq!(survey.folders, Some(vec![".".to_string()]));
        // A folder that cannot be named cannot be listed: nothing at all.
        let (_dir, workspace) = workspace_with(&["ok.txt", "bad\u{7}/x.txt"]);
        assert_eq!(survey_paths(&workspace, &|_| false), PathSurvey::default());
    }

    /// Only the path parameters of the file tools that need an existing
    /// path are grounded, and a path the policy denies is not offered: a
    /// denied folder is not even entered, so `.git`'s many files do not
    /// push the workspace past the bound.
    #[test]
    fn grounding_covers_the_reading_tools_and_respects_denials() {
        let git: Vec<String> = (0..=MAX_SURVEYED)
            .map(|i| format!(".git/objects/{i}"))
            .collect();
        let mut files: Vec<&str> = git.iter().map(String::as_str).collect();
        files.extend(["notes.txt", ".env", "src/main.rs"]);
        let (_dir, workspace) = workspace_with(&files);
        let policy = Policy::preset("default").expect("preset");
        let grounded = ground(
            &workspace,
            &policy,
            GroundingMode::Workspace,
            "Write notes.txt and find TODO",
        );
        let find = |tool: &str| {
            grounded
                .iter()
                .find(|g| g.tool == tool)
                .and_then(|g| Some((g.parameter, listed(g)?)))
        };
        let (parameter, files) = find("read_file").expect("read_file grounded");
        assert_eq!(parameter, "path");
        assert!(files.contains(&"notes.txt".to_string()), "{files:?}");
        assert!(files.contains(&"src/main.rs".to_string()), "{files:?}");
        assert!(
            !files.contains(&".env".to_string()),
            "the default policy denies .env: {files:?}"
        );
        assert_eq!(
            find("list_dir").map(|(_, v)| v),
            Some(vec![".".to_string(), "src".to_string()])
        );
        assert!(find("search_files").is_some());
        assert!(
            grounded
                .iter()
                .all(|g| g.parameter == "path" || g.parameter == "code"),
            "workspace grounding leaves the request alone: {grounded:?}"
        );
        // A new file's path is kept inside the workspace, whatever the
        // request says.
        let write = grounded
            .iter()
            .find(|g| g.tool == "write_file")
            .expect("write_file grounded");
        assert_eq!(write.values, GroundedValues::Matching(NEW_PATH_PATTERN));
        // Code is held to a shape, never to values.
        let code = grounded
            .iter()
            .find(|g| g.tool == "execute_code")
            .expect("execute_code grounded");
        assert_eq!(
            (code.parameter, &code.values),
            ("code", &GroundedValues::Matching(PROGRAM_PATTERN))
        );
    }

    fn policy(text: &str) -> Policy {
        Policy::from_toml(text, std::path::Path::new("test.toml")).expect("policy")
    }

    /// The built-ins' grounding in `workspace` under `policy`.
    fn ground(
        workspace: &Workspace,
        policy: &Policy,
        mode: GroundingMode,
        request: &str,
    ) -> Vec<GroundedParameter> {
        ground_arguments(
            workspace,
            &Registry::with_builtins(),
            policy,
            &Grants::default(),
            GroundingRequest { mode, request },
        )
    }

    fn workspace_grounding(workspace: &Workspace, policy: &Policy) -> Vec<GroundedParameter> {
        ground(workspace, policy, GroundingMode::Workspace, "")
    }

    /// Only explicit deny rules that match a folder and what is inside it
    /// keep the survey out of it: an allowlist (deny by default, allow
    /// under `docs/`) still offers `docs/guide.md`, and a rule that
    /// denies the name `secrets` alone still offers what is inside.
    #[test]
    fn only_a_rule_denying_a_folder_and_its_contents_keeps_the_survey_out() {
        let (_dir, workspace) = workspace_with(&["notes.txt", "docs/guide.md", "secrets/plan.txt"]);
        let allowlist = policy(
            r#"
[defaults]
decision = "deny"
reason = "allowlist"

[tools.list_dir]
decision = "allow"

[[rules]]
pointer = "/path"
prefix = "docs/"
decision = "allow"
reason = "docs are readable"

[[rules]]
pointer = "/path"
glob = "secrets"
decision = "deny"
reason = "the name only"

[[rules]]
pointer = "/path"
prefix = "secrets/"
decision = "allow"
reason = "what is inside is readable"
"#,
        );
        let grounded = workspace_grounding(&workspace, &allowlist);
        let read = grounded
            .iter()
            .find(|g| g.tool == "read_file")
            .expect("read_file grounded");
        assert_eq!(
            listed(read),
            Some(vec!["docs/guide.md".into(), "secrets/plan.txt".into()])
        );
    }

    /// `text` as JSON writes it inside its quotes: what the shapes match.
    fn json_text(text: &str) -> String {
        let quoted = serde_json::to_string(text).expect("json");
        quoted[1..quoted.len() - 1].to_string()
    }

    /// The program shape admits code that ends closed, and refuses code
    /// that ends open, as a bare quote leaves it: the pattern read by the
    /// `regex` crate, on the code's JSON text.
    #[test]
    fn code_never_ends_open() {
        let shape = regex::Regex::new(PROGRAM_PATTERN).expect("the pattern compiles");
        for code in [
            "print('STACK')",
            "print(\"STACK\")",
            "echo banana",
            "x",
            "console.log([3, 1, 2].sort())",
            "for i in range(3):\n    print(i)",
            // What ends open, ended with a newline.
            "print(\n",
            "echo a=\n",
            "a\tb\\",
            "ünïcode → 名前",
            "\u{1}",
        ] {
            assert!(shape.is_match(&json_text(code)), "refused {code:?}");
        }
        for code in [
            "", "print(", "[{ ", "echo ", "f(a,", "x =", "d = {", "a[", "if x:", "1 +",
        ] {
            assert!(!shape.is_match(&json_text(code)), "admitted {code:?}");
        }
        // Not JSON's text: a bare quote (the string would end there), a
        // raw control, an escape JSON lacks or left unfinished.
        for text in [r#"print("x")"#, "a\tb", r"a\/b", r"a\u00", r"a\"] {
            assert!(!shape.is_match(text), "admitted {text:?}");
        }
    }

    /// `auto` grounds as `request` for a small model, as `workspace` for
    /// any other; the other modes stand as they are.
    #[test]
    fn auto_is_request_for_a_small_model_only() {
        assert_eq!(GroundingMode::Auto.resolved(true), GroundingMode::Request);
        assert_eq!(
            GroundingMode::Auto.resolved(false),
            GroundingMode::Workspace
        );
        for mode in [
            GroundingMode::Off,
            GroundingMode::Workspace,
            GroundingMode::Request,
        ] {
            assert_eq!(mode.resolved(true), mode);
            assert_eq!(mode.resolved(false), mode);
        }
    }

    /// The new-path shape admits every relative spelling of a file inside
    /// the workspace and none that leaves it or names it twice over: the
    /// pattern read by the `regex` crate, on the path's JSON text.
    #[test]
    fn a_new_path_stays_inside_the_workspace() {
        let shape = regex::Regex::new(NEW_PATH_PATTERN).expect("the pattern compiles");
        for path in [
            "greeting.txt",
            "docs/intro.md",
            ".env",
            "a/.hidden/b",
            "..notes",
            "...",
            "a.",
            "my file (1).txt",
            "quote\"d",
            "back\\slash",
            "ünïcode/名前.txt",
        ] {
            assert!(shape.is_match(&json_text(path)), "refused {path:?}");
        }
        for path in [
            "",
            "/greeting.txt",
            "/tmp/todo.md",
            "..",
            "../up.txt",
            "a/../../b",
            "a/../b",
            "./a.txt",
            "a/./b",
            "a//b",
            "docs/",
            "a\nb",
            "\u{1b}[31m",
            // Controls JSON carries unescaped: DEL, and the C1 CSI.
            "a\u{7f}b",
            "a\u{9b}31m",
        ] {
            assert!(!shape.is_match(&json_text(path)), "admitted {path:?}");
        }
        // The class itself refuses C0 controls, as a model could write
        // them raw (JSON forbids it; the grammar's own string rule does
        // too), and JSON's other escapes: `\u0041`, `\/`.
        for text in ["a\tb", "a\u{1}b", r"\u0041", r"a\/b"] {
            assert!(!shape.is_match(text), "admitted {text:?}");
        }
    }

    /// Grounding shows the model's server names only where the model may
    /// list the workspace without asking; shapes, which show none, apply
    /// either way.
    #[test]
    fn no_names_where_listing_needs_an_approval() {
        let (_dir, workspace) = workspace_with(&["notes.txt"]);
        let strict = Policy::preset("strict").expect("preset");
        assert_ne!(
            strict
                .decide("list_dir", &json!({"path": "."}), &Grants::default())
                .verdict,
            Verdict::Allow,
            "the strict preset asks before listing"
        );
        let shapes_only = |grounded: Vec<GroundedParameter>| {
            let mut shapes: Vec<(&str, &str)> = grounded
                .iter()
                .map(|g| match g.values {
                    GroundedValues::Matching(pattern) => (g.tool.as_str(), pattern),
                    GroundedValues::OneOf(_) => panic!("names listed: {grounded:?}"),
                })
                .collect();
            shapes.sort();
            assert_eq!(
                shapes,
                [
                    ("execute_code", PROGRAM_PATTERN),
                    ("write_file", NEW_PATH_PATTERN)
                ]
            );
        };
        shapes_only(workspace_grounding(&workspace, &strict));
        // `request` mode too: a path the request names is not offered
        // (nor is any existing file), and the new path keeps its shape.
        shapes_only(ground(
            &workspace,
            &strict,
            GroundingMode::Request,
            "Save 'hi' to notes.txt",
        ));
        let asks = policy("[tools.list_dir]\ndecision = \"ask\"\n");
        shapes_only(workspace_grounding(&workspace, &asks));
        let default = Policy::preset("default").expect("preset");
        assert!(workspace_grounding(&workspace, &default)
            .iter()
            .any(|g| listed(g).is_some_and(|files| files == ["notes.txt"])));
    }

    /// `request` grounding copies from the user's words: the paths it
    /// names (never absolute, a URL or one that climbs out) for
    /// `write_file.path`, what it quotes or else runs of its words for
    /// (escaped) `search_files.pattern`, and the same, never a file's
    /// name, for `write_file.content`.
    #[test]
    fn request_grounding_copies_paths_and_words_from_the_request() {
        assert_eq!(
            requested_paths(
                "Save it to out/result.txt, not /etc/passwd, ../up.txt or https://x.io/a."
            ),
            ["out/result.txt"]
        );
        assert_eq!(requested_paths("Write hello.py (a script)."), ["hello.py"]);
        assert!(requested_paths("Write a script that prints hello").is_empty());
        assert_eq!(
            requested_paths("Write config/.env.local"),
            ["config/.env.local"]
        );
        let long = format!("Write {} to out.txt", "word ".repeat(MAX_REQUEST_BYTES / 5));
        assert!(requested_paths(&long).is_empty() && requested_text(&long).is_empty());
        // What a request quotes is what it means: offered alone.
        let text = requested_text("Don't skip it: search the code for 'import requests'.");
        assert_eq!(text, ["import requests"]);
        assert_eq!(
            requested_text("Which files mention 'tokio' or `serde`?"),
            ["tokio", "serde"]
        );
        // So is JSON it holds, whole, with no quote inside it offered apart.
        assert_eq!(
            requested_text(r#"Write the JSON {"ok": true, "n": [1, 2]} to status.json."#),
            [r#"{"ok": true, "n": [1, 2]}"#]
        );
        // Brackets that are not JSON are words.
        let text = requested_text("Write {not json} to a.txt");
        assert!(
            text.contains(&"Write".to_string()) && text.contains(&"{not json}".to_string()),
            "{text:?}"
        );
        // Else runs of words, the apostrophe of "Don't" quoting nothing.
        let text = requested_text("Don't skip it: search the code for imports.");
        assert!(text.contains(&"search the code".to_string()), "{text:?}");
        assert!(text.contains(&"imports".to_string()), "{text:?}");
        assert!(!text.iter().any(|t| t.starts_with("t skip")), "{text:?}");
        assert!(text
            .iter()
            .all(|t| t.split(' ').count() <= MAX_REQUEST_WORDS));

        let (_dir, workspace) = workspace_with(&["notes.txt", ".env"]);
        let policy = Policy::preset("default").expect("preset");
        let copying = |request: &str| ground(&workspace, &policy, GroundingMode::Request, request);
        let values = |grounded: &[GroundedParameter], tool: &str, parameter: &str| {
            grounded
                .iter()
                .find(|g| g.tool == tool && g.parameter == parameter)
                .and_then(listed)
        };
        let grounded = copying("Find FIXME and write the list to todo/fixme.md, or to .env");
        assert_eq!(
            values(&grounded, "write_file", "path"),
            Some(vec!["todo/fixme.md".to_string(), "notes.txt".to_string()]),
            "named paths first, then existing files; .env is denied"
        );
        let patterns = values(&grounded, "search_files", "pattern").expect("pattern grounded");
        assert!(patterns.contains(&"FIXME".to_string()), "{patterns:?}");
        assert!(
            patterns.contains(&r"todo/fixme\.md".to_string()),
            "matched literally: {patterns:?}"
        );
        let texts = values(&grounded, "write_file", "content").expect("content grounded");
        assert!(texts.contains(&"Find FIXME".to_string()), "{texts:?}");
        assert!(
            !texts.iter().any(|text| text.contains("fixme.md")),
            "a file's text is not its name: {texts:?}"
        );
        // Unless the request quotes it in other words; a number is not
        // a file's name.
        let grounded = copying("Write 'see notes.txt' to readme.txt");
        let texts = values(&grounded, "write_file", "content").expect("content grounded");
        assert_eq!(texts, ["see notes.txt"]);
        let texts =
            requested_content("Create a file `todo.md` that lists eggs, then 3.14 to pi.txt");
        assert!(
            !texts.iter().any(|text| text.contains("todo.md")),
            "{texts:?}"
        );
        assert!(texts.contains(&"3.14".to_string()), "{texts:?}");
        assert!(texts.contains(&"lists eggs".to_string()), "{texts:?}");
        // One whose named paths are all denied keeps the shape, rather
        // than offer only the existing files (`notes.txt` here) to write.
        let grounded = copying("Write config/.env.local");
        assert!(grounded.iter().any(|g| g.tool == "write_file"
            && g.parameter == "path"
            && g.values == GroundedValues::Matching(NEW_PATH_PATTERN)));
        // A request that names no path leaves the new file's name to the
        // model, inside the workspace.
        let grounded = copying("Write a poem");
        assert_eq!(values(&grounded, "write_file", "path"), None);
        assert!(grounded.iter().any(|g| g.tool == "write_file"
            && g.parameter == "path"
            && g.values == GroundedValues::Matching(NEW_PATH_PATTERN)));
        // Off grounds nothing.
        assert!(ground(&workspace, &policy, GroundingMode::Off, "Read notes.txt").is_empty());
    }
}
