//! WASI sandbox start-up, as ratios over a bare `python3 -c 'print(1)'`
//! spawn measured in the same run.
//!
//! ```sh
//! cargo bench -p stack-sandbox --bench wasi_start   # BENCH_ITERS=50 for more samples
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use stack_assets::Asset;
use stack_sandbox::wasi::{PythonSession, WasiEngine, WasiPolicy, WasiSandbox};
use stack_sandbox::ExecStatus;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let iterations: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let workspace = tempfile::tempdir().expect("tempdir");
    let policy = WasiPolicy::default();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    // The real interpreter, not a version-manager shim in front of it.
    let python3 = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".to_string());
    // Compare against the fastest CPython on the machine (the strictest baseline).
    let mut candidates = vec![python3];
    if std::path::Path::new("/usr/bin/python3").exists() {
        candidates.push("/usr/bin/python3".to_string());
    }
    let (python3, bare) = candidates
        .into_iter()
        .map(|interpreter| {
            let time = median(
                (0..iterations)
                    .map(|_| {
                        let started = Instant::now();
                        let output = Command::new(&interpreter)
                            .args(["-c", "print(1)"])
                            .output()
                            .expect("python3");
                        assert!(output.status.success());
                        started.elapsed()
                    })
                    .collect(),
            );
            (interpreter, time)
        })
        .min_by_key(|(_, time)| *time)
        .expect("a python3");

    // First-ever compile: an empty cache folder.
    let fresh_cache = tempfile::tempdir().expect("tempdir");
    let engine = WasiEngine::new(fresh_cache.path().to_path_buf(), false).expect("engine");
    let python = Asset::PythonWasm.locate().expect("run scripts/setup first");
    let started = Instant::now();
    engine.load(&python).expect("compile");
    let compile = started.elapsed();
    let started = Instant::now();
    let fresh_engine = WasiEngine::new(fresh_cache.path().to_path_buf(), false).expect("engine");
    fresh_engine.load(&python).expect("load from cache");
    let cache_load = started.elapsed();

    let sandbox = WasiSandbox::new(fresh_engine);
    sandbox.warm_up().expect("interpreters");
    let timed = |run: &mut dyn FnMut()| {
        run();
        median(
            (0..iterations)
                .map(|_| {
                    let started = Instant::now();
                    run();
                    started.elapsed()
                })
                .collect(),
        )
    };
    let cold = timed(&mut || {
        let outcome = runtime.block_on(sandbox.run_python("print(1)", workspace.path(), &policy));
        assert_eq!(
            (outcome.status, outcome.stdout.as_str()),
            (ExecStatus::Ok, "1\n")
        );
    });
    let mut session = PythonSession::new(sandbox.clone(), workspace.path(), policy.clone());
    runtime.block_on(session.start()).expect("session");
    let warm = timed(&mut || {
        let outcome = runtime.block_on(session.run("print(1)"));
        assert_eq!(outcome.stdout, "1\n");
    });
    let js = timed(&mut || {
        let outcome =
            runtime.block_on(sandbox.run_javascript("console.log(1)", workspace.path(), &policy));
        assert_eq!(outcome.stdout, "1\n");
    });

    println!("WASI start-up, median of {iterations} runs; baseline: bare `{python3} -c 'print(1)'` = {:.2} ms in this run", ms(bare));
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "measure", "ms", "ratio", "goal"
    );
    let row = |name: &str, d: Duration, goal: &str| {
        println!(
            "{name:<44} {:>10.2} {:>9.3}x {goal:>8}",
            ms(d),
            ms(d) / ms(bare)
        )
    };
    row("first-ever compile of python.wasm", compile, "-");
    row("load compiled python.wasm from the cache", cache_load, "-");
    row("cold print(1): new instance, cached module", cold, "<=3x");
    row("warm print(1): live session", warm, "<=0.2x");
    row("javascript console.log(1): new instance", js, "<=0.1x");
}
