//! The memtrace command: parses the options, runs a session (see the
//! library's `session`) or a subcommand on saved snapshots, and turns its
//! outcome into an exit status and one-line errors.

use std::process::ExitCode;

use memtrace::{
    cli::{self, Command, View},
    process::source::SourceFiles,
    report::saved::SavedSnapshot,
    session,
};

/// Exit statuses besides 0 (stopped by a signal, --count or --duration);
/// 3 when every traced process exited.
const EXIT_ERROR: u8 = 1;
const EXIT_TARGET_EXITED: u8 = 3;
const EXIT_MAPS_FULL: u8 = 4;

fn main() -> ExitCode {
    let cli = cli::parse();
    match cli.command {
        Some(Command::Diff { old, new, view }) => {
            return offline(&view, || Ok((Some(SavedSnapshot::load(&old)?), SavedSnapshot::load(&new)?)));
        }
        Some(Command::Show { snapshot, view }) => {
            return offline(&view, || Ok((None, SavedSnapshot::load(&snapshot)?)));
        }
        None => {}
    }
    let options = cli.trace;
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

/// `memtrace diff` and `memtrace show`: one report from saved snapshots,
/// (the earlier one, the later one), written as a live report would be.
fn offline(view: &View, load: impl FnOnce() -> anyhow::Result<(Option<SavedSnapshot>, SavedSnapshot)>) -> ExitCode {
    let written = load().and_then(|(old, new)| {
        // The process may be gone, or its pid reused: sources come from the
        // host's files as they are now.
        let mut output = view.stdout_writer(SourceFiles::on_host(), false);
        output.writer.write(&new.report(old.as_ref())).map_err(|e| anyhow::anyhow!("cannot write the report: {e}"))
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// One line: the error and its causes, as a sentence a user can act on.
fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("memtrace: {error:#}");
    ExitCode::from(EXIT_ERROR)
}
