//! Process sandbox start-up cost, as ratios over the same bare spawn measured
//! in the same run (and over bubblewrap with comparable isolation, where
//! `bwrap` is installed). All of them run the command with the environment
//! the sandbox gives (`sandbox_environment`), so the ratios measure
//! isolation, not a different locale. The bare spawns (std and tokio) and the
//! sandboxed runs are interleaved, one of each per round in an order that
//! rotates every round, so that drift on a busy machine hits them alike and
//! no runner always follows the same one.
//!
//! The sandboxed figure is a session's steady state: the workspace's zygote
//! is already running and has a spare waiting (see `sandbox::process`), as
//! it has between the calls of an agent session. Each timed run starts after
//! a short pause in which what the previous run left behind settles (the
//! sandbox cleans up after a call once the call has returned), so that no
//! runner pays for another. What that clean-up costs shows in the second
//! table: calls made back to back, with no pause, sandboxed and bare. What
//! the first call of a workspace pays to start its zygote is printed last.
//!
//! ```sh
//! cargo bench -p stack-sandbox --bench process_sandbox   # BENCH_ITERS=50 for more samples
//! ```

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use stack_sandbox::process::{sandbox_environment, Network, ProcessPolicy, ProcessSandbox};
use stack_sandbox::ExecStatus;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Times each runner `iterations` times, interleaved (one round runs each
/// once) so that drift on a busy machine hits every runner alike, and with
/// the order rotated every round so that no runner always follows the same
/// one; returns each runner's median. Three warm-up rounds are not counted.
fn time_interleaved(iterations: usize, runners: &mut [&mut dyn FnMut()]) -> Vec<Duration> {
    let count = runners.len();
    let mut samples = vec![Vec::with_capacity(iterations); count];
    for round in 0..iterations + 3 {
        for offset in 0..count {
            let index = (round + offset) % count;
            settle();
            let started = Instant::now();
            runners[index]();
            if round >= 3 {
                samples[index].push(started.elapsed());
            }
        }
    }
    samples.into_iter().map(median).collect()
}

/// What a run leaves behind (the kernel tearing down a call's namespaces,
/// the zygote making the next spare, a bare child's reaping) must not land
/// in the next runner's timing: every timed run starts after this pause.
/// It spins rather than sleeps so that the CPU is not idle (and slow to
/// wake) when the run starts, which would favour none of the runners.
fn settle() {
    let started = Instant::now();
    while started.elapsed() < SETTLE {
        std::hint::spin_loop();
    }
}

/// See [`settle`]: well over the zygote's clean-up delay (1 ms) plus what
/// making a spare takes (≈ 0.5 ms here).
const SETTLE: Duration = Duration::from_millis(5);

fn bare(argv: &[&str], env: &[(String, String)]) {
    let output = Command::new(argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("bare spawn");
    assert!(output.status.success());
}

/// The same spawn through tokio, as an async runtime without a sandbox
/// would make it.
fn bare_tokio(runtime: &tokio::runtime::Runtime, argv: &[&str], env: &[(String, String)]) {
    let output = runtime
        .block_on(async {
            tokio::process::Command::new(argv[0])
                .args(&argv[1..])
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .await
        })
        .expect("bare tokio spawn");
    assert!(output.status.success());
}

fn bwrap(argv: &[&str], workspace: &Path, env: &[(String, String)]) {
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
    ]);
    for (key, value) in env {
        command.args(["--setenv", key, value]);
    }
    command.arg("--");
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
    let home = tempfile::tempdir().expect("tempdir");
    let env = sandbox_environment(home.path());
    let default_policy = ProcessPolicy::default();
    let full_network = ProcessPolicy {
        network: Network::Full,
        ..ProcessPolicy::default()
    };
    // The default policy without its disk budget: calls write to the
    // workspace directly, with no overlay to mount or write back.
    let mut no_budget = ProcessPolicy::default();
    no_budget.limits.disk = None;

    println!("process sandbox start-up, median of {iterations} runs (ratios against the bare spawn in this run)");
    println!(
        "{:<24} {:>8} {:>10} {:>8} {:>10} {:>9} {:>15} {:>14} {:>8} {:>9} {:>9}",
        "command",
        "bare ms",
        "sandbox ms",
        "ratio",
        "tokio ms",
        "vs tokio",
        "sandbox+net ms",
        "no budget ms",
        "ratio",
        "bwrap ms",
        "vs bwrap"
    );
    for argv in [
        &["/usr/bin/python3", "-c", "print(1)"][..],
        &["/bin/bash", "-c", "true"][..],
    ] {
        let owned: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let sandboxed = |policy: &ProcessPolicy| {
            let outcome = runtime.block_on(sandbox.run(&owned, None, workspace.path(), policy));
            assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
        };
        let mut run_bare = || bare(argv, &env);
        let mut run_bare_tokio = || bare_tokio(&runtime, argv, &env);
        let mut run_sandboxed = || sandboxed(&default_policy);
        let mut run_sandboxed_net = || sandboxed(&full_network);
        let mut run_no_budget = || sandboxed(&no_budget);
        let mut run_bwrap = || bwrap(argv, workspace.path(), &env);
        let mut runners: Vec<&mut dyn FnMut()> = vec![
            &mut run_bare,
            &mut run_sandboxed,
            &mut run_bare_tokio,
            &mut run_sandboxed_net,
            &mut run_no_budget,
        ];
        let medians = time_interleaved(iterations, &mut runners);
        let (bare_time, sandbox_time, tokio_time, sandbox_net_time, no_budget_time) =
            (medians[0], medians[1], medians[2], medians[3], medians[4]);
        // bwrap runs on its own: each run creates and destroys a network
        // namespace, whose teardown (expedited RCU grace periods, IPIs to
        // every CPU) would otherwise land in the other runners' timings.
        let bwrap_time = has_bwrap.then(|| time_interleaved(iterations, &mut [&mut run_bwrap])[0]);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<24} {:>8.2} {:>10.2} {:>7.2}x {:>10.2} {:>8.2}x {:>15.2} {:>14.2} {:>7.2}x {:>9} {:>9}",
            argv.join(" "),
            ms(bare_time),
            ms(sandbox_time),
            ms(sandbox_time) / ms(bare_time),
            ms(tokio_time),
            ms(sandbox_time) / ms(tokio_time),
            ms(sandbox_net_time),
            ms(no_budget_time),
            ms(no_budget_time) / ms(bare_time),
            bwrap_time.map_or("-".to_string(), |b| format!("{:.2}", ms(b))),
            bwrap_time.map_or("-".to_string(), |b| format!(
                "{:.2}x",
                ms(sandbox_time) / ms(b)
            )),
        );
    }
    // Back to back: every call's clean-up (and its successor's making) now
    // competes with the next call.
    println!("back to back, {iterations} calls with no pause (mean per call):");
    for argv in [
        &["/usr/bin/python3", "-c", "print(1)"][..],
        &["/bin/bash", "-c", "true"][..],
    ] {
        let owned: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let started = Instant::now();
        for _ in 0..iterations {
            bare(argv, &env);
        }
        let bare_time = started.elapsed() / iterations as u32;
        let started = Instant::now();
        for _ in 0..iterations {
            let outcome =
                runtime.block_on(sandbox.run(&owned, None, workspace.path(), &default_policy));
            assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
        }
        let sandbox_time = started.elapsed() / iterations as u32;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<24} bare {:>6.2} ms  sandbox {:>6.2} ms  ratio {:.2}x",
            argv.join(" "),
            ms(bare_time),
            ms(sandbox_time),
            ms(sandbox_time) / ms(bare_time)
        );
    }
    // A workspace's first call also starts its zygote (user and network
    // namespaces, cgroup); a fresh sandbox has none yet.
    let cold = (0..iterations.clamp(3, 10))
        .map(|_| {
            let fresh = ProcessSandbox::with_helper(env!("CARGO_BIN_EXE_stack-sandbox-exec"));
            let argv = ["/bin/bash".to_string(), "-c".into(), "true".into()];
            let started = Instant::now();
            let outcome =
                runtime.block_on(fresh.run(&argv, None, workspace.path(), &default_policy));
            assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
            started.elapsed()
        })
        .collect();
    println!(
        "first call of a workspace (starts its zygote), bash -c true: {:.2} ms",
        median(cold).as_secs_f64() * 1000.0
    );
    println!("(ratio = sandbox over a bare std::process spawn; tokio = the same bare spawn through tokio::process;");
    println!(" sandbox = default policy, network none, its disk budget on; sandbox+net = the same without a network namespace;");
    println!(
        " no budget = the default policy with disk_mb = 0: no overlay to mount and write back)"
    );
}
