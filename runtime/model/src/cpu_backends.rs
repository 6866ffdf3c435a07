//! Which of llama.cpp's CPU backends this process runs: one binary for
//! every x86-64 (or aarch64) CPU, with the best kernels of the CPU it runs
//! on.
//!
//! llama.cpp is built with ggml's `GGML_BACKEND_DL` and
//! `GGML_CPU_ALL_VARIANTS` (llama-cpp-2's `dynamic-backends`): its CPU
//! kernels are not in the binary but in one shared library per CPU
//! generation (`libggml-cpu-x64.so`, `-sse42`, `-haswell`, `-skylakex`,
//! `-icelake`, `-zen4`, `-sapphirerapids`, …). Each exports a score of how
//! well it fits the running CPU (zero where the CPU lacks one of its
//! instructions), and ggml loads the best. So the baseline `x64` variant
//! still runs on a 2003 x86-64, and an AVX-512 machine gets its AVX-512
//! kernels.
//!
//! # Threat model
//! Loading a backend runs its native code in this process, which holds the
//! user's keys and drives the sandbox. A library planted by someone who
//! can only write where the agent works (a workspace, a cloned repository,
//! a file the model wrote through a tool) must never be loaded.
//! - **Only named folders.** Backends load from exactly one folder, chosen
//!   in this order: [`BACKENDS_ENV`] (an absolute path, the user's own
//!   choice); the folder that holds the executable, where it holds CPU
//!   backends (the layout of llama.cpp's own releases: the binary and its
//!   backends side by side, as trusted as the binary); else the folder the
//!   build installed them in. ggml's own default search, which also looks
//!   in the current directory, is never used: its folder is always given.
//! - **Never the current directory, never relative.** A relative
//!   [`BACKENDS_ENV`] is refused rather than resolved against the current
//!   directory.
//! - **Fail closed.** A folder without CPU backends, or whose backends
//!   none load on this CPU, is an error that names the folder and what
//!   was looked for; the model is not run without kernels.
//!
//! What this does not cover: `GGML_BACKEND_PATH`, which ggml reads to load
//! one extra backend, is the user's environment like `LD_PRELOAD`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The environment variable that names the folder of llama.cpp's backend
/// libraries (an absolute path).
pub const BACKENDS_ENV: &str = "STACK_RUNTIME_GGML_BACKENDS";

/// The file names of CPU backends: `libggml-cpu-<variant>.so`.
const CPU_PREFIX: &str = "libggml-cpu-";
const LIBRARY_SUFFIX: &str = ".so";

/// Where the backends were loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendsFolder {
    /// The folder [`BACKENDS_ENV`] names.
    Environment,
    /// The folder that holds the executable.
    BesideExecutable,
    /// The folder the build installed them in.
    Build,
}

impl BackendsFolder {
    /// How the folder was chosen, in words.
    pub fn describe(self) -> &'static str {
        match self {
            BackendsFolder::Environment => BACKENDS_ENV,
            BackendsFolder::BesideExecutable => "beside the executable",
            BackendsFolder::Build => "as built",
        }
    }
}

/// The CPU backend this process runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CpuBackend {
    /// The variant ggml picked for this CPU (`haswell`, `zen4`, …), from
    /// the file name of the library it mapped; `None` where that cannot be
    /// seen (no `/proc`).
    pub variant: Option<String>,
    /// Every variant the folder holds, sorted.
    pub variants: Vec<String>,
    /// The folder they were loaded from.
    pub folder: PathBuf,
    /// How that folder was chosen.
    pub chosen: BackendsFolder,
}

impl CpuBackend {
    /// One line for `agent model` and `agent doctor`: `haswell, picked
    /// from 14 variants in FOLDER (as built)`.
    pub fn summary(&self) -> String {
        format!(
            "{}, picked from {} variants in {} ({})",
            self.variant.as_deref().unwrap_or("(not seen)"),
            self.variants.len(),
            self.folder.display(),
            self.chosen.describe()
        )
    }
}

/// The CPU variants in `folder`: the `<variant>` of each
/// `libggml-cpu-<variant>.so`, sorted (empty when the folder cannot be
/// read).
pub fn variants_in(folder: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut variants: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|entry| variant_of(&entry.file_name().to_string_lossy()))
        .collect();
    variants.sort();
    variants
}

/// The variant a CPU backend's file name names.
fn variant_of(file_name: &str) -> Option<String> {
    let variant = file_name
        .strip_prefix(CPU_PREFIX)?
        .strip_suffix(LIBRARY_SUFFIX)?;
    (!variant.is_empty()).then(|| variant.to_string())
}

/// The folder to load backends from (see the module docs for the order).
fn choose_folder() -> Result<(PathBuf, BackendsFolder), String> {
    if let Some(value) = std::env::var_os(BACKENDS_ENV) {
        let folder = PathBuf::from(value);
        if !folder.is_absolute() {
            return Err(format!(
                "{BACKENDS_ENV}={} is not an absolute path; llama.cpp's backends load only from a \
                 folder named in full, never from one relative to the current directory",
                folder.display()
            ));
        }
        return Ok((folder, BackendsFolder::Environment));
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .filter(|folder| !variants_in(folder).is_empty())
    {
        return Ok((beside, BackendsFolder::BesideExecutable));
    }
    match llama_cpp_sys_2::BACKENDS_DIR {
        Some(built) => Ok((PathBuf::from(built), BackendsFolder::Build)),
        None => Err(format!(
            "this build names no folder of llama.cpp CPU backends; set {BACKENDS_ENV} to the \
             folder that holds the libggml-cpu-*.so files"
        )),
    }
}

/// The variant of the CPU backend mapped into this process, from the file
/// names in `/proc/self/maps` under `folder`.
fn mapped_variant(folder: &Path) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let canonical = folder.canonicalize().ok();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(Path::new)
        .filter(|path| {
            path.parent()
                .is_some_and(|parent| parent == folder || Some(parent) == canonical.as_deref())
        })
        .find_map(|path| variant_of(&path.file_name()?.to_string_lossy()))
}

/// Loads llama.cpp's backends (the best CPU variant, and a GPU backend
/// where one was built) from the chosen folder. Call once, before the
/// llama.cpp backend is initialized.
pub(crate) fn load() -> Result<CpuBackend, String> {
    let (folder, chosen) = choose_folder()?;
    let variants = variants_in(&folder);
    if variants.is_empty() {
        return Err(format!(
            "no llama.cpp CPU backend in {} ({}): expected the libggml-cpu-<variant>.so \
             libraries built with the runtime; set {BACKENDS_ENV} to the folder that holds them",
            folder.display(),
            chosen.describe()
        ));
    }
    let path = CString::new(folder.as_os_str().as_bytes())
        .map_err(|_| format!("{} holds a NUL byte", folder.display()))?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call,
    // which only reads it; ggml copies what it keeps.
    unsafe { llama_cpp_sys_2::ggml_backend_load_all_from_path(path.as_ptr()) };
    // SAFETY: a static NUL-terminated name; the registry returns null when
    // no backend of that name was registered.
    let cpu = unsafe { llama_cpp_sys_2::ggml_backend_reg_by_name(c"CPU".as_ptr()) };
    if cpu.is_null() {
        return Err(format!(
            "none of the {} llama.cpp CPU backends in {} ({}) loads on this CPU",
            variants.len(),
            folder.display(),
            variants.join(", ")
        ));
    }
    Ok(CpuBackend {
        variant: mapped_variant(&folder),
        variants,
        folder,
        chosen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_are_read_from_cpu_backend_file_names_only() {
        for (name, variant) in [
            ("libggml-cpu-haswell.so", Some("haswell")),
            ("libggml-cpu-x64.so", Some("x64")),
            ("libggml-cpu-.so", None),
            ("libggml-cpu.so", None),
            ("libggml-cuda.so", None),
            ("libggml-cpu-haswell.so.1", None),
            ("libggml-base.so", None),
        ] {
            assert_eq!(variant_of(name).as_deref(), variant, "{name}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["libggml-cpu-zen4.so", "libggml-cpu-haswell.so", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        std::fs::create_dir(dir.path().join("libggml-cpu-folder.so")).expect("mkdir");
        assert_eq!(variants_in(dir.path()), ["haswell", "zen4"]);
        assert!(variants_in(&dir.path().join("missing")).is_empty());
    }
}
