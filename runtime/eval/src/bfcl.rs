//! BFCL-format single-turn tasks: loading, and scoring by the rules of
//! BFCL's AST checker (`bfcl_eval/eval_checker/ast_eval/ast_checker.py`).
//!
//! A data file holds one JSON object per line: `id`, `question` (a list of
//! turns, each a list of chat messages; only the first turn is used) and
//! `function` (BFCL's function docs). Answers live in
//! `possible_answer/<same file name>`: per id, a list of calls, each a map
//! from the function's name to a map from each parameter to its acceptable
//! values (`""` among them: the parameter may be left out).
//!
//! Scoring, as BFCL does it for function-calling models:
//! * names match after dots become underscores (OpenAI-style names);
//! * every required parameter is present, and none that the function does
//!   not declare or the answer does not list;
//! * each value has the declared type (an integer passes for a `float`) and
//!   is among the acceptable values, strings compared after BFCL's
//!   normalisation (spaces and `,./-_*^` removed, lower case, `'` as `"`);
//! * parallel calls match in any order;
//! * `irrelevance` passes only when no call is made.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Map, Value};

use stack_types::message::{Message, ToolCall};

use crate::EvalError;

/// A BFCL category this runtime scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// One function offered, one call expected.
    Simple,
    /// Several functions offered, one call to the right one expected.
    Multiple,
    /// Several calls expected in one turn, in any order.
    Parallel,
    /// No offered function fits: no call expected.
    Irrelevance,
}

impl Category {
    /// Every category, in report order.
    pub const ALL: [Category; 4] = [
        Category::Simple,
        Category::Multiple,
        Category::Parallel,
        Category::Irrelevance,
    ];

    /// Its name in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Simple => "simple",
            Category::Multiple => "multiple",
            Category::Parallel => "parallel",
            Category::Irrelevance => "irrelevance",
        }
    }

    /// Parses a category name.
    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The category of a BFCL data file, from its name
    /// (`BFCL_v4_simple_python.json` is `simple`).
    fn of_file(name: &str) -> Option<Category> {
        let stem = name.strip_suffix(".json")?;
        let rest = stem.split_once("BFCL_v")?.1;
        let category = rest.split_once('_')?.1;
        match category {
            "simple" | "simple_python" => Some(Category::Simple),
            "multiple" => Some(Category::Multiple),
            "parallel" => Some(Category::Parallel),
            "irrelevance" => Some(Category::Irrelevance),
            _ => None,
        }
    }
}

/// One expected call: the function's (underscored) name and, per
/// parameter, its acceptable values.
#[derive(Debug, Clone, Serialize)]
pub struct ExpectedCall {
    /// The function name, dots as underscores.
    pub name: String,
    /// Parameter name to acceptable values.
    pub parameters: Map<String, Value>,
}

/// One task.
#[derive(Debug, Clone)]
pub struct BfclCase {
    /// BFCL's id (`simple_python_12`).
    pub id: String,
    /// Its category.
    pub category: Category,
    /// The conversation (the first turn of `question`).
    pub messages: Vec<Message>,
    /// BFCL's function docs, as given.
    pub functions: Vec<Value>,
    /// The same functions as OpenAI tools.
    pub tools: Vec<Value>,
    /// The acceptable calls (`None` for irrelevance).
    pub expected: Option<Vec<ExpectedCall>>,
}

/// Loads every case of `categories` from a BFCL data folder.
pub fn load(dir: &Path, categories: &[Category]) -> Result<Vec<BfclCase>, EvalError> {
    let entries = std::fs::read_dir(dir).map_err(|source| EvalError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<(Category, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            Category::of_file(&name).map(|category| (category, entry.path()))
        })
        .filter(|(category, _)| categories.contains(category))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EvalError::NoBfclData(dir.to_path_buf()));
    }
    let mut cases = Vec::new();
    for (category, path) in files {
        let answers = match category {
            Category::Irrelevance => BTreeMap::new(),
            _ => load_answers(&dir.join("possible_answer").join(file_name(&path)))?,
        };
        for (index, line) in read_lines(&path)?.into_iter().enumerate() {
            let at = |message: String| EvalError::Malformed {
                path: path.clone(),
                line: index + 1,
                message,
            };
            let entry: Value = serde_json::from_str(&line).map_err(|e| at(e.to_string()))?;
            let id = entry["id"]
                .as_str()
                .ok_or_else(|| at("no `id`".into()))?
                .to_string();
            let messages = entry
                .pointer("/question/0")
                .and_then(Value::as_array)
                .ok_or_else(|| at("no `question[0]` list of messages".into()))?
                .iter()
                .map(message)
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            let functions = entry["function"]
                .as_array()
                .ok_or_else(|| at("no `function` list".into()))?
                .clone();
            let tools = functions.iter().map(to_openai_tool).collect();
            let expected = match category {
                Category::Irrelevance => None,
                _ => Some(answers.get(&id).cloned().ok_or_else(|| {
                    at(format!("no possible answer for `{id}` in possible_answer/"))
                })?),
            };
            cases.push(BfclCase {
                id,
                category,
                messages,
                functions,
                tools,
                expected,
            });
        }
    }
    Ok(cases)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_lines(path: &Path) -> Result<Vec<String>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_string)
        .collect())
}

fn load_answers(path: &Path) -> Result<BTreeMap<String, Vec<ExpectedCall>>, EvalError> {
    let mut answers = BTreeMap::new();
    for (index, line) in read_lines(path)?.into_iter().enumerate() {
        let at = |message: String| EvalError::Malformed {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        };
        let entry: Value = serde_json::from_str(&line).map_err(|e| at(e.to_string()))?;
        let id = entry["id"].as_str().ok_or_else(|| at("no `id`".into()))?;
        let calls = entry["ground_truth"]
            .as_array()
            .ok_or_else(|| at("no `ground_truth` list".into()))?
            .iter()
            .map(|call| {
                let (name, parameters) =
                    call.as_object()
                        .and_then(|object| object.iter().next())
                        .ok_or_else(|| at("a ground-truth call is not {name: {...}}".into()))?;
                Ok(ExpectedCall {
                    name: openai_name(name),
                    parameters: parameters.as_object().cloned().unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, EvalError>>()?;
        answers.insert(id.to_string(), calls);
    }
    Ok(answers)
}

fn message(value: &Value) -> Result<Message, String> {
    let text = value["content"].as_str().unwrap_or_default();
    match value["role"].as_str() {
        Some("system") => Ok(Message::system(text)),
        Some("user") => Ok(Message::user(text)),
        Some("assistant") => Ok(Message::assistant(text)),
        other => Err(format!("a question message has role {other:?}")),
    }
}

/// A function name as OpenAI-style tools spell it: dots become underscores.
pub fn openai_name(name: &str) -> String {
    name.replace('.', "_")
}

/// A BFCL function doc as an OpenAI tool: the name underscored, and BFCL's
/// types (`dict`, `float`, `tuple`, `any`) as JSON Schema spells them.
pub fn to_openai_tool(function: &Value) -> Value {
    let name = function["name"].as_str().unwrap_or_default();
    let mut parameters = function
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    to_json_schema(&mut parameters);
    json!({
        "type": "function",
        "function": {
            "name": openai_name(name),
            "description": function["description"].as_str().unwrap_or_default(),
            "parameters": parameters,
        }
    })
}

fn to_json_schema(schema: &mut Value) {
    let Value::Object(object) = schema else {
        return;
    };
    object.remove("optional");
    match object.get("type").and_then(Value::as_str) {
        Some("dict") => {
            object.insert("type".into(), "object".into());
        }
        Some("float") => {
            object.insert("type".into(), "number".into());
        }
        Some("tuple") => {
            object.insert("type".into(), "array".into());
        }
        Some("any") => {
            object.remove("type");
        }
        _ => {}
    }
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        properties.values_mut().for_each(to_json_schema);
    }
    if let Some(items) = object.get_mut("items") {
        to_json_schema(items);
    }
    if let Some(additional @ Value::Object(_)) = object.get_mut("additionalProperties") {
        to_json_schema(additional);
    }
}

/// Why a case failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A call was expected and none was made.
    NoCall,
    /// A call was made where none fits (irrelevance).
    UnexpectedCall,
    /// The wrong function was called.
    WrongFunction,
    /// The number of calls is not the number expected.
    WrongCount,
    /// The right function with missing, unknown, mistyped or wrong values.
    BadArguments,
    /// A call whose arguments are not a JSON object, or output that names
    /// no offered tool.
    InvalidOutput,
    /// An executable task's check did not hold.
    CheckFailed,
    /// The turn itself failed (model or runtime error).
    TurnError,
}

impl FailureKind {
    /// Every kind, in report order.
    pub const ALL: [FailureKind; 8] = [
        FailureKind::NoCall,
        FailureKind::UnexpectedCall,
        FailureKind::WrongFunction,
        FailureKind::WrongCount,
        FailureKind::BadArguments,
        FailureKind::InvalidOutput,
        FailureKind::CheckFailed,
        FailureKind::TurnError,
    ];

    /// Its name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::NoCall => "no_call",
            FailureKind::UnexpectedCall => "unexpected_call",
            FailureKind::WrongFunction => "wrong_function",
            FailureKind::WrongCount => "wrong_count",
            FailureKind::BadArguments => "bad_arguments",
            FailureKind::InvalidOutput => "invalid_output",
            FailureKind::CheckFailed => "check_failed",
            FailureKind::TurnError => "turn_error",
        }
    }
}

/// A failure and what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// Its kind.
    pub kind: FailureKind,
    /// What was wrong, for the per-case log.
    pub detail: String,
}

impl Failure {
    fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            detail: detail.into(),
        }
    }
}

/// Scores the calls a model made on `case`.
pub fn score(case: &BfclCase, calls: &[ToolCall]) -> Result<(), Failure> {
    let Some(expected) = &case.expected else {
        return match calls.first() {
            None => Ok(()),
            Some(call) => Err(Failure::new(
                FailureKind::UnexpectedCall,
                format!("called {} where no function fits", call.function.name),
            )),
        };
    };
    if calls.is_empty() {
        return Err(Failure::new(FailureKind::NoCall, "no call was made"));
    }
    if calls.len() != expected.len() {
        return Err(Failure::new(
            FailureKind::WrongCount,
            format!("{} calls, expected {}", calls.len(), expected.len()),
        ));
    }
    let mut made = Vec::new();
    for call in calls {
        match serde_json::from_str::<Value>(&call.function.arguments) {
            Ok(Value::Object(arguments)) => made.push((call.function.name.as_str(), arguments)),
            _ => {
                return Err(Failure::new(
                    FailureKind::InvalidOutput,
                    format!(
                        "the arguments of {} are not a JSON object: {}",
                        call.function.name, call.function.arguments
                    ),
                ))
            }
        }
    }
    let mut used = vec![false; made.len()];
    for want in expected {
        let Some(doc) = case
            .functions
            .iter()
            .find(|f| f["name"].as_str().map(openai_name).as_deref() == Some(&want.name))
        else {
            return Err(Failure::new(
                FailureKind::InvalidOutput,
                format!(
                    "the answer names {}, which the case does not offer",
                    want.name
                ),
            ));
        };
        let mut last_failure = None;
        let mut found = false;
        for (index, (name, arguments)) in made.iter().enumerate() {
            if used[index] || *name != want.name {
                continue;
            }
            match check_arguments(doc, want, arguments) {
                Ok(()) => {
                    used[index] = true;
                    found = true;
                    break;
                }
                Err(failure) => last_failure = Some(failure),
            }
        }
        if !found {
            return Err(last_failure.unwrap_or_else(|| {
                Failure::new(
                    FailureKind::WrongFunction,
                    format!(
                        "expected a call to {}, got {}",
                        want.name,
                        made.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    ),
                )
            }));
        }
    }
    Ok(())
}

/// BFCL's `simple_function_checker` on the arguments of one call.
fn check_arguments(
    doc: &Value,
    want: &ExpectedCall,
    arguments: &Map<String, Value>,
) -> Result<(), Failure> {
    let bad = |detail: String| Failure::new(FailureKind::BadArguments, detail);
    let empty = Map::new();
    let declared = doc
        .pointer("/parameters/properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let required = doc
        .pointer("/parameters/required")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for name in required.iter().filter_map(Value::as_str) {
        if !arguments.contains_key(name) {
            return Err(bad(format!("missing required parameter `{name}`")));
        }
    }
    for (name, value) in arguments {
        let (Some(param), Some(acceptable)) = (declared.get(name), want.parameters.get(name))
        else {
            return Err(bad(format!("unexpected parameter `{name}`")));
        };
        let kind = param["type"].as_str().unwrap_or("any");
        if !has_type(value, kind, param, true) {
            return Err(bad(format!(
                "`{name}` should be of type {kind}, got {value}"
            )));
        }
        let acceptable = acceptable.as_array().cloned().unwrap_or_default();
        if !is_acceptable(value, &acceptable) {
            return Err(bad(format!(
                "`{name}` = {value} is not among {}",
                Value::Array(acceptable)
            )));
        }
    }
    for (name, acceptable) in &want.parameters {
        let optional = acceptable
            .as_array()
            .is_some_and(|values| values.iter().any(|v| v == ""));
        if !arguments.contains_key(name) && !optional {
            return Err(bad(format!("`{name}` is not given and has no default")));
        }
    }
    Ok(())
}

/// BFCL's type check (Python's `type(value) == expected`, so a boolean is
/// not an integer), with its one coercion: an integer passes for a float
/// at the top level only (items of a list are checked as they are).
fn has_type(value: &Value, kind: &str, param: &Value, top_level: bool) -> bool {
    match kind {
        "integer" => value.is_i64() || value.is_u64(),
        "float" | "number" if top_level => value.is_number(),
        "float" | "number" => value.is_f64(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "dict" | "object" => value.is_object(),
        "array" | "tuple" => match (value.as_array(), param["items"]["type"].as_str()) {
            (Some(items), Some(inner)) => items
                .iter()
                .all(|item| has_type(item, inner, &param["items"], false)),
            (Some(_), None) => true,
            (None, _) => false,
        },
        _ => true,
    }
}

/// Whether `value` is among `acceptable`, as BFCL's string, list and dict
/// checkers compare.
fn is_acceptable(value: &Value, acceptable: &[Value]) -> bool {
    match value {
        Value::Object(given) => acceptable.iter().any(|option| {
            let Some(option) = option.as_object() else {
                return false;
            };
            given.iter().all(|(key, v)| {
                option
                    .get(key)
                    .and_then(Value::as_array)
                    .is_some_and(|values| is_acceptable(v, values))
            }) && option.iter().all(|(key, values)| {
                given.contains_key(key)
                    || values
                        .as_array()
                        .is_some_and(|values| values.iter().any(|v| v == ""))
            })
        }),
        // A list of dicts: each element against the answer's element in
        // order, as BFCL's list-of-dict checker does.
        Value::Array(items) if items.iter().any(Value::is_object) => {
            acceptable.iter().any(|option| {
                option.as_array().is_some_and(|options| {
                    options.len() == items.len()
                        && items
                            .iter()
                            .zip(options)
                            .all(|(item, option)| is_acceptable(item, std::slice::from_ref(option)))
                })
            })
        }
        _ => {
            let given = normalized(value);
            acceptable.iter().any(|option| normalized(option) == given)
        }
    }
}

/// A value in the form BFCL compares: strings normalised, numbers as
/// floats (`5 == 5.0` in Python), lists element by element.
fn normalized(value: &Value) -> Value {
    match value {
        Value::String(text) => Value::String(standardize(text)),
        Value::Number(number) => number
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Number(number.clone()), Value::Number),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(object) => Value::Object(
            object
                .iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// BFCL's `standardize_string`: spaces and `,./-_*^` removed, lower case,
/// single quotes as double.
pub fn standardize(text: &str) -> String {
    text.chars()
        .filter(|c| !matches!(c, ' ' | ',' | '.' | '/' | '-' | '_' | '*' | '^'))
        .collect::<String>()
        .to_lowercase()
        .replace('\'', "\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(category: Category, functions: Value, expected: Option<Value>) -> BfclCase {
        let functions = functions.as_array().cloned().unwrap_or_default();
        BfclCase {
            id: "t".into(),
            category,
            messages: vec![Message::user("q")],
            tools: functions.iter().map(to_openai_tool).collect(),
            functions,
            expected: expected.map(|calls| {
                calls
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|call| {
                        let (name, parameters) = call.as_object()?.iter().next()?;
                        Some(ExpectedCall {
                            name: openai_name(name),
                            parameters: parameters.as_object()?.clone(),
                        })
                    })
                    .collect()
            }),
        }
    }

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall::function("c", name, arguments)
    }

    fn area() -> Value {
        json!([{
            "name": "geometry.area",
            "description": "Area of a shape.",
            "parameters": {"type": "dict", "properties": {
                "shape": {"type": "string"},
                "size": {"type": "float"},
                "units": {"type": "string", "optional": true},
                "sides": {"type": "array", "items": {"type": "integer"}},
                "exact": {"type": "boolean"},
                "points": {"type": "array", "items": {"type": "dict", "properties": {"x": {"type": "integer"}}}},
                "weights": {"type": "array", "items": {"type": "float"}}
            }, "required": ["shape", "size"]}
        }, {
            "name": "geometry.volume",
            "description": "Volume.",
            "parameters": {"type": "dict", "properties": {"shape": {"type": "string"}}, "required": ["shape"]}
        }])
    }

    fn area_answer() -> Value {
        json!([{"geometry.area": {
            "shape": ["Square"], "size": [4.0], "units": ["", "cm"],
            "sides": ["", [4, 4]], "exact": ["", true],
            "points": ["", [{"x": [1]}, {"x": [2]}]], "weights": ["", [1.0, 2.5]]
        }}])
    }

    /// The calls made, as (name, arguments), and the verdict (`None`
    /// passes).
    type Row = (&'static [(&'static str, &'static str)], Option<FailureKind>);

    /// Each row: the calls made, and the verdict (`None` passes).
    #[test]
    fn the_ast_checker_rules_hold() {
        let simple = case(Category::Simple, area(), Some(area_answer()));
        let rows: &[Row] = &[
            (
                &[("geometry_area", r#"{"shape": "square", "size": 4}"#)],
                None,
            ),
            (
                &[(
                    "geometry_area",
                    r#"{"shape": "SQUARE ", "size": 4.0, "units": "cm"}"#,
                )],
                None,
            ),
            (
                &[(
                    "geometry_area",
                    r#"{"shape": "Square", "size": 4, "sides": [4, 4], "exact": true}"#,
                )],
                None,
            ),
            (&[], Some(FailureKind::NoCall)),
            (
                &[("geometry_volume", r#"{"shape": "Square"}"#)],
                Some(FailureKind::WrongFunction),
            ),
            (
                &[("geometry_area", r#"{"shape": "Square"}"#)],
                Some(FailureKind::BadArguments),
            ),
            (
                &[(
                    "geometry_area",
                    r#"{"shape": "Square", "size": 4, "colour": "red"}"#,
                )],
                Some(FailureKind::BadArguments),
            ),
            (
                &[("geometry_area", r#"{"shape": "Circle", "size": 4}"#)],
                Some(FailureKind::BadArguments),
            ),
            (
                &[("geometry_area", r#"{"shape": "Square", "size": "4"}"#)],
                Some(FailureKind::BadArguments),
            ),
            (
                &[(
                    "geometry_area",
                    r#"{"shape": "Square", "size": 4, "exact": 1}"#,
                )],
                Some(FailureKind::BadArguments),
            ),
            (
                &[(
                    "geometry_area",
                    r#"{"shape": "Square", "size": 4, "sides": [4.5, 4]}"#,
                )],
                Some(FailureKind::BadArguments),
            ),
            (
                &[(
                    "geometry_area",
                    r#"{"shape": "Square", "size": 4, "units": "m"}"#,
                )],
                Some(FailureKind::BadArguments),
            ),
            (
                &[("geometry_area", r#"["Square", 4]"#)],
                Some(FailureKind::InvalidOutput),
            ),
            (
                &[
                    ("geometry_area", r#"{"shape": "Square", "size": 4}"#),
                    ("geometry_area", r#"{"shape": "Square", "size": 4}"#),
                ],
                Some(FailureKind::WrongCount),
            ),
        ];
        for (calls, verdict) in rows {
            let calls: Vec<ToolCall> = calls.iter().map(|(n, a)| call(n, a)).collect();
            assert_eq!(
                score(&simple, &calls).err().map(|f| f.kind),
                *verdict,
                "{calls:?}"
            );
        }
    }

    #[test]
    fn parallel_calls_match_in_any_order_and_irrelevance_wants_none() {
        let answer = json!([
            {"geometry.volume": {"shape": ["cube"]}},
            {"geometry.volume": {"shape": ["sphere"]}}
        ]);
        let parallel = case(Category::Parallel, area(), Some(answer));
        let sphere = call("geometry_volume", r#"{"shape": "Sphere"}"#);
        let cube = call("geometry_volume", r#"{"shape": "cube"}"#);
        assert_eq!(score(&parallel, &[sphere.clone(), cube.clone()]), Ok(()));
        assert_eq!(score(&parallel, &[cube.clone(), sphere.clone()]), Ok(()));
        assert_eq!(
            score(&parallel, &[cube.clone(), cube.clone()])
                .err()
                .map(|f| f.kind),
            Some(FailureKind::BadArguments)
        );
        assert_eq!(
            score(&parallel, std::slice::from_ref(&cube))
                .err()
                .map(|f| f.kind),
            Some(FailureKind::WrongCount)
        );
        let irrelevant = case(Category::Irrelevance, area(), None);
        assert_eq!(score(&irrelevant, &[]), Ok(()));
        assert_eq!(
            score(&irrelevant, &[cube]).err().map(|f| f.kind),
            Some(FailureKind::UnexpectedCall)
        );
    }

    #[test]
    fn bfcl_docs_become_openai_tools() {
        let tool = to_openai_tool(&area()[0]);
        assert_eq!(tool["function"]["name"], "geometry_area");
        let parameters = &tool["function"]["parameters"];
        assert_eq!(parameters["type"], "object");
        assert_eq!(parameters["properties"]["size"]["type"], "number");
        assert!(parameters["properties"]["units"].get("optional").is_none());
        assert_eq!(
            parameters["properties"]["sides"]["items"]["type"],
            "integer"
        );
        assert!(jsonschema::draft202012::meta::validate(parameters).is_ok());
        assert_eq!(standardize("New York, NY"), "newyorkny");
        assert_eq!(standardize("it's"), "it\"s");
        assert_eq!(
            Category::of_file("BFCL_v4_simple_python.json"),
            Some(Category::Simple)
        );
        assert_eq!(Category::of_file("BFCL_v4_live_simple.json"), None);
    }
}
