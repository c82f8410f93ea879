//! What a process holds, read from `/proc/self` (Linux): open file descriptors, resident memory
//! and the tasks alive in its async runtime. The relay's `/metrics` and the agent's systemd
//! status line show these, so that a leak shows as a number that grows while the load does not.
//! Elsewhere than Linux, the readings are `None`.

/// Open file descriptors of this process.
pub fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count)
}

/// Resident memory of this process, in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    vm_rss_bytes(&status)
}

/// Tasks alive in the current tokio runtime (`None` outside one).
pub fn runtime_tasks() -> Option<usize> {
    tokio::runtime::Handle::try_current()
        .ok()
        .map(|rt| rt.metrics().num_alive_tasks())
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_the_status_text() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_bytes(status), Some(1234 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
        assert_eq!(vm_rss_bytes("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn this_process_is_read() {
        // The test binary holds stdin, stdout and stderr at least, and some memory.
        assert!(open_fds().is_some_and(|n| n >= 3));
        assert!(resident_bytes().is_some_and(|n| n > 0));
        assert_eq!(runtime_tasks(), None);
    }

    #[tokio::test]
    async fn tasks_are_counted_in_a_runtime() {
        let before = runtime_tasks().expect("in a runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = rx.await;
        });
        assert_eq!(runtime_tasks(), Some(before + 1));
        drop(tx);
        task.await.unwrap();
        assert_eq!(runtime_tasks(), Some(before));
    }
}
