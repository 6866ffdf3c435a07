//! Disk budgets for WASI guests, counted on the host.
//!
//! # Threat model
//!
//! A guest's file writes are made by wasmtime-wasi in the runtime's own
//! process, straight to the workspace: nothing in the kernel bounds what a
//! guest adds (red-team: 11 GB in 30 s). The process sandbox bounds it
//! with a sized tmpfs (see `process::disk`); a guest that runs on a thread
//! of the runtime cannot have one. So the calls through which a guest adds
//! to the workspace are wrapped in the linker, and each is counted against
//! the call's [`DiskBudget`] *before* it runs:
//!
//! - bytes: `fd_write` and `fd_pwrite` to a regular file count what they
//!   would add past the file's end (wasmtime-wasi writes the first
//!   non-empty buffer of a call; a write past the end counts its hole, so
//!   a sparse file costs what it claims); `fd_filestat_set_size` counts
//!   what it grows;
//! - names: `path_open` with `O_CREAT`, `path_create_directory`,
//!   `path_link` and `path_symlink` count one name each when the name did
//!   not exist.
//!
//! A call that would go past either bound fails whole with `ENOSPC`, the
//! guest goes on (it may handle the error), and the call reports
//! `limit = "disk"`. Deleting or shrinking gives nothing back: the budget
//! counts what a call adds, not what it keeps. A guest has no other way
//! to write: its preopens are the workspace and read-only mounts, it has
//! no sockets, and every other write-like call (`fd_allocate`) is
//! unsupported by wasmtime-wasi.
//!
//! Attack tests: `a_guest_cannot_add_more_than_its_disk_budget` in
//! `tests/wasi_sandbox.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use wasmtime::{AsContextMut, Caller, Extern, Linker};
use wasmtime_wasi::p1::types::{self, Errno, Fdflags, Filetype, Lookupflags, Oflags};
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as p1, WasiSnapshotPreview1 as _};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::runtime::in_tokio;
use wiggle::{GuestMemory, GuestPtr};

use super::StoreState;
use crate::process::DiskBudget;

const MODULE: &str = "wasi_snapshot_preview1";

/// What one call of a store has added, against its budget.
#[derive(Debug, Default)]
pub(crate) struct DiskMeter {
    budget: Option<DiskBudget>,
    bytes: AtomicU64,
    files: AtomicU64,
    refused: AtomicBool,
}

impl DiskMeter {
    /// A meter for calls under `budget` (`None`: counts, refuses nothing).
    pub(crate) fn new(budget: Option<DiskBudget>) -> Arc<DiskMeter> {
        Arc::new(DiskMeter {
            budget,
            ..DiskMeter::default()
        })
    }

    /// Starts counting a new call (a session's next frame).
    pub(crate) fn start_call(&self) {
        self.bytes.store(0, Ordering::SeqCst);
        self.files.store(0, Ordering::SeqCst);
        self.refused.store(false, Ordering::SeqCst);
    }

    /// Takes `bytes` and `files` from the budget, or says no (and
    /// remembers that it did).
    fn take(&self, bytes: u64, files: u64) -> bool {
        let Some(budget) = self.budget else {
            self.bytes.fetch_add(bytes, Ordering::SeqCst);
            self.files.fetch_add(files, Ordering::SeqCst);
            return true;
        };
        let fits = self.bytes.load(Ordering::SeqCst).saturating_add(bytes) <= budget.bytes
            && self.files.load(Ordering::SeqCst).saturating_add(files) <= budget.files;
        if fits {
            self.bytes.fetch_add(bytes, Ordering::SeqCst);
            self.files.fetch_add(files, Ordering::SeqCst);
        } else {
            self.refused.store(true, Ordering::SeqCst);
        }
        fits
    }

    /// Adds what the call added to `outcome`, and the disk limit when the
    /// budget refused a write and no other limit ended the call.
    pub(crate) fn account(&self, outcome: &mut stack_types::ToolOutcome) {
        outcome.disk = Some(stack_types::DiskAdded {
            bytes: self.bytes.load(Ordering::SeqCst),
            files: self.files.load(Ordering::SeqCst),
        });
        if self.refused.load(Ordering::SeqCst) && outcome.limit.is_none() {
            let budget = self.budget.unwrap_or_default();
            outcome.status = stack_types::Status::Killed;
            outcome.limit = Some(stack_types::Limit::Disk);
            let note = format!(
                "the call's disk budget ({} MiB, {} files added to the workspace) ran out: writes past it failed with ENOSPC",
                budget.bytes >> 20,
                budget.files
            );
            outcome.error = Some(match outcome.error.take() {
                Some(before) => format!("{note}; {before}"),
                None => note,
            });
        }
    }
}

/// What a wrapped call needs: the guest's memory and the WASI context.
fn with_memory<R>(
    caller: &mut Caller<'_, StoreState>,
    run: impl FnOnce(&mut WasiP1Ctx, &mut GuestMemory<'_>, &DiskMeter) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    let fuel = caller.as_context_mut().hostcall_fuel();
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        wasmtime::bail!("missing required memory export")
    };
    let (bytes, state) = memory.data_and_store_mut(caller);
    let mut memory = GuestMemory::Unshared(bytes);
    let meter = Arc::clone(&state.disk);
    let wasi = &mut state.wasi;
    wasi.set_hostcall_fuel(fuel);
    run(wasi, &mut memory, &meter)
}

/// The size of `fd` if it is a regular file, and whether it appends.
fn regular_file(
    wasi: &mut WasiP1Ctx,
    memory: &mut GuestMemory<'_>,
    fd: i32,
) -> Option<(u64, bool)> {
    let fd = types::Fd::from(fd as u32);
    let stat = in_tokio(wasi.fd_fdstat_get(memory, fd)).ok()?;
    if stat.fs_filetype != Filetype::RegularFile {
        return None;
    }
    let size = in_tokio(wasi.fd_filestat_get(memory, fd)).ok()?.size;
    Some((size, stat.fs_flags.contains(Fdflags::APPEND)))
}

/// The length of the first non-empty buffer (what wasmtime-wasi writes).
fn first_length(memory: &GuestMemory<'_>, iovs: i32, count: i32) -> Option<u64> {
    let array: GuestPtr<[types::Ciovec]> = GuestPtr::new((iovs as u32, count as u32));
    for element in array.iter() {
        let buffer = memory.read(element.ok()?).ok()?;
        if buffer.buf_len > 0 {
            return Some(u64::from(buffer.buf_len));
        }
    }
    Some(0)
}

/// Whether `path` (in the guest's memory) names nothing in `dir` yet.
fn is_new_name(
    wasi: &mut WasiP1Ctx,
    memory: &mut GuestMemory<'_>,
    dir: i32,
    path: i32,
    length: i32,
) -> bool {
    let path: GuestPtr<str> = GuestPtr::new((path as u32, length as u32));
    matches!(
        in_tokio(wasi.path_filestat_get(
            memory,
            types::Fd::from(dir as u32),
            Lookupflags::empty(),
            path
        )),
        Err(err) if err.downcast_ref() == Some(&Errno::Noent)
    )
}

const NO_SPACE: i32 = Errno::Nospc as i32;

/// Replaces the calls that add to the workspace with counted ones. Call
/// after wasmtime-wasi's own are in the linker.
pub(crate) fn count_writes(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut caller: Caller<'_, StoreState>, fd: i32, iovs: i32, count: i32, out: i32| {
            with_memory(&mut caller, |wasi, memory, meter| {
                if let Some((size, append)) = regular_file(wasi, memory, fd) {
                    let start = if append {
                        size
                    } else {
                        wasi.fd_tell(memory, types::Fd::from(fd as u32))
                            .unwrap_or(size)
                    };
                    let length = first_length(memory, iovs, count).unwrap_or(0);
                    if !meter.take(start.saturating_add(length).saturating_sub(size), 0) {
                        return Ok(NO_SPACE);
                    }
                }
                in_tokio(p1::fd_write(wasi, memory, fd, iovs, count, out))
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pwrite",
        |mut caller: Caller<'_, StoreState>,
         fd: i32,
         iovs: i32,
         count: i32,
         offset: i64,
         out: i32| {
            with_memory(&mut caller, |wasi, memory, meter| {
                if let Some((size, _)) = regular_file(wasi, memory, fd) {
                    let length = first_length(memory, iovs, count).unwrap_or(0);
                    let end = (offset as u64).saturating_add(length);
                    if !meter.take(end.saturating_sub(size), 0) {
                        return Ok(NO_SPACE);
                    }
                }
                in_tokio(p1::fd_pwrite(wasi, memory, fd, iovs, count, offset, out))
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_size",
        |mut caller: Caller<'_, StoreState>, fd: i32, size: i64| {
            with_memory(&mut caller, |wasi, memory, meter| {
                if let Some((now, _)) = regular_file(wasi, memory, fd) {
                    if !meter.take((size as u64).saturating_sub(now), 0) {
                        return Ok(NO_SPACE);
                    }
                }
                in_tokio(p1::fd_filestat_set_size(wasi, memory, fd, size))
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_open",
        |mut caller: Caller<'_, StoreState>,
         dir: i32,
         lookup: i32,
         path: i32,
         length: i32,
         open: i32,
         base: i64,
         inheriting: i64,
         flags: i32,
         out: i32| {
            with_memory(&mut caller, |wasi, memory, meter| {
                let creates = (open as u16) & Oflags::CREAT.bits() != 0;
                let new = creates && is_new_name(wasi, memory, dir, path, length);
                if new && !meter.take(0, 1) {
                    return Ok(NO_SPACE);
                }
                in_tokio(p1::path_open(
                    wasi, memory, dir, lookup, path, length, open, base, inheriting, flags, out,
                ))
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_create_directory",
        |mut caller: Caller<'_, StoreState>, dir: i32, path: i32, length: i32| {
            with_memory(&mut caller, |wasi, memory, meter| {
                if is_new_name(wasi, memory, dir, path, length) && !meter.take(0, 1) {
                    return Ok(NO_SPACE);
                }
                in_tokio(p1::path_create_directory(wasi, memory, dir, path, length))
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_link",
        |mut caller: Caller<'_, StoreState>,
         old_dir: i32,
         old_flags: i32,
         old_path: i32,
         old_length: i32,
         new_dir: i32,
         new_path: i32,
         new_length: i32| {
            with_memory(&mut caller, |wasi, memory, meter| {
                if is_new_name(wasi, memory, new_dir, new_path, new_length) && !meter.take(0, 1) {
                    return Ok(NO_SPACE);
                }
                in_tokio(p1::path_link(
                    wasi, memory, old_dir, old_flags, old_path, old_length, new_dir, new_path,
                    new_length,
                ))
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_symlink",
        |mut caller: Caller<'_, StoreState>,
         old_path: i32,
         old_length: i32,
         dir: i32,
         new_path: i32,
         new_length: i32| {
            with_memory(&mut caller, |wasi, memory, meter| {
                if is_new_name(wasi, memory, dir, new_path, new_length) && !meter.take(0, 1) {
                    return Ok(NO_SPACE);
                }
                in_tokio(p1::path_symlink(
                    wasi, memory, old_path, old_length, dir, new_path, new_length,
                ))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
