//! The model backend: prompt fixtures (rendered independently by Python's
//! jinja2, see scripts/gen_prompt_fixtures.py), and the real SmolLM2 model
//! through llama.cpp: loading, stopping, grammar-constrained tool calls,
//! KV-cache reuse and corrupt files.

mod common;

use std::sync::{Arc, OnceLock};

use serde_json::Value;
use stack_runtime::grounding::{NEW_PATH_PATTERN, PROGRAM_PATTERN};
use stack_runtime::message::{Message, ToolCall};
use stack_runtime::model::call_grammar::CallCount;
use stack_runtime::model::llama::format_grammar;
use stack_runtime::model::llama::{
    GrammarCheck, Model, ModelError, ModelOptions, ModelSession, Routing, SamplingOptions,
    StopReason,
};
use stack_runtime::model::Generation;
use stack_runtime::model::{ArgumentValues, PromptRenderer, ToolChoice, ToolFormat};
use stack_runtime::tools::Registry;

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(common::fixture(name)).expect(name)
}

fn conversation() -> Value {
    serde_json::from_str(&fixture_text("prompts/conversation.json")).expect("json")
}

fn messages(key: &str) -> Vec<Message> {
    serde_json::from_value(conversation()[key].clone()).expect("messages")
}

/// (template, default system, conversation, with tools, expected prompt)
const PROMPT_CASES: &[(&str, &str, &str, bool, &str)] = &[
    (
        "templates/smollm2.jinja",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "plain",
        false,
        "prompts/smollm2_plain.txt",
    ),
    (
        "templates/smollm2.jinja",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "with_tools",
        true,
        "prompts/smollm2_tools.txt",
    ),
    (
        "templates/qwen2.5.jinja",
        "unused",
        "plain",
        false,
        "prompts/qwen25_plain.txt",
    ),
    (
        "templates/qwen2.5.jinja",
        "unused",
        "with_tools",
        true,
        "prompts/qwen25_tools.txt",
    ),
];

#[test]
fn prompts_render_exactly_like_the_reference_fixtures() {
    let tools: Vec<Value> = conversation()["tools"].as_array().expect("tools").clone();
    for (template, default_system, key, with_tools, expected) in PROMPT_CASES {
        let renderer =
            PromptRenderer::new(&fixture_text(template), default_system).expect("template");
        let offered: &[Value] = if *with_tools { &tools } else { &[] };
        let prompt = renderer.render(&messages(key), offered).expect("render");
        assert_eq!(prompt, fixture_text(expected), "{template} / {key}");
    }
    let smol =
        PromptRenderer::new(&fixture_text("templates/smollm2.jinja"), "x").expect("template");
    assert!(
        !smol.own_template_supports_tools(),
        "SmolLM2's template has no tool support: the fallback renders tools"
    );
}

#[test]
fn template_errors_are_reported() {
    assert!(PromptRenderer::new("{% for %}", "x").is_err());
    let raising =
        PromptRenderer::new("{{ raise_exception('roles must alternate') }}", "x").expect("parses");
    let err = raising.render(&messages("plain"), &[]).expect_err("raises");
    assert!(err.to_string().contains("roles must alternate"), "{err}");
}

/// Held by each test that loads a model of its own: one of them counts
/// the default model's file mappings in this process, which another
/// test's load or drop would change under it.
fn own_model_lock() -> std::sync::MutexGuard<'static, ()> {
    static OWN_MODEL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    OWN_MODEL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Model::load(ModelOptions {
                context_size: 4096,
                threads: Some(2),
                ..ModelOptions::default()
            })
            .expect("the default model loads (run scripts/setup first)")
        })
        .clone()
}

fn greedy(max_tokens: u32) -> SamplingOptions {
    SamplingOptions {
        temperature: 0.0,
        max_tokens,
        ..SamplingOptions::default()
    }
}

/// One turn on `session`, with no response format, no streaming and
/// fresh call ids.
fn complete(
    session: &mut ModelSession,
    messages: &[Message],
    tools: &[Value],
    choice: &ToolChoice,
    sampling: &SamplingOptions,
) -> Result<Generation, ModelError> {
    session.complete(
        messages,
        tools,
        choice,
        sampling,
        None,
        &mut |_| true,
        &mut ids(),
    )
}

fn ids() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("call_{n}")
    }
}

#[test]
fn the_default_model_loads_generates_and_stops_at_end_of_turn() {
    let model = model();
    assert!(
        model.info().name.to_lowercase().contains("smollm2"),
        "{:?}",
        model.info()
    );
    assert_eq!(model.info().architecture, "llama");
    let mut session = model.session().expect("session");
    let mut streamed = String::new();
    let conversation = vec![Message::user("Say hello in one short sentence.")];
    let generation = session
        .complete(
            &conversation,
            &[],
            &ToolChoice::None,
            &greedy(128),
            None,
            &mut |piece| {
                streamed.push_str(piece);
                true
            },
            &mut ids(),
        )
        .expect("generate");
    assert_eq!(
        generation.stop,
        StopReason::EndOfTurn,
        "{:?}",
        generation.text
    );
    assert!(!generation.text.trim().is_empty());
    assert_eq!(streamed, generation.text, "every token was streamed");
    assert!(!generation.text.contains("<|im_end|>"));
    // Cancelling from the token callback stops generation.
    let mut count = 0;
    let cancelled = session
        .complete(
            &conversation,
            &[],
            &ToolChoice::None,
            &greedy(128),
            None,
            &mut |_| {
                count += 1;
                count < 3
            },
            &mut ids(),
        )
        .expect("generate");
    assert_eq!(cancelled.stop, StopReason::Cancelled);
}

/// Prompts per built-in tool; each must yield a call that passes validation.
const TOOL_PROMPTS: &[(&str, &str)] = &[
    ("read_file", "Show me what is in notes.txt"),
    ("read_file", "Open the README and read the first ten lines."),
    ("read_file", "What does config/settings.toml contain?"),
    ("read_file", "Print src/main.rs for me"),
    ("write_file", "Save the text 'hello world' to greeting.txt"),
    (
        "write_file",
        "Create a file todo.md with a list of three chores.",
    ),
    ("write_file", "Append 'done' to log.txt"),
    (
        "write_file",
        "Write a Python script that prints the date to date.py",
    ),
    ("list_dir", "What files are in this folder?"),
    ("list_dir", "List the contents of the src directory."),
    ("list_dir", "Show me everything under tests/"),
    ("list_dir", "Is there a docs folder? List the root."),
    ("search_files", "Find every TODO comment in the project."),
    ("search_files", "Where is the function parse_args defined?"),
    (
        "search_files",
        "Search for the word password in the config files.",
    ),
    ("search_files", "Which files mention 'tokio'?"),
    ("execute_code", "Compute 17 * 23 with Python."),
    (
        "execute_code",
        "Run a bash command that prints the current directory.",
    ),
    (
        "execute_code",
        "Use JavaScript to reverse the string 'stack'.",
    ),
    (
        "execute_code",
        "Calculate the first 10 Fibonacci numbers in Python.",
    ),
    ("*", "Read notes.txt please."),
    ("*", "What is 2 to the power of 20? Use code."),
];

#[test]
fn required_tool_calls_always_pass_schema_validation() {
    let model = model();
    let registry = Registry::with_builtins();
    let tools = registry.openai_tools();
    let mut session = model.session().expect("session");
    let mut next_id = ids();
    let mut failures = Vec::new();
    let mut open_at_limit = Vec::new();
    for (tool, prompt) in TOOL_PROMPTS {
        let choice = if *tool == "*" {
            ToolChoice::Required
        } else {
            ToolChoice::Named(tool.to_string())
        };
        let conversation = vec![Message::user(*prompt)];
        let sampling = SamplingOptions {
            max_tokens: 400,
            ..SamplingOptions::default()
        };
        let generation = session
            .complete(
                &conversation,
                &tools,
                &choice,
                &sampling,
                None,
                &mut |_| true,
                &mut next_id,
            )
            .expect("generate");
        let calls = &generation.turn.tool_calls;
        if calls.is_empty() {
            // The grammar held to the end, but the token limit came first:
            // a call still open (on some CPUs' numerics the greedy path of
            // this 135M model loops inside a path string). Counted, not
            // failed, up to `OPEN_AT_LIMIT`; anything else is a failure.
            let open_call = generation.stop == StopReason::MaxTokens
                && generation.text.trim_start().starts_with("<tool_call>");
            if open_call {
                open_at_limit.push(*prompt);
            } else {
                failures.push(format!(
                    "{prompt}: expected a call, got {:?}",
                    generation.text
                ));
            }
            continue;
        }
        for call in calls {
            if *tool != "*" && call.function.name != *tool {
                failures.push(format!(
                    "{prompt}: called {} instead of {tool}",
                    call.function.name
                ));
            }
            if let Err(err) = registry.validate(call) {
                failures.push(format!("{prompt}: {err}\n  {:?}", generation.text));
            }
        }
    }
    /// How many prompts may end at the token limit inside their call.
    const OPEN_AT_LIMIT: usize = 2;
    assert!(
        open_at_limit.len() <= OPEN_AT_LIMIT,
        "{} of {} prompts ran to the token limit inside their call: {open_at_limit:?}",
        open_at_limit.len(),
        TOOL_PROMPTS.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} prompts failed:\n{}",
        failures.len(),
        TOOL_PROMPTS.len(),
        failures.join("\n")
    );
}

/// A completion whose caller gives up while its prompt is evaluated stops
/// between chunks of the prompt, before any token: a client gone during a
/// long prompt does not hold the model until it ends. What was evaluated
/// stays cached for the next completion.
#[test]
fn a_cancel_during_a_long_prompt_stops_it_before_the_first_token() {
    let model = model();
    let mut session = model.session().expect("session");
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(true));
    session.set_cancel(Some(Arc::clone(&cancel)));
    // About 3,000 tokens: several 512-token chunks, seconds on two cores.
    let long = vec![Message::user(format!(
        "{}\nWhat is this text about?",
        "The lighthouse keeper climbed the stairs and lit the lamp. ".repeat(250)
    ))];
    let rendered = model.renderer().render(&long, &[]).expect("render");
    let prompt_tokens = model
        .raw()
        .vocab()
        .tokenize(
            rendered.as_bytes(),
            model.raw().vocab().should_add_bos(),
            true,
        )
        .len() as u64;
    assert!(prompt_tokens > 2000, "{prompt_tokens}");
    // Cancelled before it starts: nothing evaluated, nothing generated.
    let before = complete(&mut session, &long, &[], &ToolChoice::None, &greedy(8)).expect("ok");
    assert_eq!(before.stop, StopReason::Cancelled);
    assert_eq!(before.counters.prompt_evaluated, 0, "{:?}", before.counters);
    assert_eq!(before.counters.generated, 0);
    assert!(before.text.is_empty());
    // Cancelled while the prompt is evaluated.
    cancel.store(false, std::sync::atomic::Ordering::SeqCst);
    let setter = {
        let cancel = Arc::clone(&cancel);
        std::thread::spawn(move || {
            // Soon enough for a GPU too: 3,000 tokens are six chunks.
            std::thread::sleep(std::time::Duration::from_millis(5));
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let during = complete(&mut session, &long, &[], &ToolChoice::None, &greedy(8)).expect("ok");
    setter.join().expect("setter");
    assert_eq!(during.stop, StopReason::Cancelled);
    assert_eq!(during.counters.generated, 0);
    assert!(
        during.counters.prompt_evaluated < prompt_tokens,
        "stopped part way: {:?} of {prompt_tokens}",
        during.counters
    );
    // The session goes on, from what was evaluated.
    cancel.store(false, std::sync::atomic::Ordering::SeqCst);
    let after = complete(&mut session, &long, &[], &ToolChoice::None, &greedy(8)).expect("ok");
    assert_ne!(after.stop, StopReason::Cancelled);
    assert!(after.counters.generated > 0);
    assert!(
        after.counters.prompt_reused >= during.counters.prompt_evaluated,
        "{:?} after {:?}",
        after.counters,
        during.counters
    );
}

/// OpenAI's frequency and presence penalties reach the sampler: greedy
/// text that repeats a word is written otherwise under them.
#[test]
fn frequency_and_presence_penalties_change_what_a_repeating_answer_writes() {
    let model = model();
    let ask = [Message::user("Write the word cat ten times.")];
    let plain = greedy(24);
    let penalised = SamplingOptions {
        frequency_penalty: 1.5,
        presence_penalty: 1.5,
        ..greedy(24)
    };
    let mut texts = Vec::new();
    for sampling in [&plain, &penalised, &plain] {
        let mut session = model.session().expect("session");
        let generation =
            complete(&mut session, &ask, &[], &ToolChoice::None, sampling).expect("answer");
        texts.push(generation.text);
    }
    assert_eq!(texts[0], texts[2], "greedy is repeatable");
    assert!(
        texts[0].matches("cat").count() >= 3,
        "the plain answer repeats the word: {:?}",
        texts[0]
    );
    assert_ne!(texts[0], texts[1], "the penalties changed nothing");
}

#[test]
fn a_second_turn_evaluates_only_the_new_tokens() {
    let model = model();
    let mut session = model.session().expect("session");
    let mut conversation = vec![
        Message::system("You are terse."),
        Message::user("Name a colour."),
    ];
    let first = complete(
        &mut session,
        &conversation,
        &[],
        &ToolChoice::None,
        &greedy(16),
    )
    .expect("turn 1");
    assert_eq!(first.counters.prompt_reused, 0);
    let first_prompt = first.counters.prompt_evaluated;
    conversation.push(Message::assistant(first.text.clone()));
    conversation.push(Message::user("Another one."));
    let second = complete(
        &mut session,
        &conversation,
        &[],
        &ToolChoice::None,
        &greedy(16),
    )
    .expect("turn 2");
    let renderer_prompt = model.renderer().render(&conversation, &[]).expect("render");
    let total = model
        .raw()
        .vocab()
        .tokenize(
            renderer_prompt.as_bytes(),
            model.raw().vocab().should_add_bos(),
            true,
        )
        .len() as u64;
    assert_eq!(
        second.counters.prompt_reused + second.counters.prompt_evaluated,
        total
    );
    assert!(
        second.counters.prompt_reused >= first_prompt,
        "reused {} of the first turn's {first_prompt} prompt tokens",
        second.counters.prompt_reused
    );
    assert!(
        second.counters.prompt_evaluated < 20,
        "evaluated {} tokens; only the new turn should be",
        second.counters.prompt_evaluated
    );
    // After clearing, everything is evaluated again.
    session.clear_cache();
    let third = complete(
        &mut session,
        &conversation,
        &[],
        &ToolChoice::None,
        &greedy(4),
    )
    .expect("turn 3");
    assert_eq!(
        (
            third.counters.prompt_reused,
            third.counters.prompt_evaluated
        ),
        (0, total)
    );
}

/// A session whose first step names a tool and whose next step offers them
/// all (the agent loop under `--tool-choice NAME`) keeps its KV prefix: the
/// prompt lists every tool either way, and only the grammar narrows.
#[test]
fn a_named_step_and_an_open_step_share_the_prompt_prefix() {
    let model = model();
    let tools = Registry::with_builtins().openai_tools();
    let mut session = model.session().expect("session");
    let mut conversation = vec![Message::user("What files are in this folder?")];
    let first = complete(
        &mut session,
        &conversation,
        &tools,
        &ToolChoice::Named("list_dir".into()),
        &greedy(64),
    )
    .expect("named step");
    let call = first
        .turn
        .tool_calls
        .first()
        .cloned()
        .expect("a list_dir call");
    assert_eq!(call.function.name, "list_dir");
    let call_id = call.id.clone();
    conversation.push(Message::assistant_tool_calls(None, vec![call]));
    conversation.push(Message::tool_result(call_id, "notes.txt"));
    let second = complete(
        &mut session,
        &conversation,
        &tools,
        &ToolChoice::Auto,
        &greedy(8),
    )
    .expect("open step");
    assert!(
        second.counters.prompt_reused >= first.counters.prompt_evaluated,
        "the open step reused {} tokens; the named step's prompt alone was {}",
        second.counters.prompt_reused,
        first.counters.prompt_evaluated
    );
}

/// #15: under constrained routing the default model calls where a tool
/// fits, the tool that fits, and answers without a call where none does
/// (a small model's own yes/no said yes to everything); the routing
/// step's prompts run beside the conversation, whose KV cache stays.
#[test]
fn constrained_routing_calls_where_a_tool_fits_and_keeps_the_cache() {
    let model = model();
    let tools = triangle_and_weather_tools();
    let routed = SamplingOptions {
        routing: Routing::Constrained,
        ..greedy(48)
    };
    let mut session = model.session().expect("session");
    for (prompt, expected) in [
        (
            "Find the area of a triangle with a base of 10 units and height of 5 units.",
            Some("calculate_triangle_area"),
        ),
        ("Get the weather for Berlin.", Some("get_weather")),
        ("What is the common ancestor of lion and zebra?", None),
        ("Can you recommend a good movie to watch?", None),
    ] {
        session.clear_cache();
        let generation = complete(
            &mut session,
            &[Message::user(prompt)],
            &tools,
            &ToolChoice::Auto,
            &routed,
        )
        .unwrap_or_else(|err| panic!("{prompt}: {err}"));
        let called: Vec<&str> = generation
            .turn
            .tool_calls
            .iter()
            .map(|call| call.function.name.as_str())
            .collect();
        assert_eq!(
            called,
            Vec::from_iter(expected),
            "{prompt}: {:?}",
            generation.text
        );
    }
    // The routing step keeps the conversation's cache (which starts empty
    // here, so the named turn's prompt is all evaluated).
    session.clear_cache();
    let (named, _) = routed_turn_keeping_the_cache(&mut session, &tools, &routed);
    assert_eq!(named.counters.prompt_reused, 0, "{:?}", named.counters);
}

/// Under `Routing::Auto` the default model (135M parameters) takes the
/// routing step in a session of its own, and calls; in a slot of a batched
/// context (`--parallel`, as `agent serve` runs) too, its prompts in the
/// engine's sequence aside: two sessions routing at once both call (the
/// aside is lent to one at a time), and the slot's cache stays (a routed
/// turn after a named one reuses the named turn's whole prompt).
#[test]
fn auto_routing_constrains_a_small_models_sessions_own_or_batched() {
    let _own = own_model_lock();
    let tools = triangle_and_weather_tools();
    let prompt = [Message::user(
        "Find the area of a triangle with a base of 10 units and height of 5 units.",
    )];
    let auto = SamplingOptions {
        routing: Routing::Auto,
        ..greedy(48)
    };
    let called = |generation: &Generation| -> Vec<String> {
        generation
            .turn
            .tool_calls
            .iter()
            .map(|call| call.function.name.clone())
            .collect()
    };
    let own = complete(
        &mut model().session().expect("session"),
        &prompt,
        &tools,
        &ToolChoice::Auto,
        &auto,
    )
    .expect("own session");
    assert_eq!(called(&own), ["calculate_triangle_area"], "{:?}", own.text);
    let batched = Model::load(ModelOptions {
        context_size: 1024,
        threads: Some(2),
        parallel: 2,
        ..ModelOptions::default()
    })
    .expect("a batched model");
    // Both sessions route at once (the barrier lines them up), so one
    // is likely to wait for the sequence aside while the other holds it.
    let start = std::sync::Barrier::new(2);
    let together: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = [
            "Find the area of a triangle with a base of 10 units and height of 5 units.",
            "Get the weather for Berlin.",
        ]
        .into_iter()
        .map(|text| {
            let batched = &batched;
            let tools = &tools;
            let auto = &auto;
            let start = &start;
            scope.spawn(move || {
                let mut session = batched.session().expect("session");
                start.wait();
                let generation = complete(
                    &mut session,
                    &[Message::user(text)],
                    tools,
                    &ToolChoice::Auto,
                    auto,
                )
                .unwrap_or_else(|err| panic!("{text}: {err}"));
                (text, generation)
            })
        })
        .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a session thread"))
            .collect()
    });
    assert_eq!(
        called(&together[0].1),
        ["calculate_triangle_area"],
        "{:?}",
        together[0]
    );
    assert_eq!(called(&together[1].1), ["get_weather"], "{:?}", together[1]);
    // The step keeps the slot's cache.
    let mut session = batched.session().expect("session");
    let (_, routed) = routed_turn_keeping_the_cache(&mut session, &tools, &auto);
    assert_eq!(
        called(&routed),
        ["calculate_triangle_area"],
        "{:?}",
        routed.text
    );
}

/// The call-format fixtures: tools, and model output in each syntax.
fn format_fixtures() -> Value {
    serde_json::from_str(&fixture_text("formats/outputs.json")).expect("fixture json")
}

/// `write_file`'s path, grounded in the new-path shape, is one inside the
/// workspace: llama.cpp's converter reads the pattern (it does not fall
/// back to any string), and the grammar refuses what leaves the root, and
/// the characters and spellings the shape leaves out.
#[test]
fn a_new_files_path_is_grounded_inside_the_workspace() {
    let model = model();
    let tools = Registry::with_builtins().openai_tools();
    let mut values = ArgumentValues::none();
    values.set_pattern("write_file", "path", NEW_PATH_PATTERN);
    let grammar =
        format_grammar(ToolFormat::Hermes, &tools, &values, CallCount::One).expect("grammar");
    let free = format_grammar(
        ToolFormat::Hermes,
        &tools,
        &ArgumentValues::none(),
        CallCount::One,
    )
    .expect("grammar");
    let call = |path: &str| {
        let arguments = serde_json::json!({"path": path, "content": "Hello"});
        format!(
            "<tool_call>\n{}\n</tool_call>",
            serde_json::json!({"name": "write_file", "arguments": arguments})
        )
    };
    for path in ["greeting.txt", "docs/intro.md", ".env", "say \"hi\".txt"] {
        assert!(
            model
                .grammar_accepts(&grammar.gbnf, None, &call(path))
                .expect("grammar loads"),
            "refused {path:?}"
        );
    }
    for path in [
        "/greeting.txt",
        "../up.txt",
        "a/../b.txt",
        "./a.txt",
        "a//b",
        // A C1 control (CSI), which JSON carries unescaped (llama.cpp's
        // strings already refuse DEL).
        "a\u{9b}31m.txt",
    ] {
        assert!(
            model
                .grammar_accepts(&free.gbnf, None, &call(path))
                .expect("grammar loads"),
            "the schema alone admits {path:?}"
        );
        assert!(
            !model
                .grammar_accepts(&grammar.gbnf, None, &call(path))
                .expect("grammar loads"),
            "admitted {path:?}"
        );
    }
    // A spelling JSON allows that the shape leaves out (`\u0041` for
    // `A`): the plain spelling names the same file. (llama.cpp's strings
    // already refuse `\/`.)
    let text = r#"<tool_call>
{"name": "write_file", "arguments": {"path": "\u0041.txt", "content": "Hello"}}
</tool_call>"#;
    assert!(
        model
            .grammar_accepts(&free.gbnf, None, text)
            .expect("grammar loads"),
        "the schema alone admits {text:?}"
    );
    assert!(
        !model
            .grammar_accepts(&grammar.gbnf, None, text)
            .expect("grammar loads"),
        "admitted {text:?}"
    );
}

/// `execute_code`'s code, grounded in the program shape, never ends open:
/// llama.cpp's converter reads the pattern, and the grammar refuses code
/// cut short where a bare quote ends it (`print("` is `print(` to JSON),
/// which the schema alone admits. Code that ends closed passes, whatever
/// it holds: escaped quotes, single quotes, an open end with a newline
/// after it.
#[test]
fn code_is_grounded_so_it_never_ends_open() {
    let model = model();
    let tools = Registry::with_builtins().openai_tools();
    let mut values = ArgumentValues::none();
    values.set_pattern("execute_code", "code", PROGRAM_PATTERN);
    let grammar =
        format_grammar(ToolFormat::Hermes, &tools, &values, CallCount::One).expect("grammar");
    let free = format_grammar(
        ToolFormat::Hermes,
        &tools,
        &ArgumentValues::none(),
        CallCount::One,
    )
    .expect("grammar");
    let call = |code: &str| {
        let arguments = serde_json::json!({"language": "python", "code": code});
        format!(
            "<tool_call>\n{}\n</tool_call>",
            serde_json::json!({"name": "execute_code", "arguments": arguments})
        )
    };
    for code in [
        "print('STACK')",
        "print(\"STACK\")",
        "print(\n",
        "print('caf\u{e9}')\n",
    ] {
        assert!(
            model
                .grammar_accepts(&grammar.gbnf, None, &call(code))
                .expect("grammar loads"),
            "refused {code:?}"
        );
    }
    for code in ["print(", "[{ ", "echo ", "x =", "f(a,"] {
        assert!(
            model
                .grammar_accepts(&free.gbnf, None, &call(code))
                .expect("grammar loads"),
            "the schema alone admits {code:?}"
        );
        assert!(
            !model
                .grammar_accepts(&grammar.gbnf, None, &call(code))
                .expect("grammar loads"),
            "admitted {code:?}"
        );
    }
}

/// Every call format's grammar, on the real model's tokens: it accepts the
/// format's fixture output from its trigger on, it refuses a call to a tool
/// that is not offered, and the model writes calls under it that parse back
/// into calls to the offered tools with schema-valid arguments.
#[test]
fn every_call_format_has_a_grammar_that_accepts_its_output() {
    let model = model();
    let fixtures = format_fixtures();
    let tools = fixtures["tools"].as_array().expect("tools").clone();
    let mut failures = Vec::new();
    let mut formats = Vec::new();
    for case in fixtures["cases"].as_array().expect("cases") {
        let format: ToolFormat = serde_json::from_value(case["format"].clone()).expect("format");
        let output = case["output"].as_str().expect("output");
        let grammar = format_grammar(format, &tools, &ArgumentValues::none(), CallCount::Many)
            .expect("grammar");
        let Some(start) = grammar.trigger.find(output) else {
            failures.push(format!(
                "{format:?}: the trigger is not found in {output:?}"
            ));
            continue;
        };
        // The text after the call (the pythonic reply) is not the grammar's.
        let after = case["content"].as_str().unwrap_or_default();
        let reply = output.strip_suffix(after).unwrap_or(output);
        let call = &reply[start..];
        if !model
            .grammar_accepts(&grammar.gbnf, None, call)
            .expect("grammar loads")
        {
            failures.push(format!("{format:?}: refused {call:?}"));
        }
        // Lazily, as under `auto`: llama.cpp finds the call's start by the
        // trigger's own patterns, in the whole reply.
        if !model
            .grammar_accepts(&grammar.gbnf, Some(&grammar.trigger), reply)
            .expect("grammar loads")
        {
            failures.push(format!("{format:?}: refused lazily {reply:?}"));
        }
        // ... and it did apply: past the call, prose is refused.
        let more = format!("{reply} and more");
        if model
            .grammar_accepts(&grammar.gbnf, Some(&grammar.trigger), &more)
            .expect("grammar loads")
        {
            failures.push(format!("{format:?}: the lazy grammar never applied"));
        }
        let (real, fake) = if call.contains("get_weather") {
            ("get_weather", "get_wether")
        } else {
            ("lookup_zip", "lookup_zap")
        };
        let unknown = call.replacen(real, fake, 1);
        if model
            .grammar_accepts(&grammar.gbnf, None, &unknown)
            .expect("grammar loads")
        {
            failures.push(format!("{format:?}: accepted {unknown:?}"));
        }
        if !formats.contains(&format) {
            formats.push(format);
        }
    }
    assert_eq!(
        formats.len(),
        ToolFormat::ALL.len(),
        "a fixture for every format"
    );
    // Text never holds its own closing tag.
    for (format, call) in [
        (
            ToolFormat::Qwen3CoderXml,
            "<tool_call>\n<function=lookup_zip>\n<parameter=zip>\na</parameter>b\n</parameter>\n</function>\n</tool_call>",
        ),
        (
            ToolFormat::FunctionGemma,
            "<start_function_call>call:lookup_zip{zip:<escape>a<<escape>b<escape>}<end_function_call>",
        ),
    ] {
        let grammar = format_grammar(format, &tools, &ArgumentValues::none(), CallCount::Many)
            .expect("grammar");
        if model
            .grammar_accepts(&grammar.gbnf, None, call)
            .expect("grammar loads")
        {
            failures.push(format!("{format:?}: accepted {call:?}"));
        }
    }
    // The model writes each syntax under its grammar.
    let schema = |name: &str| {
        tools
            .iter()
            .find(|t| t["function"]["name"] == name)
            .map(|t| t["function"]["parameters"].clone())
    };
    // The city is grounded, as the agent grounds paths: the 135M model,
    // free to write any text in a foreign syntax, writes on and on.
    let mut cities = ArgumentValues::none();
    cities.set("get_weather", "city", vec!["Paris".into(), "Oslo".into()]);
    let mut session = model.session().expect("session");
    for format in formats {
        let grammar = format_grammar(format, &tools, &cities, CallCount::One).expect("grammar");
        let prompt = model
            .renderer()
            .render(&[Message::user("What is the weather in Paris?")], &tools)
            .expect("prompt");
        let generation = session
            .generate(
                &prompt,
                Some((&grammar.gbnf, None)),
                &greedy(300),
                &mut |_| true,
            )
            .expect("generate");
        let turn = stack_runtime::model::parse_tool_calls_for(&generation.text, &tools, &mut ids());
        if turn.tool_calls.is_empty() || generation.stop != StopReason::EndOfTurn {
            failures.push(format!(
                "{format:?}: no call parsed ({:?}) from {:?}",
                generation.stop, generation.text
            ));
        }
        for call in &turn.tool_calls {
            let arguments: Value =
                serde_json::from_str(&call.function.arguments).unwrap_or(Value::Null);
            let valid = schema(&call.function.name).is_some_and(|schema| {
                jsonschema::validator_for(&schema).is_ok_and(|v| v.is_valid(&arguments))
            });
            if !valid {
                failures.push(format!(
                    "{format:?}: invalid call {} {arguments} from {:?}",
                    call.function.name, generation.text
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The round trip through each format's template: the format is detected
/// from the template, an assistant turn with calls renders in its syntax,
/// the rendered calls parse back into the same calls, and the format's
/// lazy grammar accepts them on the model's tokens.
#[test]
fn every_call_format_round_trips_through_its_template() {
    let model = model();
    let tools = format_fixtures()["tools"]
        .as_array()
        .expect("tools")
        .clone();
    let mut failures = Vec::new();
    for format in ToolFormat::ALL {
        let name = format.as_str();
        let template = fixture_text(&format!("templates/formats/{name}.jinja"));
        assert_eq!(ToolFormat::detect(&template), Some(format), "{name}");
        let renderer = PromptRenderer::new(&template, "unused").expect(name);
        assert!(renderer.own_template_supports_tools(), "{name}");
        let mut calls = vec![
            ToolCall::function("call_1", "get_weather", r#"{"city":"Paris","days":3}"#),
            ToolCall::function("call_2", "lookup_zip", r#"{"zip":"007"}"#),
        ];
        if format == ToolFormat::Llama3Json {
            // One call per message in Llama 3's JSON.
            calls.truncate(1);
        }
        let asked = vec![Message::user("The weather in Paris, and the zip 007?")];
        let before = renderer.render(&asked, &tools).expect("render");
        let mut answered = asked.clone();
        answered.push(Message::assistant_tool_calls(None, calls.clone()));
        let after = renderer.render(&answered, &tools).expect("render");
        let shared = before
            .char_indices()
            .zip(after.chars())
            .find(|((_, a), b)| a != b)
            .map_or(before.len(), |((at, _), _)| at);
        let turn = &after[shared..];
        let turn = ["<|im_end|>", "<|eot_id|>"]
            .iter()
            .filter_map(|end| turn.find(end))
            .min()
            .map_or(turn, |end| &turn[..end]);
        // The routing step scores names in the frame the template writes.
        let (open, close) = format.name_frame();
        if !turn.contains(&format!("{open}get_weather{close}")) {
            failures.push(format!("{name}: no {open:?}NAME{close:?} in {turn:?}"));
        }
        let parsed = stack_runtime::model::parse_tool_calls_for(turn, &tools, &mut ids());
        let read = |calls: &[ToolCall]| -> Vec<(String, Value)> {
            calls
                .iter()
                .map(|c| {
                    (
                        c.function.name.clone(),
                        serde_json::from_str(&c.function.arguments).unwrap_or(Value::Null),
                    )
                })
                .collect()
        };
        if read(&parsed.tool_calls) != read(&calls) {
            failures.push(format!(
                "{name}: {turn:?} parsed as {:?}",
                parsed.tool_calls
            ));
        }
        let grammar = format_grammar(format, &tools, &ArgumentValues::none(), CallCount::Many)
            .expect("grammar");
        if !model
            .grammar_accepts(&grammar.gbnf, Some(&grammar.trigger), turn)
            .expect("grammar loads")
        {
            failures.push(format!("{name}: the grammar refused {turn:?}"));
        }
        if model
            .grammar_accepts(
                &grammar.gbnf,
                Some(&grammar.trigger),
                &format!("{turn} and more"),
            )
            .expect("grammar loads")
        {
            failures.push(format!(
                "{name}: the lazy grammar never applied to {turn:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A chat template given in place of the GGUF's (`--chat-template-file`)
/// sets the call syntax end to end: with an XML-calling template, the
/// default model is shown the tools by that template, writes its call in
/// that XML under the format's grammar, the call parses, and it renders
/// back through the template into the next prompt as it was written.
#[test]
fn a_given_chat_template_sets_the_call_format_end_to_end() {
    let _own = own_model_lock();
    let model = Model::load(ModelOptions {
        context_size: 2048,
        threads: Some(2),
        chat_template: Some(fixture_text("templates/formats/qwen3_coder_xml.jinja")),
        ..ModelOptions::default()
    })
    .expect("the default model loads with a given template");
    assert_eq!(model.info().tool_format, ToolFormat::Qwen3CoderXml);
    assert!(model.info().template_supports_tools);
    // The city is an enum: free to write any text between the tags, the
    // 135M model writes on past the token budget.
    let tools = one_tool(
        "get_weather",
        "Get the weather forecast for a city.",
        serde_json::json!({
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Oslo", "Paris", "Rome"]},
                "days": {"type": "integer"}
            },
            "required": ["city"]
        }),
    );
    let mut session = model.session().expect("session");
    let mut conversation = vec![Message::user("What is the weather in Oslo?")];
    let prompt = model
        .renderer()
        .render(&conversation, &tools)
        .expect("prompt");
    assert!(
        prompt.contains("- get_weather: Get the weather") && prompt.contains("<function=NAME>"),
        "the template lists the tools: {prompt}"
    );
    let generation = complete(
        &mut session,
        &conversation,
        &tools,
        &ToolChoice::Named("get_weather".into()),
        &greedy(200),
    )
    .expect("generate");
    assert!(
        generation
            .text
            .starts_with("<tool_call>\n<function=get_weather>\n<parameter=city>\n"),
        "{:?}",
        generation.text
    );
    assert_eq!(
        generation.stop,
        StopReason::EndOfTurn,
        "{:?}",
        generation.text
    );
    let [call] = generation.turn.tool_calls.as_slice() else {
        panic!("one call: {:?}", generation.text);
    };
    assert_eq!(call.function.name, "get_weather");
    let arguments: Value = serde_json::from_str(&call.function.arguments).expect("arguments");
    assert!(arguments["city"].is_string(), "{arguments}");
    conversation.push(Message::assistant_tool_calls(None, vec![call.clone()]));
    conversation.push(Message::tool_result(call.id.clone(), "12 C, rain"));
    let next = model
        .renderer()
        .render(&conversation, &tools)
        .expect("prompt");
    assert!(
        next.contains(generation.text.trim()),
        "the call renders back as written:\n{next}\n---\n{}",
        generation.text
    );
}

/// A turn named to `get_weather`, then one under `ToolChoice::Auto` (the
/// routing step) asking for a triangle's area, in `session`; asserts that
/// the step kept the conversation's cache, and returns both turns.
/// The named turn's whole prompt (part of it may have been in a batched
/// slot it was lent) is reused, and everything the routed turn evaluated,
/// its evidence prompts included, is less than that prompt: had the step
/// displaced the conversation's cache, a name prompt would have evaluated
/// it all again.
fn routed_turn_keeping_the_cache(
    session: &mut ModelSession,
    tools: &[Value],
    sampling: &SamplingOptions,
) -> (Generation, Generation) {
    let mut conversation = vec![Message::user("What's the weather like in Paris right now?")];
    let named = complete(
        session,
        &conversation,
        tools,
        &ToolChoice::Named("get_weather".into()),
        sampling,
    )
    .expect("named turn");
    conversation.push(Message::assistant(named.text.clone()));
    conversation.push(Message::user(
        "And the area of a triangle with base 3 and height 4?",
    ));
    let routed =
        complete(session, &conversation, tools, &ToolChoice::Auto, sampling).expect("routed turn");
    let named_prompt = named.counters.prompt_evaluated + named.counters.prompt_reused;
    assert!(
        routed.counters.prompt_reused >= named_prompt,
        "the routed turn reused {} tokens; the named turn's prompt was {named_prompt}",
        routed.counters.prompt_reused,
    );
    assert!(
        routed.counters.prompt_evaluated < named_prompt,
        "the routed turn evaluated {} tokens; the named turn's prompt was {named_prompt}",
        routed.counters.prompt_evaluated,
    );
    (named, routed)
}

/// A BFCL-style tool, as OpenAI tool objects.
/// The two tools the routing tests offer: one for triangles, one for
/// the weather.
fn triangle_and_weather_tools() -> Vec<Value> {
    let mut tools = one_tool(
        "calculate_triangle_area",
        "Calculate the area of a triangle given its base and height.",
        serde_json::json!({
            "type": "object",
            "properties": {"base": {"type": "integer"}, "height": {"type": "integer"}},
            "required": ["base", "height"]
        }),
    );
    tools.extend(one_tool(
        "get_weather",
        "Get the current weather for a city.",
        serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"]
        }),
    ));
    tools
}

fn one_tool(name: &str, description: &str, parameters: Value) -> Vec<Value> {
    vec![serde_json::json!({
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters}
    })]
}

/// Regression (#15): when the default model writes `<tool_call` inside its
/// prose (reported for a sunset question with only a sunrise tool), the
/// token that completed the lazy grammar's trigger could go on with text
/// the grammar refuses (`>.`). llama.cpp's exception crossed into Rust: the model thread died,
/// or the process aborted. Now such a token is ruled out and the turn ends
/// normally, as text or as a valid call.
#[test]
fn a_tool_call_opened_inside_prose_never_kills_the_session() {
    let model = model();
    let tools = one_tool(
        "calculate_sunrise",
        "Calculate the time of sunrise for a specific date and location.",
        serde_json::json!({
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The location for which sunrise time needs to be calculated."},
                "date": {"type": "string", "description": "The date for which sunrise time needs to be calculated in YYYY-MM-DD format. If not provided, current date is considered. Default: today"}
            },
            "required": ["location"]
        }),
    );
    let mut session = model.session().expect("session");
    let mut triggered = 0;
    for prompt in [
        // The report's prompt.
        "When will be sunset in Beijing today?",
        // Aborted the process before the fix: `<tool_call` then `>.`.
        "Is <tool_call>. a valid tag?",
        "Print <tool_call>) please",
    ] {
        let conversation = vec![Message::user(prompt)];
        let generation = session
            .complete(
                &conversation,
                &tools,
                &ToolChoice::Auto,
                // The model's own decision: the lazy trigger inside prose.
                &SamplingOptions {
                    routing: Routing::Free,
                    ..greedy(128)
                },
                None,
                &mut |_| true,
                &mut ids(),
            )
            .unwrap_or_else(|err| panic!("the turn failed: {err}"));
        triggered += usize::from(generation.text.contains("<tool_call"));
        for call in &generation.turn.tool_calls {
            assert_eq!(
                call.function.name, "calculate_sunrise",
                "{:?}",
                generation.text
            );
            let arguments: Value =
                serde_json::from_str(&call.function.arguments).expect("valid JSON arguments");
            assert!(arguments["location"].is_string(), "{arguments}");
        }
    }
    assert!(
        triggered > 0,
        "the model no longer writes the trigger here: pick another prompt"
    );
    // The session still works afterwards.
    let after = complete(
        &mut session,
        &[Message::user("Say hi.")],
        &[],
        &ToolChoice::None,
        &greedy(16),
    )
    .expect("the session keeps working");
    assert!(!after.text.is_empty());
}

/// The longest text that occurs twice in `text`, the two occurrences
/// allowed to overlap (`ab ab ab` holds `ab ab` twice).
fn longest_repeat(text: &str) -> usize {
    let chars: Vec<char> = text.chars().collect();
    (1..chars.len())
        .map(|shift| {
            // The longest run of positions where the text equals itself
            // shifted by `shift`.
            let mut best = 0;
            let mut run = 0;
            for i in shift..chars.len() {
                run = if chars[i] == chars[i - shift] {
                    run + 1
                } else {
                    0
                };
                best = best.max(run);
            }
            best
        })
        .max()
        .unwrap_or(0)
}

/// #15: on AVX-512 kernels the default model's greedy arguments looped to
/// the token limit (`"path": "mnpu…,mnpu…`), and a call cut off there is
/// never parsed. The DRY penalty (on by default) pushes a step off what it
/// has already written; here a pattern the model would otherwise continue
/// to the limit. (The penalty once reached llama.cpp as off: it takes a
/// negative length as 0. This test fails that way.)
#[test]
fn the_dry_penalty_breaks_a_loop_the_model_would_write_to_the_limit() {
    let model = model();
    let mut session = model.session().expect("session");
    let prompt = model
        .renderer()
        .render(
            &[Message::user(
                "Continue the pattern: ab ab ab ab ab ab ab ab",
            )],
            &[],
        )
        .expect("prompt");
    // Letters and spaces only, so that the step writes the pattern or
    // leaves it, rather than talking about it.
    let grammar = "root ::= [a-z ]+";
    let mut run = |dry_multiplier: Option<f32>| {
        let sampling = SamplingOptions {
            dry_multiplier,
            ..greedy(40)
        };
        let generation = session
            .generate(&prompt, Some((grammar, None)), &sampling, &mut |_| true)
            .expect("generate");
        (generation.text, generation.stop)
    };
    let (looping, stop) = run(Some(0.0));
    assert_eq!(stop, StopReason::MaxTokens, "{looping:?}");
    assert!(
        longest_repeat(&looping) >= 60,
        "without DRY the model continues the pattern to the limit: {looping:?}"
    );
    // On by default for this (small) model; off for a larger one. The
    // second step leaves the multiplier unset, as every caller does.
    assert!(
        model.dry_multiplier(&SamplingOptions::default()) > 0.0,
        "DRY is on by default"
    );
    let (broken, stop) = run(None);
    // It went on writing, rather than ending or finding nothing allowed.
    assert_eq!(stop, StopReason::MaxTokens, "{broken:?}");
    assert!(broken.len() >= 40, "{broken:?}");
    // A repeat of 8 tokens (` ab` is one) would cost 0.8 × 1.75^6, about
    // 23 nats: the step leaves the pattern well before that (it wrote
    // `ab ab ab ab ab ab aa ab ab ab ab  abcdef…` here).
    assert!(
        longest_repeat(&broken) <= 24,
        "DRY stops the step repeating itself: {broken:?}"
    );
}

/// Where the grammar is asked about the chain's pick first
/// ([`GrammarCheck::PickedFirst`], the default) greedy steps write what
/// they write where it filters every token first: the same calls to the
/// built-in tools, and the same text under a grammar that refuses the
/// model's first choice (letters and spaces only, where the model would
/// open with a capital). Both report the time spent sampling.
#[test]
fn checking_the_picked_token_first_writes_what_filtering_every_token_writes() {
    let model = model();
    let tools = Registry::with_builtins().openai_tools();
    let mut session = model.session().expect("session");
    let mut run = |conversation: &[Message], choice: &ToolChoice, grammar_check| {
        let sampling = SamplingOptions {
            grammar_check,
            ..greedy(120)
        };
        // Each from an empty cache: a prompt's last token evaluated alone,
        // after a reused prefix, gives logits a batch's rounding away from
        // the same token evaluated in the whole prompt's batch.
        session.clear_cache();
        let generation =
            complete(&mut session, conversation, &tools, choice, &sampling).expect("generate");
        assert!(generation.sampling_ms > 0.0, "{grammar_check:?}");
        assert!(
            generation.sampling_ms <= generation.generation_ms,
            "{grammar_check:?}: sampling is part of generating"
        );
        generation
    };
    let named = TOOL_PROMPTS.iter().filter(|(tool, _)| *tool != "*");
    for (tool, prompt) in named.step_by(3) {
        let choice = ToolChoice::Named(tool.to_string());
        let conversation = [Message::user(*prompt)];
        let picked_first = run(&conversation, &choice, GrammarCheck::PickedFirst);
        let every_token = run(&conversation, &choice, GrammarCheck::EveryToken);
        assert_eq!(picked_first.text, every_token.text, "{prompt}");
        assert!(
            picked_first.text.trim_start().starts_with("<tool_call>"),
            "{prompt}: {picked_first:?}"
        );
    }

    // The lazy grammar, waiting for the model to open a call of its own.
    let free = |grammar_check| SamplingOptions {
        routing: Routing::Free,
        grammar_check,
        ..greedy(60)
    };
    let conversation = [Message::user("Read notes.txt please.")];
    let lazy: Vec<String> = [GrammarCheck::PickedFirst, GrammarCheck::EveryToken]
        .into_iter()
        .map(|check| {
            session.clear_cache();
            complete(
                &mut session,
                &conversation,
                &tools,
                &ToolChoice::Auto,
                &free(check),
            )
            .expect("generate")
            .text
        })
        .collect();
    assert_eq!(lazy[0], lazy[1]);

    let prompt = model
        .renderer()
        .render(&[Message::user("Write one sentence about Paris.")], &[])
        .expect("prompt");
    let mut write = |grammar: Option<&str>, grammar_check| {
        let sampling = SamplingOptions {
            grammar_check,
            ..greedy(16)
        };
        session.clear_cache();
        session
            .generate(&prompt, grammar.map(|g| (g, None)), &sampling, &mut |_| {
                true
            })
            .expect("generate")
            .text
    };
    let free = write(None, GrammarCheck::PickedFirst);
    assert!(
        free.chars().any(|c| !(c.is_ascii_lowercase() || c == ' ')),
        "the model's own picks leave the grammar: {free:?}"
    );
    let letters = "root ::= [a-z ]+";
    let picked_first = write(Some(letters), GrammarCheck::PickedFirst);
    let every_token = write(Some(letters), GrammarCheck::EveryToken);
    assert!(
        !picked_first.is_empty()
            && picked_first
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == ' '),
        "{picked_first:?}"
    );
    assert_eq!(picked_first, every_token);
}

/// Regression (#15): a parameter named `title` (or `description`, or
/// `default`) was stripped from the grammar as if it were the keyword, so
/// a constrained call could never carry it and always failed validation.
#[test]
fn parameters_named_title_description_and_default_are_generated() {
    let model = model();
    let tools = one_tool(
        "get_movie",
        "Look a film up by its title.",
        serde_json::json!({
            "type": "object",
            "properties": {
                "title": {"type": "string", "description": "The film's title."},
                "description": {"type": "string", "description": "What to say about it."},
                "default": {"type": "integer", "description": "How many results."}
            },
            "required": ["title", "description", "default"],
            "additionalProperties": false
        }),
    );
    let mut session = model.session().expect("session");
    let generation = session
        .complete(
            &[Message::user(
                "Find the movie Alien and describe it briefly, one result.",
            )],
            &tools,
            &ToolChoice::Named("get_movie".into()),
            &greedy(96),
            None,
            &mut |_| true,
            &mut ids(),
        )
        .expect("generate");
    let call = generation
        .turn
        .tool_calls
        .first()
        .unwrap_or_else(|| panic!("no call: {:?}", generation.text));
    let arguments: Value = serde_json::from_str(&call.function.arguments).expect("json");
    assert!(arguments["title"].is_string(), "{arguments}");
    assert!(arguments["description"].is_string(), "{arguments}");
    assert!(arguments["default"].is_i64(), "{arguments}");
}

#[test]
fn missing_corrupt_and_foreign_files_are_rejected_cleanly() {
    let _own = own_model_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let load = |path: std::path::PathBuf| {
        Model::load(ModelOptions {
            path: Some(path),
            ..ModelOptions::default()
        })
    };
    assert!(matches!(
        load(dir.path().join("nope.gguf")),
        Err(ModelError::NotFound(_))
    ));
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").expect("write");
    assert!(matches!(load(empty), Err(ModelError::NotGguf { .. })));
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, b"these are not the weights you are looking for").expect("write");
    let err = load(text).expect_err("not gguf");
    assert!(err.to_string().contains("is not a GGUF model"), "{err}");
    let truncated = dir.path().join("truncated.gguf");
    let real = std::fs::read(
        stack_runtime::assets::Asset::DefaultModel
            .locate()
            .expect("model"),
    )
    .expect("read");
    std::fs::write(&truncated, &real[..1 << 20]).expect("write");
    let err = load(truncated).expect_err("truncated");
    assert!(matches!(err, ModelError::Load { .. }), "{err}");
    assert!(err.to_string().contains("truncated or corrupt"), "{err}");
}

#[test]
fn agent_model_shows_metadata_and_rejects_bad_files() {
    let here = tempfile::tempdir().expect("tempdir");
    let output = agent_model_in(here.path(), &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let info: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["template_supports_tools"], false);
    // The tool-call syntax the model is shown (SmolLM2's template has no
    // tools: the ChatML fallback's Hermes), and the CPU kernels in use.
    assert_eq!(info["tool_format"], "hermes");
    let kernels: Vec<&str> = info["cpu_kernels"]
        .as_array()
        .expect("cpu_kernels")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        kernels
            .iter()
            .any(|k| k.starts_with("SSE") || k.starts_with("AVX") || k.starts_with("NEON")),
        "{kernels:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, "not a model").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["model", "--model"])
        .arg(&bad)
        .output()
        .expect("agent");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not a GGUF model"));
    // A given chat template sets the call syntax `agent model` reports;
    // one that cannot be read, or does not parse, is refused by name.
    let template = common::fixture("templates/formats/qwen3_coder_xml.jinja");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["model", "--json", "--chat-template-file"])
        .arg(&template)
        .output()
        .expect("agent");
    let info: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(info["tool_format"], "qwen3_coder_xml");
    assert_eq!(info["template_supports_tools"], true);
    let broken = dir.path().join("broken.jinja");
    std::fs::write(&broken, "{% for %}").expect("write");
    for (path, expected) in [
        (dir.path().join("missing.jinja"), "cannot read it"),
        (broken, "template"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["model", "--chat-template-file"])
            .arg(&path)
            .output()
            .expect("agent");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{}", path.display());
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// `agent model --json` run in `cwd` with `env` set: its output.
fn agent_model_in(cwd: &std::path::Path, env: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agent"));
    command
        .args(["model", "--json"])
        .current_dir(cwd)
        .env_remove("STACK_RUNTIME_GGML_BACKENDS")
        .env_remove("GGML_BACKEND_PATH");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("agent model")
}

/// The flags of this machine's CPU, as `/proc/cpuinfo` lists them.
fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .expect("cpuinfo")
        .lines()
        .find(|line| line.starts_with("flags") || line.starts_with("Features"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// One binary for every CPU: llama.cpp's CPU kernels are one library per
/// CPU generation, and the best for this CPU is the one that runs. Its
/// kernels are ones this CPU has (AVX2 and AVX-512 where it has them); the
/// baseline x86-64 variant, alone in a folder, still loads and generates.
#[test]
fn the_best_cpu_variant_runs_and_the_baseline_still_does() {
    let here = tempfile::tempdir().expect("tempdir");
    let output = agent_model_in(here.path(), &[]);
    assert!(output.status.success(), "{output:?}");
    let info: Value = serde_json::from_slice(&output.stdout).expect("json");
    let cpu = &info["cpu_backend"];
    let variants: Vec<&str> = cpu["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let variant = cpu["variant"].as_str().expect("the variant mapped");
    assert!(variants.contains(&variant), "{cpu}");
    assert_eq!(cpu["chosen"], "build", "{cpu}");
    let kernels: Vec<&str> = info["cpu_kernels"]
        .as_array()
        .expect("cpu_kernels")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    assert!(
        ["x64", "sse42", "haswell", "skylakex", "icelake", "zen4"]
            .iter()
            .all(|v| variants.contains(v)),
        "every x86-64 generation is built: {variants:?}"
    );
    let flags = cpu_flags();
    let has = |flag: &str| flags.iter().any(|f| f == flag);
    // The picked kernels are ones this CPU has...
    for (kernel, flag) in [
        ("AVX2", "avx2"),
        ("AVX512", "avx512f"),
        ("FMA", "fma"),
        ("F16C", "f16c"),
    ] {
        if kernels.contains(&kernel) {
            assert!(has(flag), "{variant} uses {kernel}, which this CPU lacks");
        }
    }
    // The variant named is the one whose kernels these are.
    let before_avx2 = ["x64", "sse42", "sandybridge", "ivybridge", "piledriver"];
    if kernels.contains(&"AVX2") {
        assert!(!before_avx2.contains(&variant), "{variant}: {kernels:?}");
    }
    if kernels.contains(&"AVX512") {
        assert!(
            !before_avx2.contains(&variant) && !["haswell", "alderlake"].contains(&variant),
            "{variant}: {kernels:?}"
        );
    }
    // ...and the best it has: AVX2 (Haswell and later), AVX-512 (Skylake-X
    // and later, Zen 4 and later).
    if ["avx2", "fma", "f16c", "bmi2"].iter().all(|f| has(f)) {
        assert!(
            kernels.contains(&"AVX2"),
            "{variant}: {kernels:?} on {flags:?}"
        );
    }
    if ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"]
        .iter()
        .all(|f| has(f))
    {
        assert!(
            kernels.contains(&"AVX512"),
            "{variant}: {kernels:?} on {flags:?}"
        );
    }

    // The baseline alone: it loads on this CPU, with no AVX kernels, and
    // the model generates on it.
    let folder = std::path::PathBuf::from(cpu["folder"].as_str().expect("folder"));
    let baseline = here.path().join("baseline");
    std::fs::create_dir(&baseline).expect("mkdir");
    std::fs::copy(
        folder.join("libggml-cpu-x64.so"),
        baseline.join("libggml-cpu-x64.so"),
    )
    .expect("copy the baseline variant");
    let env = [("STACK_RUNTIME_GGML_BACKENDS", baseline.as_os_str())];
    let output = agent_model_in(here.path(), &env);
    assert!(output.status.success(), "{output:?}");
    let info: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(info["cpu_backend"]["variant"], "x64", "{info}");
    assert_eq!(info["cpu_backend"]["chosen"], "environment", "{info}");
    let kernels = info["cpu_kernels"].to_string();
    assert!(!kernels.contains("AVX"), "{kernels}");
    let _own = own_model_lock();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args([
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--policy",
            "strict",
            "--no-default-tools",
            "--system",
            "Answer in one word.",
            "run",
            "-p",
            "What colour is the sky?",
            "--json",
        ])
        .current_dir(here.path())
        .env_remove("GGML_BACKEND_PATH")
        .envs(env)
        .output()
        .expect("agent run");
    assert!(output.status.success(), "{output:?}");
    let finished = common::turn_finished(&String::from_utf8_lossy(&output.stdout));
    assert!(
        finished["counters"]["generated"].as_u64().unwrap_or(0) > 0,
        "{finished}"
    );
}

/// A library named like a CPU backend in the folder the agent works in (a
/// workspace, a cloned repository, a file the model wrote) is never
/// loaded: ggml's own search would look in the current directory, the
/// runtime never lets it. Named in full, the same library is loaded (its
/// constructor runs), so the check can see a load; it is then refused as
/// no CPU backend.
#[test]
fn a_cpu_backend_planted_in_the_working_directory_is_never_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let source = dir.path().join("planted.c");
    std::fs::write(
        &source,
        r#"#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("PLANTED_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f) fclose(f);
}
int ggml_backend_score(void) { return 1 << 30; }
"#,
    )
    .expect("write");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(work.join("libggml-cpu-planted.so"))
        .arg(&source)
        .status()
        .expect("cc");
    assert!(status.success(), "cc failed");
    let marker = dir.path().join("planted-ran");

    let output = agent_model_in(&work, &[("PLANTED_MARKER", marker.as_os_str())]);
    assert!(output.status.success(), "{output:?}");
    let info: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_ne!(info["cpu_backend"]["variant"], "planted", "{info}");
    assert!(!marker.exists(), "the planted library ran");

    let output = agent_model_in(
        &work,
        &[
            ("PLANTED_MARKER", marker.as_os_str()),
            ("STACK_RUNTIME_GGML_BACKENDS", work.as_os_str()),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        marker.exists(),
        "named in full, the folder's library is loaded"
    );
    assert!(
        stderr.contains("none of the 1 llama.cpp CPU backends in") && stderr.contains("planted"),
        "{stderr}"
    );
}

/// A backends folder without CPU backends, one named by a relative path,
/// one others may write (where anyone could swap a backend), and a
/// relative `GGML_BACKEND_PATH` are each refused by name, before any
/// model runs.
#[test]
fn a_folder_without_cpu_backends_is_refused_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    std::fs::write(empty.join("libggml-cpu-notes.txt"), "not a library").expect("write");
    let built = agent_model_in(dir.path(), &[]);
    let info: Value = serde_json::from_slice(&built.stdout).expect("json");
    let built = std::path::PathBuf::from(info["cpu_backend"]["folder"].as_str().expect("folder"));
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::copy(
        built.join("libggml-cpu-x64.so"),
        shared.join("libggml-cpu-x64.so"),
    )
    .expect("copy a backend");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let backends = |folder: &std::path::Path| {
        vec![(
            "STACK_RUNTIME_GGML_BACKENDS",
            folder.as_os_str().to_os_string(),
        )]
    };
    for (env, expected) in [
        (
            backends(&empty),
            format!("no llama.cpp CPU backend in {}", empty.display()),
        ),
        (
            backends(std::path::Path::new("backends")),
            "STACK_RUNTIME_GGML_BACKENDS=backends is not an absolute path".to_string(),
        ),
        (
            backends(&shared),
            format!("{} is writable by group or others", shared.display()),
        ),
        (
            vec![("GGML_BACKEND_PATH", "libggml-cpu-x.so".into())],
            "GGML_BACKEND_PATH=libggml-cpu-x.so is not an absolute path".to_string(),
        ),
    ] {
        let env: Vec<(&str, &std::ffi::OsStr)> =
            env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        let output = agent_model_in(dir.path(), &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains(&expected), "{stderr}");
    }
}

/// A model is freed when its last user goes (it used to be leaked for the
/// life of the process): the GGUF file's mappings come and go with it, and
/// a session keeps its model alive until the session ends.
#[test]
fn a_dropped_model_is_freed_once_its_sessions_are_gone() {
    let _own = own_model_lock();
    let _shared = model();
    let path = stack_runtime::assets::Asset::DefaultModel
        .locate()
        .expect("default model");
    let path = path.canonicalize().expect("canonical");
    let mappings = || {
        std::fs::read_to_string("/proc/self/maps")
            .expect("maps")
            .lines()
            .filter(|l| l.ends_with(path.to_str().expect("utf8")))
            .count()
    };
    let before = mappings();
    let loaded = Model::load(ModelOptions {
        threads: Some(1),
        ..ModelOptions::default()
    })
    .expect("load");
    let with_model = mappings();
    assert!(
        with_model > before,
        "the model maps its file ({before} → {with_model})"
    );
    let session = loaded.session().expect("session");
    drop(loaded);
    assert_eq!(mappings(), with_model, "a live session keeps its model");
    drop(session);
    assert_eq!(mappings(), before, "the model went with its last session");
}

/// With every CPU kept busy by other processes, a session opened without a
/// thread count takes one thread: OpenMP threads that spin at every barrier
/// against a busy machine made generation 3–4x slower than alone (`cargo
/// bench --workspace --bench contention`).
#[test]
fn sessions_take_fewer_threads_on_a_busy_machine() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut busy: Vec<std::process::Child> = (0..cpus)
        .map(|_| {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("a busy loop")
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let threads = stack_runtime::model::llama::automatic_threads();
    for child in &mut busy {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(threads, 1, "{cpus} CPUs, all busy");
}

/// Continuous batching: four sessions generating at once on one context
/// are decoded together (a step carries several sequences), each keeps its
/// own KV prefix between turns, and a conversation that outgrows its slot
/// gets a clear error naming the slot's size.
#[test]
fn batched_sessions_decode_together_and_keep_their_own_prefixes() {
    let _own = own_model_lock();
    let batched = Model::load(ModelOptions {
        context_size: 1024,
        threads: Some(2),
        parallel: 4,
        ..ModelOptions::default()
    })
    .expect("load");
    assert!(batched.batched());
    let topics = ["the sea", "a mountain", "a city", "the moon"];
    let threads: Vec<_> = topics
        .iter()
        .map(|topic| {
            let model = Arc::clone(&batched);
            let topic = topic.to_string();
            std::thread::spawn(move || {
                let mut session = model.session().expect("session");
                let mut conversation =
                    vec![Message::user(format!("Write two sentences about {topic}."))];
                let first = complete(
                    &mut session,
                    &conversation,
                    &[],
                    &ToolChoice::None,
                    &greedy(48),
                )
                .expect("first turn");
                conversation.push(Message::assistant(first.text.clone()));
                conversation.push(Message::user("And one more."));
                let second = complete(
                    &mut session,
                    &conversation,
                    &[],
                    &ToolChoice::None,
                    &greedy(16),
                )
                .expect("second turn");
                (first, second)
            })
        })
        .collect();
    let mut generated = 0;
    for thread in threads {
        let (first, second) = thread.join().expect("joined");
        generated += first.counters.generated + second.counters.generated;
        assert!(!first.text.trim().is_empty());
        assert!(first.counters.generated > 0);
        assert!(
            second.counters.prompt_reused > first.counters.prompt_evaluated / 2,
            "the second turn reuses the session's prefix: {:?}",
            second.counters
        );
    }
    let engine = batched.engine().expect("the engine runs");
    let (steps, tokens) = engine.steps();
    assert!(steps > 0);
    // Had the sessions taken turns, every generated token would have had
    // a decode step of its own (and each prompt chunk another).
    assert!(
        steps < generated,
        "{steps} steps for {generated} generated tokens ({tokens} carried)"
    );
    // A slot holds 1024 tokens: a longer prompt is refused, clearly.
    let mut session = batched.session().expect("session");
    let long = vec![Message::user("word ".repeat(1500))];
    let err = complete(&mut session, &long, &[], &ToolChoice::None, &greedy(8))
        .expect_err("too long for the slot");
    assert!(
        matches!(err, ModelError::ContextFull { context: 1024, .. }),
        "{err}"
    );
    // The session still works after the error.
    let short = vec![Message::user("Hi")];
    complete(&mut session, &short, &[], &ToolChoice::None, &greedy(4))
        .expect("a short prompt still works");

    // Every slot busy: four sessions that each hold theirs after a first
    // token (their callers have not taken it yet), until released.
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let release = Arc::new(AtomicBool::new(false));
    let holders: Vec<_> = (0..4)
        .map(|i| {
            let model = Arc::clone(&batched);
            let release = Arc::clone(&release);
            std::thread::spawn(move || {
                let mut session = model.session().expect("session");
                let conversation = vec![Message::user(format!("Say a word. ({i})"))];
                session.complete(
                    &conversation,
                    &[],
                    &ToolChoice::None,
                    &greedy(8),
                    None,
                    &mut |_| {
                        while !release.load(SeqCst) {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        false
                    },
                    &mut ids(),
                )
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while engine.busy_slots() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the holders took no slots"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // A fifth session waits in line; its caller gives up after 300 ms and
    // gets a cancelled generation at once, nothing evaluated, while the
    // slots are still held.
    let gave_up = Arc::new(AtomicBool::new(false));
    session.set_cancel(Some(Arc::clone(&gave_up)));
    let setter = {
        let gave_up = Arc::clone(&gave_up);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            gave_up.store(true, SeqCst);
        })
    };
    let waited = complete(&mut session, &short, &[], &ToolChoice::None, &greedy(4))
        .expect("giving up is no error");
    setter.join().expect("setter");
    assert_eq!(waited.stop, StopReason::Cancelled);
    assert_eq!(
        waited.counters.prompt_evaluated + waited.counters.generated,
        0
    );
    assert_eq!(engine.busy_slots(), 4, "the holders still hold every slot");
    assert!(holders.iter().all(|holder| !holder.is_finished()));
    // Released, the holders end and the session that gave up is served.
    release.store(true, SeqCst);
    for holder in holders {
        let held = holder.join().expect("joined").expect("a generation");
        assert_eq!(held.stop, StopReason::Cancelled);
    }
    session.set_cancel(None);
    let served = complete(&mut session, &short, &[], &ToolChoice::None, &greedy(4))
        .expect("served once the slots are free");
    assert!(served.counters.generated > 0);
}
