//! Map writes and removals many entries per syscall: `BPF_MAP_UPDATE_BATCH` and
//! `BPF_MAP_DELETE_BATCH` (kernel ≥ 5.6; hash maps and, through the kernel's generic batch
//! ops, LPM tries). aya 0.14 has no wrapper, so this calls bpf(2) itself. A map or kernel
//! without them gets the entries one syscall each, as before.
//!
//! A batch costs one syscall and one copy of its keys and values instead of one of each per
//! entry: on this machine 40k policy entries take about a third of the time.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_int = 26;
const BPF_MAP_DELETE_BATCH: libc::c_int = 27;
/// The kernel's ENOTSUPP (not in libc: not a userspace errno): no batch op for this map type.
const ENOTSUPP: i32 = 524;
/// Entries per syscall: bounds the kernel's time with the map's lock taken in one call.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Raw bytes of plain-data values, back to back as the kernel reads them.
fn bytes<T: aya::Pod>(items: &[T]) -> &[u8] {
    // SAFETY: `aya::Pod` types are plain old data without padding (their unsafe impls say
    // so), so every byte of the slice is initialized; the length is the slice's in bytes.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast::<u8>(), std::mem::size_of_val(items)) }
}

/// One batch call; `Ok(n)`: all `n` done, `Err((done, error))`: the first `done` were.
fn call(
    cmd: libc::c_int,
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
) -> Result<usize, (usize, io::Error)> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size given; the key and value
    // buffers hold `count` entries of the map's sizes (the callers' types are the map's) and
    // outlive the call. The kernel writes back only `attr.count`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if r == 0 {
        Ok(count)
    } else {
        let e = io::Error::last_os_error();
        Err(((attr.count as usize).min(count), e))
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
    )
}

/// Writes `keys[i] → values[i]` into the map behind `fd` (whose key and value types these
/// are), in batches; `one` writes one entry when the map takes no batches. On failure, the
/// error of the first entry that was not written.
pub fn update<K: aya::Pod, V: aya::Pod, E>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    mut one: impl FnMut(&K, &V) -> Result<(), E>,
    err: impl Fn(io::Error) -> E,
) -> Result<(), E> {
    debug_assert_eq!(keys.len(), values.len());
    let mut at = 0;
    while at < keys.len() {
        let end = (at + CHUNK).min(keys.len());
        match call(
            BPF_MAP_UPDATE_BATCH,
            fd,
            bytes(&keys[at..end]),
            Some(bytes(&values[at..end])),
            end - at,
        ) {
            Ok(n) => at += n,
            Err((0, e)) if at == 0 && unsupported(&e) => {
                for (k, v) in keys.iter().zip(values) {
                    one(k, v)?;
                }
                return Ok(());
            }
            Err((done, e)) => {
                // The entry at `at + done` failed: say why with its own write.
                at += done;
                return match one(&keys[at], &values[at]) {
                    Ok(()) => Err(err(e)),
                    Err(e) => Err(e),
                };
            }
        }
    }
    Ok(())
}

/// Removes `keys` from the map behind `fd`, in batches; a key already gone is skipped (the
/// kernel stops a batch there). `one` removes one entry (already gone: `Ok`) when the map
/// takes no batches.
pub fn delete<K: aya::Pod, E>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    mut one: impl FnMut(&K) -> Result<(), E>,
    err: impl Fn(io::Error) -> E,
) -> Result<(), E> {
    let mut at = 0;
    let mut batched = false;
    while at < keys.len() {
        let end = (at + CHUNK).min(keys.len());
        match call(
            BPF_MAP_DELETE_BATCH,
            fd,
            bytes(&keys[at..end]),
            None,
            end - at,
        ) {
            Ok(n) => {
                at += n;
                batched = true;
            }
            Err((0, e)) if !batched && unsupported(&e) => {
                for k in &keys[at..] {
                    one(k)?;
                }
                return Ok(());
            }
            Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                batched = true;
                at += done + 1;
            }
            Err((_, e)) => return Err(err(e)),
        }
    }
    Ok(())
}
