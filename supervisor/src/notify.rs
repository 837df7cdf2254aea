//! The service manager's view of bext (`Type=notify` units): READY=1 once
//! bext listens with every app started, RELOADING=1 (with MONOTONIC_USEC)
//! while a reload is applied, STOPPING=1 when it drains, and a one-line
//! STATUS=. Without `NOTIFY_SOCKET` (not under systemd) each call does
//! nothing. Workers never see `NOTIFY_SOCKET` (their environment is an
//! allow-list), so no app can speak for bext.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("could not notify the service manager: {e}");
    }
}

/// Serving, with everything that was to start started.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins (READY=1 again when it is over).
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
        NotifyState::Status("reloading"),
    ]);
}

/// Draining before exit.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// A new one-line summary.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}
