//! The `outbox-relay` binary: parse arguments, run, map the result to an exit code.
//! All the work lives in the library (`outbox_relay::cli`).

use std::process::ExitCode;

fn main() -> ExitCode {
    outbox_relay::cli::main()
}
