//! Panics of tasks that a test's own Tokio runtime runs (the in-process relay, agent and
//! `connect`, and every task they spawn), so that a panic there fails the test instead of
//! vanishing into a discarded `JoinHandle`.
//!
//! A process-wide panic hook (installed once, chaining to the previous hook) records each panic
//! that happens inside a Tokio runtime, keyed by the runtime's id. Every `#[tokio::test]` has a
//! runtime of its own, so a test sees exactly the panics of its own tasks, though tests run in
//! parallel threads of one process. The harness checks at each `stop()` and on drop.

use std::collections::HashMap;
use std::sync::{Mutex, Once};

use tokio::runtime::{Handle, Id};

static HOOK: Once = Once::new();
static PANICS: Mutex<Option<HashMap<Id, Vec<String>>>> = Mutex::new(None);

/// Installs the recording hook (idempotent).
pub fn watch() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(runtime) = Handle::try_current() {
                let what = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(non-string panic)".into());
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let thread = std::thread::current();
                let line = format!(
                    "thread {:?} panicked{at}: {what}",
                    thread.name().unwrap_or("?")
                );
                lock()
                    .get_or_insert_with(HashMap::new)
                    .entry(runtime.id())
                    .or_default()
                    .push(line);
            }
            previous(info);
        }));
    });
}

/// Panics (failing the test) if any task of the current runtime has panicked so far, naming
/// each panic. Does nothing outside a runtime, or while this thread is already panicking (a
/// second panic would abort the process).
pub fn check() {
    if std::thread::panicking() {
        return;
    }
    let Ok(runtime) = Handle::try_current() else {
        return;
    };
    let found = lock()
        .as_mut()
        .and_then(|m| m.remove(&runtime.id()))
        .unwrap_or_default();
    if !found.is_empty() {
        panic!(
            "{} task(s) of this test panicked:\n{}",
            found.len(),
            found.join("\n")
        );
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<HashMap<Id, Vec<String>>>> {
    // The hook only pushes strings; a poisoned map is still a usable map.
    PANICS.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[should_panic(expected = "task(s) of this test panicked")]
    async fn a_panic_in_a_spawned_task_fails_the_check() {
        watch();
        let task = tokio::spawn(async { panic!("deliberate panic in a background task") });
        assert!(task.await.is_err());
        check();
    }

    #[tokio::test]
    async fn the_check_passes_without_panics_and_ignores_other_runtimes() {
        watch();
        // A panic in another runtime (another test) is not this test's.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::spawn(async { panic!("elsewhere") }).await;
            });
        })
        .join()
        .unwrap();
        check();
    }
}
