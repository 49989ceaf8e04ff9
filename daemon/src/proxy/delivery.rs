//! The pod-netns routing that lets the daemon connect to the app with the client's
//! IP as source (NOTES-kernel: "Source-IP preservation"): packets carrying the
//! delivery mark are routed to `lo` (table [`DELIVERY_TABLE`], looked up before the
//! `local` table, which moves from pref 0 to 100), and `tcp_fwmark_accept` makes the
//! app's accepted socket inherit the mark so that its replies come back to the
//! daemon's transparent socket.

use std::io;
use std::process::Command;

use crate::capture::PodHandle;

/// The routing table of marked (delivery) packets in each pod netns.
pub const DELIVERY_TABLE: u32 = 100;

/// Installs the delivery routing in the pod's netns (idempotent: a resumed pod
/// already has it).
pub fn setup(pod: &PodHandle, mark: u32) -> io::Result<()> {
    pod.run_in_netns(move || {
        // /proc/sys/net resolves against the opener's netns: this thread's.
        std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
        if ip(&["rule", "show", "pref", "100"])?.is_empty() {
            ip(&["rule", "add", "pref", "100", "lookup", "local"])?;
        }
        if ip(&["rule", "show", "pref", "0"])?.contains("lookup local") {
            ip(&["rule", "del", "pref", "0", "lookup", "local"])?;
        }
        let table = DELIVERY_TABLE.to_string();
        let mark = format!("{mark:#x}");
        if ip(&["rule", "show", "pref", "10"])?.is_empty() {
            ip(&[
                "rule", "add", "pref", "10", "fwmark", &mark, "lookup", &table,
            ])?;
        }
        ip(&[
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table,
        ])?;
        Ok(())
    })
    .map_err(io::Error::other)
}

/// Runs `ip ARGS` (the child inherits this thread's netns); its stdout.
fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
