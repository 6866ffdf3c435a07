//! Guest sleeps that end at the call's deadline.
//!
//! The epoch deadline (rule 4 of the threat model in [`super`]) interrupts
//! guest *code*. A guest blocked in a host call runs no code, and
//! wasmtime-wasi's `poll_oneoff` sleeps for as long as the guest asked, so
//! `time.sleep(10**9)` would hold a call (and the agent waiting on it) far
//! past its wall-clock limit. The linker's `poll_oneoff` is therefore
//! replaced by one that serves a plain sleep itself: a single clock
//! subscription, relative or absolute, on the realtime or monotonic clock
//! (what `time.sleep`, `select` with no descriptors and `clock_nanosleep`
//! become), slept in short slices, trapping with [`Trap::Interrupt`] at the
//! deadline exactly as the epoch does, so the outcome is the same wall-time
//! limit. Every other poll (file descriptors, several subscriptions, other
//! clocks) goes to wasmtime-wasi's own `poll_oneoff`; none of those can
//! block here, since the guest has no sockets and its stdin is a memory pipe,
//! closed, or (in a session) the driver's own protocol stream.
//!
//! To know what an absolute monotonic time means, the guest's monotonic
//! clock is one this module installs ([`install_clock`]): nanoseconds since
//! an `Instant` the store keeps. wasmtime-wasi's `poll_oneoff` cannot be
//! called from host code (it finds the guest's memory through its caller),
//! so it is called through a three-instruction module that imports it and
//! the guest's memory and re-exports the memory ([`TRAMPOLINE`]).
//!
//! Attack test: `a_sleeping_guest_is_stopped_at_the_deadline` in
//! `tests/wasi_sandbox.rs`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker, Module, Trap, TypedFunc};
use wasmtime_wasi::{HostMonotonicClock, WasiCtxBuilder};

use super::StoreState;

const MODULE: &str = "wasi_snapshot_preview1";
const NAME: &str = "poll_oneoff";

/// wasmtime-wasi's `poll_oneoff` behind [`TRAMPOLINE`], for one store.
pub(crate) type Poll = TypedFunc<(i32, i32, i32, i32), i32>;

/// Calls the imported `poll_oneoff` on behalf of the host, with the guest's
/// memory imported and exported again so that the callee finds it.
const TRAMPOLINE: &str = r#"(module
  (import "guest" "memory" (memory 0))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "poll") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $poll))"#;

/// Longest single sleep: a deadline moved earlier while the guest sleeps (a
/// session being dropped) is seen within this.
const SLICE: Duration = Duration::from_millis(20);

/// `subscription` and `event` as laid out by WASI preview 1 (wasm32).
const SUBSCRIPTION_SIZE: usize = 48;
const EVENT_SIZE: usize = 32;
const TAG_CLOCK: u8 = 0;
const CLOCK_REALTIME: u32 = 0;
const CLOCK_MONOTONIC: u32 = 1;
const FLAG_ABSTIME: u16 = 1;
const EFAULT: i32 = 21;

/// The guest's monotonic clock: nanoseconds since `epoch`.
struct GuestClock {
    epoch: Instant,
}

impl HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Gives the context `builder` makes the guest clock; returns its epoch,
/// which the store must keep.
pub(crate) fn install_clock(builder: &mut WasiCtxBuilder) -> Instant {
    let epoch = Instant::now();
    builder.monotonic_clock(GuestClock { epoch });
    epoch
}

/// Replaces `poll_oneoff` in `linker` (which must already hold
/// wasmtime-wasi's preview-1 functions) with the deadline-bound one.
pub(crate) fn bound_sleeps(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    let original = linker.clone();
    let trampoline = Module::new(linker.engine(), TRAMPOLINE)?;
    linker.allow_shadowing(true);
    linker.func_wrap(
        MODULE,
        NAME,
        move |mut caller: Caller<'_, StoreState>,
              subscriptions: i32,
              events: i32,
              count: i32,
              stored: i32|
              -> wasmtime::Result<i32> {
            if count == 1 {
                if let Some(sleep) = plain_sleep(&mut caller, subscriptions)? {
                    return sleep_until_deadline(&mut caller, sleep, events, stored);
                }
            }
            let poll = match caller.data().poll_oneoff.clone() {
                Some(poll) => poll,
                None => {
                    let poll = wasi_poll(&mut caller, &original, &trampoline)?;
                    caller.data_mut().poll_oneoff = Some(poll.clone());
                    poll
                }
            };
            poll.call(&mut caller, (subscriptions, events, count, stored))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// wasmtime-wasi's `poll_oneoff` for this store, through the trampoline.
fn wasi_poll(
    caller: &mut Caller<'_, StoreState>,
    original: &Linker<StoreState>,
    trampoline: &Module,
) -> wasmtime::Result<Poll> {
    let memory = memory(caller)?;
    let poll = original
        .get(&mut *caller, MODULE, NAME)?
        .into_func()
        .ok_or_else(|| wasmtime::Error::msg("wasmtime-wasi has no poll_oneoff"))?;
    let mut linker = Linker::new(caller.engine());
    linker.define(&*caller, "guest", "memory", memory)?;
    linker.define(&*caller, MODULE, NAME, poll)?;
    let instance = linker.instantiate(&mut *caller, trampoline)?;
    instance.get_typed_func(&mut *caller, "poll")
}

/// A single clock subscription: its userdata and when it is due.
struct Sleep {
    userdata: u64,
    /// `None`: past what an `Instant` can hold (never, in practice).
    due: Option<Instant>,
}

fn memory(caller: &mut Caller<'_, StoreState>) -> wasmtime::Result<wasmtime::Memory> {
    caller
        .get_export("memory")
        .and_then(|export| export.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("the guest exports no memory"))
}

fn plain_sleep(caller: &mut Caller<'_, StoreState>, at: i32) -> wasmtime::Result<Option<Sleep>> {
    let memory = memory(caller)?;
    let mut raw = [0u8; SUBSCRIPTION_SIZE];
    // A bad pointer is left to wasmtime-wasi, which answers it with EFAULT.
    if memory.read(&*caller, at as u32 as usize, &mut raw).is_err() {
        return Ok(None);
    }
    let u64_at = |offset: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&raw[offset..offset + 8]);
        u64::from_le_bytes(bytes)
    };
    let tag = raw[8];
    let clock = u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]);
    let timeout = Duration::from_nanos(u64_at(24));
    let absolute = u16::from_le_bytes([raw[40], raw[41]]) & FLAG_ABSTIME != 0;
    if tag != TAG_CLOCK {
        return Ok(None);
    }
    let now = Instant::now();
    let due = match (clock, absolute) {
        (CLOCK_REALTIME | CLOCK_MONOTONIC, false) => now.checked_add(timeout),
        (CLOCK_MONOTONIC, true) => caller.data().clock_epoch.checked_add(timeout),
        (CLOCK_REALTIME, true) => {
            let left = (UNIX_EPOCH + timeout)
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            now.checked_add(left)
        }
        _ => return Ok(None),
    };
    Ok(Some(Sleep {
        userdata: u64_at(0),
        due,
    }))
}

fn sleep_until_deadline(
    caller: &mut Caller<'_, StoreState>,
    sleep: Sleep,
    events: i32,
    stored: i32,
) -> wasmtime::Result<i32> {
    loop {
        let now = Instant::now();
        let deadline = *caller
            .data()
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if deadline.is_some_and(|deadline| now >= deadline) {
            return Err(Trap::Interrupt.into());
        }
        let left = sleep
            .due
            .map_or(SLICE, |due| due.saturating_duration_since(now));
        if left.is_zero() {
            break;
        }
        let until_deadline = deadline.map_or(SLICE, |d| d.saturating_duration_since(now));
        std::thread::sleep(left.min(until_deadline).min(SLICE));
    }
    let memory = memory(caller)?;
    // userdata, then error 0 (success) and type 0 (clock), already zero.
    let mut event = [0u8; EVENT_SIZE];
    event[..8].copy_from_slice(&sleep.userdata.to_le_bytes());
    let wrote = memory
        .write(&mut *caller, events as u32 as usize, &event)
        .and_then(|()| memory.write(&mut *caller, stored as u32 as usize, &1u32.to_le_bytes()));
    Ok(if wrote.is_ok() { 0 } else { EFAULT })
}
