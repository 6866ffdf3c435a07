//! The `agent` REPL in a real terminal (tmux): start it, send a prompt,
//! approve a tool call, see the result, `/exit`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

fn tmux(args: &[&str]) -> String {
    let output = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux (installed by scripts/setup)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn screen(session: &str) -> String {
    tmux(&["capture-pane", "-p", "-J", "-S", "-200", "-t", session])
}

fn wait_for(session: &str, needle: &str, timeout: Duration) -> String {
    let started = Instant::now();
    loop {
        let text = screen(session);
        if text.contains(needle) {
            return text;
        }
        assert!(
            started.elapsed() < timeout,
            "`{needle}` did not appear within {timeout:?}; screen:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `needle` is on the screen `count` times.
fn wait_for_count(session: &str, needle: &str, count: usize, timeout: Duration) -> String {
    let started = Instant::now();
    loop {
        let text = screen(session);
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(
            started.elapsed() < timeout,
            "`{needle}` did not appear {count} times within {timeout:?}; screen:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_repl_runs_a_turn_with_an_approval_and_exits() {
    let home = tempfile::tempdir().expect("tempdir");
    let workspace = tempfile::tempdir().expect("tempdir");
    let assets = stack_runtime::assets::asset_dir().expect("asset folder");
    let session = format!("stack-repl-{}", std::process::id());
    let command = format!(
        "cd {} && HOME={} STACK_RUNTIME_ASSETS={} NO_COLOR=1 {} --tool-choice write_file --max-steps 1 --temperature 0; echo REPL-EXITED; sleep 30",
        workspace.path().display(),
        home.path().display(),
        assets.display(),
        env!("CARGO_BIN_EXE_agent"),
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "220",
        "-y",
        "50",
        &command,
    ]);
    let cleanup = scopeguard(session.clone());
    // The first interactive start asks once whether to keep transcripts,
    // and records the answer in the user config.
    wait_for(&session, "[y/N]", Duration::from_secs(60));
    tmux(&["send-keys", "-t", &session, "y", "Enter"]);
    let banner = wait_for(&session, "type /help", Duration::from_secs(60));
    let config = std::fs::read_to_string(home.path().join(".config/stack-runtime/config.toml"))
        .expect("the answer is recorded");
    assert!(config.contains("keep_transcripts = true"), "{config}");
    assert!(
        banner.contains("Stack Runtime")
            && banner.contains("workspace")
            && banner.contains("saving to"),
        "{banner}"
    );
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "Write the word hello to hello.txt",
        "Enter",
    ]);
    wait_for(&session, "[y]es / [n]o / [a]lways", Duration::from_secs(60));
    tmux(&["send-keys", "-t", &session, "y", "Enter"]);
    let after = wait_for(&session, "step(s)", Duration::from_secs(60));
    // The approved call ran and its result is shown (whether the small
    // model picked a path inside the workspace is up to the model).
    assert!(after.contains("⚙ write_file"), "{after}");
    assert!(
        after.contains("→ ok write_file") || after.contains("→ failed write_file"),
        "{after}"
    );
    assert!(
        !after.contains("→ denied"),
        "the approval was honoured: {after}"
    );
    tmux(&["send-keys", "-t", &session, "/approvals", "Enter"]);
    wait_for(
        &session,
        "no grants in this session",
        Duration::from_secs(10),
    );
    // A spoken command: `/voice FILE` shows what was heard on an editable
    // line, and what is sent is the line as edited.
    let said = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "140", "-w"])
        .arg(workspace.path().join("say.wav"))
        .arg("Write the word goodbye to bye dot text.")
        .status()
        .expect("espeak-ng (installed by scripts/setup)");
    assert!(said.success());
    tmux(&["send-keys", "-t", &session, "/voice say.wav", "Enter"]);
    let heard = wait_for(&session, "send›", Duration::from_secs(120));
    assert!(heard.contains("🎤 heard"), "{heard}");
    assert!(heard.to_lowercase().contains("goodbye"), "{heard}");
    tmux(&["send-keys", "-t", &session, "End"]);
    tmux(&["send-keys", "-t", &session, "-l", " now"]);
    tmux(&["send-keys", "-t", &session, "Enter"]);
    wait_for_count(
        &session,
        "[y]es / [n]o / [a]lways",
        2,
        Duration::from_secs(60),
    );
    tmux(&["send-keys", "-t", &session, "y", "Enter"]);
    wait_for_count(&session, "step(s)", 2, Duration::from_secs(60));
    // Bad audio and no microphone: said, and the REPL goes on.
    tmux(&["send-keys", "-t", &session, "/voice missing.wav", "Enter"]);
    wait_for(
        &session,
        "error: audio missing.wav",
        Duration::from_secs(10),
    );
    tmux(&["send-keys", "-t", &session, "/listen", "Enter"]);
    wait_for(&session, "use /voice FILE", Duration::from_secs(10));
    tmux(&["send-keys", "-t", &session, "/exit", "Enter"]);
    wait_for(&session, "REPL-EXITED", Duration::from_secs(10));
    let saved: Vec<String> =
        std::fs::read_dir(home.path().join(".local/share/stack-runtime/sessions"))
            .expect("transcripts")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
    let count = |suffix: &str| saved.iter().filter(|n| n.ends_with(suffix)).count();
    assert_eq!(
        count(".jsonl"),
        1,
        "the session was saved as it went: {saved:?}"
    );
    assert_eq!(count(".kv"), 1, "and its KV cache on exit: {saved:?}");
    // The line typed is in the session's own history file.
    let history = std::fs::read_dir(
        home.path()
            .join(".local/share/stack-runtime/sessions/history"),
    )
    .expect("history folder")
    .filter_map(Result::ok)
    .map(|e| std::fs::read_to_string(e.path()).expect("read"))
    .collect::<String>();
    assert!(history.contains("Write the word hello"), "{history}");
    // The spoken turn's message is the edited line; the transcript keeps
    // what was heard, that it was edited, and the audio's hash.
    let transcript = std::fs::read_dir(home.path().join(".local/share/stack-runtime/sessions"))
        .expect("transcripts")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .expect("a transcript");
    let spoken = std::fs::read_to_string(&transcript)
        .expect("read")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["role"] == "user" && m.get("voice").is_some())
        .expect("the spoken turn's message");
    let content = spoken["content"].as_str().expect("content");
    assert!(content.ends_with(" now"), "{spoken}");
    assert_eq!(spoken["voice"]["edited"], true, "{spoken}");
    let wav = std::fs::read(workspace.path().join("say.wav")).expect("wav");
    assert_eq!(
        spoken["voice"]["audio_sha256"],
        stack_runtime::assets::sha256_hex(&wav)
    );
    drop(cleanup);
}

struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

fn scopeguard(session: String) -> Guard {
    Guard(session)
}
