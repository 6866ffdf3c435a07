//! Chat messages in the OpenAI chat-completions wire format.
//!
//! These types are what the model sees, what the agent loop passes around,
//! and what transcripts and training exports store. They serialize exactly
//! like the OpenAI format (and the Stack 2.9 training data):
//!
//! ```json
//! {"role":"assistant","content":null,
//!  "tool_calls":[{"id":"call_1","type":"function",
//!                 "function":{"name":"read_file","arguments":"{\"path\":\"a.txt\"}"}}]}
//! {"role":"tool","tool_call_id":"call_1","content":"hello"}
//! ```
//!
//! `arguments` stays a JSON *string*, as on the wire: the model produced it,
//! so it is untrusted text until the tool registry (`stack_core::tools::Registry::validate`) parses
//! and checks it.

use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions from the host.
    System,
    /// The person (or host app) talking to the agent.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
}

/// The content of a message: plain text, or OpenAI content parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// A plain string, the common case.
    Text(String),
    /// A list of typed parts (`[{"type":"text","text":"..."}]`).
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text of the content, with text parts joined and other parts skipped.
    pub fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|part| match part {
                    ContentPart::Text { text } => Some(text.as_str()),
                    ContentPart::Other(_) => None,
                })
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// One part of a multi-part content list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ContentPart {
    /// `{"type":"text","text":"..."}`.
    #[serde(rename = "text")]
    Text {
        /// The text.
        text: String,
    },
    /// Any other part (images, audio), kept verbatim so nothing is lost.
    #[serde(untagged)]
    Other(serde_json::Value),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The text. `null` on the wire for an assistant message that only calls tools.
    pub content: Option<Content>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by an assistant message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For a `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    fn with_text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// A system message.
    pub fn system(text: impl Into<String>) -> Self {
        Self::with_text(Role::System, text)
    }

    /// A user message.
    pub fn user(text: impl Into<String>) -> Self {
        Self::with_text(Role::User, text)
    }

    /// An assistant message with text only.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::with_text(Role::Assistant, text)
    }

    /// An assistant message that calls tools; `content` is the text around the calls.
    pub fn assistant_tool_calls(content: Option<String>, calls: Vec<ToolCall>) -> Self {
        Message {
            role: Role::Assistant,
            content: content.map(Content::Text),
            name: None,
            tool_calls: Some(calls),
            tool_call_id: None,
        }
    }

    /// A tool result answering the call with id `tool_call_id`.
    pub fn tool_result(tool_call_id: impl Into<String>, text: impl Into<String>) -> Self {
        Message {
            tool_call_id: Some(tool_call_id.into()),
            ..Self::with_text(Role::Tool, text)
        }
    }

    /// The message's text, empty when it has none.
    pub fn text(&self) -> String {
        self.content.as_ref().map(Content::text).unwrap_or_default()
    }
}

/// A tool call proposed by the model, as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Unique id, echoed by the `tool` message that answers it.
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: ToolCallKind,
    /// The function name and its arguments.
    pub function: FunctionCall,
}

impl ToolCall {
    /// A function call with the given id, name and raw JSON arguments.
    pub fn function(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> Self {
        ToolCall {
            id: id.into(),
            kind: ToolCallKind::Function,
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        }
    }
}

/// The kind of a tool call; OpenAI defines only `function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolCallKind {
    /// A function call.
    Function,
}

/// The function part of a tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The tool's name.
    pub name: String,
    /// The arguments as a JSON string, unparsed and untrusted.
    pub arguments: String,
}
