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
//! - bytes: `fd_write` and `fd_pwrite` to a regular file count every byte
//!   they write (wasmtime-wasi writes the first non-empty buffer of a
//!   call), overwrites included, since a write inside a file may fill a
//!   hole that took no disk and the host cannot tell, plus the hole a
//!   write past the end opens (a sparse file costs what it claims); an
//!   append-mode descriptor writes at the end whatever offset `fd_pwrite`
//!   names; `fd_filestat_set_size` counts what it grows. So a WASI budget
//!   bounds what a call *writes*, which bounds what it adds;
//! - names: `path_open` with `O_CREAT` (looked up as the call looks it
//!   up, following a symlink where it would), `path_create_directory`,
//!   `path_link` and `path_symlink` count one name each unless the name
//!   exists.
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

/// Marks an outcome whose use is unknown (its helper was killed, say)
/// as having used its whole budget, so that a session's total never misses
/// a call.
pub(crate) fn charge_unknown(outcome: &mut crate::Execution, budget: Option<DiskBudget>) {
    if outcome.disk.is_none() {
        outcome.disk = budget.map(|budget| stack_types::DiskAdded {
            bytes: budget.bytes,
            files: budget.files,
        });
    }
}

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
    pub(crate) fn account(&self, outcome: &mut crate::Execution) {
        outcome.disk = Some(stack_types::DiskAdded {
            bytes: self.bytes.load(Ordering::SeqCst),
            files: self.files.load(Ordering::SeqCst),
        });
        if self.refused.load(Ordering::SeqCst) && outcome.limit.is_none() {
            let budget = self.budget.unwrap_or_default();
            outcome.status = crate::ExecStatus::Killed;
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

/// Buffers looked at at most for a write's length (`IOV_MAX`): past it,
/// the first is taken, and wasmtime-wasi decides.
const MAX_BUFFERS: usize = 1024;

/// The length of the first non-empty buffer (what wasmtime-wasi writes).
fn first_length(memory: &GuestMemory<'_>, iovs: i32, count: i32) -> Option<u64> {
    let array: GuestPtr<[types::Ciovec]> = GuestPtr::new((iovs as u32, count as u32));
    for element in array.iter().take(MAX_BUFFERS) {
        let buffer = memory.read(element.ok()?).ok()?;
        if buffer.buf_len > 0 {
            return Some(u64::from(buffer.buf_len));
        }
    }
    Some(0)
}

/// Whether `path` (in the guest's memory), looked up with `lookup` as the
/// call will look it up, may make a new name in `dir`: anything but an
/// existing entry counts (an error over-counts, never under-counts).
fn is_new_name(
    wasi: &mut WasiP1Ctx,
    memory: &mut GuestMemory<'_>,
    dir: i32,
    lookup: Lookupflags,
    path: i32,
    length: i32,
) -> bool {
    let path: GuestPtr<str> = GuestPtr::new((path as u32, length as u32));
    in_tokio(wasi.path_filestat_get(memory, types::Fd::from(dir as u32), lookup, path)).is_err()
}

/// What a write of `length` bytes at `start` to a file of `size` bytes
/// counts: every byte written, and the hole it opens past the end.
fn write_cost(start: u64, length: u64, size: u64) -> u64 {
    length.saturating_add(start.saturating_sub(size))
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
                    if !meter.take(write_cost(start, length, size), 0) {
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
                // A negative offset is wasmtime-wasi's to refuse.
                if let (Some((size, append)), Ok(offset)) =
                    (regular_file(wasi, memory, fd), u64::try_from(offset))
                {
                    // Append mode writes at the end, whatever the offset.
                    let start = if append { size } else { offset };
                    let length = first_length(memory, iovs, count).unwrap_or(0);
                    if !meter.take(write_cost(start, length, size), 0) {
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
                if let (Some((now, _)), Ok(size)) =
                    (regular_file(wasi, memory, fd), u64::try_from(size))
                {
                    if !meter.take(size.saturating_sub(now), 0) {
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
                let follow = Lookupflags::from_bits_truncate(lookup as u32);
                let new = creates && is_new_name(wasi, memory, dir, follow, path, length);
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
                if is_new_name(wasi, memory, dir, Lookupflags::empty(), path, length)
                    && !meter.take(0, 1)
                {
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
                if is_new_name(
                    wasi,
                    memory,
                    new_dir,
                    Lookupflags::empty(),
                    new_path,
                    new_length,
                ) && !meter.take(0, 1)
                {
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
                if is_new_name(
                    wasi,
                    memory,
                    dir,
                    Lookupflags::empty(),
                    new_path,
                    new_length,
                ) && !meter.take(0, 1)
                {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_cost_what_they_write_and_the_holes_they_open() {
        // (start, length, size) -> cost
        for (start, length, size, cost) in [
            (0, 10, 0, 10),
            (5, 10, 100, 10),
            (100, 10, 100, 10),
            (1 << 40, 1, 0, (1 << 40) + 1),
            (u64::MAX, 10, 0, u64::MAX),
        ] {
            assert_eq!(
                write_cost(start, length, size),
                cost,
                "{start} {length} {size}"
            );
        }
        let meter = DiskMeter::new(Some(DiskBudget {
            bytes: 100,
            files: 1,
        }));
        assert!(meter.take(60, 1));
        assert!(!meter.take(41, 0), "past the bytes");
        assert!(!meter.take(0, 1), "past the names");
        assert!(meter.take(40, 0));
        let mut outcome = crate::Execution::from_output(b"", b"", false);
        meter.account(&mut outcome);
        assert_eq!(outcome.limit, Some(stack_types::Limit::Disk));
        assert_eq!(
            outcome.disk,
            Some(stack_types::DiskAdded {
                bytes: 100,
                files: 1
            })
        );
        meter.start_call();
        let mut outcome = crate::Execution::from_output(b"", b"", false);
        meter.account(&mut outcome);
        assert_eq!(outcome.limit, None, "a new call starts afresh");
    }
}
