//! The `candor` binary: the command line (`cli`), one module per command (`commands`) and the
//! benchmarks (`bench`), over the `candor` library.

mod bench;
mod cli;
mod commands;

use clap::Parser;

// The stream and the dataflow allocate many small strings per record; mimalloc roughly halves
// what glibc's allocator costs them (`candor bench stream`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = cli::Cli::parse();
    if let Err(e) = cli::main(cli) {
        eprintln!("error: {e:#}");
        let error = e.downcast_ref::<candor::error::Error>();
        if let Some(hint) = error.and_then(|e| e.retry_hint()) {
            eprintln!("{hint}");
        }
        std::process::exit(match error.map(|e| e.kind()) {
            Some(candor::error::Domain::Internal) => 70,
            Some(candor::error::Domain::External) => 74,
            Some(candor::error::Domain::Data) => 65,
            _ => 2,
        });
    }
}
