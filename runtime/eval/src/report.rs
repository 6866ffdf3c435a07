//! Per-case records and the per-category report built from them.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use stack_types::message::ToolCall;

use crate::bfcl::{Failure, FailureKind};

/// Which kind of task a record or report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Suite {
    /// BFCL-format single-turn tasks: the calls are scored, not run.
    Bfcl,
    /// Executable tasks: the tools run and the result is checked.
    Tasks,
}

/// One case's result: a line of the per-case JSONL.
#[derive(Debug, Clone, Serialize)]
pub struct CaseRecord {
    /// The suite.
    pub suite: Suite,
    /// The case's id.
    pub id: String,
    /// Its category.
    pub category: String,
    /// Whether it passed.
    pub passed: bool,
    /// Why not.
    pub failure: Option<Failure>,
    /// Whether the right tool was called (`None` where no call is wanted).
    pub right_tool: Option<bool>,
    /// The calls made.
    pub calls: Vec<ToolCall>,
    /// How many of them name an offered tool and pass its schema.
    pub schema_valid_calls: usize,
    /// The model's text (a task's final answer).
    pub text: String,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl CaseRecord {
    pub(crate) fn error(
        suite: Suite,
        id: &str,
        category: &str,
        message: String,
        seconds: f64,
    ) -> Self {
        CaseRecord {
            suite,
            id: id.to_string(),
            category: category.to_string(),
            passed: false,
            failure: Some(Failure {
                kind: FailureKind::TurnError,
                detail: message,
            }),
            right_tool: None,
            calls: Vec::new(),
            schema_valid_calls: 0,
            text: String::new(),
            seconds,
        }
    }
}

/// One row of the report: a category, or everything.
#[derive(Debug, Clone, Serialize)]
pub struct CategoryReport {
    /// The category (`overall` for the total).
    pub category: String,
    /// Cases run.
    pub cases: usize,
    /// Cases passed.
    pub passed: usize,
    /// `passed / cases`.
    pub accuracy: f64,
    /// Failures by kind.
    pub failures: BTreeMap<FailureKind, usize>,
    /// Cases that called the right tool, of those that want a call.
    pub right_tool: usize,
    /// Cases that want a call.
    pub wanting_a_call: usize,
    /// Calls made.
    pub calls: usize,
    /// Calls that name an offered tool and pass its schema.
    pub schema_valid_calls: usize,
    /// Mean wall-clock seconds per case.
    pub seconds_per_case: f64,
}

impl CategoryReport {
    fn of<'a>(category: &str, records: impl Iterator<Item = &'a CaseRecord>) -> Self {
        let mut row = CategoryReport {
            category: category.to_string(),
            cases: 0,
            passed: 0,
            accuracy: 0.0,
            failures: BTreeMap::new(),
            right_tool: 0,
            wanting_a_call: 0,
            calls: 0,
            schema_valid_calls: 0,
            seconds_per_case: 0.0,
        };
        let mut seconds = 0.0;
        for record in records {
            row.cases += 1;
            row.passed += usize::from(record.passed);
            if let Some(failure) = &record.failure {
                *row.failures.entry(failure.kind).or_default() += 1;
            }
            if let Some(right) = record.right_tool {
                row.wanting_a_call += 1;
                row.right_tool += usize::from(right);
            }
            row.calls += record.calls.len();
            row.schema_valid_calls += record.schema_valid_calls;
            seconds += record.seconds;
        }
        if row.cases > 0 {
            row.accuracy = row.passed as f64 / row.cases as f64;
            row.seconds_per_case = seconds / row.cases as f64;
        }
        row
    }
}

/// An evaluation's result: per category and overall, with every record.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The suite.
    pub suite: Suite,
    /// One row per category, in first-seen order.
    pub categories: Vec<CategoryReport>,
    /// All cases together.
    pub overall: CategoryReport,
    /// Every case.
    #[serde(skip)]
    pub records: Vec<CaseRecord>,
}

impl Report {
    /// Builds the report from per-case records.
    pub fn from_records(suite: Suite, records: Vec<CaseRecord>) -> Self {
        let mut names: Vec<&str> = Vec::new();
        for record in &records {
            if !names.contains(&record.category.as_str()) {
                names.push(&record.category);
            }
        }
        let categories = names
            .iter()
            .map(|name| CategoryReport::of(name, records.iter().filter(|r| r.category == *name)))
            .collect();
        let overall = CategoryReport::of("overall", records.iter());
        Report {
            suite,
            categories,
            overall,
            records,
        }
    }
}

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let title = match self.suite {
            Suite::Bfcl => "BFCL (AST-checked)",
            Suite::Tasks => "executable tasks (tool success rate)",
        };
        writeln!(f, "{title}")?;
        writeln!(
            f,
            "{:<22} {:>5} {:>6} {:>8} {:>10} {:>12} {:>8}  failures",
            "category", "cases", "passed", "accuracy", "right tool", "schema-valid", "s/case"
        )?;
        for row in self.categories.iter().chain(std::iter::once(&self.overall)) {
            let failures: Vec<String> = FailureKind::ALL
                .iter()
                .filter_map(|kind| {
                    row.failures
                        .get(kind)
                        .map(|count| format!("{} {count}", kind.as_str()))
                })
                .collect();
            writeln!(
                f,
                "{:<22} {:>5} {:>6} {:>8} {:>10} {:>12} {:>8.2}  {}",
                row.category,
                row.cases,
                row.passed,
                percent(row.passed, row.cases),
                percent(row.right_tool, row.wanting_a_call),
                format!("{}/{}", row.schema_valid_calls, row.calls),
                row.seconds_per_case,
                failures.join(", ")
            )?;
        }
        Ok(())
    }
}
