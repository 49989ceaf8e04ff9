//! Rebuild the programs when `bpf-linker` changes: cargo does not know that linking
//! for the BPF target runs it.

use std::{env, path::PathBuf};

fn main() {
    // Only the PATH entry that would be used is tracked; installing a second
    // bpf-linker earlier in PATH goes unnoticed (as in the aya template).
    if let Some(linker) = find_in_path("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rerun-if-env-changed=PATH");
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
