//! Background work at a lower priority than requests: fjall's threads, which write and
//! merge tables, and the janitor's batches.
//!
//! On two cores a burst of such work took a core from the runtime's workers and showed
//! in the requests' p99 (BENCHMARKS.md, "Stop 17" and "Stop 18"). At nice 10 the
//! kernel gives the workers the cores first, and the background work the rest.

use std::sync::{Mutex, PoisonError};

use nix::libc;

/// The nice value of background threads.
pub const BACKGROUND_NICE: libc::c_int = 10;

/// Sets [`BACKGROUND_NICE`] on the threads `tids` (0: the calling thread). Best
/// effort: a thread left at the default priority costs latency, not correctness.
pub fn lower_priority<'a>(tids: impl IntoIterator<Item = &'a libc::id_t>) {
    for &tid in tids {
        // SAFETY: a system call on plain integers; raising a thread's nice value needs
        // no privilege (systemd/otpd.service allows `setpriority` for this).
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE) } != 0 {
            let error = std::io::Error::last_os_error();
            tracing::debug!(tid, %error, "could not lower a background thread's priority");
        }
    }
}

/// The nice value of the thread `tid` (0: the calling thread).
#[cfg(test)]
pub fn nice_of(tid: libc::id_t) -> libc::c_int {
    // SAFETY: a system call on plain integers.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }
}

/// Runs `work` on a thread of its own named `name`, at [`BACKGROUND_NICE`], and waits
/// for it. (A thread cannot get its priority back without privilege, so the work does
/// not run on the caller's.) If no thread can be started, the work runs on the
/// caller's all the same, at its priority: the janitor must not stop for that.
pub fn run_in_background<T: Send>(name: &str, work: impl FnOnce() -> T + Send) -> T {
    let work = Mutex::new(Some(work));
    let run = || {
        (work.lock().unwrap_or_else(PoisonError::into_inner).take()).expect("the work runs once")()
    };
    std::thread::scope(|scope| {
        let started = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(scope, || {
                lower_priority([&0]);
                run()
            });
        match started {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(error) => {
                tracing::warn!(thread = name, %error, "could not start a background thread; its work runs at the caller's priority");
                run()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_work_runs_at_a_lower_priority_and_leaves_the_callers_alone() {
        let before = nice_of(0);
        let (nice, answer) = run_in_background("test", || (nice_of(0), 42));
        assert_eq!(nice, BACKGROUND_NICE);
        assert_eq!(answer, 42);
        assert_eq!(nice_of(0), before, "the caller's priority changed");
    }
}
