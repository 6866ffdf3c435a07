//! Placing a shared library where binaries find it: the one copy routine
//! of the build scripts that need it (`runtime/build.rs` places llama.cpp's
//! and oneDNN's libraries beside the binaries; `runtime/voice/build.rs`
//! places oneDNN's in its `OUT_DIR/lib`). Each includes this file with
//! `#[path]`, since a build script cannot depend on a crate of the same
//! workspace without building it first for the host.

use std::path::{Path, PathBuf};

/// Copies `library` (through its symlink, to the file) into `folder`, by
/// way of a temporary name and a rename, so that a binary starting at the
/// same time never maps half a library; the copy keeps the library's
/// modification time. Skipped when the copy there is already the same
/// size with the same time. Creates `folder`. Returns where the copy is.
pub fn place_library(library: &Path, folder: &Path) -> PathBuf {
    let name = library.file_name().expect("a file name");
    let target = folder.join(name);
    let source = std::fs::metadata(library).expect("a library to place");
    let modified = source.modified().expect("a modification time");
    if let Ok(present) = std::fs::symlink_metadata(&target) {
        if present.is_file()
            && present.len() == source.len()
            && present.modified().ok() == Some(modified)
        {
            return target;
        }
    }
    let partial = folder.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let copied = std::fs::create_dir_all(folder)
        .and_then(|()| std::fs::copy(library, &partial))
        .and_then(|_| {
            std::fs::File::options()
                .write(true)
                .open(&partial)?
                .set_modified(modified)?;
            std::fs::rename(&partial, &target)
        });
    if let Err(err) = copied {
        let _ = std::fs::remove_file(&partial);
        panic!(
            "placing {} in {}: {err}",
            library.display(),
            folder.display()
        );
    }
    target
}
