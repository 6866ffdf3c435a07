//! What sessions keep on disk, deleted and purged on real files: a planted
//! prompt must leave no trace under the data folder once its session is
//! deleted, the other sessions must stay whole, purging by age must take
//! exactly the expired sessions, and an audit log rewritten under a
//! running appender must lose nothing the appender writes.

use std::path::Path;
use std::time::{Duration, SystemTime};

use stack_agent::store::SessionStore;
use stack_agent::{export_chatml, TranscriptError};
use stack_core::policy::audit::{AuditLog, AuditRecord};

/// Writes session `id`'s files, each holding `PROMPT-<id>`, and two audit
/// records for it.
fn plant(dir: &Path, folder: &str, id: &str, audit: &AuditLog) {
    let folder = dir.join(folder);
    std::fs::create_dir_all(folder.join("history")).expect("mkdir");
    let prompt = format!("PROMPT-{id}");
    std::fs::write(
        folder.join(format!("{id}.jsonl")),
        format!("{{\"role\":\"user\",\"content\":\"{prompt}\"}}\n"),
    )
    .expect("transcript");
    std::fs::write(
        folder.join(format!("{id}.kv")),
        format!("kv bytes {prompt}"),
    )
    .expect("kv");
    std::fs::write(folder.join("history").join(id), format!("{prompt}\n")).expect("history");
    for call in ["c1", "c2"] {
        audit
            .append(&AuditRecord::Result {
                time_ms: stack_core::policy::audit::now_ms(),
                session: id.to_string(),
                call_id: call.to_string(),
                tool: "read_file".to_string(),
                status: "ok".to_string(),
                duration_ms: 1,
                limit: None,
                error: Some(format!("saw {prompt}")),
            })
            .expect("audit");
    }
}

/// Every file under `dir` whose bytes contain `needle`.
fn grep(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .expect("read")
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

fn age(dir: &Path, folder: &str, id: &str, days: u64) {
    let when = SystemTime::now() - Duration::from_secs(days * 86_400);
    let folder = dir.join(folder);
    for file in [
        folder.join(format!("{id}.jsonl")),
        folder.join(format!("{id}.kv")),
        folder.join("history").join(id),
    ] {
        std::fs::File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_modified(when))
            .expect("set mtime");
    }
}

#[test]
fn delete_leaves_no_trace_of_the_session_and_keeps_the_others() {
    let data = tempfile::tempdir().expect("tempdir");
    let store = SessionStore::new(data.path());
    let audit = AuditLog::open(&store.audit_log()).expect("audit");
    plant(data.path(), ".", "alpha", &audit);
    plant(data.path(), ".", "beta", &audit);
    plant(data.path(), "serve", "gamma", &audit);
    assert_eq!(store.list().len(), 3);

    let removed = store.delete("alpha").expect("delete");
    assert_eq!(removed.files, 3);
    assert_eq!(removed.audit_records, 2);
    assert_eq!(grep(data.path(), "PROMPT-alpha"), Vec::<String>::new());
    // The others are whole.
    for (id, files) in [("beta", 4), ("gamma", 4)] {
        assert_eq!(
            grep(data.path(), &format!("PROMPT-{id}")).len(),
            files,
            "{id}"
        );
    }
    // The deletion is on record, without content.
    let log = std::fs::read_to_string(store.audit_log()).expect("audit log");
    let deleted: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["event"] == "deleted")
        .collect();
    assert_eq!(deleted.len(), 1, "{log}");
    assert_eq!(deleted[0]["session"], "alpha");
    assert_eq!(deleted[0]["removal"], "delete");
    assert_eq!(deleted[0]["audit_records"], 2);
    // The appender that was open across the rewrite still lands in the
    // log at the path.
    audit
        .append(&AuditRecord::Deleted {
            time_ms: 1,
            session: "marker".into(),
            removal: stack_core::policy::audit::Removal::Delete,
            files: 0,
            audit_records: 0,
        })
        .expect("append after the rewrite");
    let log = std::fs::read_to_string(store.audit_log()).expect("audit log");
    assert!(log.contains("\"marker\""), "{log}");
    // A session that is not there, and an id that is not one.
    let again = store.delete("alpha");
    assert!(
        matches!(again, Err(TranscriptError::NotFound(_))),
        "{again:?}"
    );
    assert!(matches!(
        store.delete("../beta"),
        Err(TranscriptError::BadId(_))
    ));
}

#[test]
fn purge_removes_exactly_the_expired_sessions() {
    let data = tempfile::tempdir().expect("tempdir");
    let store = SessionStore::new(data.path());
    let audit = AuditLog::open(&store.audit_log()).expect("audit");
    plant(data.path(), ".", "old1", &audit);
    plant(data.path(), "serve", "old2", &audit);
    plant(data.path(), ".", "fresh", &audit);
    age(data.path(), ".", "old1", 40);
    age(data.path(), "serve", "old2", 31);
    let removed = store
        .purge(Some(Duration::from_secs(30 * 86_400)))
        .expect("purge");
    let mut gone = removed.sessions.clone();
    gone.sort();
    assert_eq!(gone, ["old1", "old2"]);
    assert!(grep(data.path(), "PROMPT-old1").is_empty());
    assert!(grep(data.path(), "PROMPT-old2").is_empty());
    assert_eq!(grep(data.path(), "PROMPT-fresh").len(), 4);
    let ids: Vec<String> = store.list().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["fresh"]);
    // --all takes the rest, and the whole audit log but its own record.
    store.purge(None).expect("purge all");
    assert!(store.list().is_empty());
    assert!(grep(data.path(), "PROMPT-fresh").is_empty());
}

#[test]
fn export_needs_the_owners_consent() {
    let data = tempfile::tempdir().expect("tempdir");
    let store = SessionStore::new(data.path());
    let audit = AuditLog::open(&store.audit_log()).expect("audit");
    plant(data.path(), ".", "mine", &audit);
    assert!(!store.training_use("mine").expect("consent"));
    assert!(matches!(
        export_chatml(data.path(), "mine", &stack_seal::Vault::plaintext()),
        Err(TranscriptError::NoConsent(_))
    ));
    store.set_training_use("mine", true).expect("allow");
    let exported =
        export_chatml(data.path(), "mine", &stack_seal::Vault::plaintext()).expect("export");
    assert!(exported.contains("PROMPT-mine"));
    store.set_training_use("mine", false).expect("withdraw");
    assert!(export_chatml(data.path(), "mine", &stack_seal::Vault::plaintext()).is_err());
    assert!(matches!(
        store.set_training_use("nobody", true),
        Err(TranscriptError::NotFound(_))
    ));
}

#[test]
fn records_appended_while_the_log_is_rewritten_are_all_kept() {
    let data = tempfile::tempdir().expect("tempdir");
    let store = SessionStore::new(data.path());
    let audit = std::sync::Arc::new(AuditLog::open(&store.audit_log()).expect("audit"));
    plant(data.path(), ".", "doomed", &audit);
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let audit = std::sync::Arc::clone(&audit);
            std::thread::spawn(move || {
                for n in 0..200 {
                    audit
                        .append(&AuditRecord::Result {
                            time_ms: stack_core::policy::audit::now_ms(),
                            session: format!("keep-{writer}"),
                            call_id: format!("c{n}"),
                            tool: "list_dir".into(),
                            status: "ok".into(),
                            duration_ms: 0,
                            limit: None,
                            error: None,
                        })
                        .expect("append");
                }
            })
        })
        .collect();
    // Rewrites (delete, then purges that drop nothing) while they append.
    store.delete("doomed").expect("delete");
    for _ in 0..20 {
        store
            .purge(Some(Duration::from_secs(365 * 86_400)))
            .expect("purge");
    }
    for writer in writers {
        writer.join().expect("writer");
    }
    // Records a rewrite held off are written by the log's writer thread.
    assert!(audit.wait_written(Duration::from_secs(30)));
    let log = std::fs::read_to_string(store.audit_log()).expect("audit log");
    let kept = log
        .lines()
        .filter(|l| l.contains("\"session\":\"keep-"))
        .count();
    assert_eq!(
        kept, 800,
        "every record appended during the rewrites is there"
    );
    assert!(!log.contains("PROMPT-doomed"));
}

#[test]
fn a_session_open_in_a_running_agent_is_not_deleted_under_it() {
    let data = tempfile::tempdir().expect("tempdir");
    let store = SessionStore::new(data.path());
    let audit = AuditLog::open(&store.audit_log()).expect("audit");
    plant(data.path(), ".", "busy", &audit);
    // What a session's transcript writer holds while it is open.
    let open = std::fs::File::open(data.path().join("busy.jsonl")).expect("open");
    open.lock_shared().expect("lock");
    assert!(matches!(
        store.delete("busy"),
        Err(TranscriptError::InUse(_))
    ));
    assert!(store.purge(None).expect("purge").sessions.is_empty());
    assert_eq!(grep(data.path(), "PROMPT-busy").len(), 4, "left whole");
    drop(open);
    store.delete("busy").expect("delete once closed");
    assert!(grep(data.path(), "PROMPT-busy").is_empty());
}
