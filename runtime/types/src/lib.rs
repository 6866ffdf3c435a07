//! The types every Stack Runtime crate shares: chat messages and tool calls,
//! a tool call's outcome and status, and the languages code runs in. No
//! crate of the runtime is below this one; it depends on serde alone.

#![warn(missing_docs)]

pub mod egress;
mod language;
pub mod message;
pub mod outcome;
pub mod secret;
pub mod text;

pub use egress::{EgressDecision, EgressProtocol, EgressRecord};
pub use language::{Language, ScriptRuntime};
pub use message::{Message, Role, ToolCall};
pub use outcome::{DiskAdded, Limit, Status, ToolOutcome};
