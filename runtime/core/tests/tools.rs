//! The tool registry: built-in schema files, the schema-file loader, the
//! validation failure classes and their order, and the OpenAI wire format.

mod common;

use serde_json::{json, Value};
use stack_core::tools::{Builtin, Executor, Registry, ValidationError};
use stack_types::message::{Message, ToolCall};

#[test]
fn builtin_schema_files_equal_the_generated_schemas() {
    let bless = std::env::var_os("UPDATE_TOOL_SCHEMAS").is_some();
    let mut stale = Vec::new();
    for builtin in Builtin::ALL {
        let path = common::repo_root()
            .join("tools")
            .join(format!("{}.json", builtin.name()));
        let generated = builtin.schema_file();
        if bless {
            let text = serde_json::to_string_pretty(&generated).expect("serialize") + "\n";
            std::fs::write(&path, text).expect("write schema file");
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let on_disk: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if on_disk != generated {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "out of date with the Rust argument types: {stale:?}; run `UPDATE_TOOL_SCHEMAS=1 cargo test --release --test tools`"
    );
}

#[test]
fn the_shipped_tool_folder_loads_without_diagnostics() {
    let mut registry = Registry::with_builtins();
    let diagnostics = registry.load_dir(&common::repo_root().join("tools"));
    let text: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    assert!(text.is_empty(), "{text:#?}");
    for name in Builtin::names() {
        assert!(
            matches!(
                registry.get(name).map(|t| &t.spec().executor),
                Some(Executor::Builtin(_))
            ),
            "{name}"
        );
    }
}

/// Each broken fixture: file name, expected line, and a piece of the reason.
const BROKEN_FILES: &[(&str, Option<usize>, &str)] = &[
    (
        "bad_fake_builtin.json",
        Some(5),
        "`format_disk` is not a built-in tool",
    ),
    ("bad_missing_name.json", Some(5), "missing field `name`"),
    (
        "bad_missing_script.toml",
        Some(5),
        "script `ghost.js` not found",
    ),
    ("bad_name.json", Some(1), "invalid tool name `has space`"),
    ("bad_not_object.json", Some(5), "\"type\" is \"array\""),
    ("bad_schema.json", Some(5), "not a valid JSON Schema"),
    ("bad_syntax.json", Some(5), "trailing comma"),
    ("bad_syntax.toml", Some(2), "string"),
    ("bad_unknown_key.json", Some(4), "unknown field `paramters`"),
    (
        "bad_wasi_shape.json",
        Some(5),
        "a wasi executor takes either",
    ),
    (
        "word_count_again.json",
        Some(1),
        "a tool named `word_count` is already registered",
    ),
];

#[test]
fn broken_schema_files_are_reported_and_the_rest_still_load() {
    let mut registry = Registry::new();
    let diagnostics = registry.load_dir(&common::fixture("tools/mixed"));
    let mut loaded = registry.names();
    loaded.sort();
    assert_eq!(
        loaded,
        ["get_weather", "lookup_order", "to_upper", "word_count"]
    );

    let found: Vec<(String, Option<usize>, String)> = diagnostics
        .iter()
        .map(|d| {
            let file = d
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            (file, d.line, d.to_string())
        })
        .collect();
    assert_eq!(found.len(), BROKEN_FILES.len(), "{found:#?}");
    for ((file, line, text), (want_file, want_line, want_text)) in found.iter().zip(BROKEN_FILES) {
        assert_eq!(file, want_file);
        assert_eq!(line, want_line, "{text}");
        assert!(
            text.contains(want_text),
            "{file}: {text:?} lacks {want_text:?}"
        );
        assert!(
            text.starts_with(
                &common::fixture("tools/mixed")
                    .join(file)
                    .display()
                    .to_string()
            ),
            "{text}"
        );
    }
}

#[test]
fn both_file_shapes_yield_the_same_kind_of_tool() {
    let mut registry = Registry::new();
    registry.load_dir(&common::fixture("tools/mixed"));
    let weather = registry
        .get("get_weather")
        .expect("OpenAI-format JSON tool");
    assert!(matches!(weather.spec().executor, Executor::Unbound));
    assert_eq!(
        weather.spec().parameters["properties"]["unit"]["enum"],
        json!(["celsius", "fahrenheit"])
    );
    let order = registry
        .get("lookup_order")
        .expect("OpenAI-format TOML tool");
    assert_eq!(
        order.spec().parameters["properties"]["order_id"]["minimum"],
        json!(1)
    );
    let upper = registry.get("to_upper").expect("native TOML tool");
    match &upper.spec().executor {
        Executor::Wasi(stack_core::tools::WasiExecutor::Script { script, .. }) => {
            assert!(script.is_absolute() && script.ends_with("to_upper.py"));
        }
        other => panic!("unexpected executor {}", other.kind()),
    }
    match &registry
        .get("word_count")
        .expect("native JSON tool")
        .spec()
        .executor
    {
        Executor::Command(command) => assert!(command.argv[0].ends_with("/mixed/word_count.sh")),
        other => panic!("unexpected executor {}", other.kind()),
    }
    // A tool with a schema and no executor still validates its calls.
    let bad = ToolCall::function("1", "lookup_order", r#"{"order_id": 0}"#);
    assert!(matches!(
        registry.validate(&bad),
        Err(ValidationError::SchemaViolation { .. })
    ));
}

/// Validation cases: tool, raw arguments, error kind, and the field and rule
/// the error must name (`""` where the class has none).
const VALIDATION_CASES: &[(&str, &str, &str, &str, &str)] = &[
    ("launch_missiles", "{}", "unknown_tool", "", ""),
    ("read_fil", r#"{"path":"a"}"#, "unknown_tool", "", ""),
    (
        "read_file",
        r#"{"path": "a.txt""#,
        "malformed_arguments",
        "",
        "",
    ),
    ("read_file", "path=a.txt", "malformed_arguments", "", ""),
    (
        "read_file",
        r#"{"path":"a","path":"/etc/shadow"}"#,
        "malformed_arguments",
        "",
        "",
    ),
    (
        "read_file",
        r#"{"path": "a"} {"path": "b"}"#,
        "malformed_arguments",
        "",
        "",
    ),
    ("read_file", "{}", "schema_violation", "/path", "required"),
    (
        "read_file",
        r#"{"path": 7}"#,
        "schema_violation",
        "/path",
        "type",
    ),
    (
        "read_file",
        r#"{"path": ""}"#,
        "schema_violation",
        "/path",
        "minLength",
    ),
    (
        "read_file",
        r#"{"path": "a", "mode": "rw"}"#,
        "schema_violation",
        "/mode",
        "additionalProperties",
    ),
    (
        "read_file",
        r#"{"path": "a", "start_line": 0}"#,
        "schema_violation",
        "/start_line",
        "minimum",
    ),
    ("read_file", r#"["a.txt"]"#, "schema_violation", "", "type"),
    (
        "execute_code",
        r#"{"code": "1", "language": "ruby"}"#,
        "schema_violation",
        "/language",
        "enum",
    ),
    (
        "execute_code",
        r#"{"language": "python"}"#,
        "schema_violation",
        "/code",
        "required",
    ),
    (
        "search_files",
        r#"{"pattern": "x", "max_results": 100000}"#,
        "schema_violation",
        "/max_results",
        "maximum",
    ),
];

#[test]
fn each_validation_failure_class_names_the_field_and_rule() {
    let registry = Registry::with_builtins();
    for (tool, args, kind, field, rule) in VALIDATION_CASES {
        let call = ToolCall::function("c", *tool, *args);
        let err = registry.validate(&call).expect_err(args);
        assert_eq!(err.kind(), *kind, "{tool} {args}: {err}");
        let text = err.to_string();
        assert!(text.contains(tool) || *kind == "unknown_tool", "{text}");
        if let ValidationError::SchemaViolation { violations, .. } = &err {
            assert!(
                violations
                    .iter()
                    .any(|v| v.field == *field && v.rule == *rule),
                "{tool} {args}: {violations:#?}"
            );
            assert!(text.contains(&format!("(rule: {rule})")), "{text}");
        }
    }
}

#[test]
fn error_texts_tell_the_model_how_to_fix_the_call() {
    let registry = Registry::with_builtins();
    let unknown = registry
        .validate(&ToolCall::function("c", "read_fil", "{}"))
        .expect_err("unknown");
    assert!(
        unknown.to_string().contains("Did you mean `read_file`?"),
        "{unknown}"
    );
    assert!(unknown.to_string().contains("write_file"), "{unknown}");

    let malformed = registry
        .validate(&ToolCall::function(
            "c",
            "read_file",
            "{\"path\": \"a\",\n \"x\" 1}",
        ))
        .expect_err("malformed");
    match &malformed {
        ValidationError::MalformedArguments { line, column, .. } => {
            assert_eq!((*line, *column), (2, 6))
        }
        other => panic!("{other:?}"),
    }

    let enum_err = registry
        .validate(&ToolCall::function(
            "c",
            "execute_code",
            r#"{"code":"1","language":"ruby"}"#,
        ))
        .expect_err("enum");
    let text = enum_err.to_string();
    assert!(
        text.contains("`/language`") && text.contains("\"python\""),
        "{text}"
    );

    let missing = registry
        .validate(&ToolCall::function("c", "write_file", r#"{"path":"a"}"#))
        .expect_err("required");
    assert!(
        missing
            .to_string()
            .contains("required property `content` is missing"),
        "{missing}"
    );
    let structured = serde_json::to_value(&missing).expect("serialize");
    assert_eq!(structured["kind"], "schema_violation");
    assert_eq!(structured["violations"][0]["field"], "/content");
}

#[test]
fn oversized_payloads_are_rejected_after_the_other_checks() {
    let mut registry = Registry::with_builtins();
    registry.set_max_argument_bytes(64);
    let big = format!(r#"{{"path": "a.txt", "content": "{}"}}"#, "x".repeat(100));
    let err = registry
        .validate(&ToolCall::function("c", "write_file", &big))
        .expect_err("too big");
    assert!(
        matches!(err, ValidationError::PayloadTooLarge { size, limit: 64, .. } if size == big.len())
    );
    assert!(err.to_string().contains("over the limit of 64 bytes"));

    // Order: unknown tool, then malformed JSON, then schema, then size.
    let garbage = "x".repeat(100);
    let order = [
        ("nope", garbage.as_str(), "unknown_tool"),
        ("write_file", garbage.as_str(), "malformed_arguments"),
        (
            "write_file",
            &big.replace("content", "contents"),
            "schema_violation",
        ),
    ];
    for (tool, args, kind) in order {
        let err = registry
            .validate(&ToolCall::function("c", tool, args))
            .expect_err(kind);
        assert_eq!(err.kind(), kind);
    }
    let fits = registry.validate(&ToolCall::function(
        "c",
        "write_file",
        r#"{"path":"a","content":"b"}"#,
    ));
    assert!(fits.is_ok());
}

#[test]
fn empty_arguments_mean_an_empty_object() {
    let registry = Registry::with_builtins();
    let call = registry
        .validate(&ToolCall::function("c", "list_dir", "  "))
        .expect("valid");
    assert_eq!(call.arguments(), &json!({}));
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[test]
fn host_tools_get_their_schema_from_the_rust_type() {
    let mut registry = Registry::new();
    registry
        .register_host_tool("add", "Add two integers.", |args: AddArgs, _ctx| {
            Ok((args.a + args.b).to_string())
        })
        .expect("register");
    let schema = &registry.get("add").expect("registered").spec().parameters;
    assert_eq!(schema["required"], json!(["a", "b"]));
    let err = registry
        .validate(&ToolCall::function("c", "add", r#"{"a": 1, "b": "2"}"#))
        .expect_err("type");
    assert!(err.to_string().contains("`/b`"), "{err}");
    let dup = registry.register_host_tool("add", "again", |_: AddArgs, _| Ok(String::new()));
    assert!(dup.is_err());
}

#[test]
fn messages_round_trip_the_openai_wire_format_exactly() {
    let text =
        std::fs::read_to_string(common::fixture("messages/conversation.json")).expect("fixture");
    let original: Value = serde_json::from_str(&text).expect("json");
    let messages: Vec<Message> = serde_json::from_value(original.clone()).expect("parse messages");
    assert_eq!(messages.len(), 8);
    assert_eq!(
        serde_json::to_value(&messages).expect("serialize"),
        original
    );
    let calls = messages[2].tool_calls.as_ref().expect("tool calls");
    assert_eq!(calls[1].function.name, "list_dir");
    assert_eq!(messages[3].tool_call_id.as_deref(), Some("call_abc123"));
    assert_eq!(messages[6].text(), "Thanks!");

    let jsonl = std::fs::read_to_string(common::fixture("messages/stack29_example.jsonl"))
        .expect("fixture");
    for line in jsonl.lines() {
        let record: Value = serde_json::from_str(line).expect("json");
        let messages: Vec<Message> =
            serde_json::from_value(record["messages"].clone()).expect("parse");
        assert_eq!(
            serde_json::to_value(&messages).expect("serialize"),
            record["messages"]
        );
    }
}

#[test]
fn constructed_messages_serialize_like_openai() {
    let call = ToolCall::function("call_1", "read_file", r#"{"path":"a"}"#);
    let assistant = Message::assistant_tool_calls(None, vec![call]);
    assert_eq!(
        serde_json::to_value(&assistant).expect("serialize"),
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}}
        ]})
    );
    assert_eq!(
        serde_json::to_value(Message::tool_result("call_1", "hi")).expect("serialize"),
        json!({"role": "tool", "content": "hi", "tool_call_id": "call_1"})
    );
    let bad_role = serde_json::from_value::<Message>(json!({"role": "robot", "content": "x"}));
    assert!(bad_role.is_err());
}
