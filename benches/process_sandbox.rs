//! Process sandbox start-up cost, as ratios over the same bare spawn measured
//! in the same run (and over bubblewrap with comparable isolation, where
//! `bwrap` is installed).
//!
//! ```sh
//! cargo bench --bench process_sandbox            # BENCH_ITERS=50 for more samples
//! ```

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use stack_runtime::outcome::Status;
use stack_runtime::sandbox::process::{NetworkMode, ProcessPolicy, ProcessSandbox};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time_n(iterations: usize, mut run: impl FnMut()) -> Duration {
    for _ in 0..3 {
        run();
    }
    median(
        (0..iterations)
            .map(|_| {
                let started = Instant::now();
                run();
                started.elapsed()
            })
            .collect(),
    )
}

fn bare(argv: &[&str]) {
    let output = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("bare spawn");
    assert!(output.status.success());
}

fn bwrap(argv: &[&str], workspace: &Path) {
    let ws = workspace.to_str().expect("utf8");
    let mut command = Command::new("bwrap");
    command.args([
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        "--ro-bind",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--bind",
        ws,
        ws,
        "--chdir",
        ws,
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--",
    ]);
    let output = command.args(argv).output().expect("bwrap");
    assert!(
        output.status.success(),
        "bwrap: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn main() {
    let iterations: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let sandbox = ProcessSandbox::with_helper(env!("CARGO_BIN_EXE_stack-sandbox-exec"));
    let workspace = tempfile::tempdir().expect("tempdir");
    let has_bwrap = Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let default_policy = ProcessPolicy::default();
    let full_network = ProcessPolicy {
        network: NetworkMode::Full,
        ..ProcessPolicy::default()
    };

    println!("process sandbox start-up, median of {iterations} runs (ratios against the bare spawn in this run)");
    println!(
        "{:<24} {:>10} {:>10} {:>8} {:>16} {:>10} {:>8}",
        "command", "bare ms", "sandbox ms", "ratio", "sandbox+net ms", "bwrap ms", "vs bwrap"
    );
    for argv in [
        &["/usr/bin/python3", "-c", "print(1)"][..],
        &["/bin/bash", "-c", "true"][..],
    ] {
        let owned: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let bare_time = time_n(iterations, || bare(argv));
        let sandboxed = |policy: &ProcessPolicy| {
            time_n(iterations, || {
                let outcome = runtime.block_on(sandbox.run(&owned, None, workspace.path(), policy));
                assert_eq!(outcome.status, Status::Ok, "{outcome:?}");
            })
        };
        let sandbox_time = sandboxed(&default_policy);
        let sandbox_net_time = sandboxed(&full_network);
        let bwrap_time = has_bwrap.then(|| time_n(iterations, || bwrap(argv, workspace.path())));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<24} {:>10.2} {:>10.2} {:>7.2}x {:>16.2} {:>10} {:>8}",
            argv.join(" "),
            ms(bare_time),
            ms(sandbox_time),
            ms(sandbox_time) / ms(bare_time),
            ms(sandbox_net_time),
            bwrap_time.map_or("-".to_string(), |b| format!("{:.2}", ms(b))),
            bwrap_time.map_or("-".to_string(), |b| format!(
                "{:.2}x",
                ms(sandbox_time) / ms(b)
            )),
        );
    }
    println!("(sandbox = default policy, network none; sandbox+net = the same without a network namespace)");
}
