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
//!   directory, and so is a relative `GGML_BACKEND_PATH` (the one extra
//!   backend ggml loads from the environment, like `LD_PRELOAD` the user's
//!   own choice; absolute, it is loaded).
//! - **Only folders and files no one else can write.** The chosen folder,
//!   each folder above it, and each library ggml may load from it
//!   (`libggml-*.so`), all by their real paths, must belong to root or to
//!   this process's user and must not be writable by others or by a group
//!   other than the user's private one (a folder above may be, where it is
//!   sticky, like `/tmp`). The executable's own folder is held to the same
//!   rule. A build
//!   folder that was deleted (a `cargo install` builds in a temporary one)
//!   and made again by another user is refused rather than loaded.
//! - **Sandboxed code cannot write them.** The executable's folder and
//!   [`BACKENDS_ENV`]'s are among the runtime's own folders that the
//!   process sandbox keeps read-only where a workspace contains them
//!   (`stack_sandbox::process::runtime_state_folders`), as is the cache
//!   folder the build lives in by default.
//! - **Fail closed.** A folder without CPU backends, or whose backends
//!   none load on this CPU, is an error that names the folder, what was
//!   looked for and why each failed to load; the model is not run without
//!   kernels.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The environment variable that names the folder of llama.cpp's backend
/// libraries (an absolute path).
pub const BACKENDS_ENV: &str = "STACK_RUNTIME_GGML_BACKENDS";

/// The file names of CPU backends: `libggml-cpu-<variant>.so`, or
/// `libggml-cpu.so` for a build with one CPU backend (named
/// [`GENERIC_VARIANT`] here), which ggml loads where no variant fits.
const CPU_PREFIX: &str = "libggml-cpu-";
const CPU_GENERIC: &str = "libggml-cpu.so";
const LIBRARY_SUFFIX: &str = ".so";

/// The name given to a plain `libggml-cpu.so`.
pub const GENERIC_VARIANT: &str = "generic";

/// The one extra backend ggml loads from the environment.
const GGML_BACKEND_PATH: &str = "GGML_BACKEND_PATH";

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
    /// the file name of the library its entry point lies in; `None` where
    /// the loader cannot say.
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
    variants_among(&ggml_libraries_in(folder))
}

/// The CPU variants among `libraries` (as [`variants_in`] lists them).
fn variants_among(libraries: &[PathBuf]) -> Vec<String> {
    // Symlinks are followed, as ggml's own search follows them.
    let mut variants: Vec<String> = libraries
        .iter()
        .filter(|path| std::fs::metadata(path).is_ok_and(|m| m.is_file()))
        .filter_map(|path| variant_of(&path.file_name()?.to_string_lossy()))
        .collect();
    variants.sort();
    variants
}

/// The variant a CPU backend's file name names.
fn variant_of(file_name: &str) -> Option<String> {
    if file_name == CPU_GENERIC {
        return Some(GENERIC_VARIANT.to_string());
    }
    let variant = file_name
        .strip_prefix(CPU_PREFIX)?
        .strip_suffix(LIBRARY_SUFFIX)?;
    (!variant.is_empty()).then(|| variant.to_string())
}

/// The file of `variant` in `folder`.
fn variant_file(folder: &Path, variant: &str) -> PathBuf {
    if variant == GENERIC_VARIANT {
        folder.join(CPU_GENERIC)
    } else {
        folder.join(format!("{CPU_PREFIX}{variant}{LIBRARY_SUFFIX}"))
    }
}

/// Why `path` (a folder to load backends from, or a backend in it) could
/// be replaced by someone other than root and this process's user: its
/// owner, or write access for others, or for a group other than the
/// user's own private group (umask 002 distributions give each user one).
/// Folders above it are checked too; those may be writable by others where
/// they are sticky (like `/tmp`). `path` is canonical (no symlink on the
/// way, so what is checked is what is loaded).
fn untrusted(path: &Path) -> Option<String> {
    let user = nix::unistd::geteuid();
    let mut checked = Some(path);
    while let Some(at) = checked {
        let metadata = match std::fs::symlink_metadata(at) {
            Ok(metadata) => metadata,
            Err(err) => return Some(format!("{}: {err}", at.display())),
        };
        if metadata.uid() != 0 && metadata.uid() != user.as_raw() {
            return Some(format!(
                "{} belongs to uid {}, neither root nor this user",
                at.display(),
                metadata.uid()
            ));
        }
        let others_write = metadata.mode() & 0o002 != 0
            || (metadata.mode() & 0o020 != 0 && !private_group(metadata.gid()));
        let sticky = metadata.mode() & 0o1000 != 0;
        if others_write && (at == path || !sticky) {
            return Some(format!(
                "{} is writable by group or others (mode {:o})",
                at.display(),
                metadata.mode() & 0o7777
            ));
        }
        checked = at.parent();
    }
    None
}

/// Whether `gid` is this user's private group: the user's primary group,
/// named as the user, with no other members listed.
fn private_group(gid: u32) -> bool {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::geteuid()) else {
        return false;
    };
    let Ok(Some(group)) = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) else {
        return false;
    };
    user.gid.as_raw() == gid && group.name == user.name && group.mem.iter().all(|m| *m == user.name)
}

/// Every library ggml may load from `folder`: `libggml-*.so` (the CPU
/// variants, and the GPU, BLAS and RPC backends it also looks for).
fn ggml_libraries_in(folder: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut libraries: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name().is_some_and(|name| {
                let name = name.to_string_lossy();
                name.starts_with("libggml-") && name.ends_with(LIBRARY_SUFFIX)
            })
        })
        .collect();
    libraries.sort();
    libraries
}

/// The folder to load backends from (see the module docs for the order).
fn choose_folder() -> Result<(PathBuf, BackendsFolder), String> {
    if let Some(extra) = std::env::var_os(GGML_BACKEND_PATH).filter(|v| !v.is_empty()) {
        if !Path::new(&extra).is_absolute() {
            return Err(format!(
                "{GGML_BACKEND_PATH}={} is not an absolute path; ggml would load it from the \
                 current directory",
                Path::new(&extra).display()
            ));
        }
    }
    if let Some(value) = std::env::var_os(BACKENDS_ENV).filter(|v| !v.is_empty()) {
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

/// The variant of the CPU backend `cpu` (ggml's registration of it): the
/// file name of the library its entry point lies in.
fn registered_variant(cpu: llama_cpp_sys_2::ggml_backend_reg_t) -> Option<String> {
    // SAFETY: `cpu` is a live registration (checked non-null by the
    // caller; ggml never unregisters a loaded backend); the name is a
    // static NUL-terminated string; the result is null or a function of
    // the backend's library.
    let entry = unsafe {
        llama_cpp_sys_2::ggml_backend_reg_get_proc_address(
            cpu,
            c"ggml_backend_get_features".as_ptr(),
        )
    };
    if entry.is_null() {
        return None;
    }
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `info` is writable and sized for `Dl_info`; dladdr only
    // reads `entry` as an address. On success `dli_fname` points to the
    // loader's copy of the file name, valid while the library is loaded
    // (for the life of the process) and copied at once.
    let file = unsafe {
        if libc::dladdr(entry.cast_const(), info.as_mut_ptr()) == 0 {
            return None;
        }
        let info = info.assume_init();
        if info.dli_fname.is_null() {
            return None;
        }
        CStr::from_ptr(info.dli_fname)
            .to_string_lossy()
            .into_owned()
    };
    variant_of(&Path::new(&file).file_name()?.to_string_lossy())
}

/// Why each backend in `folder` that fails to load fails (the loader's own
/// words, which ggml keeps to itself in a release build).
fn load_errors(folder: &Path, variants: &[String]) -> Vec<String> {
    variants
        .iter()
        .filter_map(|variant| {
            let path = CString::new(variant_file(folder, variant).as_os_str().as_bytes()).ok()?;
            // SAFETY: `path` is NUL-terminated and outlives the calls; a
            // library that loads is closed again at once (ggml has its own
            // handle to whatever it keeps); dlerror's text is copied before
            // the next loader call.
            unsafe {
                let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                if handle.is_null() {
                    let error = libc::dlerror();
                    let why = if error.is_null() {
                        "it did not load".to_string()
                    } else {
                        CStr::from_ptr(error).to_string_lossy().into_owned()
                    };
                    Some(format!("{variant}: {why}"))
                } else {
                    libc::dlclose(handle);
                    None
                }
            }
        })
        .collect()
}

/// Loads llama.cpp's backends (the best CPU variant, and a GPU backend
/// where one was built) from the chosen folder. Call once, before the
/// llama.cpp backend is initialized.
pub(crate) fn load() -> Result<CpuBackend, String> {
    let (folder, chosen) = choose_folder()?;
    // What is listed, checked and loaded is the folder by its real path,
    // listed once: what is reported is what is checked.
    let real_folder = folder.canonicalize();
    let libraries = real_folder
        .as_deref()
        .map(ggml_libraries_in)
        .unwrap_or_default();
    let variants = variants_among(&libraries);
    let real_folder = match real_folder {
        Ok(real) if !variants.is_empty() => real,
        other => {
            // Why the folder could not be resolved, where it could not.
            let why = other
                .err()
                .map(|err| format!(" ({err})"))
                .unwrap_or_default();
            return Err(format!(
                "no llama.cpp CPU backend in {}{why} ({}): expected the \
                 libggml-cpu-<variant>.so libraries built with the runtime; set \
                 {BACKENDS_ENV} to the folder that holds them",
                folder.display(),
                chosen.describe()
            ));
        }
    };
    // Each library ggml may load there is checked through any symlink, to
    // its file.
    let refuse = |why: String| {
        format!(
            "llama.cpp's backends in {} ({}) are not loaded: {why}",
            folder.display(),
            chosen.describe()
        )
    };
    let folder = real_folder;
    for path in std::iter::once(folder.clone()).chain(libraries) {
        let real = path
            .canonicalize()
            .map_err(|err| refuse(format!("{}: {err}", path.display())))?;
        if let Some(why) = untrusted(&real) {
            return Err(refuse(why));
        }
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
        let errors = load_errors(&folder, &variants);
        let why = if errors.is_empty() {
            "each loads, but none registered a CPU backend that fits this CPU (or they \
             were built for another ggml)"
                .to_string()
        } else {
            errors.join("; ")
        };
        return Err(format!(
            "none of the {} llama.cpp CPU backends in {} ({}) loads on this CPU: {why}",
            variants.len(),
            folder.display(),
            variants.join(", ")
        ));
    }
    Ok(CpuBackend {
        variant: registered_variant(cpu),
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
            ("libggml-cpu.so", Some(GENERIC_VARIANT)),
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
        std::os::unix::fs::symlink("libggml-cpu-zen4.so", dir.path().join("libggml-cpu-x64.so"))
            .expect("symlink");
        std::os::unix::fs::symlink("missing.so", dir.path().join("libggml-cpu-gone.so"))
            .expect("symlink");
        assert_eq!(variants_in(dir.path()), ["haswell", "x64", "zen4"]);
        assert!(variants_in(&dir.path().join("missing")).is_empty());
    }

    /// A backends folder, or a backend, that someone else could replace is
    /// refused: writable by others, or below a folder writable by others
    /// that is not sticky. A sticky folder above (like `/tmp`) is fine.
    #[test]
    fn folders_and_backends_others_could_replace_are_untrusted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let set = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        let backends = dir.path().join("backends");
        std::fs::create_dir(&backends).expect("mkdir");
        let library = backends.join("libggml-cpu-x64.so");
        std::fs::write(&library, b"").expect("write");
        set(dir.path(), 0o755);
        set(&backends, 0o755);
        set(&library, 0o644);
        assert_eq!(untrusted(&backends), None);
        assert_eq!(untrusted(&library), None);
        set(&library, 0o666);
        assert!(untrusted(&library).is_some_and(|why| why.contains("writable")));
        set(&library, 0o644);
        set(&backends, 0o777);
        assert!(untrusted(&backends).is_some());
        assert!(
            untrusted(&library).is_some(),
            "a folder others may write, not sticky"
        );
        set(&backends, 0o1777);
        assert!(
            untrusted(&backends).is_some(),
            "the folder itself, sticky or not"
        );
        assert_eq!(untrusted(&library), None, "sticky above, like /tmp");
        set(&backends, 0o755);
        assert!(untrusted(&dir.path().join("missing")).is_some());
    }
}
