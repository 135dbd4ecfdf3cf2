use std::process::ExitCode;

fn main() -> ExitCode {
    cnitrace::cli::main()
}
