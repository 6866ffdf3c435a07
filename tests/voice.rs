//! Voice commands end to end, through the real `agent` binary: speech
//! synthesized with `espeak-ng` (no recordings are committed), transcribed
//! by the default speech model, run as a turn of the real default model
//! whose tool call runs in the sandbox; and bad audio refused with a
//! specific error before any model loads.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::spoken;
use serde_json::Value;

/// `agent ARGS` in `workspace`, with a private home (transcripts land
/// there), `stdin` piped in.
fn agent(args: &[&str], workspace: &Path, home: &Path, stdin: &[u8]) -> Output {
    let assets = stack_runtime::assets::asset_dir().expect("asset folder");
    let mut child = Command::new(common::agent_binary())
        .args(args)
        .current_dir(workspace)
        .env("HOME", home)
        .env("STACK_RUNTIME_ASSETS", &assets)
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("STACK_RUNTIME_TOOLS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    let mut input = child.stdin.take().expect("stdin");
    // The child may refuse the audio before reading all of it.
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().expect("agent output")
}

fn events(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[test]
fn a_spoken_command_becomes_a_turn_whose_tool_call_runs_in_the_sandbox() {
    let home = tempfile::tempdir().expect("home");
    let workspace = tempfile::tempdir().expect("workspace");
    std::fs::write(workspace.path().join("notes.txt"), "buy milk\n").expect("write");
    let wav = spoken("Use Python to print the number forty two.");
    let output = agent(
        &[
            "--tool-choice",
            "execute_code",
            "--temperature",
            "0",
            "--max-steps",
            "2",
            "--max-tokens",
            "96",
            "run",
            "--json",
            "--yes",
            "--audio",
            "-",
        ],
        workspace.path(),
        home.path(),
        &wav,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let events = events(&output);
    assert!(output.status.success(), "{stderr}\n{events:#?}");

    // What was heard comes first: the text, its language, duration,
    // timings and the hash of exactly the bytes sent.
    let heard = &events[0];
    assert_eq!(heard["event"], "transcribed", "{events:#?}");
    let text = heard["text"].as_str().expect("text").to_lowercase();
    for word in ["python", "print", "42"] {
        assert!(text.contains(word), "{word:?} not heard in {text:?}");
    }
    assert_eq!(heard["language"], "en");
    let duration = heard["duration_s"].as_f64().expect("duration");
    assert!((1.0..10.0).contains(&duration), "{duration}");
    assert!(heard["timings"]["model_ms"].as_f64().expect("timings") > 0.0);
    assert_eq!(
        heard["audio_sha256"],
        stack_runtime::assets::sha256_hex(&wav),
        "the hash of the audio sent"
    );

    // The transcript drove the model to a call, which ran in the sandbox:
    // a process (or WASI program) ran and exited (whether the 135M model's
    // code is right is up to the model: `failed` is a non-zero exit).
    let finished = events
        .iter()
        .find(|e| e["event"] == "tool_finished" && e["name"] == "execute_code")
        .unwrap_or_else(|| panic!("an execute_code call finished: {events:#?}"));
    let status = finished["outcome"]["status"].as_str().expect("status");
    assert!(
        status == "ok" || status == "failed",
        "the code ran (status {status}): {finished:#}"
    );
    assert!(
        finished["outcome"]["exit_code"].is_i64(),
        "a sandboxed process ran to its exit: {finished:#}"
    );
    assert_eq!(
        events.last().map(|e| e["event"].clone()),
        Some(Value::from("turn_finished"))
    );

    // The session transcript keeps what was heard and the audio's hash,
    // and (keep_audio unset) not the audio.
    let sessions = home.path().join(".local/share/stack-runtime/sessions");
    let transcript = std::fs::read_dir(&sessions)
        .expect("sessions folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .expect("a transcript");
    let lines: Vec<Value> = std::fs::read_to_string(&transcript)
        .expect("read")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let user = lines
        .iter()
        .find(|m| m["role"] == "user")
        .expect("the user's message");
    assert_eq!(user["content"], heard["text"]);
    assert_eq!(user["voice"]["audio_sha256"], heard["audio_sha256"]);
    assert_eq!(user["voice"]["transcript"], heard["text"]);
    assert_eq!(user["voice"]["edited"], false);
    let kept_audio: Vec<_> = std::fs::read_dir(&sessions)
        .expect("sessions folder")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".audio"))
        .collect();
    assert!(kept_audio.is_empty(), "no audio kept: {kept_audio:?}");
}

/// Bad audio is refused before any model loads, each with its own words,
/// and nothing is left behind.
#[test]
fn bad_audio_gets_a_specific_error() {
    let home = tempfile::tempdir().expect("home");
    let workspace = tempfile::tempdir().expect("workspace");
    let dir = workspace.path();
    let speech = spoken("list the files");
    // A file whose header announces twice the data it holds.
    let mut truncated = speech.clone();
    let data = truncated
        .windows(4)
        .position(|w| w == b"data")
        .expect("data chunk");
    let held = (truncated.len() - data - 8) as u32;
    truncated[data + 4..data + 8].copy_from_slice(&(held * 2).to_le_bytes());
    std::fs::write(dir.join("truncated.wav"), &truncated).expect("write");
    std::fs::write(
        dir.join("song.mp3"),
        b"ID3\x04\x00\x00\x00\x00\x00\x00 not a wav",
    )
    .expect("write");
    let silence = Command::new("sox")
        .args(["-n", "-r", "16000", "-c", "1", "-b", "16"])
        .arg(dir.join("silence.wav"))
        .args(["trim", "0", "2"])
        .status()
        .expect("sox");
    assert!(silence.success());
    std::fs::write(dir.join("speech.wav"), &speech).expect("write");

    for (file, extra, expected) in [
        ("song.mp3", &[][..], "not a WAV file"),
        ("truncated.wav", &[][..], "truncated"),
        ("silence.wav", &[][..], "silent"),
        (
            "speech.wav",
            &["--max-audio-seconds", "0.5"][..],
            "the limit is",
        ),
        ("missing.wav", &[][..], "No such file"),
    ] {
        let mut args = vec!["run", "--json", "--audio", file];
        args.extend_from_slice(extra);
        let output = agent(&args, dir, home.path(), b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{file}: accepted");
        assert!(
            stderr.contains(expected) && stderr.contains(file),
            "{file}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{file}: no events");
    }
    // From stdin too.
    let output = agent(&["run", "--audio", "-"], dir, home.path(), b"RIFF\x00\x00");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("not a WAV file"),
        "{stderr}"
    );
    // Nothing was kept for the refused turns.
    assert!(!home
        .path()
        .join(".local/share/stack-runtime/sessions")
        .exists());
}
