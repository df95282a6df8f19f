//! The memtrace command: parses the options, runs a session (see the
//! library's `session`), and turns its outcome into an exit status and
//! one-line errors.

use std::process::ExitCode;

use clap::Parser as _;
use memtrace::{cli, session};

/// Exit statuses besides 0 (stopped by a signal, --count or --duration);
/// 3 when every traced process exited.
const EXIT_ERROR: u8 = 1;
const EXIT_TARGET_EXITED: u8 = 3;
const EXIT_MAPS_FULL: u8 = 4;

fn main() -> ExitCode {
    let options = cli::Options::parse();
    if options.verbose {
        log::set_logger(&kernel_log::STDERR).map(|()| log::set_max_level(log::LevelFilter::Info)).ok();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::Error::from(e)),
    };
    match runtime.block_on(session::run(options)) {
        Ok(outcome) => {
            if outcome.untracked > 0 {
                eprintln!(
                    "memtrace: {} allocations were not tracked because a map was full; the reports above undercount them (raise --max-allocs)",
                    outcome.untracked
                );
                return ExitCode::from(EXIT_MAPS_FULL);
            }
            match outcome.end {
                session::End::TargetExited => ExitCode::from(EXIT_TARGET_EXITED),
                session::End::Interrupted | session::End::Limit => ExitCode::SUCCESS,
            }
        }
        Err(e) => fail(&e),
    }
}

/// Where the kernel side's diagnostics go under `--verbose` (aya-log hands
/// them to the `log` crate): one line each on stderr.
mod kernel_log {
    pub struct Stderr;

    pub static STDERR: Stderr = Stderr;

    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }

        fn log(&self, record: &log::Record) {
            eprintln!("memtrace: kernel: {}", record.args());
        }

        fn flush(&self) {}
    }
}

/// One line: the error and its causes, as a sentence a user can act on.
fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("memtrace: {error:#}");
    ExitCode::from(EXIT_ERROR)
}
