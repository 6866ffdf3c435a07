//! Whisper's log-mel front end, as faster-whisper computes it.
//!
//! For 16 kHz mono samples: 160 zeros are appended, a centred STFT (400-point
//! periodic Hann window, hop 160, reflect padding) gives power spectra, the
//! last frame is dropped, Slaney-normalised mel filters (the same formula as
//! librosa and faster-whisper) map them to `n_mels` bands, and the log10 is
//! clamped to 8 below the clip's maximum and scaled to `(x + 4) / 4`. The
//! model then reads 30 s windows of 3000 frames, the last one zero-padded.
//!
//! ct2rs has a front end of its own (in its `whisper` helper), left off
//! here: it clamps each frame against its own maximum rather than the
//! clip's, which is not what Whisper was trained on.

use std::sync::Arc;

use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

/// The FFT size.
pub const N_FFT: usize = 400;
/// Samples between frames (10 ms).
pub const HOP: usize = 160;
/// Frames in one 30 s window of the encoder.
pub const WINDOW_FRAMES: usize = 3000;

/// Log-mel features of one clip: `n_mels` rows of `frames` values.
#[derive(Debug, Clone)]
pub struct Features {
    n_mels: usize,
    frames: usize,
    values: Vec<f32>,
}

impl Features {
    /// The frames that hold the clip (faster-whisper's `content_frames`).
    pub fn content_frames(&self) -> usize {
        self.frames.saturating_sub(1)
    }

    /// The clip cut into 30 s windows, each `n_mels × 3000`, row-major,
    /// zero-padded at the end; returns the batch and its size.
    pub fn windows(&self) -> (Vec<f32>, usize) {
        let content = self.content_frames();
        let count = content.div_ceil(WINDOW_FRAMES).max(1);
        let mut batch = vec![0.0f32; count * self.n_mels * WINDOW_FRAMES];
        for window in 0..count {
            let start = window * WINDOW_FRAMES;
            let take = WINDOW_FRAMES.min(content.saturating_sub(start));
            for mel in 0..self.n_mels {
                let from = mel * self.frames + start;
                let to = (window * self.n_mels + mel) * WINDOW_FRAMES;
                batch[to..to + take].copy_from_slice(&self.values[from..from + take]);
            }
        }
        (batch, count)
    }
}

/// Computes log-mel features for one model's mel count.
pub struct LogMel {
    n_mels: usize,
    filters: Vec<f32>,
    window: Vec<f32>,
    fft: Arc<dyn Fft<f32>>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel")
            .field("n_mels", &self.n_mels)
            .finish()
    }
}

impl LogMel {
    /// A front end with `n_mels` bands (80 for most Whisper models, 128
    /// for large-v3).
    pub fn new(n_mels: usize) -> LogMel {
        let window = (0..N_FFT)
            .map(|n| (0.5 - 0.5 * (std::f64::consts::TAU * n as f64 / N_FFT as f64).cos()) as f32)
            .collect();
        LogMel {
            n_mels,
            filters: mel_filters(16_000.0, N_FFT, n_mels),
            window,
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
        }
    }

    /// The features of 16 kHz mono `samples`.
    pub fn compute(&self, samples: &[f32]) -> Features {
        let bins = N_FFT / 2 + 1;
        let mut padded_input = Vec::with_capacity(samples.len() + HOP);
        padded_input.extend_from_slice(samples);
        padded_input.extend(std::iter::repeat_n(0.0, HOP));
        let signal = reflect_pad(&padded_input, N_FFT / 2);
        let stft_frames = 1 + (signal.len() - N_FFT) / HOP;
        // The last STFT frame is dropped, as in faster-whisper.
        let frames = stft_frames - 1;
        let mut values = vec![0.0f32; self.n_mels * frames];
        let mut buffer = vec![Complex32::new(0.0, 0.0); N_FFT];
        let mut scratch = vec![Complex32::new(0.0, 0.0); self.fft.get_inplace_scratch_len()];
        let mut power = vec![0.0f32; bins];
        for frame in 0..frames {
            let start = frame * HOP;
            for (k, slot) in buffer.iter_mut().enumerate() {
                *slot = Complex32::new(signal[start + k] * self.window[k], 0.0);
            }
            self.fft.process_with_scratch(&mut buffer, &mut scratch);
            for (bin, p) in power.iter_mut().enumerate() {
                *p = buffer[bin].norm_sqr();
            }
            for mel in 0..self.n_mels {
                let row = &self.filters[mel * bins..(mel + 1) * bins];
                let energy: f32 = row.iter().zip(&power).map(|(w, p)| w * p).sum();
                values[mel * frames + frame] = energy.max(1e-10).log10();
            }
        }
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for value in &mut values {
            *value = (value.max(max - 8.0) + 4.0) / 4.0;
        }
        Features {
            n_mels: self.n_mels,
            frames,
            values,
        }
    }
}

/// `signal` with `pad` samples mirrored on each side (numpy's "reflect":
/// the edge sample is not repeated); short signals reflect back and forth.
fn reflect_pad(signal: &[f32], pad: usize) -> Vec<f32> {
    let n = signal.len() as isize;
    if n <= 1 {
        let value = signal.first().copied().unwrap_or(0.0);
        return vec![value; signal.len() + 2 * pad];
    }
    let period = 2 * (n - 1);
    (-(pad as isize)..n + pad as isize)
        .map(|i| {
            let mut j = i.rem_euclid(period);
            if j >= n {
                j = period - j;
            }
            signal[j as usize]
        })
        .collect()
}

/// Slaney-style mel filters (`n_mels × (n_fft/2 + 1)`, row-major), as
/// librosa's `filters.mel(sr, n_fft, n_mels)` and faster-whisper's
/// `get_mel_filters` compute them.
fn mel_filters(sample_rate: f64, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let bins = n_fft / 2 + 1;
    let fft_freqs: Vec<f64> = (0..bins)
        .map(|i| i as f64 * sample_rate / n_fft as f64)
        .collect();
    // Mel scale: linear below 1 kHz, logarithmic above.
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let log_step = 6.4f64.ln() / 27.0;
    let hz_to_mel = |hz: f64| {
        if hz >= min_log_hz {
            min_log_mel + (hz / min_log_hz).ln() / log_step
        } else {
            hz / f_sp
        }
    };
    let mel_to_hz = |mel: f64| {
        if mel >= min_log_mel {
            min_log_hz * (log_step * (mel - min_log_mel)).exp()
        } else {
            f_sp * mel
        }
    };
    let max_mel = hz_to_mel(sample_rate / 2.0);
    let mel_freqs: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(max_mel * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut filters = vec![0.0f32; n_mels * bins];
    for mel in 0..n_mels {
        let (low, centre, high) = (mel_freqs[mel], mel_freqs[mel + 1], mel_freqs[mel + 2]);
        let norm = 2.0 / (high - low);
        for (bin, &freq) in fft_freqs.iter().enumerate() {
            let rising = (freq - low) / (centre - low);
            let falling = (high - freq) / (high - centre);
            filters[mel * bins + bin] = (rising.min(falling).max(0.0) * norm) as f32;
        }
    }
    filters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mel_filters_match_librosa() {
        // librosa.filters.mel(sr=16000, n_fft=400, n_mels=80), which Whisper
        // ships in mel_filters.npz: a few entries.
        let filters = mel_filters(16_000.0, 400, 80);
        let bins = 201;
        let at = |mel: usize, bin: usize| filters[mel * bins + bin];
        // (Values printed by faster-whisper 1.2.1's `get_mel_filters`.)
        for (mel, bin, expected) in [
            (0, 1, 0.024_862_594_902_515_41),
            (1, 2, 0.022_871_771_827_340_126),
            (40, 43, 0.014_735_565_520_823_002),
            (79, 192, 0.003_164_711_641_147_732_7),
            (79, 200, 0.0),
        ] {
            assert!(
                (f64::from(at(mel, bin)) - expected).abs() < 1e-7,
                "[{mel}, {bin}] = {}",
                at(mel, bin)
            );
        }
        // Every band has some weight, and none reaches past Nyquist.
        for mel in 0..80 {
            assert!((0..bins).any(|b| at(mel, b) > 0.0), "band {mel} is empty");
        }
    }

    #[test]
    fn reflect_padding_mirrors_without_repeating_the_edge() {
        assert_eq!(
            reflect_pad(&[1.0, 2.0, 3.0, 4.0], 2),
            vec![3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0]
        );
        assert_eq!(reflect_pad(&[5.0], 2), vec![5.0; 5]);
    }

    #[test]
    fn one_second_gives_one_window_of_100_frames_of_content() {
        let tone: Vec<f32> = (0..16_000)
            .map(|i| (i as f32 * 1000.0 * std::f32::consts::TAU / 16_000.0).sin())
            .collect();
        let features = LogMel::new(80).compute(&tone);
        assert_eq!(features.content_frames(), 100);
        let (batch, count) = features.windows();
        assert_eq!(count, 1);
        assert_eq!(batch.len(), 80 * WINDOW_FRAMES);
        // Values are in Whisper's range, and the padding is zero.
        assert!(batch.iter().all(|v| (-1.0..=2.0).contains(v)));
        for mel in 0..80 {
            let row = &batch[mel * WINDOW_FRAMES..(mel + 1) * WINDOW_FRAMES];
            assert!(
                row[100..].iter().all(|v| *v == 0.0),
                "band {mel} is padded from frame 100"
            );
            assert!(row[99] != 0.0, "band {mel} holds the clip up to frame 99");
        }
        // A 1 kHz tone: its mel band is the loudest in a middle frame.
        let frame = 50;
        let loudest = (0..80)
            .max_by(|&a, &b| {
                batch[a * WINDOW_FRAMES + frame].total_cmp(&batch[b * WINDOW_FRAMES + frame])
            })
            .expect("bands");
        let centre_hz = {
            let f_sp = 200.0 / 3.0;
            // Band `loudest` is centred on mel index loudest + 1.
            let mel = 45.245_640_471_924_965 * (loudest + 1) as f64 / 81.0;
            if mel >= 15.0 {
                1000.0 * ((6.4f64.ln() / 27.0) * (mel - 15.0)).exp()
            } else {
                f_sp * mel
            }
        };
        assert!(
            (900.0..1100.0).contains(&centre_hz),
            "band {loudest} at {centre_hz} Hz"
        );
    }

    #[test]
    fn thirty_one_seconds_make_two_windows() {
        let samples = vec![0.1f32; 31 * 16_000];
        let (_, count) = LogMel::new(80).compute(&samples).windows();
        assert_eq!(count, 2);
        let samples = vec![0.1f32; 30 * 16_000];
        let (_, count) = LogMel::new(80).compute(&samples).windows();
        assert_eq!(count, 1);
    }
}
