//! Disk budgets in the real process sandbox (see `process::disk`): what one
//! call may add to the workspace and its tmp, held by the kernel (a sized
//! tmpfs under an overlay), and the write back of what it did.
//!
//! Each attack is a call that tries to add more than its budget, in one
//! way: one big file, many files, hard links, empty files, its private
//! tmp. The workspace must grow by at most the budget (plus a block per
//! file), the call must report `limit = "disk"`, and the runtime must keep
//! working. The write back is checked change by change, and against a
//! call that plants links to steer it outside the workspace.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use stack_sandbox::process::{DiskBudget, ProcessPolicy, ProcessSandbox, ResourceLimits};
use stack_sandbox::{ExecStatus, Execution};
use stack_types::{Language, Limit};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use common::process_sandbox as sandbox;

fn budget(bytes: u64, files: u64) -> ProcessPolicy {
    ProcessPolicy {
        limits: ResourceLimits {
            wall_ms: 20_000,
            cpu_seconds: 20,
            file_size_bytes: 1 << 30,
            disk: Some(DiskBudget { bytes, files }),
            ..ResourceLimits::default()
        },
        ..ProcessPolicy::default()
    }
}

/// Every name under `root` (relative) with the bytes it takes on disk
/// (a file's bytes under its first name only: links share them).
fn tree(root: &Path) -> BTreeMap<String, u64> {
    let mut found = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let listing =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for entry in listing {
            let entry = entry.expect("entry");
            let meta = std::fs::symlink_metadata(entry.path()).expect("lstat");
            let name = entry
                .path()
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let bytes = if seen.insert((meta.dev(), meta.ino())) {
                meta.blocks() * 512
            } else {
                0
            };
            found.insert(name, bytes);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found
}

/// Bytes and names `after` holds beyond `before`.
fn growth(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> (u64, usize) {
    let bytes_before: u64 = before.values().sum();
    let bytes_after: u64 = after.values().sum();
    let names = after.keys().filter(|k| !before.contains_key(*k)).count();
    (bytes_after.saturating_sub(bytes_before), names)
}

fn assert_disk_limit(outcome: &Execution, what: &str) {
    assert_eq!(outcome.status, ExecStatus::Killed, "{what}: {outcome:?}");
    assert_eq!(outcome.limit, Some(Limit::Disk), "{what}: {outcome:?}");
    assert!(
        outcome
            .error
            .as_deref()
            .is_some_and(|e| e.contains("disk budget")),
        "{what}: {outcome:?}"
    );
}

async fn healthy(sandbox: &ProcessSandbox, workspace: &Path, what: &str) {
    let outcome = sandbox
        .run_code(
            Language::Python,
            "print(6 * 7)",
            workspace,
            &ProcessPolicy::default(),
        )
        .await;
    assert_eq!(
        outcome.status,
        ExecStatus::Ok,
        "{what}: health check: {outcome:?}"
    );
    assert_eq!(outcome.stdout, "42\n", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_adds_more_than_its_disk_budget() {
    let _serial = SERIAL.lock().await;
    let sandbox = sandbox();
    const BYTES: u64 = 8 << 20;
    const FILES: u64 = 300;
    // Each attack, in bash and in Python: what it tries to add is far past
    // the budget (64 MiB, or 5,000 names).
    let attacks: &[(&str, Language, &str)] = &[
        ("one big file", Language::Bash, "head -c 67108864 /dev/zero > big; echo $?"),
        ("one big file", Language::Python, "open('big', 'wb').write(b'x' * (64 << 20))"),
        ("many files", Language::Bash, "for i in $(seq 1 5000); do head -c 100000 /dev/zero > f$i || break; done"),
        ("many empty files", Language::Python, "import os\nfor i in range(5000):\n    open(f'e{i}', 'w').close()"),
        ("many hard links", Language::Bash, "echo x > one; for i in $(seq 1 5000); do ln one l$i || break; done"),
        ("many folders and symlinks", Language::Python, "import os\nfor i in range(5000):\n    os.mkdir(f'd{i}'); os.symlink('d0', f's{i}')"),
        ("the private tmp", Language::Bash, "head -c 67108864 /dev/zero > $TMPDIR/big; for i in $(seq 1 5000); do : > $TMPDIR/e$i || break; done"),
        ("tmp and workspace together", Language::Bash, "head -c 6000000 /dev/zero > $TMPDIR/half || exit 3; head -c 6000000 /dev/zero > other_half"),
    ];
    for (what, language, code) in attacks {
        let workspace = tempfile::tempdir().expect("tempdir");
        std::fs::write(workspace.path().join("existing.txt"), "kept\n").expect("write");
        let before = tree(workspace.path());
        let outcome = sandbox
            .run_code(*language, code, workspace.path(), &budget(BYTES, FILES))
            .await;
        let after = tree(workspace.path());
        let (bytes, names) = growth(&before, &after);
        assert_disk_limit(&outcome, what);
        // The budget, plus a block per file for the rounding of the
        // workspace's own file system.
        assert!(
            bytes <= BYTES + names as u64 * 4096,
            "{what}: the workspace grew by {bytes} bytes in {names} names, past the {BYTES}-byte budget"
        );
        assert!(
            names as u64 <= FILES,
            "{what}: {names} names were added, past the budget of {FILES}"
        );
        let disk = outcome.disk.expect("a call with a budget reports its use");
        assert!(
            disk.bytes <= BYTES && disk.files <= FILES,
            "{what}: {disk:?}"
        );
        assert_eq!(
            std::fs::read_to_string(workspace.path().join("existing.txt")).expect("read"),
            "kept\n",
            "{what}"
        );
        healthy(&sandbox, workspace.path(), what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_changes_are_written_back_to_the_workspace() {
    let _serial = SERIAL.lock().await;
    let sandbox = sandbox();
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path();
    std::fs::write(ws.join("edit.txt"), "one\n").expect("write");
    std::fs::write(ws.join("delete.txt"), "x").expect("write");
    std::fs::create_dir_all(ws.join("tree/deep")).expect("mkdir");
    std::fs::write(ws.join("tree/deep/f"), "x").expect("write");
    std::fs::create_dir_all(ws.join("replaced/inner")).expect("mkdir");
    std::fs::write(ws.join("replaced/inner/old"), "x").expect("write");
    std::fs::write(ws.join("becomes_folder"), "x").expect("write");
    std::fs::create_dir(ws.join("becomes_file")).expect("mkdir");
    std::fs::create_dir(ws.join("moved")).expect("mkdir");
    std::fs::write(ws.join("moved/m"), "m").expect("write");
    let code = "set -e
echo two >> edit.txt
rm delete.txt
rm -rf tree
rm -rf replaced && mkdir -p replaced && echo new > replaced/fresh
rm becomes_folder && mkdir becomes_folder && echo in > becomes_folder/in
rmdir becomes_file && echo now a file > becomes_file
mv moved moved_too
mkdir -p new/nested && echo n > new/nested/n && chmod 640 new/nested/n
touch -d 2001-02-03T04:05:06 new/nested/n
ln -s new/nested/n link
ln new/nested/n hard
mkfifo pipe
python3 -c \"import os; os.makedirs('made/by/python'); os.rename('made', 'renamed')\"
";
    let outcome = sandbox
        .run_code(Language::Bash, code, ws, &ProcessPolicy::default())
        .await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    let read = |p: &str| std::fs::read_to_string(ws.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("edit.txt"), "one\ntwo\n");
    assert!(!ws.join("delete.txt").exists());
    assert!(!ws.join("tree").exists());
    assert_eq!(read("replaced/fresh"), "new\n");
    assert!(
        !ws.join("replaced/inner").exists(),
        "an opaque folder replaces the old one's contents"
    );
    assert_eq!(read("becomes_folder/in"), "in\n");
    assert_eq!(read("becomes_file"), "now a file\n");
    assert!(!ws.join("moved").exists());
    assert_eq!(read("moved_too/m"), "m");
    assert_eq!(read("new/nested/n"), "n\n");
    let meta = std::fs::metadata(ws.join("new/nested/n")).expect("stat");
    assert_eq!(meta.mode() & 0o777, 0o640);
    assert_eq!(meta.mtime(), 981_173_106, "times are written back");
    assert_eq!(
        std::fs::read_link(ws.join("link")).expect("readlink"),
        Path::new("new/nested/n")
    );
    let hard = std::fs::metadata(ws.join("hard")).expect("stat");
    assert_eq!(hard.ino(), meta.ino(), "hard links stay links");
    assert!(std::fs::symlink_metadata(ws.join("pipe"))
        .expect("stat")
        .file_type()
        .is_fifo_like());
    assert!(ws.join("renamed/by/python").is_dir());
    let disk = outcome.disk.expect("use reported");
    assert!(disk.files > 0 && disk.bytes > 0, "{disk:?}");
}

/// `FileType::is_fifo` through the unix extension, named for the assert.
trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_stopped_at_its_deadline_keeps_what_it_wrote() {
    let _serial = SERIAL.lock().await;
    let sandbox = sandbox();
    let workspace = tempfile::tempdir().expect("tempdir");
    let mut policy = ProcessPolicy::default();
    policy.limits.wall_ms = 1500;
    let outcome = sandbox
        .run_code(
            Language::Bash,
            "echo written > partial.txt; (sleep 300 &); sleep 300",
            workspace.path(),
            &policy,
        )
        .await;
    assert_eq!(outcome.status, ExecStatus::Timeout, "{outcome:?}");
    assert_eq!(outcome.limit, Some(Limit::WallTime));
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("partial.txt")).expect("kept"),
        "written\n"
    );
    healthy(&sandbox, workspace.path(), "after a timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_back_follows_no_link_out_of_the_workspace() {
    let _serial = SERIAL.lock().await;
    let sandbox = sandbox();
    let outside = tempfile::tempdir().expect("tempdir");
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path();
    std::os::unix::fs::symlink(outside.path(), ws.join("door")).expect("symlink");
    std::os::unix::fs::symlink(outside.path().join("target.txt"), ws.join("file_door"))
        .expect("symlink");
    std::fs::write(outside.path().join("target.txt"), "untouched\n").expect("write");
    // The call replaces each link with a folder or a file of its own: the
    // write back must replace the link, not write through it.
    let code = "rm door && mkdir door && echo planted > door/planted.txt
rm file_door && echo planted > file_door
mkdir -p a/b && ln -s ../.. a/b/up && echo x > a/b/up_x";
    let outcome = sandbox
        .run_code(Language::Bash, code, ws, &ProcessPolicy::default())
        .await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    assert!(
        !outside.path().join("planted.txt").exists(),
        "written through a link"
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("target.txt")).expect("read"),
        "untouched\n"
    );
    assert!(std::fs::symlink_metadata(ws.join("door"))
        .expect("stat")
        .is_dir());
    assert_eq!(
        std::fs::read_to_string(ws.join("door/planted.txt")).expect("read"),
        "planted\n"
    );
    assert!(std::fs::symlink_metadata(ws.join("file_door"))
        .expect("stat")
        .is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_cannot_be_written_back_fail_the_call_by_name() {
    let _serial = SERIAL.lock().await;
    let sandbox = sandbox();
    let workspace = tempfile::tempdir().expect("tempdir");
    // Folders nested deeper than the write back walks.
    let code = "p=.; for i in $(seq 1 230); do p=$p/d; done; mkdir -p $p && echo deep > $p/f";
    let outcome = sandbox
        .run_code(
            Language::Bash,
            code,
            workspace.path(),
            &ProcessPolicy::default(),
        )
        .await;
    assert_eq!(outcome.status, ExecStatus::Failed, "{outcome:?}");
    assert!(outcome.stderr.contains("nested deeper than"), "{outcome:?}");
    assert!(
        outcome
            .error
            .as_deref()
            .is_some_and(|e| e.contains("could not be written back")),
        "{outcome:?}"
    );
    healthy(&sandbox, workspace.path(), "after a partial write back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_budget_calls_write_to_the_workspace_directly() {
    let _serial = SERIAL.lock().await;
    let sandbox = sandbox();
    let workspace = tempfile::tempdir().expect("tempdir");
    let mut policy = ProcessPolicy::default();
    policy.limits.disk = None;
    let outcome = sandbox
        .run_code(
            Language::Bash,
            "head -c 10000000 /dev/zero > big && python3 -c \"import os; os.mkdir('a'); os.rename('a', 'b')\"",
            workspace.path(),
            &policy,
        )
        .await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    assert_eq!(outcome.disk, None);
    assert_eq!(
        std::fs::metadata(workspace.path().join("big"))
            .expect("stat")
            .len(),
        10_000_000
    );
}

/// Red team of the write back: sparse files (tmpfs counts their data, not
/// their size), more hard-linked files than any table would remember, and
/// files and folders the call made unreadable or read-only. The workspace
/// must get what the call made, holes as holes, links as links, and grow
/// by no more than the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_back_writes_no_more_than_the_budget_counted() {
    let _serial = SERIAL.lock().await;
    let sandbox = sandbox();
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path();
    std::fs::create_dir(ws.join("read_only")).expect("mkdir");
    std::fs::set_permissions(
        ws.join("read_only"),
        std::os::unix::fs::PermissionsExt::from_mode(0o555),
    )
    .expect("chmod");
    let before = tree(ws);
    let code = "import os
for i in range(50):
    with open(f'sparse{i}', 'wb') as f:
        f.truncate(60 << 20)
        f.write(b'head')
os.mkdir('links')
for i in range(400):
    open(f'links/a{i}', 'w').write(str(i))
    os.link(f'links/a{i}', f'links/b{i}')
open('big', 'wb').write(b'x' * (2 << 20))
for i in range(300):
    os.link('big', f'big{i}')
open('secret', 'w').write('mine')
os.chmod('secret', 0)
os.chmod('read_only', 0o755)
open('read_only/inside', 'w').write('in')
os.chmod('read_only', 0o555)
os.makedirs('closed/sub')
open('closed/sub/f', 'w').write('f')
os.chmod('closed/sub', 0o300)
";
    let outcome = sandbox
        .run_code(Language::Python, code, ws, &budget(8 << 20, 2000))
        .await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    // The folder the call closed (0300) stays closed; opened again, the
    // walk below can read it as any user.
    assert_eq!(
        std::fs::metadata(ws.join("closed/sub"))
            .expect("stat")
            .mode()
            & 0o777,
        0o300
    );
    std::fs::set_permissions(
        ws.join("closed/sub"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    assert_eq!(
        std::fs::read_to_string(ws.join("closed/sub/f")).expect("read"),
        "f"
    );
    let after = tree(ws);
    let (bytes, names) = growth(&before, &after);
    assert!(
        bytes <= (8 << 20) + names as u64 * 4096,
        "the workspace grew by {bytes} bytes in {names} names past an 8 MiB budget"
    );
    let sparse = std::fs::metadata(ws.join("sparse7")).expect("stat");
    assert_eq!(sparse.len(), 60 << 20, "a sparse file keeps its size");
    assert!(
        sparse.blocks() * 512 <= 64 * 1024,
        "and its holes: {} blocks",
        sparse.blocks()
    );
    for i in [0, 255, 256, 399] {
        let a = std::fs::metadata(ws.join(format!("links/a{i}"))).expect("stat");
        let b = std::fs::metadata(ws.join(format!("links/b{i}"))).expect("stat");
        assert_eq!(a.ino(), b.ino(), "links/a{i} and links/b{i} stay one file");
    }
    let big = std::fs::metadata(ws.join("big")).expect("stat");
    assert_eq!(big.nlink(), 301, "every link of big is a link");
    assert_eq!(
        std::fs::metadata(ws.join("secret")).expect("stat").mode() & 0o777,
        0
    );
    std::fs::set_permissions(
        ws.join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    assert_eq!(
        std::fs::read_to_string(ws.join("secret")).expect("read"),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("read_only/inside")).expect("read"),
        "in"
    );
    assert_eq!(
        std::fs::metadata(ws.join("read_only"))
            .expect("stat")
            .mode()
            & 0o777,
        0o555
    );
}
