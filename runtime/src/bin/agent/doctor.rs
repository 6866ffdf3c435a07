//! `agent doctor`: what this machine offers the runtime, and which
//! guarantees hold.

use std::process::ExitCode;

use stack_runtime::assets::Asset;
use stack_runtime::policy::Policy;
use stack_runtime::sandbox::process::{
    KernelProbe, ProcessPolicy, ProcessSandbox, Tier, FORCE_LANDLOCK_ABI_ENV,
};

/// What the policy keeps on disk, where, for how long, and whether it is
/// encrypted.
fn stored_data(policy: &Policy) -> String {
    let privacy = &policy.privacy;
    if !privacy.keep_transcripts.unwrap_or(false) {
        return "nothing: the policy keeps no transcripts, KV state, history or audit log".into();
    }
    let dir = privacy.transcript_dir.as_deref().unwrap_or("(no folder)");
    let kept = privacy
        .max_age_days
        .map_or("until deleted".to_string(), |days| {
            format!("for {days} day(s)")
        });
    let audit = if privacy.audit_log.unwrap_or(false) {
        ", the audit log"
    } else {
        ""
    };
    format!("transcripts, KV state, REPL history{audit} in {dir}; kept {kept}; {}; exported as training data only where a session's owner allowed it", encryption(policy))
}

/// Whether the policy's stored data is encrypted, and with which key (a
/// key is not made here).
fn encryption(policy: &Policy) -> String {
    if !policy.privacy.encrypt.unwrap_or(false) {
        return "not encrypted ([privacy] encrypt = true turns it on)".into();
    }
    let keys = match stack_seal::keys::KeyStore::for_user() {
        Ok(keys) => keys,
        Err(err) => return format!("encryption asked for, but no key: {err}"),
    };
    match keys.vault(false) {
        Ok(vault) if vault.has_keys() => format!(
            "encrypted ({}; {})",
            vault.record_cipher().describe(),
            vault.describe_keys()
        ),
        Ok(vault) => format!(
            "encrypted ({}; key: {})",
            vault.record_cipher().describe(),
            keys.describe_home()
        ),
        Err(err) => format!("encryption asked for, but the key is not usable: {err}"),
    }
}

/// What a tier means, in a line.
fn tier_line(tier: Tier) -> String {
    let what = match tier {
        Tier::Full => "landlock holds every rule (ABI 6+)",
        Tier::NoScoping => "landlock ABI 4-5: signals and abstract sockets held by the call's PID and network namespaces; network = \"full\" refused",
        Tier::Minimal => "landlock ABI 1-3: also TCP held by the network namespace and seccomp, truncation by read-only mounts; network = \"full\" and allowlists refused",
        Tier::Unsupported => "no landlock: the process sandbox refuses to run",
    };
    format!("{} ({what})", tier.as_str())
}

pub fn run(
    json: bool,
    model: &crate::model_cmd::ModelArgs,
    policy_name: &str,
) -> anyhow::Result<ExitCode> {
    let served = crate::model_cmd::served(model);
    let helper = ProcessSandbox::locate();
    // User namespaces are tried for real (AppArmor and container seccomp
    // profiles let the sysctl say yes and the syscall fail).
    let probe = match &helper {
        Ok(sandbox) => KernelProbe::get()
            .clone()
            .with_user_namespaces_tried(sandbox.helper()),
        Err(_) => KernelProbe::get().clone(),
    };
    let guarantees = probe.guarantees();
    let missing = probe.missing_requirements(ProcessPolicy::default().min_landlock_abi);
    if json {
        let report = serde_json::json!({
            "probe": &probe,
            "guarantees": guarantees,
            "sandbox_helper": helper.as_ref().map(|h| h.helper().display().to_string()).map_err(|e| e.to_string()),
            "process_sandbox_ready": missing.is_none() && helper.is_ok(),
            "stored_data": Policy::load_named(policy_name).map(|p| stored_data(&p)).map_err(|e| e.to_string()),
            "egress_filtering": match probe.egress_filtering_missing() {
                None => serde_json::json!({"available": true}),
                Some(why) => serde_json::json!({"available": false, "missing": why}),
            },
            "assets": Asset::ALL.iter().map(|a| (a.file_name(), a.locate().map(|p| p.display().to_string()).map_err(|e| e.to_string()))).collect::<Vec<_>>(),
            "served_model": served.as_ref().map(|s| s.as_ref().map_err(|e| format!("{e:#}"))),
            "cpu_kernels": stack_runtime::model::llama::cpu_kernels().map_err(|e| e.to_string()),
            "cpu_backend": stack_runtime::model::llama::cpu_backend().map_err(|e| e.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("kernel        {}", probe.kernel);
        let forced = probe
            .landlock_abi_kernel
            .map(|kernel| {
                format!(" (forced down from the kernel's ABI {kernel} by {FORCE_LANDLOCK_ABI_ENV})")
            })
            .unwrap_or_default();
        println!(
            "landlock      {}{forced}",
            probe
                .landlock_abi
                .map_or("not available".to_string(), |abi| format!("ABI {abi}"))
        );
        println!("sandbox tier  {}", tier_line(probe.tier));
        if let Some(container) = &probe.container {
            println!("container     {container}");
        }
        println!(
            "user ns       {}",
            match (&probe.user_namespaces_blocked, probe.user_namespaces) {
                (Some(why), _) => format!("blocked: {why}"),
                (None, true) => "available".to_string(),
                (None, false) => "disabled".to_string(),
            }
        );
        println!(
            "seccomp       {}",
            if probe.seccomp_filter {
                "available"
            } else {
                "not available"
            }
        );
        println!(
            "cgroup        {}",
            probe
                .cgroup
                .as_ref()
                .map_or("none writable".to_string(), |c| c.describe())
        );
        match &helper {
            Ok(sandbox) => println!("helper        {}", sandbox.helper().display()),
            Err(err) => println!("helper        {err}"),
        }
        match Policy::load_named(policy_name) {
            Ok(policy) => println!("stored data  {}", stored_data(&policy)),
            Err(err) => println!("stored data  policy {policy_name}: {err}"),
        }
        match probe.egress_filtering_missing() {
            None => println!(
                "egress        available: network allowlists (network = {{ allow = [...] }}) go through the runtime's proxy; landlock TCP rules keep code off every other port"
            ),
            Some(why) => println!("egress        not available: {why}"),
        }
        println!();
        println!(
            "process sandbox guarantees (default policy, tier {}):",
            probe.tier.as_str()
        );
        for guarantee in &guarantees {
            println!(
                "  [{}] {} — {}",
                if guarantee.holds { "x" } else { " " },
                guarantee.name,
                guarantee.detail
            );
        }
        println!();
        println!("assets:");
        for asset in Asset::ALL {
            match asset.locate() {
                Ok(path) => println!("  [x] {}", path.display()),
                Err(err) => println!("  [ ] {err}"),
            }
        }
        println!();
        match stack_runtime::model::llama::cpu_kernels() {
            Ok(kernels) => println!(
                "cpu kernels   {} (llama.cpp, in process)",
                kernels.join(" ")
            ),
            Err(err) => println!("cpu kernels   {err}"),
        }
        if let Ok(cpu) = stack_runtime::model::llama::cpu_backend() {
            println!("cpu backend   {}", cpu.summary());
        }
        if let Some(served) = &served {
            println!();
            match served {
                Ok(info) => {
                    println!("served model:");
                    for (key, value) in crate::model_cmd::describe(info) {
                        println!("  {key:17} {value}");
                    }
                }
                Err(err) => println!("served model: {err:#}"),
            }
        }
        println!();
        match (&missing, &helper) {
            (None, Ok(_)) => println!("the process sandbox is ready"),
            (Some(missing), _) => println!("the process sandbox will refuse calls: {missing}"),
            (None, Err(err)) => println!("the process sandbox will refuse calls: {err}"),
        }
    }
    let served_ok = served.as_ref().is_none_or(|s| s.is_ok());
    Ok(if missing.is_none() && helper.is_ok() && served_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
