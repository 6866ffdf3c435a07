//! `agent keys`: the key stored data is encrypted with (`show`), and
//! re-encrypting everything with a new one (`rotate`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use stack_runtime::policy::Policy;
use stack_seal::keys::KeyStore;
use stack_seal::record::{reseal, sealed_with};
use stack_seal::{Key, Vault};

/// `agent keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Which key seals new files, where it is kept, and how many stored
    /// files are sealed with which key.
    Show,
    /// Makes a new key and seals every stored file under the policy's
    /// transcript folder with it (and, with `[privacy] encrypt = true`,
    /// every file still in plaintext). The old key is kept as
    /// `keys/retired/ID` (or in the OS keyring's `retired@` entry, where
    /// the keys are kept there) for files elsewhere (an `--audit-log` of `agent
    /// mcp`, another policy's folder), which are sealed again when next
    /// appended to. Refused while an agent runs; a rotation cut short is
    /// finished by running it again.
    Rotate {
        /// Remove the old key (and every retired one) instead of keeping
        /// it: files it sealed that the rotation did not reach can no
        /// longer be read.
        #[arg(long)]
        forget_old: bool,
    },
}

pub fn run(command: KeysCommand, policy: &str) -> anyhow::Result<ExitCode> {
    let policy = Policy::load_named(policy).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let folder = policy
        .privacy
        .transcript_dir
        .as_deref()
        .map(stack_runtime::agent::expand_home);
    let encrypt = policy.privacy.encrypt.unwrap_or(false);
    let keys = KeyStore::for_user()?;
    match command {
        KeysCommand::Show => {
            let vault = keys.vault(false)?;
            println!(
                "encryption  {}",
                if encrypt {
                    "on ([privacy] encrypt = true)"
                } else {
                    "off"
                }
            );
            println!("kept in     {}", keys.describe_home());
            println!("keys        {}", vault.describe_keys());
            if let Some(folder) = &folder {
                let (mut sealed, mut plain) = (std::collections::BTreeMap::new(), 0usize);
                for file in stored_files(folder) {
                    match sealed_with(&file) {
                        Ok(Some(header)) => {
                            *sealed.entry(header.key.to_string()).or_insert(0usize) += 1
                        }
                        Ok(None) => plain += 1,
                        Err(err) => println!("unreadable  {err}"),
                    }
                }
                for (key, count) in sealed {
                    println!("sealed      {count} file(s) with key {key}");
                }
                println!("plaintext   {plain} file(s) in {}", folder.display());
            }
        }
        KeysCommand::Rotate { forget_old } => {
            let rotation = keys.begin_rotation()?;
            let new = rotation.new_key().clone();
            let (mut resealed, mut sealed_now) = (0usize, 0usize);
            if let Some(folder) = &folder {
                for file in stored_files(folder) {
                    if sealed_with(&file)?.is_some() {
                        if reseal(&file, rotation.vault(), &new)? {
                            resealed += 1;
                        }
                    } else if encrypt && seal_plaintext(folder, &file, &new)? {
                        sealed_now += 1;
                    }
                }
            }
            let old = rotation.old_key().id();
            let kept = rotation.old_key_kept();
            rotation.finish(forget_old)?;
            println!(
                "rotated: key {old} → {}; {resealed} file(s) re-encrypted{}; {}",
                new.id(),
                if sealed_now > 0 {
                    format!(", {sealed_now} plaintext file(s) encrypted")
                } else {
                    String::new()
                },
                if forget_old {
                    "the old key is gone".to_string()
                } else {
                    format!(
                        "the old key is kept {kept} for files elsewhere (--forget-old removes it)"
                    )
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every stored file under the transcript folder (transcripts, KV state,
/// history, the audit log, and those of `serve/`), symlinks not followed;
/// consent records and temporary files left out.
fn stored_files(folder: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![(folder.to_path_buf(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if kind.is_dir() && depth < 3 {
                pending.push((path, depth + 1));
            } else if kind.is_file()
                && !name.ends_with(".tmp")
                && !name.ends_with(".consent.json")
                && !name.contains(".torn-")
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Seals a plaintext stored file with `key`, by what its name says it is;
/// `false` for a file that is not one the runtime keeps (left alone).
fn seal_plaintext(folder: &Path, file: &Path, key: &Key) -> anyhow::Result<bool> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let parent = file
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    let id_of = |suffix: &str| {
        name.strip_suffix(suffix)
            .filter(|id| stack_runtime::agent::check_session_id(id).is_ok())
    };
    let vault = Vault::sealing(key.clone(), stack_seal::key::KeySource::Given);
    let records = |context: String| -> anyhow::Result<bool> {
        // Appending nothing seals it (a plaintext file is rewritten sealed).
        stack_seal::record::Appender::open(
            file,
            &context,
            &vault,
            stack_seal::record::Hold::Nothing,
        )?;
        Ok(true)
    };
    // The audit log first: `audit` is also a well-formed session id.
    if name == "audit.jsonl" && parent == Some("audit") && file.starts_with(folder) {
        return records("audit".into());
    }
    if let Some(id) = id_of(".jsonl") {
        return records(format!("transcript:{id}"));
    }
    if let Some(id) = id_of(".audio") {
        return records(stack_runtime::agent::voice::audio_context(id));
    }
    if let Some(id) = id_of(".kv") {
        let bytes = zeroize::Zeroizing::new(std::fs::read(file)?);
        stack_seal::blob::seal_blob(file, &format!("kv:{id}"), key, &bytes)?;
        return Ok(true);
    }
    if parent == Some("history") && stack_runtime::agent::check_session_id(name).is_ok() {
        return records(format!("history:{name}"));
    }
    Ok(false)
}
