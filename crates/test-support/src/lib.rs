//! Helpers for Ambit's tests: polling with a deadline instead of sleeping, and finding
//! the workspace's built binaries.
#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Polls `check` every `interval` until it returns `Ok(value)` or `timeout` passes; the
/// error names what was awaited and the last failure seen.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: not reached within {timeout:?}")));
            }
            Err(_) => std::thread::sleep(interval),
        }
    }
}

/// Async form of [`eventually`].
pub async fn eventually_async<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: not reached within {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(interval).await,
        }
    }
}

/// Asserts that an expression becomes true within a deadline, polling it.
///
/// `assert_eventually!(cond)` uses a 10 s deadline; `assert_eventually!(cond, timeout)`
/// takes a `Duration`.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr) => {
        $crate::assert_eventually!($cond, ::std::time::Duration::from_secs(10))
    };
    ($cond:expr, $timeout:expr) => {{
        let res = $crate::eventually(
            stringify!($cond),
            $timeout,
            ::std::time::Duration::from_millis(20),
            || {
                if $cond {
                    Ok(())
                } else {
                    Err(::anyhow::anyhow!("still false"))
                }
            },
        );
        if let Err(e) = res {
            panic!("{e:#}");
        }
    }};
}

/// Directory holding the workspace's built binaries (`target/debug` for tests).
///
/// Integration test executables live in `target/<profile>/deps/`; the binaries of
/// every workspace package sit one level up. `cargo xtask test` builds them first.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe
        .parent()
        .context("test executable has no parent directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a workspace binary, with an error that says how to build it when missing.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "binary {name} not found at {} (run `cargo build --workspace --bins` or `cargo xtask test`)",
            path.display()
        );
    }
    Ok(path)
}

/// A short id unique to this process and call, for naming test resources.
pub fn unique_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{n:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_reports_what_and_last_error() {
        let err = eventually(
            "the answer",
            Duration::from_millis(50),
            Duration::from_millis(5),
            || Err::<(), _>(anyhow::anyhow!("still 41")),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("the answer"), "{msg}");
        assert!(msg.contains("still 41"), "{msg}");
    }

    #[test]
    fn eventually_returns_once_true() {
        let mut n = 0;
        let v = eventually(
            "n reaches 3",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                if n >= 3 {
                    Ok(n)
                } else {
                    Err(anyhow::anyhow!("n={n}"))
                }
            },
        )
        .unwrap();
        assert_eq!(v, 3);
    }
}
