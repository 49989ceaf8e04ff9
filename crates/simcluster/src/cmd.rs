//! Running helper programs (`ip`, `sysctl`) with errors that show the command line
//! and its stderr.

use std::process::Command;

use crate::Error;

/// Runs `program args…`, returning its stdout; a non-zero exit becomes
/// [`Error::Command`] carrying the command line and stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let command = render(program, args);
    tracing::debug!(%command, "running");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| Error::CommandStart {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip args…` (iproute2).
pub(crate) fn ip(args: &[&str]) -> Result<String, Error> {
    run("ip", args)
}

/// Runs `ip -n NETNS args…`: the command acts inside that network namespace.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String, Error> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

fn render(program: &str, args: &[&str]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(a);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_show_command_and_stderr() {
        let e = run("sh", &["-c", "echo boom >&2; exit 3"]).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("sh -c \"echo boom >&2; exit 3\""), "{s}");
        assert!(s.contains("boom"), "{s}");
        assert!(s.contains('3'), "{s}");
    }
}
