//! Push-to-talk (`stack_voice::listen`, the REPL's `/listen`) through a real
//! audio stack without a microphone: ALSA's default input is a `plug` over
//! a `file` PCM whose input is speech synthesized by espeak-ng (16 kHz mono
//! S16_LE, converted by ALSA to whatever cpal asks for), so the samples
//! travel the whole way a microphone's do: alsa-lib, cpal's input stream,
//! the mixdown to mono, the checks, the resampler and Whisper.
//!
//! ALSA's `null` PCM under the `file` one is not paced in real time: the
//! recording fills up to the length limit as soon as the stream starts, so
//! the test sets a short limit and expects exactly that much audio, the
//! speech followed by silence.
//!
//! One test in this binary: it points `ALSA_CONFIG_PATH` at its own
//! configuration before anything reads it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use stack_runtime::voice::listen::{record, ListenError};
use stack_runtime::voice::{AudioLimits, ModelOptions, SpeechModel, TranscribeOptions};

/// `text` spoken by espeak-ng, as raw 16 kHz mono signed 16-bit samples.
fn raw_speech(text: &str, dir: &Path) -> std::path::PathBuf {
    let wav = dir.join("speech.wav");
    let raw = dir.join("speech.raw");
    let said = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "140", "-w"])
        .arg(&wav)
        .arg(text)
        .status()
        .expect("espeak-ng (scripts/setup installs it)");
    assert!(said.success());
    let converted = Command::new("sox")
        .arg(&wav)
        .args([
            "-t", "raw", "-r", "16000", "-c", "1", "-e", "signed", "-b", "16",
        ])
        .arg(&raw)
        .status()
        .expect("sox (scripts/setup installs it)");
    assert!(converted.success());
    raw
}

/// An ALSA configuration whose default PCM plays `infile` as its input.
fn alsa_config(infile: &Path) -> String {
    format!(
        r#"pcm.!default {{
    type plug
    slave {{
        pcm "speech"
        format S16_LE
        rate 16000
        channels 1
    }}
}}
pcm.speech {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{}"
    format "raw"
}}
"#,
        infile.display()
    )
}

#[test]
fn push_to_talk_records_speech_from_the_default_input_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let speech = raw_speech("List the Python files in this folder.", dir.path());
    let config = dir.path().join("asound.conf");
    std::fs::write(&config, alsa_config(&speech)).expect("config");
    let system = Path::new("/usr/share/alsa/alsa.conf");
    assert!(
        system.is_file(),
        "alsa-lib's configuration is missing (libasound2)"
    );
    // Before any thread of this process reads the environment through
    // alsa-lib (this binary's only test).
    std::env::set_var(
        "ALSA_CONFIG_PATH",
        format!("{}:{}", system.display(), config.display()),
    );
    let limits = AudioLimits { max_seconds: 6.0 };
    let mut shown = None;
    let audio = record(&limits, |recording| {
        shown = Some(recording.clone());
        // (Unpaced, the device fills the limit in milliseconds; the
        // wait leaves room for a loaded machine.)
        std::thread::sleep(Duration::from_secs(2));
    })
    .expect("recorded");
    let shown = shown.expect("told what it records");
    assert!(shown.sample_rate > 0 && shown.channels > 0, "{shown:?}");
    // The speech (2.3 s) and silence after it, up to the limit.
    assert!(
        (audio.seconds() - limits.max_seconds).abs() < 0.05,
        "{} s recorded at {shown:?}",
        audio.seconds()
    );
    let model = SpeechModel::load(
        &stack_runtime::voice::default_model_dir().expect("run scripts/setup: the speech model"),
        ModelOptions::default(),
    )
    .expect("speech model");
    let heard = model
        .transcribe(&audio, &TranscribeOptions::default())
        .expect("transcribed");
    let text = heard.text.to_lowercase();
    assert!(
        // (Whisper tiny.en hears espeak's "files" as "tiles" at times.)
        text.contains("list") && text.contains("python") && text.contains("folder"),
        "{text:?}"
    );

    // A default input that cannot be opened: a clear error that names the
    // way round, and nothing recorded. (alsa-lib reads the changed file
    // again: cpal frees ALSA's global configuration when its last context
    // goes, which it did with the stream above.)
    std::fs::write(
        &config,
        "pcm.!default { type hw card 99 device 0 }\nctl.!default { type hw card 99 }\n",
    )
    .expect("config");
    let failed = record(&limits, |_| {}).expect_err("no such card");
    assert!(matches!(failed, ListenError::NoDevice(_)), "{failed:?}");
    assert!(failed.to_string().contains("/voice FILE"), "{failed}");
}
