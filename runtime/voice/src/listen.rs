//! Push-to-talk: samples from the default audio input device (cpal; ALSA
//! on Linux), recorded until the caller says stop or the length limit is
//! reached, mixed down to mono and checked like a file's ([`Audio`]).
//!
//! Any device, sample rate, channel count and sample format cpal offers is
//! taken. Without a device (a server, a container) every way it can fail
//! is a [`ListenError`] that says which, and names `/voice FILE` as the way
//! round.
//!
//! # Threat model
//!
//! The samples come from the user's own device and are checked like a
//! file's: at most the length limit is kept (the callback stops appending
//! once it is reached), and [`Audio::from_samples`] refuses empty or silent
//! input. Nothing is written anywhere.

use std::sync::{Arc, Mutex};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::Sample;

use crate::{Audio, AudioLimits, VoiceError};

/// Why recording failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// No input device, or one that cannot record.
    #[error("no audio input device ({0}); record a WAV file and use /voice FILE")]
    NoDevice(String),
    /// The device records samples of a type this does not take.
    #[error("the input device records {0} samples, which /listen does not take; use /voice FILE")]
    UnsupportedFormat(String),
    /// The stream reported an error while recording.
    #[error("recording failed: {0}")]
    Failed(String),
    /// What was recorded is not usable audio (empty, silent, too long).
    #[error(transparent)]
    Audio(#[from] VoiceError),
}

/// What the device records, shown to the user before recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recording {
    /// The device's name.
    pub device: String,
    /// Its sample rate.
    pub sample_rate: u32,
    /// Its channel count (mixed down to mono).
    pub channels: u16,
}

/// Records from the default input device: `until` is called once the
/// stream runs (with what it records) and recording stops when it returns
/// (or earlier, once `limits.max_seconds` are held; what comes after is
/// dropped).
pub fn record(limits: &AudioLimits, until: impl FnOnce(&Recording)) -> Result<Audio, ListenError> {
    let host = cpal::default_host();
    let device = host.default_input_device().ok_or_else(|| {
        ListenError::NoDevice(format!("{} reports no microphone", host.id().name()))
    })?;
    let supported = device
        .default_input_config()
        .map_err(|e| ListenError::NoDevice(format!("the default input cannot record: {e}")))?;
    let channels = usize::from(supported.channels()).max(1);
    let rate = supported.sample_rate();
    let most = (limits.max_seconds.max(0.0) * f64::from(rate)) as usize;
    let recorded: Arc<Mutex<Vec<f32>>> = Arc::default();
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let config = supported.config();
    let sinks = Sinks {
        recorded: &recorded,
        failure: &failure,
        channels,
        most,
    };
    let stream = match supported.sample_format() {
        cpal::SampleFormat::F32 => sinks.stream::<f32>(&device, config),
        cpal::SampleFormat::I16 => sinks.stream::<i16>(&device, config),
        cpal::SampleFormat::U16 => sinks.stream::<u16>(&device, config),
        cpal::SampleFormat::I32 => sinks.stream::<i32>(&device, config),
        other => return Err(ListenError::UnsupportedFormat(other.to_string())),
    }
    .map_err(|e| ListenError::NoDevice(format!("opening it failed: {e}")))?;
    stream
        .play()
        .map_err(|e| ListenError::NoDevice(format!("starting it failed: {e}")))?;
    until(&Recording {
        device: device
            .description()
            .map(|d| d.name().to_string())
            .unwrap_or_else(|_| "default".into()),
        sample_rate: rate,
        channels: supported.channels(),
    });
    drop(stream);
    if let Some(error) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(ListenError::Failed(error));
    }
    let samples = std::mem::take(&mut *recorded.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Audio::from_samples(&samples, rate, limits)?)
}

/// Where an input stream's callbacks put what they get.
struct Sinks<'a> {
    recorded: &'a Arc<Mutex<Vec<f32>>>,
    failure: &'a Arc<Mutex<Option<String>>>,
    channels: usize,
    most: usize,
}

impl Sinks<'_> {
    /// An input stream that mixes each frame down to mono into `recorded`,
    /// up to `most` frames.
    fn stream<T>(
        &self,
        device: &cpal::Device,
        config: cpal::StreamConfig,
    ) -> Result<cpal::Stream, cpal::Error>
    where
        T: cpal::SizedSample,
        f32: cpal::FromSample<T>,
    {
        let (sink, failure) = (Arc::clone(self.recorded), Arc::clone(self.failure));
        let (channels, most) = (self.channels, self.most);
        device.build_input_stream::<T, _, _>(
            config,
            move |data: &[T], _| {
                let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
                for frame in data.chunks(channels) {
                    if sink.len() >= most {
                        break;
                    }
                    let sum: f32 = frame.iter().map(|s| f32::from_sample(*s)).sum();
                    sink.push(sum / channels as f32);
                }
            },
            move |error| {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
            },
            None,
        )
    }
}
