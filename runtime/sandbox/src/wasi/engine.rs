//! One shared wasmtime [`Engine`] per configuration, its epoch ticker, and
//! the compiled-module cache.
//!
//! Compiling the 26 MB `python.wasm` takes seconds, so each module is
//! compiled once per engine configuration and serialized into a cache folder
//! the runtime owns (mode 0700). A cache file is only loaded if the folder
//! and the file belong to this user, nobody else can write them, and the
//! file's sha256 matches the sidecar the runtime wrote next to it: files the
//! runtime did not write are refused (and recompiled).

use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stack_assets::sha256_hex;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig};

/// How often the epoch advances; deadlines are checked at this granularity.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Largest linear memory any instance may have; policies cap lower.
pub(crate) const MAX_MEMORY_BYTES: usize = 1 << 30;

/// Errors preparing the WASI engine or a module.
#[derive(Debug, thiserror::Error)]
pub enum WasiError {
    /// The engine could not be configured.
    #[error("configuring wasmtime: {0}")]
    Engine(String),
    /// A module could not be read or compiled.
    #[error("module {path}: {reason}")]
    Module {
        /// The module file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The cache folder is unusable.
    #[error("module cache {path}: {reason}")]
    Cache {
        /// The folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A configured engine plus the folder its compiled modules are cached in.
pub struct WasiEngine {
    engine: Engine,
    cache_dir: PathBuf,
    fuel: bool,
}

impl std::fmt::Debug for WasiEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasiEngine")
            .field("cache_dir", &self.cache_dir)
            .field("fuel", &self.fuel)
            .finish()
    }
}

/// How a module was obtained, for benchmarks and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleSource {
    /// Loaded from the cache.
    Cache,
    /// Compiled now (and cached).
    Compiled,
}

impl WasiEngine {
    /// An engine with epoch interruption, the pooling allocator with
    /// copy-on-write memory images, and (when `fuel`) fuel metering.
    pub fn new(cache_dir: PathBuf, fuel: bool) -> Result<Arc<WasiEngine>, WasiError> {
        let mut pooling = PoolingAllocationConfig::default();
        pooling
            .total_memories(64)
            .total_tables(64)
            .total_core_instances(64)
            .total_stacks(64)
            .max_memory_size(MAX_MEMORY_BYTES)
            .table_elements(100_000);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .consume_fuel(fuel)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).map_err(|e| WasiError::Engine(e.to_string()))?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("stack-wasi-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                match ticker.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            })
            .map_err(|e| WasiError::Engine(format!("starting the epoch ticker: {e}")))?;
        // Here, not on first use: a thread takes its credentials and mount
        // namespace from the thread that spawns it, and first use is on a
        // guest's confined thread.
        super::watchdog::start()
            .map_err(|e| WasiError::Engine(format!("starting the watchdog: {e}")))?;
        // Every file a guest opens is one of this process's descriptors:
        // take the whole hard limit, so guests under their `open_files` cap
        // never push the runtime itself to EMFILE (the usual soft limit is
        // 1024).
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < hard {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
        }
        Ok(Arc::new(WasiEngine {
            engine,
            cache_dir,
            fuel,
        }))
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether fuel metering is on.
    pub fn fuel(&self) -> bool {
        self.fuel
    }

    /// The default cache folder: `$XDG_CACHE_HOME` or `~/.cache`, then
    /// `stack-runtime/wasm`.
    pub fn default_cache_dir() -> PathBuf {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("stack-runtime/wasm")
    }

    /// The folder compiled modules are cached in.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Loads `path` from the cache, or compiles and caches it.
    pub fn load(&self, path: &Path) -> Result<(Module, ModuleSource), WasiError> {
        self.load_keyed(path)
            .map(|(module, source, _)| (module, source))
    }

    /// As [`WasiEngine::load`], plus the module's cache key (for
    /// [`WasiEngine::load_key`] in another process).
    pub(crate) fn load_keyed(
        &self,
        path: &Path,
    ) -> Result<(Module, ModuleSource, String), WasiError> {
        let module_err = |reason: String| WasiError::Module {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| module_err(e.to_string()))?;
        let key = self.cache_key(&bytes);
        self.ensure_cache_dir()?;
        let (cached, sidecar) = self.cache_files(&key);
        if let Some(module) = self.load_cached(&cached, &sidecar) {
            return Ok((module, ModuleSource::Cache, key));
        }
        let compiled = self
            .engine
            .precompile_module(&bytes)
            .map_err(|e| module_err(format!("compiling: {e}")))?;
        write_private(&cached, &compiled).map_err(|e| module_err(format!("caching: {e}")))?;
        let stamp =
            Stamp::of(&cached, &compiled).map_err(|e| module_err(format!("caching: {e}")))?;
        write_private(&sidecar, stamp.to_string().as_bytes())
            .map_err(|e| module_err(format!("caching: {e}")))?;
        // SAFETY: `compiled` was produced by this engine a moment ago.
        let module = unsafe { Module::deserialize(&self.engine, &compiled) }
            .map_err(|e| module_err(e.to_string()))?;
        Ok((module, ModuleSource::Compiled, key))
    }

    /// The module cached under `key`, if the cache holds it and it passes
    /// every check [`WasiEngine::load`] makes; without reading or hashing
    /// the module itself (the WASI helper, which the runtime tells the key).
    pub(crate) fn load_key(&self, key: &str) -> Option<Module> {
        let plain = key.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        if !plain || key.is_empty() || self.ensure_cache_dir().is_err() {
            return None;
        }
        let (cached, sidecar) = self.cache_files(key);
        self.load_cached(&cached, &sidecar)
    }

    /// The compiled module cached under `key`, and the stamp the runtime
    /// wrote beside it.
    fn cache_files(&self, key: &str) -> (PathBuf, PathBuf) {
        (
            self.cache_dir.join(format!("{key}.cwasm")),
            self.cache_dir.join(format!("{key}.sha256")),
        )
    }

    fn cache_key(&self, module_bytes: &[u8]) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        self.fuel.hash(&mut hasher);
        let config = hasher.finish();
        format!("{}-{config:016x}", &sha256_hex(module_bytes)[..32])
    }

    fn ensure_cache_dir(&self) -> Result<(), WasiError> {
        use std::os::unix::fs::DirBuilderExt;
        let cache_err = |reason: String| WasiError::Cache {
            path: self.cache_dir.clone(),
            reason,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cache_dir)
            .map_err(|e| cache_err(e.to_string()))?;
        let meta = std::fs::metadata(&self.cache_dir).map_err(|e| cache_err(e.to_string()))?;
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(cache_err(
                "belongs to another user; refusing to use it".into(),
            ));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&self.cache_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| cache_err(e.to_string()))?;
        }
        Ok(())
    }

    /// A cached module, only if it passes every ownership and hash check.
    fn load_cached(&self, cached: &Path, sidecar: &Path) -> Option<Module> {
        let owner = nix::unistd::geteuid().as_raw();
        for file in [cached, sidecar] {
            let meta = std::fs::symlink_metadata(file).ok()?;
            if !meta.is_file() || meta.uid() != owner || meta.permissions().mode() & 0o022 != 0 {
                tracing::warn!(file = %file.display(), "refusing a module cache file this runtime did not write");
                return None;
            }
        }
        let recorded = std::fs::read_to_string(sidecar).ok()?;
        let meta = std::fs::metadata(cached).ok()?;
        let matches = recorded.split_whitespace().skip(1).collect::<Vec<_>>()
            == [
                meta.len().to_string(),
                meta.ino().to_string(),
                meta.mtime_nsec().to_string(),
                meta.mtime().to_string(),
            ];
        if !matches {
            tracing::warn!(file = %cached.display(), "module cache file is not the one this runtime wrote; recompiling");
            return None;
        }
        // SAFETY: the file is ours (owner, permissions), is the file this
        // runtime serialized (sidecar stamp), and the cache key covers the
        // engine configuration.
        unsafe { Module::deserialize_file(&self.engine, cached) }.ok()
    }
}

/// What the runtime records about a cache file it wrote.
struct Stamp {
    sha256: String,
    len: u64,
    ino: u64,
    mtime_nsec: i64,
    mtime: i64,
}

impl Stamp {
    fn of(path: &Path, bytes: &[u8]) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(path)?;
        Ok(Stamp {
            sha256: sha256_hex(bytes),
            len: meta.len(),
            ino: meta.ino(),
            mtime_nsec: meta.mtime_nsec(),
            mtime: meta.mtime(),
        })
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {} {}",
            self.sha256, self.len, self.ino, self.mtime_nsec, self.mtime
        )
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // A name no other writer (thread or process) uses at the same time.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("partial-{}-{n}", std::process::id()));
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        std::io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&partial, path)
}
