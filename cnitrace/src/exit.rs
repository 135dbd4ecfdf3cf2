//! Exit codes: part of the contract with scripts and tests. Stable; documented in the README.

use std::process::ExitCode;

/// `follow`: the pair's traffic was delivered. Other commands: success.
pub const OK: u8 = 0;
/// `follow`: the traffic was dropped and the drop point was found. `check`: something is wrong.
pub const DROPPED: u8 = 1;
/// Usage or environment error (bad address, not root, no BTF, a lab that is not up...).
pub const USAGE: u8 = 2;
/// `follow`: inconclusive, no matching traffic was seen.
pub const INCONCLUSIVE: u8 = 3;

pub fn code(c: u8) -> ExitCode {
    ExitCode::from(c)
}
