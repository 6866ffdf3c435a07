//! The runtime's core: tool definitions and the registry (JSON Schema
//! validation), the policy (rules, approvals, budgets, redaction, audit),
//! the gate that takes a call through them, dispatch to the sandboxes, and
//! the workspace the file tools work in.
//!
//! It depends on `stack-types` and `stack-sandbox`, never on a model.

#![warn(missing_docs)]

pub mod context;
pub mod dispatch;
pub mod gate;
pub mod grounding;
pub mod policy;
pub mod tools;
pub mod workspace;

#[cfg(test)]
mod fuzz;
