//! Set-up every thread flatlet makes does first (a leaf module: it
//! depends on nothing else of flatlet's).

use log::warn;

/// Keeps the signals that stop flatlet (SIGINT, SIGTERM, SIGHUP) off the
/// calling thread: they are handled on the VMM thread, whose seccomp
/// filter allows what their handler does. Threads other than the VMM
/// thread call this first thing.
pub fn mask_stop_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if let Err(e) = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        warn!("cannot mask stop signals on this thread: {e}");
    }
}
