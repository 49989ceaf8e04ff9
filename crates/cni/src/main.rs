//! `ambit-cni`: the CNI plugin binary. Reads the `CNI_*` environment and stdin, runs
//! the command (see `ambit_cni::plugin`), prints the result or error on stdout and
//! notes on stderr.
#![forbid(unsafe_code)]

use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
};

use ambit_cni::{
    cni::{CniEnv, CniError, ErrorCode},
    plugin::{self, PluginOutput},
};

fn main() -> ExitCode {
    let env = CniEnv::from_lookup(|name| std::env::var_os(name));
    let mut stdin = Vec::new();
    let output = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => plugin::run(&env, &stdin),
        Err(e) => {
            let error = CniError::new(ErrorCode::Io, format!("reading stdin: {e}"));
            PluginOutput {
                stdout: error.to_json(),
                success: false,
                notes: vec![error.to_string()],
            }
        }
    };
    for note in &output.notes {
        eprintln!("ambit-cni: {note}");
    }
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(output.stdout.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    if output.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
