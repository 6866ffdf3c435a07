//! Shared by the fuzz targets of several crates (included with
//! `#[path]`): how long a target runs, and structured mutations of seed
//! files that bolero drives.

use std::path::PathBuf;
use std::time::Duration;

use bolero::TypeGenerator;

/// How long each target runs.
pub(crate) fn budget() -> Duration {
    let seconds = std::env::var("STACK_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(seconds)
}

/// One edit of a seed file.
#[derive(Debug, Clone, TypeGenerator)]
pub(crate) enum Mutation {
    /// Flip one bit.
    Flip { at: u16, bit: u8 },
    /// Insert a byte.
    Insert { at: u16, byte: u8 },
    /// Delete a run of bytes.
    Delete { at: u16, len: u8 },
    /// Copy a run of another seed in.
    Splice {
        at: u16,
        seed: u8,
        from: u16,
        len: u8,
    },
    /// Cut the rest.
    Truncate { at: u16 },
    /// Repeat a run (deep nesting, long strings).
    Repeat { at: u16, len: u8, times: u8 },
}

/// Every file in `dirs` (not recursing into dot folders), sorted.
pub(crate) fn seeds(dirs: &[PathBuf], extensions: &[&str]) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .collect()
}

/// `seeds[pick]` with `edits` applied.
pub(crate) fn mutate(seeds: &[Vec<u8>], pick: u8, edits: &[Mutation]) -> Vec<u8> {
    let Some(first) = seeds.get(usize::from(pick) % seeds.len().max(1)) else {
        return Vec::new();
    };
    let mut data = first.clone();
    for edit in edits {
        let at = |at: u16, len: usize| usize::from(at) % (len + 1);
        match *edit {
            Mutation::Flip { at: i, bit } => {
                if !data.is_empty() {
                    let i = usize::from(i) % data.len();
                    data[i] ^= 1 << (bit % 8);
                }
            }
            Mutation::Insert { at: i, byte } => {
                let i = at(i, data.len());
                data.insert(i, byte);
            }
            Mutation::Delete { at: i, len } => {
                let i = at(i, data.len());
                let end = (i + usize::from(len)).min(data.len());
                data.drain(i..end);
            }
            Mutation::Splice {
                at: i,
                seed,
                from,
                len,
            } => {
                let other = &seeds[usize::from(seed) % seeds.len()];
                let from = at(from, other.len());
                let end = (from + usize::from(len)).min(other.len());
                let i = at(i, data.len());
                data.splice(i..i, other[from..end].iter().copied());
            }
            Mutation::Truncate { at: i } => {
                let i = at(i, data.len());
                data.truncate(i);
            }
            Mutation::Repeat { at: i, len, times } => {
                let i = at(i, data.len());
                let end = (i + usize::from(len)).min(data.len());
                let run = data[i..end].to_vec();
                for _ in 0..times % 64 {
                    data.splice(i..i, run.iter().copied());
                }
            }
        }
        if data.len() > 1 << 20 {
            data.truncate(1 << 20);
        }
    }
    data
}

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    stack_test_support::repo_root()
}
