//! Real speech through the real model: spoken commands synthesized with
//! `espeak-ng` (no recordings are committed), transcribed by the default
//! speech model (Whisper tiny.en, CTranslate2), scored by word error rate.

use std::path::{Path, PathBuf};
use std::process::Command;

use stack_voice::{Audio, AudioLimits, ModelOptions, SpeechModel, TranscribeOptions, VoiceError};

/// The commands spoken, as a user would say them to the agent.
const SCRIPT: &[&str] = &[
    "list the python files in this folder",
    "read the file named notes dot text",
    "run the tests and show me what failed",
    "write a function that adds two numbers",
    "search the workspace for the word budget",
    "create a new file called hello world",
];

fn model() -> SpeechModel {
    let dir = stack_voice::default_model_dir().expect("asset folder");
    SpeechModel::load(&dir, ModelOptions::default())
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup)"))
}

/// `text` spoken by espeak-ng into `out` (22.05 kHz mono, its native
/// rate), then converted by sox to `rate` Hz and `channels` channels.
fn speak(text: &str, dir: &Path, name: &str, rate: u32, channels: u32) -> PathBuf {
    let raw = dir.join(format!("{name}.espeak.wav"));
    let status = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "150", "-w"])
        .arg(&raw)
        .arg(text)
        .status()
        .expect("espeak-ng (scripts/setup installs it)");
    assert!(status.success(), "espeak-ng failed");
    let out = dir.join(format!("{name}.wav"));
    let status = Command::new("sox")
        .arg(&raw)
        .args([
            "-r",
            &rate.to_string(),
            "-c",
            &channels.to_string(),
            "-b",
            "16",
        ])
        .arg(&out)
        .status()
        .expect("sox (scripts/setup installs it)");
    assert!(status.success(), "sox failed");
    out
}

/// Words, lowercased, without punctuation; digits spelled as the script
/// has them.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .replace(['.', ',', '?', '!', '"', ':', ';'], " ")
        .replace('-', " ")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Word-level Levenshtein distance.
fn edits(reference: &[String], hypothesis: &[String]) -> usize {
    let mut row: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, h) in hypothesis.iter().enumerate() {
            let substitution = previous + usize::from(r != h);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[hypothesis.len()]
}

fn word_error_rate(model: &SpeechModel, rate: u32, channels: u32) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut errors, mut total) = (0, 0);
    for (i, line) in SCRIPT.iter().enumerate() {
        let wav = speak(line, dir.path(), &format!("cmd{i}"), rate, channels);
        let bytes = std::fs::read(&wav).expect("wav");
        let audio = Audio::from_wav(&bytes, &AudioLimits::default()).expect("decodes");
        assert_eq!(audio.source().map(|s| s.sample_rate), Some(rate));
        let heard = model
            .transcribe(&audio, &TranscribeOptions::default())
            .expect("transcribes");
        let (reference, hypothesis) = (words(line), words(&heard.text));
        let e = edits(&reference, &hypothesis);
        eprintln!(
            "{rate} Hz x{channels}: {line:?} -> {:?} ({e} errors, RTF {:.3})",
            heard.text,
            heard.real_time_factor()
        );
        assert_eq!(heard.language, "en");
        assert_eq!(heard.audio_sha256.len(), 64);
        errors += e;
        total += reference.len();
    }
    let wer = errors as f64 / total as f64;
    eprintln!(
        "{rate} Hz x{channels}: WER {:.1}% ({errors}/{total})",
        wer * 100.0
    );
    wer
}

#[test]
fn spoken_commands_at_16_khz_mono_are_transcribed() {
    let wer = word_error_rate(&model(), 16_000, 1);
    assert!(wer < 0.25, "WER {:.1}%", wer * 100.0);
}

/// The build's replacement in CTranslate2 (runtime/voice/cpp) is the
/// allocator that runs: it keeps large buffers, and each decoding step
/// reuses the last one's. On x86-64 Linux the products are oneDNN's: this
/// process mapped the pinned `libdnnl.so.3`. (That the agent finds the copy
/// placed beside it is checked by scripts/test-as-user, which runs a copy
/// of it elsewhere.)
#[test]
fn ctranslate2_runs_the_replacement_allocator_and_onednn() {
    let model = SpeechModel::load(
        &stack_voice::default_model_dir().expect("assets"),
        ModelOptions {
            threads: 2,
            ..ModelOptions::default()
        },
    )
    .expect("the default speech model (run scripts/setup)");
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = speak(
        "List the Python files in this folder.",
        dir.path(),
        "one",
        16_000,
        1,
    );
    let bytes = std::fs::read(&wav).expect("wav");
    let audio = Audio::from_wav(&bytes, &AudioLimits::default()).expect("decodes");
    let reused = stack_voice::reused_buffers();
    let heard = model
        .transcribe(&audio, &TranscribeOptions::default())
        .expect("transcribes");
    assert!(heard.text.to_lowercase().contains("python"), "{heard:?}");
    assert!(
        stack_voice::reused_buffers() > reused,
        "no tensor buffer was reused: CTranslate2 allocated through its own allocator"
    );
    if cfg!(all(
        target_arch = "x86_64",
        target_os = "linux",
        target_env = "gnu"
    )) {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
        // The path is what follows the fifth field (it may hold spaces).
        let onednn: std::collections::BTreeSet<&str> = maps
            .lines()
            .filter_map(|line| {
                let mut rest = line;
                for _ in 0..5 {
                    rest = rest.trim_start().split_once(char::is_whitespace)?.1;
                }
                let path = rest.trim();
                Some(path.strip_suffix(" (deleted)").unwrap_or(path))
            })
            .filter(|path| path.ends_with("/libdnnl.so.3"))
            .collect();
        assert!(
            !onednn.is_empty(),
            "oneDNN's libdnnl.so.3 is not mapped: CTranslate2 was built without oneDNN, or with one compiled from source (run scripts/setup, which writes the override that links the prebuilt one)"
        );
        // The pinned build from Intel's wheel (scripts/setup), never a
        // system oneDNN of another version.
        for path in onednn {
            let bytes = std::fs::read(path).expect("the mapped oneDNN");
            assert_eq!(
                stack_assets::sha256_hex(&bytes),
                stack_assets::ONEDNN_LIBRARY_SHA256,
                "{path} is not the pinned oneDNN 3.2"
            );
        }
    }
}

#[test]
fn spoken_commands_at_44_1_khz_stereo_are_transcribed() {
    let wer = word_error_rate(&model(), 44_100, 2);
    assert!(wer < 0.25, "WER {:.1}%", wer * 100.0);
}

#[test]
fn noise_without_speech_is_refused_as_no_speech() {
    // Quiet white noise (not silence: the decoder's silence check passes
    // it to the model, whose no-speech rule must catch it).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<f32> = (0..16_000 * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        })
        .collect();
    let audio = Audio::from_samples(&noise, 16_000, &AudioLimits::default()).expect("audio");
    match model().transcribe(&audio, &TranscribeOptions::default()) {
        Err(VoiceError::NoSpeech { .. }) => {}
        other => panic!("expected NoSpeech, got {other:?}"),
    }
}

#[test]
fn a_folder_without_the_model_files_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    match SpeechModel::load(dir.path(), ModelOptions::default()) {
        Err(VoiceError::MissingModelFile {
            file: "model.bin", ..
        }) => {}
        other => panic!("expected MissingModelFile, got {other:?}"),
    }
}

#[test]
fn an_english_only_model_refuses_another_language() {
    let tone: Vec<f32> = (0..16_000)
        .map(|i| (i as f32 * 300.0 * std::f32::consts::TAU / 16_000.0).sin() * 0.3)
        .collect();
    let audio = Audio::from_samples(&tone, 16_000, &AudioLimits::default()).expect("audio");
    let options = TranscribeOptions {
        language: Some("de".into()),
        ..TranscribeOptions::default()
    };
    match model().transcribe(&audio, &options) {
        Err(VoiceError::Language { language, .. }) => assert_eq!(language, "de"),
        other => panic!("expected Language, got {other:?}"),
    }
}
