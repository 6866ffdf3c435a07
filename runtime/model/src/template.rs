//! Prompt rendering with the model's own Jinja chat template.
//!
//! Like llama.cpp's server with `--jinja`, the GGUF's `tokenizer.chat_template`
//! is rendered with `messages`, `tools` and `add_generation_prompt`, with the
//! Hugging Face conventions templates are written for: `trim_blocks` and
//! `lstrip_blocks`, Python string methods, a Python-style `tojson`
//! (`", "` and `": "` separators, no HTML escaping), `raise_exception`, and
//! tool-call `arguments` passed as objects rather than JSON strings.
//!
//! A template that never mentions `tools` cannot show the model its tools;
//! then the prompt is rendered with a ChatML fallback that adds a
//! Hermes/Qwen-style `<tools>` block to the system prompt and renders calls
//! and results as `<tool_call>` and `<tool_response>` blocks.

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JinjaValue};
use serde::Serialize;
use serde_json::Value;

use stack_types::message::Message;

use crate::formats::ToolFormat;

/// The fallback template for models whose template has no tool support.
pub const CHATML_TOOLS_TEMPLATE: &str = include_str!("templates/chatml_tools.jinja");

/// Why a prompt could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse.
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    /// Rendering failed (including `raise_exception` from the template).
    #[error("rendering the chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    supports_tools: bool,
    default_system: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("supports_tools", &self.supports_tools)
            .finish()
    }
}

#[derive(Serialize)]
struct Context<'a> {
    messages: Vec<Value>,
    tools: Option<&'a [Value]>,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
    default_system: Option<&'a str>,
}

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", python_tojson);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<JinjaValue, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| -> String {
            strftime_today(&format)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TemplateError::Syntax(format!("{e:#}")))?;
        Ok(ChatTemplate {
            env,
            supports_tools: source.contains("tools"),
            default_system: None,
        })
    }

    /// The ChatML fallback with a `<tools>` block, using `default_system`
    /// when the conversation has no system message.
    pub fn chatml_with_tools(default_system: &str) -> Self {
        let mut template = ChatTemplate::new(CHATML_TOOLS_TEMPLATE)
            .unwrap_or_else(|e| panic!("the built-in fallback template is broken: {e}"));
        template.default_system = Some(default_system.to_string());
        template
    }

    /// Whether the template can show tools to the model.
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    /// Renders the conversation. `tools` is the OpenAI `tools` array.
    pub fn render(
        &self,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let context = Context {
            messages: messages.iter().map(template_message).collect(),
            tools: (!tools.is_empty()).then_some(tools),
            add_generation_prompt,
            bos_token: "",
            eos_token: "",
            default_system: self.default_system.as_deref(),
        };
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        template
            .render(context)
            .map_err(|e| TemplateError::Render(format!("{e:#}")))
    }
}

/// A message as templates expect it: text content, and tool-call arguments
/// as objects.
fn template_message(message: &Message) -> Value {
    let mut value = serde_json::to_value(message).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        if message.content.is_some() {
            object.insert("content".into(), Value::String(message.text()));
        }
        if let Some(Value::Array(calls)) = object.get_mut("tool_calls") {
            for call in calls {
                if let Some(arguments) = call.pointer_mut("/function/arguments") {
                    if let Some(parsed) = arguments
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                    {
                        *arguments = parsed;
                    }
                }
            }
        }
    }
    value
}

/// `tojson` as Python's `json.dumps` writes it: `", "` and `": "`, no HTML
/// escaping, non-ASCII kept.
fn python_tojson(value: JinjaValue) -> Result<JinjaValue, JinjaError> {
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    json.serialize(&mut serializer)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JinjaValue::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Picks the template for a conversation: the model's own, or the ChatML
/// fallback when tools are offered and the model's template cannot show them.
#[derive(Debug)]
pub struct PromptRenderer {
    own: ChatTemplate,
    fallback: ChatTemplate,
    call_format: ToolFormat,
}

impl PromptRenderer {
    /// A renderer over the model's template source.
    pub fn new(source: &str, default_system: &str) -> Result<Self, TemplateError> {
        let own = ChatTemplate::new(source)?;
        let call_format = if own.supports_tools() {
            ToolFormat::detect(source).unwrap_or(ToolFormat::Hermes)
        } else {
            ToolFormat::Hermes
        };
        Ok(PromptRenderer {
            own,
            fallback: ChatTemplate::chatml_with_tools(default_system),
            call_format,
        })
    }

    /// The syntax the model calls tools in once tools are offered: the
    /// one its own template shows, or Hermes under the ChatML fallback.
    pub fn call_format(&self) -> ToolFormat {
        self.call_format
    }

    /// Whether the model's own template is used when tools are offered.
    pub fn own_template_supports_tools(&self) -> bool {
        self.own.supports_tools()
    }

    /// Renders the conversation for generation.
    pub fn render(&self, messages: &[Message], tools: &[Value]) -> Result<String, TemplateError> {
        let has_tool_traffic = messages
            .iter()
            .any(|m| m.tool_calls.is_some() || m.tool_call_id.is_some());
        if (!tools.is_empty() || has_tool_traffic) && !self.own.supports_tools() {
            self.fallback.render(messages, tools, true)
        } else {
            self.own.render(messages, tools, true)
        }
    }
}

/// Today's date (UTC) for templates that call `strftime_now`: `%Y`, `%m`,
/// `%d`, `%b` and `%B` are supported.
fn strftime_today(format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[usize::try_from(month - 1).unwrap_or(0)];
    format
        .replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", name)
        .replace("%b", &name[..3])
}
